"""Memory model of the cutout jobs (SPEC §3.2, §9).

The workflow's ``profile_memory`` checkpoint runs a small sample of the catalogue (the sources
with the largest stamps, so the estimate errs on the safe side) through the real batch engine,
measures its peak resident memory and fits

    mem_mb = base_mb + mb_per_unit x workload,
    workload = sum over the batch's sources of (S_b^2 summed over bands + T^2 x C),

with S_b the stamp size read from band b, T the target resolution and C the number of output
channels. The engine streams a batch (chunks of sources, groups of stamps, mapped pages and Zarr
shards all of bounded size), so what grows with the workload saturates: the workload term is
capped by :func:`engine_working_mb`, a bound computed from the engine's buffer sizes, plus a
small cost per source (its metadata), so a large batch is not declared many times its need.
The ``cutout_batch`` rule declares ``mem_mb_for_batch(...)`` (:mod:`cutana.memory_budget`) as
its ``mem_mb`` resource, so ``--resources mem_mb=X`` (local) and ``--mem`` (SLURM) bound how
many batches run at once.

The sample runs in the profiling process itself (its peak RSS reset before each run), or where
that is impossible in a child process run as
``python -m cutana.memory_model SAMPLE CONFIG SCRATCH RESULT RUNNER``.
"""

from __future__ import annotations

import importlib
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import pyarrow as pa

from . import arrow_tables, fits_io

# What the Snakefile uses to declare the cutout jobs' memory lives in memory_budget (no pyarrow).
from .memory_budget import (  # noqa: F401 (re-exported)
    FALLBACK_MEM_MB,
    PER_SOURCE_MB,
    load_model,
    mem_mb_for,
    mem_mb_for_batch,
)

#: Lower bound of the fitted slope (MB per workload unit): a float32 stamp, its validity mask and
#: its float32 output cost at least ~6 bytes per unit; a noisy measurement must not go below.
MIN_MB_PER_UNIT = 6.0 / 2**20

#: Number of sources of the warm-up run that measures the fixed cost (imports, codecs, caches).
WARMUP_SOURCES = 2

#: The batch runner the child process profiles (``module:function``, signature of
#: ``cutana.engine.run_batch``; called with ``config_validated=True``).
DEFAULT_RUNNER = "cutana.engine:run_batch"

_MODEL_VERSION = 1
_BATCH_COLUMNS = ["row_index", "fits_file_paths", "diameter_pixel", "diameter_arcsec"]


def _band_extensions(cfg: Mapping) -> list:
    extensions = list(cfg["fits_extensions"])
    n_bands = len(cfg["channel_weights"])
    return extensions * n_bands if len(extensions) == 1 else extensions


def _n_channels(cfg: Mapping) -> int:
    return len(next(iter(cfg["channel_weights"].values())))


def engine_working_mb(cfg: Mapping) -> float:
    """Upper bound (MB) of the engine's working memory beyond its fixed cost, for any batch.

    The sum of the engine's bounded buffers: mapped pages or decompressed blocks per band
    file, one group of stamps with its mask and resampling scratch (10 bytes per float32 stamp
    pixel), the arrays of one chunk of sources (band stacks and masks, mixed channels and
    masks, normalised output; twice, for the copies made between stages) and a Zarr shard
    with its encoded chunks. Memory that grows with the number of sources is
    :data:`PER_SOURCE_MB` per source on top.

    Parameters
    ----------
    cfg : mapping
        Validated configuration (``channel_weights``, ``target_resolution``).

    Returns
    -------
    float
    """
    from . import engine, writers

    n_bands, n_channels = len(cfg["channel_weights"]), _n_channels(cfg)
    target = int(cfg["target_resolution"])
    reads = n_bands * max(fits_io.MAPPED_PAGES_BUDGET * 4096, fits_io.COMPRESSED_CACHE_BYTES)
    group = engine.GROUP_BYTES * 10 / 4
    chunk_sources = engine.CHUNK_BYTES // max(1, n_bands * target * target * 12)
    chunk = 2 * max(1, chunk_sources) * target * target * (5 * n_bands + 9 * n_channels)
    shard = 2 * writers.SHARD_TARGET_BYTES
    return (reads + group + chunk + shard) / 2**20


