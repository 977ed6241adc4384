# ruff: noqa: E501 -- README snippets are kept verbatim, long lines included
"""Every code example of the upstream Cutana README runs as written (SPEC §8).

The snippets below are copied from ``reference/cutana-readme.txt`` and executed with ``exec`` in
a directory holding a tiny synthetic survey, so the README's relative paths (``sources.csv``,
``cutouts_output/``) are real. The only edits, each marked with ``# EDIT``:

* ``output_path/batch_cutout_process_*/...``: the ``*`` stands for a batch folder name (neither
  pandas nor zarr expands globs in local paths), so the path is replaced by a real batch folder;
* ``int x  # larger than 1, ...`` is pseudo-code for "an integer x": it becomes ``x = 32``;
* snippets run in page order in one namespace, like notebook cells, so a later snippet may use
  ``config`` or an import from an earlier one; ``save_config_toml`` is imported first because
  the README uses it in the normalisation section before the section that imports it.
"""

from __future__ import annotations

import shutil
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cutana.config import validate_config

PROGRAMMATIC_API = """
import pandas as pd
from cutana import get_default_config, Orchestrator

# Configure processing
config = get_default_config()
config.source_catalogue = "sources.csv" # See format below
config.output_dir = "cutouts_output/"
config.output_format = "zarr" # or "fits"
config.target_resolution = 256
config.selected_extensions = ["VIS"] # Extensions to process
# 1 output channel for VIS, details explained below
config.channel_weights = {
"VIS": [1.0],
}
config.console_log_level = "INFO" # Show INFO logs in console

# Process cutouts
orchestrator = Orchestrator(config)
results = orchestrator.run()
"""

CHANNEL_WEIGHTS = """
# Configure channel weights (ordered dictionary format)
config.channel_weights = {
"VIS": [1.0, 0.0, 0.5], # RGB weights for VIS band
"NIR_H": [0.0, 1.0, 0.3], # RGB weights for NIR H-band
"NIR_J": [0.0, 0.0, 0.8] # RGB weights for NIR J-band
}
"""

NORMALISATION = """
config = get_default_config()

# Set normalisation method
config.normalisation_method = "asinh" # "linear", "log", "asinh", "zscale"

# Configure normalisation parameters (method-specific defaults applied automatically)
config.normalisation.percentile = 99.8 # Data clipping percentile
config.normalisation.a = 0.7 # Transition parameter (asinh/log)
config.normalisation.n_samples = 1000 # ZScale samples
config.normalisation.contrast = 0.25 # ZScale contrast
"""

SAVE_TOML = """
config_path = save_config_toml(config, f"{config.output_dir}/cutana_config.toml")
"""

STRETCHES = {
    "linear": """
from cutana import get_default_config
config = get_default_config()
config.normalisation_method = "linear"
config.normalisation.percentile = 99.8 # Percentile clipping (default)
""",
    "asinh": """
from cutana import get_default_config
config = get_default_config()
config.normalisation_method = 'asinh'
config.normalisation.percentile = 99.8 # Percentile clipping (default)
config.normalisation.a = 0.7 # Transition parameter (default for asinh)
""",
    "log": """
from cutana import get_default_config
config = get_default_config()
config.normalisation_method = 'log'
config.normalisation.percentile = 99.8 # Percentile clipping (default)
config.normalisation.a = 1000.0 # Scale factor (default for log)
""",
    "zscale": """
from cutana import get_default_config
config = get_default_config()
config.normalisation_method = 'zscale'
config.normalisation.percentile = 99.8 # Percentile clipping (default)
config.normalisation.n_samples = 1000 # Number of samples (default)
config.normalisation.contrast = 0.25 # Contrast parameter (default)
""",
}

CROP = """
x = 32  # EDIT: README reads `int x # larger than 1, smaller than config.target_resolution`
config.normalisation.crop_enable=True
config.normalisation.crop_height = x
config.normalisation.crop_width = x
"""

METADATA = """
import pandas as pd
metadata=pd.read_parquet("output_path/batch_cutout_process_*/images_metadata.parquet", engine='pyarrow')
"""

