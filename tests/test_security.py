"""Hostile inputs (SPEC §5): SourceIDs are data, not paths; config files are data, never code;
an output directory that cannot be written fails before any work, naming it.

The empty SourceID is a validation error (tests/test_catalogue.py); writers.safe_filename is
unit-tested in tests/test_writers.py. Here the same IDs go through the real workflow.
"""

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pandas as pd
import pytest
import yaml
from astropy.io import fits

from cutana import cli
from cutana.config import load_config_file, load_config_toml, save_config_toml, validate_config
from cutana.paths import snakefile
from cutana.preflight import OutputDirError, check_output_dir, check_output_dir_for

HOSTILE_IDS = [
    "../../x",
    "/etc/passwd",
    "..",
    ".",
    "~",
    "a/b",
    "a_b",
    "A_B",
    "a\\b",
    "x" * 400,
    "x" * 400 + "y",
    "ünïcødé-星系",
    "$(touch PWNED)",
    "-rf",
    "CON",
    "nul.txt",
    'quote"and,comma',
    "007",
    "7",
    "NA",
]


def snakemake(work_dir: Path, config: dict, *extra: str) -> subprocess.CompletedProcess:
    work_dir.mkdir(parents=True, exist_ok=True)
    (work_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    command = [
        sys.executable, "-m", "snakemake", "--snakefile", str(snakefile()),
        "--directory", str(work_dir), "--configfile", str(work_dir / "config.yaml"),
        "--cores", "2", *extra,
    ]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file() or p.is_symlink()}


@pytest.fixture(scope="module")
def hostile_fits_run(tmp_path_factory):
    """A FITS-output workflow run over a catalogue whose SourceIDs are all hostile."""
    from cutana.demo import demo_config, make_demo_survey

    root = tmp_path_factory.mktemp("hostile")
    catalogue = make_demo_survey(
        root / "demo", n_tiles=1, tile_size=300, n_sources=len(HOSTILE_IDS), seed=5,
        min_diameter_pixel=16, max_diameter_pixel=32,
    )  # fmt: skip
    frame = pd.read_csv(catalogue)
    frame["SourceID"] = HOSTILE_IDS
    frame.to_csv(root / "hostile.csv", index=False)
    config = {
        **demo_config(root / "demo"),
        "source_catalogue": str(root / "hostile.csv"),
        "output_dir": "out",
        "output_format": "fits",
        "target_resolution": 16,
        "N_batch_cutout_process": 100,
        "gallery": {"n_samples": 4},
        "memory": {"profile_sources": 5},
    }
    before = files_under(root)
    completed = snakemake(root / "work", config)
    assert completed.returncode == 0, (completed.stdout + completed.stderr)[-6000:]
    return root, before


@pytest.mark.slow
def test_hostile_source_ids_stay_inside_output_dir_and_never_collide(hostile_fits_run):
    root, before = hostile_fits_run
    work, out = root / "work", (root / "work" / "out").resolve()
    created = files_under(root) - before
    outside = [
        p for p in created
        if not (p.resolve().is_relative_to(out) or p.is_relative_to(work / ".snakemake"))
        and p != work / "config.yaml"
    ]  # fmt: skip
    assert not outside, f"files written outside output_dir: {outside}"
    assert not any(p.name == "PWNED" for p in files_under(root))  # `$(touch PWNED)` not run

    index = pd.read_parquet(out / "source_to_zarr_mapping.parquet")
    assert index["SourceID"].tolist() == HOSTILE_IDS  # IDs are data: "007", "NA" kept as text
    with_image = index[index["status"].isin(["ok", "partial"])]
    assert len(with_image) >= len(HOSTILE_IDS) - 2
    names = with_image["fits_file"].tolist()
    assert len({name.casefold() for name in names}) == len(names), "two IDs share a file"
    fits_files = sorted(p for p in out.glob("batch_cutout_process_*/*.fits"))
    assert len(fits_files) == len(names)
    for row in with_image.itertuples():
        path = (out / row.fits_file).resolve()
        assert path.parent.parent == out and path.name.endswith(".fits")
        assert not path.name.startswith(".")
        assert len(path.name.encode()) <= 255
        with fits.open(path) as hdul:
            assert hdul[0].header["SOURCE"] == row.SourceID.encode("ascii", "replace").decode()


# ------------------------------------------------------------------ config files are data
EVIL_YAML = """\
target_resolution: !!python/object/apply:os.system ["touch {marker}"]
"""
YTE_YAML = """\
__use_yte__: true
source_catalogue: {catalogue}
output_dir: {out}
channel_weights: {{VIS: [1.0]}}
evil: "?__import__('pathlib').Path('{marker}').touch()"
"""


def test_yaml_python_tags_are_rejected_by_the_cli(tmp_path, capsys):
    marker = tmp_path / "MARKER"
    config = tmp_path / "evil.yaml"
    config.write_text(EVIL_YAML.format(marker=marker))
    assert cli.main(["run", str(config)]) == cli.EXIT_USAGE
    error = capsys.readouterr().err
    assert str(config) in error and "python/object/apply" in error
    assert not marker.exists()
    with pytest.raises(yaml.constructor.ConstructorError):
        load_config_file(config)


