"""A synthetic, Euclid-like demo survey: FITS mosaic tiles per band plus a source catalogue.

The survey exercises the awkward cases of real mosaics: a tile straddling RA = 0/360, a tile at
high declination, NaN borders and NaN stripes, sources whose stamps cross a tile edge, and bands
with different zero points. Everything is deterministic from ``seed``: the same arguments give
byte-identical files.

Images are written row block by row block (header first, then the data section appended block
by block), so a survey of 8000 x 8000 pixel tiles needs only a few tens of MB of memory.

Command line::

    python -m cutana.demo --out DIR --tiles 2 --size 2000 --sources 500 --seed 42
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gzip
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from astropy.io import fits
from astropy.wcs import WCS

from .exceptions import ConfigValidationError

#: Band order of the demo survey (= order of ``fits_file_paths`` and of ``channel_weights``).
DEFAULT_BANDS = ("VIS", "NIR_Y", "NIR_J", "NIR_H")

#: Pixel scale of every demo tile (Euclid MER mosaics: 0.1 arcsec per pixel in all bands).
PIXEL_SCALE_ARCSEC = 0.1

#: AB zero point (header MAGZERO) per band; unknown band names get the NIR value.
ZEROPOINTS = {"VIS": 24.5, "NIR_Y": 30.0, "NIR_J": 30.0, "NIR_H": 30.0}
DEFAULT_ZEROPOINT = 30.0

#: PSF FWHM in pixels per band (VIS is sharp, NISP is about three times broader).
PSF_FWHM_PIXEL = {"VIS": 1.7, "NIR_Y": 4.5, "NIR_J": 4.8, "NIR_H": 5.2}

#: Sky noise per pixel, as the AB magnitude of a source whose total flux equals one sigma.
NOISE_SIGMA_MAG = 30.0

#: Mean galaxy colour (VIS minus band, AB mag): demo galaxies are a little brighter in the NIR.
MEAN_COLOUR = {"VIS": 0.0, "NIR_Y": 0.3, "NIR_J": 0.5, "NIR_H": 0.7}

#: Rows of a tile generated and written at once; fixed so that noise (seeded per block) does
#: not depend on anything but the seed.
BLOCK_ROWS = 256

#: Fraction of sources placed so that their stamp crosses a tile edge.
EDGE_FRACTION = 0.02

#: Fixed header dates keep the files byte-identical between runs.
FIXED_DATE = "2024-01-01T00:00:00"

#: Description of a written survey (bands, compression, ...), read back by demo_config.
SURVEY_DESCRIPTION = "demo_survey.json"

#: Per-band default channel mixing of the demo survey into R, G, B.
DEMO_CHANNEL_WEIGHTS = {
    "VIS": [0.0, 0.0, 1.0],
    "NIR_Y": [0.0, 0.5, 0.0],
    "NIR_J": [0.5, 0.5, 0.0],
    "NIR_H": [0.5, 0.0, 0.0],
}


@dataclass(frozen=True)
class TileGeometry:
    """Where a demo tile sits on the sky."""

    index: int
    crval_ra: float
    crval_dec: float
    rotation_deg: float

    @property
    def tile_id(self) -> str:
        return f"{102018000 + self.index:09d}"


def tile_geometry(index: int) -> TileGeometry:
    """Sky position of tile ``index``.

    Tile 0 straddles RA = 0/360 (its sources have RA near 359.99 and near 0.01), tile 1 lies at
    high declination (+75 deg) where RA offsets are stretched by 1/cos(Dec); further tiles are
    spread over the sky so that no two tiles overlap.
    """
    if index == 0:
        return TileGeometry(index, crval_ra=0.002, crval_dec=1.5, rotation_deg=0.0)
    if index == 1:
        return TileGeometry(index, crval_ra=150.1, crval_dec=75.0, rotation_deg=0.0)
    return TileGeometry(
        index,
        crval_ra=(35.0 + 23.0 * index) % 360.0,
        crval_dec=-60.0 + (index * 17.0) % 120.0,
        rotation_deg=0.0,
    )


def tile_wcs_cards(geometry: TileGeometry, tile_size: int) -> list[tuple[str, object, str]]:
    """FITS WCS cards of a square tile: TAN, CD matrix (no CDELT), ICRS, centre reference pixel.

    Written by hand because astropy's ``WCS.to_header`` always emits PC + CDELT, and Euclid MER
    mosaics (like many survey products) carry a CD matrix.
    """
    scale_deg = PIXEL_SCALE_ARCSEC / 3600.0
    theta = math.radians(geometry.rotation_deg)
    centre = (tile_size + 1) / 2.0
    return [
        ("WCSAXES", 2, "number of WCS axes"),
        ("CTYPE1", "RA---TAN", "gnomonic projection"),
        ("CTYPE2", "DEC--TAN", "gnomonic projection"),
        ("CUNIT1", "deg", ""),
        ("CUNIT2", "deg", ""),
        ("CRVAL1", geometry.crval_ra, "[deg] RA at the reference pixel"),
        ("CRVAL2", geometry.crval_dec, "[deg] Dec at the reference pixel"),
        ("CRPIX1", centre, "reference pixel (1-based), tile centre"),
        ("CRPIX2", centre, "reference pixel (1-based), tile centre"),
        # RA increases to the left (east left), as on the sky.
        ("CD1_1", -scale_deg * math.cos(theta), "[deg/pixel]"),
        ("CD1_2", scale_deg * math.sin(theta), "[deg/pixel]"),
        ("CD2_1", scale_deg * math.sin(theta), "[deg/pixel]"),
        ("CD2_2", scale_deg * math.cos(theta), "[deg/pixel]"),
        ("RADESYS", "ICRS", "reference frame"),
        ("EQUINOX", 2000.0, ""),
    ]


def tile_wcs(geometry: TileGeometry, tile_size: int) -> WCS:
    """The celestial WCS of a demo tile (as written to its FITS headers)."""
    header = fits.Header()
    for key, value, comment in tile_wcs_cards(geometry, tile_size):
        header[key] = (value, comment)
    return WCS(header)


def band_file_name(tile_index: int, band: str) -> str:
    return f"tile{tile_index}_{band}.fits"


def _sersic_b(n: np.ndarray) -> np.ndarray:
    """Ciotti & Bertin (1999) approximation of the Sersic b_n (half-light normalisation)."""
    return 2.0 * n - 1.0 / 3.0 + 4.0 / (405.0 * n) + 46.0 / (25515.0 * n**2)


def _sersic_total_over_ie(n: float, b: float, r_e: float, axis_ratio: float) -> float:
    """Total flux of an elliptical Sersic profile divided by its intensity at r_e."""
    return (
        2.0 * math.pi * n * axis_ratio * r_e**2 * math.exp(b) * b ** (-2.0 * n) * math.gamma(2 * n)
    )


def _draw_sources(
    rng: np.random.Generator,
    n_sources: int,
    n_tiles: int,
    tile_size: int,
    min_diameter: int,
    max_diameter: int,
    border: int,
) -> pd.DataFrame:
    """Random source parameters in pixel space of their tile (deterministic from ``rng``)."""
    tile = rng.integers(0, n_tiles, size=n_sources)
    # Log-uniform sizes: many small galaxies, few large ones, as in a real catalogue.
    log_d = rng.uniform(math.log(min_diameter), math.log(max_diameter + 1), size=n_sources)
    diameter = np.clip(np.floor(np.exp(log_d)), min_diameter, max_diameter).astype(np.int64)

    half = diameter / 2.0
    # Interior sources keep their whole stamp (and the NaN border) inside the tile when the
    # tile is large enough; in tiny test tiles they just spread over the whole tile.
    margin = np.minimum(half + border, tile_size / 2.0 - 1.0)
    x = margin + rng.uniform(0.0, 1.0, n_sources) * (tile_size - 1 - 2 * margin)
    y = margin + rng.uniform(0.0, 1.0, n_sources) * (tile_size - 1 - 2 * margin)

    n_edge = int(round(EDGE_FRACTION * n_sources))
    if n_edge:
        edge_rows = rng.choice(n_sources, size=n_edge, replace=False)
        side = rng.integers(0, 4, size=n_edge)
        # The centre stays inside the tile, the stamp pokes out by 10-90 % of its half size.
        inset = rng.uniform(0.1, 0.9, size=n_edge) * np.minimum(half[edge_rows], tile_size / 2.0)
        far = tile_size - 1 - inset
        x[edge_rows] = np.where(side == 0, inset, np.where(side == 1, far, x[edge_rows]))
        y[edge_rows] = np.where(side == 2, inset, np.where(side == 3, far, y[edge_rows]))

    sersic_n = rng.uniform(0.5, 4.0, size=n_sources)
    return pd.DataFrame(
        {
            "tile": tile,
            "x": x,
            "y": y,
            "diameter_pixel": diameter,
            # The stamp shows the galaxy out to about four to five effective radii.
            "r_e": diameter * rng.uniform(0.06, 0.1, size=n_sources),
            "sersic_n": sersic_n,
            "axis_ratio": rng.uniform(0.3, 1.0, size=n_sources),
            "position_angle": rng.uniform(0.0, math.pi, size=n_sources),
            # Bigger galaxies are brighter, with scatter.
            "mag_vis": 25.0
            - 2.5 * np.log10(diameter / min_diameter)
            + rng.normal(0, 0.5, n_sources),
            "colour_scatter": rng.normal(0.0, 0.2, size=n_sources),
        }
    )


def _nan_border_width(tile_size: int) -> int:
    return max(2, tile_size // 100)


def _invalid_mask(rows: np.ndarray, tile_size: int, band_index: int) -> np.ndarray:
    """NaN pixels of a block of rows: an uneven coverage border plus one or two stripes.

    Returns a boolean array (len(rows), tile_size), True where the pixel is not covered.
    """
    border = _nan_border_width(tile_size)
    cols = np.arange(tile_size)
    yy = rows[:, None]
    # A slanted left coverage edge and straight edges elsewhere, like a dithered mosaic.
    left = border + (border * yy) // max(tile_size, 1)
    mask = (cols[None, :] < left) | (cols[None, :] >= tile_size - border)
    mask |= (yy < border) | (yy >= tile_size - border)
    # Two NaN stripes, so that a realistic minority of stamps holds masked pixels: a horizontal
    # detector gap in the second band and a diagonal masked satellite trail in the first.
    stripe_width = max(1, tile_size // 400)
    if band_index == 1:
        stripe_y = int(tile_size * 0.43)
        mask |= (yy >= stripe_y) & (yy < stripe_y + stripe_width)
    if band_index == 0:
        diagonal = np.abs(cols[None, :] - (yy * 0.5 + tile_size * 0.4)) < stripe_width / 2 + 0.5
        mask |= diagonal
    return mask


def _add_galaxies(
    block: np.ndarray,
    y0: int,
    sources: pd.DataFrame,
    band: str,
    zeropoint: float,
) -> None:
    """Add every galaxy whose window intersects rows [y0, y0 + len(block)) into ``block``."""
    if sources.empty:
        return
    y1 = y0 + block.shape[0]
    width = block.shape[1]
    psf = PSF_FWHM_PIXEL.get(band, 4.0)
    r_e_all = np.sqrt(sources["r_e"].to_numpy() ** 2 + (0.5 * psf) ** 2)
    radius = np.ceil(np.minimum(sources["diameter_pixel"].to_numpy() / 2.0, 5.0 * r_e_all))
    xs = sources["x"].to_numpy()
    ys = sources["y"].to_numpy()
    hits = np.flatnonzero((ys + radius >= y0) & (ys - radius < y1))
    colour = MEAN_COLOUR.get(band, 0.5)
    # Plain arrays: per-row pandas access would dominate the run time with many sources.
    sersic_n = sources["sersic_n"].to_numpy()
    axis_ratio = sources["axis_ratio"].to_numpy()
    position_angle = sources["position_angle"].to_numpy()
    mag_vis = sources["mag_vis"].to_numpy()
    colour_scatter = sources["colour_scatter"].to_numpy()
    for i in hits:
        r = radius[i]
        gx0, gx1 = max(0, int(xs[i] - r)), min(width, int(xs[i] + r) + 1)
        gy0, gy1 = max(y0, int(ys[i] - r)), min(y1, int(ys[i] + r) + 1)
        if gx0 >= gx1 or gy0 >= gy1:
            continue
        r_e = r_e_all[i]
        n = float(sersic_n[i])
        b = float(_sersic_b(np.float64(n)))
        q = float(axis_ratio[i])
        mag = mag_vis[i] - colour - colour_scatter[i] * (band != "VIS")
        total = 10.0 ** (-0.4 * (mag - zeropoint))
        intensity_e = total / _sersic_total_over_ie(n, b, r_e, q)
        dx = np.arange(gx0, gx1, dtype=np.float32)[None, :] - np.float32(xs[i])
        dy = np.arange(gy0, gy1, dtype=np.float32)[:, None] - np.float32(ys[i])
        cos_pa, sin_pa = math.cos(position_angle[i]), math.sin(position_angle[i])
        major = dx * cos_pa + dy * sin_pa
        minor = (-dx * sin_pa + dy * cos_pa) / q
        radius_ell = np.sqrt(major * major + minor * minor) / np.float32(r_e)
        profile = np.exp(-b * (np.power(radius_ell, 1.0 / n) - 1.0))
        # Taper to zero at the window edge so that no hard truncation circle shows up after a
        # strong stretch.
        circular = np.sqrt(dx * dx + dy * dy)
        taper = np.clip((r - circular) / (0.3 * r), 0.0, 1.0)
        block[gy0 - y0 : gy1 - y0, gx0:gx1] += (intensity_e * profile * taper).astype(np.float32)


def _tile_header(tile_size: int, band: str, geometry: TileGeometry) -> fits.Header:
    header = fits.Header()
    header["SIMPLE"] = True
    header["BITPIX"] = -32
    header["NAXIS"] = 2
    header["NAXIS1"] = tile_size
    header["NAXIS2"] = tile_size
    header["EXTEND"] = True
    for key, value, comment in tile_wcs_cards(geometry, tile_size):
        header[key] = (value, comment)
    header["BUNIT"] = ("adu", "pixel unit (flux via MAGZERO)")
    header["MAGZERO"] = (ZEROPOINTS.get(band, DEFAULT_ZEROPOINT), "AB zero point of the band")
    header["FILTER"] = (band, "band")
    header["TELESCOP"] = "CUTANA-DEMO"
    header["INSTRUME"] = "VIS" if band == "VIS" else "NISP"
    header["OBJECT"] = f"TILE{geometry.tile_id}"
    header["DATE"] = (FIXED_DATE, "fixed for reproducible demo files")
    return header


def _noise_sigma(zeropoint: float) -> np.float32:
    return np.float32(10.0 ** (-0.4 * (NOISE_SIGMA_MAG - zeropoint)))


def _generate_block(
    seed: int,
    tile_index: int,
    band_index: int,
    band: str,
    y0: int,
    y1: int,
    tile_size: int,
    sources: pd.DataFrame,
) -> np.ndarray:
    """Pixels of rows [y0, y1) of one band of one tile (float32)."""
    zeropoint = ZEROPOINTS.get(band, DEFAULT_ZEROPOINT)
    # One independent stream per (tile, band, block): deterministic and order independent.
    rng = np.random.default_rng([seed, tile_index, band_index, y0 // BLOCK_ROWS])
    block = rng.standard_normal((y1 - y0, tile_size), dtype=np.float32)
    block *= _noise_sigma(zeropoint)
    _add_galaxies(block, y0, sources, band, zeropoint)
    block[_invalid_mask(np.arange(y0, y1), tile_size, band_index)] = np.nan
    return block


def _write_streamed_fits(path: Path, header: fits.Header, blocks) -> None:
    """Write a PRIMARY-HDU FITS file from a header and an iterator of float32 row blocks.

    The header is written first and the big-endian data appended block by block, then padded to
    a multiple of 2880 bytes as the FITS standard requires; the file is complete only after the
    final rename.
    """
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    written = 0
    with open(tmp, "wb") as handle:
        handle.write(header.tostring().encode("ascii"))
        for block in blocks:
            data = block.astype(">f4", copy=False).tobytes()
            handle.write(data)
            written += len(data)
        # Float data are padded with zero bytes to the 2880-byte FITS block size.
        handle.write(b"\0" * ((-written) % 2880))
    os.replace(tmp, path)


def _write_tile_band(
    path: Path,
    seed: int,
    geometry: TileGeometry,
    band_index: int,
    band: str,
    tile_size: int,
    sources: pd.DataFrame,
    compressed: bool,
) -> None:
    header = _tile_header(tile_size, band, geometry)

    def blocks():
        for y0 in range(0, tile_size, BLOCK_ROWS):
            y1 = min(tile_size, y0 + BLOCK_ROWS)
            yield _generate_block(
                seed, geometry.index, band_index, band, y0, y1, tile_size, sources
            )

    if not compressed:
        _write_streamed_fits(path, header, blocks())
        return

    # Tile-compressed files are for tests (small sizes): the whole image is built in memory.
    data = np.vstack(list(blocks()))
    image_header = header.copy()
    for key in ("SIMPLE", "BITPIX", "NAXIS", "NAXIS1", "NAXIS2", "EXTEND"):
        image_header.remove(key, ignore_missing=True)
    primary = fits.PrimaryHDU()
    primary.header["DATE"] = FIXED_DATE
    comp = fits.CompImageHDU(
        data=data,
        header=image_header,
        name="SCI",
        compression_type="RICE_1",
        quantize_level=16.0,
        # A fixed dither seed: the default seeds from the clock and breaks reproducibility.
        dither_seed=1 + geometry.index * 16 + band_index,
    )
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    with _reproducible_gzip():
        fits.HDUList([primary, comp]).writeto(tmp, overwrite=True)
    os.replace(tmp, path)


@contextlib.contextmanager
def _reproducible_gzip():
    """Make astropy's gzip fallback codec write a zero timestamp.

    Tiles that cannot be quantised (all NaN, e.g. the NaN borders) are stored GZIP-compressed,
    and Python's ``gzip.compress`` stamps the current time into each stream, which would make
    the files differ from run to run. astropy has no option for it, so its module-level alias is
    swapped for the duration of the write (a no-op if astropy renames it).
    """
    try:
        from astropy.io.fits.hdu.compressed import _codecs
    except ImportError:  # pragma: no cover - layout of another astropy version
        yield
        return
    if not hasattr(_codecs, "gzip_compress"):  # pragma: no cover
        yield
        return
    with mock.patch.object(_codecs, "gzip_compress", functools.partial(gzip.compress, mtime=0)):
        yield


def _check_arguments(
    n_tiles: int, tile_size: int, n_sources: int, min_diameter: int, max_diameter: int, bands
) -> None:
    problems = []
    if n_tiles < 1:
        problems.append(f"n_tiles = {n_tiles!r}: give at least 1 tile")
    if tile_size < 64:
        problems.append(f"tile_size = {tile_size!r}: give at least 64 pixels")
    if n_sources < 1:
        problems.append(f"n_sources = {n_sources!r}: give at least 1 source")
    if not 4 <= min_diameter <= max_diameter:
        problems.append(
            f"min_diameter_pixel = {min_diameter!r}, max_diameter_pixel = {max_diameter!r}: "
            "need 4 <= min_diameter_pixel <= max_diameter_pixel"
        )
    if not bands or len(set(bands)) != len(bands):
        problems.append(f"bands = {list(bands)!r}: give one or more distinct band names")
    if problems:
        raise ConfigValidationError("Invalid demo survey settings:\n  - " + "\n  - ".join(problems))


def make_demo_survey(
    out_dir: str | os.PathLike,
    n_tiles: int = 2,
    tile_size: int = 2000,
    n_sources: int = 500,
    seed: int = 42,
    bands: Sequence[str] = DEFAULT_BANDS,
    min_diameter_pixel: int = 32,
    max_diameter_pixel: int = 256,
    compressed: bool = False,
) -> Path:
    """Write a synthetic Euclid-like survey and its source catalogue.

    Parameters
    ----------
    out_dir : path-like
        Directory to create (or reuse); files are overwritten.
    n_tiles : int
        Number of tiles. Tile 0 straddles RA = 0/360, tile 1 is at Dec = +75 deg.
    tile_size : int
        Side of each square tile in pixels (0.1 arcsec per pixel).
    n_sources : int
        Number of catalogue sources, spread randomly over the tiles; about 2 % of them have a
        stamp crossing a tile edge.
    seed : int
        Seed of every random choice: equal arguments give byte-identical files.
    bands : sequence of str
        Band names; one FITS file ``tile{t}_{band}.fits`` per band and tile.
    min_diameter_pixel, max_diameter_pixel : int
        Range of the catalogue's ``diameter_pixel`` (log-uniformly distributed).
    compressed : bool
        Write RICE tile-compressed images (``CompImageHDU`` in extension 1, EXTNAME ``SCI``)
        instead of plain float32 data in the PRIMARY HDU. Builds each image in memory: use for
        small tiles only.

    Returns
    -------
    pathlib.Path
        Path of ``catalogue.csv`` (``catalogue.parquet`` holds the same rows with a list column).

    Raises
    ------
    ConfigValidationError
        If an argument is out of range.
    """
    bands = tuple(bands)
    _check_arguments(n_tiles, tile_size, n_sources, min_diameter_pixel, max_diameter_pixel, bands)
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)

    rng = np.random.default_rng(seed)
    sources = _draw_sources(
        rng,
        n_sources,
        n_tiles,
        tile_size,
        min_diameter_pixel,
        max_diameter_pixel,
        border=_nan_border_width(tile_size),
    )

    ra = np.empty(n_sources)
    dec = np.empty(n_sources)
    paths: list[list[str]] = [[] for _ in range(n_sources)]
    source_ids = np.empty(n_sources, dtype=object)
    for tile_index in range(n_tiles):
        geometry = tile_geometry(tile_index)
        in_tile = np.flatnonzero(sources["tile"].to_numpy() == tile_index)
        tile_sources = sources.iloc[in_tile].reset_index(drop=True)
        tile_paths = [str(out / band_file_name(tile_index, band)) for band in bands]
        for band_index, band in enumerate(bands):
            _write_tile_band(
                Path(tile_paths[band_index]),
                seed,
                geometry,
                band_index,
                band,
                tile_size,
                tile_sources,
                compressed,
            )
        wcs = tile_wcs(geometry, tile_size)
        tile_ra, tile_dec = wcs.all_pix2world(
            tile_sources["x"].to_numpy(), tile_sources["y"].to_numpy(), 0
        )
        # Wrap into [0, 360): 360.0 itself is not a valid catalogue RA.
        ra[in_tile] = np.mod(tile_ra, 360.0)
        dec[in_tile] = tile_dec
        for row in in_tile:
            paths[row] = tile_paths
            source_ids[row] = f"TILE_{geometry.tile_id}_{row:06d}"
    ra[ra >= 360.0] = 0.0

    catalogue = pd.DataFrame(
        {
            "SourceID": source_ids.astype(str),
            "RA": ra,
            "Dec": dec,
            "diameter_pixel": sources["diameter_pixel"].to_numpy(),
            "fits_file_paths": paths,
        }
    )
    csv_path = out / "catalogue.csv"
    csv_frame = catalogue.assign(fits_file_paths=[json.dumps(p) for p in paths])
    # Default float formatting is round-trip exact, so CSV and Parquet hold the same numbers.
    csv_frame.to_csv(csv_path, index=False)
    table = pa.Table.from_pandas(catalogue, preserve_index=False)
    pq.write_table(table, out / "catalogue.parquet")
    description = {
        "bands": list(bands),
        "compressed": bool(compressed),
        "n_tiles": n_tiles,
        "tile_size": tile_size,
        "n_sources": n_sources,
        "seed": seed,
        "pixel_scale_arcsec": PIXEL_SCALE_ARCSEC,
    }
    (out / SURVEY_DESCRIPTION).write_text(json.dumps(description, indent=1) + "\n")
    return csv_path


def demo_channel_weights(bands: Sequence[str]) -> dict[str, list[float]]:
    """Channel weights for a demo survey with ``bands``.

    The default four bands are mixed into R, G, B (VIS blue, NIR_Y green, NIR_J yellow, NIR_H
    red); any other band list gets one output channel per band (identity weights).
    """
    bands = list(bands)
    if bands == list(DEMO_CHANNEL_WEIGHTS):
        return {band: list(w) for band, w in DEMO_CHANNEL_WEIGHTS.items()}
    return {
        band: [1.0 if c == b else 0.0 for c in range(len(bands))] for b, band in enumerate(bands)
    }


def demo_config(out_dir: str | os.PathLike, compressed: bool | None = None) -> dict:
    """Config overrides that process the demo survey in ``out_dir``.

    Parameters
    ----------
    out_dir : path-like
        The directory passed to :func:`make_demo_survey`.
    compressed : bool, optional
        Whether the survey was written with ``compressed=True`` (images in extension 1). By
        default read from the survey's ``demo_survey.json`` (False if absent).

    Returns
    -------
    dict
        ``source_catalogue``, ``channel_weights`` (see :func:`demo_channel_weights`, for the
        survey's bands), ``fits_extensions`` and the flux keyword, ready for
        ``validate_config``.
    """
    out = Path(out_dir).resolve()
    description_path = out / SURVEY_DESCRIPTION
    description = json.loads(description_path.read_text()) if description_path.is_file() else {}
    if compressed is None:
        compressed = bool(description.get("compressed", False))
    bands = description.get("bands", list(DEFAULT_BANDS))
    return {
        "source_catalogue": str(out / "catalogue.csv"),
        "channel_weights": demo_channel_weights(bands),
        "fits_extensions": [1] if compressed else ["PRIMARY"],
        "flux_conversion_keywords": {"AB_zeropoint": "MAGZERO"},
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry: write a demo survey and print the catalogue path."""
    parser = argparse.ArgumentParser(
        prog="python -m cutana.demo", description="Write cutana's synthetic demo survey."
    )
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--tiles", type=int, default=2, help="number of tiles (default 2)")
    parser.add_argument("--size", type=int, default=2000, help="tile side in pixels")
    parser.add_argument("--sources", type=int, default=500, help="number of sources")
    parser.add_argument("--seed", type=int, default=42, help="random seed")
    parser.add_argument("--min-diameter", type=int, default=32, help="min diameter_pixel")
    parser.add_argument("--max-diameter", type=int, default=256, help="max diameter_pixel")
    parser.add_argument(
        "--bands", default=",".join(DEFAULT_BANDS), help="comma-separated band names"
    )
    parser.add_argument("--compressed", action="store_true", help="RICE tile-compressed files")
    args = parser.parse_args(argv)
    path = make_demo_survey(
        args.out,
        n_tiles=args.tiles,
        tile_size=args.size,
        n_sources=args.sources,
        seed=args.seed,
        bands=tuple(b.strip() for b in args.bands.split(",") if b.strip()),
        min_diameter_pixel=args.min_diameter,
        max_diameter_pixel=args.max_diameter,
        compressed=args.compressed,
    )
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
