"""Preview gallery of a run: a PNG grid and a small HTML page of sample cutouts (SPEC §3.4).

Samples are chosen deterministically (evenly spaced over the sources with status ``ok`` or
``partial``), read back from the run's outputs (Zarr or FITS) and composed into a grid with
numpy + OpenCV (no plotting library, no display needed). Zarr outputs are read by
:class:`cutana.writers.ZarrShardReader`; ``astropy.io.fits`` is imported on first use only, so
importing this module stays cheap.
"""

from __future__ import annotations

import base64
import html
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np
import pyarrow as pa

from . import arrow_tables
from .exceptions import CutanaError

if TYPE_CHECKING:  # only annotations need pandas at import time; callers pass DataFrames
    import pandas as pd

logger = logging.getLogger(__name__)

#: Largest side of an HTML thumbnail in pixels (bigger cutouts are shrunk by area averaging).
THUMBNAIL_SIDE = 192

#: Side of a cutout tile in the PNG grid (pixels): enlarged nearest-neighbour, shrunk by area.
GRID_TILE_SIDE = 192

#: Height of the caption strip under each tile of the PNG grid (pixels).
GRID_CAPTION_HEIGHT = 18

#: Gap between tiles and around the PNG grid (pixels).
GRID_GAP = 8

#: Statuses whose cutouts exist on disk.
SHOWN_STATUSES = ("ok", "partial")


def _check_index(index) -> None:
    if not arrow_tables.has_column(index, "status"):
        columns = index.column_names if isinstance(index, pa.Table) else list(index.columns)
        raise CutanaError(
            "gallery: the index has no 'status' column (columns: "
            f"{columns}); pass source_to_zarr_mapping.parquet"
        )


def _sample_positions(index, n_samples: int) -> np.ndarray:
    """Positions (into ``index``) of up to ``n_samples`` rows with an image, evenly spaced over
    the rows in ``row_index`` order (index order without that column). ``index`` is a
    DataFrame or a pyarrow Table (read without importing pandas: :mod:`cutana.arrow_tables`)."""
    status = np.array(arrow_tables.values_of(index, "status"), dtype=object)
    candidates = np.flatnonzero(np.isin(status, SHOWN_STATUSES))
    if arrow_tables.has_column(index, "row_index"):
        row_index = arrow_tables.int_column(index, "row_index")[candidates]
        candidates = candidates[np.argsort(row_index, kind="stable")]
    if n_samples <= 0 or candidates.size <= n_samples:
        return candidates[: max(n_samples, 0)]
    picks = np.unique(np.round(np.linspace(0, len(candidates) - 1, n_samples)).astype(int))
    return candidates[picks]


def select_samples(index_df: pd.DataFrame, n_samples: int) -> pd.DataFrame:
    """Up to ``n_samples`` rows with an image, evenly spaced over the index, in index order.

    Parameters
    ----------
    index_df : DataFrame
        The merged index (``status`` column); sorted by ``row_index`` when present so the choice
        does not depend on the order the batches finished in.
    n_samples : int

    Returns
    -------
    DataFrame
        The chosen rows (a copy).
    """
    _check_index(index_df)
    return index_df.iloc[_sample_positions(index_df, n_samples)].copy()


def _records(samples) -> list[dict]:
    """Rows of a DataFrame, a pyarrow Table or a list of mappings, as dicts."""
    if isinstance(samples, pa.Table):
        return samples.to_pylist()
    if hasattr(samples, "to_dict"):
        return samples.to_dict("records")
    return [dict(row) for row in samples]


def _zarr_array(path: Path):
    """The ``images`` array of a batch given its ``images.zarr``, batch folder or the array."""
    from .writers import ZarrShardReader

    if path.is_dir() and (path / "images.zarr").is_dir():
        path = path / "images.zarr"
    if path.name == "images" and (path.parent / "zarr.json").is_file():
        path = path.parent
    # Our own shards are read directly; Zarr (~0.4 s to import and open) only for others.
    return ZarrShardReader.open(path)


