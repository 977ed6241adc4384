"""Cutout jobs without astropy: split_catalogue stores each batch's pixel positions and image
layouts; a job maps the images from them and must give exactly what the astropy path gives."""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from astropy.io.fits.card import _format_float
from conftest import build_wcs, cutout_job_modules, write_image

from cutana import arrow_tables
from cutana.catalogue import split_catalogue
from cutana.config import validate_config
from cutana.engine import run_batch
from cutana.fits_io import LAYOUTS_METADATA_KEY, POSITION_COLUMNS, image_layout, open_image
from cutana.wcs_utils import format_header_float

SHAPE = (300, 400)


def _survey(tmp_path, compressed_second_band=False):
    """Two bands: float32 TAN+SIP with a zero point, and integer data with BSCALE/BZERO/BLANK
    (or tile-compressed floats) on a rotated WCS; a catalogue of 60 sources, some off the edge."""
    rng = np.random.default_rng(7)
    sip_wcs = build_wcs(SHAPE, ra=150.0, dec=2.0, sip=True)
    rotated = build_wcs(SHAPE, ra=150.0, dec=2.0, scale_arcsec=0.25, rotation_deg=30.0)
    vis = write_image(
        tmp_path / "vis.fits",
        rng.normal(10, 2, SHAPE).astype(np.float32),
        sip_wcs,
        header_cards={"MAGZERO": 24.5, "BUNIT": "ADU"},
    )
    if compressed_second_band:
        nir = write_image(
            tmp_path / "nir.fits",
            rng.normal(5, 1, SHAPE).astype(np.float32),
            rotated,
            compressed=True,
            header_cards={"MAGZERO": 23.0},
        )
    else:
        raw = rng.integers(-2000, 2000, SHAPE).astype(np.int16)
        raw[100:110, 200:210] = -32768
        nir = write_image(
            tmp_path / "nir.fits",
            raw,
            rotated,
            extension="SCI",
            bscale=0.01,
            bzero=3.0,
            blank=-32768,
            header_cards={"MAGZERO": 23.0},
        )
    x = rng.uniform(-20, SHAPE[1] + 20, 60)
    y = rng.uniform(-20, SHAPE[0] + 20, 60)
    ra, dec = sip_wcs.all_pix2world(x, y, 0)
    catalogue = pd.DataFrame(
        {
            "SourceID": [f"S{i:03d}" for i in range(60)],
            "RA": ra,
            "Dec": dec,
            "diameter_arcsec": rng.uniform(2.0, 12.0, 60),
            "fits_file_paths": [json.dumps([str(vis), str(nir)])] * 60,
        }
    )
    catalogue.to_csv(tmp_path / "catalogue.csv", index=False)
    cfg = validate_config(
        {
            "source_catalogue": str(tmp_path / "catalogue.csv"),
            "channel_weights": {"VIS": [1.0, 0.5], "NIR": [0.0, 0.5]},
            "fits_extensions": ["PRIMARY", 1 if compressed_second_band else "SCI"],
            "target_resolution": 24,
            "normalisation_method": "asinh",
            "apply_flux_conversion": True,
            "N_batch_cutout_process": 25,
        },
        warn_unknown=False,
    )
    manifest = split_catalogue(tmp_path / "catalogue.csv", cfg, tmp_path / "work")
    batches = [tmp_path / "work" / "batches" / f"{b['name']}.parquet" for b in manifest["batches"]]
    return cfg, batches


def _without_layouts(batch_path, out_path):
    """The same batch as the astropy path sees it: no layouts, no positions."""
    table = arrow_tables.read_table(batch_path).replace_schema_metadata(None)
    table = table.drop_columns(list(POSITION_COLUMNS))
    pq.write_table(table, out_path)
    return out_path


def _outputs(batch_path, out_dir, cfg):
    result = run_batch(batch_path, out_dir / "batch", out_dir / "status.parquet", cfg)
    metadata = result.metadata.drop(columns=["processing_timestamp"])
    return np.asarray(result.images), metadata, result.index


def test_batches_carry_positions_and_layouts_of_every_band(tmp_path):
    cfg, batches = _survey(tmp_path)
    assert len(batches) == 3
    for path in batches:
        table = arrow_tables.read_table(path)
        layouts = json.loads(table.schema.metadata[LAYOUTS_METADATA_KEY])
        assert [layout["extension"] for layout in layouts] == ["PRIMARY", "SCI"]
        assert layouts[0]["header"] == {"MAGZERO": 24.5}
        assert (layouts[1]["bscale"], layouts[1]["bzero"], layouts[1]["blank"]) == (
            0.01,
            3.0,
            -32768,
        )
        paths = table["fits_file_paths"].to_pylist()[0]
        for band, (name, extension) in enumerate(zip(paths, ["PRIMARY", "SCI"], strict=True)):
            handle = open_image(name, extension)
            ra = table["RA"].to_numpy()
            dec = table["Dec"].to_numpy()
            x, y = handle.wcs.all_world2pix(ra, dec, 0, quiet=True)
            stored_x = np.array([row[band] for row in table["pixel_x"].to_pylist()])
            stored_y = np.array([row[band] for row in table["pixel_y"].to_pylist()])
            np.testing.assert_array_equal(stored_x, x)
            np.testing.assert_array_equal(stored_y, y)
            handle.close()


