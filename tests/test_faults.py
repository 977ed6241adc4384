"""Runtime faults are per source, not per run (SPEC §5, §7.3), through the real workflow.

The inputs are valid when the catalogue is split; then, before the cutout jobs run, one tile's
VIS file is truncated to its header and another tile's NIR_J file is deleted. Two sources lie
far outside their tile. The run must finish: the damaged tiles' sources are ``failed`` with a
reason naming the file, the far ones ``no_overlap``, every other source has its image, every
catalogue row appears exactly once in the index, and the summary / API / CLI report the counts.
(``chmod 000`` is not used: the tests may run as root, which reads such files anyway.)
"""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
import zarr
from astropy.io import fits
from workflow_helpers import snakemake, snakemake_command, tiny_demo_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def faulty_run(tmp_path_factory):
    from cutana import Orchestrator
    from cutana.demo import demo_config, make_demo_survey

    root = tmp_path_factory.mktemp("faults")
    demo = root / "demo"
    catalogue = make_demo_survey(
        demo, n_tiles=3, tile_size=256, n_sources=30, seed=11,
        min_diameter_pixel=16, max_diameter_pixel=32,
    )  # fmt: skip
    frame = pd.read_csv(catalogue)
    far = frame[frame["fits_file_paths"].str.contains("tile0_")].head(2).copy()
    far["SourceID"] = ["far_away_1", "far_away_2"]
    far["Dec"] += 1.0  # 36000 pixels away from the tile at 0.1"/pixel
    frame = pd.concat([frame, far], ignore_index=True)
    frame.to_csv(root / "catalogue.csv", index=False)
    config = {
        **demo_config(demo),
        "source_catalogue": str(root / "catalogue.csv"),
        "output_dir": str(root / "out"),
        "target_resolution": 16,
        "N_batch_cutout_process": 10,
        "gallery": {"n_samples": 4},
        "memory": {"profile_sources": 5},
    }
    # Through the API (the CLI's engine): inputs are valid when split and profiled ...
    first = Orchestrator(config, snakemake_args=["--until", "profile_memory"]).run()
    assert (root / "out" / ".cutana" / "memory_model.json").exists(), first["error"]

    # ... then damaged before the cutout jobs run.
    truncated, deleted = demo / "tile1_VIS.fits", demo / "tile2_NIR_J.fits"
    with fits.open(truncated) as hdul:
        data_start = hdul[0].fileinfo()["datLoc"]
    os.truncate(truncated, data_start)
    deleted.unlink()
    result = Orchestrator(config).run()
    return root, frame, result, truncated, deleted


def tile_of(frame: pd.DataFrame, tile: int) -> pd.Series:
    return frame["fits_file_paths"].str.contains(f"tile{tile}_")


def test_faults_fail_only_their_sources_and_every_row_is_indexed_once(faulty_run):
    root, frame, _, truncated, deleted = faulty_run
    out = root / "out"
    index = pd.read_parquet(out / "source_to_zarr_mapping.parquet")
    assert index["SourceID"].tolist() == frame["SourceID"].astype(str).tolist()
    by_id = index.set_index("SourceID")

    far = frame["SourceID"].str.startswith("far_away")
    assert (by_id.loc[frame.loc[far, "SourceID"], "status"] == "no_overlap").all()
    intact = frame.loc[tile_of(frame, 0) & ~far, "SourceID"]
    assert by_id.loc[intact, "status"].isin(["ok", "partial"]).all()
    for tile, damaged in ((1, truncated), (2, deleted)):
        rows = by_id.loc[frame.loc[tile_of(frame, tile), "SourceID"]]
        assert len(rows) > 0
        assert (rows["status"] == "failed").all(), rows[["status", "reason"]]
        assert rows["reason"].str.contains(damaged.name, regex=False).all(), rows["reason"]
        assert (rows["idx_in_zarr"] == -1).all()
    assert by_id.loc[by_id["status"] == "ok", "reason"].eq("").all()

    # The images present are exactly the ok/partial rows of their batch.
    with_image = index[index["idx_in_zarr"] >= 0]
    assert with_image["status"].isin(["ok", "partial"]).all()
    assert len(with_image) == index["status"].isin(["ok", "partial"]).sum()
    for zarr_file, rows in with_image.groupby("zarr_file"):
        path = Path(zarr_file) if Path(zarr_file).is_absolute() else out / zarr_file
        images = zarr.open_group(path, mode="r")["images"]
        assert sorted(rows["idx_in_zarr"]) == list(range(images.shape[0]))

    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["total_sources"] == len(frame)
    assert summary["counts"] == {
        status: int((index["status"] == status).sum())
        for status in ("ok", "partial", "no_overlap", "failed")
    }


