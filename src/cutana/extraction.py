"""Vectorised stamp planning and extraction (SPEC §6).

Sizes, positions and windows are computed for a whole batch at once with numpy. Windows follow
astropy's ``overlap_slices(large_shape, (S, S), (y, x), mode="partial")`` exactly (and hence
``Cutout2D(..., mode="partial")``): the stamp's first pixel is at
``ceil(position - S / 2)`` on each axis, its last at that plus ``S - 1``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from . import arrow_tables
from .exceptions import CatalogueValidationError


def stamp_sizes(cat, pixel_scales: np.ndarray, padding_factor: float = 1.0) -> np.ndarray:
    """Stamp side ``S`` in pixels for every source and band.

    ``S = diameter_pixel`` or ``round(diameter_arcsec / pixel_scale)``, then
    ``S = round(S * padding_factor)``, at least 1. ``diameter_pixel`` wins where both are given.
    Rounding is numpy's (half to even, like Python's ``round``).

    Parameters
    ----------
    cat : DataFrame or mapping of str to ndarray
        Rows with ``diameter_pixel`` and/or ``diameter_arcsec`` columns (nulls allowed where
        the other column is set); a mapping holds float arrays of equal length (NaN = null).
    pixel_scales : array_like, shape (B,) or (N, B)
        Pixel scale in arcsec of each band's image (per row when files differ between rows).
    padding_factor : float
        Multiplier applied to the size.

    Returns
    -------
    ndarray of int64, shape (N, B)

    Raises
    ------
    CatalogueValidationError
        If a row has no usable (positive, finite) size.
    """
    if isinstance(cat, Mapping):
        n_rows = len(next(iter(cat.values()))) if cat else 0
    else:
        n_rows = len(cat)
    scales = np.asarray(pixel_scales, dtype=np.float64)
    if scales.ndim == 1:
        scales = np.broadcast_to(scales, (n_rows, scales.shape[0]))
    n_bands = scales.shape[1]

    def column(name: str) -> np.ndarray:
        if not isinstance(cat, Mapping):  # a DataFrame or a pyarrow Table
            return arrow_tables.float_column(cat, name)
        if name not in cat:
            return np.full(n_rows, np.nan)
        return np.asarray(cat[name], dtype=np.float64)

    pixels = column("diameter_pixel")
    arcsec = column("diameter_arcsec")
    use_pixels = np.isfinite(pixels) & (pixels > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        from_arcsec = np.rint(arcsec[:, None] / scales)
    base = np.where(use_pixels[:, None], pixels[:, None], from_arcsec)
    usable_arcsec = np.isfinite(arcsec) & (arcsec > 0)
    # A tiny but positive diameter may round to 0 pixels: that is clamped to 1 below, not an
    # error; only rows without any positive, finite diameter are.
    bad = ~(use_pixels | (usable_arcsec & np.isfinite(scales).all(axis=1) & (scales > 0).all(1)))
    if bad.any():
        rows = np.flatnonzero(bad)[:10].tolist()
        raise CatalogueValidationError(
            f"rows {rows} (0-based within the batch) have no usable stamp size: "
            f"diameter_pixel={pixels[bad][:10].tolist()}, "
            f"diameter_arcsec={arcsec[bad][:10].tolist()}. Fix: give a positive, finite "
            "'diameter_pixel' or 'diameter_arcsec' for every source."
        )
    sizes = np.rint(np.where(bad[:, None], 1.0, base) * float(padding_factor))
    return np.maximum(sizes, 1).astype(np.int64).reshape(n_rows, n_bands)


@dataclass
class StampWindows:
    """Where each stamp lies in its image (all arrays have one entry per stamp).

    Attributes
    ----------
    size : ndarray of int64
        Stamp side ``S``.
    origin_x, origin_y : ndarray of int64
        Image index of the stamp's pixel ``[0, 0]`` (may be negative; Cutout2D's
        ``origin_original``).
    large_x0, large_x1, large_y0, large_y1 : ndarray of int64
        The overlapping region in the image, ``image[y0:y1, x0:x1]``.
    small_x0, small_y0 : ndarray of int64
        Where that region starts inside the stamp.
    no_overlap : ndarray of bool
        True where the stamp misses the image entirely (astropy raises ``NoOverlapError``);
        the large/small bounds are then empty.
    """

    size: np.ndarray
    origin_x: np.ndarray
    origin_y: np.ndarray
    large_x0: np.ndarray
    large_x1: np.ndarray
    large_y0: np.ndarray
    large_y1: np.ndarray
    small_x0: np.ndarray
    small_y0: np.ndarray
    no_overlap: np.ndarray

    def __len__(self) -> int:
        return len(self.size)

    @property
    def partial(self) -> np.ndarray:
        """True where the stamp overlaps the image but crosses its edge."""
        width = self.large_x1 - self.large_x0
        height = self.large_y1 - self.large_y0
        return ~self.no_overlap & ((width < self.size) | (height < self.size))

    def take(self, indices) -> StampWindows:
        """The windows of the stamps at ``indices`` (an index array or boolean mask)."""
        return StampWindows(**{name: getattr(self, name)[indices] for name in _WINDOW_FIELDS})


_WINDOW_FIELDS = (
    "size",
    "origin_x",
    "origin_y",
    "large_x0",
    "large_x1",
    "large_y0",
    "large_y1",
    "small_x0",
    "small_y0",
    "no_overlap",
)


def stamp_windows(x, y, size, shape: tuple[int, int]) -> StampWindows:
    """Vectorised ``overlap_slices(shape, (S, S), (y, x), mode="partial")``.

    Parameters
    ----------
    x, y : array_like of float
        0-based pixel positions of the stamp centres (``wcs.all_world2pix(..., 0)``).
    size : array_like of int
        Stamp sides ``S`` (scalar or one per position).
    shape : tuple of int
        ``(ny, nx)`` of the image.

    Returns
    -------
    StampWindows
        Non-finite positions are reported as ``no_overlap``.
    """
    x = np.atleast_1d(np.asarray(x, dtype=np.float64))
    y = np.atleast_1d(np.asarray(y, dtype=np.float64))
    size = np.broadcast_to(np.asarray(size, dtype=np.int64), x.shape).copy()
    ny, nx = int(shape[0]), int(shape[1])
    finite = np.isfinite(x) & np.isfinite(y)
    x_safe = np.where(finite, x, 0.0)
    y_safe = np.where(finite, y, 0.0)
    # astropy: indices_min = int(ceil(pos - S / 2)), indices_max = indices_min + S
    origin_x = np.ceil(x_safe - size / 2.0).astype(np.int64)
    origin_y = np.ceil(y_safe - size / 2.0).astype(np.int64)
    end_x = origin_x + size
    end_y = origin_y + size
    no_overlap = (
        ~finite | (end_x <= 0) | (end_y <= 0) | (origin_x >= nx) | (origin_y >= ny) | (size <= 0)
    )
    large_x0 = np.clip(origin_x, 0, nx)
    large_x1 = np.clip(end_x, 0, nx)
    large_y0 = np.clip(origin_y, 0, ny)
    large_y1 = np.clip(end_y, 0, ny)
    # Empty regions for stamps that miss the image, so reading them is a no-op.
    large_x1 = np.where(no_overlap, large_x0, large_x1)
    large_y1 = np.where(no_overlap, large_y0, large_y1)
    small_x0 = np.where(no_overlap, 0, large_x0 - origin_x)
    small_y0 = np.where(no_overlap, 0, large_y0 - origin_y)
    return StampWindows(
        size=size,
        origin_x=origin_x,
        origin_y=origin_y,
        large_x0=large_x0,
        large_x1=large_x1,
        large_y0=large_y0,
        large_y1=large_y1,
        small_x0=small_x0,
        small_y0=small_y0,
        no_overlap=no_overlap,
    )


def extract_stamps(
    handle, windows: StampWindows, fill: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """Cut stamps of one common size out of an image.

    Each stamp costs exactly one read of its overlapping region (``handle.read``), so memory is
    bounded by the stamps, never by the image.

    Parameters
    ----------
    handle : ImageHandle
        Anything with ``read(y0, y1, x0, x1) -> float32 ndarray``.
    windows : StampWindows
        Windows of K stamps, all of the same size ``S``.
    fill : float
        Value of invalid pixels (outside the image, NaN or inf).

    Returns
    -------
    stamps : ndarray of float32, shape (K, S, S)
    valid : ndarray of bool, shape (K, S, S)
        True where the pixel lies inside the image and is finite.

    Raises
    ------
    ValueError
        If the windows do not share one size.
    """
    n_stamps = len(windows)
    sizes = np.unique(windows.size)
    if n_stamps and len(sizes) != 1:
        raise ValueError(f"extract_stamps needs windows of one size, got sizes {sizes.tolist()}")
    side = int(sizes[0]) if n_stamps else 0
    stamps = np.full((n_stamps, side, side), np.float32(fill), dtype=np.float32)
    valid = np.zeros((n_stamps, side, side), dtype=bool)
    bounds = np.stack(
        [
            windows.large_y0,
            windows.large_y1,
            windows.large_x0,
            windows.large_x1,
            windows.small_y0,
            windows.small_x0,
        ],
        axis=1,
    ).tolist()
    # Read in image order (rows, then columns): neighbouring windows share compression tiles
    # and pages, which the image handle's caches (and the OS) then reuse.
    order = np.lexsort((windows.large_x0, windows.large_y0)) if n_stamps else []
    read_into = getattr(handle, "read_into", None)
    for k in order:
        y0, y1, x0, x1, sy0, sx0 = bounds[k]
        if y1 <= y0 or x1 <= x0:
            continue
        target = (k, slice(sy0, sy0 + (y1 - y0)), slice(sx0, sx0 + (x1 - x0)))
        # Read straight into the stamp (no temporary window), then mark non-finite pixels.
        destination = stamps[target]
        if read_into is not None:
            read_into(destination, y0, y1, x0, x1)
        else:
            destination[...] = handle.read(y0, y1, x0, x1)
        finite = np.isfinite(destination)
        valid[target] = finite
        if not finite.all():
            destination[~finite] = np.float32(fill)
    return stamps, valid
