"""Tests of cutana.index: the merged index covers every catalogue row exactly once, the run
summary counts and times the run, and the saved config round-trips."""

import json

import pandas as pd
import pytest

from cutana.config import config_hash, load_config_toml, to_plain, validate_config
from cutana.exceptions import CutanaError
from cutana.index import benchmark_timings, index_columns, merge_index, merge_status_tables

BATCH_A = "00000_aaaaaaaaaa"
BATCH_B = "00001_bbbbbbbbbb"


def make_config(**overrides):
    base = {"source_catalogue": "cat.csv", "output_dir": "out", "name": "index_test"}
    base.update(overrides)
    return validate_config(base, warn_unknown=False)


def status_table(rows, statuses, idx_in_zarr, with_file_column=None):
    table = pd.DataFrame(
        {
            "row_index": rows,
            "SourceID": [f"S{r}" for r in rows],
            "RA": [float(r) for r in rows],
            "Dec": [-float(r) for r in rows],
            "status": statuses,
            "reason": ["" if s in ("ok", "partial") else f"why {s}" for s in statuses],
            "idx_in_zarr": idx_in_zarr,
        }
    )
    if with_file_column:
        table[with_file_column[0]] = with_file_column[1]
    return table


@pytest.fixture
def two_batches(tmp_path):
    """Catalogue rows 0-4 split over two batches whose rows are not in catalogue order."""
    status_dir = tmp_path / "status"
    status_dir.mkdir()
    paths = [status_dir / f"{BATCH_A}.parquet", status_dir / f"{BATCH_B}.parquet"]
    status_table([3, 0, 4], ["ok", "no_overlap", "partial"], [0, -1, 1]).to_parquet(paths[0])
    status_table([2, 1], ["failed", "ok"], [-1, 0]).to_parquet(paths[1])
    return paths


def test_one_row_per_catalogue_row_in_catalogue_order(two_batches):
    cfg = make_config()
    index = merge_status_tables(two_batches, 5, cfg)
    assert list(index.columns) == index_columns(cfg)
    assert list(index.columns) == [
        "SourceID", "RA", "Dec", "zarr_file", "batch_index", "idx_in_zarr", "status", "reason",
    ]  # fmt: skip
    assert index["SourceID"].tolist() == ["S0", "S1", "S2", "S3", "S4"]
    assert index["status"].tolist() == ["no_overlap", "ok", "failed", "ok", "partial"]
    assert index["batch_index"].tolist() == [0, 1, 1, 0, 0]
    assert index["idx_in_zarr"].tolist() == [-1, 0, -1, 0, 1]
    assert index["zarr_file"].tolist() == [
        None,
        f"batch_cutout_process_{BATCH_B}/images.zarr",
        None,
        f"batch_cutout_process_{BATCH_A}/images.zarr",
        f"batch_cutout_process_{BATCH_A}/images.zarr",
    ]
    assert index["reason"].tolist() == ["why no_overlap", "", "why failed", "", ""]


def test_fits_output_uses_the_engine_file_column(tmp_path):
    cfg = make_config(output_format="fits")
    path = tmp_path / f"{BATCH_A}.parquet"
    files = ["batch_cutout_process_x/S0.fits", None]
    status_table([1, 0], ["ok", "failed"], [0, -1], ("fits_file", files)).to_parquet(path)
    index = merge_status_tables([path], 2, cfg)
    assert "fits_file" in index.columns and "zarr_file" not in index.columns
    assert index["fits_file"].tolist() == [None, "batch_cutout_process_x/S0.fits"]


@pytest.mark.parametrize("total_rows", [4, 6])
def test_count_mismatch_with_the_manifest_fails_loudly(two_batches, total_rows):
    with pytest.raises(CutanaError, match="catalogue has"):
        merge_status_tables(two_batches, total_rows, make_config())


def test_duplicated_row_fails_loudly(two_batches, tmp_path):
    extra = tmp_path / "status" / "00002_cccccccccc.parquet"
    status_table([4], ["ok"], [0]).to_parquet(extra)
    with pytest.raises(CutanaError, match=r"duplicated rows \[4\]"):
        merge_status_tables([*two_batches, extra], 6, make_config())


def test_unknown_status_is_rejected(tmp_path):
    path = tmp_path / f"{BATCH_A}.parquet"
    status_table([0], ["weird"], [0]).to_parquet(path)
    with pytest.raises(CutanaError, match="weird"):
        merge_status_tables([path], 1, make_config())


def write_benchmark(path, seconds, max_rss):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"
        f"{seconds}\t0:00:01\t{max_rss}\t1\t1\t1\t0\t0\t0\t0\n"
    )


def test_benchmark_timings_group_by_rule_and_tolerate_unsampled_jobs(tmp_path):
    bench = tmp_path / "benchmarks"
    write_benchmark(bench / "cutout_batch" / f"{BATCH_A}.tsv", 2.0, 150.5)
    write_benchmark(bench / "cutout_batch" / f"{BATCH_B}.tsv", 4.0, "NA")
    write_benchmark(bench / "split_catalogue.tsv", 1.5, "-")
    timings = benchmark_timings(
        [
            *sorted((bench / "cutout_batch").iterdir()),
            bench / "split_catalogue.tsv",
            bench / "x.tsv",
        ]
    )
    assert timings["cutout_batch"] == {
        "jobs": 2,
        "total_s": 6.0,
        "mean_s": 3.0,
        "max_s": 4.0,
        "max_rss_mb": 150.5,
    }
    assert timings["split_catalogue"]["max_rss_mb"] is None
    assert set(timings) == {"cutout_batch", "split_catalogue"}


