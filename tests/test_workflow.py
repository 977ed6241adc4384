"""End-to-end tests of the Snakemake workflow on a tiny demo survey made by the workflow itself.

Snakemake runs as a subprocess exactly as a user runs it (the repository's Snakefile, a config
file, ``--directory``). One uninterrupted Zarr run is shared by the tests that only read it; the
rerun tests change it in the order pytest runs them (file order).
"""

import json
import os
import re
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
import zarr
from workflow_helpers import snakemake, snakemake_command

from cutana import memory_model, warm_jobs

pytestmark = pytest.mark.slow

CONFIG = {
    "source_catalogue": "demo/catalogue.csv",
    "output_dir": "out",
    "target_resolution": 32,
    "N_batch_cutout_process": 10,
    "normalisation_method": "asinh",
    "channel_weights": {
        "VIS": [1.0, 0.0, 0.0],
        "NIR_Y": [0.0, 0.7, 0.0],
        "NIR_J": [0.0, 0.3, 0.5],
        "NIR_H": [0.0, 0.0, 0.5],
    },
    "memory": {"profile_sources": 5},
    "gallery": {"n_samples": 9},
    "demo": {"dir": "demo", "n_sources": 30, "tile_size": 400, "max_diameter_pixel": 64},
}
STATUSES = {"ok", "partial", "no_overlap", "failed"}


