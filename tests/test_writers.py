"""Tests of the batch writers (cutana.writers): Zarr + Parquet, FITS, safe file names."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import zarr
from astropy.io import fits
from astropy.wcs import WCS

from cutana.config import validate_config
from cutana.exceptions import CutanaError
from cutana.writers import (
    MAX_STEM_LENGTH,
    atomic_directory,
    default_channel_names,
    remove_stale_temporaries,
    safe_filename,
    shard_length,
    write_fits_batch,
    write_zarr_batch,
)


def _cutout_wcs_text(x0: float, y0: float) -> str:
    """A TAN WCS of a 0.1"/px cutout with its corner at (x0, y0) of a parent at RA 359.99."""
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = [359.99, 1.5]
    wcs.wcs.crpix = [1000.5 - x0, 1000.5 - y0]
    wcs.wcs.cd = [[-0.1 / 3600, 0], [0, 0.1 / 3600]]
    wcs.wcs.radesys = "ICRS"
    return wcs.to_header(relax=True).tostring(sep="\n")


def _metadata(n: int, ids=None) -> pd.DataFrame:
    ids = ids if ids is not None else [f"TILE_1_{i:04d}" for i in range(n)]
    return pd.DataFrame(
        {
            "source_id": ids,
            "ra": np.linspace(359.98, 359.99, n),
            "dec": np.linspace(1.4, 1.5, n),
            "idx_in_zarr": np.arange(n, dtype=np.int64),
            "diameter_arcsec": np.full(n, np.nan),
            "diameter_pixel": np.arange(n, dtype=float) + 32,
            "extraction_size": np.arange(n, dtype=np.int64) + 32,
            "pixel_scale_arcsec": np.full(n, 0.2),
            "valid_fraction": np.linspace(0.5, 1.0, n),
            "status": ["ok"] * n,
            "wcs_header": [_cutout_wcs_text(10.0 * i, 20.0 * i) for i in range(n)],
        }
    )


def _images(n: int, side: int = 16, channels: int = 3, dtype=np.float32) -> np.ndarray:
    rng = np.random.default_rng(n)
    data = rng.random((n, side, side, channels), dtype=np.float32)
    return data if dtype == np.float32 else np.round(data * 255).astype(dtype)


# ------------------------------------------------------------------------------------ Zarr


def test_zarr_batch_layout_and_content(tmp_path):
    images = _images(7)
    metadata = _metadata(7)
    batch = tmp_path / "batch_cutout_process_00000_abc"
    assert write_zarr_batch(batch, images, metadata) == batch
    assert sorted(p.name for p in batch.iterdir()) == ["images.zarr", "images_metadata.parquet"]
    group = zarr.open_group(batch / "images.zarr", mode="r")
    assert group.metadata.zarr_format == 3
    array = group["images"]
    assert array.shape == (7, 16, 16, 3)
    assert array.dtype == np.float32
    assert array.chunks == (1, 16, 16, 3)
    assert array.shards is not None and array.shards[1:] == (16, 16, 3)
    assert array.compressors  # compressed
    for i in range(7):
        np.testing.assert_array_equal(array[i], images[i])
    table = pd.read_parquet(batch / "images_metadata.parquet")
    pd.testing.assert_frame_equal(table, metadata)
    # Upstream README access pattern.
    opened = zarr.open(str(batch / "images.zarr"), mode="r")
    assert list(opened.keys()) == ["images"]
    # No stray temporaries next to the batch.
    assert sorted(p.name for p in tmp_path.iterdir()) == [batch.name]


def test_zarr_uint8_and_attributes_and_rewrite(tmp_path):
    batch = tmp_path / "b"
    write_zarr_batch(batch, _images(3), _metadata(3))
    images = _images(4, dtype=np.uint8)
    write_zarr_batch(batch, images, _metadata(4), attributes={"channel_names": ["R", "G", "B"]})
    group = zarr.open_group(batch / "images.zarr", mode="r")
    assert group["images"].dtype == np.uint8
    np.testing.assert_array_equal(group["images"][:], images)
    assert group.attrs["channel_names"] == ["R", "G", "B"]
    assert len(pd.read_parquet(batch / "images_metadata.parquet")) == 4


