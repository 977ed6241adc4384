"""Widget-level tests of the cutana UI: every step's logic, driven without a browser."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("ipywidgets")

from astropy.io import fits  # noqa: E402
from astropy.wcs import WCS  # noqa: E402
from PIL import Image  # noqa: E402

import cutana_ui  # noqa: E402
from cutana.progress_report import ProgressReport  # noqa: E402
from cutana_ui.app import CutanaApp, default_weights  # noqa: E402
from cutana_ui.catalogue_info import analyse, find_catalogues, parse_path_list  # noqa: E402
from cutana_ui.render import (  # noqa: E402
    format_eta,
    png_bytes,
    to_display_rgb,
    weights_to_colour,
)


# --------------------------------------------------------------------------- fixtures
def _write_band(path: Path, band: str, scale_arcsec: float, extension: str | None) -> None:
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = [150.0, 2.0]
    wcs.wcs.crpix = [32.5, 32.5]
    wcs.wcs.cdelt = [-scale_arcsec / 3600.0, scale_arcsec / 3600.0]
    header = wcs.to_header()
    header["FILTER"] = band
    data = np.random.default_rng(len(band)).normal(size=(64, 64)).astype(np.float32)
    if extension is None:
        fits.PrimaryHDU(data, header=header).writeto(path)
    else:
        fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(data, header, name=extension)]).writeto(path)


@pytest.fixture
def tiny_survey(tmp_path: Path) -> Path:
    """Two bands (g in PRIMARY at 0.2"/px, r in an SCI extension at 0.4"/px), 5 sources."""
    g = tmp_path / "tile_g.fits"
    r = tmp_path / "tile_r.fits"
    _write_band(g, "g", 0.2, None)
    _write_band(r, "r", 0.4, "SCI")
    rows = [
        {
            "SourceID": f"S{i}",
            "RA": 150.0 + 0.0005 * (i - 2),
            "Dec": 2.0,
            "diameter_pixel": 16 + i,
            "fits_file_paths": json.dumps([str(g), str(r)]),
        }
        for i in range(5)
    ]
    path = tmp_path / "cat.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


class FakePreview:
    """Records calls; returns images whose pixels depend on the normalisation percentile."""

    def __init__(self, delay: float = 0.0):
        self.calls: list[dict] = []
        self.delay = delay

    def __call__(self, catalogue, cfg, n):
        self.calls.append(cfg)
        time.sleep(self.delay)
        t = cfg["target_resolution"]
        c = len(next(iter(cfg["channel_weights"].values())))
        level = cfg["normalisation"]["percentile"] / 100.0
        images = np.full((n, t, t, c), level, dtype=np.float32)
        return images, list(catalogue["SourceID"])[:n]


def make_app(path: Path, **kwargs) -> CutanaApp:
    kwargs.setdefault("preview_fn", FakePreview())
    kwargs.setdefault("debounce_seconds", 0.05)
    app = CutanaApp(catalogue=str(path), output_dir=str(path.parent / "out"), **kwargs)
    assert app.wait_for_preview(10)
    return app


# --------------------------------------------------------------------------- render helpers
def test_display_rgb_grey_rgb_and_uint8():
    grey = np.linspace(0, 1, 4, dtype=np.float32).reshape(2, 2, 1)
    out = to_display_rgb(grey)
    assert out.shape == (2, 2, 3) and out.dtype == np.uint8
    assert out[1, 1].tolist() == [255, 255, 255] and out[0, 0].tolist() == [0, 0, 0]
    rgb = np.zeros((2, 2, 3), np.float32)
    rgb[..., 2] = 0.5
    assert to_display_rgb(rgb)[0, 0].tolist() == [0, 0, 128]
    assert to_display_rgb(np.full((2, 2, 1), 255, np.uint8))[0, 0].tolist() == [255] * 3


def test_display_rescales_unnormalised_and_blanks_nan():
    raw = np.array([[-5.0, 5.0], [np.nan, 0.0]], dtype=np.float32)[..., None]
    out = to_display_rgb(raw)[..., 0]
    assert out.tolist() == [[0, 255], [0, 128]]


def test_png_bytes_roundtrip_and_resize():
    img = np.random.default_rng(0).random((8, 8, 3)).astype(np.float32)
    data = png_bytes(img, size=32)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    import io

    assert Image.open(io.BytesIO(data)).size == (32, 32)


def test_weights_to_colour():
    assert weights_to_colour([1.0, 0.0, 0.0]) == "#ff0000"
    assert weights_to_colour([0.0, 0.5, 1.0]) == "#0080ff"
    assert weights_to_colour([2.0, -1.0, 0.0]) == "#ff0000"  # clipped for display only
    assert weights_to_colour([0.5]) == "#808080"


def test_format_eta():
    assert format_eta(None) == "–"
    assert format_eta(12.4) == "12s"
    assert format_eta(185) == "3m 05s"
    assert format_eta(3720) == "1h 02m"


def test_default_weights():
    assert default_weights(1, 1) == [[1.0]]
    assert default_weights(3, 3) == [[1, 0, 0], [0, 1, 0], [0, 0, 1]]
    four = default_weights(4, 3)
    assert all(sum(row) == 1.0 for row in four)
    assert {int(np.argmax(row)) for row in four} == {0, 1, 2}  # every channel gets a band


# --------------------------------------------------------------------------- step 1 and 2
def test_find_catalogues_lists_csv_and_parquet_only(tmp_path):
    (tmp_path / "a.csv").write_text("x\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.parquet").write_bytes(b"")
    (tmp_path / "sub" / "images_metadata.parquet").write_bytes(b"")
    (tmp_path / "x.zarr").mkdir()
    (tmp_path / "x.zarr" / "c.csv").write_text("x\n")
    (tmp_path / "notes.txt").write_text("x\n")
    found = find_catalogues(tmp_path)
    assert found == [str(tmp_path / "a.csv"), str(tmp_path / "sub" / "b.parquet")]
    assert find_catalogues(tmp_path / "missing") == []


def test_parse_path_list_is_data_only():
    assert parse_path_list('["a.fits", "b.fits"]') == ["a.fits", "b.fits"]
    assert parse_path_list("['a.fits']") == ["a.fits"]
    assert parse_path_list(np.array(["x", "y"])) == ["x", "y"]
    # An expression is never evaluated: it stays an (unusable) literal path.
    assert parse_path_list("__import__('os').getcwd()") == ["__import__('os').getcwd()"]


def test_analyse_reports_sources_files_bands_scales(tiny_survey):
    info = analyse(tiny_survey)
    assert info.ok, info.problems
    assert info.n_sources == 5 and info.n_files == 2
    assert [b.name for b in info.bands] == ["g", "r"]
    assert info.bands[0].extensions == ["PRIMARY"] and info.bands[1].extensions == ["SCI"]
    assert info.bands[0].pixel_scale_arcsec == pytest.approx(0.2)
    assert info.bands[1].pixel_scale_arcsec == pytest.approx(0.4)
    assert info.size_column == "diameter_pixel" and info.size_range == (16.0, 20.0)
    html = info.to_html()
    assert "No validation problems" in html and "0.4" in html and "SCI" in html


def test_analyse_lists_problems_instead_of_raising(tmp_path, tiny_survey):
    df = pd.read_csv(tiny_survey)
    df.loc[1, "fits_file_paths"] = json.dumps([str(tmp_path / "gone.fits"), "also_gone.fits"])
    bad = tmp_path / "bad.csv"
    df.to_csv(bad, index=False)
    info = analyse(bad)
    assert not info.ok
    assert any("gone.fits" in p for p in info.problems)
    assert "Problems" in info.to_html()
    missing = analyse(tmp_path / "nope.csv")
    assert missing.dataframe is None and "does not exist" in missing.problems[0]


def test_load_catalogue_sets_up_bands_and_previews(tiny_survey):
    app = make_app(tiny_survey)
    assert [row.name.value for row in app.band_rows] == ["g", "r"]
    assert [row.extension.value for row in app.band_rows] == ["PRIMARY", "SCI"]
    assert app.n_channels.value == 3
    assert len(app.preview_images) == 5  # min(ui.preview_samples=10, 5 sources)
    assert "Sources" in app.summary.value and "5" in app.summary.value
    # The pre-filled folder was scanned and the catalogue is in the dropdown.
    assert str(tiny_survey) in app.catalogue_dropdown.options


def test_dropdown_choice_loads_catalogue(tiny_survey, tmp_path):
    app = CutanaApp(catalogue="", preview_fn=FakePreview(), debounce_seconds=0.05, auto_load=False)
    app.catalogue_dir.value = str(tmp_path)
    assert str(tiny_survey) in app.scan_catalogues()
    app.catalogue_dropdown.value = str(tiny_survey)
    assert app.catalogue_path.value == str(tiny_survey)
    assert app.info is not None and app.info.n_sources == 5
    assert app.wait_for_preview(10)


# --------------------------------------------------------------------------- step 3
def test_current_config_reflects_widgets(tiny_survey):
    app = make_app(tiny_survey)
    app.band_rows[0].weights[2].value = 0.7
    app.band_rows[1].name.value = "rband"
    app.target_resolution.value = 48
    app.normalisation_method.value = "asinh"
    app.data_type.value = "uint8"
    app.output_format.value = "fits"
    cfg = app.current_config()
    assert cfg["channel_weights"] == {"g": [1.0, 0.0, 0.7], "rband": [0.0, 1.0, 0.5]}
    assert cfg["fits_extensions"] == ["PRIMARY", "SCI"]
    assert cfg["target_resolution"] == 48 and cfg["data_type"] == "uint8"
    assert cfg["output_format"] == "fits"
    assert cfg["normalisation"]["a"] is None  # "method default" means unset in the config
    assert app.a_value.value == pytest.approx(0.7)  # ...and the field shows asinh's default
    app.a_auto.value = False
    app.a_value.value = 2.5
    app.crop_enable.value = True
    app.crop_width.value = 20
    app.crop_height.value = 30
    norm = app.current_config()["normalisation"]
    assert (
        norm["a"] == 2.5
        and norm["crop_enable"]
        and (norm["crop_width"], norm["crop_height"])
        == (
            20,
            30,
        )
    )
    app.close()


def test_config_errors_name_the_problem(tiny_survey):
    app = make_app(tiny_survey)
    app.band_rows[1].name.value = "g"
    with pytest.raises(ValueError, match="unique"):
        app.current_config()
    app.band_rows[1].name.value = "r"
    app.crop_enable.value = True
    app.crop_width.value = 4000  # larger than the target resolution
    with pytest.raises(ValueError, match="crop_width"):
        app.current_config()
    app.close()


def test_parameter_visibility_follows_method(tiny_survey):
    app = make_app(tiny_survey)
    app.normalisation_method.value = "zscale"
    assert app.percentile.layout.display == "none"
    assert app.n_samples.layout.display is None and app.contrast.layout.display is None
    assert app.a_value.layout.display == "none"
    app.normalisation_method.value = "log"
    assert app.a_value.layout.display is None and app.a_value.value == 1000.0
    assert app.n_samples.layout.display == "none"
    app.close()


def test_swatch_follows_weights_and_channel_count(tiny_survey):
    app = make_app(tiny_survey)
    row = app.band_rows[1]
    assert row.colour() == "#00ff80"
    row.weights[0].value = 1.0
    row.weights[2].value = 0.0
    assert row.colour() == "#ffff00" and "#ffff00" in row.swatch.value
    app.n_channels.value = 1
    assert all(len(r.weights) == 1 for r in app.band_rows)
    assert app.band_rows[1].weight_values() == [1.0]  # channel 0 weight kept
    assert list(app.current_config()["channel_weights"].values()) == [[1.0], [1.0]]
    app.close()


def test_save_and_load_config_toml(tiny_survey, tmp_path):
    app = make_app(tiny_survey)
    app.band_rows[0].weights[1].value = 0.25
    app.normalisation_method.value = "zscale"
    app.contrast.value = 0.4
    app.target_resolution.value = 32
    saved = app.save_config(str(tmp_path / "ui.toml"))
    expected = app.current_config()
    app.close()

    other = CutanaApp(preview_fn=FakePreview(), debounce_seconds=0.05, auto_load=False)
    other.load_config(saved)
    assert other.wait_for_preview(10)
    assert other.current_config() == expected
    assert other.catalogue_path.value == str(tiny_survey)
    assert "Loaded" in other.config_message.value
    other.close()


def test_check_inputs_uses_chosen_hdus(tiny_survey):
    app = make_app(tiny_survey)
    app.apply_flux_conversion.value = False  # the tiny files have no MAGZERO
    # The bands have different pixel scales, so pixel sizes are ambiguous: reported.
    assert not app.check_inputs()
    assert "diameter_arcsec" in app.check_message.value
    df = pd.read_csv(tiny_survey).rename(columns={"diameter_pixel": "diameter_arcsec"})
    df["diameter_arcsec"] *= 0.2
    df.to_csv(tiny_survey, index=False)
    app.load_catalogue()
    app.apply_flux_conversion.value = False
    assert app.check_inputs(), app.check_message.value
    assert "Inputs OK: 5 sources, 2 FITS files" in app.check_message.value
    assert "0.2, 0.4" in app.check_message.value
    # Band r has its image in SCI only: asking for PRIMARY must be reported with the file.
    app.band_rows[1].extension.options = ["PRIMARY", "SCI"]
    app.band_rows[1].extension.value = "PRIMARY"
    assert not app.check_inputs()
    assert "tile_r.fits" in app.check_message.value
    app.close()


# --------------------------------------------------------------------------- step 4
def test_preview_is_debounced_and_updates_images(tiny_survey):
    fake = FakePreview()
    app = make_app(tiny_survey, preview_fn=fake, debounce_seconds=0.3)
    assert len(fake.calls) == 1  # the initial preview after loading
    before = app.preview_images[0].value
    # Typing 9, 95, 95.5 quickly must give one preview with the final value.
    for value in (9.0, 95.0, 95.5):
        app.percentile.value = value
    assert app.wait_for_preview(10)
    assert len(fake.calls) == 2
    assert fake.calls[-1]["normalisation"]["percentile"] == 95.5
    assert app.preview_images[0].value != before
    assert sorted(app.last_preview_ids) == ["S0", "S1", "S2", "S3", "S4"]
    assert "Preview: 5 cutouts" in app.preview_status.value
    app.close()


def test_auto_preview_off_waits_for_refresh(tiny_survey):
    fake = FakePreview()
    app = make_app(tiny_survey, preview_fn=fake)
    app.auto_preview.value = False
    app.percentile.value = 90.0
    time.sleep(0.2)
    assert len(fake.calls) == 1
    app.refresh_preview()
    assert len(fake.calls) == 2
    app.close()


def test_preview_failure_is_shown(tiny_survey):
    def broken(catalogue, cfg, n):
        raise RuntimeError("engine exploded at row 3")

    app = make_app(tiny_survey, preview_fn=broken)
    assert "engine exploded at row 3" in app.preview_status.value
    assert app.last_preview_error == "engine exploded at row 3"
    app.close()


def test_preview_with_fewer_images_blanks_the_rest(tiny_survey):
    def two_only(catalogue, cfg, n):
        t = cfg["target_resolution"]
        return np.ones((2, t, t, 3), np.float32), ["S1", "S3"]

    app = make_app(tiny_survey, preview_fn=two_only)
    assert [lab.value for lab in app.preview_labels[:3]] == [
        "<small>S1</small>",
        "<small>S3</small>",
        "<small>–</small>",
    ]
    app.close()


def test_new_samples_reshuffles(tmp_path, tiny_survey):
    df = pd.read_csv(tiny_survey)
    big = pd.concat([df.assign(SourceID=df["SourceID"] + f"_{k}") for k in range(6)])
    path = tmp_path / "big.csv"
    big.to_csv(path, index=False)
    app = make_app(path)
    first = list(app.preview_sources["SourceID"])
    app.new_samples()
    assert app.wait_for_preview(10)
    assert list(app.preview_sources["SourceID"]) != first
    assert len(first) == 10
    app.close()


# --------------------------------------------------------------------------- step 5 and 6
class FakeOrchestrator:
    """Walks through running -> completed in ``steps`` polls and writes a gallery."""

    instances: list[FakeOrchestrator] = []

    def __init__(self, config, steps: int = 3):
        self.config = config
        self.steps = steps
        self.polls = 0
        self.stopped = threading.Event()
        self.started_with = None
        FakeOrchestrator.instances.append(self)

    def start_processing(self, catalogue, wait=True):
        assert wait is False  # the UI must never block the kernel
        self.started_with = catalogue
        return {"status": "running"}

    def get_progress_for_ui(self):
        self.polls += 1
        if self.stopped.is_set():
            status, done = "stopped", 2
        elif self.polls >= self.steps:
            status, done = "completed", 5
            out = Path(self.config.output_dir)
            out.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (20, 10), (200, 0, 0)).save(out / "gallery.png")
            (out / "run_summary.json").write_text(json.dumps({"counts": {"ok": 5}}))
        else:
            status, done = "running", self.polls
        return ProgressReport(
            progress_percent=100.0 * done / 5,
            completed_sources=done,
            total_sources=5,
            throughput=2.5,
            eta_seconds=(5 - done) / 2.5,
            memory_used_gb=3.0,
            memory_total_gb=24.0,
            status=status,
        )

    def stop_processing(self):
        self.stopped.set()
        return {"stopped_processes": []}


def test_run_progress_and_gallery(tiny_survey):
    app = make_app(tiny_survey, orchestrator_factory=FakeOrchestrator, poll_interval=0.01)
    app.start_run()
    assert app.start_button.disabled and not app.stop_button.disabled
    assert app.wait_for_run(10)
    orch = FakeOrchestrator.instances[-1]
    assert orch.started_with == str(tiny_survey)
    assert orch.config.channel_weights.g == [1.0, 0.0, 0.5]
    assert app.progress.value == 100.0 and app.progress.bar_style == "success"
    assert "completed" in app.run_status.value and "5/5 sources" in app.run_status.value
    assert "2.5 sources/s" in app.run_status.value and "24.0 GB" in app.run_status.value
    assert app.gallery.layout.display is None
    assert app.gallery.value == (Path(orch.config.output_dir) / "gallery.png").read_bytes()
    assert "ok: 5" in app.outputs.value and "run_summary.json" in app.outputs.value
    assert not app.start_button.disabled and app.stop_button.disabled


def test_run_progress_text_while_running(tiny_survey):
    app = make_app(
        tiny_survey, orchestrator_factory=lambda c: FakeOrchestrator(c, steps=100), poll_interval=5
    )
    app.start_run()
    app._stop_polling.set()  # drive the polls by hand
    app.wait_for_run(5)
    report = app.poll_progress()
    assert report.status == "running"
    assert app.progress.value == pytest.approx(40.0)
    assert "2/5 sources" in app.run_status.value and "ETA 1s" in app.run_status.value


def test_stop_run(tiny_survey):
    app = make_app(
        tiny_survey,
        orchestrator_factory=lambda c: FakeOrchestrator(c, steps=10**6),
        poll_interval=0.02,
    )
    app.start_run()
    with pytest.raises(RuntimeError, match="already"):
        app.start_run()
    app.stop_run()
    assert app.wait_for_run(10)
    assert FakeOrchestrator.instances[-1].stopped.is_set()
    assert "stopped" in app.run_status.value and app.progress.bar_style == "warning"
    assert not app.start_button.disabled


def test_start_requires_catalogue():
    app = CutanaApp(catalogue="", preview_fn=FakePreview(), auto_load=False)
    app.catalogue_path.value = ""
    with pytest.raises(ValueError, match="catalogue"):
        app.start_run()
    app.start_button.click()  # the button shows the same error next to the run controls
    assert "choose a catalogue first" in app.run_status.value
    assert app.orchestrator is None


# --------------------------------------------------------------------------- entry point
def test_start_scales_the_ui(tiny_survey, monkeypatch):
    monkeypatch.setenv("CUTANA_UI_CATALOGUE", str(tiny_survey))
    small = cutana_ui.start(ui_scale=0.5, preview_fn=FakePreview(), debounce_seconds=0.05)
    big = cutana_ui.start(ui_scale=2.0, preview_fn=FakePreview(), debounce_seconds=0.05)
    for app in (small, big):
        assert app.wait_for_preview(10)
        assert app.catalogue_path.value == str(tiny_survey) and app.info.n_sources == 5
    style_small = small.widget.children[0].value
    assert "--jp-widgets-font-size: 6.5px" in style_small
    assert "--jp-widgets-font-size: 26.0px" in big.widget.children[0].value
    assert small.preview_images[0].width == "64" and big.preview_images[0].width == "256"
    with pytest.raises(ValueError, match="ui_scale"):
        cutana_ui.start(ui_scale=0.0)


def test_notebook_calls_start():
    nb = json.loads((Path(__file__).parents[1] / "notebooks" / "cutana_ui.ipynb").read_text())
    code = "".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")
    assert "import cutana_ui" in code and "cutana_ui.start(" in code


# --------------------------------------------------------------------------- real engine
def test_real_preview_changes_with_normalisation(tmp_path):
    """The UI's default preview function is cutana's engine: parameters change the pixels."""
    pytest.importorskip("cutana.engine")
    from cutana.demo import demo_config, make_demo_survey

    catalogue = make_demo_survey(
        tmp_path / "demo",
        n_tiles=1,
        tile_size=128,
        n_sources=4,
        seed=3,
        bands=("VIS", "NIR_H"),
        min_diameter_pixel=16,
        max_diameter_pixel=24,
    )
    cfg = demo_config(tmp_path / "demo")
    cfg["channel_weights"] = {"VIS": [1.0, 0.0, 0.5], "NIR_H": [0.0, 1.0, 0.5]}
    cfg["target_resolution"] = 32
    cfg["output_dir"] = str(tmp_path / "out")
    app = CutanaApp(catalogue=str(catalogue), config=cfg, debounce_seconds=0.05)
    assert app.wait_for_preview(60)
    assert app.last_preview_error is None, app.last_preview_error
    assert app.last_preview_ids, app.preview_status.value
    before = app.preview_images[0].value
    app.percentile.value = 60.0
    assert app.wait_for_preview(60)
    assert app.last_preview_error is None
    assert app.preview_images[0].value != before
    app.close()
