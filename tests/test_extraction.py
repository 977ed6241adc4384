"""Tests of cutana.extraction: sizes, overlap_slices parity, stamp extraction vs Cutout2D."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from astropy.nddata import Cutout2D, NoOverlapError
from astropy.nddata.utils import overlap_slices

from cutana.exceptions import CatalogueValidationError
from cutana.extraction import extract_stamps, stamp_sizes, stamp_windows


class ArrayHandle:
    """A stand-in for ImageHandle over an in-memory array that counts reads."""

    def __init__(self, data):
        self.data = np.asarray(data, dtype=np.float32)
        self.shape = self.data.shape
        self.reads = []

    def read(self, y0, y1, x0, x1):
        self.reads.append((y0, y1, x0, x1))
        return self.data[y0:y1, x0:x1].copy()


def test_stamp_sizes_pixel_arcsec_and_padding():
    cat = pd.DataFrame(
        {
            "diameter_pixel": [64.0, None, 10.0, None],
            "diameter_arcsec": [None, 3.0, 99.0, 0.1],
        }
    )
    scales = np.array([0.1, 0.3])
    sizes = stamp_sizes(cat, scales, padding_factor=1.0)
    assert sizes.dtype == np.int64
    # diameter_pixel wins; arcsec / scale rounded (30 and 10); tiny sizes clamp to 1
    np.testing.assert_array_equal(sizes, [[64, 64], [30, 10], [10, 10], [1, 1]])
    padded = stamp_sizes(cat, scales, padding_factor=1.5)
    np.testing.assert_array_equal(padded, [[96, 96], [45, 15], [15, 15], [2, 1]])
    # per-row scales (N, B)
    per_row = stamp_sizes(cat.iloc[1:2], np.array([[0.2, 0.6]]), 1.0)
    np.testing.assert_array_equal(per_row, [[15, 5]])


def test_stamp_sizes_rejects_rows_without_size():
    cat = pd.DataFrame({"diameter_pixel": [10.0, None], "diameter_arcsec": [None, None]})
    with pytest.raises(CatalogueValidationError, match=r"rows \[1\]"):
        stamp_sizes(cat, np.array([0.1]), 1.0)


def _astropy_window(shape, size, x, y):
    try:
        large, small = overlap_slices(shape, (size, size), (y, x), mode="partial")
    except NoOverlapError:
        return None
    return large, small


def test_windows_match_astropy_overlap_slices():
    rng = np.random.default_rng(11)
    shape = (57, 83)
    n = 4000
    sizes = rng.integers(1, 40, n)
    # positions well outside, on edges and corners, and on integer and half-integer values
    x = rng.uniform(-45, 83 + 45, n)
    y = rng.uniform(-45, 57 + 45, n)
    x[: n // 4] = np.round(x[: n // 4] * 2) / 2
    y[: n // 4] = np.round(y[: n // 4] * 2) / 2
    x[n // 4 : n // 2] = np.round(x[n // 4 : n // 2])
    corners = np.array([[-0.5, -0.5], [82.5, 56.5], [0, 56], [82, 0], [-20, -20], [102, 76]])
    x[-len(corners) :], y[-len(corners) :] = corners[:, 0], corners[:, 1]
    windows = stamp_windows(x, y, sizes, shape)
    seen_no_overlap = seen_partial = seen_full = 0
    for k in range(n):
        expected = _astropy_window(shape, int(sizes[k]), x[k], y[k])
        if expected is None:
            assert windows.no_overlap[k], (x[k], y[k], sizes[k])
            seen_no_overlap += 1
            continue
        (ly, lx), (sy, sx) = expected
        assert not windows.no_overlap[k]
        got = (
            windows.large_y0[k],
            windows.large_y1[k],
            windows.large_x0[k],
            windows.large_x1[k],
            windows.small_y0[k],
            windows.small_x0[k],
        )
        assert got == (ly.start, ly.stop, lx.start, lx.stop, sy.start, sx.start), k
        assert sy.stop - sy.start == ly.stop - ly.start
        cutout = Cutout2D(np.zeros(shape), (x[k], y[k]), int(sizes[k]), mode="partial", copy=True)
        # Cutout2D's origin_original is clipped to the image; the true origin of pixel [0, 0]
        # is the large slice start minus the small slice start.
        true_origin = tuple(
            large.start - small.start
            for large, small in zip(
                cutout.slices_original[::-1], cutout.slices_cutout[::-1], strict=True
            )
        )
        assert (windows.origin_x[k], windows.origin_y[k]) == true_origin
        if windows.partial[k]:
            seen_partial += 1
        else:
            seen_full += 1
    # the random draw really covered all three cases
    assert min(seen_no_overlap, seen_partial, seen_full) > 100


def test_non_finite_positions_are_no_overlap():
    windows = stamp_windows([np.nan, 5.0], [1.0, np.inf], [3, 3], (10, 10))
    assert windows.no_overlap.all()


@pytest.mark.parametrize("size", [1, 6, 7, 20])
@pytest.mark.parametrize("fill", [0.0, -7.5])
def test_extract_stamps_equals_cutout2d(size, fill):
    rng = np.random.default_rng(size)
    shape = (40, 50)
    data = rng.normal(size=shape).astype(np.float32)
    data[5, 7] = np.nan
    data[30, 45] = np.inf
    positions = np.array(
        [
            [25.0, 20.0],  # interior
            [24.5, 19.5],  # half-integer
            [0.2, 20.3],  # left edge
            [49.7, 39.9],  # top-right corner
            [-3.0, -2.0],  # outside lower-left (partial for big stamps)
            [7.0, 5.0],  # on the NaN
            [45.2, 30.4],  # on the inf
        ]
    )
    windows = stamp_windows(positions[:, 0], positions[:, 1], size, shape)
    keep = ~windows.no_overlap
    handle = ArrayHandle(data)
    stamps, valid = extract_stamps(handle, windows.take(keep), fill=fill)
    assert stamps.shape == (keep.sum(), size, size) and stamps.dtype == np.float32
    # exactly one read per stamp, of exactly the overlapping region
    assert len(handle.reads) == keep.sum()
    for k, (x, y) in enumerate(positions[keep]):
        cutout = Cutout2D(data, (x, y), size, mode="partial", fill_value=np.nan).data
        expected = np.where(np.isfinite(cutout), cutout, np.float32(fill))
        np.testing.assert_array_equal(stamps[k], expected)
        np.testing.assert_array_equal(valid[k], np.isfinite(cutout))


def test_extract_stamps_no_overlap_window_is_all_invalid_without_reading():
    handle = ArrayHandle(np.ones((10, 10)))
    windows = stamp_windows([100.0], [100.0], 4, (10, 10))
    stamps, valid = extract_stamps(handle, windows, fill=3.0)
    assert handle.reads == []
    assert not valid.any() and (stamps == 3.0).all()


def test_extract_stamps_requires_one_size():
    windows = stamp_windows([5.0, 5.0], [5.0, 5.0], [3, 4], (10, 10))
    with pytest.raises(ValueError, match="one size"):
        extract_stamps(ArrayHandle(np.ones((10, 10))), windows)
