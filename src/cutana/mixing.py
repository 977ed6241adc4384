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
        Mixed channels; 0 where the pixel is invalid.
    valid_out : ndarray of bool, shape (N, T, T, C)
        A pixel of channel ``c`` is valid iff every band with a nonzero weight for ``c`` is
        valid there (a channel whose weights are all 0 is valid everywhere and 0).

    Raises
    ------
    ValueError
        If the shapes do not agree or the weights are not finite.
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
    images = np.zeros((n, height, width, n_channels), dtype=np.float32)
    valid_out = np.ones((n, height, width, n_channels), dtype=bool)
    # A few bands and channels: a multiply-add per (band, channel) pair with a nonzero weight is
    # memory-bound and much faster than a tensordot, which would transpose the whole batch.
    # Invalid data is zeroed once per band, so a zero weight never lets a NaN through.
    for band in range(n_bands):
        used_by = np.flatnonzero(weights[band])
        if used_by.size == 0:
            continue
        band_valid = valid[:, band] & np.isfinite(bands[:, band])
        clean = np.where(band_valid, bands[:, band], np.float32(0))
        for channel in used_by:
            images[..., channel] += np.float32(weights[band, channel]) * clean
            valid_out[..., channel] &= band_valid
    images[~valid_out] = 0.0
    return images, valid_out
