"""split_catalogue: grouping by tile, batch sizes, locality order, determinism, atomicity and
bounded memory on a generated one-million-row catalogue."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cutana.catalogue import BATCH_SCHEMA, split_catalogue, tile_id
from cutana.config import validate_config
from cutana.exceptions import CatalogueValidationError

BANDS = {"VIS": [1.0, 0.0], "NIR": [0.0, 1.0]}


def make_catalogue(n_rows: int, n_tiles: int, seed: int = 1) -> pd.DataFrame:
    """Rows spread over ``n_tiles`` tiles (two relative FITS paths each), shuffled."""
    rng = np.random.default_rng(seed)
    tiles = rng.integers(0, n_tiles, n_rows)
    return pd.DataFrame(
        {
            "SourceID": [f"SRC_{i:07d}" for i in range(n_rows)],
            "RA": 150.0 + tiles + rng.uniform(0, 1, n_rows),
            "Dec": 2.0 + rng.uniform(0, 1, n_rows),
            "diameter_pixel": rng.integers(16, 200, n_rows).astype(float),
            "fits_file_paths": [f"['tiles/t{t}_vis.fits', 'tiles/t{t}_nir.fits']" for t in tiles],
            "magnitude": rng.uniform(18, 25, n_rows),  # extra column: ignored
        }
    )


def config(n_batch: int = 10) -> dict:
    return validate_config({"channel_weights": BANDS, "N_batch_cutout_process": n_batch})


def read_batches(work_dir: Path) -> tuple[dict, list[pd.DataFrame]]:
    manifest = json.loads((work_dir / "batches" / "manifest.json").read_text())
    frames = [
        pd.read_parquet(work_dir / "batches" / f"{b['name']}.parquet") for b in manifest["batches"]
    ]
    return manifest, frames


def test_split_groups_by_tile_and_respects_batch_size(tmp_path):
    catalogue = make_catalogue(437, n_tiles=4)
    path = tmp_path / "cat.csv"
    catalogue.to_csv(path, index=False)
    manifest, frames = (
        split_catalogue(path, config(25), tmp_path / "work", chunk_rows=50, check_files=False),
        None,
    )
    manifest, frames = read_batches(tmp_path / "work")

    assert manifest["total_rows"] == 437
    assert [b["index"] for b in manifest["batches"]] == list(range(len(frames)))
    every_row = np.sort(np.concatenate([f["row_index"].to_numpy() for f in frames]))
    np.testing.assert_array_equal(every_row, np.arange(437))
    for entry, frame in zip(manifest["batches"], frames, strict=True):
        assert 0 < len(frame) <= 25
        assert entry["n_sources"] == len(frame)
        assert entry["name"] == f"{entry['index']:05d}_{entry['id']}"
        assert frame["tile"].nunique() == 1 and frame["tile"].iloc[0] == entry["tile"]
        paths = manifest["tiles"][entry["tile"]]
        assert all(list(p) == paths for p in frame["fits_file_paths"])
        # Relative paths are resolved against the catalogue's directory.
        assert paths[0] == str(tmp_path / "tiles" / Path(paths[0]).name)
        assert tile_id(paths) == entry["tile"]
        # Locality: sorted by Dec, then RA.
        keys = list(zip(frame["Dec"], frame["RA"], strict=True))
        assert keys == sorted(keys)
        # Values survive unchanged.
        original = catalogue.iloc[frame["row_index"].to_numpy()]
        np.testing.assert_array_equal(frame["SourceID"], original["SourceID"])
        np.testing.assert_array_equal(frame["RA"], original["RA"])
        np.testing.assert_array_equal(frame["diameter_pixel"], original["diameter_pixel"])
        assert frame["diameter_arcsec"].isna().all()
    # Batches of one tile are consecutive and nearly equal in size.
    tiles_in_order = [b["tile"] for b in manifest["batches"]]
    assert len(set(tiles_in_order)) == 4
    for tile in set(tiles_in_order):
        sizes = [b["n_sources"] for b in manifest["batches"] if b["tile"] == tile]
        assert max(sizes) - min(sizes) <= 1
    schema = pq.read_schema(
        tmp_path / "work" / "batches" / f"{manifest['batches'][0]['name']}.parquet"
    )
    assert schema.remove_metadata().equals(BATCH_SCHEMA)


def test_split_is_deterministic_and_replaces_old_batches(tmp_path):
    path = tmp_path / "cat.parquet"
    make_catalogue(300, n_tiles=3).to_parquet(path)
    first = split_catalogue(path, config(40), tmp_path / "a", chunk_rows=64, check_files=False)
    second = split_catalogue(path, config(40), tmp_path / "b", chunk_rows=97, check_files=False)
    assert first == second
    for entry in first["batches"]:
        name = f"{entry['name']}.parquet"
        assert (tmp_path / "a/batches" / name).read_bytes() == (
            tmp_path / "b/batches" / name
        ).read_bytes()
    assert (tmp_path / "a/batches/manifest.json").read_bytes() == (
        tmp_path / "b/batches/manifest.json"
    ).read_bytes()
    # A different batch size replaces the folder completely (no stale batches).
    split_catalogue(path, config(1000), tmp_path / "a", check_files=False)
    files = sorted(p.name for p in (tmp_path / "a/batches").iterdir())
    assert len(files) == 3 + 1  # one batch per tile + manifest
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["batches"]


def test_dec_slabs_give_the_same_batches(tmp_path, monkeypatch):
    """A bucket too large to sort in memory is cut into Dec slabs: same names and bytes."""
    from cutana import catalogue as cat

    path = tmp_path / "cat.parquet"
    make_catalogue(2000, n_tiles=3).to_parquet(path)
    whole = split_catalogue(path, config(37), tmp_path / "whole", check_files=False)
    monkeypatch.setattr(cat, "MAX_SORT_ROWS", 150)
    slabs = split_catalogue(path, config(37), tmp_path / "slabs", chunk_rows=300, check_files=False)
    assert whole == slabs
    for entry in whole["batches"]:
        name = f"{entry['name']}.parquet"
        assert (tmp_path / "whole/batches" / name).read_bytes() == (
            tmp_path / "slabs/batches" / name
        ).read_bytes()
    assert sorted(p.name for p in (tmp_path / "slabs").iterdir()) == ["batches"]


def test_batch_id_changes_with_content(tmp_path):
    catalogue = make_catalogue(50, n_tiles=1)
    catalogue.to_csv(tmp_path / "one.csv", index=False)
    catalogue.assign(RA=catalogue["RA"] + 1e-9).to_csv(tmp_path / "two.csv", index=False)
    one = split_catalogue(tmp_path / "one.csv", config(), tmp_path / "w1", check_files=False)
    two = split_catalogue(tmp_path / "two.csv", config(), tmp_path / "w2", check_files=False)
    assert [b["index"] for b in one["batches"]] == [b["index"] for b in two["batches"]]
    assert all(a["id"] != b["id"] for a, b in zip(one["batches"], two["batches"], strict=True))


def test_parquet_list_column_and_arcsec_sizes(tmp_path):
    table = pa.table(
        {
            "SourceID": pa.array([101, 102, 103], pa.int64()),  # integer IDs become text
            "RA": [10.0, 10.1, 10.2],
            "Dec": [-5.0, -5.1, -5.2],
            "diameter_arcsec": [3.0, 4.5, 6.0],
            "fits_file_paths": pa.array([["/d/a.fits", "/d/b.fits"]] * 3, pa.list_(pa.string())),
        }
    )
    pq.write_table(table, tmp_path / "cat.parquet")
    manifest = split_catalogue(
        tmp_path / "cat.parquet", config(), tmp_path / "w", check_files=False
    )
    assert manifest["tiles"] == {tile_id(["/d/a.fits", "/d/b.fits"]): ["/d/a.fits", "/d/b.fits"]}
    assert manifest["size_column"] == "diameter_arcsec"
    _, (frame,) = read_batches(tmp_path / "w")
    assert list(frame["SourceID"]) == ["103", "102", "101"]  # sorted by Dec
    assert frame["diameter_pixel"].isna().all()
    assert list(frame["diameter_arcsec"]) == [6.0, 4.5, 3.0]


def test_invalid_catalogue_writes_nothing(tmp_path):
    catalogue = make_catalogue(120, n_tiles=2)
    catalogue.loc[[7, 99], "Dec"] = 95.0
    catalogue.loc[110, "SourceID"] = catalogue.loc[3, "SourceID"]  # duplicate in a later chunk
    catalogue.to_csv(tmp_path / "cat.csv", index=False)
    with pytest.raises(CatalogueValidationError) as info:
        split_catalogue(tmp_path / "cat.csv", config(), tmp_path / "w", chunk_rows=32)
    message = str(info.value)
    assert "column 'Dec'" in message and "row 7 = '95.0'" in message and "row 99" in message
    assert "'SRC_0000003' at rows 3, 110" in message
    assert list((tmp_path / "w").iterdir()) == []


def test_split_accepts_dataframe(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    catalogue = make_catalogue(30, n_tiles=2)
    manifest = split_catalogue(catalogue, config(), tmp_path / "w", check_files=False)
    assert manifest["total_rows"] == 30 and manifest["catalogue"] is None
    for paths in manifest["tiles"].values():
        assert all(p.startswith(str(tmp_path)) for p in paths)


MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys, time
    from cutana.catalogue import split_catalogue
    from cutana.config import validate_config
    cfg = validate_config({"channel_weights": {"VIS": [1.0], "NIR": [1.0]},
                           "N_batch_cutout_process": 10000})
    start = time.perf_counter()
    manifest = split_catalogue(sys.argv[1], cfg, sys.argv[2], check_files=False)
    print(json.dumps({
        "seconds": time.perf_counter() - start,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "batches": len(manifest["batches"]),
        "rows": manifest["total_rows"],
    }))
    """
)


