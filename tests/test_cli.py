"""The ``cutana`` command line (SPEC §1).

Fast tests call :func:`cutana.cli.main` in-process. The slow test installs the package
*non-editable* (``pip install .``) into a fresh virtual environment and runs the console script
from a temporary directory, so it proves that the wheel ships the workflow and that nothing
depends on the repository checkout or the current directory.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pandas as pd
import pytest
import yaml

from cutana.cli import main
from cutana.config import default_config_dict

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- in-process
def test_config_prints_every_default_as_yaml_and_toml(capsys):
    assert main(["config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out) == default_config_dict()
    assert main(["config", "--format", "toml"]) == 0
    printed = tomllib.loads(capsys.readouterr().out)
    # TOML has no null: exactly the keys whose default is None are left out.
    assert printed["normalisation"]["percentile"] == 99.8
    assert printed["channel_weights"] == {"PRIMARY": [1.0]}
    assert "source_catalogue" not in printed


def test_run_with_invalid_config_exits_2_naming_key_value_and_range(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("target_resolution: 8\noutput_dir: out\n")
    assert main(["run", str(config)]) == 2
    error = capsys.readouterr().err
    assert "'target_resolution' = 8" in error and "[16, 2048]" in error
    assert not (tmp_path / "out").exists()


def test_run_with_missing_or_unparsable_config_exits_2(tmp_path, capsys):
    assert main(["run", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml does not exist" in capsys.readouterr().err
    broken = tmp_path / "broken.toml"
    broken.write_text("target_resolution = = 3\n")
    assert main(["run", str(broken)]) == 2
    assert "broken.toml" in capsys.readouterr().err


def test_arguments_after_double_dash_only_for_run(capsys):
    assert main(["config", "--", "--dry-run"]) == 2
    assert "only accepted by `cutana run`" in capsys.readouterr().err


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    pytest.importorskip("cutana.demo")
    out = tmp_path_factory.mktemp("cli-demo") / "demo"
    assert (
        main(["demo", "--out", str(out), "--tiles", "1", "--size", "256", "--sources", "20"]) == 0
    )
    return out


def test_demo_writes_a_survey_and_a_runnable_config(demo_dir):
    catalogue = pd.read_csv(demo_dir / "catalogue.csv")
    assert len(catalogue) == 20
    config = yaml.safe_load((demo_dir / "cutana_config.yaml").read_text())
    assert config["source_catalogue"] == str(demo_dir / "catalogue.csv")
    assert config["output_dir"] == str(demo_dir / "cutana_output")
    assert len(config["channel_weights"]) == 4


def test_validate_prints_a_summary_for_a_good_catalogue(demo_dir, capsys):
    pytest.importorskip("cutana.inputs_check")
    code = main(
        [
            "validate",
            str(demo_dir / "catalogue.csv"),
            "--config",
            str(demo_dir / "cutana_config.yaml"),
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert "valid" in out and "n_sources: 20" in out
    # Without --config, one band per catalogue path is assumed.
    assert main(["validate", str(demo_dir / "catalogue.csv")]) == 0


def test_validate_reports_bad_rows_and_exits_1(demo_dir, tmp_path, capsys):
    pytest.importorskip("cutana.inputs_check")
    frame = pd.read_csv(demo_dir / "catalogue.csv")
    frame.loc[2, "Dec"] = -95.0
    bad = tmp_path / "bad.csv"
    frame.to_csv(bad, index=False)
    code = main(["validate", str(bad), "--config", str(demo_dir / "cutana_config.yaml")])
    error = capsys.readouterr().err
    assert code == 1
    assert "Dec" in error and "-95" in error


def test_validate_reports_config_and_catalogue_problems_together(demo_dir, tmp_path, capsys):
    frame = pd.read_csv(demo_dir / "catalogue.csv")
    frame.loc[2, "Dec"] = -95.0
    bad = tmp_path / "bad.csv"
    frame.to_csv(bad, index=False)
    config = yaml.safe_load((demo_dir / "cutana_config.yaml").read_text())
    config["target_resolution"] = 3
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(config))
    code = main(["validate", str(bad), "--config", str(tmp_path / "bad.yaml")])
    error = capsys.readouterr().err
    assert code == 1
    assert "row 2 = '-95.0'" in error
    assert "'target_resolution' = 3" in error


# --------------------------------------------------------------------------- installed wheel
@pytest.fixture(scope="module")
def installed_venv(tmp_path_factory):
    """A venv with cutana installed non-editable from this checkout (deps from the system)."""
    pytest.importorskip("hatchling")
    venv = tmp_path_factory.mktemp("venv") / "env"
    subprocess.run(
        [sys.executable, "-m", "venv", "--system-site-packages", str(venv)],
        check=True,
        capture_output=True,
    )
    python = venv / "bin" / "python"
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-q", str(REPO)],
        capture_output=True,
        text=True,
    )
    assert install.returncode == 0, install.stderr
    return venv


def _run_cli(venv: Path, args: list[str], cwd: Path, timeout: float = 300):
    env = dict(os.environ, PATH=f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}")
    env.pop("PYTHONPATH", None)
    return subprocess.run(
        [str(venv / "bin" / "cutana"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.slow
def test_installed_cli_runs_the_packaged_workflow_from_any_directory(installed_venv, tmp_path):
    python = installed_venv / "bin" / "python"
    where = subprocess.run(
        [str(python), "-c", "import cutana.paths as p; print(p.snakefile())"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    # The non-editable install uses the workflow copy inside the package, not the checkout.
    assert Path(where).is_relative_to(installed_venv)
    assert Path(where).name == "Snakefile" and Path(where).is_file()

    demo = _run_cli(
        installed_venv,
        ["demo", "--out", "survey", "--tiles", "1", "--size", "256", "--sources", "24"],
        tmp_path,
    )
    assert demo.returncode == 0, demo.stderr
    config = yaml.safe_load((tmp_path / "survey" / "cutana_config.yaml").read_text())
    config.update(
        output_dir="results",  # relative: resolved against the directory of `cutana run`
        target_resolution=16,
        N_batch_cutout_process=12,  # two batches: the progress bar has steps to show
        gallery={"n_samples": 4},
        memory={"profile_sources": 5},
    )
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config, sort_keys=False))

    validate = _run_cli(
        installed_venv, ["validate", "survey/catalogue.csv", "--config", "run.yaml"], tmp_path
    )
    assert validate.returncode == 0, validate.stderr
    assert "n_sources: 24" in validate.stdout

    run = _run_cli(installed_venv, ["run", "run.yaml", "--cores", "2"], tmp_path)
    log = tmp_path / "results" / ".cutana" / "logs" / "snakemake.log"
    assert run.returncode == 0, run.stderr + (log.read_text() if log.exists() else "")
    assert "completed: 24/24 sources" in run.stdout
    assert "sources" in run.stderr  # the progress bar
    mapping = pd.read_parquet(tmp_path / "results" / "source_to_zarr_mapping.parquet")
    assert len(mapping) == 24
    assert (tmp_path / "results" / "run_summary.json").is_file()
    assert f"--snakefile {where}" in log.read_text().splitlines()[0]
    assert not (REPO / "results").exists()

    again = _run_cli(installed_venv, ["run", "run.yaml"], tmp_path)
    assert again.returncode == 0, again.stderr
    assert "completed: 24/24 sources" in again.stdout

    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(dict(config, normalisation_method="sqrt")))
    failed = _run_cli(installed_venv, ["run", "bad.yaml"], tmp_path)
    assert failed.returncode == 2
    assert "'normalisation_method' = 'sqrt'" in failed.stderr
