"""Tests of cutana.fits_io: lazy windowed reads, extensions, scaling, compression, errors."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.io import fits

from cutana.exceptions import FitsValidationError
from cutana.fits_io import ImageCache, open_image, zeropoint


def test_primary_image_reads_exact_windows(fits_image):
    path, data, wcs = fits_image
    with open_image(path, "PRIMARY") as handle:
        assert handle.shape == data.shape
        assert handle.pixel_scale_arcsec == pytest.approx(0.3, rel=1e-9)
        assert handle.bunit == "adu"
        assert handle.header["MAGZERO"] == 25.0
        assert handle.wcs.naxis == 2
        np.testing.assert_allclose(handle.wcs.wcs.crval, wcs.wcs.crval)
        window = handle.read(10, 37, 5, 80)
        assert window.dtype == np.float32
        np.testing.assert_array_equal(window, data[10:37, 5:80])
        assert handle.read(0, 0, 0, 5).shape == (0, 5)
        with pytest.raises(FitsValidationError, match="outside the image"):
            handle.read(-1, 5, 0, 5)


@pytest.mark.parametrize("extension", ["SCI", "sci", 1, "1"])
def test_named_and_numbered_extensions(tmp_path, write_fits, make_wcs, extension):
    data = np.arange(40 * 50, dtype=np.float32).reshape(40, 50)
    path = write_fits(tmp_path / "ext.fits", data, make_wcs((40, 50)), extension="SCI")
    with open_image(path, extension) as handle:
        np.testing.assert_array_equal(handle.read(0, 40, 0, 50), data)


@pytest.mark.parametrize("dtype", [np.float32, np.int16])
def test_tile_compressed_equals_uncompressed(tmp_path, write_fits, make_wcs, dtype, monkeypatch):
    rng = np.random.default_rng(3)
    data = (rng.normal(0, 300, (90, 110))).astype(dtype)
    if dtype == np.float32:
        data[7, 9] = np.nan
    wcs = make_wcs((90, 110))
    plain = write_fits(tmp_path / "plain.fits", data, wcs)
    packed = write_fits(tmp_path / "packed.fits", data, wcs, extension="SCI", compressed=True)

    # Reading a compressed image must go through .section (tiles), never decompress it whole.
    def no_full_read(self):
        raise AssertionError("the whole compressed image was decompressed")

    monkeypatch.setattr(fits.CompImageHDU, "data", property(no_full_read))
    with open_image(plain, 0) as a, open_image(packed, "SCI") as b:
        assert b.compressed and not a.compressed
        for window in [(0, 90, 0, 110), (13, 51, 40, 107), (89, 90, 0, 1)]:
            np.testing.assert_array_equal(a.read(*window), b.read(*window))


@pytest.mark.parametrize("tile_shape", [(32, 32), (1, 110), (7, 50)])
def test_compressed_block_cache_assembles_windows(tmp_path, make_wcs, monkeypatch, tile_shape):
    """Tiny blocks and a tiny cache force multi-block windows and evictions."""
    import cutana.fits_io as fits_io

    monkeypatch.setattr(fits_io, "COMPRESSED_BLOCK_PIXELS", 40 * 40)
    monkeypatch.setattr(fits_io, "COMPRESSED_CACHE_BYTES", 3 * 40 * 40 * 2)
    rng = np.random.default_rng(8)
    data = rng.integers(-500, 500, (97, 110)).astype(np.int16)
    path = tmp_path / "tiles.fits"
    header = make_wcs((97, 110)).to_header()
    hdu = fits.CompImageHDU(data, header=header, tile_shape=tile_shape)
    fits.HDUList([fits.PrimaryHDU(), hdu]).writeto(path)
    with open_image(path, 1) as handle:
        for _ in range(150):
            y0, y1 = np.sort(rng.integers(0, 98, 2))
            x0, x1 = np.sort(rng.integers(0, 111, 2))
            got = handle.read(int(y0), int(y1), int(x0), int(x1))
            np.testing.assert_array_equal(got, data[y0:y1, x0:x1])
        cache = handle._blocks
        assert cache._bytes <= fits_io.COMPRESSED_CACHE_BYTES or len(cache._blocks) == 1


@pytest.mark.parametrize("compressed", [False, True])
def test_bscale_bzero_blank_applied_to_window(tmp_path, write_fits, make_wcs, compressed):
    rng = np.random.default_rng(4)
    raw = rng.integers(-30000, 30000, (60, 70)).astype(np.int16)
    raw[3, 4] = -32768
    path = write_fits(
        tmp_path / "scaled.fits",
        raw,
        make_wcs((60, 70)),
        compressed=compressed,
        bscale=0.25,
        bzero=1000.0,
        blank=-32768,
    )
    expected = (raw.astype(np.float64) * 0.25 + 1000.0).astype(np.float32)
    expected[3, 4] = np.nan
    with open_image(path, 1 if compressed else 0) as handle:
        got = handle.read(0, 60, 0, 70)
    np.testing.assert_array_equal(got, expected)
    # astropy's own (non-memmap) scaling agrees
    reference = fits.getdata(path, ext=1 if compressed else 0, memmap=False)
    np.testing.assert_allclose(got, reference, equal_nan=True)


def test_degenerate_third_axis_is_ignored(tmp_path, make_wcs):
    data = np.arange(20 * 30, dtype=np.float32).reshape(1, 20, 30)
    header = make_wcs((20, 30)).to_header()
    header["CTYPE3"], header["CRVAL3"], header["CDELT3"], header["CRPIX3"] = "FREQ", 1e9, 1, 1
    path = tmp_path / "cube.fits"
    fits.PrimaryHDU(data, header).writeto(path)
    with open_image(path) as handle:
        assert handle.shape == (20, 30)
        np.testing.assert_array_equal(handle.read(2, 5, 3, 9), data[0, 2:5, 3:9])


def test_missing_file(tmp_path):
    with pytest.raises(FitsValidationError, match="does not exist"):
        open_image(tmp_path / "nope.fits")


def test_not_fits(tmp_path):
    path = tmp_path / "text.fits"
    path.write_text("this is not a FITS file\n" * 200)
    with pytest.raises(FitsValidationError, match="cannot be opened as FITS") as error:
        open_image(path)
    # astropy's advice to its own callers (ignore_missing_simple=True) is not passed on.
    assert "SIMPLE card" in str(error.value) and "ignore_missing_simple" not in str(error.value)


def test_truncated_file(fits_image, tmp_path):
    path, _, _ = fits_image
    blob = path.read_bytes()
    cut = tmp_path / "cut.fits"
    cut.write_bytes(blob[: len(blob) - 20000])
    with pytest.raises(FitsValidationError, match="truncated"):
        open_image(cut)


def test_missing_extension_lists_available(tmp_path, write_fits, make_wcs):
    path = write_fits(tmp_path / "e.fits", np.zeros((8, 8), np.float32), make_wcs((8, 8)), "SCI")
    with pytest.raises(FitsValidationError, match=r"'WHT' not found.*1 \(SCI: image 8x8\)"):
        open_image(path, "WHT")
    with pytest.raises(FitsValidationError, match="not found"):
        open_image(path, 5)


def test_no_image_data(tmp_path, write_fits, make_wcs):
    path = write_fits(tmp_path / "e.fits", np.zeros((8, 8), np.float32), make_wcs((8, 8)), "SCI")
    with pytest.raises(FitsValidationError, match="no image data.*SCI"):
        open_image(path, "PRIMARY")


def test_no_celestial_wcs(tmp_path, write_fits):
    path = write_fits(tmp_path / "nowcs.fits", np.zeros((8, 8), np.float32), wcs=None)
    with pytest.raises(FitsValidationError, match="no celestial WCS"):
        open_image(path)


def test_zeropoint(fits_image):
    path, _, _ = fits_image
    header = fits.getheader(path)
    assert zeropoint(header, "MAGZERO", path) == 25.0
    with pytest.raises(FitsValidationError, match=r"'PHOTZP' is missing.*apply_flux_conversion"):
        zeropoint(header, "PHOTZP", path)
    header["BADZP"] = "n/a"
    with pytest.raises(FitsValidationError, match="not a finite number"):
        zeropoint(header, "BADZP", path)


def test_image_cache_opens_once_and_closes(fits_image, tmp_path):
    path, data, _ = fits_image
    with ImageCache() as cache:
        first = cache.get(path, "PRIMARY")
        assert cache.get(str(path), "primary") is first
        np.testing.assert_array_equal(first.read(0, 2, 0, 2), data[:2, :2])
        with pytest.raises(FitsValidationError):
            cache.get(tmp_path / "missing.fits")
        with pytest.raises(FitsValidationError):  # remembered, same error again
            cache.get(tmp_path / "missing.fits")
    assert first._hdul._file.closed


def test_mapped_pages_counted_once_and_released_past_budget(tmp_path, write_fits, make_wcs):
    """Re-reading mapped pages is free; distinct pages past the budget unmap them all."""
    from cutana import fits_io

    data = np.arange(600 * 2048, dtype=np.float32).reshape(600, 2048)  # 8 KiB rows
    path = write_fits(tmp_path / "wide.fits", data, make_wcs(data.shape))
    out = np.empty((100, 100), dtype=np.float32)
    released = []
    with open_image(path, "PRIMARY") as handle:
        original = handle.release_pages
        handle.release_pages = lambda: (released.append(handle._mapped_pages), original())
        for _ in range(20):  # the same window again and again maps its pages once
            handle.read_into(out, 0, 100, 0, 100)
        assert 0 < handle._mapped_pages <= 200 and not released
        np.testing.assert_array_equal(out, data[:100, :100])
        # Windows down the whole image map ~3 pages per row (8-byte bound): past the budget.
        budget = fits_io.MAPPED_PAGES_BUDGET
        fits_io.MAPPED_PAGES_BUDGET = 500
        try:
            for y0 in range(0, 600, 100):
                handle.read_into(out, y0, y0 + 100, 1000, 1100)
                np.testing.assert_array_equal(out, data[y0 : y0 + 100, 1000:1100])
        finally:
            fits_io.MAPPED_PAGES_BUDGET = budget
        assert released and all(pages >= 500 for pages in released)
        assert handle._mapped_pages < 500
