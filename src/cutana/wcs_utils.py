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
import math
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from astropy.wcs import WCS

# astropy is imported inside the functions that need it: a cutout job whose batch carries the
# header templates made by split_catalogue (CutoutHeaderTemplate.from_state) never imports it
# (~0.5 s of its start-up).


def format_header_float(value: float) -> str:
    """The text of a float card value, exactly as astropy writes it (``card._format_float``).

    ``str(value)`` with ``E`` for the exponent, cut to at most 20 characters (mantissa digits
    go first). Kept here so header text can be made without importing astropy.io.fits;
    ``tests/test_wcs.py`` checks it against astropy's function.
    """
    text = str(value).replace("e", "E")
    if len(text) > 20:
        exponent = text.find("E")
        if exponent < 0:
            text = text[:20]
        else:
            text = text[: 20 - (len(text) - exponent)] + text[exponent:]
    return text


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
    from astropy.wcs import Sip

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


class CutoutHeaderTemplate:
    """Fast :func:`wcs_to_header_text` of many cutouts of one parent image.

    Building and serialising a WCS per cutout costs ~2 ms (astropy/wcslib); a batch has
    thousands. The header text of a cutout differs from that of the parent's cutout at origin
    0 and scale 1 only in the values of a few cards: ``CRPIX`` (shifted and scaled) and cards
    that scale as a power of ``scale`` (``CD``/``PC``/``CDELT``: ``-1``; SIP ``A_p_q``:
    ``1 - p - q``, ...). Those powers are found by serialising the parent at two scales and
    checked at a third scale and origin; when the check fails (an unusual WCS) every call
    falls back to the exact slow path.

    Parameters
    ----------
    parent_wcs : astropy.wcs.WCS
        WCS of the image the stamps are cut from.
    """

    def __init__(self, parent_wcs: WCS | None) -> None:
        self._parent = parent_wcs
        self._lines: list[str] | None = None
        self._slots: list[tuple[int, str, str, float, int | None]] = []
        # The lines that depend on the scale only, per scale: a batch has few stamp sizes.
        self._scaled_lines: dict[float, list[tuple[int, str]]] = {}
        if parent_wcs is None:  # from_state fills the template
            return
        try:
            self._build()
            if not self._check():
                self._lines = None
        except Exception:  # noqa: BLE001 - any surprise means: use the exact slow path
            self._lines = None

    def to_state(self) -> dict | None:
        """The template as JSON-able data, or None when it uses the slow path (unusual WCS).

        ``split_catalogue`` stores it with each batch, so the cutout job rebuilds the template
        with :meth:`from_state` and writes header text without astropy.
        """
        if self._lines is None:
            return None
        return {
            "lines": list(self._lines),
            "slots": [list(slot) for slot in self._slots],
            "crpix": [float(v) for v in self._crpix],
        }

    @classmethod
    def from_state(cls, state: dict) -> CutoutHeaderTemplate:
        """A template made by :meth:`to_state` (no parent WCS: it has no slow path)."""
        template = cls(None)
        template._lines = [str(line) for line in state["lines"]]
        template._slots = [
            (int(line), str(key), str(comment), float(value), None if power is None else int(power))
            for line, key, comment, value, power in state["slots"]
        ]
        template._crpix = np.array(state["crpix"], dtype=np.float64)
        return template

    @staticmethod
    def _cards(wcs: WCS) -> list[tuple[str, object, str]]:
        header = wcs.to_header(relax=True)
        return [(card.keyword, card.value, card.comment) for card in header.cards]

    def _build(self) -> None:
        reference = cutout_wcs(self._parent, 0.0, 0.0, 1.0)
        text = wcs_to_header_text(reference)
        cards_1 = self._cards(reference)
        cards_2 = self._cards(cutout_wcs(self._parent, 0.0, 0.0, 2.0))
        if [c[0] for c in cards_1] != [c[0] for c in cards_2]:
            return
        lines = text.split("\n")
        self._crpix = np.array(reference.wcs.crpix, dtype=np.float64)
        slots = []
        for (key, v1, comment), (_, v2, _) in zip(cards_1, cards_2, strict=True):
            is_number = isinstance(v1, int | float) and not isinstance(v1, bool)
            if key in ("CRPIX1", "CRPIX2"):
                power = None
            elif v1 == v2 and type(v1) is type(v2):
                continue
            elif is_number and isinstance(v2, float) and v1 != 0:
                power = round(math.log2(v2 / v1))
                if not math.isclose(v2, v1 * 2.0**power, rel_tol=1e-9):
                    return
            else:
                return
            prefix = f"{key:8}= "
            found = [i for i, line in enumerate(lines) if line.startswith(prefix)]
            if len(found) != 1:
                return
            slots.append((found[0], key, comment, float(v1), power))
        self._slots = slots
        self._lines = lines

    def _check(self) -> bool:
        x0, y0, scale = 13.0, -7.0, 0.37
        expected = {k: v for k, v, _ in self._cards(cutout_wcs(self._parent, x0, y0, scale))}
        got = {k: v for k, v, _ in _header_text_cards(self.text(x0, y0, scale))}
        if expected.keys() != got.keys():
            return False
        for key, value in expected.items():
            other = got[key]
            if isinstance(value, float) or isinstance(other, float):
                if not math.isclose(value, other, rel_tol=1e-9, abs_tol=1e-12):
                    return False
            elif value != other:
                return False
        return True

    def text(self, x0: float, y0: float, scale: float = 1.0) -> str:
        """``wcs_to_header_text(cutout_wcs(parent, x0, y0, scale))``, to float rounding."""
        if self._lines is None:
            return wcs_to_header_text(cutout_wcs(self._parent, x0, y0, scale))
        scale = float(scale)
        if not math.isfinite(scale) or scale <= 0:
            raise ValueError(f"scale (T / S) must be a positive number, got {scale!r}")
        lines = list(self._lines)
        scaled = self._scaled_lines.get(scale)
        if scaled is None:
            scaled = [
                (line, _card_line(key, value * scale**power, comment))
                for line, key, comment, value, power in self._slots
                if power
            ]
            if len(self._scaled_lines) < _MAX_CACHED_SCALES:
                self._scaled_lines[scale] = scaled
        for line, text in scaled:
            lines[line] = text
        origin = (float(x0), float(y0))
        for line, key, comment, _, power in self._slots:
            if power is None:
                axis = int(key[-1]) - 1
                value = (self._crpix[axis] - origin[axis] - 0.5) * scale + 0.5
                lines[line] = _card_line(key, value, comment)
        return "\n".join(lines)


#: Scales whose lines a template keeps (a batch of 1000 has at most a few hundred stamp sizes).
_MAX_CACHED_SCALES = 4096


def _card_line(key: str, value: float, comment: str) -> str:
    """The 80-character header line of a float card, as astropy writes it."""
    image = f"{key:8}= {format_header_float(value):>20}"
    if comment:
        image += f" / {comment}"
    return f"{image[:80]:80}"


def _header_text_cards(text: str) -> list[tuple[str, object, str]]:
    from astropy.io import fits

    header = fits.Header.fromstring(text, sep="\n")
    return [(card.keyword, card.value, card.comment) for card in header.cards]
