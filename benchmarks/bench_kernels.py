"""Throughput of cutana's pixel kernels (resample, normalise) against straightforward baselines.

Prints a Markdown table of images per second (one image = one stamp for resampling, one
(H, W, C) cutout for normalisation), measured on synthetic data in this process (single thread
for OpenCV so the numbers compare like with like):

* ``resample_stack`` (OpenCV, batched as channels, mask-aware) vs ``scipy.ndimage.zoom`` per stamp
  (order 1, half-pixel grid), for shrinking and enlarging to 64 and 256 pixels;
* ``normalise_batch`` (vectorised) vs a per-image, per-channel astropy.visualization loop.

Usage::

    python benchmarks/bench_kernels.py [--stamps 256] [--images 200] [--repeat 2]
"""

from __future__ import annotations

import argparse
import time

import cv2
import numpy as np
from astropy.visualization import AsinhStretch, PercentileInterval, ZScaleInterval
from scipy import ndimage

from cutana.config import validate_config
from cutana.normalisation import normalise_batch
from cutana.resample import resample_stack


def best_time(repeat: int, function, *args) -> float:
    """Fastest of ``repeat`` runs of ``function(*args)`` in seconds (least disturbed by load)."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        function(*args)
        times.append(time.perf_counter() - start)
    return min(times)


def synthetic_stamps(count: int, size: int, holes: bool, seed: int = 0):
    rng = np.random.default_rng(seed)
    stamps = rng.normal(100.0, 5.0, size=(count, size, size)).astype(np.float32)
    valid = np.ones(stamps.shape, dtype=bool)
    if holes:  # every stamp crosses an image edge: a quarter of it is invalid
        valid[:, : size // 4] = False
        stamps[~valid] = np.nan
    return stamps, valid


def scipy_resample(stamps: np.ndarray, target: int) -> np.ndarray:
    zoom = target / stamps.shape[1]
    return np.stack(
        [ndimage.zoom(s, zoom, order=1, grid_mode=True, mode="nearest") for s in stamps]
    )


def resample_rows(n_stamps: int, repeat: int) -> list[tuple[str, str, float, float]]:
    rows = []
    cases = [(128, 64), (32, 64), (512, 256), (128, 256)]
    for size, target in cases:
        # Fewer stamps for the big cases keeps the benchmark within a minute.
        count = max(8, n_stamps * 64 * 64 // max(size, target) ** 2)
        kind = "shrink (area)" if target < size else "enlarge (bilinear)"
        for holes in (False, True):
            stamps, valid = synthetic_stamps(count, size, holes)
            ours = best_time(repeat, resample_stack, stamps, valid, target, "bilinear")
            baseline = best_time(repeat, scipy_resample, np.nan_to_num(stamps), target)
            label = f"resample {size}->{target} {kind}" + (", 25% invalid" if holes else "")
            rows.append((label, "scipy.ndimage.zoom loop", count / ours, count / baseline))
    return rows


def astropy_loop(images: np.ndarray, valid: np.ndarray, method: str) -> np.ndarray:
    out = np.empty_like(images)
    interval = ZScaleInterval() if method == "zscale" else PercentileInterval(99.8)
    stretch = AsinhStretch(0.7)
    for i in range(images.shape[0]):
        for c in range(images.shape[3]):
            channel = np.where(valid[i, ..., c], images[i, ..., c], np.nan)
            t = interval(channel, clip=True)
            out[i, ..., c] = t if method == "zscale" else stretch(t, clip=True)
    return out


def normalise_rows(n_images: int, repeat: int) -> list[tuple[str, str, float, float]]:
    rng = np.random.default_rng(1)
    images = rng.normal(100.0, 5.0, size=(n_images, 256, 256, 3)).astype(np.float32)
    valid = np.ones(images.shape, dtype=bool)
    valid[::5, :40] = False  # a fifth of the cutouts cross an image edge
    rows = []
    for method, dtype in (("asinh", "float32"), ("asinh", "uint8"), ("zscale", "float32")):
        cfg = validate_config({"normalisation_method": method, "data_type": dtype})
        count = n_images if method != "zscale" else max(10, n_images // 4)
        ours = best_time(repeat, normalise_batch, images[:count], valid[:count], cfg)
        baseline = best_time(1, astropy_loop, images[:count], valid[:count], method)
        label = f"normalise {method} 256x256x3 -> {dtype}"
        rows.append((label, "astropy per-image loop", count / ours, count / baseline))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stamps", type=int, default=256, help="stamps per 64 px case")
    parser.add_argument("--images", type=int, default=200, help="cutouts to normalise")
    parser.add_argument("--repeat", type=int, default=2, help="runs per measurement (best)")
    args = parser.parse_args()
    cv2.setNumThreads(1)  # one core for both sides: the pipeline parallelises across jobs

    rows = resample_rows(args.stamps, args.repeat) + normalise_rows(args.images, args.repeat)
    print("| stage | baseline | cutana images/s | baseline images/s | speed-up |")
    print("|---|---|---:|---:|---:|")
    for label, baseline_name, ours, baseline in rows:
        speed_up = ours / baseline
        print(f"| {label} | {baseline_name} | {ours:,.0f} | {baseline:,.0f} | {speed_up:.1f}x |")


if __name__ == "__main__":
    main()