@pytest.mark.parametrize("compressed_second_band", [False, True])
def test_mapped_images_give_exactly_the_astropy_paths_outputs(tmp_path, compressed_second_band):
    """Pixels, metadata (WCS header text included), statuses and reasons are identical."""
    cfg, batches = _survey(tmp_path, compressed_second_band)
    for k, batch in enumerate(batches):
        fast = _outputs(batch, tmp_path / f"fast{k}", cfg)
        plain = _without_layouts(batch, tmp_path / f"plain{k}.parquet")
        slow = _outputs(plain, tmp_path / f"slow{k}", cfg)
        np.testing.assert_array_equal(fast[0], slow[0])
        pd.testing.assert_frame_equal(fast[1], slow[1])
        pd.testing.assert_frame_equal(fast[2], slow[2])
        assert {"ok", "partial"} <= set(fast[2]["status"]) or k > 0
    # A tile-compressed image cannot be mapped: its tile keeps the astropy path.
    metadata = arrow_tables.read_table(batches[0]).schema.metadata or {}
    assert (LAYOUTS_METADATA_KEY not in metadata) == compressed_second_band


def test_a_cutout_job_never_imports_astropy(tmp_path):
    cfg, batches = _survey(tmp_path)
    loaded = cutout_job_modules(batches[0], tmp_path / "out", cfg)
    assert "astropy" not in loaded
    # Nor the config file parsers: the job is given its validated config (~20 ms of start-up).
    assert not loaded & {"yaml", "dotmap", "tomli_w", "tomllib"}
    status = pd.read_parquet(tmp_path / "out" / "s.parquet")
    assert len(status) == arrow_tables.read_table(batches[0]).num_rows
    assert set(status["status"]) <= {"ok", "partial", "no_overlap"}


def test_a_file_changed_after_the_split_is_read_through_astropy(tmp_path):
    """A layout is used only while its file has the recorded size, times and inode."""
    cfg, batches = _survey(tmp_path)
    table = arrow_tables.read_table(batches[0])
    vis = table["fits_file_paths"].to_pylist()[0][0]
    before = _outputs(batches[0], tmp_path / "before", cfg)
    # New pixels and a WCS shifted by ~6 pixels, same size: only the modification time tells.
    stat = os.stat(vis)
    write_image(
        vis,
        np.random.default_rng(8).normal(10, 2, SHAPE).astype(np.float32),
        build_wcs(SHAPE, ra=150.0005, dec=2.0, sip=True),
        header_cards={"MAGZERO": 24.5, "BUNIT": "ADU"},
    )
    # Size and mtime as recorded (as `cp -p` or `rsync -t` would leave them): ctime differs.
    os.utime(vis, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert os.stat(vis).st_size == stat.st_size
    assert os.stat(vis).st_mtime_ns == stat.st_mtime_ns
    after = _outputs(batches[0], tmp_path / "after", cfg)
    plain = _without_layouts(batches[0], tmp_path / "plain.parquet")
    expected = _outputs(plain, tmp_path / "expected", cfg)
    np.testing.assert_array_equal(after[0], expected[0])
    pd.testing.assert_frame_equal(after[1], expected[1])
    assert not np.array_equal(after[1]["extraction_origin_x"], before[1]["extraction_origin_x"])
    # A file removed after the split fails its sources with the astropy path's reason.
    os.remove(vis)
    gone = _outputs(batches[0], tmp_path / "gone", cfg)
    assert set(gone[2]["status"]) == {"failed"}
    assert all(vis in reason and "does not exist" in reason for reason in gone[2]["reason"])


def test_image_layout_is_none_for_a_template_that_needs_astropy(tmp_path, monkeypatch):
    from cutana import wcs_utils

    path = write_image(
        tmp_path / "a.fits", np.zeros(SHAPE, np.float32), build_wcs(SHAPE, ra=10.0, dec=0.0)
    )
    handle = open_image(path)
    assert image_layout(handle)["template"] is not None
    handle.close()
    monkeypatch.setattr(wcs_utils.CutoutHeaderTemplate, "_check", lambda self: False)
    handle = open_image(path)
    assert image_layout(handle) is None
    handle.close()


def test_a_gzipped_file_gets_no_layout_and_keeps_the_astropy_path(tmp_path):
    """astropy decompresses a .fits.gz in memory: its data offset is not one in the file."""
    import gzip
    import shutil

    data = np.arange(SHAPE[0] * SHAPE[1], dtype=np.float32).reshape(SHAPE)
    plain = write_image(tmp_path / "a.fits", data, build_wcs(SHAPE, ra=10.0, dec=0.0))
    with open(plain, "rb") as source, gzip.open(tmp_path / "a.fits.gz", "wb") as target:
        shutil.copyfileobj(source, target)
    handle = open_image(tmp_path / "a.fits.gz")
    assert image_layout(handle) is None
    np.testing.assert_array_equal(handle.read(10, 12, 20, 23), data[10:12, 20:23])
    handle.close()


def test_header_floats_are_formatted_exactly_as_astropy_does():
    rng = np.random.default_rng(3)
    values = np.concatenate(
        [
            rng.normal(0, 1, 2000),
            rng.normal(0, 1, 2000) * 10.0 ** rng.integers(-300, 300, 2000),
            [0.0, -0.0, 1.0, 1e-5, 123456789012345678.0, 1 / 3, 2.5e-300, -7.0, 1e16, 1e22],
        ]
    )
    for value in values.tolist():
        assert format_header_float(value) == _format_float(value), value
