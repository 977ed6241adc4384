"""Turn cutout arrays and channel weights into things a browser can show (PNG bytes, colours).

Pure functions with no widget imports, so they are cheap to test.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from PIL import Image

#: Display colour of output channels 0, 1, 2 (the RGB convention of upstream Cutana).
CHANNEL_COLOURS = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255]], dtype=float)


def to_display_rgb(image: np.ndarray) -> np.ndarray:
    """Convert one cutout of shape (H, W, C) or (H, W) to an 8-bit RGB array for display.

    Parameters
    ----------
    image : ndarray
        A cutout as produced by the engine: float32 (normally in [0, 1] after a stretch) or
        uint8 (0-255). One channel is shown as grey, three as RGB, two as red/green, more than
        three as the first three.

    Returns
    -------
    ndarray
        uint8 array of shape (H, W, 3).

    Notes
    -----
    Float data outside [0, 1] (normalisation ``none`` keeps physical values) is min-max scaled
    over the finite pixels so the preview still shows structure; NaNs become black.
    """
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3:
        raise ValueError(f"expected an image of shape (H, W) or (H, W, C), got {arr.shape}")
    if arr.dtype == np.uint8:
        scaled = arr.astype(np.float64) / 255.0
    else:
        scaled = arr.astype(np.float64)
        finite = np.isfinite(scaled)
        if finite.any():
            lo, hi = scaled[finite].min(), scaled[finite].max()
            # Only rescale when the values are not already a [0, 1] stretch result; rescaling a
            # stretched image would hide what the user's normalisation parameters do.
            if lo < 0.0 or hi > 1.0:
                scaled = (scaled - lo) / (hi - lo) if hi > lo else np.zeros_like(scaled)
        scaled = np.where(finite, scaled, 0.0)
    scaled = np.clip(scaled, 0.0, 1.0)
    n_channels = scaled.shape[2]
    if n_channels == 1:
        rgb = np.repeat(scaled, 3, axis=2)
    elif n_channels == 2:
        rgb = np.concatenate([scaled, np.zeros_like(scaled[:, :, :1])], axis=2)
    else:
        rgb = scaled[:, :, :3]
    return np.round(rgb * 255.0).astype(np.uint8)


def png_bytes(image: np.ndarray, size: int | None = None) -> bytes:
    """Encode one cutout as PNG bytes, optionally resized (nearest) to ``size`` pixels square.

    Parameters
    ----------
    image : ndarray
        Cutout of shape (H, W, C) or (H, W); see :func:`to_display_rgb`.
    size : int, optional
        Edge length of the PNG. Nearest-neighbour so that pixels stay visible as pixels.

    Returns
    -------
    bytes
        The PNG file content.
    """
    pil = Image.fromarray(to_display_rgb(image), mode="RGB")
    if size is not None and pil.size != (size, size):
        pil = pil.resize((int(size), int(size)), Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    pil.save(buffer, format="PNG")
    return buffer.getvalue()


def placeholder_png(size: int = 64, shade: int = 40) -> bytes:
    """A uniform dark square shown before the first preview exists."""
    return png_bytes(np.full((size, size, 1), shade, dtype=np.uint8))


def weights_to_colour(weights: Sequence[float]) -> str:
    """The display colour (CSS hex) a band contributes to the output, from its channel weights.

    Parameters
    ----------
    weights : sequence of float
        The band's weight for each output channel. One channel maps to grey; channels 0, 1, 2
        map to red, green, blue (further channels are not displayed).

    Returns
    -------
    str
        ``"#rrggbb"``; each weight is clipped to [0, 1] for display (weights above 1 are allowed
        in the configuration, they only saturate the swatch).
    """
    w = np.clip(np.nan_to_num(np.asarray(list(weights), dtype=float)), 0.0, 1.0)
    if w.size == 0:
        rgb = np.zeros(3)
    elif w.size == 1:
        rgb = np.full(3, 255.0 * w[0])
    else:
        rgb = w[:3] @ CHANNEL_COLOURS[: min(3, w.size)]
    rgb = np.clip(np.round(rgb), 0, 255).astype(int)
    return "#{:02x}{:02x}{:02x}".format(*rgb)


def format_eta(seconds: float | None) -> str:
    """Human readable duration (``"1h 02m"``, ``"3m 05s"``, ``"12s"``), ``"–"`` when unknown."""
    if seconds is None or not np.isfinite(seconds) or seconds < 0:
        return "–"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s"
