"""Tests of cutana.resample: mask-aware OpenCV resampling (SPEC §6)."""

from fractions import Fraction

import numpy as np
import pytest
from scipy import ndimage

from cutana.exceptions import ConfigValidationError
from cutana.resample import resample_stack

INTERPOLATIONS = ["nearest", "bilinear", "cubic", "bicubic", "lanczos"]
# Kernel radius in input pixels of each enlarging interpolation (area uses the scale factor).
KERNEL_RADIUS = {"nearest": 1, "bilinear": 1, "cubic": 2, "bicubic": 2, "lanczos": 4}


def _random_stack(count, size, seed=0):
    rng = np.random.default_rng(seed)
    stamps = rng.normal(10.0, 3.0, size=(count, size, size)).astype(np.float32)
    return stamps, np.ones(stamps.shape, dtype=bool)


def _source_coordinates(size, target):
    """Half-pixel-centre mapping: output pixel j samples input x = (j + 0.5) S / T - 0.5."""
    return (np.arange(target) + 0.5) * size / target - 0.5


@pytest.mark.parametrize("interpolation", INTERPOLATIONS)
@pytest.mark.parametrize("size,target", [(40, 17), (40, 20), (17, 40), (16, 64)])
def test_constant_image_stays_constant_even_with_holes(interpolation, size, target):
    stamps = np.full((3, size, size), 7.25, dtype=np.float32)
    valid = np.ones(stamps.shape, dtype=bool)
    valid[1, 5:9, :] = False
    stamps[1, 5:9, :] = np.nan  # an invalid stripe must not pull the constant down
    valid[2] = False  # nothing valid at all
    out, valid_out = resample_stack(stamps, valid, target, interpolation)
    assert out.shape == valid_out.shape == (3, target, target)
    assert out.dtype == np.float32
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out[0], 7.25, rtol=1e-6)
    assert valid_out[0].all()
    np.testing.assert_allclose(out[1][valid_out[1]], 7.25, rtol=1e-6)
    assert not valid_out[1].all()
    assert not valid_out[2].any() and np.all(out[2] == 0)


@pytest.mark.parametrize("factor", [2, 3, 4])
def test_area_shrink_equals_block_mean(factor):
    stamps, valid = _random_stack(5, 12 * factor)
    out, valid_out = resample_stack(stamps, valid, 12, "bilinear")
    blocks = stamps.reshape(5, 12, factor, 12, factor).mean(axis=(2, 4))
    np.testing.assert_allclose(out, blocks, rtol=1e-5)
    assert valid_out.all()


def test_area_shrink_block_mean_of_valid_pixels_only():
    stamps, valid = _random_stack(1, 8)
    valid[0, 0, 0] = False  # one of four pixels of the first 2x2 block
    stamps[0, 0, 0] = 1e9  # garbage under the mask must not leak
    out, valid_out = resample_stack(stamps, valid, 4, "bilinear")
    expected = (stamps[0, 0, 1] + stamps[0, 1, 0] + stamps[0, 1, 1]) / 3
    assert out[0, 0, 0] == pytest.approx(expected, rel=1e-5)
    assert valid_out[0, 0, 0]  # 3/4 of the weight is valid (>= 0.5)
    valid[0, 0, 1] = valid[0, 1, 0] = False  # now only 1/4 of the block is valid
    out, valid_out = resample_stack(stamps, valid, 4, "bilinear")
    assert not valid_out[0, 0, 0] and out[0, 0, 0] == 0


@pytest.mark.parametrize("size,target", [(64, 32), (100, 37), (75, 64)])
def test_area_shrink_conserves_flux(size, target):
    stamps, valid = _random_stack(4, size, seed=3)
    out, _ = resample_stack(stamps, valid, target, "lanczos")
    total_in = stamps.sum(axis=(1, 2), dtype=np.float64)
    total_out = out.sum(axis=(1, 2), dtype=np.float64) * (size / target) ** 2
    np.testing.assert_allclose(total_out, total_in, rtol=1e-5)


@pytest.mark.parametrize("size,target", [(10, 37), (16, 64), (33, 50)])
def test_bilinear_enlarge_matches_scipy_half_pixel_reference(size, target):
    stamps, valid = _random_stack(3, size, seed=5)
    out, valid_out = resample_stack(stamps, valid, target, "bilinear")
    coords = _source_coordinates(size, target)
    rows, cols = np.meshgrid(coords, coords, indexing="ij")
    for k in range(3):
        # mode="nearest" replicates the edge, as OpenCV does for coordinates outside the image.
        reference = ndimage.map_coordinates(
            stamps[k].astype(np.float64), [rows, cols], order=1, mode="nearest"
        )
        np.testing.assert_allclose(out[k], reference, rtol=1e-5, atol=1e-5)
    assert valid_out.all()


