"""The Python API (SPEC §8): configuration, Orchestrator run/progress/stop/resume, preview.

Three groups of tests:

* configuration: every key of the upstream configuration table with its upstream default and
  range, TOML round trip, validation messages;
* the Orchestrator driving a small *fake* Snakefile (fast, deterministic: progress counting,
  failures, extra Snakemake arguments, DataFrame catalogues);
* the Orchestrator driving the real packaged workflow on a tiny synthetic demo survey
  (run, progress, stop mid-run, resume, outputs equal to an uninterrupted run, preview).
"""

from __future__ import annotations

import json
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

import cutana
import cutana.orchestrator as orchestrator_module
from cutana import (
    ConfigValidationError,
    Orchestrator,
    get_default_config,
    load_config_toml,
    save_config_toml,
)
from cutana.config import validate_config
from cutana.progress_report import ProgressReport

# --------------------------------------------------------------------------- configuration

#: The upstream README's configuration table: key -> default (SPEC §8). ``normalisation.a`` is
#: method-dependent (tested separately); crop sizes have no default ("-" upstream).
UPSTREAM_DEFAULTS = {
    "name": "cutana_run",
    "log_level": "INFO",
    "console_log_level": "WARNING",
    "source_catalogue": None,
    "output_dir": "cutana_output",
    "output_format": "zarr",
    "data_type": "float32",
    "max_workers": 16,
    "N_batch_cutout_process": 1000,
    "max_workflow_time_seconds": 1354571,
    "target_resolution": 256,
    "padding_factor": 1.0,
    "normalisation_method": "linear",
    "interpolation": "bilinear",
    "fits_extensions": ["PRIMARY"],
    "selected_extensions": [],
    "available_extensions": [],
    "apply_flux_conversion": True,
    "flux_conversion_keywords.AB_zeropoint": "MAGZERO",
    "user_flux_conversion_function": None,
    "normalisation.percentile": 99.8,
    "normalisation.n_samples": 1000,
    "normalisation.contrast": 0.25,
    "normalisation.crop_enable": False,
    "normalisation.crop_width": None,
    "normalisation.crop_height": None,
    "channel_weights": {"PRIMARY": [1.0]},
    "tracking_file": "workflow_tracking.json",
    "config_file": None,
    "loadbalancer.memory_safety_margin": 0.15,
    "loadbalancer.memory_poll_interval": 3,
    "loadbalancer.memory_peak_window": 30,
    "loadbalancer.main_process_memory_reserve_gb": 4.0,
    "loadbalancer.initial_workers": 1,
    "loadbalancer.max_sources_per_process": 150000,
    "loadbalancer.log_interval": 30,
    "loadbalancer.event_log_file": None,
    "ui.preview_samples": 10,
    "ui.preview_size": 256,
    "ui.auto_regenerate_preview": True,
}

#: Numeric ranges of the upstream table: key -> (minimum, maximum, is_integer).
UPSTREAM_RANGES = {
    "max_workers": (1, 1024, True),
    "N_batch_cutout_process": (10, 10000, True),
    "max_workflow_time_seconds": (600, 5000000, True),
    "target_resolution": (16, 2048, True),
    "padding_factor": (0.25, 10.0, False),
    "normalisation.percentile": (0, 100, False),
    "normalisation.a": (0.001, 10000.0, False),
    "normalisation.n_samples": (100, 10000, True),
    "normalisation.contrast": (0.01, 1.0, False),
    "normalisation.crop_width": (0, 5000, True),
    "normalisation.crop_height": (0, 5000, True),
    "loadbalancer.memory_safety_margin": (0.01, 0.5, False),
    "loadbalancer.memory_poll_interval": (1, 60, True),
    "loadbalancer.memory_peak_window": (10, 300, True),
    "loadbalancer.main_process_memory_reserve_gb": (0.5, 10.0, False),
    "loadbalancer.initial_workers": (1, 8, True),
    "loadbalancer.log_interval": (5, 300, True),
    "ui.preview_samples": (1, 50, True),
    "ui.preview_size": (16, 512, True),
}

UPSTREAM_CHOICES = {
    "log_level": ["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL", "TRACE"],
    "console_log_level": ["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL", "TRACE"],
    "output_format": ["zarr", "fits"],
    "data_type": ["float32", "uint8"],
    "normalisation_method": ["linear", "log", "asinh", "zscale", "none"],
    "interpolation": ["bilinear", "nearest", "cubic", "lanczos"],
}


