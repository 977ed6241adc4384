"""Tests of cutana.mixing: weighted band-to-channel mixing with validity masks (SPEC §6)."""

import numpy as np
import pytest

from cutana.mixing import mix_channels


def _bands(n_images=3, n_bands=3, size=8, seed=0):
    rng = np.random.default_rng(seed)
    bands = rng.normal(5.0, 2.0, size=(n_images, n_bands, size, size)).astype(np.float32)
    return bands, np.ones(bands.shape, dtype=bool)


def test_weighted_sum_matches_explicit_loop():
    bands, valid = _bands()
    weights = np.array([[1.0, 0.0, 0.5], [0.0, 2.0, 0.5], [-1.0, 0.0, 0.25]])
    images, valid_out = mix_channels(bands, valid, weights)
    assert images.shape == valid_out.shape == (3, 8, 8, 3)
    assert images.dtype == np.float32
    for c in range(3):
        expected = sum(weights[b, c] * bands[:, b].astype(np.float64) for b in range(3))
        np.testing.assert_allclose(images[..., c], expected, rtol=1e-5, atol=1e-5)
    assert valid_out.all()


def test_weights_are_not_normalised():
    bands, valid = _bands(n_bands=2)
    images, _ = mix_channels(bands, valid, [[3.0], [3.0]])
    np.testing.assert_allclose(images[..., 0], 3 * (bands[:, 0] + bands[:, 1]), rtol=1e-6)


def test_zero_weight_band_never_affects_channel_even_if_nan():
    bands, valid = _bands()
    bands[:, 2] = np.nan
    valid[:, 2] = False
    bands[0, 1, 2, 3] = np.inf  # non-finite but flagged valid: treated as invalid
    weights = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    images, valid_out = mix_channels(bands, valid, weights)
    np.testing.assert_array_equal(images[..., 0], bands[:, 0])
    assert valid_out[..., 0].all()
    assert not valid_out[..., 1].any()  # band 2 (invalid everywhere) is used by channel 1
    assert np.all(images[..., 1] == 0)
    assert np.all(np.isfinite(images))


def test_pixel_valid_iff_all_weighted_bands_valid():
    rng = np.random.default_rng(4)
    bands, _ = _bands(seed=4)
    valid = rng.random(bands.shape) > 0.2
    bands[~valid] = np.nan
    weights = np.array([[1.0, 0.0, 1.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    images, valid_out = mix_channels(bands, valid, weights)
    np.testing.assert_array_equal(valid_out[..., 0], valid[:, 0] & valid[:, 1])
    np.testing.assert_array_equal(valid_out[..., 1], valid[:, 1])
    np.testing.assert_array_equal(valid_out[..., 2], valid[:, 0] & valid[:, 2])
    both = valid_out[..., 0]
    np.testing.assert_allclose(images[..., 0][both], (bands[:, 0] + bands[:, 1])[both], rtol=1e-6)
    assert np.all(images[~valid_out] == 0)


def test_single_band_identity():
    bands, valid = _bands(n_bands=1)
    images, valid_out = mix_channels(bands, valid, [[1.0]])
    np.testing.assert_array_equal(images[..., 0], bands[:, 0])
    assert valid_out.all()


def test_shape_errors_name_the_problem():
    bands, valid = _bands(n_bands=2)
    with pytest.raises(ValueError, match=r"weights must have shape \(B=2, C\)"):
        mix_channels(bands, valid, [[1.0], [1.0], [1.0]])
    with pytest.raises(ValueError, match="valid has shape"):
        mix_channels(bands, valid[:, :1], [[1.0], [1.0]])
    with pytest.raises(ValueError, match=r"\(N, B, T, T\)"):
        mix_channels(bands[0], valid[0], [[1.0], [1.0]])
    with pytest.raises(ValueError, match="finite"):
        mix_channels(bands, valid, [[np.nan], [1.0]])


@pytest.mark.parametrize("weight", [1.0, 2.5])
def test_single_band_channel_masks_nan_inf_and_invalid_values(weight):
    rng = np.random.default_rng(7)
    bands = rng.normal(size=(3, 1, 6, 6)).astype(np.float32)
    valid = np.ones(bands.shape, dtype=bool)
    bands[0, 0, 1, 2] = np.nan  # marked valid but not finite
    bands[1, 0, 3, 3] = np.inf
    valid[2, 0, 0, :] = False
    bands[2, 0, 0, :] = 1e30  # garbage under invalid pixels
    images, out_valid = mix_channels(bands, valid, np.array([[weight]]))
    assert images.shape == (3, 6, 6, 1) and out_valid.shape == (3, 6, 6, 1)
    expected_valid = valid[:, 0] & np.isfinite(bands[:, 0])
    np.testing.assert_array_equal(out_valid[..., 0], expected_valid)
    assert np.all(images[..., 0][~expected_valid] == 0)
    np.testing.assert_allclose(
        images[..., 0][expected_valid], weight * bands[:, 0][expected_valid], rtol=1e-6
    )


def test_planes_are_the_channels_of_mix_channels():
    from cutana.mixing import mix_planes

    bands, valid = _bands()
    valid[0, 1, 2:4] = False
    bands[2, 0, 5, 5] = np.nan
    for weights in (np.eye(3), [[1.0, 0.0], [0.5, 0.0], [0.0, 1.0]]):
        planes, planes_valid = mix_planes(bands, valid, weights)
        images, valid_out = mix_channels(bands, valid, weights)
        np.testing.assert_array_equal(planes.transpose(0, 2, 3, 1), images)
        np.testing.assert_array_equal(planes_valid.transpose(0, 2, 3, 1), valid_out)


def test_one_band_per_channel_reuses_the_bands_and_all_valid_is_none():
    from cutana.mixing import mix_planes

    bands, valid = _bands()
    planes, planes_valid = mix_planes(bands, valid, np.eye(3))
    assert planes is bands and planes_valid is None
    # Another order of the bands is a copy, with the same values.
    swapped, _ = mix_planes(bands, valid, np.eye(3)[:, [1, 0, 2]])
    assert not np.shares_memory(swapped, bands)
    np.testing.assert_array_equal(swapped[:, 0], bands[:, 1])


def test_finite_zeroed_bands_are_mixed_without_copies():
    from cutana.mixing import mix_planes

    bands, valid = _bands()
    valid[0, 1, 2:4] = False
    bands[~valid] = 0.0  # as resample_stack returns them
    weights = [[1.0, 0.0], [0.5, 0.0], [0.0, 1.0]]
    for w in (np.eye(3), weights):
        planes, planes_valid = mix_planes(bands, valid, w, finite=True)
        expected, expected_valid = mix_planes(bands, valid, w)
        np.testing.assert_array_equal(planes, expected)
        np.testing.assert_array_equal(planes_valid, expected_valid)
    planes, planes_valid = mix_planes(bands, valid, np.eye(3), finite=True)
    assert planes is bands and planes_valid is valid