ZARR_IMAGES = """
# Open the images
import zarr
# File: a dictionary that contains "images" of shape n_images,H,W,C
file = zarr.open("output_path/batch_cutout_process_*/images.zarr", mode='r')
print(list(file.keys()))

# Example plots
from matplotlib import pyplot as plt
import numpy as np
fig, axes = plt.subplots(4, 4, figsize=(8, 8))
for ax in axes.flatten():
    index=np.random.randint(0, file['images'].shape[0])
    image = file['images'][index]
    ax.imshow(image, cmap='gray',origin="lower")
    ax.axis('off')
plt.tight_layout()
plt.show()
"""

START_PROCESSING = """
import pandas as pd
from cutana import Orchestrator, get_default_config

# Load your source catalogue
catalogue_df = pd.read_csv("sources.csv")

# Configure processing
config = get_default_config()
config.output_dir = "cutouts_output/"
config.output_format = "zarr"
config.target_resolution = 256
config.selected_extensions = ["VIS", "NIR_H", "NIR_J"]
config.channel_weights = {
"VIS": [1.0, 0.0, 0.5],
"NIR_H": [0.0, 1.0, 0.3],
"NIR_J": [0.0, 0.0, 0.8]
}

# Process cutouts
orchestrator = Orchestrator(config)
result = orchestrator.start_processing(catalogue_df)
"""

RUN = """
config = get_default_config()
config.source_catalogue = "sources.csv"
config.output_dir = "cutouts_output/"

orchestrator = Orchestrator(config)
result = orchestrator.run()
"""

PROGRESS = """
progress = orchestrator.get_progress()
print(f"Completed: {progress['completed_sources']}/{progress['total_sources']}")
"""

PROGRESS_FOR_UI = """
from cutana.progress_report import ProgressReport

progress_report = orchestrator.get_progress_for_ui()
print(f"Progress: {progress_report.progress_percent:.1f}%")
print(f"Memory: {progress_report.memory_used_gb:.1f}/{progress_report.memory_total_gb:.1f} GB")
"""

STOP = """
result = orchestrator.stop_processing()
print(f"Stopped {len(result['stopped_processes'])} processes")
"""

CAN_RESUME = """
if orchestrator.can_resume():
    print("Previous workflow can be resumed")
"""

CONFIG_FUNCTIONS = """
from cutana import get_default_config

config = get_default_config()
config.output_dir = "my_cutouts/"
config.target_resolution = 512

from cutana import save_config_toml

config_path = save_config_toml(config, "cutana_config.toml")

from cutana import load_config_toml

config = load_config_toml("cutana_config.toml")
"""

LOAD_CATALOGUE = """
from cutana.catalogue_preprocessor import load_and_validate_catalogue

try:
    catalogue_df = load_and_validate_catalogue("sources.csv")
    print(f"Loaded {len(catalogue_df)} sources")
except CatalogueValidationError as e:
    print(f"Validation error: {e}")
"""

N_SOURCES = 10


def _make_survey(directory: Path, bands: tuple[str, ...]) -> Path:
    """A tiny survey in ``directory`` with its catalogue copied to ``sources.csv``."""
    demo = pytest.importorskip("cutana.demo")
    pytest.importorskip("cutana.engine")
    catalogue = demo.make_demo_survey(
        directory, n_tiles=1, tile_size=256, n_sources=N_SOURCES, seed=11, bands=bands,
        min_diameter_pixel=8, max_diameter_pixel=24,
    )  # fmt: skip
    shutil.copy(catalogue, directory / "sources.csv")
    return directory


def _exec(snippet: str, namespace: dict) -> dict:
    exec(compile(textwrap.dedent(snippet), "<README snippet>", "exec"), namespace)
    return namespace


def _batch_folder(output_dir: Path) -> str:
    folders = sorted(output_dir.glob("batch_cutout_process_*"))
    assert folders, f"no batch folder in {output_dir}"
    return str(folders[0])


