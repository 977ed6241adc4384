"""The cutana UI in a real (headless, system) Chromium: as a Voila page and in JupyterLab.

Serves ``notebooks/cutana_ui.ipynb`` on a free port (``voila``, or ``jupyter lab`` with the
notebook's cell run by Shift+Enter) with a tiny demo survey pre-filled through
``CUTANA_UI_CATALOGUE``, then, like a user: picks the demo catalogue, changes a normalisation
parameter and checks that the preview image bytes change, starts a run, waits for it to
complete and finds the gallery. Screenshots go to ``test-artifacts/``.

Needs Debian's chromium (``bash tools/ui_browser_setup.sh``); skipped, with the reason shown,
only when no Chromium is installed. Playwright drives the system browser: it never downloads one.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytestmark = [pytest.mark.browser, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "cutana_ui.ipynb"
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None


CHROMIUM = _chromium()
if CHROMIUM is None:
    pytest.skip(
        "Chromium is not installed (run `bash tools/ui_browser_setup.sh`)",
        allow_module_level=True,
    )
playwright_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
pytest.importorskip("voila", reason="pip install voila (the [ui] extra)")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"the server exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
            )
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:
            return  # the server answers (any status): it is up
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"the server did not answer at {url} within {timeout} s:\n{log.read_text()}")


@pytest.fixture(scope="module")
def demo_survey(tmp_path_factory) -> Path:
    from cutana.demo import make_demo_survey

    root = tmp_path_factory.mktemp("ui_browser")
    # Two bands, 12 small sources: quick to preview and to run on two shared cores.
    return make_demo_survey(
        root / "survey",
        n_tiles=1,
        tile_size=160,
        n_sources=12,
        seed=7,
        bands=("VIS", "NIR_H"),
        min_diameter_pixel=16,
        max_diameter_pixel=40,
    )


def _ui_server(kind: str, demo_survey: Path, work: Path):
    """Serve the UI notebook with Voila or JupyterLab, pre-filled with the demo survey; yield
    what the tests need (its URL, the run's output folder, the server's log)."""
    from cutana import save_config_toml

    output_dir = work / "run_output"
    config = {
        "target_resolution": 48,
        "N_batch_cutout_process": 10,
        "max_workers": 2,
        "channel_weights": {"VIS": [1.0, 0.0, 0.5], "NIR_H": [0.0, 1.0, 0.5]},
        "ui": {"preview_samples": 4},
        "gallery": {"n_samples": 4},
    }
    config_path = save_config_toml(config, work / "ui_start.toml")
    port = _free_port()
    env = dict(
        os.environ,
        CUTANA_UI_CATALOGUE=str(demo_survey),
        CUTANA_UI_OUTPUT_DIR=str(output_dir),
        CUTANA_UI_CONFIG=config_path,
        # Keep Jupyter's runtime, settings and workspace files out of the user's home.
        JUPYTER_RUNTIME_DIR=str(work / "runtime"),
        JUPYTER_CONFIG_DIR=str(work / "jupyter_config"),
        JUPYTERLAB_SETTINGS_DIR=str(work / "lab_settings"),
        JUPYTERLAB_WORKSPACES_DIR=str(work / "lab_workspaces"),
        PYTHONUNBUFFERED="1",
    )
    base = f"http://127.0.0.1:{port}"
    if kind == "voila":
        cmd = [sys.executable, "-m", "voila", str(NOTEBOOK), "--no-browser", f"--port={port}"]
        cmd.append("--Voila.ip=127.0.0.1")
        # A static path answers without running the notebook: a cheap readiness probe.
        probe, url = f"{base}/voila/static/", f"{base}/"
    else:
        # The notebook as a user keeps it: in the folder JupyterLab serves.
        shutil.copy(NOTEBOOK, work / NOTEBOOK.name)
        cmd = [sys.executable, "-m", "jupyter", "lab", "--no-browser", f"--port={port}"]
        cmd += ["--ServerApp.ip=127.0.0.1", f"--ServerApp.root_dir={work}"]
        # No login for a local test server; --allow-root: CI runs as root.
        cmd += ["--IdentityProvider.token=", "--ServerApp.password=", "--allow-root"]
        cmd.append("--LabApp.expose_app_in_browser=True")
        probe, url = f"{base}/api/status", f"{base}/lab/tree/{NOTEBOOK.name}"
    log = work / f"{kind}.log"
    with open(log, "w") as handle:
        proc = subprocess.Popen(
            cmd, cwd=work, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        _wait_http(probe, proc, log)
        yield {"url": url, "output_dir": output_dir, "log": log}
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        ARTIFACTS.mkdir(exist_ok=True)
        shutil.copy(log, ARTIFACTS / f"ui_browser_{kind}.log")


@pytest.fixture(scope="module")
def voila_url(demo_survey, tmp_path_factory):
    yield from _ui_server("voila", demo_survey, tmp_path_factory.mktemp("ui_voila"))


@pytest.fixture(scope="module")
def jupyterlab_url(demo_survey, tmp_path_factory):
    pytest.importorskip("jupyterlab", reason="pip install jupyterlab (the [ui] extra)")
    yield from _ui_server("jupyterlab", demo_survey, tmp_path_factory.mktemp("ui_lab"))


@pytest.fixture
def page():
    with playwright_api.sync_playwright() as p:
        # A fresh user data dir per test: no cookies, cache or state from other runs.
        profile = tempfile.mkdtemp(prefix="cutana-chromium-")
        context = p.chromium.launch_persistent_context(
            profile,
            executable_path=CHROMIUM,
            args=CHROMIUM_ARGS,
            headless=True,
            viewport={"width": 1300, "height": 2200},
        )
        try:
            pg = context.new_page()
            pg.set_default_timeout(60_000)
            yield pg
        finally:
            context.close()
            shutil.rmtree(profile, ignore_errors=True)


IMG_BYTES_JS = """async (selector) => {
    const img = document.querySelector(selector);
    if (!img || !img.src) { return null; }
    const response = await fetch(img.src);
    return Array.from(new Uint8Array(await response.arrayBuffer()));
}"""


def _image_digest(page, selector: str) -> str | None:
    data = page.evaluate(IMG_BYTES_JS, selector)
    return None if data is None else hashlib.sha256(bytes(data)).hexdigest()


def _image_bytes(page, selector: str) -> bytes:
    return bytes(page.evaluate(IMG_BYTES_JS, selector))


def _wait_for(predicate, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _shot(page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / name), full_page=True)


def test_ui_in_browser_preview_run_and_gallery(page, voila_url, demo_survey):
    page.goto(voila_url["url"], timeout=120_000)
    _use_the_ui(page, voila_url, demo_survey, "ui")


def test_ui_in_jupyterlab_preview_run_and_gallery(page, jupyterlab_url, demo_survey):
    # As the README says: open the notebook in JupyterLab and run its cell.
    page.goto(jupyterlab_url["url"], timeout=120_000)
    # Like a user, wait for the kernel before running the cell: a cell run while the notebook's
    # session is still starting is not executed (the page exposes the app for this wait only).
    page.wait_for_function("() => window.jupyterapp?.shell?.currentWidget?.sessionContext")
    page.evaluate("() => window.jupyterapp.shell.currentWidget.sessionContext.ready")
    page.locator(".jp-Notebook .jp-Cell .jp-InputArea-editor").first.click()
    page.keyboard.press("Shift+Enter")
    _use_the_ui(page, jupyterlab_url, demo_survey, "ui_lab")


def _use_the_ui(page, server, demo_survey, shots: str) -> None:
    """A user's session, from the loaded UI to the gallery (screenshots named ``shots``_*)."""
    path_input = page.locator(".cutana-catalogue-path input")
    path_input.wait_for(state="visible", timeout=120_000)
    # Step 1: the catalogue path was pre-filled from CUTANA_UI_CATALOGUE; pick the Parquet
    # copy of the demo catalogue from the chooser to exercise the dropdown and Parquet input.
    assert path_input.input_value() == str(demo_survey)
    parquet = str(demo_survey.with_suffix(".parquet"))
    page.locator(".cutana-catalogue-dropdown select").select_option(parquet)
    _wait_for(lambda: path_input.input_value() == parquet, 30, "the path field to follow")

    # Step 2: the summary names sources, files and bands and finds no problem.
    summary = page.locator(".cutana-catalogue-summary")
    _wait_for(lambda: parquet in summary.inner_text(), 60, "the Parquet summary")
    text = summary.inner_text()
    assert "No validation problems" in text, text
    assert "Sources\t12" in text or "Sources 12" in text, text
    assert "VIS" in text and "NIR_H" in text
    assert page.locator(".cutana-band-name-1 input").input_value() == "NIR_H"

    # Step 4: the first preview appears (computed by cutana's engine in the kernel).
    status = page.locator(".cutana-preview-status")
    _wait_for(lambda: "Preview:" in status.inner_text(), 90, "the first preview")
    first = ".cutana-preview-image-0"
    before = _image_digest(page, first)
    assert before is not None
    _shot(page, f"{shots}_1_loaded.png")

    # Change a normalisation parameter like a user: type a new percentile and press Enter.
    percentile = page.locator(".cutana-norm-percentile input")
    percentile.fill("50")
    percentile.press("Enter")
    _wait_for(
        lambda: _image_digest(page, first) not in (before, None),
        90,
        "the preview image to change after the percentile change",
    )
    assert "Preview:" in status.inner_text(), status.inner_text()
    _shot(page, f"{shots}_2_preview_changed.png")

    # Step 5: start the run and follow the progress bar until it completes.
    page.locator("button.cutana-start").click()
    run_status = page.locator(".cutana-run-status")
    _wait_for(
        lambda: any(s in run_status.inner_text() for s in ("completed", "failed", "stopped")),
        180,
        "the run to end",
        interval=1.0,
    )
    final = run_status.inner_text()
    _shot(page, f"{shots}_3_run_finished.png")
    assert "completed" in final, f"{final}\n{voila_url['log'].read_text()[-3000:]}"
    assert "12/12 sources" in final, final

    # Step 6: the gallery is shown, and it is the run's gallery.png.
    gallery = page.locator("img.cutana-gallery-image")
    gallery.wait_for(state="visible", timeout=30_000)
    shown = _image_bytes(page, "img.cutana-gallery-image")
    on_disk = (server["output_dir"] / "gallery.png").read_bytes()
    assert shown == on_disk
    outputs = page.locator(".cutana-outputs").inner_text()
    assert "source_to_zarr_mapping.parquet" in outputs
    gallery.scroll_into_view_if_needed()
    _shot(page, f"{shots}_4_gallery.png")

    # Back to the first percentile: the engine is deterministic, so the preview must be
    # byte-identical to the first one again.
    percentile.fill("99.8")
    percentile.press("Enter")
    _wait_for(
        lambda: _image_digest(page, first) == before,
        90,
        "the preview to return to its first bytes after restoring the percentile",
    )
    _shot(page, f"{shots}_5_final.png")
