"""Mixing of resampled bands into output channels (SPEC §6).

``out[c] = sum_b weights[b, c] * band_b``. Weights are used as given (not normalised). A band
whose weight for channel ``c`` is exactly 0 never affects ``c``: its invalid or NaN pixels
neither change the value nor invalidate the pixel.
"""

from __future__ import annotations

import numpy as np


def mix_channels(
    bands: np.ndarray, valid: np.ndarray, weights: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Combine ``B`` bands into ``C`` output channels with a weight matrix.

    Parameters
    ----------
    bands : ndarray, shape (N, B, T, T)
        Resampled band images (converted to float32); values under ``valid == False`` may be
        anything, including NaN.
    valid : ndarray of bool, shape (N, B, T, T)
        True where a band pixel holds real data. Non-finite values count as invalid.
    weights : array_like, shape (B, C)
        ``weights[b, c]`` multiplies band ``b`` in channel ``c`` (the config's
        ``channel_weights`` as a matrix, bands in key order).

    Returns
    -------
    images : ndarray of float32, shape (N, T, T, C)
        Mixed channels; 0 where the pixel is invalid. A single channel that is one band with
        weight 1 may share memory with ``bands``.
    valid_out : ndarray of bool, shape (N, T, T, C)
        A pixel of channel ``c`` is valid iff every band with a nonzero weight for ``c`` is
        valid there (a channel whose weights are all 0 is valid everywhere and 0).

    Raises
    ------
    ValueError
        If the shapes do not agree or the weights are not finite.

    See Also
    --------
    mix_planes : the same with channel planes (N, C, T, T) out, as the engine calls it.
    """
    planes, planes_valid = mix_planes(bands, valid, weights)
    n, n_channels, height, width = planes.shape
    shape = (n, height, width, n_channels)
    if n_channels == 1:
        # (N, 1, T, T) and (N, T, T, 1) have the same memory layout: no copy.
        images = planes.reshape(shape)
    else:
        images = interleave_planes(planes)
    if planes_valid is None:
        valid_out = np.ones(shape, dtype=bool)
    elif n_channels == 1:
        valid_out = planes_valid.reshape(shape)
    else:
        valid_out = interleave_planes(planes_valid)
    return images, valid_out


def mix_planes(
    bands: np.ndarray, valid: np.ndarray, weights: np.ndarray, finite: bool = False
) -> tuple[np.ndarray, np.ndarray | None]:
    """:func:`mix_channels` with channel planes out: (N, C, T, T) images and validity.

    ``finite=True`` promises that every value of ``bands`` is finite and 0 wherever ``valid``
    is False (as :func:`cutana.resample.resample_stack` returns them), which saves a pass over
    the data and the zeroed copies of bands with invalid pixels.

    Returns
    -------
    planes : ndarray of float32, shape (N, C, T, T)
        The mixed channels. When every channel is one band with weight 1, in band order (the
        usual one band per channel), this is ``bands`` itself (no copy).
    planes_valid : ndarray of bool, shape (N, C, T, T), or None
        Validity as in :func:`mix_channels`; None when every pixel of every channel is valid;
        ``valid`` itself when ``planes`` is ``bands`` and ``finite=True``.
    """
    bands = np.asarray(bands, dtype=np.float32)
    valid = np.asarray(valid, dtype=bool)
    weights = np.asarray(weights, dtype=np.float64)
    if bands.ndim != 4:
        raise ValueError(f"bands must have shape (N, B, T, T), got {bands.shape}")
    if valid.shape != bands.shape:
        raise ValueError(f"valid has shape {valid.shape} but bands have shape {bands.shape}")
    if weights.ndim != 2 or weights.shape[0] != bands.shape[1]:
        raise ValueError(
            f"weights must have shape (B={bands.shape[1]}, C), got {weights.shape}: give every "
            "band one weight per output channel"
        )
    if not np.all(np.isfinite(weights)):
        raise ValueError(f"channel weights must be finite numbers, got {weights.tolist()}")
    n, n_bands, height, width = bands.shape
    n_channels = weights.shape[1]
    # Per band: the data with invalid pixels zeroed (a view when the band is fully valid, the
    # common case) and its validity (None when fully valid).
    clean: dict[int, np.ndarray] = {}
    band_valid: dict[int, np.ndarray | None] = {}
    bands_views = {}
    for band in np.flatnonzero(np.any(weights != 0, axis=1)).tolist():
        data = bands_views[band] = bands[:, band]
        ok = valid[:, band]
        if not finite:
            is_finite = np.isfinite(data)  # one SIMD pass, 4x faster than a float64 sum
            if not is_finite.all():
                ok = ok & is_finite
            del is_finite
        if ok.all():
            clean[band], band_valid[band] = data, None
        elif finite:
            clean[band], band_valid[band] = data, ok  # already 0 where invalid
        else:
            clean[band], band_valid[band] = np.where(ok, data, np.float32(0)), ok
    # A multiply-add per (band, channel) pair with a nonzero weight on contiguous planes is
    # memory-bound and much faster than a tensordot; a channel that is one band with weight 1
    # is that band's plane without arithmetic. A zero weight never lets a NaN (or an invalid
    # pixel) through.
    planes, plane_valid = [], []
    as_band = []  # per channel: whether it is band ``channel`` itself, unchanged
    for channel in range(n_channels):
        used = np.flatnonzero(weights[:, channel]).tolist()
        ok = None
        for band in used:
            if band_valid[band] is not None:
                ok = band_valid[band] if ok is None else ok & band_valid[band]
        if len(used) == 1 and weights[used[0], channel] == 1:
            plane = clean[used[0]]
            as_band.append(used[0] == channel and plane is bands_views[channel])
        else:
            as_band.append(False)
            plane = np.zeros((n, height, width), dtype=np.float32)
            for band in used:
                weight = np.float32(weights[band, channel])
                plane += clean[band] if weight == 1 else weight * clean[band]
        if ok is not None and len(used) > 1:
            # A single band is already 0 where invalid; a sum may hold a valid band's value.
            plane = np.where(ok, plane, np.float32(0))
        planes.append(plane)
        plane_valid.append(ok)
    if n_channels == n_bands and all(as_band):
        mixed = bands  # one band per channel, in order: the bands are the planes
    else:
        mixed = np.empty((n, n_channels, height, width), dtype=np.float32)
        for channel, plane in enumerate(planes):
            mixed[:, channel] = plane
    if all(ok is None for ok in plane_valid):
        return mixed, None
    if mixed is bands and finite:
        # One band per channel, in order: each channel's validity is its band's.
        return mixed, valid
    mixed_valid = np.ones((n, n_channels, height, width), dtype=bool)
    for channel, ok in enumerate(plane_valid):
        if ok is not None:
            mixed_valid[:, channel] = ok
    return mixed, mixed_valid


def interleave_planes(planes: np.ndarray) -> np.ndarray:
    """(N, C, H, W) planes as one (N, H, W, C) array (channel last), of the planes' dtype."""
    n, n_channels, height, width = planes.shape
    dtype = bool if planes.dtype == bool else planes.dtype
    return _interleave(
        [planes[:, c] for c in range(n_channels)], dtype, (n, height, width, n_channels)
    )


def _interleave(planes: list[np.ndarray], dtype, shape: tuple[int, ...]) -> np.ndarray:
    """Stack C planes (N, H, W) into one (N, H, W, C) array (channel last).

    OpenCV's ``merge`` interleaves one image's planes with SIMD, ~10x faster than NumPy's
    strided copy of a transposed batch; booleans go through it as uint8.
    """
    import cv2

    out = np.empty(shape, dtype=dtype)
    if shape[-1] == 1:
        out[..., 0] = planes[0]
        return out
    if shape[-1] > 4 or shape[1] == 0 or shape[2] == 0:
        for channel, plane in enumerate(planes):
            out[..., channel] = plane
        return out
    view = out.view(np.uint8) if dtype is bool else out
    sources = [
        np.ascontiguousarray(plane).view(np.uint8) if dtype is bool else plane for plane in planes
    ]
    for i in range(shape[0]):
        cv2.merge([np.ascontiguousarray(plane[i]) for plane in sources], dst=view[i])
    return out
