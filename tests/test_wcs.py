"""Tests of cutana.wcs_utils: cutout WCS is pixel<->sky consistent with its parent."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.coordinates import SkyCoord
from astropy.io import fits
from astropy.nddata import Cutout2D
from astropy.wcs import WCS

from cutana.extraction import stamp_windows
from cutana.wcs_utils import cutout_wcs, wcs_to_header_text

SHAPE = (400, 500)
KINDS = {
    "tan": {},
    "rotated": {"rotation_deg": 33.0},
    "mirrored": {"mirrored": True, "rotation_deg": -12.0},
    "sip": {"sip": True, "rotation_deg": 5.0},
    "near_ra_zero": {"ra": 0.001},
}


def _sky_distance_in_pixels(wcs_a, xa, ya, wcs_b, xb, yb, pixel_arcsec):
    """Angular distance between two pixel positions (possibly of two WCSs) in pixels."""
    sky_a = SkyCoord(*wcs_a.all_pix2world(xa, ya, 0), unit="deg")
    sky_b = SkyCoord(*wcs_b.all_pix2world(xb, yb, 0), unit="deg")
    return sky_a.separation(sky_b).arcsec / pixel_arcsec


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("target_factor", [1.0, 2.5, 0.37])
def test_source_lands_where_the_stamp_puts_it(make_wcs, kind, target_factor):
    parent = make_wcs(SHAPE, scale_arcsec=0.2, **KINDS[kind])
    rng = np.random.default_rng(5)
    # interior, half-integer and edge-crossing positions
    x = np.concatenate([rng.uniform(-5, 505, 40), [100.0, 100.5, 0.0, 499.0]])
    y = np.concatenate([rng.uniform(-5, 405, 40), [50.0, 50.5, 399.0, 0.0]])
    ra, dec = parent.all_pix2world(x, y, 0)
    px, py = parent.all_world2pix(ra, dec, 0)
    sizes = np.where(np.arange(len(x)) % 2 == 0, 31, 48)
    windows = stamp_windows(px, py, sizes, SHAPE)
    for k in range(len(x)):
        size = int(sizes[k])
        target = max(1, int(round(size * target_factor)))
        scale = target / size
        wcs = cutout_wcs(parent, windows.origin_x[k], windows.origin_y[k], scale)
        out_x, out_y = wcs.all_world2pix(ra[k], dec[k], 0)
        expected_x = (px[k] - windows.origin_x[k] + 0.5) * scale - 0.5
        expected_y = (py[k] - windows.origin_y[k] + 0.5) * scale - 0.5
        assert abs(out_x - expected_x) < 0.01 and abs(out_y - expected_y) < 0.01, (kind, k)


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("size,target", [(31, 31), (30, 30), (31, 64), (48, 20)])
def test_centre_pixel_is_the_source_when_it_is_centred(make_wcs, kind, size, target):
    """A source at a stamp's geometric centre maps to output pixel (T-1)/2, to 0.01 px."""
    parent = make_wcs(SHAPE, scale_arcsec=0.2, **KINDS[kind])
    # Cutout2D puts pixel [0, 0] at ceil(pos - S/2): the source is centred when
    # pos = origin + (S - 1)/2, i.e. integer positions for odd S, half-integers for even S.
    origin = np.array([120, 77])
    x, y = origin + (size - 1) / 2.0
    ra, dec = parent.all_pix2world(x, y, 0)
    windows = stamp_windows(*parent.all_world2pix(ra, dec, 0), size, SHAPE)
    assert (windows.origin_x[0], windows.origin_y[0]) == tuple(origin)
    wcs = cutout_wcs(parent, windows.origin_x[0], windows.origin_y[0], target / size)
    centre = (target - 1) / 2.0
    out_arcsec = 0.2 * size / target
    sky = SkyCoord(*wcs.all_pix2world(centre, centre, 0), unit="deg")
    source = SkyCoord(ra, dec, unit="deg")
    assert sky.separation(source).arcsec / out_arcsec < 0.01


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("size,target", [(25, 25), (25, 60), (40, 16)])
def test_every_output_pixel_matches_the_parent(make_wcs, kind, size, target):
    parent = make_wcs(SHAPE, scale_arcsec=0.2, **KINDS[kind])
    scale = target / size
    for x0, y0 in [(210, 150), (-7, 380)]:  # interior and crossing the lower-left / top
        wcs = cutout_wcs(parent, x0, y0, scale)
        jj, ii = np.mgrid[0:target, 0:target].astype(np.float64)
        parent_x = x0 + (ii + 0.5) / scale - 0.5
        parent_y = y0 + (jj + 0.5) / scale - 0.5
        distance = _sky_distance_in_pixels(
            wcs, ii.ravel(), jj.ravel(), parent, parent_x.ravel(), parent_y.ravel(), 1.0
        )
        out_arcsec = 0.2 / scale
        assert distance.max() * 1.0 / out_arcsec < 0.01