def test_failed_sources_are_not_job_failures(faulty_run):
    root, _, result, _, _ = faulty_run
    assert result["status"] == "completed", result["error"]
    log = (root / "out" / ".cutana" / "logs" / "snakemake.log").read_text()
    assert "Error in rule" not in log
    # ... but the run's last lines say that some rows failed, and where to read why.
    failed = json.loads((root / "out" / "run_summary.json").read_text())["counts"]["failed"]
    assert failed > 0
    assert f"failed {failed}; every row's status and reason: " in log
    for job_log in (root / "out" / ".cutana" / "logs" / "cutout_batch").glob("*.log"):
        assert "cutout_batch finished" in job_log.read_text()


def test_api_and_cli_report_the_counts(faulty_run, capsys):
    from cutana import cli

    root, frame, result, _, _ = faulty_run
    summary = json.loads((root / "out" / "run_summary.json").read_text())
    assert result["counts"] == summary["counts"]
    assert result["n_failed"] == summary["counts"]["failed"] > 0
    assert result["n_no_overlap"] == summary["counts"]["no_overlap"] == 2
    assert result["total_sources"] == len(frame)
    cli._print_result(result)
    printed = capsys.readouterr().out
    assert f"failed {result['n_failed']}" in printed
    assert f"no_overlap {result['n_no_overlap']}" in printed


# ------------------------------------------------------------------ crash safety
def kill_after(work_dir: Path, seconds: float) -> bool:
    """Start the run, SIGKILL its whole process group after ``seconds``; True if it was killed
    (False if it had already finished)."""
    process = subprocess.Popen(
        snakemake_command(work_dir),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        process.wait(timeout=seconds)
        return False
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        return True


def run_outputs(out: Path) -> tuple[pd.DataFrame, dict, dict]:
    """The index, every batch's images and its metadata without the processing timestamps."""
    images, metadata = {}, {}
    for folder in sorted(out.glob("batch_cutout_process_*")):
        images[folder.name] = zarr.open_group(folder / "images.zarr", mode="r")["images"][:]
        table = pd.read_parquet(folder / "images_metadata.parquet")
        metadata[folder.name] = table.drop(columns=["processing_timestamp"])
    return pd.read_parquet(out / "source_to_zarr_mapping.parquet"), images, metadata


def test_seeded_random_kills_then_rerun_equal_an_uninterrupted_run(tmp_path):
    from cutana.demo import make_demo_survey

    make_demo_survey(
        tmp_path / "demo", n_tiles=1, tile_size=300, n_sources=24, seed=4,
        min_diameter_pixel=16, max_diameter_pixel=32,
    )  # fmt: skip
    config = tiny_demo_config(tmp_path / "demo")
    reference, crashed = tmp_path / "reference", tmp_path / "crashed"
    for work_dir in (reference, crashed):
        work_dir.mkdir()
        (work_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    started = time.monotonic()
    snakemake(reference)
    duration = time.monotonic() - started

    rng = np.random.default_rng(20240611)
    kills = 0
    # Each attempt resumes the previous one and so has less left to do: the first kill always
    # lands (its delay is below the reference run's duration); later ones land when the
    # resumed run is still going, so at least one kill is guaranteed and more are typical.
    for delay in rng.uniform(0.1, 0.6, size=3) * duration:
        if any((crashed / ".snakemake" / "locks").glob("*")):
            snakemake(crashed, "--unlock")  # Snakemake: "Directory cannot be locked"
        kills += kill_after(crashed, float(delay))
    assert kills >= 1
    if any((crashed / ".snakemake" / "locks").glob("*")):
        snakemake(crashed, "--unlock")
    snakemake(crashed)

    ref_index, ref_images, ref_metadata = run_outputs(reference / "out")
    index, images, metadata = run_outputs(crashed / "out")
    pd.testing.assert_frame_equal(index, ref_index)
    assert images.keys() == ref_images.keys()
    for name, stack in ref_images.items():
        assert images[name].dtype == stack.dtype
        assert images[name].tobytes() == stack.tobytes(), name
        pd.testing.assert_frame_equal(metadata[name], ref_metadata[name])
    out = crashed / "out"
    assert not list(out.rglob("*.tmp-*")), "a partial write was left behind"
    assert (out / "cutana_config.toml").read_text() == (
        reference / "out" / "cutana_config.toml"
    ).read_text()