@pytest.fixture
def vis_survey(tmp_path, monkeypatch):
    """One band (VIS), as the README's first example expects; the README's relative paths
    resolve in this directory."""
    _make_survey(tmp_path, ("VIS",))
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def rgb_survey(tmp_path, monkeypatch):
    """Three bands in the README's channel_weights order: VIS, NIR_H, NIR_J."""
    _make_survey(tmp_path, ("VIS", "NIR_H", "NIR_J"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.slow
def test_programmatic_api_run_then_metadata_and_progress_snippets(vis_survey):
    namespace = _exec(PROGRAMMATIC_API, {})
    results = namespace["results"]
    assert results["status"] == "completed", results["error"]
    assert results["total_sources"] == N_SOURCES
    output_dir = vis_survey / "cutouts_output"
    assert Path(results["mapping_csv"]).is_file()

    batch = _batch_folder(output_dir)
    metadata_snippet = METADATA.replace("output_path/batch_cutout_process_*", batch)  # EDIT
    metadata = _exec(metadata_snippet, namespace)["metadata"]
    for column in ("source_id", "ra", "dec", "idx_in_zarr", "diameter_arcsec", "diameter_pixel"):
        assert column in metadata.columns
    import zarr

    images = zarr.open_group(Path(batch) / "images.zarr", mode="r")["images"]
    assert images.shape == (len(metadata), 256, 256, 1)

    _exec(PROGRESS, namespace)
    _exec(PROGRESS_FOR_UI, namespace)
    _exec(CAN_RESUME, namespace)
    _exec(STOP, namespace)
    assert namespace["result"]["stopped_processes"] == []  # nothing left running
    assert namespace["progress"]["completed_sources"] == N_SOURCES

    namespace = _exec(RUN, namespace)  # default channel_weights: one PRIMARY band
    assert namespace["result"]["status"] == "completed", namespace["result"]["error"]

    _exec(LOAD_CATALOGUE, namespace)
    assert len(namespace["catalogue_df"]) == N_SOURCES


@pytest.mark.slow
def test_start_processing_with_channel_weights_then_zarr_plot_snippet(rgb_survey):
    import matplotlib

    matplotlib.use("Agg")  # plt.show() of the snippet must not need a display
    namespace = _exec(START_PROCESSING, {})
    result = namespace["result"]
    assert result["status"] == "completed", result["error"]
    assert result["total_sources"] == N_SOURCES
    mapping = pd.read_parquet(result["mapping_path"])
    assert len(mapping) == N_SOURCES

    batch = _batch_folder(rgb_survey / "cutouts_output")
    zarr_snippet = ZARR_IMAGES.replace("output_path/batch_cutout_process_*", batch)  # EDIT
    namespace = _exec(zarr_snippet, namespace)
    images = namespace["file"]["images"]
    assert images.shape[1:] == (256, 256, 3)
    assert np.isfinite(np.asarray(images)).all()


def test_configuration_snippets_give_valid_configs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    from cutana import get_default_config, save_config_toml

    namespace = {"get_default_config": get_default_config, "save_config_toml": save_config_toml}
    _exec(NORMALISATION, namespace)
    _exec(CHANNEL_WEIGHTS, namespace)
    validated = validate_config(namespace["config"])
    assert validated["normalisation_method"] == "asinh"
    assert list(validated["channel_weights"]) == ["VIS", "NIR_H", "NIR_J"]
    _exec(SAVE_TOML, namespace)
    assert namespace["config_path"] == "cutana_output/cutana_config.toml"
    assert (tmp_path / "cutana_output" / "cutana_config.toml").is_file()

    for method, snippet in STRETCHES.items():
        namespace = _exec(snippet, {})
        validated = validate_config(namespace["config"])
        assert validated["normalisation_method"] == method
        _exec(CROP, namespace)
        validated = validate_config(namespace["config"])
        assert validated["normalisation"]["crop_width"] == 32

    namespace = _exec(CONFIG_FUNCTIONS, {})
    assert namespace["config"].target_resolution == 512
    assert namespace["config"].output_dir == "my_cutouts/"
    assert (tmp_path / "cutana_config.toml").is_file()
