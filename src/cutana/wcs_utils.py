"""WCS of a cutout: the parent's celestial WCS shifted to the stamp and scaled by resampling.

A stamp of side ``S`` whose pixel ``[0, 0]`` is the parent's pixel ``(x0, y0)`` (0-based,
possibly negative) and which is resampled to ``T x T`` pixels (``scale = T / S``) maps output
pixel ``j`` to parent pixel ``x0 + (j + 0.5) / scale - 0.5`` on each axis (half-pixel-centre
convention, as OpenCV's resize). In 1-based FITS terms that is

* ``CRPIX' = (CRPIX - origin - 0.5) * scale + 0.5``,
* ``CD' = CD / scale`` (or ``CDELT' = CDELT / scale``; PC unchanged),
* SIP: the polynomials act on ``u = pixel - CRPIX`` and return pixel offsets, so in output
  pixels ``A'_pq = A_pq * scale**(1 - p - q)`` (same for B); the inverse ``AP``/``BP`` likewise.
"""

from __future__ import annotations

import copy

import numpy as np
from astropy.wcs import WCS, Sip


def _scale_sip_matrix(matrix: np.ndarray | None, scale: float) -> np.ndarray | None:
    """Scale SIP coefficients ``M[p, q]`` by ``scale**(1 - p - q)``."""
    if matrix is None:
        return None
    matrix = np.asarray(matrix, dtype=np.float64)
    p = np.arange(matrix.shape[0])[:, None]
    q = np.arange(matrix.shape[1])[None, :]
    return matrix * scale ** (1.0 - p - q)


def cutout_wcs(parent_wcs: WCS, x0: float, y0: float, scale: float = 1.0) -> WCS:
    """Return the celestial WCS of a cutout.

    Parameters
    ----------
    parent_wcs : astropy.wcs.WCS
        WCS of the image the stamp was cut from (its celestial part is used).
    x0, y0 : float
        Parent pixel index (0-based) of the stamp's pixel ``[0, 0]`` (Cutout2D's
        ``origin_original``; negative for stamps that cross the lower edges).
    scale : float
        Resampling factor ``T / S`` (output pixels per stamp pixel), > 0.

    Returns
    -------
    astropy.wcs.WCS
        A new WCS; the parent is not modified. Pixel-distortion lookup tables (``CPDIS``,
        ``D2IM``) are dropped because they are tied to the parent's pixel grid.

    Raises
    ------
    ValueError
        If ``scale`` is not a positive finite number.
    """
    scale = float(scale)
    if not np.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale (T / S) must be a positive number, got {scale!r}")
    wcs = copy.deepcopy(parent_wcs.celestial)
    wcs.cpdis1 = wcs.cpdis2 = None
    wcs.det2im1 = wcs.det2im2 = None
    crpix = np.array(wcs.wcs.crpix, dtype=np.float64) - np.array([x0, y0], dtype=np.float64)
    crpix = (crpix - 0.5) * scale + 0.5
    wcs.wcs.crpix = crpix
    if scale != 1.0:
        if wcs.wcs.has_cd():
            wcs.wcs.cd = np.array(wcs.wcs.cd) / scale
        else:
            wcs.wcs.cdelt = np.array(wcs.wcs.cdelt) / scale
    if wcs.sip is not None:
        sip = wcs.sip
        wcs.sip = Sip(
            _scale_sip_matrix(sip.a, scale),
            _scale_sip_matrix(sip.b, scale),
            _scale_sip_matrix(sip.ap, scale),
            _scale_sip_matrix(sip.bp, scale),
            crpix,
        )
    wcs.wcs.set()
    return wcs


def wcs_to_header_text(wcs: WCS) -> str:
    """Serialise a WCS as FITS header text (SIP kept via ``relax=True``).

    Parameters
    ----------
    wcs : astropy.wcs.WCS

    Returns
    -------
    str
        ``Header.tostring(sep="\\n")``; rebuild with
        ``WCS(fits.Header.fromstring(text, sep="\\n"))``.
    """
    return wcs.to_header(relax=True).tostring(sep="\n")