def _read_fits_image(path: Path) -> np.ndarray:
    """(H, W, C) from the image extensions of a cutout FITS file."""
    from astropy.io import fits  # lazy: only needed to read FITS outputs

    with fits.open(path) as hdul:
        planes = [hdu.data for hdu in hdul if hdu.is_image and hdu.data is not None]
        if not planes:
            raise CutanaError(f"gallery: {path} holds no image data")
        return np.stack([np.asarray(p) for p in planes], axis=-1)


def read_sample_images(output_dir: str | os.PathLike, samples) -> list[np.ndarray | None]:
    """Read each sample's image (H, W, C) from the outputs; None where it cannot be read.

    Parameters
    ----------
    output_dir : path-like
        The run's ``output_dir``; file columns are relative to it.
    samples : DataFrame, pyarrow.Table or list of mappings
        Index rows with ``zarr_file`` + ``idx_in_zarr``, or ``fits_file``.
    """
    output_dir = Path(output_dir)
    images: list[np.ndarray | None] = []
    arrays: dict[str, object] = {}
    for row in _records(samples):
        try:
            fits_file = row.get("fits_file")
            zarr_file = row.get("zarr_file")
            if isinstance(fits_file, str) and fits_file:
                images.append(_read_fits_image(output_dir / fits_file))
            elif isinstance(zarr_file, str) and zarr_file:
                if zarr_file not in arrays:
                    arrays[zarr_file] = _zarr_array(output_dir / zarr_file)
                images.append(np.asarray(arrays[zarr_file][int(row["idx_in_zarr"])]))
            else:
                raise CutanaError("no zarr_file or fits_file in the index row")
        except Exception as error:  # a preview must not fail the run: show a placeholder
            logger.warning("gallery: cannot read the cutout of %s: %s", row.get("SourceID"), error)
            images.append(None)
    return images


def display_image(image: np.ndarray) -> np.ndarray:
    """Scale a cutout (H, W, C) for display: float in [0, 1], RGB (H, W, 3) or grey (H, W).

    uint8 is divided by 255; float data are scaled by their finite minimum and maximum
    (non-finite pixels become 0). Three channels show as RGB, any other number as the grey mean.
    """
    data = np.asarray(image)
    if data.ndim == 2:
        data = data[:, :, None]
    if data.dtype == np.uint8:
        scaled = data.astype(np.float32) / 255.0
    else:
        scaled = data.astype(np.float32)
        finite = np.isfinite(scaled)
        if finite.any():
            low, high = float(scaled[finite].min()), float(scaled[finite].max())
            span = high - low
            scaled = (scaled - low) / span if span > 0 else np.zeros_like(scaled)
        scaled[~finite] = 0.0
        scaled = np.clip(scaled, 0.0, 1.0)
    if scaled.shape[-1] == 3:
        return scaled
    return scaled.mean(axis=-1)


def _thumbnail_png(image: np.ndarray) -> bytes:
    """PNG bytes of a display image, shrunk to at most :data:`THUMBNAIL_SIDE` pixels."""
    shown = display_image(image)
    height, width = shown.shape[:2]
    factor = THUMBNAIL_SIDE / max(height, width, 1)
    if factor < 1:
        size = (max(1, round(width * factor)), max(1, round(height * factor)))
        shown = cv2.resize(shown, size, interpolation=cv2.INTER_AREA)
    pixels = np.round(np.clip(shown, 0, 1) * 255).astype(np.uint8)
    # Rows run bottom-up in astronomy (origin="lower"): flip so north is up as in the PNG grid.
    pixels = pixels[::-1]
    if pixels.ndim == 3:
        pixels = cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR)
    ok, encoded = cv2.imencode(".png", np.ascontiguousarray(pixels))
    if not ok:  # pragma: no cover - OpenCV always encodes uint8 images
        raise CutanaError("gallery: PNG encoding of a thumbnail failed")
    return encoded.tobytes()


def _short(text: str, limit: int = 28) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


#: Colours of the PNG grid (RGB): page background, caption text, empty tile area, placeholder.
_PAGE, _INK, _TILE_BACKGROUND, _PLACEHOLDER = (255, 255, 255), (0, 0, 0), (0, 0, 0), (96, 96, 96)
_FONT = cv2.FONT_HERSHEY_SIMPLEX
_FONT_SCALE, _MIN_FONT_SCALE = 0.4, 0.3


