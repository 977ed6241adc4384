"""Tests of the synthetic demo survey (cutana.demo)."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from unittest import mock

import numpy as np
import pandas as pd
import pytest
from astropy.io import fits
from astropy.wcs import WCS

from cutana.config import validate_config
from cutana.demo import DEFAULT_BANDS, ZEROPOINTS, demo_config, main, make_demo_survey
from cutana.exceptions import ConfigValidationError

SMALL = dict(n_tiles=2, tile_size=256, n_sources=100, seed=7, min_diameter_pixel=8)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def survey(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    return make_demo_survey(out, max_diameter_pixel=48, **SMALL)


@pytest.fixture(scope="module")
def catalogue(survey) -> pd.DataFrame:
    return pd.read_csv(survey)


def test_files_and_catalogue_columns(survey, catalogue):
    out = survey.parent
    assert survey.name == "catalogue.csv"
    for tile in range(2):
        for band in DEFAULT_BANDS:
            assert (out / f"tile{tile}_{band}.fits").is_file()
    assert list(catalogue.columns) == ["SourceID", "RA", "Dec", "diameter_pixel", "fits_file_paths"]
    assert len(catalogue) == 100
    assert catalogue["SourceID"].is_unique
    assert catalogue["RA"].between(0, 360, inclusive="left").all()
    assert catalogue["diameter_pixel"].between(8, 48).all()
    paths = [json.loads(text) for text in catalogue["fits_file_paths"]]
    for row_paths in paths:
        assert len(row_paths) == 4
        assert all(Path(p).is_absolute() and Path(p).is_file() for p in row_paths)
        # Band order is VIS, NIR_Y, NIR_J, NIR_H.
        assert [Path(p).stem.split("_", 1)[1] for p in row_paths] == list(DEFAULT_BANDS)


def test_parquet_matches_csv_with_list_column(survey, catalogue):
    table = pd.read_parquet(survey.with_suffix(".parquet"))
    assert list(table.columns) == list(catalogue.columns)
    np.testing.assert_array_equal(table["RA"].to_numpy(), catalogue["RA"].to_numpy())
    np.testing.assert_array_equal(table["Dec"].to_numpy(), catalogue["Dec"].to_numpy())
    assert [list(v) for v in table["fits_file_paths"]] == [
        json.loads(t) for t in catalogue["fits_file_paths"]
    ]


def test_headers_are_euclid_like(survey):
    for band in DEFAULT_BANDS:
        with fits.open(survey.parent / f"tile0_{band}.fits") as hdul:
            hdul.verify("exception")
            header = hdul[0].header
            assert hdul[0].data.dtype == np.dtype(">f4")
            assert hdul[0].data.shape == (256, 256)
            assert "CD1_1" in header and "CDELT1" not in header and "PC1_1" not in header
            assert header["RADESYS"] == "ICRS"
            assert header["CTYPE1"] == "RA---TAN"
            assert header["MAGZERO"] == ZEROPOINTS[band]
            assert header["BUNIT"]
            wcs = WCS(header)
            scale = wcs.proj_plane_pixel_scales()[0].to_value("arcsec")
            assert scale == pytest.approx(0.1, rel=1e-9)


def test_nan_borders_and_stripes_and_noise(survey):
    data = fits.getdata(survey.parent / "tile0_VIS.fits").astype(np.float64)
    nan = np.isnan(data)
    assert nan[0].all() and nan[-1].all() and nan[:, 0].all() and nan[:, -1].all()
    # VIS: a diagonal masked trail crosses the interior (a NaN in many interior rows)...
    assert nan[10:-10, 10:-10].any(axis=1).mean() > 0.5
    # ... NIR_Y: a fully masked interior row (a detector gap); NIR_H: neither.
    nir_y = np.isnan(fits.getdata(survey.parent / "tile0_NIR_Y.fits"))
    assert nir_y[5:-5, 10:-10].all(axis=1).any()
    nir_h = np.isnan(fits.getdata(survey.parent / "tile0_NIR_H.fits"))
    assert not nir_h[10:-10, 10:-10].any()
    assert 0.02 < nan.mean() < 0.3
    finite = data[~nan]
    assert np.isfinite(finite).all()
    # Noise: the bulk of the pixels scatter around zero with a robust sigma > 0.
    mad = np.median(np.abs(finite - np.median(finite)))
    assert mad > 0 and abs(np.median(finite)) < mad


def test_galaxies_sit_at_catalogue_positions(survey, catalogue):
    """The pixel at a catalogue position is far brighter than the noise for most sources."""
    hits, tested = 0, 0
    for tile in range(2):
        path = str(survey.parent / f"tile{tile}_NIR_H.fits")
        rows = catalogue[catalogue["fits_file_paths"].str.contains(path, regex=False)]
        with fits.open(path) as hdul:
            data = hdul[0].data.astype(np.float64)
            wcs = WCS(hdul[0].header)
        x, y = wcs.all_world2pix(rows["RA"].to_numpy(), rows["Dec"].to_numpy(), 0)
        ix, iy = np.round(x).astype(int), np.round(y).astype(int)
        inside = (ix >= 0) & (ix < 256) & (iy >= 0) & (iy < 256)
        finite = data[np.isfinite(data)]
        sigma = 1.4826 * np.median(np.abs(finite - np.median(finite)))
        values = data[iy[inside], ix[inside]]
        ok = np.isfinite(values)
        tested += ok.sum()
        hits += (values[ok] > 3 * sigma).sum()
        # Random positions are rarely that bright: the signal is tied to the catalogue.
        rng = np.random.default_rng(0)
        random_values = data[rng.integers(10, 246, 500), rng.integers(10, 246, 500)]
        assert np.nanmean(random_values > 3 * sigma) < 0.5
    assert tested > 50
    assert hits / tested > 0.8


def test_ra_wrap_tile_and_high_dec_tile(catalogue):
    tile0 = catalogue[catalogue["SourceID"].str.startswith("TILE_102018000_")]
    tile1 = catalogue[catalogue["SourceID"].str.startswith("TILE_102018001_")]
    assert len(tile0) and len(tile1)
    assert (tile0["RA"] > 359.9).any() and (tile0["RA"] < 0.1).any()
    assert ((tile0["RA"] > 359.9) | (tile0["RA"] < 0.1)).all()
    assert tile1["Dec"].between(74.9, 75.1).all()


def test_some_stamps_cross_a_tile_edge(tmp_path):
    csv = make_demo_survey(
        tmp_path, n_tiles=1, tile_size=512, n_sources=200, seed=3, max_diameter_pixel=64
    )
    cat = pd.read_csv(csv)
    wcs = WCS(fits.getheader(tmp_path / "tile0_VIS.fits"))
    x, y = wcs.all_world2pix(cat["RA"].to_numpy(), cat["Dec"].to_numpy(), 0)
    half = cat["diameter_pixel"].to_numpy() / 2
    crossing = (x - half < -0.5) | (y - half < -0.5) | (x + half > 511.5) | (y + half > 511.5)
    # About 2 %: 4 of 200 sources placed on purpose (a few more may touch by chance: none here
    # because interior sources keep a margin).
    assert 2 <= crossing.sum() <= 8
    # The centres themselves stay on the tile.
    assert ((x >= -0.5) & (x <= 511.5) & (y >= -0.5) & (y <= 511.5)).all()


def test_deterministic_byte_identical(tmp_path):
    kwargs = dict(n_tiles=1, tile_size=128, n_sources=20, seed=11, max_diameter_pixel=32)
    first = make_demo_survey(tmp_path / "a", **kwargs)
    first_hashes = {p.name: _sha(p) for p in sorted(first.parent.iterdir())}
    again = make_demo_survey(tmp_path / "a", **kwargs)
    assert {p.name: _sha(p) for p in sorted(again.parent.iterdir())} == first_hashes
    # Another directory: identical images (the catalogue differs only by its absolute paths).
    other = make_demo_survey(tmp_path / "b", **kwargs)
    for name, digest in first_hashes.items():
        if name.endswith(".fits"):
            assert _sha(other.parent / name) == digest
    text_a = first.read_text().replace(str(first.parent), "X")
    text_b = other.read_text().replace(str(other.parent), "X")
    assert text_a == text_b
    # A different seed gives different pixels.
    changed = make_demo_survey(tmp_path / "c", **{**kwargs, "seed": 12})
    assert _sha(changed.parent / "tile0_VIS.fits") != first_hashes["tile0_VIS.fits"]


def test_compressed_tiles_match_plain_tiles(tmp_path):
    kwargs = dict(n_tiles=1, tile_size=128, n_sources=10, seed=5, max_diameter_pixel=32)
    plain = make_demo_survey(tmp_path / "plain", **kwargs)
    packed = make_demo_survey(tmp_path / "packed", compressed=True, **kwargs)
    with fits.open(packed.parent / "tile0_NIR_J.fits") as hdul:
        assert isinstance(hdul[1], fits.CompImageHDU)
        assert hdul[1].header["MAGZERO"] == 30.0
        assert "CD1_1" in hdul[1].header
        section = hdul[1].section[10:40, 20:60]
    reference = fits.getdata(plain.parent / "tile0_NIR_J.fits")[10:40, 20:60]
    assert np.array_equal(np.isnan(section), np.isnan(reference))
    good = np.isfinite(reference)
    noise = np.nanstd(reference)
    # RICE quantisation keeps values within a small fraction of the noise.
    assert np.max(np.abs(section[good] - reference[good])) < 0.2 * noise
    # Reproducible even when the clock has moved on (gzip streams of all-NaN tiles embed it).
    later = time.time() + 1000.0
    with mock.patch("time.time", return_value=later):
        again = make_demo_survey(tmp_path / "packed2", compressed=True, **kwargs)
    assert _sha(again.parent / "tile0_NIR_J.fits") == _sha(packed.parent / "tile0_NIR_J.fits")


def test_demo_config_validates(survey):
    cfg = validate_config(demo_config(survey.parent))
    assert list(cfg["channel_weights"]) == list(DEFAULT_BANDS)
    assert all(len(w) == 3 for w in cfg["channel_weights"].values())
    assert cfg["source_catalogue"] == str(survey)
    assert cfg["fits_extensions"] == ["PRIMARY"]
    assert validate_config(demo_config(survey.parent, compressed=True))["fits_extensions"] == [1]


def test_demo_config_follows_the_written_survey(tmp_path):
    kwargs = dict(n_tiles=1, tile_size=96, n_sources=3, min_diameter_pixel=8, max_diameter_pixel=16)
    make_demo_survey(tmp_path / "c", compressed=True, bands=("VIS", "NIR_H"), **kwargs)
    cfg = validate_config(demo_config(tmp_path / "c"))
    assert cfg["fits_extensions"] == [1]
    assert cfg["channel_weights"] == {"VIS": [1.0, 0.0], "NIR_H": [0.0, 1.0]}


def test_bad_arguments_name_the_value(tmp_path):
    with pytest.raises(ConfigValidationError, match="min_diameter_pixel = 50"):
        make_demo_survey(tmp_path, min_diameter_pixel=50, max_diameter_pixel=10)
    with pytest.raises(ConfigValidationError, match="tile_size = 10"):
        make_demo_survey(tmp_path, tile_size=10)


def test_cli(tmp_path, capsys):
    argv = ["--out", str(tmp_path), "--tiles", "1", "--size", "96", "--sources", "5"]
    assert main(argv + ["--max-diameter", "32", "--bands", "VIS,NIR_H"]) == 0
    printed = capsys.readouterr().out.strip()
    assert Path(printed) == tmp_path.resolve() / "catalogue.csv"
    cat = pd.read_csv(printed)
    assert len(cat) == 5
    assert sorted(p.name for p in tmp_path.glob("*.fits")) == ["tile0_NIR_H.fits", "tile0_VIS.fits"]
