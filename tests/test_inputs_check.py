"""check_inputs / check_tile_files: every FITS problem of SPEC §5 is found before any work, per
distinct file, collected into one error naming the file, extension, band, rows and the fix."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from astropy.io import fits

from cutana import inputs_check
from cutana.catalogue import split_catalogue
from cutana.config import validate_config
from cutana.exceptions import CatalogueValidationError, CutanaError, FitsValidationError

pytest.importorskip("cutana.fits_io")

from conftest import build_wcs, write_image  # noqa: E402


def good_image(path, scale_arcsec=0.3, magzero=25.0, extension=None):
    cards = {} if magzero is None else {"MAGZERO": magzero}
    data = np.ones((40, 50), np.float32)
    return write_image(
        path, data, build_wcs((40, 50), scale_arcsec=scale_arcsec), extension, header_cards=cards
    )


def catalogue_csv(tmp_path, path_lists, size_column="diameter_pixel", name="cat.csv"):
    n = len(path_lists)
    frame = pd.DataFrame(
        {
            "SourceID": [f"S{i}" for i in range(n)],
            "RA": np.full(n, 150.0),
            "Dec": np.full(n, 2.0),
            size_column: np.full(n, 20.0),
            "fits_file_paths": [str(list(p)) for p in path_lists],
        }
    )
    frame.to_csv(tmp_path / name, index=False)
    return tmp_path / name


def cfg_for(catalogue, bands=("VIS",), **overrides):
    return validate_config(
        {
            "source_catalogue": str(catalogue),
            "channel_weights": {b: [1.0] for b in bands},
            **overrides,
        }
    )


def not_fits(path):
    path.write_text("this is a text file, not FITS\n")
    return path


def truncated(path):
    good_image(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 2880])
    return path


def table_extension(path):
    table = fits.BinTableHDU.from_columns(
        [fits.Column(name="x", format="E", array=[1.0])], name="CAT"
    )
    fits.HDUList([fits.PrimaryHDU(), table]).writeto(path)
    return path


def no_wcs(path):
    fits.PrimaryHDU(np.ones((10, 10), np.float32), header=fits.Header({"MAGZERO": 25.0})).writeto(
        path
    )
    return path


# (case id, file maker, config overrides, expected message fragments)
FITS_CASES = [
    ("missing file", lambda p: p, {}, ["does not exist", "fits_file_paths", "first row 0"]),
    ("not FITS", not_fits, {}, ["cannot be opened as FITS", "SIMPLE card", "complete"]),
    ("truncated", truncated, {}, ["truncated", "re-copy"]),
    (
        "no image data",
        table_extension,
        {"fits_extensions": ["CAT"]},
        ["'CAT' has no image data", "fits_extensions"],
    ),
    (
        "missing extension",
        good_image,
        {"fits_extensions": ["SCI"]},
        ["extension 'SCI' not found", "Available HDUs", "fits_extensions"],
    ),
    ("no celestial WCS", no_wcs, {}, ["no celestial WCS", "RA---TAN"]),
    (
        "missing MAGZERO",
        lambda p: good_image(p, magzero=None),
        {},
        ["'MAGZERO' is missing", "apply_flux_conversion"],
    ),
    (
        "MAGZERO not a number",
        lambda p: good_image(p, magzero="bright"),
        {},
        ["'MAGZERO' = 'bright' is not a finite number"],
    ),
    (
        "other zero-point keyword",
        good_image,
        {"flux_conversion_keywords": {"AB_zeropoint": "ZP_AB"}},
        ["'ZP_AB' is missing"],
    ),
]


@pytest.mark.parametrize(
    "make_file, overrides, fragments", [c[1:] for c in FITS_CASES], ids=[c[0] for c in FITS_CASES]
)
def test_bad_fits_file_is_reported(tmp_path, make_file, overrides, fragments):
    image = make_file(tmp_path / "band.fits")
    catalogue = catalogue_csv(tmp_path, [[str(image)]] * 3)
    with pytest.raises(FitsValidationError) as info:
        inputs_check.check_inputs(cfg_for(catalogue, **overrides))
    message = str(info.value)
    assert str(image) in message
    assert "band VIS" in message and "used by 3 rows" in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_flux_keyword_not_needed_without_flux_conversion(tmp_path):
    image = good_image(tmp_path / "band.fits", magzero=None)
    catalogue = catalogue_csv(tmp_path, [[str(image)]])
    summary = inputs_check.check_inputs(cfg_for(catalogue, apply_flux_conversion=False))
    assert summary["n_sources"] == 1


def test_valid_inputs_summary_and_relative_paths(tmp_path):
    (tmp_path / "tiles").mkdir()
    for tile in ("a", "b"):
        good_image(tmp_path / "tiles" / f"{tile}_vis.fits", scale_arcsec=0.1)
        good_image(tmp_path / "tiles" / f"{tile}_nir.fits", scale_arcsec=0.3, extension="SCI")
    lists = [[f"tiles/{t}_vis.fits", f"tiles/{t}_nir.fits"] for t in "aab"]
    catalogue = catalogue_csv(tmp_path, lists, size_column="diameter_arcsec")
    summary = inputs_check.check_inputs(
        cfg_for(catalogue, bands=("VIS", "NIR"), fits_extensions=["PRIMARY", "SCI"])
    )
    assert summary["n_sources"] == 3 and summary["n_tiles"] == 2 and summary["n_files"] == 4
    assert summary["size_column"] == "diameter_arcsec"
    scales = summary["pixel_scales"]
    assert scales[str(tmp_path / "tiles/a_vis.fits")] == pytest.approx(0.1)
    assert scales[str(tmp_path / "tiles/b_nir.fits")] == pytest.approx(0.3)


def test_mixed_pixel_scales_with_diameter_pixel(tmp_path):
    vis = good_image(tmp_path / "vis.fits", scale_arcsec=0.1)
    nir = good_image(tmp_path / "nir.fits", scale_arcsec=0.3)
    lists = [[str(vis), str(nir)]] * 2
    cfg = cfg_for(catalogue_csv(tmp_path, lists), bands=("VIS", "NIR"))
    with pytest.raises(FitsValidationError) as info:
        inputs_check.check_inputs(cfg)
    message = str(info.value)
    assert "mix pixel scales" in message and "VIS: 0.1" in message and "NIR: 0.3" in message
    assert "diameter_arcsec" in message and "first row 0" in message
    # The same files are fine when sizes are on the sky.
    arcsec = catalogue_csv(tmp_path, lists, size_column="diameter_arcsec", name="arcsec.csv")
    assert inputs_check.check_inputs(cfg_for(arcsec, bands=("VIS", "NIR")))["n_tiles"] == 1


def test_all_problems_in_one_error_each_file_opened_once(tmp_path, monkeypatch):
    from cutana import fits_io

    good = good_image(tmp_path / "good.fits")
    no_zp = good_image(tmp_path / "nozp.fits", magzero=None)
    lists = [[str(good)], [str(tmp_path / "gone.fits")], [str(no_zp)]] * 400
    catalogue = catalogue_csv(tmp_path, lists)
    opened = []
    real_open = fits_io.open_image
    monkeypatch.setattr(
        fits_io, "open_image", lambda path, ext: opened.append(path) or real_open(path, ext)
    )
    with pytest.raises(FitsValidationError) as info:
        inputs_check.check_inputs(cfg_for(catalogue), chunk_rows=100)
    message = str(info.value)
    assert message.startswith("2 problems with the FITS files")
    assert "gone.fits" in message and "used by 400 rows, first row 1" in message
    assert "nozp.fits" in message and "first row 2" in message
    assert sorted(opened) == sorted([str(good), str(no_zp)])  # per file, not per row


def test_catalogue_and_fits_problems_reported_together(tmp_path):
    catalogue = catalogue_csv(tmp_path, [[str(tmp_path / "gone.fits")]] * 2)
    frame = pd.read_csv(catalogue)
    frame.loc[1, "RA"] = 400.0
    frame.to_csv(catalogue, index=False)
    with pytest.raises(CatalogueValidationError) as info:
        inputs_check.check_inputs(cfg_for(catalogue))
    message = str(info.value)
    assert "column 'RA'" in message and "row 1 = '400.0'" in message
    assert "gone.fits" in message and "does not exist" in message


def test_split_checks_files_before_writing(tmp_path):
    image = good_image(tmp_path / "band.fits", magzero=None)
    catalogue = catalogue_csv(tmp_path, [[str(image)]] * 5)
    with pytest.raises(FitsValidationError, match="MAGZERO"):
        split_catalogue(catalogue, cfg_for(catalogue), tmp_path / "work")
    assert list((tmp_path / "work").iterdir()) == []
    manifest = split_catalogue(
        catalogue, cfg_for(catalogue, apply_flux_conversion=False), tmp_path / "work"
    )
    assert manifest["total_rows"] == 5


def test_unset_catalogue_is_reported():
    with pytest.raises(CutanaError, match="source_catalogue"):
        inputs_check.check_inputs(validate_config({}))