@pytest.mark.parametrize("size,target", [(5, 7), (10, 37), (16, 64)])
def test_nearest_uses_half_pixel_centres(size, target):
    stamps, valid = _random_stack(2, size, seed=7)
    out, _ = resample_stack(stamps, valid, target, "nearest")
    # The centre of output pixel j lies at input x = (j + 0.5) S / T - 0.5; the nearest input
    # centre is round(x), ties (x exactly halfway, e.g. S=10, T=37, j=18) going right.
    source_x = [
        Fraction(2 * j + 1, 2) * Fraction(size, target) - Fraction(1, 2) for j in range(target)
    ]
    index = np.array([int(x + Fraction(1, 2)) for x in source_x])
    np.testing.assert_array_equal(out, stamps[:, index][:, :, index])


@pytest.mark.parametrize("interpolation", INTERPOLATIONS)
def test_same_size_is_identity_with_invalid_pixels_zeroed(interpolation):
    stamps, valid = _random_stack(3, 20, seed=11)
    valid[1, 3, 4] = False
    stamps[2, 6, 6] = np.inf  # non-finite counts as invalid
    out, valid_out = resample_stack(stamps, valid, 20, interpolation)
    expected_valid = valid & np.isfinite(stamps)
    np.testing.assert_array_equal(valid_out, expected_valid)
    np.testing.assert_array_equal(out[expected_valid], stamps[expected_valid])
    assert np.all(out[~expected_valid] == 0)
    assert out is not stamps


@pytest.mark.parametrize("interpolation", INTERPOLATIONS)
@pytest.mark.parametrize("size,target", [(60, 23), (20, 70)])
def test_nan_stripe_changes_no_pixel_beyond_kernel_support(interpolation, size, target):
    stamps, valid = _random_stack(2, size, seed=13)
    clean_out, _ = resample_stack(stamps, valid, target, interpolation)
    stripe = size // 2
    holed, holed_valid = stamps.copy(), valid.copy()
    holed[:, :, stripe] = np.nan
    holed_valid[:, :, stripe] = False
    out, valid_out = resample_stack(holed, holed_valid, target, interpolation)
    assert np.all(np.isfinite(out))
    # Support radius in input pixels: the area footprint when shrinking, the kernel otherwise.
    radius = size / target if target < size else KERNEL_RADIUS[interpolation]
    source_x = _source_coordinates(size, target)
    far = np.abs(source_x - stripe) > radius + 1
    assert far.sum() > target // 3
    np.testing.assert_allclose(out[:, :, far], clean_out[:, :, far], rtol=1e-5, atol=1e-5)
    assert valid_out[:, :, far].all()
    # Near the stripe, the constant-image test above shows holes neither darken nor brighten.


def test_nearest_output_valid_iff_nearest_input_valid():
    rng = np.random.default_rng(17)
    stamps, _ = _random_stack(2, 9, seed=17)
    valid = rng.random(stamps.shape) > 0.3
    out, valid_out = resample_stack(stamps, valid, 31, "nearest")
    index = (2 * np.arange(31) + 1) * 9 // 62
    expected_valid = valid[:, index][:, :, index]
    np.testing.assert_array_equal(valid_out, expected_valid)
    np.testing.assert_array_equal(
        out[expected_valid], stamps[:, index][:, :, index][expected_valid]
    )
    assert np.all(out[~expected_valid] == 0)


def test_stamp_result_does_not_depend_on_the_rest_of_the_stack():
    # A source must get the same pixels whichever batch it lands in (reruns, other batch sizes).
    stamps, valid = _random_stack(300, 21, seed=19)
    valid[::7, 3:6, 2:9] = False
    for target in (16, 45):
        out, valid_out = resample_stack(stamps, valid, target, "cubic")
        for k in (0, 1, 150, 299):
            single, single_valid = resample_stack(
                stamps[k : k + 1], valid[k : k + 1], target, "cubic"
            )
            np.testing.assert_array_equal(out[k], single[0])
            np.testing.assert_array_equal(valid_out[k], single_valid[0])


def test_empty_stack_and_bad_arguments():
    out, valid_out = resample_stack(np.zeros((0, 8, 8)), np.zeros((0, 8, 8), bool), 4, "nearest")
    assert out.shape == valid_out.shape == (0, 4, 4)
    stamps, valid = _random_stack(1, 8)
    with pytest.raises(ConfigValidationError, match="interpolation.*'bilinear'"):
        resample_stack(stamps, valid, 16, "spline")
    with pytest.raises(ValueError, match=r"\(K, S, S\)"):
        resample_stack(stamps[:, :, :4], valid[:, :, :4], 16, "nearest")
    with pytest.raises(ValueError, match="valid has shape"):
        resample_stack(stamps, valid[:, :4], 16, "nearest")
    with pytest.raises(ValueError, match=">= 1"):
        resample_stack(stamps, valid, 0, "nearest")