@pytest.mark.slow
def test_yaml_python_tags_are_rejected_by_snakemake(tmp_path):
    marker = tmp_path / "MARKER"
    (tmp_path / "evil.yaml").write_text(EVIL_YAML.format(marker=marker))
    completed = subprocess.run(
        [
            sys.executable, "-m", "snakemake", "-n", "--snakefile", str(snakefile()),
            "--directory", str(tmp_path), "--configfile", str(tmp_path / "evil.yaml"),
        ],  # fmt: skip
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert completed.returncode != 0
    assert not marker.exists()


@pytest.mark.slow
def test_yte_template_in_a_config_is_not_evaluated_by_cutana_run(tmp_path):
    """Snakemake evaluates `?` values of a YAML config marked `__use_yte__`; `cutana run` (and
    the API) parse the file as data and hand Snakemake JSON, so nothing is executed."""
    from cutana.demo import make_demo_survey

    catalogue = make_demo_survey(
        tmp_path / "demo", n_tiles=1, tile_size=100, n_sources=3, seed=1, bands=("VIS",),
        min_diameter_pixel=8, max_diameter_pixel=16,
    )  # fmt: skip
    marker = tmp_path / "MARKER"
    config = tmp_path / "yte.yaml"
    config.write_text(YTE_YAML.format(catalogue=catalogue, out=tmp_path / "out", marker=marker))
    with pytest.warns(UserWarning, match="evil"):
        cli.main(["run", str(config), "--no-progress", "--", "-n"])
    assert not marker.exists()
    run_config = (tmp_path / "out" / ".cutana" / "run_config.yaml").read_text()
    assert run_config.lstrip().startswith("{")  # JSON: Snakemake never treats it as a template


def test_toml_strange_strings_are_just_data(tmp_path):
    strange = {
        "name": "'; rm -rf / # $(touch PWNED) `id` ${HOME} {batch} \\n \u202e",
        "output_dir": str(tmp_path / "out $HOME ~ `x`"),
    }
    path = tmp_path / "strange.toml"
    path.write_text(
        f"name = {tomllib_string(strange['name'])}\n"
        + f"output_dir = {tomllib_string(strange['output_dir'])}\n"
        + 'evil = "!!python/object/apply:os.system [\\"touch PWNED\\"]"\n'
    )
    with pytest.warns(UserWarning, match="evil"):
        loaded = validate_config(load_config_toml(path).toDict())
    assert loaded["name"] == strange["name"]
    assert loaded["output_dir"] == strange["output_dir"]
    saved = save_config_toml(loaded, tmp_path / "again.toml")
    assert tomllib.loads(Path(saved).read_text())["name"] == strange["name"]
    assert not list(tmp_path.rglob("PWNED")) and not Path("PWNED").exists()
    # A path with `$HOME` and `~` is a literal folder name, not expanded.
    assert check_output_dir(loaded["output_dir"]) == Path(strange["output_dir"])
    assert not Path(strange["output_dir"]).exists()  # the check creates nothing


def tomllib_string(value: str) -> str:
    """A TOML basic string holding ``value`` (JSON escaping is valid TOML)."""
    import json

    return json.dumps(value, ensure_ascii=True)


# ------------------------------------------------------------------ output directory preflight
def test_output_dir_under_a_file_is_refused_naming_it(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(OutputDirError, match=f"output_dir {blocker}/out cannot be created"):
        check_output_dir(blocker / "out")


def test_braces_in_paths_are_refused():
    cfg = {"output_dir": "out_{x}", "source_catalogue": "c.csv", "demo": {"dir": "demo"}}
    with pytest.raises(OutputDirError, match="output_dir = 'out_{x}' contains"):
        check_output_dir_for(cfg)


@pytest.fixture
def small_mount(tmp_path):
    """Mount a 1 MB tmpfs (root with mount rights only); yields a factory(options)."""
    mounted = []

    def mount(options: str) -> Path:
        target = tmp_path / f"mnt{len(mounted)}"
        target.mkdir()
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size=1m,{options}", "tmpfs", str(target)],
            capture_output=True,
        )
        if result.returncode != 0:
            pytest.skip("cannot mount a tmpfs here (needs root with mount rights)")
        mounted.append(target)
        return target

    yield mount
    for target in mounted:
        subprocess.run(["umount", str(target)], check=False)


def test_read_only_output_dir_is_refused(small_mount):
    target = small_mount("ro")
    with pytest.raises(OutputDirError, match=f"output_dir {target}/out is not writable.*Read-only"):
        check_output_dir(target / "out")


def test_full_disk_is_refused_before_any_work(small_mount, tmp_path):
    target = small_mount("rw")
    with pytest.raises(OutputDirError, match="only 1 MB free.*needs at least 64 MB"):
        check_output_dir(target / "out")
    # Really full: even the probe cannot be written.
    with open(target / "filler", "wb") as handle:
        try:
            handle.write(b"\0" * 2**21)
        except OSError:
            pass
    with pytest.raises(OutputDirError, match="disk is full"):
        check_output_dir(target)


@pytest.mark.slow
def test_workflow_and_api_fail_fast_on_an_unwritable_output_dir(small_mount, tmp_path):
    from cutana import Orchestrator

    target = small_mount("ro")
    config = {
        "source_catalogue": str(tmp_path / "missing.csv"),
        "output_dir": str(target / "out"),
        "channel_weights": {"VIS": [1.0]},
    }
    completed = snakemake(tmp_path / "work", config, "-n")
    assert completed.returncode != 0
    assert f"output_dir {target}/out is not writable" in completed.stdout + completed.stderr
    result = Orchestrator(config).run()
    assert result["status"] == "failed"
    assert f"output_dir {target}/out is not writable" in result["error"]
    assert os.listdir(target) == []