def file_pixel_scale_arcsec(path: str, extension: str | int) -> float:
    """Pixel scale (arcsec per pixel, geometric mean of both axes) of one image HDU.

    Only the header is read (``lazy_load_hdus``), never the data.

    Parameters
    ----------
    path : str
        FITS file.
    extension : str or int
        HDU name or index.

    Returns
    -------
    float
        Arcseconds per pixel.
    """
    from astropy.io import fits
    from astropy.wcs import WCS
    from astropy.wcs.utils import proj_plane_pixel_scales

    with fits.open(path, memmap=True, lazy_load_hdus=True) as hdul:
        header = hdul[extension].header
        wcs = WCS(header).celestial
    scales = proj_plane_pixel_scales(wcs) * 3600.0
    return float(np.sqrt(scales[0] * scales[1]))


def stamp_sizes(
    batch_df,
    cfg: Mapping,
    pixel_scale: Callable[[str, str | int], float] = file_pixel_scale_arcsec,
) -> np.ndarray:
    """Stamp size S (pixels) read from each band for each source (SPEC §6 "Size").

    Parameters
    ----------
    batch_df : pyarrow.Table or DataFrame
        Batch rows with ``fits_file_paths``, ``diameter_pixel`` and/or ``diameter_arcsec``.
    cfg : mapping
        Validated configuration (``padding_factor``, ``channel_weights``, ``fits_extensions``).
    pixel_scale : callable
        ``(path, extension) -> arcsec per pixel``; only called for rows without
        ``diameter_pixel``, once per distinct file.

    Returns
    -------
    ndarray of int64, shape (N, B)
        At least 1 pixel each.
    """
    extensions = _band_extensions(cfg)
    n_bands = len(extensions)
    padding = float(cfg["padding_factor"])
    pixels = arrow_tables.float_column(batch_df, "diameter_pixel")
    arcsec = arrow_tables.float_column(batch_df, "diameter_arcsec")
    sizes = np.repeat(pixels[:, None], n_bands, axis=1)
    need_scale = np.flatnonzero(~np.isfinite(pixels))
    if need_scale.size:
        cache: dict[tuple[str, str | int], float] = {}
        paths = arrow_tables.values_of(batch_df, "fits_file_paths")
        for row in need_scale:
            for band, extension in enumerate(extensions):
                key = (str(paths[row][band]), extension)
                if key not in cache:
                    cache[key] = pixel_scale(*key)
                sizes[row, band] = np.round(arcsec[row] / cache[key])
    sizes = np.round(np.nan_to_num(sizes, nan=1.0) * padding)
    return np.maximum(sizes, 1).astype(np.int64)


def source_workloads(sizes: np.ndarray, cfg: Mapping) -> np.ndarray:
    """Workload units of each source: sum over bands of S_b^2, plus T^2 x C.

    Parameters
    ----------
    sizes : ndarray, shape (N, B)
        Stamp sizes from :func:`stamp_sizes`.
    cfg : mapping
        Validated configuration (``target_resolution``, ``channel_weights``).

    Returns
    -------
    ndarray of float64, shape (N,)
    """
    target = int(cfg["target_resolution"])
    output_pixels = float(target * target * _n_channels(cfg))
    return (sizes.astype(np.float64) ** 2).sum(axis=1) + output_pixels


