"""The workflow's job commands (cutana.workflow_jobs): one native thread each, their config."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys

import pytest
from conftest import run_in_fresh_process
from workflow_helpers import snakemake_command, tiny_demo_config

from cutana.config import (
    CONFIG_VARIABLE,
    load_run_config,
    run_config_json,
    validate_config,
)
from cutana.demo import make_demo_survey
from cutana.exceptions import ConfigValidationError

# A BLAS call and a large OpenCV resize, then the process's OS threads and OpenCV's pool size.
WORK = [
    "import os, numpy, cv2",
    "numpy.ones((300, 300)) @ numpy.ones((300, 300))",
    "cv2.resize(numpy.ones((512, 512), numpy.float32), (2048, 2048))",
]
RESULT = "[len(os.listdir('/proc/self/task')), cv2.getNumThreads()]"


def test_a_job_process_runs_numpy_and_opencv_on_one_thread(monkeypatch):
    for variable in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "OPENCV_FOR_THREADS_NUM"):
        monkeypatch.delenv(variable, raising=False)
    _, (threads, opencv_threads) = run_in_fresh_process(
        ["import cutana.workflow_jobs", *WORK], RESULT
    )
    assert (threads, opencv_threads) == (1, 1)
    if (os.cpu_count() or 1) > 1:  # without the set-up both libraries start thread pools
        _, (threads, opencv_threads) = run_in_fresh_process(WORK, RESULT)
        assert threads > 1 and opencv_threads > 1


def test_a_thread_count_the_user_exported_is_kept(monkeypatch):
    monkeypatch.setenv("OPENCV_FOR_THREADS_NUM", "3")
    _, (_, opencv_threads) = run_in_fresh_process(["import cutana.workflow_jobs", *WORK], RESULT)
    assert opencv_threads == 3


def test_the_run_config_round_trips_through_the_environment(monkeypatch):
    config = validate_config(
        {"source_catalogue": "sources.csv", "channel_weights": {"VIS": [1.0], "NIR_H": [0.5]}}
    )
    monkeypatch.setenv(CONFIG_VARIABLE, run_config_json(config))
    assert load_run_config() == json.loads(json.dumps(config))


def test_a_config_too_long_for_the_environment_is_refused():
    bands = {f"BAND_{i:05d}": [1.0] for i in range(20_000)}
    with pytest.raises(ConfigValidationError, match="characters of JSON"):
        run_config_json({"channel_weights": bands})


def test_a_job_without_its_config_says_how_to_give_it(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != CONFIG_VARIABLE}
    completed = subprocess.run(
        [sys.executable, "-m", "cutana.workflow_jobs", "merge_index", "--log",
         str(tmp_path / "log"), "--batches", str(tmp_path), "--status-pattern", "x",
         "--benchmarks-dir", str(tmp_path), "--logs-dir", str(tmp_path),
         "--output-dir", str(tmp_path)],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert completed.returncode != 0
    assert CONFIG_VARIABLE in completed.stderr and "--config FILE" in completed.stderr


def test_a_bad_catalogue_is_reported_by_its_message_and_the_traceback_goes_to_the_log(
    tmp_path,
):
    (tmp_path / "bad.csv").write_text(
        "SourceID,RA,Dec,diameter_pixel,fits_file_paths\nA,400,1,10,\"['x.fits']\"\n"
    )
    config = {"source_catalogue": "bad.csv", "output_dir": "out",
              "channel_weights": {"VIS": [1.0]}}  # fmt: skip
    (tmp_path / "config.yaml").write_text(json.dumps(config))
    completed = subprocess.run(snakemake_command(tmp_path), capture_output=True, text=True)
    output = completed.stdout + completed.stderr
    assert completed.returncode != 0
    assert "CatalogueValidationError: catalogue 'bad.csv' is invalid" in output
    assert "row 0 = '400'" in output and "x.fits" in output
    assert "Traceback" not in output
    log = (tmp_path / "out" / ".cutana" / "logs" / "split_catalogue.log").read_text()
    assert "Traceback" in log and "row 0 = '400'" in log


def test_the_rules_run_the_job_module_with_the_interpreter_running_snakemake(tmp_path):
    make_demo_survey(
        tmp_path / "demo", n_tiles=1, tile_size=256, n_sources=4, max_diameter_pixel=64
    )
    (tmp_path / "config.yaml").write_text(json.dumps(tiny_demo_config(tmp_path / "demo")))
    completed = subprocess.run(
        snakemake_command(tmp_path, "--dry-run", "--printshellcmds"),
        capture_output=True, text=True,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-3000:]
    commands = [
        line.removeprefix("Shell command: ")
        for line in completed.stdout.splitlines()
        if "cutana.workflow_jobs" in line
    ]
    expected = f"{shlex.quote(sys.executable)} -m cutana.workflow_jobs "
    assert commands and all(command.startswith(expected) for command in commands), commands
