"""The merged index of a run, its summary and its saved configuration (SPEC §7.3).

``source_to_zarr_mapping.parquet`` holds exactly one row per catalogue row, in catalogue order,
so that nothing is dropped silently: sources without an image (``no_overlap``, ``failed``) are
listed with the reason.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import re
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import arrow_tables
from .config import config_hash, save_config_toml
from .exceptions import CutanaError

if TYPE_CHECKING:  # the functions the workflow runs use pyarrow only (no pandas import)
    import pandas as pd

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


def _read_status(path: str | Path, cfg: Mapping) -> pa.Table:
    """One batch's status rows in the index's types, file and batch columns filled in.

    Arrays are built with :mod:`cutana.arrow_tables` (from buffers, never from Python
    scalars), so the job that merges the index does not import pandas.
    """
    path = Path(path)
    batch_name = path.stem
    table = arrow_tables.read_table(path)
    names = table.column_names
    n_rows = table.num_rows
    column = file_column(cfg)
    idx_in_zarr = pc.cast(table["idx_in_zarr"], pa.int64())
    if "batch_index" in names:
        batch_index = pc.cast(table["batch_index"], pa.int64())
    else:
        batch_index = arrow_tables.numeric_array(
            np.full(n_rows, int(batch_name.split("_")[0])), np.int64
        )
    no_file = pa.nulls(n_rows, pa.string())
    if column in names:
        files = pc.cast(table[column], pa.string())
    else:
        folder = f"batch_cutout_process_{batch_name}"
        target = f"{folder}/images.zarr" if column == "zarr_file" else folder
        has_image = arrow_tables.numpy_values(idx_in_zarr, np.int64) >= 0
        files = pc.if_else(
            arrow_tables.boolean_array(has_image),
            arrow_tables.repeated_string(target, n_rows),
            no_file,
        )
    empty = arrow_tables.repeated_string("", n_rows)
    # Sources without an output file have a null there (not ""); a null condition (a null
    # file) gives null too. (No Python scalars here: converting one imports pandas.)
    files = pc.if_else(pc.equal(files, empty), no_file, files)
    return pa.table(
        {
            "row_index": pc.cast(table["row_index"], pa.int64()),
            "SourceID": pc.cast(table["SourceID"], pa.string()),
            "RA": pc.cast(table["RA"], pa.float64()),
            "Dec": pc.cast(table["Dec"], pa.float64()),
            column: files,
            "batch_index": batch_index,
            "idx_in_zarr": idx_in_zarr,
            "status": pc.cast(table["status"], pa.string()),
            "reason": pc.coalesce(pc.cast(table["reason"], pa.string()), empty),
        }
    )


def merge_status_arrow(
    status_paths: Iterable[str | Path], total_rows: int, cfg: Mapping
) -> pa.Table:
    """:func:`merge_status_tables` as a pyarrow Table (the workflow's jobs never load pandas).

    Raises
    ------
    CutanaError
        If a catalogue row is missing or appears twice, or a status is unknown.
    """
    tables = [_read_status(path, cfg) for path in status_paths]
    if tables:
        merged = pa.concat_tables(tables)
        rows = arrow_tables.numpy_values(merged["row_index"], np.int64)
    else:
        strings = {file_column(cfg), "SourceID", "status", "reason"}
        floats = {"RA", "Dec"}
        merged = pa.table(
            {
                name: pa.nulls(
                    0,
                    pa.string()
                    if name in strings
                    else pa.float64()
                    if name in floats
                    else pa.int64(),
                )
                for name in ["row_index", *index_columns(cfg)]
            }
        )
        rows = np.empty(0, dtype=np.int64)
    ordered = np.sort(rows)
    duplicated = np.unique(ordered[1:][ordered[1:] == ordered[:-1]])
    missing = np.setdiff1d(np.arange(total_rows, dtype=np.int64), rows)
    extra = rows[(rows < 0) | (rows >= total_rows)]
    if len(rows) != total_rows or duplicated.size or missing.size or extra.size:
        raise CutanaError(
            f"the batches' status tables hold {len(rows)} rows but the catalogue has "
            f"{total_rows}: missing catalogue rows {missing[:10].tolist()}, duplicated rows "
            f"{duplicated[:10].tolist()}, out-of-range rows {extra[:10].tolist()} "
            "(first 10 each). Delete the output directory's .cutana folder and rerun."
        )
    unknown = sorted(
        str(status) for status in pc.unique(merged["status"]).to_pylist() if status not in STATUSES
    )
    if unknown:
        raise CutanaError(
            f"unknown source status values {unknown} in the status tables; expected one of "
            f"{list(STATUSES)}"
        )
    order = arrow_tables.numeric_array(np.argsort(rows, kind="stable"), np.int64)
    return merged.take(order).select(index_columns(cfg))


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
    frame = merge_status_arrow(status_paths, total_rows, cfg).to_pandas()
    # Sources without an output file have None there (pandas may turn null strings into NaN).
    files = frame[file_column(cfg)].astype(object)
    frame[file_column(cfg)] = files.where(files.notna(), None)
    return frame


def _benchmark_rows(path: Path) -> list[dict] | None:
    """Rows of a Snakemake benchmark TSV; None (with a warning) if it cannot be used."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        logger.warning("benchmark file %s skipped (%s): its job's time is unknown", path, error)
        return None
    rows = list(csv.DictReader(lines, delimiter="\t"))
    if not lines:
        logger.warning("benchmark file %s skipped (it is empty): its job's time is unknown", path)
        return None
    if "s" not in (rows[0] if rows else dict.fromkeys(lines[0].split("\t"))):
        logger.warning("benchmark file %s skipped: it has no 's' (seconds) column", path)
        return None
    return rows


def _number(text) -> float:
    """A benchmark value as a float; NaN for "-", "NA", empty or missing."""
    try:
        return float(text)
    except (TypeError, ValueError):
        return math.nan


#: The line a job writes to its log with its peak RSS (cutana.workflow_jobs).
_PEAK_RSS_LINE = re.compile(rb"peak RSS ([0-9.]+) MB")


def logged_peak_rss_mb(log_paths: Iterable[str | Path]) -> float | None:
    """The largest peak RSS (MB) the jobs wrote to their logs; None when none did.

    A job's log line reads its own high-water mark (``VmHWM``), also when a warm server's
    worker ran it (cutana.warm_jobs), where Snakemake's benchmark samples only the command.
    """
    peaks = []
    for path in map(Path, log_paths):
        try:
            peaks += [float(value) for value in _PEAK_RSS_LINE.findall(path.read_bytes())]
        except OSError:
            continue
    return max(peaks) if peaks else None


def benchmark_timings(
    benchmark_paths: Iterable[str | Path], log_paths: Mapping[str, Iterable] | None = None
) -> dict:
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
    log_paths : mapping, optional
        ``{rule: job log paths}``: the rule's ``max_rss_mb`` is the larger of the benchmark's
        and the logged peaks (:func:`logged_peak_rss_mb`).

    Returns
    -------
    dict
        ``{rule: {"jobs", "total_s", "mean_s", "max_s", "max_rss_mb"}}``; ``max_rss_mb`` is
        null when no job lasted long enough to be sampled and none logged its peak.
    """
    per_rule: dict[str, list[list[dict]]] = {}
    for path in map(Path, benchmark_paths):
        if not path.is_file():
            continue
        rows = _benchmark_rows(path)
        if rows is not None:
            rule = path.stem if path.parent.name == "benchmarks" else path.parent.name
            per_rule.setdefault(rule, []).append(rows)
    timings = {}
    for rule, files in sorted(per_rule.items()):
        rows = [row for file_rows in files for row in file_rows]
        seconds = np.array([_number(row.get("s")) for row in rows])
        rss = np.array([_number(row.get("max_rss")) for row in rows])
        known = seconds[~np.isnan(seconds)]
        logged = logged_peak_rss_mb((log_paths or {}).get(rule, ()))
        if logged is not None:
            rss = np.append(rss, logged)
        timings[rule] = {
            "jobs": len(files),
            "total_s": round(float(known.sum()), 3),
            "mean_s": round(float(known.mean()), 3) if known.size else math.nan,
            "max_s": round(float(known.max()), 3) if known.size else math.nan,
            "max_rss_mb": None if np.isnan(rss).all() else round(float(np.nanmax(rss)), 1),
        }
    return timings


def run_summary(index, manifest: Mapping, cfg: Mapping, timings: dict) -> dict:
    """The content of ``run_summary.json``.

    Parameters
    ----------
    index : pyarrow.Table or DataFrame
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
    if isinstance(index, pa.Table):
        count_of = {
            entry["values"]: entry["counts"]
            for entry in pc.value_counts(index["status"]).to_pylist()
        }
    else:
        count_of = index["status"].value_counts().to_dict()
    return {
        "name": cfg["name"],
        "total_sources": len(index),
        "counts": {status: int(count_of.get(status, 0)) for status in STATUSES},
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
    log_paths: Mapping[str, Iterable] | None = None,
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
    log_paths : mapping, optional
        ``{rule: job log paths}`` for the jobs' logged peak RSS (:func:`benchmark_timings`).

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
    index = merge_status_arrow(status_paths, int(manifest["total_rows"]), cfg)
    summary = run_summary(index, manifest, cfg, benchmark_timings(benchmark_paths, log_paths))
    index_path = out_dir / INDEX_NAME
    summary_path = out_dir / SUMMARY_NAME
    _write_atomic(index_path, lambda tmp: pq.write_table(index, tmp))
    _write_atomic(
        summary_path, lambda tmp: tmp.write_text(json.dumps(summary, indent=2), encoding="utf-8")
    )
    config_path = save_config_toml(cfg, out_dir / CONFIG_TOML_NAME)
    return {"index": str(index_path), "summary": str(summary_path), "config_toml": config_path}