def fit_model(measurement: Mapping, cfg: Mapping) -> dict:
    """Fit base and slope of the memory model to the measured peaks.

    The slope comes from the two largest runs (the half and the whole sample): their difference
    cancels what every run pays (imports, first-use buffers). The intercept is then the
    smallest that keeps the line at or above every measured point, so the model never predicts
    less than was measured.

    Parameters
    ----------
    measurement : mapping
        :func:`measure_peak_rss` result: ``points``, a list of ``{"workload", "peak_mb"}`` in
        increasing workload (warm-up, half sample, whole sample).
    cfg : mapping
        Validated configuration (``memory.safety_factor``, ``memory.min_mb``).

    Returns
    -------
    dict
        ``base_mb``, ``mb_per_unit``, ``safety_factor``, ``min_mb``.
    """
    points = sorted(measurement["points"], key=lambda p: p["workload"])
    smaller, largest = points[-2], points[-1]
    extra_units = largest["workload"] - smaller["workload"]
    extra_mb = largest["peak_mb"] - smaller["peak_mb"]
    slope = extra_mb / extra_units if extra_units > 0 else 0.0
    slope = max(slope, MIN_MB_PER_UNIT)
    base = max(max(p["peak_mb"] - slope * p["workload"] for p in points), 0.0)
    return {
        "base_mb": float(base),
        "mb_per_unit": float(slope),
        "safety_factor": float(cfg["memory"]["safety_factor"]),
        "min_mb": int(cfg["memory"]["min_mb"]),
        "job_overhead_mb": int(cfg["memory"]["job_overhead_mb"]),
        "working_mb": float(engine_working_mb(cfg)),
        "per_source_mb": PER_SOURCE_MB,
    }


def scan_batches(
    batches_dir: str | Path,
    cfg: Mapping,
    n_sample: int,
    pixel_scale: Callable[[str, str | int], float] = file_pixel_scale_arcsec,
) -> tuple[dict[str, dict], pa.Table]:
    """Workload of every batch and the ``n_sample`` sources with the largest workloads.

    Reads the batch tables one at a time (bounded memory: one batch plus the sample), as Arrow
    tables: the profiling job never imports pandas (~0.25 s of every run's fixed cost).

    Parameters
    ----------
    batches_dir : path
        The split_catalogue output (``manifest.json`` and ``{batch}.parquet``).
    cfg : mapping
        Validated configuration.
    n_sample : int
        Sample size.
    pixel_scale : callable
        See :func:`stamp_sizes`.

    Returns
    -------
    batches : dict
        ``{batch name: {"n_sources": int, "workload": float}}``.
    sample : pyarrow.Table
        Full batch rows of the sample plus their ``_workload``, largest workload first (ties
        in batch order).
    """
    batches_dir = Path(batches_dir)
    manifest = json.loads((batches_dir / "manifest.json").read_text(encoding="utf-8"))
    batches: dict[str, dict] = {}
    sample = None
    layouts: dict[tuple, dict] = {}
    for entry in manifest["batches"]:
        table = arrow_tables.read_table(batches_dir / f"{entry['name']}.parquet")
        # Each batch's image layouts (schema metadata) differ by tile: merged for the sample.
        metadata = table.schema.metadata or {}
        for layout in json.loads(metadata.get(fits_io.LAYOUTS_METADATA_KEY, b"[]")):
            if layout:
                layouts[fits_io.image_key(layout["path"], layout["extension"])] = layout
        table = table.replace_schema_metadata(None)
        workloads = source_workloads(stamp_sizes(table, cfg, pixel_scale), cfg)
        batches[entry["name"]] = {"n_sources": table.num_rows, "workload": float(workloads.sum())}
        table = table.append_column("_workload", arrow_tables.numeric_array(workloads, np.float64))
        sample = table if sample is None else pa.concat_tables([sample, table])
        sample = _largest_workloads(sample, n_sample)
    if sample is None:
        raise ValueError(f"{batches_dir / 'manifest.json'} lists no batch: nothing to profile")
    # The sample reads its images as the cutout jobs do (mapped from their layouts) only when
    # every sampled row has its positions; otherwise every image is opened with astropy.
    if layouts and all(sample[name].null_count == 0 for name in fits_io.POSITION_COLUMNS):
        encoded = json.dumps(list(layouts.values())).encode("utf-8")
        sample = sample.replace_schema_metadata({fits_io.LAYOUTS_METADATA_KEY: encoded})
    return batches, sample


def _largest_workloads(table: pa.Table, n: int) -> pa.Table:
    """The ``n`` rows of largest ``_workload``, largest first, ties in table order."""
    workloads = arrow_tables.float_column(table, "_workload")
    order = np.argsort(-workloads, kind="stable")[:n]
    return table.take(arrow_tables.numeric_array(order, np.int64))