def write_large_catalogue(path: Path, n_rows: int, n_tiles: int, chunk: int = 250_000) -> None:
    """Write a Parquet catalogue chunk by chunk (the test process stays small too)."""
    writer = None
    rng = np.random.default_rng(7)
    for start in range(0, n_rows, chunk):
        n = min(chunk, n_rows - start)
        tiles = rng.integers(0, n_tiles, n)
        paths = pa.array(
            [[f"/survey/t{t:03d}_vis.fits", f"/survey/t{t:03d}_nir.fits"] for t in range(n_tiles)],
            pa.list_(pa.string()),
        ).take(pa.array(tiles))
        table = pa.table(
            {
                "SourceID": pa.array(np.char.add("SRC_", np.arange(start, start + n).astype(str))),
                "RA": rng.uniform(0, 360, n),
                "Dec": rng.uniform(-90, 90, n),
                "diameter_pixel": rng.integers(16, 256, n).astype(float),
                "fits_file_paths": paths,
            }
        )
        writer = writer or pq.ParquetWriter(path, table.schema)
        writer.write_table(table)
    writer.close()


def test_one_million_rows_in_bounded_memory(tmp_path):
    n_rows = 1_000_000
    catalogue = tmp_path / "big.parquet"
    write_large_catalogue(catalogue, n_rows, n_tiles=50)
    result = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT, str(catalogue), str(tmp_path / "work")],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["rows"] == n_rows
    assert figures["peak_rss_mb"] < 1024, figures
    manifest = json.loads((tmp_path / "work/batches/manifest.json").read_text())
    assert sum(b["n_sources"] for b in manifest["batches"]) == n_rows
    assert max(b["n_sources"] for b in manifest["batches"]) <= 10000
    assert len(manifest["tiles"]) == 50


