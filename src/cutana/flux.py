"""Conversion of image counts to physical flux density (SPEC §6)."""

from __future__ import annotations

import numpy as np

#: Flux density of an AB magnitude of 0, in Jansky.
AB_ZERO_FLUX_JY = 3631.0


def flux_conversion_factor(zeropoint: float) -> float:
    """Factor that turns a pixel value into Jansky: ``10**(-0.4 * ZP) * 3631``.

    Parameters
    ----------
    zeropoint : float
        AB magnitude zero point of the image (a pixel value of 1 has magnitude ``ZP``).

    Returns
    -------
    float

    Raises
    ------
    ValueError
        If the zero point is not finite.
    """
    zeropoint = float(zeropoint)
    if not np.isfinite(zeropoint):
        raise ValueError(f"AB zero point must be a finite number, got {zeropoint!r}")
    return 10.0 ** (-0.4 * zeropoint) * AB_ZERO_FLUX_JY