def _get(config, dotted: str):
    node = config
    for part in dotted.split("."):
        node = node[part]
    return node


def _with(dotted: str, value) -> dict:
    """A partial config setting one (possibly nested) key."""
    parts = dotted.split(".")
    override: dict = {parts[-1]: value}
    for part in reversed(parts[:-1]):
        override = {part: override}
    return override


@pytest.mark.parametrize("key", sorted(UPSTREAM_DEFAULTS))
def test_default_config_has_every_upstream_key_with_its_default(key):
    config = get_default_config()
    assert _get(config.toDict(), key) == UPSTREAM_DEFAULTS[key]


def test_default_config_is_a_dotmap_with_attribute_access_and_our_fill_value():
    config = get_default_config()
    assert config.normalisation.percentile == 99.8
    assert config.flux_conversion_keywords.AB_zeropoint == "MAGZERO"
    assert config.fill_value == 0.0


@pytest.mark.parametrize(
    ("method", "expected_a"), [("asinh", 0.7), ("log", 1000.0), ("linear", None)]
)
def test_stretch_parameter_a_defaults_follow_the_method_unless_set(method, expected_a):
    from cutana.config import stretch_a

    assert stretch_a(validate_config({"normalisation_method": method})) == expected_a
    chosen = validate_config({"normalisation_method": method, "normalisation": {"a": 3.0}})
    assert stretch_a(chosen) == 3.0


@pytest.mark.parametrize("key", sorted(UPSTREAM_RANGES))
def test_ranges_accept_the_bounds_and_reject_values_outside(key):
    low, high, is_integer = UPSTREAM_RANGES[key]
    step = 1 if is_integer else (high - low) * 1e-3
    for accepted in (low, high):
        assert _get(validate_config(_with(key, accepted)), key) == accepted
    for rejected in (low - step, high + step):
        with pytest.raises(ConfigValidationError) as info:
            validate_config(_with(key, rejected))
        message = str(info.value)
        assert f"'{key}'" in message
        assert repr(rejected) in message
        assert str(low) in message and str(high) in message


@pytest.mark.parametrize("key", sorted(UPSTREAM_CHOICES))
def test_choice_keys_accept_every_documented_value_and_reject_others(key):
    for value in UPSTREAM_CHOICES[key]:
        assert validate_config(_with(key, value))[key] == value
    with pytest.raises(ConfigValidationError) as info:
        validate_config(_with(key, "bogus"))
    assert f"'{key}'" in str(info.value) and "'bogus'" in str(info.value)


def test_validation_message_names_key_value_and_range():
    with pytest.raises(ConfigValidationError) as info:
        validate_config({"target_resolution": 8, "padding_factor": 20.0})
    message = str(info.value)
    assert "'target_resolution' = 8" in message and "[16, 2048]" in message
    assert "'padding_factor' = 20.0" in message and "[0.25, 10.0]" in message


@pytest.mark.parametrize("weight", [float("inf"), float("nan")])
def test_non_finite_channel_weight_is_rejected_before_any_work(weight):
    with pytest.raises(ConfigValidationError) as info:
        validate_config({"channel_weights": {"VIS": [1.0], "NIR_H": [weight]}})
    message = str(info.value)
    assert "'channel_weights.NIR_H'" in message and repr(weight) in message


def test_unknown_keys_are_kept_with_a_warning():
    with pytest.warns(UserWarning, match="tagret_resolution"):
        config = validate_config({"tagret_resolution": 64})
    assert config["target_resolution"] == 256


def test_orchestrator_rejects_an_invalid_config_before_doing_anything(tmp_path):
    config = get_default_config()
    config.output_dir = str(tmp_path / "out")
    config.max_workers = 0
    with pytest.raises(ConfigValidationError, match="max_workers"):
        Orchestrator(config)
    assert not (tmp_path / "out").exists()


def test_toml_round_trip_keeps_every_value(tmp_path):
    config = get_default_config()
    config.output_dir = str(tmp_path / "cutouts")
    config.normalisation_method = "asinh"
    config.normalisation.a = 0.3
    config.channel_weights = {"VIS": [1.0, 0.0, 0.5], "NIR_H": [0.0, 1.0, 0.3]}
    config.normalisation.crop_enable = True
    config.normalisation.crop_width = 32
    config.normalisation.crop_height = 24
    path = save_config_toml(config, tmp_path / "sub" / "cutana_config.toml")
    assert path == str(tmp_path / "sub" / "cutana_config.toml")
    loaded = load_config_toml(path)
    assert loaded.toDict() == config.toDict()
    # Key order of channel_weights is the band order: it must survive the round trip.
    assert list(loaded.channel_weights) == ["VIS", "NIR_H"]
    assert validate_config(loaded) == validate_config(config)


