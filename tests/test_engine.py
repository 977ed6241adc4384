"""Tests of cutana.engine: Cutout2D parity, statuses, flux, resampling, mixing, run_batch."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from astropy.coordinates import SkyCoord
from astropy.io import fits
from astropy.nddata import Cutout2D
from astropy.wcs import WCS

from cutana.config import validate_config
from cutana.engine import INDEX_COLUMNS, METADATA_COLUMNS, process_batch, run_batch

SHAPE = (90, 120)


def _config(**overrides):
    cfg = {
        "target_resolution": 16,
        "interpolation": "nearest",
        "apply_flux_conversion": False,
        "normalisation_method": "none",
        "data_type": "float32",
        "fill_value": -99.0,
        "channel_weights": {"VIS": [1.0]},
        "fits_extensions": ["PRIMARY"],
    }
    cfg.update(overrides)
    return validate_config(cfg, warn_unknown=False)


def _image(seed=0):
    rng = np.random.default_rng(seed)
    data = rng.normal(100.0, 10.0, SHAPE).astype(np.float32)
    data[75, 95] = np.nan
    return data


def _batch(wcs, pixels, paths, diameter_pixel=None, diameter_arcsec=None):
    """Batch rows at the given (x, y) pixel positions of ``wcs``."""
    pixels = np.asarray(pixels, dtype=float)
    ra, dec = wcs.all_pix2world(pixels[:, 0], pixels[:, 1], 0)
    n = len(pixels)
    return pd.DataFrame(
        {
            "row_index": np.arange(100, 100 + n, dtype=np.int64),
            "SourceID": [f"src-{k}" for k in range(n)],
            "RA": ra,
            "Dec": dec,
            "fits_file_paths": [[str(p) for p in paths]] * n,
            "diameter_pixel": [diameter_pixel] * n,
            "diameter_arcsec": [diameter_arcsec] * n,
            "tile": ["t0"] * n,
        }
    )


POSITIONS = [
    (60.2, 44.7),  # interior
    (30.5, 20.5),  # half-integer
    (0.3, 45.0),  # left edge
    (119.6, 89.8),  # top-right corner
    (95.0, 75.0),  # on the NaN pixel
    (-40.0, 10.0),  # misses the image
]


@pytest.mark.parametrize("size", [17, 16])
@pytest.mark.parametrize("compressed", [False, True])
def test_cutout2d_parity(tmp_path, write_fits, make_wcs, size, compressed):
    data = _image()
    wcs = make_wcs(SHAPE, rotation_deg=10.0)
    path = write_fits(tmp_path / "img.fits", data, wcs, extension="SCI", compressed=compressed)
    cfg = _config(target_resolution=size, fits_extensions=["SCI"])
    batch = _batch(wcs, POSITIONS, [path], diameter_pixel=float(size))
    result = process_batch(batch, cfg)

    index = result.index
    assert list(index.columns) == INDEX_COLUMNS
    assert list(index["status"]) == ["ok", "ok", "partial", "partial", "partial", "no_overlap"]
    assert list(index["idx_in_zarr"]) == [0, 1, 2, 3, 4, -1]
    assert list(index["row_index"]) == list(range(100, 106))
    assert "edge" in index["reason"][2] and "NaN" in index["reason"][4]
    assert index["reason"][0] == "" and "overlap" in index["reason"][5]
    assert result.images.shape == (5, size, size, 1) and result.images.dtype == np.float32

    x, y = wcs.all_world2pix(batch["RA"], batch["Dec"], 0)
    for k in range(5):
        cutout = Cutout2D(data, (x[k], y[k]), size, mode="partial", fill_value=np.nan).data
        expected = np.where(np.isfinite(cutout), cutout, np.float32(-99.0))
        np.testing.assert_array_equal(result.images[k, :, :, 0], expected)


def test_metadata_resampling_and_wcs(tmp_path, write_fits, make_wcs):
    data = _image(1)
    wcs = make_wcs(SHAPE, scale_arcsec=0.3, sip=True)
    path = write_fits(tmp_path / "img.fits", data, wcs, header_cards={"BUNIT": "adu"})
    cfg = _config(target_resolution=40, interpolation="bilinear")
    # diameter 6 arcsec at 0.3"/px -> S = 20 px, resampled to T = 40
    # positions off the integer grid: Cutout2D's ceil() makes exact integers fragile to
    # the last bit of the WCS round trip
    batch = _batch(wcs, [(50.3, 50.3), (2.3, 3.3)], [path], diameter_arcsec=6.0)
    result = process_batch(batch, cfg)
    meta = result.metadata
    assert list(meta.columns) == METADATA_COLUMNS
    assert list(meta["extraction_size"]) == [20, 20]
    assert list(meta["diameter_pixel"]) == [20.0, 20.0]
    np.testing.assert_allclose(meta["diameter_arcsec"], 6.0)
    np.testing.assert_allclose(meta["pixel_scale_arcsec"], 0.15, rtol=1e-6)
    assert list(meta["extraction_origin_x"]) == [41, -7]
    assert list(meta["extraction_origin_y"]) == [41, -6]
    assert meta["valid_fraction"][0] == 1.0 and 0.4 < meta["valid_fraction"][1] < 0.8
    assert list(meta["status"]) == ["ok", "partial"] and list(meta["bunit"]) == ["adu"] * 2
    assert list(meta["source_id"]) == ["src-0", "src-1"] and list(meta["tile"]) == ["t0"] * 2
    # the stored header is the cutout WCS: the source lands where the stamp put it, i.e. at
    # output pixel ((x - origin) + 0.5) * T / S - 0.5 (the centre (T-1)/2 up to Cutout2D's
    # whole-pixel snapping of the origin)
    for k, (x, y) in enumerate([(50.3, 50.3), (2.3, 3.3)]):
        cut = WCS(fits.Header.fromstring(meta["wcs_header"][k], sep="\n"))
        assert cut.sip is not None
        expected = [
            (x - meta["extraction_origin_x"][k] + 0.5) * 2 - 0.5,
            (y - meta["extraction_origin_y"][k] + 0.5) * 2 - 0.5,
        ]
        ra, dec = cut.all_pix2world(expected[0], expected[1], 0)
        source = SkyCoord(batch["RA"][k], batch["Dec"][k], unit="deg")
        assert source.separation(SkyCoord(ra, dec, unit="deg")).arcsec < 0.01 * 0.15
    # invalid (outside) pixels are the fill value, valid ones are finite resampled data
    image = result.images[1, :, :, 0]
    assert (image[:12, :] == -99.0).all() and (image[14:, 16:] != -99.0).all()
    assert abs(float(np.median(result.images[0])) - 100.0) < 5


def test_flux_conversion_uses_zeropoint(tmp_path, write_fits, make_wcs):
    data = _image(2)
    wcs = make_wcs(SHAPE)
    path = write_fits(tmp_path / "img.fits", data, wcs, header_cards={"ZP_AB": 23.9})
    cfg = _config(apply_flux_conversion=True, flux_conversion_keywords={"AB_zeropoint": "ZP_AB"})
    result = process_batch(_batch(wcs, [(50.3, 50.3)], [path], diameter_pixel=16.0), cfg)
    expected = data[43:59, 43:59] * (10 ** (-0.4 * 23.9) * 3631)  # 1 uJy per count
    np.testing.assert_allclose(result.images[0, :, :, 0], expected, rtol=1e-6)
    assert result.metadata["bunit"][0] == "Jy"

    # a missing zero point fails the sources of that file, with a reason naming the keyword
    cfg = _config(apply_flux_conversion=True)
    result = process_batch(_batch(wcs, [(50.0, 50.0)], [path], diameter_pixel=16.0), cfg)
    assert list(result.index["status"]) == ["failed"]
    assert "MAGZERO" in result.index["reason"][0] and str(path) in result.index["reason"][0]
    assert result.images.shape == (0, 16, 16, 1)


def test_bands_mix_and_failed_file_only_fails_its_sources(tmp_path, write_fits, make_wcs):
    wcs = make_wcs(SHAPE)
    vis, nir = _image(3), _image(4)
    vis_path = write_fits(tmp_path / "vis.fits", vis, wcs)
    nir_path = write_fits(tmp_path / "nir.fits", nir, wcs)
    cfg = _config(
        target_resolution=16,
        channel_weights={"VIS": [1.0, 0.0, 0.5], "NIR": [0.0, 2.0, 0.5]},
    )
    good = _batch(wcs, [(30.3, 30.3), (70.3, 20.3)], [vis_path, nir_path], diameter_pixel=16.0)
    bad = _batch(wcs, [(50.0, 60.0)], [vis_path, tmp_path / "lost.fits"], diameter_pixel=16.0)
    batch = pd.concat([good, bad, good.iloc[:1]], ignore_index=True)
    result = process_batch(batch, cfg)
    assert list(result.index["status"]) == ["ok", "ok", "failed", "ok"]
    reason = result.index["reason"][2]
    assert "lost.fits" in reason and "does not exist" in reason
    assert list(result.index["idx_in_zarr"]) == [0, 1, -1, 2]
    assert result.images.shape == (3, 16, 16, 3)
    win = (slice(23, 39), slice(23, 39))
    np.testing.assert_allclose(result.images[0, :, :, 0], vis[win])
    np.testing.assert_allclose(result.images[0, :, :, 1], 2.0 * nir[win])
    np.testing.assert_allclose(result.images[0, :, :, 2], 0.5 * vis[win] + 0.5 * nir[win])
    np.testing.assert_array_equal(result.images[0], result.images[2])


def test_stamp_missing_one_band_only_is_partial(tmp_path, write_fits, make_wcs):
    wcs = make_wcs(SHAPE)
    shifted = make_wcs(SHAPE, crpix=(SHAPE[1] / 2 + 200, SHAPE[0] / 2))  # image 200 px away
    a = write_fits(tmp_path / "a.fits", _image(5), wcs)
    b = write_fits(tmp_path / "b.fits", _image(6), shifted)
    cfg = _config(channel_weights={"A": [1.0, 0.0], "B": [0.0, 1.0]})
    result = process_batch(_batch(wcs, [(40.0, 40.0)], [a, b], diameter_pixel=16.0), cfg)
    assert list(result.index["status"]) == ["partial"]
    assert (result.images[0, :, :, 1] == -99.0).all()
    assert result.metadata["valid_fraction"][0] == 0.5


def test_uint8_linear_output(tmp_path, write_fits, make_wcs):
    wcs = make_wcs(SHAPE)
    path = write_fits(tmp_path / "img.fits", _image(7), wcs)
    cfg = _config(normalisation_method="linear", data_type="uint8", target_resolution=24)
    result = process_batch(_batch(wcs, [(60.0, 45.0)], [path], diameter_pixel=12.0), cfg)
    assert result.images.dtype == np.uint8 and result.images.max() == 255
    assert result.metadata["bunit"][0] == ""


@pytest.mark.parametrize("output_format", ["zarr", "fits"])
def test_run_batch_writes_outputs_and_status(tmp_path, write_fits, make_wcs, output_format):
    import zarr

    wcs = make_wcs(SHAPE)
    path = write_fits(tmp_path / "img.fits", _image(8), wcs)
    out = tmp_path / "out"
    batch_name = "00007_abcdef0123"
    batch_path = out / ".cutana" / "batches" / f"{batch_name}.parquet"
    batch_path.parent.mkdir(parents=True)
    pixels = [(50.0, 50.0), (500.0, 500.0), (1.0, 1.0)]
    _batch(wcs, pixels, [path], diameter_pixel=16.0).to_parquet(batch_path)
    batch_dir = out / f"batch_cutout_process_{batch_name}"
    status_path = out / ".cutana" / "status" / f"{batch_name}.parquet"
    cfg = dict(_config(), output_format=output_format, output_dir=str(out))
    result = run_batch(batch_path, batch_dir, status_path, cfg)

    status = pd.read_parquet(status_path)
    assert list(status["status"]) == ["ok", "no_overlap", "partial"]
    assert (status["batch_index"] == 7).all()
    file_column = "zarr_file" if output_format == "zarr" else "fits_file"
    files = list(status[file_column])
    assert files[1] == ""
    assert not list(status_path.parent.glob("*.tmp-*"))
    if output_format == "zarr":
        assert files[0] == files[2] == f"{batch_dir.name}/images.zarr"
        stored = zarr.open_group(str(batch_dir / "images.zarr"), mode="r")["images"][:]
        np.testing.assert_array_equal(stored, result.images)
    else:
        for k, name in [(0, files[0]), (1, files[2])]:
            assert name.startswith(f"{batch_dir.name}/") and name.endswith(".fits")
            with fits.open(out / name) as hdul:
                np.testing.assert_array_equal(hdul[1].data, result.images[k, :, :, 0])


def test_ra_wrap_mixed_tiles_and_empty_batch(tmp_path, write_fits, make_wcs):
    """Sources either side of RA = 0 in one tile, plus a second tile of another shape."""
    wrap_wcs = make_wcs(SHAPE, ra=0.0, dec=0.0, scale_arcsec=1.0)
    other_shape = (50, 70)
    other_wcs = make_wcs(other_shape, ra=200.0, dec=-30.0)
    wrap_data, other_data = _image(9), _image(10)[:50, :70].copy()
    wrap_path = write_fits(tmp_path / "wrap.fits", wrap_data, wrap_wcs)
    other_path = write_fits(tmp_path / "other.fits", other_data, other_wcs)
    # east is left (CD1_1 < 0): x = 40.3 has a small RA, x = 80.3 an RA just below 360
    wrap = _batch(wrap_wcs, [(40.3, 45.3), (80.3, 45.3)], [wrap_path], diameter_pixel=16.0)
    assert wrap["RA"][0] < 1.0 and wrap["RA"][1] > 359.0
    other = _batch(other_wcs, [(30.3, 20.3)], [other_path], diameter_pixel=16.0)
    batch = pd.concat([wrap, other], ignore_index=True)
    result = process_batch(batch, _config())
    assert list(result.index["status"]) == ["ok", "ok", "ok"]
    np.testing.assert_array_equal(result.images[0, :, :, 0], wrap_data[38:54, 33:49])
    np.testing.assert_array_equal(result.images[1, :, :, 0], wrap_data[38:54, 73:89])
    np.testing.assert_array_equal(result.images[2, :, :, 0], other_data[13:29, 23:39])

    empty = process_batch(batch.iloc[:0], _config())
    assert empty.images.shape == (0, 16, 16, 1) and len(empty.index) == 0
    assert list(empty.metadata.columns) == METADATA_COLUMNS


def test_read_error_fails_only_that_files_sources(tmp_path, write_fits, make_wcs, monkeypatch):
    from cutana.exceptions import FitsValidationError
    from cutana.fits_io import ImageHandle

    wcs = make_wcs(SHAPE)
    good = write_fits(tmp_path / "good.fits", _image(11), wcs)
    broken = write_fits(tmp_path / "broken.fits", _image(12), wcs)
    original_read = ImageHandle.read

    def flaky_read(self, *window):
        if self.path.name == "broken.fits":
            raise FitsValidationError(f"FITS file {self.path}: cannot read window: disk error")
        return original_read(self, *window)

    monkeypatch.setattr(ImageHandle, "read", flaky_read)
    original_read_into = ImageHandle.read_into

    def flaky_read_into(self, out, *window):  # the engine's fast path reads into the stamp
        if self.path.name == "broken.fits":
            raise FitsValidationError(f"FITS file {self.path}: cannot read window: disk error")
        return original_read_into(self, out, *window)

    monkeypatch.setattr(ImageHandle, "read_into", flaky_read_into)
    batch = pd.concat(
        [
            _batch(wcs, [(30.3, 30.3)], [good], diameter_pixel=16.0),
            _batch(wcs, [(40.3, 40.3)], [broken], diameter_pixel=16.0),
            _batch(wcs, [(50.3, 50.3)], [good], diameter_pixel=16.0),
        ],
        ignore_index=True,
    )
    result = process_batch(batch, _config())
    assert list(result.index["status"]) == ["ok", "failed", "ok"]
    assert "disk error" in result.index["reason"][1]
    assert list(result.index["idx_in_zarr"]) == [0, -1, 1]
    assert list(result.metadata["idx_in_zarr"]) == [0, 1]
    assert list(result.metadata["source_id"]) == ["src-0", "src-0"]
    assert result.images.shape[0] == 2


@pytest.mark.parametrize("output_format", ["zarr", "fits"])
def test_cutout_job_process_never_imports_pandas(tmp_path, write_fits, make_wcs, output_format):
    """pyarrow imports pandas (~0.25 s) on its first ordinary conversion; a cutout job must not
    pay that, so run_batch reads and writes its tables through cutana.arrow_tables. Given a
    config the workflow already validated, it does not import jsonschema either."""
    from conftest import cutout_job_modules

    wcs = make_wcs(SHAPE)
    path = write_fits(tmp_path / "img.fits", _image(3), wcs)
    batch_path = tmp_path / "00000_abc.parquet"
    _batch(wcs, [(50.0, 50.0), (500.0, 500.0), (1.0, 1.0)], [path], diameter_pixel=16.0).to_parquet(
        batch_path
    )
    cfg = dict(_config(), output_format=output_format, output_dir=str(tmp_path / "out"))
    loaded = cutout_job_modules(batch_path, tmp_path / "out", cfg)
    assert "pandas" not in loaded and "jsonschema" not in loaded
    status = pd.read_parquet(tmp_path / "out" / "s.parquet")
    assert list(status["status"]) == ["ok", "no_overlap", "partial"]


_ALLOCATION_CYCLES = """
import ctypes, resource, sys
from cutana.engine import keep_freed_memory_for_reuse
applied = keep_freed_memory_for_reuse() if sys.argv[1] == "tuned" else None
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
size = 16 * 1024 * 1024
for cycle in range(3):  # a chunk's arrays: allocated and filled together, then all freed
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blocks = [libc.malloc(size) for _ in range(8)]
    for block in blocks:
        ctypes.memset(block, 1, size)
    for block in blocks:
        libc.free(block)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(applied, faults)