def test_matches_cutout2d_wcs_without_resampling(make_wcs):
    parent = make_wcs(SHAPE, scale_arcsec=0.2, sip=True)
    data = np.zeros(SHAPE)
    for x, y, size in [(250.3, 100.8, 33), (2.0, 398.6, 40), (-3.0, -3.0, 12)]:
        windows = stamp_windows([x], [y], size, SHAPE)
        ours = cutout_wcs(parent, windows.origin_x[0], windows.origin_y[0], 1.0)
        theirs = Cutout2D(data, (x, y), size, wcs=parent, mode="partial").wcs
        np.testing.assert_allclose(ours.wcs.crpix, theirs.wcs.crpix, atol=1e-12)
        jj, ii = np.mgrid[0:size:3, 0:size:3].astype(float)
        np.testing.assert_allclose(
            ours.all_pix2world(ii, jj, 0), theirs.all_pix2world(ii, jj, 0), atol=1e-12
        )


def test_parent_is_not_modified_and_sip_is_scaled(make_wcs):
    parent = make_wcs(SHAPE, sip=True)
    before = parent.to_header(relax=True).tostring()
    scaled = cutout_wcs(parent, 10, 20, 2.0)
    assert parent.to_header(relax=True).tostring() == before
    # A_20 acts on u**2 and returns pixels: in output pixels it is scaled by 2**(1-2)
    assert scaled.sip.a[2, 0] == pytest.approx(parent.sip.a[2, 0] / 2.0)
    assert scaled.sip.a[3, 0] == pytest.approx(parent.sip.a[3, 0] / 4.0)
    np.testing.assert_allclose(scaled.sip.crpix, scaled.wcs.crpix)
    with pytest.raises(ValueError, match="positive"):
        cutout_wcs(parent, 0, 0, 0.0)


@pytest.mark.parametrize("use_cdelt", [False, True])
def test_header_text_round_trip_keeps_sip_and_scaling(make_wcs, use_cdelt):
    parent = make_wcs(SHAPE, sip=not use_cdelt, rotation_deg=20)
    if use_cdelt:  # express the same WCS with CDELT + PC instead of CD
        header = parent.to_header()
        parent = WCS(header)
        assert not parent.wcs.has_cd()
    wcs = cutout_wcs(parent, -4, 9, 1.7)
    text = wcs_to_header_text(wcs)
    assert isinstance(text, str)
    rebuilt = WCS(fits.Header.fromstring(text, sep="\n"))
    if not use_cdelt:
        assert rebuilt.sip is not None
    ii, jj = np.meshgrid(np.arange(0, 40, 7.0), np.arange(0, 40, 7.0))
    np.testing.assert_allclose(
        rebuilt.all_pix2world(ii, jj, 0), wcs.all_pix2world(ii, jj, 0), atol=1e-10
    )
