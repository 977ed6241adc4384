"""Throughput of one cutout job's engine (``cutana.engine.run_batch``) on one core, warm.

Takes the first ``--sources`` sources of tile 0 of the benchmark survey (made by
``bench_pipeline.py``), splits them with ``split_catalogue`` into one batch (sorted, with the
sources' pixel positions and the images' layouts, as in the workflow) and runs ``run_batch`` on
it in this process (a first, untimed run pays imports and the page cache), for every cell of
{64, 256} px x {1, 3} channels (asinh, float32, Zarr). Prints a Markdown table of sources per
second of the best of ``--repeat`` timed runs, without Snakemake or process start-up: what a
cutout job does once it has started. ``--profile`` prints cProfile's top functions too.

Usage::

    python benchmarks/bench_engine.py [--survey /tmp/bench_full/survey_2x8000_20000]
                                      [--sources 2000] [--repeat 3] [--profile]
"""

from __future__ import annotations

import argparse
import ast
import cProfile
import os
import pstats
import shutil
import tempfile
import time
from pathlib import Path

import pandas as pd

from cutana.catalogue import split_catalogue
from cutana.config import get_default_config, validate_config
from cutana.engine import run_batch

BANDS = ["VIS", "NIR_Y", "NIR_H"]


def batch_table(survey: Path, n_bands: int, n_sources: int, path: Path, cfg: dict) -> int:
    """Split the first sources of tile 0 as the workflow does; return their number.

    ``split_catalogue`` (files checked) writes one batch holding them, sorted, with their pixel
    positions and image layouts, so ``run_batch`` reads the images as a cutout job does. The
    batch is copied to ``path``.
    """
    frame = pd.read_csv(survey / f"catalogue_{n_bands}band.csv")
    first_file = ast.literal_eval(frame["fits_file_paths"].iloc[0])[0]
    in_tile = frame["fits_file_paths"].map(lambda text: ast.literal_eval(text)[0]) == first_file
    # The lowest-Dec sources: a compact strip, as a batch of a large tile covers.
    frame = frame[in_tile].sort_values(["Dec", "RA"]).head(n_sources)
    catalogue = path.with_suffix(".csv")
    frame.to_csv(catalogue, index=False)
    split_cfg = dict(cfg, N_batch_cutout_process=len(frame))
    manifest = split_catalogue(catalogue, split_cfg, path.parent / f"split_{n_bands}")
    (batch,) = manifest["batches"]
    shutil.copy(path.parent / f"split_{n_bands}" / "batches" / f"{batch['name']}.parquet", path)
    return len(frame)


def run_cell(survey: Path, work: Path, resolution: int, n_bands: int, args) -> float:
    batch = work / f"batch_{n_bands}.parquet"
    bands = BANDS[:n_bands]
    cfg = get_default_config()
    cfg.update(
        {
            "source_catalogue": str(survey / "catalogue.csv"),
            "output_dir": str(work / "out"),
            "target_resolution": resolution,
            "normalisation_method": "asinh",
            "data_type": "float32",
            "output_format": "zarr",
            "channel_weights": {
                band: [1.0 if c == i else 0.0 for c in range(n_bands)]
                for i, band in enumerate(bands)
            },
            "fits_extensions": ["PRIMARY"],
        }
    )
    cfg = validate_config(cfg)
    n_sources = batch_table(survey, n_bands, args.sources, batch, cfg)

    def once() -> float:
        shutil.rmtree(work / "out", ignore_errors=True)
        started = time.perf_counter()
        run_batch(batch, work / "out" / "batch", work / "out" / "status.parquet", cfg)
        return time.perf_counter() - started

    once()  # warm-up: imports, page cache
    if args.profile:
        profiler = cProfile.Profile()
        profiler.enable()
        seconds = once()
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(15)
    else:
        seconds = min(once() for _ in range(args.repeat))
    return n_sources / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--survey", type=Path, default=Path("/tmp/bench_full/survey_2x8000_20000"))
    parser.add_argument("--sources", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per cell (best)")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    if not (args.survey / "catalogue_1band.csv").exists():
        parser.error(f"{args.survey} has no benchmark survey: run bench_pipeline.py first")
    print(f"load {os.getloadavg()[0]:.1f}, {args.sources} sources per batch, one core")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for resolution in (64, 256):
            for n_bands in (1, 3):
                rate = run_cell(args.survey, Path(tmp), resolution, n_bands, args)
                rows.append((resolution, n_bands, rate))
    print("\n| cell | sources/s (run_batch, warm, one core) |\n|---|---|")
    for resolution, n_bands, rate in rows:
        print(f"| {resolution} px x {n_bands} ch | {rate:.0f} |")
    print(f"\nload {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