def test_the_split_job_never_loads_pandas(tmp_path):
    """Reading, checking (FITS files included) and splitting a CSV catalogue leaves pandas
    unloaded: the split job saves its import (~0.25 s of every run's fixed cost)."""
    from conftest import run_in_fresh_process

    from cutana.demo import demo_config, make_demo_survey

    make_demo_survey(tmp_path / "demo", n_tiles=2, tile_size=256, n_sources=45)
    cfg = validate_config({**demo_config(tmp_path / "demo"), "N_batch_cutout_process": 10})
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    loaded, n_batches = run_in_fresh_process(
        [
            "from pathlib import Path",
            "from cutana.catalogue import split_catalogue",
            f"cfg = json.load(open({str(tmp_path / 'cfg.json')!r}))",
            f"work = Path({str(tmp_path / 'work')!r})",
            "manifest = split_catalogue(cfg['source_catalogue'], cfg, work, check_files=True)",
        ],
        "len(manifest['batches'])",
    )
    assert "pandas" not in loaded
    assert n_batches >= 5  # 45 sources over two tiles, at most 10 per batch
    batches = sorted((tmp_path / "work" / "batches").glob("*.parquet"))
    rows = pa.concat_tables([pq.read_table(path) for path in batches])
    assert sorted(rows.column("row_index").to_pylist()) == list(range(45))
    assert rows.schema.remove_metadata().equals(BATCH_SCHEMA.remove_metadata())