def _as_table(sample) -> pa.Table:
    """A sample given as a DataFrame (its caller has pandas loaded) as an Arrow table."""
    if isinstance(sample, pa.Table):
        return sample
    return pa.Table.from_pandas(sample.reset_index(drop=True), preserve_index=False)


def measure_peak_rss(
    sample,
    cfg: Mapping,
    scratch_dir: str | Path,
    runner: str = DEFAULT_RUNNER,
    env: Mapping[str, str] | None = None,
) -> dict:
    """Run the sample through ``runner`` and measure the peak RSS of each run.

    Three batches run and the peak RSS is recorded after each: a warm-up of
    :data:`WARMUP_SOURCES` sources (what any job pays: interpreter, imports, codec set-up), the
    first half of the sample, then the whole sample. They run in this process when Linux lets
    it reset its peak RSS before each run (``/proc/self/clear_refs``) and ``env`` is None, as
    in the workflow's profiling job, whose imports are a cutout job's; otherwise in a fresh
    child process (``python -m cutana.memory_model``), where the runs grow so that each peak is
    that run's own.

    Parameters
    ----------
    sample : pyarrow.Table or DataFrame
        Batch rows (batch parquet columns) with a ``_workload`` column.
    cfg : mapping
        Validated configuration (the run's settings: output format, resolution, ...).
    scratch_dir : path
        Emptied and used for the child's inputs and outputs; removed afterwards.
    runner : str
        ``module:function`` with the signature of ``cutana.engine.run_batch``.
    env : mapping, optional
        Environment of a child process; giving one always measures in a child.

    Returns
    -------
    dict
        ``n_sources``, ``workload`` and ``peak_mb`` (of the whole sample), ``points`` (workload
        and peak of each run) and ``elapsed_s``.

    Raises
    ------
    RuntimeError
        If the child fails (its stderr is included).
    """
    sample = _as_table(sample)
    scratch = Path(scratch_dir)
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    try:
        if env is None and reset_peak_rss():
            # This process's peak can be reset: run here, saving a child's start-up and
            # imports (~1 s of every run's fixed cost). It has imported what a cutout job
            # imports, so the measured fixed cost matches.
            module_name, function_name = runner.split(":")
            run_batch = getattr(importlib.import_module(module_name), function_name)
            sample_rows = sample.drop_columns(["_workload"])
            result = _measure_runs(sample_rows, dict(cfg), scratch, run_batch, reset=True)
        else:
            result = _measure_in_child(sample, cfg, scratch, runner, env)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    workloads = arrow_tables.float_column(sample, "_workload")
    run_workloads = [float(workloads[:n].sum()) for n in _run_sizes(sample.num_rows)]
    points = [
        {"workload": workload, "peak_mb": peak}
        for workload, peak in zip(run_workloads, result.pop("peaks_mb"), strict=True)
    ]
    result.update(
        n_sources=sample.num_rows,
        workload=run_workloads[-1],
        peak_mb=points[-1]["peak_mb"],
        points=points,
    )
    return result


def build_memory_model(
    batches_dir: str | Path,
    cfg: Mapping,
    out_path: str | Path,
    scratch_dir: str | Path,
    runner: str = DEFAULT_RUNNER,
    env: Mapping[str, str] | None = None,
) -> dict:
    """Profile a sample of the run and write the memory model JSON.

    Parameters
    ----------
    batches_dir : path
        The split_catalogue output directory.
    cfg : mapping
        Validated configuration (``memory.profile_sources`` sets the sample size).
    out_path : path
        The model JSON to write (atomically).
    scratch_dir : path
        Temporary work directory of the profiling run.
    runner, env
        See :func:`measure_peak_rss`.

    Returns
    -------
    dict
        The model: :func:`fit_model` keys plus ``sample`` (the measurement) and ``batches``
        (workload per batch, used by :func:`mem_mb_for_batch`).
    """
    n_sample = int(cfg["memory"]["profile_sources"])
    batches, sample = scan_batches(batches_dir, cfg, n_sample)
    measurement = measure_peak_rss(sample, cfg, scratch_dir, runner=runner, env=env)
    model = fit_model(measurement, cfg)
    model.update(
        version=_MODEL_VERSION,
        target_resolution=int(cfg["target_resolution"]),
        n_bands=len(cfg["channel_weights"]),
        n_channels=_n_channels(cfg),
        sample=measurement,
        batches=batches,
    )
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = out_path.with_name(out_path.name + f".tmp-{os.getpid()}")
    tmp_path.write_text(json.dumps(model, indent=1), encoding="utf-8")
    os.replace(tmp_path, out_path)
    return model


