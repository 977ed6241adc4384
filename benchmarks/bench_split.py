"""Benchmark of split_catalogue on a large generated catalogue (SPEC §9: tens of millions of
rows in bounded memory).

Generates a catalogue (Parquet by default, written in chunks so the generator stays small),
then runs ``split_catalogue`` in a fresh subprocess and prints its wall time, throughput and
peak RSS (target: <= 2 GB for 10 million rows).

    python benchmarks/bench_split.py                      # 10 M rows, 1000 tiles, Parquet
    python benchmarks/bench_split.py --rows 2000000 --format csv --tiles 1
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
cfg = validate_config({"channel_weights": {"VIS": [1.0], "NIR_H": [1.0], "NIR_J": [1.0]},
                       "N_batch_cutout_process": int(sys.argv[3])})
start = time.perf_counter()
manifest = split_catalogue(sys.argv[1], cfg, sys.argv[2], check_files=False)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--tiles", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=1000, help="N_batch_cutout_process")
    parser.add_argument("--format", choices=["parquet", "csv"], default="parquet")
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temp dir")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        catalogue = Path(tmp) / f"catalogue.{args.format}"
        start = time.perf_counter()
        generate(catalogue, args.rows, args.tiles, args.format)
        size_mb = catalogue.stat().st_size / 2**20
        print(
            f"generated {args.rows:,} rows, {args.tiles} tiles, {args.format}: "
            f"{size_mb:,.0f} MB in {time.perf_counter() - start:.1f} s"
        )
        result = subprocess.run(
            [sys.executable, "-c", CHILD, str(catalogue), str(Path(tmp) / "work"), str(args.batch)],
            capture_output=True,
            text=True,
            check=True,
        )
        figures = json.loads(result.stdout.strip().splitlines()[-1])
    print(
        f"split_catalogue: {figures['seconds']:.1f} s "
        f"({figures['rows'] / figures['seconds']:,.0f} rows/s), "
        f"{figures['batches']:,} batches over {figures['tiles']:,} tiles"
    )
    print(f"peak RSS: {figures['peak_rss_mb']:,.0f} MB (target <= 2048 MB)")


if __name__ == "__main__":
    main()
