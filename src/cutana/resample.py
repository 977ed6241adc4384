"""Mask-aware resampling of cutout stacks to the target resolution (SPEC §6).

Every stamp of a stack is resampled from ``S x S`` to ``T x T`` pixels with OpenCV:

* shrinking (``T < S``): area averaging (``cv2.INTER_AREA``), whatever ``interpolation`` says;
* enlarging (``T > S``): the configured interpolation (nearest, bilinear, cubic/bicubic,
  lanczos);
* ``T == S``: identity (a copy; invalid pixels set to 0).

OpenCV maps pixel *centres* (half-pixel-centre convention): output pixel ``j`` samples the input
at ``x = (j + 0.5) * S / T - 0.5``, and its borders replicate the edge pixels.  For nearest
neighbour, legacy ``cv2.INTER_NEAREST`` uses ``floor(j * S / T)`` (not centre-true) and
``cv2.INTER_NEAREST_EXACT`` rounds exact ties (source x halfway between two centres) either way
through fixed-point arithmetic, so nearest neighbour is done by exact integer indexing:
input ``floor((2 j + 1) S / (2 T))``, i.e. the nearest centre with ties going to the right.

Invalid pixels (outside the image, NaN, inf) must never darken or brighten their valid
neighbours, so resampling is a *normalised convolution*: the data with invalid pixels zeroed and
the validity mask (as 0/1 weights) go through the same linear kernel and the first is divided by
the second.  An output pixel is valid when the valid inputs carry at least half of its kernel
weight (``weight >= 0.5``, :data:`MIN_VALID_WEIGHT`); for nearest neighbour the weight is 0 or 1,
so the output is valid exactly when its nearest input is.  Invalid outputs are 0 (never NaN)
with ``valid = False``.  Stamps without any invalid pixel skip the division (their weight is 1
everywhere), so they equal plain OpenCV resampling.
"""

from __future__ import annotations

import cv2
import numpy as np

from .exceptions import ConfigValidationError

#: OpenCV flag of each ``interpolation`` config value, used when enlarging.
ENLARGE_FLAGS: dict[str, int] = {
    "nearest": cv2.INTER_NEAREST_EXACT,
    "bilinear": cv2.INTER_LINEAR,
    "cubic": cv2.INTER_CUBIC,
    "bicubic": cv2.INTER_CUBIC,
    "lanczos": cv2.INTER_LANCZOS4,
}

#: Fraction of an output pixel's kernel weight that valid inputs must carry for it to be valid.
MIN_VALID_WEIGHT = 0.5


def resize_flag(source_size: int, target_size: int, interpolation: str) -> int | None:
    """Return the OpenCV interpolation flag used to go from ``source_size`` to ``target_size``.

    Parameters
    ----------
    source_size, target_size : int
        Stamp side before and after resampling, in pixels.
    interpolation : str
        The ``interpolation`` config value: nearest, bilinear, cubic, bicubic or lanczos.

    Returns
    -------
    int or None
        ``cv2.INTER_AREA`` when shrinking, the flag of ``interpolation`` when enlarging, ``None``
        when the sizes are equal (identity).

    Raises
    ------
    ConfigValidationError
        If ``interpolation`` is not one of the allowed names.
    """
    key = str(interpolation).lower()
    if key not in ENLARGE_FLAGS:
        raise ConfigValidationError(
            f"config key 'interpolation' = {interpolation!r} is invalid: use one of "
            + ", ".join(repr(name) for name in ENLARGE_FLAGS)
        )
    if target_size == source_size:
        return None
    if target_size < source_size:
        return cv2.INTER_AREA
    return ENLARGE_FLAGS[key]


def nearest_source_index(source_size: int, target_size: int) -> np.ndarray:
    """Input pixel nearest to each output pixel centre (half-pixel-centre mapping).

    Output pixel ``j`` has its centre at input coordinate ``(j + 0.5) S / T - 0.5``; the input
    pixel containing it is ``floor((2 j + 1) S / (2 T))``, computed in exact integer arithmetic.
    """
    j = np.arange(target_size, dtype=np.int64)
    return ((2 * j + 1) * source_size) // (2 * target_size)


def _resize_stack(stack: np.ndarray, target: int, flag: int) -> np.ndarray:
    """Resize every plane of a C-contiguous (K, S, S) float32 stack to (K, T, T).

    One ``cv2.resize`` call per plane, written straight into the output. Measured on this
    project's machine (benchmarks/bench_kernels.py), single-plane calls beat packing the planes
    as the channels of one (S, S, k) image by 2-40x: OpenCV's vectorised kernels cover 1-4
    channels, the generic many-channel path is slow, and the packing costs two transposes.
    """
    out = np.empty((stack.shape[0], target, target), dtype=np.float32)
    for plane, destination in zip(stack, out, strict=True):
        resize_plane(plane, flag, destination)
    return out