def test_toml_load_fills_missing_keys_with_defaults(tmp_path):
    path = tmp_path / "partial.toml"
    path.write_text("target_resolution = 64\n[normalisation]\npercentile = 95.0\n")
    loaded = load_config_toml(path)
    assert loaded.target_resolution == 64
    assert loaded.normalisation.percentile == 95.0
    assert loaded.normalisation.n_samples == 1000
    assert loaded.output_format == "zarr"


def test_package_exports_the_upstream_names():
    for name in ("Orchestrator", "get_default_config", "save_config_toml", "load_config_toml"):
        assert hasattr(cutana, name)
    from cutana.catalogue_preprocessor import (  # noqa: F401
        CatalogueValidationError,
        load_and_validate_catalogue,
    )


# --------------------------------------------------------------------------- fake workflow

#: A stand-in for the packaged Snakefile: writes the files the Orchestrator reads (manifest,
#: one status table per batch, merged index, summary) with a configurable delay per batch.
FAKE_SNAKEFILE = textwrap.dedent(
    """
    import json

    OUT = config["output_dir"]
    WORK = OUT + "/.cutana"
    N_BATCHES = int(config.get("fake_batches", 4))
    ROWS = 5
    SLEEP = float(config.get("fake_sleep", 0))
    FAIL = str(config.get("fake_fail", ""))
    NAMES = [f"{i:05d}_fake{i}" for i in range(N_BATCHES)]
    WRITE_STATUS = (
        "import pyarrow as pa, pyarrow.parquet as pq, sys; "
        "pq.write_table(pa.table({{'status': ['ok'] * 4 + ['no_overlap']}}), sys.argv[1])"
    )

    rule all:
        input: OUT + "/source_to_zarr_mapping.parquet"

    rule manifest:
        output: WORK + "/batches/manifest.json"
        run:
            batches = [{"name": n, "index": i, "n_sources": ROWS} for i, n in enumerate(NAMES)]
            with open(output[0], "w") as handle:
                json.dump({"total_rows": N_BATCHES * ROWS, "batches": batches}, handle)

    rule batch:
        input: WORK + "/batches/manifest.json"
        output: WORK + "/status/{batch}.parquet"
        params: fail=FAIL
        shell:
            "sleep " + str(SLEEP) + " && "
            "if [ -n '{params.fail}' ]; then "
            "python -c 'raise ValueError(\\"{params.fail}\\")'; fi && "
            "python -c \\"" + WRITE_STATUS + "\\" {output}"

    rule merge:
        input: expand(WORK + "/status/{batch}.parquet", batch=NAMES)
        output: OUT + "/source_to_zarr_mapping.parquet"
        run:
            import pyarrow as pa, pyarrow.parquet as pq
            pq.write_table(pa.table({"status": ["ok"] * (N_BATCHES * ROWS)}), output[0])
            counts = {"ok": 4 * N_BATCHES, "partial": 0, "no_overlap": N_BATCHES, "failed": 0}
            with open(OUT + "/run_summary.json", "w") as handle:
                json.dump({"counts": counts}, handle)
    """
)


@pytest.fixture
def fake_workflow(tmp_path, monkeypatch):
    """Point the Orchestrator at the fake Snakefile; returns a config factory."""
    snakefile = tmp_path / "fake" / "Snakefile"
    snakefile.parent.mkdir()
    snakefile.write_text(FAKE_SNAKEFILE)
    monkeypatch.setattr(orchestrator_module, "snakefile", lambda: snakefile)
    monkeypatch.chdir(tmp_path)
    catalogue = tmp_path / "catalogue.csv"
    catalogue.write_text("SourceID,RA,Dec,diameter_pixel,fits_file_paths\n")

    def make_config(**overrides):
        config = get_default_config()
        config.output_dir = "out"
        config.source_catalogue = "catalogue.csv"
        config.max_workers = 2
        for key, value in overrides.items():
            config[key] = value
        return config

    return make_config