def write_config(work_dir, **overrides):
    work_dir.mkdir(parents=True, exist_ok=True)
    config = {**CONFIG, **overrides}
    (work_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


def job_counts(output):
    """Finished jobs per rule, from Snakemake's log lines (empty when nothing ran)."""
    return Counter(re.findall(r"Finished jobid: \d+ \(Rule: (\w+)\)", output))


def batch_folders(out_dir):
    return sorted(p for p in out_dir.glob("batch_cutout_process_*") if p.is_dir())


def zarr_images(out_dir):
    """Images of every batch folder, keyed by folder name."""
    return {
        folder.name: zarr.open_group(folder / "images.zarr", mode="r")["images"][:]
        for folder in batch_folders(out_dir)
    }


@pytest.fixture(scope="module")
def zarr_run(tmp_path_factory):
    """One complete Zarr run of the demo (the workflow makes the demo survey itself)."""
    work_dir = tmp_path_factory.mktemp("zarr_run")
    write_config(work_dir)
    output = snakemake(work_dir)
    return work_dir, output


def test_zarr_run_indexes_every_catalogue_row(zarr_run):
    work_dir, output = zarr_run
    out = work_dir / "out"
    catalogue = pd.read_csv(work_dir / "demo" / "catalogue.csv")
    index = pd.read_parquet(out / "source_to_zarr_mapping.parquet")
    assert list(index.columns) == [
        "SourceID", "RA", "Dec", "zarr_file", "batch_index", "idx_in_zarr", "status", "reason",
    ]  # fmt: skip
    assert index["SourceID"].tolist() == catalogue["SourceID"].astype(str).tolist()
    assert np.allclose(index["RA"], catalogue["RA"]) and np.allclose(index["Dec"], catalogue["Dec"])
    assert set(index["status"]) <= STATUSES
    # The demo's images have invalid pixels, so many stamps are "partial"; few miss entirely.
    assert index["status"].isin(["ok", "partial"]).sum() > len(index) // 2

    manifest = json.loads((out / ".cutana" / "batches" / "manifest.json").read_text())
    assert len(batch_folders(out)) == len(manifest["batches"]) >= 4
    images = zarr_images(out)
    with_image = index[index["idx_in_zarr"] >= 0]
    assert with_image["status"].isin(["ok", "partial"]).all()
    for zarr_file, rows in with_image.groupby("zarr_file"):
        stack = images[Path(zarr_file).parent.name]
        assert stack.shape[1:] == (32, 32, 3)
        assert sorted(rows["idx_in_zarr"]) == list(range(len(stack)))
        assert np.isfinite(stack).all()

    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["total_sources"] == len(catalogue)
    assert sum(summary["counts"].values()) == len(catalogue)
    assert summary["counts"]["ok"] == (index["status"] == "ok").sum()
    assert summary["timings"]["cutout_batch"]["jobs"] == len(manifest["batches"])
    assert "target_resolution = 32" in (out / "cutana_config.toml").read_text()
    assert (out / "gallery.png").stat().st_size > 0
    assert (out / "gallery.html").stat().st_size > 0
    # The run's last lines say how the rows ended, as the summary counts them.
    said = ", ".join(f"{name} {value}" for name, value in summary["counts"].items())
    assert f"cutana: {len(catalogue)} catalogue rows: {said}; " in output
    counts = job_counts(output)
    assert counts["cutout_batch"] == len(manifest["batches"])
    assert counts["make_demo_survey"] == counts["profile_memory"] == 1


def test_declared_memory_covers_measured_peak(zarr_run):
    work_dir, _ = zarr_run
    work = work_dir / "out" / ".cutana"
    model = memory_model.load_model(work / "memory_model.json")
    checked = 0
    for log in sorted((work / "logs" / "cutout_batch").glob("*.log")):
        declared = int(re.search(r"declared resources: mem_mb=(\d+)", log.read_text())[1])
        # No memory budget (--resources mem_mb): the cutout jobs were created without waiting
        # for the memory model, so they declare the fallback. With a budget they declare the
        # model's estimate (test_resources.py).
        assert declared == memory_model.FALLBACK_MEM_MB
        # The job's own high-water mark (VmHWM), of its command's process or of the warm
        # server's worker that ran it: Snakemake's benchmark samples only the command's
        # process tree, a few tenths of a second apart.
        peak = float(re.search(r"peak RSS ([\d.]+) MB", log.read_text())[1])
        assert declared >= peak, f"{log.stem}: declared {declared} MB < peak {peak} MB"
        checked += 1
    assert checked == len(list((work / "status").glob("*.parquet"))) >= 1
    assert model["sample"]["peak_mb"] > 0 and model["mb_per_unit"] > 0


@pytest.mark.skipif(
    not warm_jobs.enabled({warm_jobs.RUN_VARIABLE: "1"}), reason="no warm server here"
)
def test_jobs_after_the_split_run_in_warm_workers(zarr_run):
    # The onstart hook spawned a warm server (cutana.warm_jobs) while the catalogue was split.
    logs_dir = zarr_run[0] / "out" / ".cutana" / "logs"
    logs = sorted((logs_dir / "cutout_batch").glob("*.log"))
    logs += [logs_dir / f"{step}.log" for step in ("profile_memory", "merge_index", "gallery")]
    assert len(logs) > 3 and all("run by a warm server's worker" in log.read_text() for log in logs)
    assert "run by its command" in (logs_dir / "split_catalogue.log").read_text()
    # Cutout jobs leave their worker to the next one (a job's log names its process).
    cutout_logs = sorted((logs_dir / "cutout_batch").glob("*.log"))
    pids = {re.search(r"worker, pid (\d+)", log.read_text())[1] for log in cutout_logs}
    assert len(pids) < len(cutout_logs), pids


def test_second_run_has_nothing_to_do(zarr_run):
    work_dir, _ = zarr_run
    output = snakemake(work_dir)
    assert "Nothing to be done" in output
    assert job_counts(output).get("cutout_batch", 0) == 0


def planned_jobs(output):
    """Jobs per rule that a dry run lists, from its job table."""
    return {
        rule: int(count)
        for rule, count in re.findall(r"^(\w+)\s+(\d+)$", output, flags=re.MULTILINE)
        if rule != "total"
    }


def test_changed_settings_rerun_exactly_the_jobs_they_affect(zarr_run):
    work_dir, _ = zarr_run
    # A log level changes no pixels.
    unchanged = snakemake(work_dir, "--dry-run", "--config", "log_level=DEBUG")
    assert "Nothing to be done" in unchanged
    # A misspelt key is ignored: it is reported and changes nothing.
    misspelt = snakemake(work_dir, "--dry-run", "--config", "target_resolutoin=16")
    assert "Unknown config key 'target_resolutoin' is ignored" in misspelt
    assert "Nothing to be done" in misspelt
    # A pixel-relevant setting reruns the split and (after it, once its checkpoint is
    # resolved) everything downstream; the demo survey stays.
    pixels = snakemake(work_dir, "--dry-run", "--config", "target_resolution=16")
    assert planned_jobs(pixels).get("split_catalogue") == 1, pixels
    assert "make_demo_survey" not in planned_jobs(pixels)
    # The bands' order is a setting: band i reads path i of fits_file_paths.
    reordered = {**CONFIG, "channel_weights": dict(reversed(CONFIG["channel_weights"].items()))}
    (work_dir / "reordered.yaml").write_text(yaml.safe_dump(reordered, sort_keys=False))
    command = snakemake_command(work_dir, "--dry-run")
    command[command.index(str(work_dir / "config.yaml"))] = str(work_dir / "reordered.yaml")
    bands = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert planned_jobs(bands.stdout).get("split_catalogue") == 1, bands.stdout + bands.stderr
    # The gallery's own setting reruns only the gallery.
    gallery = snakemake(work_dir, "--dry-run", "--config", "gallery={'n_samples': 4}")
    assert planned_jobs(gallery) == {"all": 1, "gallery": 1}, gallery


def test_deleting_one_batch_reruns_only_that_batch(zarr_run):
    work_dir, _ = zarr_run
    out = work_dir / "out"
    before = zarr_images(out)
    folders = batch_folders(out)
    victim = folders[1]
    untouched_mtimes = {f.name: (f / "images_metadata.parquet").stat().st_mtime_ns for f in folders}
    del untouched_mtimes[victim.name]
    subprocess.run(["rm", "-rf", str(victim)], check=True)
    # The temporary folder of a writer of this batch that is still running (a job of a run
    # whose Snakemake was killed alone runs on): the rerun's job must leave it alone.
    other_writer = subprocess.Popen(["sleep", "120"])
    other_tmp = victim.with_name(f"{victim.name}.tmp-{other_writer.pid}")
    other_tmp.mkdir()
    (other_tmp / "shard").write_text("being written")
    try:
        counts = job_counts(snakemake(work_dir))
        assert (other_tmp / "shard").read_text() == "being written"
    finally:
        other_writer.kill()
        other_writer.wait()
        subprocess.run(["rm", "-rf", str(other_tmp)], check=True)
    assert counts["cutout_batch"] == 1
    assert victim.is_dir()
    for name, mtime in untouched_mtimes.items():
        assert (out / name / "images_metadata.parquet").stat().st_mtime_ns == mtime
    after = zarr_images(out)
    np.testing.assert_array_equal(after[victim.name], before[victim.name])


def test_fits_output(zarr_run, tmp_path):
    demo_catalogue = zarr_run[0] / "demo" / "catalogue.csv"
    write_config(
        tmp_path, output_format="fits", source_catalogue=str(demo_catalogue),
        N_batch_cutout_process=20,
    )  # fmt: skip
    counts = job_counts(snakemake(tmp_path))
    assert "make_demo_survey" not in counts
    from astropy.io import fits

    out = tmp_path / "out"
    index = pd.read_parquet(out / "source_to_zarr_mapping.parquet")
    assert "fits_file" in index.columns and "zarr_file" not in index.columns
    assert len(index) == CONFIG["demo"]["n_sources"]
    with_image = index[index["status"].isin(["ok", "partial"])]
    assert len(with_image) > 0
    assert index.loc[~index.index.isin(with_image.index), "fits_file"].isna().all()
    for row in with_image.itertuples():
        with fits.open(out / row.fits_file) as hdul:
            assert hdul[0].header["SOURCE"] == row.SourceID
            assert [h.data.shape for h in hdul[1:]] == [(32, 32)] * 3


def test_killed_run_resumes_to_the_uninterrupted_result(zarr_run, tmp_path):
    reference_dir = zarr_run[0]
    write_config(tmp_path, source_catalogue=str(reference_dir / "demo" / "catalogue.csv"))
    status_dir = tmp_path / "out" / ".cutana" / "status"
    process = subprocess.Popen(
        snakemake_command(tmp_path),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group, so the kill reaches every job
    )
    deadline = time.monotonic() + 300
    try:
        while not (status_dir.is_dir() and any(status_dir.glob("*.parquet"))):
            assert process.poll() is None, "the run ended before any batch finished"
            assert time.monotonic() < deadline, "no batch finished in time"
            time.sleep(0.1)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert not (tmp_path / "out" / "source_to_zarr_mapping.parquet").exists()

    snakemake(tmp_path, "--unlock")
    snakemake(tmp_path)

    reference_out, resumed_out = reference_dir / "out", tmp_path / "out"
    pd.testing.assert_frame_equal(
        pd.read_parquet(resumed_out / "source_to_zarr_mapping.parquet"),
        pd.read_parquet(reference_out / "source_to_zarr_mapping.parquet"),
    )
    reference_images, resumed_images = zarr_images(reference_out), zarr_images(resumed_out)
    assert reference_images.keys() == resumed_images.keys()
    for name, images in reference_images.items():
        np.testing.assert_array_equal(resumed_images[name], images)
    assert not list(resumed_out.glob("*.tmp-*")), "a partial batch was left behind"