def resize_plane(plane: np.ndarray, flag: int | None, out: np.ndarray) -> None:
    """Resample one fully valid float32 plane (S, S) into ``out`` (T, T), in place.

    What :func:`resample_stack` does to a stamp without invalid pixels, for the flags of
    :func:`resize_flag` other than nearest neighbour (whose exact indexing needs the stack):
    ``None`` copies, the others are one ``cv2.resize`` written straight into ``out`` (which
    must be a C-contiguous float32 (T, T) array, e.g. one plane of a larger stack).
    """
    if flag is None:
        out[...] = plane
    else:
        cv2.resize(plane, (out.shape[1], out.shape[0]), dst=out, interpolation=flag)


def resample_stack(
    stamps: np.ndarray, valid: np.ndarray, target: int, interpolation: str = "bilinear"
) -> tuple[np.ndarray, np.ndarray]:
    """Resample a stack of square stamps to ``target x target`` pixels, respecting a mask.

    Parameters
    ----------
    stamps : ndarray, shape (K, S, S)
        Pixel values (converted to float32). Values under ``valid == False`` are ignored and may
        be anything, including NaN.
    valid : ndarray of bool, shape (K, S, S)
        True where the pixel holds real data. Non-finite pixels are treated as invalid too.
    target : int
        Output side ``T`` in pixels (>= 1).
    interpolation : str
        Kernel used when enlarging: ``nearest``, ``bilinear``, ``cubic`` (alias ``bicubic``) or
        ``lanczos``. Shrinking always uses area averaging; ``T == S`` is the identity.

    Returns
    -------
    out : ndarray of float32, shape (K, T, T)
        Resampled values; 0 where ``valid_out`` is False (never NaN).
    valid_out : ndarray of bool, shape (K, T, T)
        True where the valid inputs carry at least half of the output pixel's kernel weight
        (for nearest: where the nearest input pixel is valid).

    Raises
    ------
    ValueError
        If the arrays are not (K, S, S) stacks of the same shape or ``target`` < 1.
    ConfigValidationError
        If ``interpolation`` is unknown.

    Notes
    -----
    Normalised convolution: ``out = R(data * valid) / R(valid)`` with the same linear resampler
    ``R``, so an image that is constant on its valid pixels stays exactly that constant and
    invalid pixels pull no value towards 0. For cubic and Lanczos kernels (negative lobes) the
    valid weight can exceed 1; the 0.5 threshold bounds the amplification of the division to 2.
    """
    stamps = np.asarray(stamps, dtype=np.float32)
    valid = np.asarray(valid, dtype=bool)
    if stamps.ndim != 3 or stamps.shape[1] != stamps.shape[2]:
        raise ValueError(f"stamps must have shape (K, S, S), got {stamps.shape}")
    if valid.shape != stamps.shape:
        raise ValueError(f"valid has shape {valid.shape} but stamps have shape {stamps.shape}")
    target = int(target)
    if target < 1:
        raise ValueError(f"target resolution must be >= 1 pixel, got {target}")
    count, size = stamps.shape[0], stamps.shape[1]
    flag = resize_flag(size, target, interpolation)

    finite = np.isfinite(stamps)
    if not finite.all():
        valid = valid & finite
    del finite
    # Stamps cut by the engine are finite wherever they are valid; fully valid stacks (the
    # common case) need no masked copy at all.
    all_valid = bool(valid.all())
    if all_valid:
        clean = np.ascontiguousarray(stamps)
    else:
        clean = np.ascontiguousarray(np.where(valid, stamps, np.float32(0)))
    if flag is None:
        return (clean.copy() if clean is stamps else clean), valid.copy()
    if flag == ENLARGE_FLAGS["nearest"]:
        index = nearest_source_index(size, target)
        return (
            np.ascontiguousarray(clean[:, index][:, :, index]),
            np.ascontiguousarray(valid[:, index][:, :, index]),
        )
    if count == 0:
        return np.zeros((0, target, target), np.float32), np.zeros((0, target, target), bool)

    out = _resize_stack(clean, target, flag)
    valid_out = np.ones((count, target, target), dtype=bool)
    weight = np.empty((target, target), dtype=np.float32)
    holed = [] if all_valid else np.flatnonzero(~valid.all(axis=(1, 2)))
    for k in holed:
        # Per stamp, in place: fancy-indexed copies of the whole holed subset cost more than
        # the resampling itself.
        cv2.resize(valid[k].astype(np.float32), (target, target), dst=weight, interpolation=flag)
        is_valid = np.greater_equal(weight, MIN_VALID_WEIGHT, out=valid_out[k])
        # Outputs below the threshold are zeroed next, so flooring the weight only avoids /0.
        np.maximum(weight, MIN_VALID_WEIGHT, out=weight)
        out[k] /= weight
        out[k][~is_valid] = 0.0
    return out, valid_out