def test_zarr_empty_batch(tmp_path):
    batch = tmp_path / "empty"
    write_zarr_batch(batch, np.zeros((0, 16, 16, 3), np.float32), _metadata(0))
    array = zarr.open_group(batch / "images.zarr", mode="r")["images"]
    assert array.shape == (0, 16, 16, 3)
    assert array[:].shape == (0, 16, 16, 3)
    table = pd.read_parquet(batch / "images_metadata.parquet")
    assert len(table) == 0 and "source_id" in table.columns


def test_shard_length_many_images_per_shard():
    assert shard_length((256, 256, 3), np.float32, 1000) == (64 * 1024 * 1024) // (256 * 256 * 12)
    assert shard_length((16, 16, 1), np.uint8, 10) == 10  # the whole batch in one shard
    assert shard_length((4096, 4096, 4), np.float32, 10) == 1
    assert shard_length((16, 16, 1), np.uint8, 0) == 1


def test_zarr_mismatched_metadata_is_an_error(tmp_path):
    with pytest.raises(CutanaError, match="metadata has 2 rows but there are 3 images"):
        write_zarr_batch(tmp_path / "b", _images(3), _metadata(2))
    assert not (tmp_path / "b").exists()


def test_failing_write_leaves_no_batch_dir(tmp_path, monkeypatch):
    batch = tmp_path / "b"

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("cutana.writers._write_parquet", broken)
    with pytest.raises(OSError, match="disk full"):
        write_zarr_batch(batch, _images(3), _metadata(3))
    assert list(tmp_path.iterdir()) == []