def test_logged_peaks_count_in_the_memory_of_their_rule(tmp_path):
    # A warm server's worker (cutana.warm_jobs) is not sampled by Snakemake's benchmark: the
    # job's logged high-water mark is the rule's memory.
    bench = tmp_path / "benchmarks"
    write_benchmark(bench / "cutout_batch" / f"{BATCH_A}.tsv", 2.0, 25.0)
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "a.log").write_text("x INFO cutana.workflow.cutout_batch: peak RSS 181.5 MB\n")
    (logs / "b.log").write_text("x INFO cutana.workflow.cutout_batch: peak RSS 96.0 MB\n")
    paths = [bench / "cutout_batch" / f"{BATCH_A}.tsv"]
    log_paths = {"cutout_batch": [logs / "a.log", logs / "b.log", logs / "missing.log"]}
    assert benchmark_timings(paths, log_paths)["cutout_batch"]["max_rss_mb"] == 181.5
    assert benchmark_timings(paths)["cutout_batch"]["max_rss_mb"] == 25.0


def test_merge_index_writes_index_summary_and_config(two_batches, tmp_path):
    cfg = make_config(target_resolution=48)
    manifest = {
        "total_rows": 5,
        "batches": [{"name": BATCH_A}, {"name": BATCH_B}],
        "tiles": {"t": ["a.fits"]},
        "catalogue": "cat.csv",
    }
    bench = tmp_path / "benchmarks" / "cutout_batch" / f"{BATCH_A}.tsv"
    write_benchmark(bench, 2.0, 100)
    written = merge_index(two_batches, manifest, cfg, tmp_path / "out", benchmark_paths=[bench])

    index = pd.read_parquet(written["index"])
    assert len(index) == 5
    summary = json.loads(open(written["summary"]).read())
    assert summary["counts"] == {"ok": 2, "partial": 1, "no_overlap": 1, "failed": 1}
    assert summary["total_sources"] == 5
    assert summary["n_batches"] == 2
    assert summary["config_hash"] == config_hash(cfg)
    assert summary["timings"]["cutout_batch"]["jobs"] == 1
    saved = to_plain(load_config_toml(written["config_toml"]))
    assert saved["target_resolution"] == 48
    assert saved == cfg
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "cutana_config.toml", "run_summary.json", "source_to_zarr_mapping.parquet",
    ]  # fmt: skip


def test_benchmark_files_left_empty_by_a_killed_run_are_skipped(tmp_path, caplog):
    """A run killed while Snakemake wrote a benchmark file leaves it empty or cut short; the
    resumed run does not rewrite it (that job had finished), and the index must still be made."""
    bench = tmp_path / "benchmarks"
    write_benchmark(bench / "cutout_batch" / f"{BATCH_A}.tsv", 2.0, 150.5)
    (bench / "cutout_batch" / f"{BATCH_B}.tsv").write_text("")
    (bench / "merge_index.tsv").write_text("h:m:s\tmax_rss\n")
    with caplog.at_level("WARNING", logger="cutana.index"):
        timings = benchmark_timings(
            [*sorted((bench / "cutout_batch").iterdir()), bench / "merge_index.tsv"]
        )
    assert timings == {
        "cutout_batch": {
            "jobs": 1,
            "total_s": 2.0,
            "mean_s": 2.0,
            "max_s": 2.0,
            "max_rss_mb": 150.5,
        }
    }
    assert str(bench / "cutout_batch" / f"{BATCH_B}.tsv") in caplog.text
    assert "merge_index.tsv" in caplog.text


def test_merge_index_job_never_imports_pandas(tmp_path):
    """The merge_index job reads the engine's status tables (written without pandas metadata)
    and writes the index with pyarrow only (pandas costs ~0.25 s of start-up); the index equals
    the DataFrame one."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from conftest import run_in_fresh_process

    cfg = make_config()
    paths = [tmp_path / f"{BATCH_A}.parquet", tmp_path / f"{BATCH_B}.parquet"]
    for path, table in zip(
        paths,
        [
            status_table([3, 0, 4], ["ok", "no_overlap", "partial"], [0, -1, 1]),
            status_table([2, 1], ["failed", "ok"], [-1, 0]),
        ],
        strict=True,
    ):
        arrow = pa.Table.from_pandas(table, preserve_index=False).replace_schema_metadata(None)
        pq.write_table(arrow, path)
    manifest = {"total_rows": 5, "batches": [{"name": BATCH_A}, {"name": BATCH_B}]}
    loaded, _ = run_in_fresh_process(
        [
            "from cutana.index import merge_index",
            f"merge_index({[str(p) for p in paths]!r}, {manifest!r}, {dict(cfg)!r}, "
            f"{str(tmp_path / 'out')!r})",
        ]
    )
    assert "pandas" not in loaded
    written = pd.read_parquet(tmp_path / "out" / "source_to_zarr_mapping.parquet")
    expected = merge_status_tables(paths, 5, cfg)
    assert list(written.columns) == list(expected.columns)
    for name in written.columns:  # nulls compared as None, whatever pandas' string dtype
        values = written[name].astype(object).where(written[name].notna(), None).tolist()
        assert values == expected[name].astype(object).tolist(), name
    summary = json.loads((tmp_path / "out" / "run_summary.json").read_text())
    assert summary["counts"] == {"ok": 2, "partial": 1, "no_overlap": 1, "failed": 1}