def test_fake_run_completes_and_reports_counts_and_paths(fake_workflow, tmp_path):
    orchestrator = Orchestrator(fake_workflow(), snakemake_args=["--config", "fake_batches=3"])
    result = orchestrator.run()
    assert result["status"] == "completed", result["error"]
    assert result["error"] is None
    assert result["total_sources"] == 15
    assert result["completed_batches"] == 3 and result["total_batches"] == 3
    mapping = tmp_path / "out" / "source_to_zarr_mapping.parquet"
    assert result["mapping_csv"] == result["mapping_path"] == str(mapping)
    assert result["counts"] == {"ok": 12, "partial": 0, "no_overlap": 3, "failed": 0}
    assert result["n_ok"] == 12 and result["n_no_overlap"] == 3
    # The run config handed to Snakemake holds absolute paths and the validated values.
    with open(tmp_path / "out" / ".cutana" / "run_config.yaml") as handle:
        import yaml

        run_config = yaml.safe_load(handle)
    assert run_config["output_dir"] == str(tmp_path / "out")
    assert run_config["source_catalogue"] == str(tmp_path / "catalogue.csv")
    assert run_config["normalisation"]["percentile"] == 99.8
    progress = orchestrator.get_progress()
    assert progress["completed_sources"] == progress["total_sources"] == 15
    assert progress["status_counts"]["no_overlap"] == 3
    assert not orchestrator.can_resume()


def test_fake_run_command_maps_workers_memory_and_quiet(fake_workflow):
    orchestrator = Orchestrator(fake_workflow(max_workers=1, console_log_level="ERROR"))
    command = orchestrator.snakemake_command()
    assert command[command.index("--cores") + 1] == "1"
    assert command[command.index("--directory") + 1] == str(Path.cwd())
    assert "--rerun-incomplete" in command and "--quiet" in command
    memory = int(command[command.index("--resources") + 1].removeprefix("mem_mb="))
    assert 512 <= memory <= orchestrator_module.psutil.virtual_memory().total / 2**20
    verbose = Orchestrator(fake_workflow(console_log_level="INFO"), profile="slurm")
    command = verbose.snakemake_command()
    assert "--quiet" not in command and "--resources" not in command
    # The shipped SLURM profile is found by name from any directory.
    slurm_profile = Path(command[command.index("--profile") + 1])
    assert slurm_profile == cutana.paths.workflow_root() / "profiles" / "slurm"
    assert orchestrator_module.resolve_profile("my/own/profile") == "my/own/profile"


def test_fake_run_failure_reports_the_script_error(fake_workflow):
    orchestrator = Orchestrator(
        # One batch: failing jobs running at once print into the same console log, and their
        # tracebacks can interleave character runs.
        fake_workflow(),
        snakemake_args=["--config", "fake_fail=bad value in row 3", "fake_batches=1"],
    )
    result = orchestrator.run()
    assert result["status"] == "failed"
    assert "ValueError: bad value in row 3" in result["error"]
    assert orchestrator.get_progress_for_ui().errors == [result["error"]]


def test_missing_catalogue_fails_with_a_message_naming_it(fake_workflow, tmp_path):
    result = Orchestrator(fake_workflow(source_catalogue="nope.csv")).run()
    assert result["status"] == "failed"
    assert str(tmp_path / "nope.csv") in result["error"]


def test_fake_progress_while_running_stop_and_resume(fake_workflow, tmp_path):
    reports = []
    orchestrator = Orchestrator(
        fake_workflow(max_workers=1),
        status_panel=reports.append,
        snakemake_args=["--config", "fake_batches=6", "fake_sleep=1"],
        poll_interval=0.2,
    )
    started = orchestrator.start_processing(wait=False)
    assert started["status"] == "running"
    assert orchestrator.is_running()
    deadline = time.time() + 60
    while orchestrator.get_progress()["completed_batches"] < 2 and time.time() < deadline:
        time.sleep(0.1)
    report = orchestrator.get_progress_for_ui()
    assert report.status == "running"
    assert report.total_sources == 30 and report.total_batches == 6
    assert report.completed_sources == 5 * report.completed_batches
    assert 0 < report.progress_percent < 100
    assert report.throughput > 0 and report.eta_seconds > 0
    assert 0 < report.memory_used_gb < report.memory_total_gb

    stopped = orchestrator.stop_processing()
    assert stopped["stopped_processes"] and stopped["status"] == "stopped"
    assert not any(orchestrator_module.psutil.pid_exists(p) for p in stopped["stopped_processes"])
    result = orchestrator.wait()
    assert result["status"] == "stopped"
    assert reports and reports[-1].status == "stopped"
    done_before = result["completed_batches"]
    # With one core at most one job runs; Snakemake deletes the output of that job even if it
    # was already written (not yet registered as finished), so at least one of two remains.
    assert 1 <= done_before < 6
    assert orchestrator.can_resume()

    resumed = Orchestrator(
        fake_workflow(max_workers=2), snakemake_args=["--config", "fake_batches=6"]
    )
    assert resumed.can_resume()
    result = resumed.run()
    assert result["status"] == "completed", result["error"]
    assert result["completed_batches"] == 6
    # Throughput counts only this run's batches, not those found finished at the start.
    assert resumed._sources_before_start == 5 * done_before