def _ascii(text: str) -> str:
    """``text`` for a Hershey font: printable ASCII only, anything else becomes ``?``."""
    return "".join(c if " " <= c <= "~" else "?" for c in text.replace("…", "..."))


def _fit_text(text: str, width: int, suffix: str = "") -> tuple[str, float]:
    """``text + suffix`` and a font scale at which it fits ``width`` pixels.

    The font shrinks down to a legible minimum, then ``text`` (never ``suffix``) is truncated.
    """
    scale = _FONT_SCALE
    # Hershey glyph advances are rounded, so the width is not proportional to the scale: step.
    while scale > _MIN_FONT_SCALE and cv2.getTextSize(text + suffix, _FONT, scale, 1)[0][0] > width:
        scale = round(scale - 0.025, 3)
    while len(text) > 1 and cv2.getTextSize(text + suffix, _FONT, scale, 1)[0][0] > width:
        text = text[:-4] + "..." if len(text) > 4 else text[:-1]
    return text + suffix, scale


def _put_centred(
    canvas: np.ndarray, text: str, box: tuple[int, int, int, int], colour, suffix: str = ""
) -> None:
    """Draw ASCII ``text + suffix`` centred in ``box`` = (top, left, height, width)."""
    top, left, height, width = box
    text, scale = _fit_text(text, width - 4, suffix)
    (text_width, text_height), _ = cv2.getTextSize(text, _FONT, scale, 1)
    origin = (left + (width - text_width) // 2, top + (height + text_height) // 2)
    cv2.putText(canvas, text, origin, _FONT, scale, colour, 1, cv2.LINE_AA)


def _tile_pixels(image: np.ndarray, side: int = GRID_TILE_SIDE) -> np.ndarray:
    """(h, w, 3) uint8 RGB of a cutout scaled so its longer side is ``side``, north up."""
    shown = display_image(image)
    height, width = shown.shape[:2]
    if height == 0 or width == 0:
        raise CutanaError(f"gallery: empty cutout of shape {np.shape(image)}")
    factor = side / max(height, width)
    size = (max(1, round(width * factor)), max(1, round(height * factor)))
    if size != (width, height):
        # Enlarge by repeating pixels (what the data are); shrink by area averaging.
        method = cv2.INTER_NEAREST if factor >= 1 else cv2.INTER_AREA
        shown = cv2.resize(np.ascontiguousarray(shown), size, interpolation=method)
    pixels = np.round(np.clip(shown, 0, 1) * 255).astype(np.uint8)
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[:, :, None], 3, axis=2)
    # Row 0 of a cutout is its bottom (origin="lower"): flip so north is up.
    return pixels[::-1]


def _grid_shape(n_images: int) -> tuple[int, int]:
    """(rows, columns) of the PNG grid: ``ceil(sqrt(n))`` columns."""
    columns = math.ceil(math.sqrt(n_images))
    return math.ceil(n_images / columns), columns