def _run_sizes(n_sample: int) -> list[int]:
    """Rows of the child's runs: warm-up, first half, whole sample (largest sources first)."""
    return [min(WARMUP_SOURCES, n_sample), max((n_sample + 1) // 2, 1), n_sample]


def peak_rss_mb() -> float:
    """Peak resident memory of this process (MB).

    On Linux this is ``VmHWM`` of ``/proc/self/status``: the high-water mark of this process's
    own address space. ``ru_maxrss`` is not used there because Linux carries it over ``fork``
    and ``execve``: a child started by a large parent (a test runner, a Snakemake script) would
    report the parent's size, hiding the costs being measured.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    # ru_maxrss is in kilobytes on Linux (bytes on macOS).
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024.0


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (``VmHWM``) to its current RSS; False where impossible.

    Linux resets the high-water mark when ``5`` is written to ``/proc/self/clear_refs``.
    """
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")
        with open("/proc/self/status", encoding="ascii") as handle:
            return any(line.startswith("VmHWM:") for line in handle)
    except OSError:
        return False


def _measure_runs(sample: pa.Table, cfg: dict, scratch: Path, run_batch, reset: bool) -> dict:
    """Run the warm-up, half and whole sample through ``run_batch``; the peak RSS after each."""
    import pyarrow.parquet as pq

    peaks = []
    started = time.perf_counter()
    for run, n_rows in enumerate(_run_sizes(sample.num_rows)):
        rows_path = scratch / f"run{run}.parquet"
        pq.write_table(sample.slice(0, n_rows), rows_path)
        if reset:
            reset_peak_rss()
        # The config was validated (as for a cutout job, whose imports the measured fixed
        # cost must match: no jsonschema).
        run_batch(
            str(rows_path),
            str(scratch / f"run{run}_out"),
            str(scratch / f"run{run}_status.parquet"),
            cfg,
            config_validated=True,
        )
        peaks.append(peak_rss_mb())
    return {"peaks_mb": peaks, "elapsed_s": time.perf_counter() - started}


def _measure_in_child(
    sample: pa.Table, cfg: Mapping, scratch: Path, runner: str, env: Mapping | None
) -> dict:
    """:func:`_measure_runs` in a fresh ``python -m cutana.memory_model`` child process."""
    import pyarrow.parquet as pq

    sample_path = scratch / "sample.parquet"
    pq.write_table(sample.drop_columns(["_workload"]), sample_path)
    config_path = scratch / "config.json"
    config_path.write_text(json.dumps(dict(cfg), default=str), encoding="utf-8")
    result_path = scratch / "result.json"
    command = [
        sys.executable, "-m", "cutana.memory_model",
        str(sample_path), str(config_path), str(scratch), str(result_path), runner,
    ]  # fmt: skip
    completed = subprocess.run(
        command, capture_output=True, text=True, env=dict(env) if env else None
    )
    if completed.returncode != 0:
        raise RuntimeError(
            f"memory profiling of {sample.num_rows} sources failed (exit "
            f"{completed.returncode}):\n{completed.stderr[-4000:]}"
        )
    return json.loads(result_path.read_text(encoding="utf-8"))


def _child_main(argv: list[str]) -> None:
    sample_path, config_path, scratch, result_path, runner = argv
    module_name, function_name = runner.split(":")
    run_batch = getattr(importlib.import_module(module_name), function_name)
    cfg = json.loads(Path(config_path).read_text(encoding="utf-8"))
    sample = arrow_tables.read_table(sample_path)
    result = _measure_runs(sample, cfg, Path(scratch), run_batch, False)
    Path(result_path).write_text(json.dumps(result), encoding="utf-8")


if __name__ == "__main__":
    _child_main(sys.argv[1:])
