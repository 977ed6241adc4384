"""The merged index of a run, its summary and its saved configuration (SPEC §7.3).

``source_to_zarr_mapping.parquet`` holds exactly one row per catalogue row, in catalogue order,
so that nothing is dropped silently: sources without an image (``no_overlap``, ``failed``) are
listed with the reason.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from .config import config_hash, save_config_toml
from .exceptions import CutanaError

logger = logging.getLogger(__name__)

INDEX_NAME = "source_to_zarr_mapping.parquet"
SUMMARY_NAME = "run_summary.json"
CONFIG_TOML_NAME = "cutana_config.toml"

#: Every status a source can have (SPEC §7.3), in report order.
STATUSES = ("ok", "partial", "no_overlap", "failed")


def file_column(cfg: Mapping) -> str:
    """Name of the index column holding each source's output file (``zarr_file``/``fits_file``)."""
    return "fits_file" if cfg["output_format"] == "fits" else "zarr_file"


def index_columns(cfg: Mapping) -> list[str]:
    """The columns of the merged index, in order (SPEC §7.3)."""
    return [
        "SourceID", "RA", "Dec", file_column(cfg), "batch_index", "idx_in_zarr", "status",
        "reason",
    ]  # fmt: skip


def _read_status(path: str | Path, cfg: Mapping) -> pd.DataFrame:
    """One batch's status rows, with the file and batch columns filled in when absent."""
    path = Path(path)
    batch_name = path.stem
    table = pd.read_parquet(path)
    column = file_column(cfg)
    if "batch_index" not in table.columns:
        table["batch_index"] = int(batch_name.split("_")[0])
    if column not in table.columns:
        has_image = table["idx_in_zarr"].to_numpy() >= 0
        folder = f"batch_cutout_process_{batch_name}"
        target = f"{folder}/images.zarr" if column == "zarr_file" else folder
        table[column] = np.where(has_image, target, None)
    return table


def merge_status_tables(
    status_paths: Iterable[str | Path], total_rows: int, cfg: Mapping
) -> pd.DataFrame:
    """Concatenate the batches' status rows into the index, one row per catalogue row.

    Parameters
    ----------
    status_paths : iterable of path
        ``{output_dir}/.cutana/status/{batch}.parquet`` of every batch.
    total_rows : int
        Number of catalogue rows (the manifest's ``total_rows``).
    cfg : mapping
        Validated configuration (``output_format``).

    Returns
    -------
    DataFrame
        :func:`index_columns`, sorted by catalogue row.

    Raises
    ------
    CutanaError
        If a catalogue row is missing or appears twice, or a status is unknown.
    """
    tables = [_read_status(path, cfg) for path in status_paths]
    if not tables:
        merged = pd.DataFrame({"row_index": pd.Series(dtype="int64")})
    else:
        merged = pd.concat(tables, ignore_index=True)
    rows = merged["row_index"].to_numpy(dtype=np.int64)
    duplicated = np.unique(rows[pd.Series(rows).duplicated().to_numpy()])
    missing = np.setdiff1d(np.arange(total_rows, dtype=np.int64), rows)
    extra = rows[(rows < 0) | (rows >= total_rows)]
    if len(merged) != total_rows or duplicated.size or missing.size or extra.size:
        raise CutanaError(
            f"the batches' status tables hold {len(merged)} rows but the catalogue has "
            f"{total_rows}: missing catalogue rows {missing[:10].tolist()}, duplicated rows "
            f"{duplicated[:10].tolist()}, out-of-range rows {extra[:10].tolist()} "
            "(first 10 each). Delete the output directory's .cutana folder and rerun."
        )
    unknown = sorted(set(merged["status"]) - set(STATUSES))
    if unknown:
        raise CutanaError(
            f"unknown source status values {unknown} in the status tables; expected one of "
            f"{list(STATUSES)}"
        )
    merged = merged.sort_values("row_index", kind="stable").reset_index(drop=True)
    merged["reason"] = merged["reason"].fillna("").astype(str)
    merged["idx_in_zarr"] = merged["idx_in_zarr"].astype("int64")
    merged["batch_index"] = merged["batch_index"].astype("int64")
    merged["SourceID"] = merged["SourceID"].astype(str)
    # Sources without an output file have a null there (not NaN, not "").
    files = merged[file_column(cfg)].astype(object)
    merged[file_column(cfg)] = files.where(files.notna() & (files != ""), None)
    return merged[index_columns(cfg)]


