"""Benchmark of split_catalogue on a large generated catalogue (SPEC §9: tens of millions of
rows in bounded memory).

Generates a catalogue (Parquet by default, written in chunks so the generator stays small),
then runs ``split_catalogue`` in a fresh subprocess and prints its wall time, throughput and
peak RSS (target: <= 2 GB for 10 million rows).

    python benchmarks/bench_split.py                      # 10 M rows, 1000 tiles, Parquet
    python benchmarks/bench_split.py --rows 2000000 --format csv --tiles 1
    # 10 M rows over real files (the benchmark survey of bench_pipeline.py): every file
    # checked, every source placed in every band, as the workflow's split does
    python benchmarks/bench_split.py --survey /tmp/bench_full/survey_2x8000_20000
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

CHILD = """
import json, resource, sys, time
from cutana.catalogue import split_catalogue
from cutana.config import validate_config
bands = json.loads(sys.argv[4])
cfg = validate_config({"channel_weights": {band: [1.0] for band in bands},
                       "fits_extensions": ["PRIMARY"],
                       "N_batch_cutout_process": int(sys.argv[3])})
start = time.perf_counter()
manifest = split_catalogue(sys.argv[1], cfg, sys.argv[2], check_files=sys.argv[5] == "files")
print(json.dumps({"seconds": time.perf_counter() - start,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "batches": len(manifest["batches"]), "tiles": len(manifest["tiles"]),
                  "rows": manifest["total_rows"]}))
"""


def generate(path: Path, n_rows: int, n_tiles: int, fmt: str, chunk: int = 1_000_000) -> None:
    """Write ``n_rows`` random sources over ``n_tiles`` three-band tiles, chunk by chunk."""
    rng = np.random.default_rng(2024)
    tile_paths = pa.array(
        [
            [f"/survey/tile_{t:05d}_{b}.fits" for b in ("vis", "nir_h", "nir_j")]
            for t in range(n_tiles)
        ],
        pa.list_(pa.string()),
    )
    tile_text = pa.array([json.dumps(p) for p in tile_paths.to_pylist()])
    writer = None
    for start in range(0, n_rows, chunk):
        n = min(chunk, n_rows - start)
        tiles = pa.array(rng.integers(0, n_tiles, n))
        table = pa.table(
            {
                "SourceID": pa.array(np.char.add("EUC_", np.arange(start, start + n).astype(str))),
                "RA": rng.uniform(0, 360, n),
                "Dec": rng.uniform(-90, 90, n),
                "diameter_pixel": rng.integers(16, 512, n).astype(np.float64),
                "fits_file_paths": (tile_paths if fmt == "parquet" else tile_text).take(tiles),
            }
        )
        if fmt == "parquet":
            writer = writer or pq.ParquetWriter(path, table.schema)
            writer.write_table(table)
        else:
            options = pacsv.WriteOptions(include_header=writer is None)
            if writer is None:
                writer = pacsv.CSVWriter(path, table.schema, write_options=options)
            writer.write_table(table)
    writer.close()


def generate_from_survey(path: Path, n_rows: int, survey: Path, chunk: int = 1_000_000) -> int:
    """Write ``n_rows`` sources repeating the survey's catalogue, each copy moved by up to 0.1"
    (inside its tiles) with new IDs, chunk by chunk; return the number of bands."""
    rng = np.random.default_rng(2024)
    base = pacsv.read_csv(survey / "catalogue.csv")
    paths = pa.array([json.loads(text) for text in base.column("fits_file_paths").to_pylist()])
    writer = None
    for start in range(0, n_rows, chunk):
        n = min(chunk, n_rows - start)
        take = pa.array(np.arange(start, start + n) % base.num_rows)
        jitter = rng.uniform(-0.1, 0.1, (2, n)) / 3600.0
        table = pa.table(
            {
                "SourceID": pa.array(np.char.add("EUC_", np.arange(start, start + n).astype(str))),
                "RA": (base.column("RA").take(take).to_numpy() + jitter[0]) % 360.0,
                "Dec": base.column("Dec").take(take).to_numpy() + jitter[1],
                "diameter_pixel": base.column("diameter_pixel").take(take).cast(pa.float64()),
                "fits_file_paths": paths.take(take),
            }
        )
        writer = writer or pq.ParquetWriter(path, table.schema)
        writer.write_table(table)
    writer.close()
    return len(paths[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--tiles", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=1000, help="N_batch_cutout_process")
    parser.add_argument("--format", choices=["parquet", "csv"], default="parquet")
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temp dir")
    parser.add_argument(
        "--survey",
        type=Path,
        default=None,
        help="repeat this benchmark survey's catalogue over its real files (files checked)",
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        start = time.perf_counter()
        if args.survey is None:
            catalogue = Path(tmp) / f"catalogue.{args.format}"
            generate(catalogue, args.rows, args.tiles, args.format)
            bands, checks, what = ["VIS", "NIR_H", "NIR_J"], "no-files", f"{args.tiles} tiles"
        else:
            catalogue = Path(tmp) / "catalogue.parquet"
            n_bands = generate_from_survey(catalogue, args.rows, args.survey)
            bands = [f"band{b}" for b in range(n_bands)]
            checks, what = "files", f"{args.survey} repeated, files checked"
        size_mb = catalogue.stat().st_size / 2**20
        print(
            f"generated {args.rows:,} rows ({what}), {catalogue.suffix[1:]}: "
            f"{size_mb:,.0f} MB in {time.perf_counter() - start:.1f} s"
        )
        child = [str(catalogue), str(Path(tmp) / "work"), str(args.batch), json.dumps(bands)]
        result = subprocess.run(
            [sys.executable, "-c", CHILD, *child, checks],
            capture_output=True,
            text=True,
        )
        if result.returncode:
            sys.exit(f"split_catalogue failed:\n{result.stderr}")
        figures = json.loads(result.stdout.strip().splitlines()[-1])
    print(
        f"split_catalogue: {figures['seconds']:.1f} s "
        f"({figures['rows'] / figures['seconds']:,.0f} rows/s), "
        f"{figures['batches']:,} batches over {figures['tiles']:,} tiles"
    )
    print(f"peak RSS: {figures['peak_rss_mb']:,.0f} MB (target <= 2048 MB)")


if __name__ == "__main__":
    main()
