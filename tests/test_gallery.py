"""Tests of the preview gallery (cutana.gallery)."""

from __future__ import annotations

import base64
import re

import cv2
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cutana.gallery import (
    GRID_CAPTION_HEIGHT,
    GRID_GAP,
    GRID_TILE_SIDE,
    _ascii,
    display_image,
    make_gallery,
    select_samples,
)
from cutana.writers import write_fits_batch, write_zarr_batch

CFG = {
    "gallery": {"n_samples": 4},
    "normalisation_method": "linear",
    "data_type": "float32",
    "channel_weights": {"R": [1, 0, 0], "G": [0, 1, 0], "B": [0, 0, 1]},
}


def _colour_images(n: int, channels: int = 3, side: int = 24) -> np.ndarray:
    """Image i is bright only in channel i % channels (with a dark pixel for contrast)."""
    images = np.zeros((n, side, side, channels), np.float32)
    for i in range(n):
        images[i, :, :, i % channels] = 1.0
    return images


def _zarr_run(tmp_path, statuses, channels=3):
    """Two Zarr batches and a merged index as the pipeline would write them."""
    rows = []
    n = len(statuses)
    with_image = [i for i, s in enumerate(statuses) if s in ("ok", "partial")]
    images = _colour_images(len(with_image), channels)
    halves = [with_image[: len(with_image) // 2], with_image[len(with_image) // 2 :]]
    start = 0
    for batch, members in enumerate(halves):
        name = f"batch_cutout_process_{batch:05d}_x"
        meta = pd.DataFrame({"source_id": [f"S{i}" for i in members]})
        write_zarr_batch(tmp_path / name, images[start : start + len(members)], meta)
        for k, i in enumerate(members):
            rows.append((i, f"{name}/images.zarr", k))
        start += len(members)
    placed = {i: (f, k) for i, f, k in rows}
    index = pd.DataFrame(
        {
            "row_index": np.arange(n),
            "SourceID": [f"<S{i}&>" for i in range(n)],
            "status": statuses,
            "zarr_file": [placed.get(i, ("", -1))[0] for i in range(n)],
            "idx_in_zarr": [placed.get(i, ("", -1))[1] for i in range(n)],
        }
    )
    return index, images


def _read_png(path) -> np.ndarray:
    """The gallery PNG as (H, W, 3) uint8 in RGB order."""
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert image is not None and image.dtype == np.uint8 and image.shape[2] == 3
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def _tile(picture: np.ndarray, k: int, columns: int) -> tuple[np.ndarray, np.ndarray]:
    """(image area, caption strip) of tile ``k`` of the PNG grid."""
    top = GRID_GAP + (k // columns) * (GRID_TILE_SIDE + GRID_CAPTION_HEIGHT + GRID_GAP)
    left = GRID_GAP + (k % columns) * (GRID_TILE_SIDE + GRID_GAP)
    bottom = top + GRID_TILE_SIDE
    area = picture[top:bottom, left : left + GRID_TILE_SIDE]
    caption = picture[bottom : bottom + GRID_CAPTION_HEIGHT, left : left + GRID_TILE_SIDE]
    return area, caption


def _thumbnails(html_text: str) -> list[np.ndarray]:
    """Decode the base64 PNG thumbnails of the page (RGB order)."""
    out = []
    for payload in re.findall(r'src="data:image/png;base64,([^"]+)"', html_text):
        data = np.frombuffer(base64.b64decode(payload), np.uint8)
        image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
        out.append(cv2.cvtColor(image, cv2.COLOR_BGR2RGB) if image.ndim == 3 else image)
    return out


def test_select_samples_evenly_spaced_and_deterministic():
    statuses = ["ok", "failed", "partial", "no_overlap"] * 10
    index = pd.DataFrame({"row_index": np.arange(40), "status": statuses})
    shuffled = index.sample(frac=1.0, random_state=1)
    chosen = select_samples(shuffled, 5)
    assert list(chosen["row_index"]) == list(select_samples(index, 5)["row_index"])
    eligible = [i for i in range(40) if statuses[i] in ("ok", "partial")]
    assert list(chosen["row_index"]) == [eligible[k] for k in (0, 5, 10, 14, 19)]
    assert len(select_samples(index, 100)) == 20
    assert select_samples(index, 0).empty


def test_gallery_from_zarr_outputs(tmp_path):
    statuses = ["ok", "failed", "ok", "partial", "no_overlap", "ok", "ok", "ok"]
    index, _ = _zarr_run(tmp_path, statuses)
    png, html_path = make_gallery(tmp_path, index, CFG)
    assert png == tmp_path / "gallery.png" and html_path == tmp_path / "gallery.html"
    picture = _read_png(png)
    assert picture.shape[0] > 100 and picture.shape[1] > 100
    text = html_path.read_text(encoding="utf-8")
    # Four samples (cfg gallery.n_samples), IDs escaped, failed rows not shown.
    assert text.count("<figure>") == 4
    assert "&lt;S0&amp;&gt;" in text and "<S0&>" not in text
    assert "&lt;S1&amp;&gt;" not in text and "&lt;S4&amp;&gt;" not in text
    thumbs = _thumbnails(text)
    assert len(thumbs) == 4
    # Sample k shows image k of the eligible ones: bright in channel (k % 3) only (RGB).
    eligible = [i for i, s in enumerate(statuses) if s in ("ok", "partial")]
    chosen = select_samples(index, 4)
    for thumb, row_index in zip(thumbs, chosen["row_index"], strict=True):
        channel = eligible.index(row_index) % 3
        assert thumb.shape == (24, 24, 3)
        assert (thumb[:, :, channel] == 255).all()
        assert (np.delete(thumb, channel, axis=2) == 0).all()


def test_gallery_grey_for_one_channel_and_n_samples_argument(tmp_path):
    index, _ = _zarr_run(tmp_path, ["ok"] * 5, channels=1)
    _, html_path = make_gallery(tmp_path, index, CFG, n_samples=2)
    thumbs = _thumbnails(html_path.read_text(encoding="utf-8"))
    assert len(thumbs) == 2
    assert all(t.ndim == 2 for t in thumbs)  # grey PNGs


def test_gallery_from_fits_outputs(tmp_path):
    images = _colour_images(3)
    meta = pd.DataFrame({"source_id": ["a/1", "b", "c"], "ra": [1.0, 2.0, 3.0]})
    names = write_fits_batch(tmp_path / "bfits", images, meta, CFG)
    index = pd.DataFrame(
        {
            "SourceID": ["a/1", "b", "c"],
            "status": ["ok", "partial", "ok"],
            "fits_file": [f"bfits/{n}" for n in names],
            "idx_in_zarr": [0, 1, 2],
        }
    )
    _, html_path = make_gallery(tmp_path, index, CFG, n_samples=3)
    thumbs = _thumbnails(html_path.read_text(encoding="utf-8"))
    assert [int(np.argmax(t.mean(axis=(0, 1)))) for t in thumbs] == [0, 1, 2]


def test_gallery_with_no_ok_sources(tmp_path):
    index = pd.DataFrame(
        {"SourceID": ["x", "y"], "status": ["failed", "no_overlap"], "zarr_file": ["", ""],
         "idx_in_zarr": [-1, -1]}
    )  # fmt: skip
    png, html_path = make_gallery(tmp_path, index, CFG)
    picture = _read_png(png)
    assert picture.size > 0
    assert picture.min() < 128 < picture.max()  # the message is drawn on the background
    text = html_path.read_text(encoding="utf-8")
    assert "No cutouts with status ok or partial" in text
    assert "<img" not in text


def test_gallery_survives_a_missing_batch(tmp_path, caplog):
    index, _ = _zarr_run(tmp_path, ["ok"] * 4)
    index.loc[1, "zarr_file"] = "batch_cutout_process_99999_gone/images.zarr"
    _, html_path = make_gallery(tmp_path, index, CFG)
    text = html_path.read_text(encoding="utf-8")
    assert text.count("<figure>") == 4
    assert text.count("<img") == 3 and "unavailable" in text
    assert "cannot read the cutout" in caplog.text


def test_gallery_is_reproducible(tmp_path):
    index, _ = _zarr_run(tmp_path, ["ok"] * 6)
    png, html_path = make_gallery(tmp_path, index, CFG)
    first = (png.read_bytes(), html_path.read_bytes())
    make_gallery(tmp_path, index, CFG)
    assert (png.read_bytes(), html_path.read_bytes()) == first
    # No time stamp or software chunk that could differ between runs or versions.
    assert b"tIME" not in first[0] and b"tEXt" not in first[0]


@pytest.mark.parametrize(
    ("image", "expected"),
    [
        (np.array([[[0.0], [2.0]], [[np.nan], [1.0]]], np.float32), [[0.0, 1.0], [0.0, 0.5]]),
        (np.full((2, 2, 1), 7.0, np.float32), [[0.0, 0.0], [0.0, 0.0]]),
        (np.array([[[0], [255]]], np.uint8), [[0.0, 1.0]]),
    ],
)
def test_display_image_scaling(image, expected):
    np.testing.assert_allclose(display_image(image), expected)


def test_thumbnails_show_north_up(tmp_path):
    """Row 0 of a cutout is its bottom (FITS/Cutout2D order): it must end at the PNG bottom."""
    image = np.zeros((1, 20, 20, 1), np.float32)
    image[0, -5:, :, 0] = 1.0  # the top rows (largest y) are bright
    write_zarr_batch(tmp_path / "b", image, pd.DataFrame({"source_id": ["up"]}))
    index = pd.DataFrame(
        {"SourceID": ["up"], "status": ["ok"], "zarr_file": ["b/images.zarr"], "idx_in_zarr": [0]}
    )
    _, html_path = make_gallery(tmp_path, index, CFG)
    (thumb,) = _thumbnails(html_path.read_text(encoding="utf-8"))
    assert (thumb[:5] == 255).all() and (thumb[5:] == 0).all()


@pytest.mark.parametrize(("n", "rows", "columns"), [(1, 1, 1), (2, 1, 2), (5, 2, 3), (10, 3, 4)])
def test_png_grid_size(tmp_path, n, rows, columns):
    """ceil(sqrt(n)) columns of fixed-size tiles with a caption strip under each."""
    index, _ = _zarr_run(tmp_path, ["ok"] * n)
    png, _ = make_gallery(tmp_path, index, CFG, n_samples=n)
    picture = _read_png(png)
    assert 160 <= GRID_TILE_SIDE <= 200
    height = rows * (GRID_TILE_SIDE + GRID_CAPTION_HEIGHT) + (rows + 1) * GRID_GAP
    width = columns * GRID_TILE_SIDE + (columns + 1) * GRID_GAP
    assert picture.shape == (height, width, 3)


def test_png_tiles_show_cutouts_north_up_in_rgb(tmp_path):
    """A grey cutout with a bright row 0 shows it at the tile bottom; red stays red (not BGR)."""
    grey = np.zeros((1, 24, 24, 1), np.float32)
    grey[0, :3, :, 0] = 5.0  # rows 0-2 (the south edge) are bright
    red = np.zeros((1, 12, 12, 3), np.float32)
    red[0, :, :, 0] = 1.0
    write_zarr_batch(tmp_path / "grey", grey, pd.DataFrame({"source_id": ["g"]}))
    write_zarr_batch(tmp_path / "red", red, pd.DataFrame({"source_id": ["r"]}))
    index = pd.DataFrame(
        {
            "SourceID": ["g", "r"],
            "status": ["ok", "ok"],
            "zarr_file": ["grey/images.zarr", "red/images.zarr"],
            "idx_in_zarr": [0, 0],
        }
    )
    png, _ = make_gallery(tmp_path, index, CFG, n_samples=2)
    picture = _read_png(png)
    (grey_tile, _), (red_tile, _) = _tile(picture, 0, 2), _tile(picture, 1, 2)
    scale = GRID_TILE_SIDE // 24  # enlarged nearest-neighbour: whole pixels, no blur
    assert (grey_tile[-3 * scale :] == 255).all()
    assert (grey_tile[: -3 * scale] == 0).all()
    assert (red_tile[:, :, 0] == 255).all() and (red_tile[:, :, 1:] == 0).all()


def test_png_large_cutouts_are_shrunk_to_the_tile(tmp_path):
    big = np.zeros((1, 400, 400, 1), np.float32)
    big[0, :200] = 1.0  # south half bright
    write_zarr_batch(tmp_path / "big", big, pd.DataFrame({"source_id": ["big"]}))
    index = pd.DataFrame(
        {
            "SourceID": ["big"],
            "status": ["ok"],
            "zarr_file": ["big/images.zarr"],
            "idx_in_zarr": [0],
        }
    )
    png, _ = make_gallery(tmp_path, index, CFG, n_samples=1)
    tile, _ = _tile(_read_png(png), 0, 1)
    half = GRID_TILE_SIDE // 2
    assert (tile[half + 1 :] == 255).all() and (tile[: half - 1] == 0).all()


def test_png_captions_partial_placeholder_and_non_ascii_ids(tmp_path):
    """Non-ASCII/long IDs draw (as '?'), partial changes the caption, unreadable: placeholder."""
    images = np.zeros((3, 16, 16, 1), np.float32)
    images[:, 4:12, 4:12] = 1.0
    write_zarr_batch(tmp_path / "b", images, pd.DataFrame({"source_id": ["a", "b", "c"]}))
    source_id = "Ünïcødé ★ " + "x" * 60
    index = pd.DataFrame(
        {
            "SourceID": [source_id, source_id, source_id],
            "status": ["ok", "partial", "ok"],
            "zarr_file": ["b/images.zarr", "b/images.zarr", "gone/images.zarr"],
            "idx_in_zarr": [0, 1, 2],
        }
    )
    png, html_path = make_gallery(tmp_path, index, CFG, n_samples=3)
    picture = _read_png(png)
    (ok_area, ok_caption), (partial_area, partial_caption), (gone_area, gone_caption) = (
        _tile(picture, k, 2) for k in range(3)
    )
    assert (ok_caption < 128).any()  # something is written under the tile
    assert np.array_equal(ok_area, partial_area)  # same pixels ...
    assert not np.array_equal(ok_caption, partial_caption)  # ... but a different caption
    assert np.array_equal(ok_caption, gone_caption)  # same ID and status, same caption
    # The unreadable cutout is a uniform placeholder with a light label, not the image.
    assert not np.array_equal(gone_area, ok_area)
    assert (gone_area[0] == gone_area[0, 0]).all() and (gone_area > gone_area[0, 0]).any()
    assert "Ünïcødé" in html_path.read_text(encoding="utf-8")  # the HTML keeps the real ID


def test_captions_are_plain_ascii_for_the_hershey_font():
    assert _ascii("Ünï cø…\t~") == "?n? c?...?~"


def test_gallery_from_an_arrow_index_in_a_process_without_pandas_or_zarr(tmp_path):
    """The workflow's gallery job merges the status tables with pyarrow and reads its samples
    with cutana's shard reader: neither pandas nor Zarr (~0.25 and ~0.4 s of start-up) is
    imported, and the picture equals the one made from a DataFrame index."""
    from conftest import run_in_fresh_process

    index, _ = _zarr_run(tmp_path, ["ok", "no_overlap", "ok", "partial", "ok", "failed", "ok"])
    # As merge_index writes it: no pandas metadata.
    table = pa.Table.from_pandas(index, preserve_index=False).replace_schema_metadata(None)
    pq.write_table(table, tmp_path / "index.parquet")
    for output_dir in ("from_pandas", "from_arrow"):
        (tmp_path / output_dir).mkdir()
        for batch in tmp_path.glob("batch_cutout_process_*"):
            (tmp_path / output_dir / batch.name).symlink_to(batch)
    make_gallery(tmp_path / "from_pandas", index, CFG, n_samples=3)
    loaded, _ = run_in_fresh_process(
        [
            "from cutana.arrow_tables import read_table",
            "from cutana.gallery import make_gallery",
            f"index = read_table({str(tmp_path / 'index.parquet')!r})",
            f"make_gallery({str(tmp_path / 'from_arrow')!r}, index, {CFG!r}, n_samples=3)",
        ]
    )
    assert "pandas" not in loaded and "zarr" not in loaded
    for name in ("gallery.png", "gallery.html"):
        made = (tmp_path / "from_arrow" / name).read_bytes()
        assert made == (tmp_path / "from_pandas" / name).read_bytes()
