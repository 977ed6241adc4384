"""Tests of cutana.normalisation against astropy.visualization (SPEC §6)."""

import numpy as np
import pytest
from astropy.visualization import (
    AsinhStretch,
    LinearStretch,
    LogStretch,
    ManualInterval,
    PercentileInterval,
    ZScaleInterval,
)

from cutana.config import validate_config
from cutana.exceptions import ConfigValidationError
from cutana.normalisation import (
    _sorted_extremes,
    interval_limits,
    normalise_batch,
    percentile_limits,
    zscale_limits,
)


def _config(method, **kwargs):
    normalisation = kwargs.pop("normalisation", {})
    return validate_config(
        {"normalisation_method": method, "normalisation": normalisation, **kwargs},
        warn_unknown=False,
    )


def _images_with_holes(n_images=4, size=48, channels=3, seed=0):
    """Sky-like images: noise, a bright source, a few hot pixels, and NaN holes."""
    rng = np.random.default_rng(seed)
    images = rng.normal(100.0, 5.0, size=(n_images, size, size, channels)).astype(np.float32)
    yy, xx = np.mgrid[:size, :size]
    source = 400.0 * np.exp(-((yy - size / 2) ** 2 + (xx - size / 2) ** 2) / 20.0)
    images += source[None, :, :, None].astype(np.float32) * rng.uniform(0.5, 2, channels)
    images[:, 3, 5, :] = 1e4  # hot pixels the percentile clipping must ignore
    valid = rng.random(images.shape) > 0.1
    valid[1, : size // 2] = False  # a stamp crossing the image edge
    images[~valid] = np.nan
    return images, valid


def _astropy_reference(image, valid, method, percentile=99.8, a=None, crop=None, **zscale):
    """Normalise one (H, W) channel with astropy: limits from the valid (cropped) pixels."""
    region = np.where(valid, image, np.nan)
    if crop is not None:
        region = region[crop]
    if method == "zscale":
        vmin, vmax = ZScaleInterval(**zscale).get_limits(region)
    else:
        vmin, vmax = PercentileInterval(percentile).get_limits(region)
    t = ManualInterval(vmin, vmax)(np.where(valid, image, 0).astype(np.float32), clip=True)
    stretch = {
        "linear": LinearStretch(),
        "zscale": LinearStretch(),
        "log": LogStretch(a if a is not None else 1000.0),
        "asinh": AsinhStretch(a if a is not None else 0.7),
    }[method]
    return stretch(t, clip=True)


@pytest.mark.parametrize("method", ["linear", "log", "asinh", "zscale"])
def test_every_method_matches_astropy(method):
    images, valid = _images_with_holes()
    cfg = _config(method)
    out = normalise_batch(images, valid, cfg)
    assert out.dtype == np.float32 and out.shape == images.shape
    for i in range(images.shape[0]):
        for c in range(images.shape[3]):
            reference = _astropy_reference(images[i, ..., c], valid[i, ..., c], method)
            mask = valid[i, ..., c]
            np.testing.assert_allclose(out[i, ..., c][mask], reference[mask], rtol=0, atol=1e-5)
    assert np.all(out[~valid] == 0.0)
    # The documented range holds exactly, float32 rounding included.
    assert out.min() >= 0.0 and out.max() <= 1.0


@pytest.mark.parametrize("method", ["log", "asinh"])
@pytest.mark.parametrize("a", [None, 0.02, 0.7, 3.0, 10.0, 1e4])
def test_stretches_never_leave_the_unit_interval(method, a):
    # A ramp from the lower to the upper limit: t runs over [0, 1] exactly.
    ramp = np.linspace(0.0, 1.0, 64 * 64, dtype=np.float32).reshape(1, 64, 64, 1)
    cfg = _config(method, normalisation={"percentile": 100.0, "a": a})
    out = normalise_batch(ramp, np.ones(ramp.shape, bool), cfg)
    assert out.min() == 0.0 and 1.0 - 1e-5 <= out.max() <= 1.0


@pytest.mark.parametrize("method,a", [("log", 50.0), ("asinh", 0.1), ("linear", None)])
@pytest.mark.parametrize("percentile", [90.0, 100.0])
def test_percentile_and_a_are_honoured(method, a, percentile):
    images, valid = _images_with_holes(seed=1)
    cfg = _config(method, normalisation={"percentile": percentile, "a": a})
    out = normalise_batch(images, valid, cfg)
    for i in range(images.shape[0]):
        for c in range(images.shape[3]):
            reference = _astropy_reference(
                images[i, ..., c], valid[i, ..., c], method, percentile=percentile, a=a
            )
            mask = valid[i, ..., c]
            np.testing.assert_allclose(out[i, ..., c][mask], reference[mask], atol=1e-5)


def test_zscale_parameters_are_honoured():
    images, valid = _images_with_holes(seed=2, size=64)
    cfg = _config("zscale", normalisation={"n_samples": 300, "contrast": 0.6})
    out = normalise_batch(images, valid, cfg)
    for i in range(images.shape[0]):
        reference = _astropy_reference(
            images[i, ..., 0], valid[i, ..., 0], "zscale", n_samples=300, contrast=0.6
        )
        mask = valid[i, ..., 0]
        np.testing.assert_allclose(out[i, ..., 0][mask], reference[mask], atol=1e-5)


def test_percentile_limits_equal_numpy_percentile_bit_for_bit():
    rng = np.random.default_rng(3)
    for trial in range(60):
        n_rows, length = int(rng.integers(1, 5)), int(rng.integers(1, 5000))
        rows = rng.normal(size=(n_rows, length)).astype(np.float32)
        if trial % 3 == 1:
            rows = np.round(rows * 2).astype(np.float32)  # many ties
        if trial % 3 == 2:
            rows = np.sort(rows, axis=1)[:, ::-1].copy()  # ordered: unlucky strided samples
        invalid = rng.random(rows.shape) < rng.choice([0.0, 0.3, 0.95, 1.0])
        rows[invalid] = np.inf
        counts = (~invalid).sum(axis=1)
        percentile = float(rng.choice([99.8, 100.0, 50.0, 99.99, 0.0, 80.0]))
        lower = (100 - percentile) / 2
        vmin, vmax = percentile_limits(rows.copy(), counts, lower, 100 - lower)
        for r in range(n_rows):
            values = rows[r][~invalid[r]]
            if values.size == 0:
                assert np.isnan(vmin[r]) and np.isnan(vmax[r])
            else:
                expected = np.percentile(values, (lower, 100 - lower))
                assert (vmin[r], vmax[r]) == tuple(expected), (trial, r)


@pytest.mark.parametrize("largest", [False, True])
def test_sorted_extremes_finds_the_extremes_wherever_they_sit(largest):
    """The group selection is exact for extremes packed into one group, ties and +inf."""
    rng = np.random.default_rng(11)
    length, width = 65536, 67
    block = round(np.sqrt(length / width))
    n_blocks = length // block
    rows = rng.normal(size=(6, length)).astype(np.float32)
    sign = 1 if largest else -1
    # Row 0: every extreme in one group (values i * n_blocks + 5): one group holds all of them.
    rows[0, 5 : block * n_blocks : n_blocks] = sign * (10 + np.arange(block, dtype=np.float32))
    # Row 1: the extremes in the values left over after the last whole group.
    rows[1, block * n_blocks :] = sign * 50
    # Row 2: many groups tie at the threshold value.
    rows[2, : 3 * n_blocks] = sign * 7
    # Row 3: constant; row 4: invalid (+inf) spread in, some groups entirely invalid.
    rows[3] = 1.5
    rows[4, ::3] = np.inf
    rows[4, : 20 * n_blocks] = np.inf
    # Row 5: fewer valid values than needed.
    rows[5, 40:] = np.inf
    needed = np.full(6, width)
    keys = _sorted_extremes(rows.copy(), needed, largest=largest)
    for r, row in enumerate(rows):
        values = row[row != np.inf]
        expected = np.sort(-values if largest else values)[:width]
        expected = np.concatenate([expected, np.full(width - expected.size, np.inf)])
        np.testing.assert_array_equal(keys[r], expected.astype(np.float32), err_msg=str(r))


@pytest.mark.parametrize("n_samples", [100, 1000, 777])
def test_zscale_limits_equal_astropy_exactly(n_samples):
    rng = np.random.default_rng(9)
    rows = rng.normal(50.0, 4.0, size=(6, 2500)).astype(np.float32)
    rows[:, ::97] += 300.0  # outliers the rejection has to remove
    invalid = np.zeros(rows.shape, dtype=bool)
    invalid[1, :1000] = True  # partial rows, with fewer valid values than samples for some
    invalid[2] = rng.random(2500) < 0.97
    invalid[3] = True
    rows[4] = np.round(rows[4] / 3)  # quantised data: many ties in the sorted samples
    invalid[5, 3:] = True  # fewer samples than ZScale needs for a fit: min and max
    rows[invalid] = np.inf
    counts = (~invalid).sum(axis=1)
    vmin, vmax = zscale_limits(rows, counts, n_samples, 0.3)
    interval = ZScaleInterval(n_samples=n_samples, contrast=0.3)
    for r in range(rows.shape[0]):
        if counts[r] == 0:
            assert np.isnan(vmin[r]) and np.isnan(vmax[r])
            continue
        expected = interval.get_limits(np.where(invalid[r], np.nan, rows[r]))
        # Closed-form least squares vs np.polyfit: equal up to float64 rounding.
        assert (vmin[r], vmax[r]) == pytest.approx(expected, rel=1e-9)


def test_crop_limits_come_from_the_central_region_only():
    images, valid = _images_with_holes(n_images=2, size=40, seed=4)
    images[:, :, :6, :] = 5000.0  # a bright border that must not set vmax
    cfg = _config(
        "asinh",
        target_resolution=40,
        normalisation={"crop_enable": True, "crop_width": 20, "crop_height": 16},
    )
    out = normalise_batch(images, valid, cfg)
    crop = (slice(12, 28), slice(10, 30))  # ((40 - 16) // 2, (40 - 20) // 2) origin
    for i in range(2):
        for c in range(3):
            reference = _astropy_reference(images[i, ..., c], valid[i, ..., c], "asinh", crop=crop)
            mask = valid[i, ..., c]
            np.testing.assert_allclose(out[i, ..., c][mask], reference[mask], atol=1e-5)
    vmin, vmax = interval_limits(images, valid, cfg)
    assert np.all(vmax < 5000.0)
    uncropped = normalise_batch(images, valid, _config("asinh", target_resolution=40))
    assert not np.allclose(out, uncropped)


@pytest.mark.parametrize("method", ["linear", "log", "asinh", "zscale", "none"])
@pytest.mark.parametrize("data_type", ["float32", "uint8"])
def test_constant_image_normalises_to_zero(method, data_type):
    images = np.full((2, 16, 16, 2), 42.5, dtype=np.float32)
    valid = np.ones(images.shape, dtype=bool)
    out = normalise_batch(images, valid, _config(method, data_type=data_type))
    if method == "none" and data_type == "float32":
        np.testing.assert_array_equal(out, images)  # 'none' leaves float values unchanged
    else:
        assert np.all(out == 0)


@pytest.mark.parametrize("method", ["linear", "asinh"])
def test_uint8_is_rounded_255_t(method):
    images, valid = _images_with_holes(seed=5)
    as_float = normalise_batch(images, valid, _config(method))
    as_uint8 = normalise_batch(images, valid, _config(method, data_type="uint8"))
    assert as_uint8.dtype == np.uint8
    expected = np.rint(as_float.astype(np.float64) * 255)
    # float32 rounding may tip an exact .5 either way; nothing else may differ.
    difference = np.abs(as_uint8.astype(np.int32) - expected)
    assert difference.max() <= 1 and (difference > 0).mean() < 1e-3
    assert as_uint8[valid].max() == 255 and as_uint8[valid].min() == 0


def test_none_method():
    images, valid = _images_with_holes(seed=6)
    out = normalise_batch(images, valid, _config("none", fill_value=-1.0))
    np.testing.assert_array_equal(out[valid], images[valid])
    assert np.all(out[~valid] == -1.0)
    # uint8 with 'none' is a linear min-max stretch of the valid pixels.
    out8 = normalise_batch(images, valid, _config("none", data_type="uint8"))
    for i in range(images.shape[0]):
        channel, mask = images[i, ..., 1], valid[i, ..., 1]
        low, high = channel[mask].min(), channel[mask].max()
        expected = np.rint(255 * (channel[mask] - low) / (high - low))
        assert np.abs(out8[i, ..., 1][mask].astype(int) - expected).max() <= 1


@pytest.mark.parametrize(
    "data_type,fill,expected", [("float32", -3.5, -3.5), ("uint8", 300.0, 255), ("uint8", -2, 0)]
)
def test_invalid_pixels_get_fill_value(data_type, fill, expected):
    images, valid = _images_with_holes(seed=7)
    images[0, 0, 0, 0] = np.inf  # flagged valid but not finite: invalid
    out = normalise_batch(images, valid, _config("asinh", data_type=data_type, fill_value=fill))
    invalid = ~valid
    invalid[0, 0, 0, 0] = True
    assert np.all(out[invalid] == expected)
    assert np.all(np.isfinite(out))


def test_fully_invalid_channel_is_all_fill_and_others_unaffected():
    images, valid = _images_with_holes(seed=8)
    valid[2, ..., 1] = False
    out = normalise_batch(images, valid, _config("linear", fill_value=0.25))
    assert np.all(out[2, ..., 1] == 0.25)
    reference = _astropy_reference(images[2, ..., 0], valid[2, ..., 0], "linear")
    mask = valid[2, ..., 0]
    np.testing.assert_allclose(out[2, ..., 0][mask], reference[mask], atol=1e-5)


def test_bad_arguments():
    images, valid = _images_with_holes(n_images=2)
    with pytest.raises(ConfigValidationError, match="normalisation_method.*'asinh'"):
        normalise_batch(images, valid, {"normalisation_method": "sqrt", "normalisation": {}})
    with pytest.raises(ConfigValidationError, match="data_type.*'uint8'"):
        normalise_batch(images, valid, {"normalisation_method": "linear", "data_type": "int16"})
    with pytest.raises(ValueError, match=r"\(N, H, W, C\)"):
        normalise_batch(images[0], valid[0], _config("linear"))
    with pytest.raises(ValueError, match="valid has shape"):
        normalise_batch(images, valid[..., :1], _config("linear"))


@pytest.mark.parametrize("method", ["asinh", "zscale", "none"])
@pytest.mark.parametrize("data_type", ["float32", "uint8"])
def test_planes_give_the_values_of_the_batch(method, data_type):
    from cutana.normalisation import normalise_planes

    images, valid = _images_with_holes()
    cfg = _config(method, data_type=data_type, fill_value=3.0)
    expected = normalise_batch(images, valid, cfg)
    planes = np.ascontiguousarray(images.transpose(0, 3, 1, 2))
    planes_valid = np.ascontiguousarray(valid.transpose(0, 3, 1, 2))
    out = normalise_planes(planes, planes_valid, cfg)
    np.testing.assert_array_equal(out.transpose(0, 2, 3, 1), expected)
    # All valid and finite (the fast clip): astropy's values, and None stands for the mask.
    clean = np.nan_to_num(planes, nan=100.0)
    fast = normalise_planes(clean, None, cfg)
    np.testing.assert_array_equal(fast, normalise_planes(clean, np.ones_like(planes_valid), cfg))
    if method != "none" and data_type == "float32":
        for i in range(clean.shape[0]):
            for c in range(clean.shape[1]):
                reference = _astropy_reference(clean[i, c], np.ones_like(valid[i, ..., c]), method)
                np.testing.assert_allclose(fast[i, c], reference, rtol=0, atol=1e-5)