def test_get_progress_for_ui_override_and_empty_state(fake_workflow):
    orchestrator = Orchestrator(fake_workflow())
    report = orchestrator.get_progress_for_ui()
    assert isinstance(report, ProgressReport)
    assert report.status == "idle" and report.total_sources == 0
    assert report.progress_percent == 0.0 and report.eta_seconds is None
    assert report.memory_total_gb > 0
    assert set(report.to_dict()) >= {
        "progress_percent",
        "completed_sources",
        "total_sources",
        "throughput",
        "eta_seconds",
        "memory_used_gb",
        "memory_total_gb",
        "cpu_percent",
        "status",
    }
    orchestrator.run()
    assert orchestrator.get_progress_for_ui(completed_sources=10).progress_percent == 50.0
    assert orchestrator.stop_processing()["stopped_processes"] == []


def test_dataframe_catalogue_is_written_as_parquet_with_absolute_path_lists(
    fake_workflow, tmp_path
):
    frame = pd.DataFrame(
        {
            "SourceID": ["a", "b"],
            "RA": [1.0, 2.0],
            "Dec": [3.0, 4.0],
            "diameter_pixel": [10, 12],
            "fits_file_paths": ["['x.fits', '/abs/y.fits']", '["x.fits", "/abs/y.fits"]'],
        }
    )
    orchestrator = Orchestrator(fake_workflow(source_catalogue=None))
    result = orchestrator.start_processing(frame)
    assert result["status"] == "completed", result["error"]
    written = tmp_path / "out" / ".cutana" / "input_catalogue.parquet"
    table = pd.read_parquet(written)
    expected = [str(tmp_path / "x.fits"), "/abs/y.fits"]
    assert [list(paths) for paths in table["fits_file_paths"]] == [expected, expected]
    # Unchanged content keeps the file (and its mtime) so a rerun does not redo the split.
    mtime = written.stat().st_mtime_ns
    time.sleep(0.05)
    orchestrator.start_processing(frame)
    assert written.stat().st_mtime_ns == mtime


def test_run_continues_a_stopped_dataframe_run(fake_workflow, tmp_path):
    frame = pd.DataFrame(
        {"SourceID": ["a"], "RA": [1.0], "Dec": [3.0], "diameter_pixel": [10],
         "fits_file_paths": ["['x.fits']"]}
    )  # fmt: skip
    config = fake_workflow(max_workers=1, source_catalogue=None)
    slow = ["--config", "fake_batches=6", "fake_sleep=0.5"]
    orchestrator = Orchestrator(config, snakemake_args=slow, poll_interval=0.2)
    orchestrator.start_processing(frame, wait=False)
    deadline = time.time() + 60
    while orchestrator.get_progress()["completed_batches"] < 2 and time.time() < deadline:
        time.sleep(0.1)
    orchestrator.stop_processing()
    assert orchestrator.wait()["status"] == "stopped"
    assert orchestrator.can_resume()
    # As can_resume() promises, run() continues it: the DataFrame was kept in output_dir.
    result = Orchestrator(config, snakemake_args=["--config", "fake_batches=6"]).run()
    assert result["status"] == "completed", result["error"]
    assert result["completed_batches"] == 6


def test_a_failed_run_logs_its_error(fake_workflow, tmp_path, caplog):
    config = fake_workflow(source_catalogue="missing.csv")
    with caplog.at_level("ERROR", logger="cutana.orchestrator"):
        result = Orchestrator(config).run()
    assert result["status"] == "failed"
    assert f"the run failed: {result['error']}" in caplog.text
    assert "missing.csv" in caplog.text