def _compose_grid(samples: list[dict], images: list) -> np.ndarray:
    """The PNG grid as an (H, W, 3) uint8 RGB array."""
    if not images:
        canvas = np.full((80, 360, 3), _PAGE, np.uint8)
        _put_centred(canvas, "No cutouts with status ok or partial", (0, 0, 80, 360), _INK)
        return canvas
    rows, columns = _grid_shape(len(images))
    tile, caption, gap = GRID_TILE_SIDE, GRID_CAPTION_HEIGHT, GRID_GAP
    canvas = np.full(
        (rows * (tile + caption) + (rows + 1) * gap, columns * tile + (columns + 1) * gap, 3),
        _PAGE,
        np.uint8,
    )
    for k, (row, image) in enumerate(zip(_records(samples), images, strict=True)):
        top = gap + (k // columns) * (tile + caption + gap)
        left = gap + (k % columns) * (tile + gap)
        pixels = None
        if image is not None:
            try:
                pixels = _tile_pixels(image, tile)
            except Exception as error:  # a preview must not fail the run: show a placeholder
                logger.warning("gallery: cannot draw %s: %s", row.get("SourceID"), error)
        if pixels is None:
            canvas[top : top + tile, left : left + tile] = _PLACEHOLDER
            _put_centred(canvas, "unavailable", (top, left, tile, tile), _PAGE)
        else:
            canvas[top : top + tile, left : left + tile] = _TILE_BACKGROUND
            height, width = pixels.shape[:2]
            y, x = top + (tile - height) // 2, left + (tile - width) // 2
            canvas[y : y + height, x : x + width] = pixels
        suffix = " (partial)" if row.get("status") == "partial" else ""
        title = _ascii(_short(str(row.get("SourceID", ""))))
        _put_centred(canvas, title, (top + tile, left, caption, tile), _INK, suffix)
    return canvas


def _render_png(path: Path, samples: list[dict], images: list) -> None:
    canvas = _compose_grid(samples, images)
    # OpenCV encodes BGR; PNG from imencode carries no date or software chunk (reproducible).
    ok, encoded = cv2.imencode(".png", cv2.cvtColor(canvas, cv2.COLOR_RGB2BGR))
    if not ok:  # pragma: no cover - OpenCV always encodes uint8 images
        raise CutanaError("gallery: PNG encoding of the grid failed")
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_bytes(encoded.tobytes())
    os.replace(tmp, path)


def _render_html(path: Path, samples: list[dict], images: list, n_total: int) -> None:
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8"><title>cutana gallery</title>',
        "<style>body{font-family:sans-serif;margin:1em}"
        ".grid{display:flex;flex-wrap:wrap;gap:12px}"
        "figure{margin:0;width:200px;text-align:center}"
        "img{width:192px;height:192px;object-fit:contain;image-rendering:pixelated;"
        "background:#000}figcaption{font-size:12px;word-break:break-all}</style>",
        "</head><body>",
        "<h1>cutana gallery</h1>",
    ]
    if not images:
        parts.append("<p>No cutouts with status ok or partial: nothing to show.</p>")
    else:
        parts.append(
            f"<p>{len(images)} of {n_total} cutouts with status ok or partial, "
            "evenly spaced over the catalogue.</p>"
        )
        parts.append('<div class="grid">')
        for row, image in zip(_records(samples), images, strict=True):
            source_id = html.escape(str(row.get("SourceID", "")))
            status = html.escape(str(row.get("status", "")))
            if image is None:
                picture = "<div>unavailable</div>"
            else:
                encoded = base64.b64encode(_thumbnail_png(image)).decode("ascii")
                picture = f'<img src="data:image/png;base64,{encoded}" alt="{source_id}">'
            parts.append(
                f"<figure>{picture}<figcaption>{source_id}<br>{status}</figcaption></figure>"
            )
        parts.append("</div>")
    parts.append("</body></html>")
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_text("\n".join(parts) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def make_gallery(
    output_dir: str | os.PathLike,
    index,
    cfg: Mapping,
    n_samples: int | None = None,
) -> tuple[Path, Path]:
    """Write ``gallery.png`` and ``gallery.html`` of sample cutouts into ``output_dir``.

    Parameters
    ----------
    output_dir : path-like
        The run's output directory (file paths in the index are relative to it).
    index : DataFrame or pyarrow.Table
        The merged index: ``SourceID``, ``status``, ``zarr_file`` + ``idx_in_zarr`` or
        ``fits_file`` (the workflow passes an Arrow table, so its job never imports pandas).
    cfg : mapping
        The run's configuration (``gallery.n_samples`` is the default sample count).
    n_samples : int, optional
        How many sources to show at most.

    Returns
    -------
    (pathlib.Path, pathlib.Path)
        Paths of the PNG grid and the HTML page. Unreadable cutouts show as "unavailable";
        with no ok/partial source both files say that there is nothing to show.
    """
    if n_samples is None:
        n_samples = int((cfg.get("gallery") or {}).get("n_samples", 36))
    _check_index(index)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    positions = _sample_positions(index, n_samples)
    if isinstance(index, pa.Table):
        samples = index.take(arrow_tables.numeric_array(positions, np.int64)).to_pylist()
    else:
        samples = _records(index.iloc[positions])
    images = read_sample_images(output_dir, samples)
    status = np.array(arrow_tables.values_of(index, "status"), dtype=object)
    n_total = int(np.isin(status, SHOWN_STATUSES).sum())
    png_path = output_dir / "gallery.png"
    html_path = output_dir / "gallery.html"
    _render_png(png_path, samples, images)
    _render_html(html_path, samples, images, n_total)
    return png_path, html_path
