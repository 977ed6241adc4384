"""The cutana Jupyter/Voila UI: a step-by-step ipywidgets application.

:class:`CutanaApp` owns every widget and all the logic behind them, as plain methods
(:meth:`CutanaApp.load_catalogue`, :meth:`CutanaApp.current_config`,
:meth:`CutanaApp.refresh_preview`, :meth:`CutanaApp.start_run`, ...) so tests can drive each step
without a browser. It uses cutana's public API only: ``get_default_config``/``validate_config``,
``save_config_toml``/``load_config_toml``, ``cutana.preview.preview_cutouts`` (the same engine as
the run) and ``Orchestrator`` in non-blocking mode.

Every widget a user touches has a stable CSS class (``cutana-...``, see ``docs/ui.md``) so that a
browser test can find it.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ipywidgets as w
import numpy as np

from cutana.config import (
    DEFAULT_STRETCH_A,
    get_default_config,
    load_config_toml,
    save_config_toml,
    to_plain,
    validate_config,
)

from .catalogue_info import CatalogueInfo, analyse, find_catalogues
from .render import format_eta, placeholder_png, png_bytes, weights_to_colour

logger = logging.getLogger(__name__)

#: Environment variables that pre-fill the UI (used by the browser test and by Voila pages).
ENV_CATALOGUE = "CUTANA_UI_CATALOGUE"
ENV_OUTPUT_DIR = "CUTANA_UI_OUTPUT_DIR"
ENV_CONFIG = "CUTANA_UI_CONFIG"

NORMALISATION_METHODS = ["linear", "log", "asinh", "zscale", "none"]
INTERPOLATIONS = ["nearest", "bilinear", "cubic", "lanczos"]
TERMINAL_STATUSES = ("completed", "failed", "stopped")

#: Which normalisation parameters each method uses (the others are hidden).
METHOD_PARAMETERS = {
    "linear": {"percentile"},
    "log": {"percentile", "a"},
    "asinh": {"percentile", "a"},
    "zscale": {"n_samples", "contrast"},
    "none": set(),
}


def default_weights(n_bands: int, n_channels: int) -> list[list[float]]:
    """A sensible starting RGB mix: bands spread over the channels in catalogue order.

    Parameters
    ----------
    n_bands : int
        Number of bands (files per source).
    n_channels : int
        Number of output channels.

    Returns
    -------
    list of list of float
        ``weights[band][channel]``.
    """
    weights = [[0.0] * n_channels for _ in range(n_bands)]
    if n_channels == 1:
        for row in weights:
            row[0] = 1.0 / n_bands
        return weights
    if n_bands == 2 and n_channels == 3:
        return [[1.0, 0.0, 0.5], [0.0, 1.0, 0.5]]
    for band in range(n_bands):
        channel = min(n_channels - 1, band * n_channels // n_bands)
        weights[band][channel] = 1.0
    return weights


def _cls(widget: w.DOMWidget, *classes: str) -> w.DOMWidget:
    for name in classes:
        widget.add_class(name)
    return widget


class BandRow:
    """Widgets of one band in step 3: name, FITS extension, one weight per channel, swatch."""

    def __init__(
        self,
        index: int,
        name: str,
        extensions: list[str],
        weights: list[float],
        on_change: Callable[[], None],
        scale: float,
    ):
        self.index = index
        label_width = f"{int(90 * scale)}px"
        self.name = _cls(
            w.Text(value=name, layout=w.Layout(width=f"{int(120 * scale)}px")),
            "cutana-band-name",
            f"cutana-band-name-{index}",
        )
        options = list(dict.fromkeys(extensions or ["PRIMARY"]))
        self.extension = _cls(
            w.Dropdown(options=options, value=options[0], layout=w.Layout(width=label_width)),
            "cutana-band-extension",
            f"cutana-band-extension-{index}",
        )
        self.weights = [
            _cls(
                w.BoundedFloatText(
                    value=float(v),
                    min=0.0,
                    max=100.0,
                    step=0.05,
                    layout=w.Layout(width=f"{int(70 * scale)}px"),
                ),
                "cutana-weight",
                f"cutana-weight-{index}-{c}",
            )
            for c, v in enumerate(weights)
        ]
        self.swatch = _cls(w.HTML(), "cutana-swatch", f"cutana-swatch-{index}")
        self._scale = scale
        self._on_change = on_change
        for widget in [self.name, self.extension, *self.weights]:
            widget.observe(self._changed, names="value")
        self.update_swatch()
        self.box = w.HBox(
            [self.name, self.extension, *self.weights, self.swatch],
            layout=w.Layout(align_items="center"),
        )

    def weight_values(self) -> list[float]:
        """The current channel weights of this band."""
        return [float(x.value) for x in self.weights]

    def colour(self) -> str:
        """CSS colour of what this band contributes to the output."""
        return weights_to_colour(self.weight_values())

    def update_swatch(self) -> None:
        """Redraw the colour swatch from the weights."""
        size = int(22 * self._scale)
        self.swatch.value = (
            f"<div title='{self.colour()}' style='width:{size}px;height:{size}px;"
            f"border:1px solid #888;border-radius:3px;background:{self.colour()}'></div>"
        )

    def _changed(self, _change) -> None:
        self.update_swatch()
        self._on_change()


class CutanaApp:
    """The cutana UI: six steps from a catalogue to a finished run and its gallery.

    Parameters
    ----------
    catalogue : str, optional
        Catalogue path to pre-fill (default: ``$CUTANA_UI_CATALOGUE``).
    output_dir : str, optional
        Output folder to pre-fill (default: ``$CUTANA_UI_OUTPUT_DIR`` or the config default).
    config : str or mapping, optional
        A TOML file or a config mapping to start from (default: ``$CUTANA_UI_CONFIG``).
    ui_scale : float
        Scales fonts, widget sizes and preview images (0.5 to 2 are sensible).
    preview_fn : callable, optional
        ``preview_fn(catalogue_df, cfg, n) -> (images, source_ids)``; defaults to
        ``cutana.preview.preview_cutouts``. Tests inject a fake to check the UI logic alone.
    orchestrator_factory : callable, optional
        ``factory(config) -> orchestrator``; defaults to ``cutana.Orchestrator``.
    debounce_seconds : float
        Quiet time after the last parameter change before the preview is recomputed, so that
        typing a number does not start one preview per keystroke.
    poll_interval : float
        Seconds between progress polls of a running run.
    auto_load : bool
        Load the pre-filled catalogue immediately.
    """

    def __init__(
        self,
        catalogue: str | None = None,
        output_dir: str | None = None,
        config: str | dict | None = None,
        ui_scale: float = 1.0,
        preview_fn: Callable | None = None,
        orchestrator_factory: Callable | None = None,
        debounce_seconds: float = 0.6,
        poll_interval: float = 1.0,
        auto_load: bool = True,
    ):
        if not 0.2 <= float(ui_scale) <= 5.0:
            raise ValueError(f"ui_scale={ui_scale!r} is out of range: give a value in [0.2, 5]")
        self.scale = float(ui_scale)
        self.debounce_seconds = float(debounce_seconds)
        self.poll_interval = float(poll_interval)
        self._preview_fn = preview_fn
        self._orchestrator_factory = orchestrator_factory
        self.info: CatalogueInfo | None = None
        self.band_rows: list[BandRow] = []
        self.preview_sources = None  # DataFrame of the sample rows shown in step 4
        self.last_preview_ids: list[str] = []
        self.last_preview_error: str | None = None
        self.orchestrator = None
        self.last_report = None
        self._preview_lock = threading.Lock()
        self._preview_generation = 0
        self._preview_timer: threading.Timer | None = None
        self._preview_thread: threading.Thread | None = None
        self._poll_thread: threading.Thread | None = None
        self._stop_polling = threading.Event()
        self._suspend_events = False
        self._sample_seed = 0

        base = config if config is not None else os.environ.get(ENV_CONFIG)
        # Band names, weights and HDUs of a given config are used for a matching catalogue;
        # without one, they are derived from the catalogue's FITS headers.
        self._bands_from_config = base is not None
        if isinstance(base, (str, Path)):
            self.base_config = to_plain(load_config_toml(base))
        elif base is not None:
            self.base_config = to_plain(validate_config(base, warn_unknown=False))
        else:
            self.base_config = to_plain(get_default_config())
        catalogue = (
            catalogue or os.environ.get(ENV_CATALOGUE) or self.base_config.get("source_catalogue")
        )
        output_dir = output_dir or os.environ.get(ENV_OUTPUT_DIR) or self.base_config["output_dir"]
        self._build_widgets(catalogue or "", output_dir)
        self._apply_scalar_config(self.base_config)
        if catalogue and auto_load and Path(catalogue).expanduser().is_file():
            self.load_catalogue()

    # ------------------------------------------------------------------ widgets
    def _label_style(self) -> dict:
        return {"description_width": f"{int(150 * self.scale)}px"}

    def _field_layout(self, width: int = 320) -> w.Layout:
        return w.Layout(width=f"{int(width * self.scale)}px")

    def _build_widgets(self, catalogue: str, output_dir: str) -> None:
        st, lay = self._label_style(), self._field_layout
        # Step 1: catalogue choice ---------------------------------------------------------
        start_dir = str(Path(catalogue).expanduser().parent) if catalogue else os.getcwd()
        self.catalogue_dir = _cls(
            w.Text(value=start_dir, description="Folder", style=st, layout=lay(520)),
            "cutana-catalogue-dir",
        )
        self.scan_button = _cls(w.Button(description="Scan", icon="search"), "cutana-scan")
        self.catalogue_dropdown = _cls(
            w.Dropdown(options=[], description="Catalogues found", style=st, layout=lay(520)),
            "cutana-catalogue-dropdown",
        )
        self.catalogue_path = _cls(
            w.Text(
                value=catalogue,
                description="Catalogue path",
                placeholder="/path/to/catalogue.csv or .parquet",
                style=st,
                layout=lay(520),
            ),
            "cutana-catalogue-path",
        )
        self.load_button = _cls(
            w.Button(description="Load catalogue", button_style="primary", icon="table"),
            "cutana-load-catalogue",
        )
        self.scan_button.on_click(lambda _b: self.scan_catalogues())
        self.catalogue_dropdown.observe(self._on_dropdown, names="value")
        self.load_button.on_click(lambda _b: self.load_catalogue())

        # Step 2: summary ------------------------------------------------------------------
        self.summary = _cls(
            w.HTML("<i>Load a catalogue to see what it holds.</i>"), "cutana-catalogue-summary"
        )

        # Step 3: processing parameters -------------------------------------------------------
        self.n_channels = _cls(
            w.Dropdown(options=[1, 2, 3], value=3, description="Output channels", style=st),
            "cutana-n-channels",
        )
        self.bands_box = _cls(w.VBox([]), "cutana-bands")
        self.bands_header = w.HTML()
        self.target_resolution = _cls(
            w.BoundedIntText(
                value=256, min=16, max=2048, description="Resolution (px)", style=st, layout=lay()
            ),
            "cutana-target-resolution",
        )
        self.padding_factor = _cls(
            w.BoundedFloatText(
                value=1.0,
                min=0.25,
                max=10.0,
                step=0.05,
                description="Padding factor",
                style=st,
                layout=lay(),
            ),
            "cutana-padding-factor",
        )
        self.interpolation = _cls(
            w.Dropdown(
                options=INTERPOLATIONS, value="bilinear", description="Interpolation", style=st
            ),
            "cutana-interpolation",
        )
        self.apply_flux_conversion = _cls(
            w.Checkbox(value=True, description="Convert to flux (Jy, via MAGZERO)", indent=False),
            "cutana-flux-conversion",
        )
        self.normalisation_method = _cls(
            w.Dropdown(
                options=NORMALISATION_METHODS,
                value="linear",
                description="Normalisation",
                style=st,
            ),
            "cutana-norm-method",
        )
        self.percentile = _cls(
            w.BoundedFloatText(
                value=99.8,
                min=0.0,
                max=100.0,
                step=0.1,
                description="Percentile",
                style=st,
                layout=lay(),
            ),
            "cutana-norm-percentile",
        )
        self.a_auto = _cls(
            w.Checkbox(value=True, description="method default a", indent=False),
            "cutana-norm-a-auto",
        )
        self.a_value = _cls(
            w.BoundedFloatText(
                value=1000.0,
                min=0.001,
                max=10000.0,
                step=0.1,
                description="a (stretch)",
                style=st,
                layout=lay(),
                disabled=True,
            ),
            "cutana-norm-a",
        )
        self.n_samples = _cls(
            w.BoundedIntText(
                value=1000, min=100, max=10000, description="ZScale samples", style=st, layout=lay()
            ),
            "cutana-norm-n-samples",
        )
        self.contrast = _cls(
            w.BoundedFloatText(
                value=0.25,
                min=0.01,
                max=1.0,
                step=0.01,
                description="ZScale contrast",
                style=st,
                layout=lay(),
            ),
            "cutana-norm-contrast",
        )
        self.crop_enable = _cls(
            w.Checkbox(value=False, description="Limits from central crop", indent=False),
            "cutana-norm-crop",
        )
        self.crop_width = _cls(
            w.BoundedIntText(
                value=64, min=1, max=5000, description="Crop width", style=st, layout=lay()
            ),
            "cutana-norm-crop-width",
        )
        self.crop_height = _cls(
            w.BoundedIntText(
                value=64, min=1, max=5000, description="Crop height", style=st, layout=lay()
            ),
            "cutana-norm-crop-height",
        )
        self.output_format = _cls(
            w.Dropdown(
                options=["zarr", "fits"], value="zarr", description="Output format", style=st
            ),
            "cutana-output-format",
        )
        self.data_type = _cls(
            w.Dropdown(
                options=["float32", "uint8"], value="float32", description="Data type", style=st
            ),
            "cutana-data-type",
        )
        self.output_dir = _cls(
            w.Text(value=str(output_dir), description="Output folder", style=st, layout=lay(520)),
            "cutana-output-dir",
        )
        self.config_path = _cls(
            w.Text(
                value=str(Path(output_dir) / "cutana_ui_config.toml"),
                description="Config file (TOML)",
                style=st,
                layout=lay(520),
            ),
            "cutana-config-path",
        )
        self.save_button = _cls(
            w.Button(description="Save config", icon="save"), "cutana-save-config"
        )
        self.load_config_button = _cls(
            w.Button(description="Load config", icon="folder-open"), "cutana-load-config"
        )
        self.config_message = _cls(w.HTML(), "cutana-config-message")
        self.check_button = _cls(
            w.Button(description="Check inputs", icon="check"), "cutana-check-inputs"
        )
        self.check_message = _cls(w.HTML(), "cutana-check-message")
        self.check_button.on_click(lambda _b: self.check_inputs())
        self.save_button.on_click(lambda _b: self._safe(self.save_config))
        self.load_config_button.on_click(lambda _b: self._safe(self.load_config))

        # Step 4: previews ---------------------------------------------------------------------
        self.auto_preview = _cls(
            w.Checkbox(value=True, description="Update previews automatically", indent=False),
            "cutana-auto-preview",
        )
        self.refresh_button = _cls(
            w.Button(description="Refresh preview", icon="refresh"), "cutana-refresh-preview"
        )
        self.resample_button = _cls(
            w.Button(description="Other sources", icon="random"), "cutana-new-samples"
        )
        self.preview_status = _cls(w.HTML(""), "cutana-preview-status")
        self.preview_box = _cls(
            w.HBox([], layout=w.Layout(flex_flow="row wrap")), "cutana-previews"
        )
        self.preview_images: list[w.Image] = []
        self.preview_labels: list[w.HTML] = []
        self.refresh_button.on_click(lambda _b: self.schedule_preview(delay=0.0))
        self.resample_button.on_click(lambda _b: self.new_samples())

        # Step 5: run --------------------------------------------------------------------------
        self.start_button = _cls(
            w.Button(description="Start run", button_style="success", icon="play"),
            "cutana-start",
        )
        self.stop_button = _cls(
            w.Button(description="Stop", button_style="danger", icon="stop", disabled=True),
            "cutana-stop",
        )
        self.progress = _cls(
            w.FloatProgress(
                value=0.0, min=0.0, max=100.0, description="Progress", style=st, layout=lay(520)
            ),
            "cutana-progress",
        )
        self.run_status = _cls(w.HTML("<i>Not started.</i>"), "cutana-run-status")
        self.start_button.on_click(lambda _b: self._safe(self.start_run, self.run_status))
        self.stop_button.on_click(lambda _b: self.stop_run())

        # Step 6: results ----------------------------------------------------------------------
        self.gallery = _cls(
            w.Image(
                format="png",
                layout=w.Layout(max_width=f"{int(640 * self.scale)}px", display="none"),
            ),
            "cutana-gallery-image",
        )
        self.outputs = _cls(w.HTML("<i>Results appear here after a run.</i>"), "cutana-outputs")

        # Parameter widgets whose change invalidates the preview.
        for widget in (
            self.target_resolution,
            self.padding_factor,
            self.interpolation,
            self.apply_flux_conversion,
            self.normalisation_method,
            self.percentile,
            self.a_auto,
            self.a_value,
            self.n_samples,
            self.contrast,
            self.crop_enable,
            self.crop_width,
            self.crop_height,
            self.data_type,
        ):
            widget.observe(self._on_param_change, names="value")
        self.normalisation_method.observe(lambda _c: self._update_visibility(), names="value")
        self.a_auto.observe(lambda _c: self._update_visibility(), names="value")
        self.crop_enable.observe(lambda _c: self._update_visibility(), names="value")
        self.n_channels.observe(self._on_n_channels, names="value")
        self._update_visibility()

        self.widget = self._layout()
        self.scan_catalogues()

    def _section(self, number: int, title: str, children: list, cls: str) -> w.VBox:
        header = w.HTML(f"<h3 class='cutana-step-title'>{number}. {title}</h3>")
        return _cls(w.VBox([header, *children]), "cutana-step", cls)

    def _layout(self) -> w.VBox:
        s = self.scale
        # The widget CSS variables cascade, so setting them on the root scales every control.
        style = w.HTML(
            "<style>"
            f".cutana-ui {{ --jp-widgets-font-size: {13 * s:.1f}px;"
            f" --jp-widgets-inline-height: {28 * s:.1f}px;"
            f" --jp-widgets-inline-label-width: {150 * s:.1f}px;"
            f" --jp-ui-font-size1: {13 * s:.1f}px; font-size: {13 * s:.1f}px; }}"
            f".cutana-ui .cutana-step-title {{ font-size: {16 * s:.1f}px; margin: {8 * s:.0f}px 0"
            f" {4 * s:.0f}px 0; }}"
            f".cutana-ui table {{ font-size: {12 * s:.1f}px; border-collapse: collapse; }}"
            # Jupyter's rendered-HTML table style pads cells generously; keep the summary compact.
            ".cutana-ui table th, .cutana-ui table td { text-align: left;"
            " padding: 1px 10px 1px 0 !important; line-height: 1.4; }"
            ".cutana-ui .cutana-problems { color: #b00020; }"
            ".cutana-ui .cutana-no-problems { color: #1b7a1b; }"
            "</style>"
        )
        title = w.HTML(
            f"<h2 style='font-size:{20 * s:.1f}px;margin:0'>"
            "cutana — cutouts from survey mosaics</h2>"
        )
        step1 = self._section(
            1,
            "Choose a catalogue",
            [
                w.HBox([self.catalogue_dir, self.scan_button]),
                self.catalogue_dropdown,
                w.HBox([self.catalogue_path, self.load_button]),
            ],
            "cutana-step-catalogue",
        )
        step2 = self._section(2, "What it holds", [self.summary], "cutana-step-summary")
        norm_box = w.VBox(
            [
                self.normalisation_method,
                self.percentile,
                w.HBox([self.a_value, self.a_auto]),
                self.n_samples,
                self.contrast,
                self.crop_enable,
                w.HBox([self.crop_width, self.crop_height]),
            ]
        )
        step3 = self._section(
            3,
            "Bands, resolution, normalisation and output",
            [
                self.n_channels,
                self.bands_header,
                self.bands_box,
                w.HBox(
                    [
                        w.VBox(
                            [
                                self.target_resolution,
                                self.padding_factor,
                                self.interpolation,
                                self.apply_flux_conversion,
                            ]
                        ),
                        norm_box,
                    ]
                ),
                w.HBox([self.output_format, self.data_type]),
                self.output_dir,
                w.HBox([self.config_path, self.save_button, self.load_config_button]),
                self.config_message,
                w.HBox([self.check_button, self.check_message]),
            ],
            "cutana-step-parameters",
        )
        step4 = self._section(
            4,
            "Preview",
            [
                w.HBox([self.auto_preview, self.refresh_button, self.resample_button]),
                self.preview_status,
                self.preview_box,
            ],
            "cutana-step-preview",
        )
        step5 = self._section(
            5,
            "Run",
            [w.HBox([self.start_button, self.stop_button]), self.progress, self.run_status],
            "cutana-step-run",
        )
        step6 = self._section(6, "Results", [self.outputs, self.gallery], "cutana-step-results")
        return _cls(w.VBox([style, title, step1, step2, step3, step4, step5, step6]), "cutana-ui")

    # ------------------------------------------------------------------ helpers
    def _safe(self, fn: Callable[[], Any], target: w.HTML | None = None) -> None:
        """Run a button action, showing errors in the UI instead of losing them in the log."""
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - shown to the user
            logger.exception("cutana UI action failed")
            target = target if target is not None else self.config_message
            target.value = f"<span style='color:#b00020'>{_html(str(exc))}</span>"

    def _update_visibility(self) -> None:
        used = METHOD_PARAMETERS[self.normalisation_method.value]
        for name, widget in (
            ("percentile", self.percentile),
            ("n_samples", self.n_samples),
            ("contrast", self.contrast),
        ):
            widget.layout.display = None if name in used else "none"
        show_a = "a" in used
        self.a_value.layout.display = None if show_a else "none"
        self.a_auto.layout.display = None if show_a else "none"
        if self.a_auto.value:
            default = DEFAULT_STRETCH_A.get(self.normalisation_method.value)
            if default is not None and self.a_value.value != default:
                self._suspend_events = True
                try:
                    self.a_value.value = default
                finally:
                    self._suspend_events = False
        self.a_value.disabled = self.a_auto.value
        no_norm = self.normalisation_method.value == "none"
        self.crop_enable.layout.display = "none" if no_norm else None
        crop = self.crop_enable.value and not no_norm
        self.crop_width.layout.display = None if crop else "none"
        self.crop_height.layout.display = None if crop else "none"

    # ------------------------------------------------------------------ step 1 and 2
    def scan_catalogues(self) -> list[str]:
        """Fill the catalogue dropdown with the CSV/Parquet files under the chosen folder."""
        found = find_catalogues(self.catalogue_dir.value)
        self._suspend_events = True
        try:
            self.catalogue_dropdown.options = found
            current = self.catalogue_path.value
            self.catalogue_dropdown.value = current if current in found else None
        finally:
            self._suspend_events = False
        return found

    def _on_dropdown(self, change) -> None:
        if self._suspend_events or not change["new"]:
            return
        self.catalogue_path.value = change["new"]
        self.load_catalogue()

    def load_catalogue(self, path: str | None = None) -> CatalogueInfo:
        """Step 2: analyse the catalogue, show its summary and set up bands and previews.

        Parameters
        ----------
        path : str, optional
            Catalogue file; default the path field.

        Returns
        -------
        CatalogueInfo
            The summary (also kept as ``self.info``).
        """
        if path is not None:
            self.catalogue_path.value = str(path)
        self.summary.value = "<i>Reading the catalogue…</i>"
        info = analyse(self.catalogue_path.value.strip())
        self.info = info
        self.summary.value = info.to_html()
        if info.dataframe is None or not info.bands:
            return info
        self._setup_bands(info, self.base_config if self._bands_from_config else None)
        self._setup_previews(info)
        if self.auto_preview.value and info.ok:
            self.schedule_preview(delay=0.0)
        return info

    def _setup_bands(self, info: CatalogueInfo, config: dict | None = None) -> None:
        n_bands = len(info.bands)
        weights_cfg = (config or {}).get("channel_weights") or {}
        if weights_cfg and len(weights_cfg) == n_bands:
            names = list(weights_cfg)
            weights = [list(map(float, v)) for v in weights_cfg.values()]
            n_channels = len(weights[0])
        else:
            names = [b.name for b in info.bands]
            n_channels = 1 if n_bands == 1 else 3
            weights = default_weights(n_bands, n_channels)
        exts_cfg = list((config or {}).get("fits_extensions") or [])
        if len(exts_cfg) == 1:
            exts_cfg = exts_cfg * n_bands
        self._suspend_events = True
        try:
            if n_channels not in self.n_channels.options:
                self.n_channels.options = sorted({*self.n_channels.options, n_channels})
            self.n_channels.value = n_channels
        finally:
            self._suspend_events = False
        self.band_rows = []
        for i, band in enumerate(info.bands):
            extensions = [str(e) for e in band.extensions] or ["PRIMARY"]
            if exts_cfg and str(exts_cfg[i]) in extensions:
                # Put the configured HDU first so it becomes the dropdown's value.
                extensions.remove(str(exts_cfg[i]))
                extensions.insert(0, str(exts_cfg[i]))
            elif exts_cfg:
                extensions.insert(0, str(exts_cfg[i]))
            self.band_rows.append(
                BandRow(i, names[i], extensions, weights[i], self._on_param_change, self.scale)
            )
        self._refresh_band_header()
        self.bands_box.children = [row.box for row in self.band_rows]

    def _refresh_band_header(self) -> None:
        n = self.n_channels.value
        names = ["R", "G", "B"] if n == 3 else ["ch0", "ch1"] if n == 2 else ["grey"]
        cells = "".join(
            f"<span style='display:inline-block;width:{int(74 * self.scale)}px'>weight {c}</span>"
            for c in names
        )
        self.bands_header.value = (
            f"<div><span style='display:inline-block;width:{int(124 * self.scale)}px'>band</span>"
            f"<span style='display:inline-block;width:{int(94 * self.scale)}px'>HDU</span>"
            f"{cells}<span>colour</span></div>"
        )

    def _on_n_channels(self, change) -> None:
        if self._suspend_events or self.info is None or not self.info.bands:
            return
        old = [row.weight_values() for row in self.band_rows]
        new_n = change["new"]
        fresh = default_weights(len(old), new_n)
        # Keep the user's weights for channels that still exist; new channels get defaults.
        merged = [
            [(o[c] if c < len(o) else f[c]) for c in range(new_n)]
            for o, f in zip(old, fresh, strict=True)
        ]
        names = [row.name.value for row in self.band_rows]
        exts = [row.extension.value for row in self.band_rows]
        config = {
            "channel_weights": dict(zip(names, merged, strict=True)),
            "fits_extensions": exts,
        }
        self._setup_bands(self.info, config)
        self._on_param_change(None)

    def _setup_previews(self, info: CatalogueInfo) -> None:
        df = info.dataframe
        n = min(int(self.base_config["ui"]["preview_samples"]), len(df))
        # A fixed random sample (not the first rows, which usually sit in one corner of one
        # tile) so that the same sources are compared while parameters change.
        self.preview_sources = df.sample(n=n, random_state=self._sample_seed).reset_index(drop=True)
        size = int(128 * self.scale)
        self.preview_images = [
            _cls(
                w.Image(value=placeholder_png(), format="png", width=size, height=size),
                "cutana-preview-image",
                f"cutana-preview-image-{i}",
            )
            for i in range(n)
        ]
        self.preview_labels = [
            _cls(w.HTML(f"<small>{_html(str(sid))}</small>"), "cutana-preview-label")
            for sid in self.preview_sources.get("SourceID", [""] * n)
        ]
        self.preview_box.children = [
            w.VBox([img, lab], layout=w.Layout(margin=f"0 {int(6 * self.scale)}px 0 0"))
            for img, lab in zip(self.preview_images, self.preview_labels, strict=True)
        ]

    def new_samples(self) -> None:
        """Show other randomly chosen sources in the preview."""
        if self.info is None or self.info.dataframe is None:
            return
        self._sample_seed += 1
        self._setup_previews(self.info)
        self.schedule_preview(delay=0.0)

    # ------------------------------------------------------------------ step 3
    def current_config(self) -> dict:
        """The configuration the widgets describe, validated (a complete plain dict).

        Raises
        ------
        cutana.exceptions.ConfigValidationError
            If a value is out of range (the message names the key).
        """
        cfg = to_plain(self.base_config)
        cfg["source_catalogue"] = self.catalogue_path.value.strip() or None
        cfg["output_dir"] = self.output_dir.value.strip()
        cfg["output_format"] = self.output_format.value
        cfg["data_type"] = self.data_type.value
        cfg["target_resolution"] = int(self.target_resolution.value)
        cfg["padding_factor"] = float(self.padding_factor.value)
        cfg["interpolation"] = self.interpolation.value
        cfg["apply_flux_conversion"] = bool(self.apply_flux_conversion.value)
        cfg["normalisation_method"] = self.normalisation_method.value
        norm = dict(cfg.get("normalisation") or {})
        norm["percentile"] = float(self.percentile.value)
        norm["a"] = None if self.a_auto.value else float(self.a_value.value)
        norm["n_samples"] = int(self.n_samples.value)
        norm["contrast"] = float(self.contrast.value)
        norm["crop_enable"] = bool(self.crop_enable.value)
        norm["crop_width"] = int(self.crop_width.value) if self.crop_enable.value else None
        norm["crop_height"] = int(self.crop_height.value) if self.crop_enable.value else None
        cfg["normalisation"] = norm
        if self.band_rows:
            names = [row.name.value.strip() for row in self.band_rows]
            if len(set(names)) != len(names) or not all(names):
                raise ValueError(f"band names {names} must be unique and non-empty")
            cfg["channel_weights"] = {
                name: row.weight_values() for name, row in zip(names, self.band_rows, strict=True)
            }
            exts = [_hdu_key(row.extension.value) for row in self.band_rows]
            cfg["fits_extensions"] = exts[:1] if len(set(map(str, exts))) == 1 else exts
            cfg["selected_extensions"] = names
        return validate_config(cfg, warn_unknown=False)

    def _apply_scalar_config(self, cfg: dict) -> None:
        """Set the step-3 widgets from a config mapping (no preview while doing so)."""
        norm = cfg.get("normalisation") or {}
        self._suspend_events = True
        try:
            self.output_format.value = cfg.get("output_format", "zarr")
            self.data_type.value = cfg.get("data_type", "float32")
            self.target_resolution.value = int(cfg.get("target_resolution", 256))
            self.padding_factor.value = float(cfg.get("padding_factor", 1.0))
            interp = cfg.get("interpolation", "bilinear")
            self.interpolation.value = "cubic" if interp == "bicubic" else interp
            self.apply_flux_conversion.value = bool(cfg.get("apply_flux_conversion", True))
            self.normalisation_method.value = cfg.get("normalisation_method", "linear")
            self.percentile.value = float(norm.get("percentile", 99.8))
            a = norm.get("a")
            self.a_auto.value = a is None
            if a is not None:
                self.a_value.value = float(a)
            self.n_samples.value = int(norm.get("n_samples", 1000))
            self.contrast.value = float(norm.get("contrast", 0.25))
            self.crop_enable.value = bool(norm.get("crop_enable", False))
            if norm.get("crop_width"):
                self.crop_width.value = int(norm["crop_width"])
            if norm.get("crop_height"):
                self.crop_height.value = int(norm["crop_height"])
        finally:
            self._suspend_events = False
        self._update_visibility()

    def save_config(self, path: str | None = None) -> str:
        """Save the current configuration as TOML (default: the config path field)."""
        target = path or self.config_path.value.strip()
        saved = save_config_toml(self.current_config(), target)
        self.config_message.value = f"Saved configuration to <code>{_html(saved)}</code>"
        return saved

    def load_config(self, path: str | None = None) -> dict:
        """Load a TOML configuration into the widgets (and its catalogue, if it exists)."""
        source = path or self.config_path.value.strip()
        cfg = to_plain(load_config_toml(source))
        self.base_config = cfg
        self._bands_from_config = True
        self._apply_scalar_config(cfg)
        self.output_dir.value = cfg["output_dir"]
        catalogue = cfg.get("source_catalogue")
        if catalogue:
            self.catalogue_path.value = catalogue
        if catalogue and Path(catalogue).expanduser().is_file():
            previous_auto = self.auto_preview.value
            self.auto_preview.value = False  # one preview after the bands are set, not two
            try:
                info = self.load_catalogue()
            finally:
                self.auto_preview.value = previous_auto
            if info.bands:
                self._setup_bands(info, cfg)
                self._on_param_change(None)
        self.config_message.value = f"Loaded configuration from <code>{_html(source)}</code>"
        return cfg

    def check_inputs(self) -> bool:
        """Check the catalogue and every FITS file with the chosen bands and HDUs (SPEC §5).

        Uses :func:`cutana.inputs_check.check_inputs`, the same check the run makes before any
        work. Returns True when the inputs are usable; problems are shown below the button.
        """
        from cutana.inputs_check import check_inputs

        self.check_message.value = "<i>Checking every FITS file…</i>"
        try:
            result = check_inputs(self.current_config())
        except Exception as exc:  # noqa: BLE001 - the problems are the user's feedback
            self.check_message.value = (
                f"<pre class='cutana-problems' style='white-space:pre-wrap'>{_html(str(exc))}</pre>"
            )
            return False
        scales = sorted({round(v, 4) for v in (result.get("pixel_scales") or {}).values()})
        self.check_message.value = (
            f"<span class='cutana-no-problems'>✔ Inputs OK: {result.get('n_sources', 0):,} "
            f"sources, {result.get('n_files', 0):,} FITS files, pixel scales "
            f"{', '.join(f'{v:g}' for v in scales) or '–'} arcsec</span>"
        )
        return True

    # ------------------------------------------------------------------ step 4
    def _on_param_change(self, _change=None) -> None:
        if self._suspend_events:
            return
        if self.auto_preview.value and self.preview_sources is not None:
            self.schedule_preview()

    def schedule_preview(self, delay: float | None = None) -> None:
        """Recompute the previews after ``delay`` seconds without further changes (debounce)."""
        if self.preview_sources is None:
            return
        delay = self.debounce_seconds if delay is None else delay
        if self._preview_timer is not None:
            self._preview_timer.cancel()
        self._preview_generation += 1
        generation = self._preview_generation
        self.preview_status.value = "<i>Preview pending…</i>"
        timer = threading.Timer(delay, self._preview_worker, args=(generation,))
        timer.daemon = True
        self._preview_timer = timer
        timer.start()

    def _preview_worker(self, generation: int) -> None:
        # One preview at a time (two shared cores); a newer request makes this one obsolete.
        with self._preview_lock:
            if generation != self._preview_generation:
                return
            self.refresh_preview(_generation=generation)

    def wait_for_preview(self, timeout: float = 60.0) -> bool:
        """Block until no preview is pending or running (for tests and scripts)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            timer = self._preview_timer
            if timer is not None and timer.is_alive():
                timer.join(max(0.0, deadline - time.monotonic()))
                continue
            if self._preview_lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
                self._preview_lock.release()
                timer = self._preview_timer
                if timer is None or not timer.is_alive():
                    return True
        return False

    def refresh_preview(self, _generation: int | None = None) -> list[str]:
        """Compute the preview cutouts now with the current parameters and show them.

        Returns
        -------
        list of str
            The SourceIDs shown (empty if the preview failed; the reason is displayed).
        """
        if self.preview_sources is None:
            return []
        started = time.monotonic()
        self.preview_status.value = "<i>Computing preview…</i>"
        try:
            cfg = self.current_config()
            preview_fn = self._preview_fn
            if preview_fn is None:
                from cutana.preview import preview_cutouts as preview_fn
            images, source_ids = preview_fn(self.preview_sources, cfg, len(self.preview_sources))
        except Exception as exc:  # noqa: BLE001 - the message is the user's feedback
            logger.exception("preview failed")
            self.last_preview_error = str(exc)
            self.preview_status.value = (
                f"<span style='color:#b00020'>Preview failed: {_html(str(exc))}</span>"
            )
            return []
        if _generation is not None and _generation != self._preview_generation:
            return []  # parameters changed meanwhile; the newer preview will draw
        images = np.asarray(images)
        ids = [str(s) for s in source_ids]
        size = int(128 * self.scale)
        for i, widget in enumerate(self.preview_images):
            if i < len(ids):
                widget.value = png_bytes(images[i], size=size)
                self.preview_labels[i].value = f"<small>{_html(ids[i])}</small>"
            else:  # sources without overlap produce no image
                widget.value = placeholder_png(size)
                self.preview_labels[i].value = "<small>–</small>"
        self.last_preview_ids = ids
        self.last_preview_error = None
        shape = "×".join(str(x) for x in images.shape[1:]) if images.ndim == 4 else "?"
        self.preview_status.value = (
            f"Preview: {len(ids)} cutouts ({shape}, {images.dtype}) in "
            f"{time.monotonic() - started:.1f} s"
        )
        return ids

    # ------------------------------------------------------------------ step 5 and 6
    def start_run(self) -> None:
        """Start the run in the background and poll its progress from a thread."""
        if self.orchestrator is not None and self._poll_thread and self._poll_thread.is_alive():
            raise RuntimeError("a run is already in progress: stop it first")
        cfg = self.current_config()
        if not cfg.get("source_catalogue"):
            raise ValueError("choose a catalogue first (step 1)")
        from dotmap import DotMap

        factory = self._orchestrator_factory
        if factory is None:
            from cutana import Orchestrator as factory
        self.orchestrator = factory(DotMap(cfg, _dynamic=False))
        self.run_status.value = "<i>Starting…</i>"
        self.progress.value = 0.0
        self.progress.bar_style = ""
        self.gallery.layout.display = "none"
        self.outputs.value = "<i>Running…</i>"
        self.start_button.disabled = True
        self.stop_button.disabled = False
        self._run_output_dir = cfg["output_dir"]
        try:
            self.orchestrator.start_processing(cfg["source_catalogue"], wait=False)
        except Exception:
            self.start_button.disabled = False
            self.stop_button.disabled = True
            raise
        self._stop_polling.clear()
        self._poll_thread = threading.Thread(target=self._poll_loop, daemon=True)
        self._poll_thread.start()

    def _poll_loop(self) -> None:
        while not self._stop_polling.is_set():
            report = self.poll_progress()
            if report is not None and report.status in TERMINAL_STATUSES:
                return
            self._stop_polling.wait(self.poll_interval)

    def poll_progress(self):
        """Read the run's progress once and update the progress bar and text.

        Returns
        -------
        ProgressReport or None
        """
        if self.orchestrator is None:
            return None
        try:
            report = self.orchestrator.get_progress_for_ui()
        except Exception as exc:  # noqa: BLE001
            self.run_status.value = f"<span style='color:#b00020'>{_html(str(exc))}</span>"
            return None
        self.last_report = report
        self.progress.value = float(np.clip(report.progress_percent or 0.0, 0.0, 100.0))
        self.run_status.value = (
            f"<b class='cutana-status-{_html(report.status)}'>{_html(report.status)}</b> — "
            f"{report.completed_sources:,}/{report.total_sources:,} sources · "
            f"{report.throughput:.1f} sources/s · ETA {format_eta(report.eta_seconds)} · "
            f"memory {report.memory_used_gb:.1f}/{report.memory_total_gb:.1f} GB"
        )
        if report.status in TERMINAL_STATUSES:
            self._finish(report)
        return report

    def _finish(self, report) -> None:
        self.start_button.disabled = False
        self.stop_button.disabled = True
        self.progress.bar_style = {"completed": "success", "failed": "danger"}.get(
            report.status, "warning"
        )
        if report.status == "completed":
            self.progress.value = 100.0
        errors = getattr(report, "errors", None) or []
        if errors:
            self.run_status.value += "<br><span style='color:#b00020'>{}</span>".format(
                "<br>".join(_html(e) for e in errors[-5:])
            )
        self.show_results(getattr(self, "_run_output_dir", self.output_dir.value))

    def show_results(self, output_dir: str | None = None) -> bool:
        """Step 6: show the gallery and where the outputs are. Returns True if a gallery exists."""
        out = Path(output_dir or self.output_dir.value).expanduser().resolve()
        gallery = out / "gallery.png"
        lines = [f"Output folder: <code>{_html(str(out))}</code>"]
        for name in (
            "source_to_zarr_mapping.parquet",
            "run_summary.json",
            "gallery.html",
            "cutana_config.toml",
        ):
            if (out / name).exists():
                lines.append(f"<code>{_html(str(out / name))}</code>")
        summary = out / "run_summary.json"
        if summary.is_file():
            try:
                counts = json.loads(summary.read_text()).get("counts") or {}
                if counts:
                    lines.append(
                        "Status counts: "
                        + ", ".join(f"{_html(str(k))}: {v}" for k, v in counts.items())
                    )
            except (OSError, ValueError):
                pass
        batches = sorted(out.glob("batch_cutout_process_*"))
        if batches:
            lines.append(f"{len(batches)} batch folder(s) <code>batch_cutout_process_*</code>")
        self.outputs.value = "<br>".join(lines)
        if gallery.is_file():
            self.gallery.value = gallery.read_bytes()
            self.gallery.layout.display = None
            return True
        return False

    def stop_run(self) -> None:
        """Ask the orchestrator to stop; the poll thread reports the final state."""
        if self.orchestrator is None:
            return
        self.run_status.value = "<i>Stopping…</i>"
        self.stop_button.disabled = True
        threading.Thread(target=self._stop_worker, daemon=True).start()

    def _stop_worker(self) -> None:
        try:
            self.orchestrator.stop_processing()
        except Exception as exc:  # noqa: BLE001
            self.run_status.value = f"<span style='color:#b00020'>{_html(str(exc))}</span>"
        self.poll_progress()

    def wait_for_run(self, timeout: float = 600.0) -> bool:
        """Block until the progress poller has seen the run end (for tests and scripts)."""
        thread = self._poll_thread
        if thread is None:
            return True
        thread.join(timeout)
        return not thread.is_alive()

    def close(self) -> None:
        """Stop background threads (timers and the poller)."""
        if self._preview_timer is not None:
            self._preview_timer.cancel()
        self._stop_polling.set()


def _hdu_key(value: str) -> str | int:
    """HDU names that are numbers are indices in the config (``1`` means extension 1)."""
    return int(value) if str(value).isdigit() else value


def _html(text: str) -> str:
    return str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