def test_a_profile_whose_executor_plugin_is_missing_fails_before_the_run(fake_workflow, tmp_path):
    profile = tmp_path / "cluster"
    profile.mkdir()
    (profile / "config.yaml").write_text("executor: nosuchcluster\njobs: 10\n")
    result = Orchestrator(fake_workflow(), profile=str(profile)).run()
    assert result["status"] == "failed"
    assert "pip install snakemake-executor-plugin-nosuchcluster" in result["error"]
    assert not (tmp_path / "out" / ".cutana" / "logs" / "snakemake.log").exists()


def test_error_from_log_prefers_the_script_exception(tmp_path):
    log = tmp_path / "snakemake.log"
    log.write_text(
        "Traceback (most recent call last):\n"
        '  File "x.py", line 3, in <module>\n'
        "cutana.exceptions.CatalogueValidationError: Invalid catalogue x.csv:\n"
        "  - column 'RA', rows [3]: value 400.0 is outside [0, 360)\n"
        "\n"
        "RuleException:\n"
        "CalledProcessError in file Snakefile, line 3:\n"
        "Command 'python x.py' returned non-zero exit status 1.\n"
    )
    message = orchestrator_module.error_from_log(log)
    assert message.startswith("CatalogueValidationError: Invalid catalogue x.csv:")
    assert "value 400.0 is outside [0, 360)" in message
    assert "CalledProcessError" not in message


CLUSTER_RUN_FAILED = (
    "Submitted job 1 with external jobid '12'.\n"
    "Trying to restart job 1.\n"
    "Exiting because a job execution failed. Look above for error messages\n"
    "WorkflowError:\nAt least one job did not complete successfully.\n"
)


def test_a_cluster_runs_error_comes_from_the_failed_jobs_log(tmp_path):
    # On a cluster the jobs' output is in the scheduler's files: Snakemake's own log has only
    # its generic WorkflowError; the rule's log: file has the job's exception.
    logs = tmp_path / "logs"
    (logs / "cutout_batch").mkdir(parents=True)
    (logs / "snakemake.log").write_text(CLUSTER_RUN_FAILED)
    (logs / "cutout_batch" / "00000_abc.log").write_text("INFO cutout_batch finished in 1 s\n")
    (logs / "split_catalogue.log").write_text(
        "ERROR cutana.workflow.split_catalogue: split_catalogue failed\n"
        "Traceback (most recent call last):\n"
        '  File "catalogue.py", line 1430, in split_catalogue\n'
        "cutana.exceptions.CatalogueValidationError: catalogue 'bad.csv' is invalid:\n"
        "  - column 'RA': value is outside [0, 360) in 1 row: row 2 = '400.0'\n"
    )
    message = orchestrator_module.error_from_log(logs / "snakemake.log", job_logs=logs)
    assert message.startswith("CatalogueValidationError: catalogue 'bad.csv' is invalid:")
    assert "row 2 = '400.0'" in message and "split_catalogue.log" in message
    # Job logs older than the run are not this run's.
    late = time.time() + 60
    old = orchestrator_module.error_from_log(logs / "snakemake.log", job_logs=logs, since=late)
    assert old.startswith("WorkflowError")


def test_a_cluster_runs_memory_kills_are_named(tmp_path):
    log = tmp_path / "snakemake.log"
    log.write_text(CLUSTER_RUN_FAILED)
    slurm_logs = tmp_path / "slurm_logs" / "rule_cutout_batch" / "00000_abc"
    slurm_logs.mkdir(parents=True)
    (slurm_logs / "148.log").write_text(
        "slurmstepd-vm: error: StepId=148.batch exceeded memory limit (171012096 > 62914560), "
        "being killed\n"
    )
    message = orchestrator_module.error_from_log(
        log, job_logs=tmp_path / "logs", scheduler_logs=tmp_path / "slurm_logs"
    )
    assert message.startswith("1 cluster job(s) were killed for exceeding their memory")
    assert "148.log" in message and "memory.safety_factor" in message


# --------------------------------------------------------------------------- real workflow

# 20 batches: enough jobs for a stop to land mid-run however fast each job is (of 4, a reused
# warm worker finished all before the stop of the resume test took effect).
N_SOURCES = 200
BATCH = 10