def test_failing_rewrite_keeps_previous_complete_batch(tmp_path, monkeypatch):
    batch = tmp_path / "b"
    write_zarr_batch(batch, _images(3), _metadata(3))
    monkeypatch.setattr("cutana.writers._write_parquet", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        write_zarr_batch(batch, _images(5), _metadata(5))
    assert zarr.open_group(batch / "images.zarr", mode="r")["images"].shape[0] == 3
    assert [p.name for p in tmp_path.iterdir()] == ["b"]


def test_stale_temporary_of_dead_writer_is_removed(tmp_path):
    batch = tmp_path / "b"
    # A pid that cannot be alive (beyond the kernel's pid_max).
    stale = tmp_path / "b.tmp-99999999"
    stale.mkdir()
    (stale / "junk").write_text("partial")
    with atomic_directory(batch) as tmp:
        (tmp / "done").write_text("x")
    assert not stale.exists()
    assert (batch / "done").read_text() == "x"


def test_a_live_writers_temporaries_are_kept(tmp_path):
    """After `kill -9` of Snakemake alone its jobs run on: a rerun of their batch must not
    delete what they are writing (it did, and they then published the damaged folder)."""
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        batch, status = tmp_path / "b", tmp_path / "s.parquet"
        live_dir, dead_dir = tmp_path / f"b.tmp-{live.pid}", tmp_path / "b.tmp-99999999"
        live_file, dead_file = (
            tmp_path / f"s.parquet.tmp-{live.pid}",
            tmp_path / "s.parquet.tmp-99999999",
        )
        for folder in (live_dir, dead_dir):
            folder.mkdir()
            (folder / "shard").write_text("being written")
        for file in (live_file, dead_file):
            file.write_text("being written")
        assert sorted(remove_stale_temporaries(batch) + remove_stale_temporaries(status)) == [
            dead_dir,
            dead_file,
        ]
        assert (live_dir / "shard").exists() and live_file.exists()
        assert not dead_dir.exists() and not dead_file.exists()

        # This job's copy and the live writer's are both complete: publishing replaces a
        # folder already in place (the other writer published first) and keeps the other's
        # temporary intact.
        batch.mkdir()
        (batch / "other").write_text("published by the other writer")
        with atomic_directory(batch) as tmp:
            (tmp / "mine").write_text("x")
        assert sorted(p.name for p in batch.iterdir()) == ["mine"]
        assert (live_dir / "shard").exists()
        assert not list(tmp_path.glob("b.old-*"))
    finally:
        live.kill()
        live.wait()


# ------------------------------------------------------------------------------------ FITS


def _fits_cfg(**overrides) -> dict:
    base = {
        "output_format": "fits",
        "normalisation_method": "asinh",
        "data_type": "float32",
        "channel_weights": {"VIS": [1.0, 0.0], "NIR_H": [0.0, 1.0]},
    }
    return validate_config({**base, **overrides})


def test_fits_batch_headers_and_wcs(tmp_path):
    images = _images(3, side=20, channels=2)
    metadata = _metadata(3)
    metadata["bunit"] = ["adu", "", None]
    cfg = _fits_cfg()
    names = write_fits_batch(tmp_path / "b", images, metadata, cfg)
    assert names == [f"TILE_1_{i:04d}.fits" for i in range(3)]
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == names
    for i, name in enumerate(names):
        with fits.open(tmp_path / "b" / name, checksum=True) as hdul:
            hdul.verify("exception")
            primary = hdul[0].header
            assert primary["SOURCE"] == f"TILE_1_{i:04d}"
            assert primary["RA"] == pytest.approx(metadata["ra"][i])
            assert primary["DEC"] == pytest.approx(metadata["dec"][i])
            assert primary["SIZEPIX"] == 32 + i
            assert primary["SIZEARC"] == pytest.approx(20 * 0.2)
            assert primary["STRETCH"] == "asinh"
            assert primary["DTYPE"] == "float32"
            assert [h.name for h in hdul[1:]] == ["VIS", "NIR_H"]  # identity weights
            for c in range(2):
                np.testing.assert_array_equal(hdul[c + 1].data, images[i, :, :, c])
                header = hdul[c + 1].header
                assert ("BUNIT" in header) == (i == 0)
                # The stored WCS maps pixels to the sky like the metadata's WCS.
                expected = WCS(fits.Header.fromstring(metadata["wcs_header"][i], sep="\n"))
                got = WCS(header)
                assert got.has_celestial
                pix = np.array([[0.0, 0.0], [19.0, 7.5]])
                np.testing.assert_allclose(
                    got.all_pix2world(pix, 0), expected.all_pix2world(pix, 0), rtol=0, atol=1e-10
                )


def test_fits_batch_is_reproducible_and_checksummed(tmp_path):
    images, metadata, cfg = _images(2, channels=2), _metadata(2), _fits_cfg()
    first = write_fits_batch(tmp_path / "a", images, metadata, cfg)
    second = write_fits_batch(tmp_path / "b", images, metadata, cfg)
    for name in first:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    with fits.open(tmp_path / "a" / first[0], checksum=True) as hdul:
        assert all(hdu.verify_checksum() == 1 and hdu.verify_datasum() == 1 for hdu in hdul)
    assert second == first


def test_fits_channel_names_and_dtypes(tmp_path):
    cfg = _fits_cfg(
        channel_weights={"VIS": [0, 0, 1], "NIR_J": [0, 1, 0], "NIR_H": [1, 0, 0]},
        data_type="uint8",
    )
    images = _images(2, channels=3, dtype=np.uint8)
    names = write_fits_batch(tmp_path / "b", images, _metadata(2), cfg)
    with fits.open(tmp_path / "b" / names[0]) as hdul:
        assert [h.name for h in hdul[1:]] == ["CH0", "CH1", "CH2"]
        assert hdul[1].data.dtype == np.uint8
        assert hdul[0].header["DTYPE"] == "uint8"
    names = write_fits_batch(tmp_path / "c", images, _metadata(2), cfg, channel_names="RGB")
    with fits.open(tmp_path / "c" / names[1]) as hdul:
        assert [h.name for h in hdul[1:]] == ["R", "G", "B"]
    with pytest.raises(CutanaError, match="2 channel names"):
        write_fits_batch(tmp_path / "d", images, _metadata(2), cfg, channel_names=["A", "B"])
    assert not (tmp_path / "d").exists()


def test_default_channel_names():
    identity = {"channel_weights": {"VIS": [1.0, 0.0], "NIR": [0.0, 1.0]}}
    assert default_channel_names(identity, 2) == ["VIS", "NIR"]
    assert default_channel_names({"channel_weights": {"PRIMARY": [1.0]}}, 1) == ["PRIMARY"]
    mixed = {"channel_weights": {"VIS": [0.5, 0.5], "NIR": [0.0, 1.0]}}
    assert default_channel_names(mixed, 2) == ["CH0", "CH1"]
    assert default_channel_names(identity, 3) == ["CH0", "CH1", "CH2"]


def test_fits_flux_unit_without_stretch(tmp_path):
    cfg = _fits_cfg(normalisation_method="none", apply_flux_conversion=True)
    names = write_fits_batch(tmp_path / "b", _images(1, channels=2), _metadata(1), cfg)
    assert fits.getheader(tmp_path / "b" / names[0], 1)["BUNIT"] == "Jy"


def test_fits_hostile_ids_stay_inside_batch_dir(tmp_path):
    ids = ["../../evil", "/etc/passwd", "", "a" * 300, "Galaxie_é", "dup", "DUP", ".."]
    batch = tmp_path / "out" / "b"
    names = write_fits_batch(batch, _images(8, channels=2), _metadata(8, ids), _fits_cfg())
    assert len(set(n.casefold() for n in names)) == 8
    files = sorted(p.name for p in batch.iterdir())
    assert files == sorted(names)
    for name in names:
        assert (batch / name).resolve().parent == batch.resolve()
    # Nothing escaped: only the batch folder exists under tmp_path/out and tmp_path.
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    # The exact ID goes into the header (ASCII-escaped where needed).
    assert fits.getheader(batch / names[0])["SOURCE"] == "../../evil"


def test_fits_empty_batch(tmp_path):
    names = write_fits_batch(
        tmp_path / "b", np.zeros((0, 8, 8, 2), np.float32), _metadata(0), _fits_cfg()
    )
    assert names == [] and (tmp_path / "b").is_dir()


# ------------------------------------------------------------------------------- safe names

SAFE_CHARS = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")


@pytest.mark.parametrize(
    "source_id",
    [
        "../../x",
        "/etc/passwd",
        "",
        "x" * 300,
        "Galaxie_é",
        "ω Cen",
        "..",
        ".",
        "a/b\\c",
        "CON",
        None,
    ],
)
def test_safe_filename_is_always_a_plain_name(source_id):
    name = safe_filename(source_id, set())
    assert name and set(name) <= SAFE_CHARS
    assert not name.startswith(".")
    assert "/" not in name and name not in (".", "..")
    assert len(name) <= MAX_STEM_LENGTH + 9
    assert os.path.basename(name) == name
    assert Path("/base", name + ".fits").resolve().parent == Path("/base").resolve()


def test_safe_filename_keeps_clean_ids_and_marks_changes():
    assert safe_filename("TILE_102018666_12345", set()) == "TILE_102018666_12345"
    assert safe_filename("a.b-c_D", set()) == "a.b-c_D"
    changed = safe_filename("../../x", set())
    assert changed.startswith("_.._x_") and len(changed.rsplit("_", 1)[1]) == 8
    long = safe_filename("x" * 300, set())
    assert long.startswith("x" * MAX_STEM_LENGTH + "_") and len(long) == MAX_STEM_LENGTH + 9
    assert safe_filename("", set()).startswith("source_")


def test_safe_filename_collisions():
    used: set[str] = set()
    first = safe_filename("a/b", used)
    second = safe_filename("a_b", used)  # sanitises to the same text as the first one's base
    third = safe_filename("A_B", used)  # case-insensitive file systems
    again = safe_filename("a/b", used)  # a repeated ID still gets its own file
    assert len({first.casefold(), second.casefold(), third.casefold(), again.casefold()}) == 4
    assert used == {first, second, third, again}
    # Distinct long IDs sharing their first 100 characters stay distinct.
    assert safe_filename("y" * 150 + "1", set()) != safe_filename("y" * 150 + "2", set())


def test_every_shard_is_handed_to_the_disk_as_soon_as_written(tmp_path, monkeypatch):
    from cutana import writers

    advised = []

    def fadvise(fd, offset, length, advice):
        advised.append((os.fstat(fd).st_size, advice))

    monkeypatch.setattr(writers.os, "posix_fadvise", fadvise, raising=False)
    writer = writers.ZarrShardWriter(tmp_path, (256, 256, 3), np.float32, max_images=1000)
    images = np.random.default_rng(0).random((100, 256, 256, 3), dtype=np.float32)
    writer.append(images)
    writer.close()
    shards = sorted((tmp_path / "images.zarr" / "images" / "c").iterdir())
    assert len(shards) == 2 == len(advised)  # a 64 MB shard of 85 images, then 15
    assert all(advice == os.POSIX_FADV_DONTNEED and size > 0 for size, advice in advised)
    np.testing.assert_array_equal(zarr.open_array(tmp_path / "images.zarr" / "images")[:], images)
    # Where the call does not exist, writing works the same.
    monkeypatch.delattr(writers.os, "posix_fadvise")
    writers.release_page_cache(0)


def test_a_written_batch_leaves_the_page_cache_once_on_disk(tmp_path, monkeypatch):
    from cutana import writers

    synced, advised = set(), []
    real_fsync = os.fsync

    def fsync(fd):
        synced.add(os.fstat(fd).st_ino)
        real_fsync(fd)

    def fadvise(fd, offset, length, advice):
        inode = os.fstat(fd).st_ino
        advised.append((inode, inode in synced, advice))

    monkeypatch.setattr(writers.os, "fsync", fsync)
    monkeypatch.setattr(writers.os, "posix_fadvise", fadvise, raising=False)
    batch = write_zarr_batch(tmp_path / "batch", _images(7), _metadata(7))
    files = {path.stat().st_ino for path in batch.rglob("*") if path.is_file()}
    # Every file of the batch is fsynced, then dropped from the page cache.
    dropped = {ino for ino, was_synced, advice in advised if was_synced}
    assert files and dropped == files
    assert all(advice == os.POSIX_FADV_DONTNEED for _, _, advice in advised)


@pytest.mark.parametrize("dtype,channels", [(np.float32, 3), (np.uint8, 1)])
def test_shard_reader_reads_what_zarr_reads(tmp_path, monkeypatch, dtype, channels):
    from cutana import writers

    # Small shards: the images span several shard files, the last one partly filled.
    monkeypatch.setattr(writers, "SHARD_TARGET_BYTES", 16 * 16 * channels * dtype().itemsize * 4)
    images = _images(11, channels=channels, dtype=dtype)
    write_zarr_batch(tmp_path / "b", images, _metadata(11))
    root = tmp_path / "b" / "images.zarr"
    assert len(list((root / "images" / "c").iterdir())) == 3
    reader = writers.ZarrShardReader.open(root)
    assert isinstance(reader, writers.ZarrShardReader)
    assert (len(reader), reader.shape, reader.dtype) == (11, images.shape, np.dtype(dtype))
    by_zarr = zarr.open_array(root / "images", mode="r")
    for i in range(11):
        np.testing.assert_array_equal(reader[i], by_zarr[i])
        np.testing.assert_array_equal(reader[i], images[i])
    with pytest.raises(IndexError, match="outside"):
        reader[11]


def test_shard_reader_checks_the_index_and_leaves_other_layouts_to_zarr(tmp_path):
    from cutana import writers

    write_zarr_batch(tmp_path / "b", _images(3), _metadata(3))
    root = tmp_path / "b" / "images.zarr"
    shard = root / "images" / "c" / "0" / "0" / "0" / "0"
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF  # one bit pattern of the index changed
    shard.write_bytes(bytes(data))
    with pytest.raises(CutanaError, match="CRC32C"):
        writers.ZarrShardReader.open(root)[0]
    # An array Zarr wrote itself (no sharding): Zarr's array is returned.
    other = zarr.open_group(tmp_path / "other.zarr", mode="w")
    other.create_array("images", shape=(2, 4, 4, 1), chunks=(1, 4, 4, 1), dtype="f4")
    other["images"][:] = 7.0
    array = writers.ZarrShardReader.open(tmp_path / "other.zarr")
    assert not isinstance(array, writers.ZarrShardReader)
    np.testing.assert_array_equal(array[1], np.full((4, 4, 1), 7.0, np.float32))
