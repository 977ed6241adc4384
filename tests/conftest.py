"""Shared fixtures: small synthetic FITS images written with astropy into ``tmp_path``.

* ``make_wcs(...)``: a celestial TAN WCS (optionally rotated, mirrored, with SIP distortion);
* ``write_fits(...)``: write an image (primary or named extension, optionally tile-compressed,
  optionally integer with BSCALE/BZERO) and return its path;
* ``fits_image``: one ready 120 x 160 float32 image with a TAN WCS and ``MAGZERO``;
* ``run_in_fresh_process(lines, result)`` and ``cutout_job_modules(batch, out_dir, cfg)``: code,
  or a cutout job's ``run_batch``, in a new process (what a job imports, measured there).
"""

from __future__ import annotations

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS, Sip


def build_wcs(
    shape=(120, 160),
    ra=150.0,
    dec=2.0,
    scale_arcsec=0.3,
    rotation_deg=0.0,
    mirrored=False,
    sip=False,
    crpix=None,
    projection="TAN",
) -> WCS:
    """A celestial WCS centred on ``(ra, dec)`` (see module docstring)."""
    ny, nx = shape
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = [f"RA---{projection}", f"DEC--{projection}"]
    if sip:
        wcs.wcs.ctype = [f"RA---{projection}-SIP", f"DEC--{projection}-SIP"]
    wcs.wcs.crval = [ra, dec]
    wcs.wcs.crpix = list(crpix) if crpix is not None else [(nx + 1) / 2.0, (ny + 1) / 2.0]
    scale = scale_arcsec / 3600.0
    theta = np.deg2rad(rotation_deg)
    # East to the left (CD1_1 < 0) is the sky-as-seen convention; mirrored flips it.
    sign = 1.0 if mirrored else -1.0
    rotation = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    wcs.wcs.cd = rotation @ np.diag([sign * scale, scale])
    if sip:
        a = np.zeros((4, 4))
        b = np.zeros((4, 4))
        a[2, 0], a[1, 1], a[0, 2], a[3, 0] = 2e-5, -1e-5, 3e-6, 1e-8
        b[2, 0], b[1, 1], b[0, 2], b[0, 3] = -1e-6, 2e-5, 1.5e-5, -2e-8
        wcs.sip = Sip(a, b, None, None, wcs.wcs.crpix)
    wcs.wcs.set()
    return wcs


def write_image(
    path,
    data,
    wcs: WCS | None = None,
    extension: str | None = None,
    compressed: bool = False,
    bscale: float | None = None,
    bzero: float | None = None,
    blank: int | None = None,
    header_cards: dict | None = None,
    lossless: bool = True,
):
    """Write ``data`` (already integer when bscale/bzero are given) to a FITS file.

    ``extension`` None writes the PRIMARY HDU (or, when compressed, extension 1 named
    ``COMPRESSED_IMAGE``); a name writes an empty primary plus an image extension of that name.
    ``bscale``/``bzero``/``blank`` are stored as given: ``data`` holds the raw integers.
    """
    header = wcs.to_header(relax=True) if wcs is not None else fits.Header()
    for key, value in (header_cards or {}).items():
        header[key] = value
    if compressed:
        kwargs = {"tile_shape": (32, 32)}
        if lossless and np.issubdtype(np.asarray(data).dtype, np.floating):
            # Disable quantisation so floats round-trip exactly (GZIP is lossless).
            kwargs.update(compression_type="GZIP_1", quantize_level=0.0)
        image = fits.CompImageHDU(data=data, header=header, name=extension, **kwargs)
        hdus = [fits.PrimaryHDU(), image]
    elif extension is None:
        image = fits.PrimaryHDU(data=data, header=header)
        hdus = [image]
    else:
        image = fits.ImageHDU(data=data, header=header, name=extension)
        hdus = [fits.PrimaryHDU(), image]
    for key, value in (("BSCALE", bscale), ("BZERO", bzero), ("BLANK", blank)):
        if value is not None:
            image.header[key] = value
    fits.HDUList(hdus).writeto(path, overwrite=True, output_verify="silentfix")
    return path


@pytest.fixture
def make_wcs():
    """Factory of celestial WCSs: ``make_wcs(shape, ra, dec, scale_arcsec, rotation_deg,
    mirrored, sip, crpix)``."""
    return build_wcs


@pytest.fixture
def write_fits():
    """Factory writing FITS images: ``write_fits(path, data, wcs, extension, compressed, ...)``."""
    return write_image


@pytest.fixture
def fits_image(tmp_path):
    """A 120 x 160 float32 image (smooth gradient + noise) with a TAN WCS and MAGZERO=25."""
    rng = np.random.default_rng(1)
    ny, nx = 120, 160
    yy, xx = np.mgrid[0:ny, 0:nx]
    data = (xx + 1000.0 * yy + rng.normal(0, 0.1, (ny, nx))).astype(np.float32)
    wcs = build_wcs((ny, nx))
    path = write_image(
        tmp_path / "image.fits", data, wcs, header_cards={"MAGZERO": 25.0, "BUNIT": "adu"}
    )
    return path, data, wcs


def run_in_fresh_process(lines: list[str], result: str = "None") -> tuple[set[str], object]:
    """Run ``lines`` in a new Python process (as a workflow job runs).

    Returns the top-level modules the process had loaded at the end and the JSON value of the
    expression ``result`` evaluated there.
    """
    import json
    import subprocess
    import sys

    code = "\n".join(
        ["import json, sys", *lines, f"print(json.dumps([sorted(sys.modules), {result}]))"]
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    modules, value = json.loads(done.stdout)
    return {name.split(".")[0] for name in modules}, value


def cutout_job_modules(batch_path, out_dir, cfg) -> set[str]:
    """Top-level modules a fresh process loads running ``run_batch`` as the cutout job does
    (the config already validated); its outputs go to ``out_dir`` (``b``, ``s.parquet``)."""
    import json
    from pathlib import Path

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "cfg.json").write_text(json.dumps(cfg))
    modules, _ = run_in_fresh_process(
        [
            "from cutana.engine import run_batch",
            f"cfg = json.load(open({str(out_dir / 'cfg.json')!r}))",
            f"run_batch({str(batch_path)!r}, {str(out_dir / 'b')!r}, "
            f"{str(out_dir / 's.parquet')!r}, cfg, config_validated=True)",
        ]
    )
    return modules