@pytest.fixture(scope="module")
def demo_survey(tmp_path_factory):
    """A tiny 4-band demo survey: one 256-pixel tile, 200 sources of 8-24 pixels."""
    demo = pytest.importorskip("cutana.demo")
    pytest.importorskip("cutana.engine")
    out = tmp_path_factory.mktemp("demo")
    catalogue = demo.make_demo_survey(
        out, n_tiles=1, tile_size=256, n_sources=N_SOURCES, seed=7,
        min_diameter_pixel=8, max_diameter_pixel=24,
    )  # fmt: skip
    return out, Path(catalogue)


def _demo_config(demo_survey, output_dir: Path):
    from cutana.demo import demo_config

    out, _ = demo_survey
    config = get_default_config()
    config.update(demo_config(out))
    config.output_dir = str(output_dir)
    config.target_resolution = 16
    config.N_batch_cutout_process = BATCH
    config.max_workers = 2
    config.normalisation_method = "asinh"
    config.gallery.n_samples = 4
    config.memory.profile_sources = 5
    return config


def _read_outputs(output_dir: Path) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """The merged index (without timestamps) and every batch's image array."""
    import zarr

    mapping = pd.read_parquet(output_dir / "source_to_zarr_mapping.parquet")
    images = {}
    for folder in sorted(output_dir.glob("batch_cutout_process_*")):
        images[folder.name] = np.asarray(
            zarr.open_group(folder / "images.zarr", mode="r")["images"]
        )
    return mapping.sort_values("SourceID").reset_index(drop=True), images