"""


@pytest.mark.skipif(
    __import__("platform").libc_ver()[0] != "glibc", reason="mallopt is glibc's interface"
)
def test_cutout_job_reuses_freed_memory_instead_of_faulting_it_in_again():
    """After keep_freed_memory_for_reuse (run_batch calls it), the 128 MB that one chunk's
    arrays freed serve the next chunk; by default glibc hands the top of its heap back to the
    kernel and every page is faulted in (and zeroed) again."""
    import subprocess
    import sys

    def third_cycle(mode):
        done = subprocess.run(
            [sys.executable, "-c", _ALLOCATION_CYCLES, mode], capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr
        applied, faults = done.stdout.split()
        return applied, int(faults)

    pages = 8 * 16 * 1024 * 1024 // 4096
    assert third_cycle("default")[1] >= pages // 2
    applied, faults = third_cycle("tuned")
    assert applied == "True"
    assert faults < pages // 20


@pytest.mark.parametrize(
    "interpolation,target", [("bilinear", 24), ("lanczos", 40), ("nearest", 24), ("bilinear", 16)]
)
def test_whole_stamps_path_equals_the_general_path(
    tmp_path, write_fits, make_wcs, monkeypatch, interpolation, target
):
    """Stamps wholly inside their image skip the per-group masks; the result is unchanged."""
    from cutana import engine

    wcs = make_wcs(SHAPE)
    vis_path = write_fits(tmp_path / "vis.fits", _image(8), wcs, header_cards={"MAGZERO": 25.0})
    nir_path = write_fits(tmp_path / "nir.fits", _image(9), wcs, header_cards={"MAGZERO": 24.0})
    cfg = _config(
        target_resolution=target,
        interpolation=interpolation,
        normalisation_method="asinh",
        apply_flux_conversion=True,
        channel_weights={"VIS": [1.0, 0.5], "NIR": [0.0, 0.5]},
    )
    # Whole stamps of several sizes (one equal to the target), edge stamps, the NaN pixel.
    positions = POSITIONS + [(40.4, 30.6), (80.0, 50.0), (60.0, 60.0)]
    sizes = [16.0, 12.0, 24.0]
    batch = pd.concat(
        [_batch(wcs, positions, [vis_path, nir_path], diameter_pixel=size) for size in sizes],
        ignore_index=True,
    )
    whole_calls = []
    resample_whole = engine._resample_whole_stamps

    def counting(rows, windows, *args):
        rest = resample_whole(rows, windows, *args)
        whole_calls.append(len(rows) - len(rest))
        return rest

    monkeypatch.setattr(engine, "_resample_whole_stamps", counting)
    fast = process_batch(batch, cfg)
    monkeypatch.setattr(engine, "_resample_whole_stamps", lambda rows, *args: np.arange(len(rows)))
    general = process_batch(batch, cfg)

    if interpolation == "nearest" and target > 16:
        assert sum(whole_calls) < len(batch) * 2  # enlarging by nearest takes the general path
    else:
        assert sum(whole_calls) >= len(batch)  # most stamps of both bands took the new path
    np.testing.assert_array_equal(fast.images.view(np.uint32), general.images.view(np.uint32))
    pd.testing.assert_frame_equal(fast.index, general.index)
    pd.testing.assert_frame_equal(
        fast.metadata.drop(columns="processing_timestamp"),
        general.metadata.drop(columns="processing_timestamp"),
    )