def benchmark_timings(benchmark_paths: Iterable[str | Path]) -> dict:
    """Summarise Snakemake benchmark files per rule.

    A file ``.../benchmarks/cutout_batch/{batch}.tsv`` counts for the rule of its folder, a file
    ``.../benchmarks/{rule}.tsv`` for its own name. Missing files are skipped (e.g. the demo
    rule when the catalogue is the user's), and so are empty or unreadable ones, with a warning:
    a run killed while Snakemake wrote a benchmark file leaves it so, and its resumed run does
    not rewrite the file of a job that had finished. Timings are information; the index and the
    outputs never depend on them.

    Parameters
    ----------
    benchmark_paths : iterable of path

    Returns
    -------
    dict
        ``{rule: {"jobs", "total_s", "mean_s", "max_s", "max_rss_mb"}}``; ``max_rss_mb`` is
        null when no job lasted long enough to be sampled.
    """
    per_rule: dict[str, list[pd.DataFrame]] = {}
    for path in map(Path, benchmark_paths):
        if not path.is_file():
            continue
        rule = path.stem if path.parent.name == "benchmarks" else path.parent.name
        try:
            table = pd.read_csv(path, sep="\t", na_values=["-", "NA"])
        except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as error:
            logger.warning("benchmark file %s skipped (%s): its job's time is unknown", path, error)
            continue
        if "s" not in table.columns:
            logger.warning("benchmark file %s skipped: it has no 's' (seconds) column", path)
            continue
        per_rule.setdefault(rule, []).append(table)
    timings = {}
    for rule, tables in sorted(per_rule.items()):
        table = pd.concat(tables, ignore_index=True)
        seconds = pd.to_numeric(table["s"], errors="coerce")
        rss = pd.to_numeric(table.get("max_rss"), errors="coerce")
        timings[rule] = {
            "jobs": len(tables),
            "total_s": round(float(seconds.sum()), 3),
            "mean_s": round(float(seconds.mean()), 3),
            "max_s": round(float(seconds.max()), 3),
            "max_rss_mb": None if rss is None or rss.isna().all() else round(float(rss.max()), 1),
        }
    return timings


def run_summary(index: pd.DataFrame, manifest: Mapping, cfg: Mapping, timings: dict) -> dict:
    """The content of ``run_summary.json``.

    Parameters
    ----------
    index : DataFrame
        The merged index.
    manifest : mapping
        The batch manifest.
    cfg : mapping
        Validated configuration.
    timings : dict
        :func:`benchmark_timings` output.

    Returns
    -------
    dict
    """
    counts = index["status"].value_counts()
    return {
        "name": cfg["name"],
        "total_sources": len(index),
        "counts": {status: int(counts.get(status, 0)) for status in STATUSES},
        "n_batches": len(manifest["batches"]),
        "n_tiles": len(manifest.get("tiles", {})),
        "output_format": cfg["output_format"],
        "config_hash": config_hash(cfg),
        "catalogue": manifest.get("catalogue", cfg["source_catalogue"]),
        "timings": timings,
        "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


def merge_index(
    status_paths: Iterable[str | Path],
    manifest: Mapping,
    cfg: Mapping,
    out_dir: str | Path,
    benchmark_paths: Iterable[str | Path] = (),
) -> dict[str, str]:
    """Write the merged index, the run summary and the effective config of a run.

    Parameters
    ----------
    status_paths : iterable of path
        Status table of every batch.
    manifest : mapping
        The batch manifest (``total_rows``, ``batches``, ``tiles``).
    cfg : mapping
        Validated configuration.
    out_dir : path
        The run's ``output_dir``.
    benchmark_paths : iterable of path
        Snakemake benchmark files for the summary's timings.

    Returns
    -------
    dict
        Paths written: ``index``, ``summary``, ``config_toml``.

    Raises
    ------
    CutanaError
        If the status rows do not cover each catalogue row exactly once.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    index = merge_status_tables(status_paths, int(manifest["total_rows"]), cfg)
    summary = run_summary(index, manifest, cfg, benchmark_timings(benchmark_paths))
    index_path = out_dir / INDEX_NAME
    summary_path = out_dir / SUMMARY_NAME
    _write_atomic(index_path, lambda tmp: index.to_parquet(tmp, index=False))
    _write_atomic(
        summary_path, lambda tmp: tmp.write_text(json.dumps(summary, indent=2), encoding="utf-8")
    )
    config_path = save_config_toml(cfg, out_dir / CONFIG_TOML_NAME)
    return {"index": str(index_path), "summary": str(summary_path), "config_toml": config_path}