@pytest.fixture(scope="module")
def uninterrupted_run(demo_survey, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("full") / "out"
    # Snakemake keeps its state (.snakemake/) in the Orchestrator's working directory: use a
    # temporary one, not the checkout the tests run from.
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(output_dir.parent)
        orchestrator = Orchestrator(_demo_config(demo_survey, output_dir))
    result = orchestrator.run()
    return orchestrator, result, output_dir


@pytest.mark.slow
def test_real_run_completes_with_one_index_row_per_source(uninterrupted_run, demo_survey):
    orchestrator, result, output_dir = uninterrupted_run
    assert result["status"] == "completed", result["error"]
    assert result["total_sources"] == N_SOURCES
    assert result["completed_batches"] == result["total_batches"] >= N_SOURCES // BATCH
    mapping = pd.read_parquet(result["mapping_csv"])
    catalogue = pd.read_csv(demo_survey[1])
    assert len(mapping) == N_SOURCES
    assert sorted(mapping["SourceID"].astype(str)) == sorted(catalogue["SourceID"].astype(str))
    assert sum(result["counts"].values()) == N_SOURCES
    assert result["counts"]["ok"] > 0
    summary = json.loads((output_dir / "run_summary.json").read_text())
    assert result["run_summary"] == summary
    progress = orchestrator.get_progress_for_ui()
    assert progress.status == "completed" and progress.progress_percent == 100.0
    assert progress.eta_seconds == 0.0
    assert not orchestrator.can_resume()


@pytest.mark.slow
def test_real_stop_mid_run_then_resume_equals_uninterrupted(
    uninterrupted_run, demo_survey, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    output_dir = tmp_path / "out"
    config = _demo_config(demo_survey, output_dir)
    config.max_workers = 1  # one batch at a time, so the stop lands between batches
    orchestrator = Orchestrator(config, poll_interval=0.2)
    orchestrator.start_processing(wait=False)
    deadline = time.time() + 120
    # Stop after two batches: the one running at the stop may lose its outputs (Snakemake
    # deletes the outputs of jobs it has not registered as finished), the other stays.
    while orchestrator.get_progress()["completed_batches"] < 2 and time.time() < deadline:
        assert orchestrator.is_running(), orchestrator.result
        time.sleep(0.1)
    stopped = orchestrator.stop_processing()
    assert stopped["stopped_processes"]
    result = orchestrator.wait()
    assert result["status"] == "stopped"
    assert 1 <= result["completed_batches"] < result["total_batches"]
    assert not (output_dir / "source_to_zarr_mapping.parquet").exists()
    assert not list(output_dir.glob("*.tmp-*"))
    # Every batch folder on disk is complete: its images match its metadata rows.
    import zarr

    for folder in output_dir.glob("batch_cutout_process_*"):
        metadata = pd.read_parquet(folder / "images_metadata.parquet")
        images = zarr.open_group(folder / "images.zarr", mode="r")["images"]
        assert images.shape[0] == len(metadata)
    assert Orchestrator(config).can_resume()

    resumed = Orchestrator(_demo_config(demo_survey, output_dir))
    final = resumed.run()
    assert final["status"] == "completed", final["error"]
    mapping, images = _read_outputs(output_dir)
    _, _, full_dir = uninterrupted_run
    full_mapping, full_images = _read_outputs(full_dir)
    columns = [c for c in full_mapping.columns if c not in ("zarr_file",)]
    pd.testing.assert_frame_equal(mapping[columns], full_mapping[columns])
    assert images.keys() == full_images.keys()
    for name in images:
        np.testing.assert_array_equal(images[name], full_images[name])


@pytest.mark.slow
def test_real_invalid_catalogue_fails_naming_row_and_column(demo_survey, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    frame = pd.read_csv(demo_survey[1]).head(12)
    frame.loc[3, "RA"] = 400.0
    bad = tmp_path / "bad.csv"
    frame.to_csv(bad, index=False)
    config = _demo_config(demo_survey, tmp_path / "out")
    config.source_catalogue = str(bad)
    result = Orchestrator(config).run()
    assert result["status"] == "failed"
    assert "RA" in result["error"] and "400" in result["error"]
    assert not list((tmp_path / "out").glob("batch_cutout_process_*"))


def _zarr_path(output_dir: Path, zarr_file: str) -> Path:
    """The images.zarr named by an index row (absolute, or relative to the output folder)."""
    path = Path(zarr_file)
    path = path if path.is_absolute() else output_dir / path
    return path if path.name == "images.zarr" else path / "images.zarr"


def test_preview_matches_the_run_output(uninterrupted_run, demo_survey):
    from cutana.preview import preview_cutouts

    orchestrator, result, output_dir = uninterrupted_run
    assert result["status"] == "completed", result["error"]
    config = _demo_config(demo_survey, output_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        images, source_ids = preview_cutouts(str(demo_survey[1]), config, n=3)
    assert images.shape == (3, 16, 16, 3) and images.dtype == np.float32
    assert len(source_ids) == 3
    mapping = pd.read_parquet(result["mapping_path"]).set_index("SourceID")
    import zarr

    for image, source_id in zip(images, source_ids, strict=True):
        row = mapping.loc[source_id]
        assert row["status"] in ("ok", "partial")
        stored = zarr.open_group(_zarr_path(output_dir, row["zarr_file"]), mode="r")["images"]
        np.testing.assert_allclose(image, stored[row["idx_in_zarr"]], atol=1e-6)
    config.ui.preview_samples = 2
    default_n, _ = preview_cutouts(pd.read_csv(demo_survey[1]), config)
    assert len(default_n) == 2
    # A DataFrame whose paths are relative to its catalogue's folder, used from elsewhere.
    relative = pd.read_csv(demo_survey[1])
    relative["fits_file_paths"] = [
        json.dumps([Path(p).name for p in json.loads(paths)])
        for paths in relative["fits_file_paths"]
    ]
    same, same_ids = preview_cutouts(relative, config, n=3, base_dir=demo_survey[0])
    assert same_ids == source_ids
    np.testing.assert_array_equal(same, images)


def test_status_tables_are_read_from_metadata_only_once(fake_workflow, tmp_path):
    orchestrator = Orchestrator(fake_workflow(), snakemake_args=["--config", "fake_batches=2"])
    orchestrator.run()
    status_dir = tmp_path / "out" / ".cutana" / "status"
    assert len(orchestrator._status_table_cache) == 2
    # A stale table from another catalogue (not in the manifest) is not counted.
    pq.write_table(pq.read_table(next(status_dir.glob("*.parquet"))), status_dir / "stale.parquet")
    assert orchestrator.get_progress()["completed_batches"] == 2


def test_killed_run_leaves_no_lock_and_reruns(fake_workflow):
    args = ["--config", "fake_batches=3", "fake_sleep=1"]
    orchestrator = Orchestrator(fake_workflow(max_workers=1), snakemake_args=args)
    orchestrator.start_processing(wait=False)
    deadline = time.time() + 60
    while orchestrator.get_progress()["total_batches"] == 0 and time.time() < deadline:
        time.sleep(0.1)
    # No grace time: Snakemake is killed (SIGKILL) before it can release its lock.
    stopped = orchestrator.stop_processing(timeout=0.0)
    assert stopped["killed"] and orchestrator.wait()["status"] == "stopped"
    result = Orchestrator(fake_workflow(), snakemake_args=args).run()
    assert result["status"] == "completed", result["error"]
