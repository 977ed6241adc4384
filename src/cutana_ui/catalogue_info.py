"""Step 1 and 2 of the UI: find catalogues and summarise what a catalogue holds.

The summary (sources, files, bands, pixel scales, HDUs, problems) is computed without widgets so
tests can check it directly. Validation uses cutana's public catalogue API; the FITS headers of
one file per band are read (headers only, never pixel data) to name bands and pixel scales.
"""

from __future__ import annotations

import ast
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

logger = logging.getLogger(__name__)

CATALOGUE_SUFFIXES = (".csv", ".parquet", ".pq")
#: Rows read for band detection and as the pool of preview sources (the full catalogue is only
#: streamed, never loaded: it can have tens of millions of rows).
SAMPLE_ROWS = 2000
#: Header keywords that commonly name the band of an image, tried in order.
BAND_KEYWORDS = ("FILTER", "BAND", "FILTNAM", "FILTER1", "INSTRUME")


def find_catalogues(directory: str | Path, max_depth: int = 2, limit: int = 500) -> list[str]:
    """List catalogue files (CSV or Parquet) under ``directory``.

    Parameters
    ----------
    directory : str or Path
        Where to look.
    max_depth : int
        How many directory levels below ``directory`` to search (output folders of past runs
        can be huge, so the search is shallow).
    limit : int
        Stop after this many files.

    Returns
    -------
    list of str
        Sorted paths; empty when the directory does not exist.
    """
    root = Path(directory).expanduser()
    if not root.is_dir():
        return []
    found: list[str] = []
    stack = [(root, 0)]
    while stack and len(found) < limit:
        folder, depth = stack.pop()
        try:
            entries = sorted(folder.iterdir())
        except OSError:
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                # Zarr stores and batch folders hold thousands of chunk files, never catalogues.
                if depth < max_depth and not entry.name.endswith(".zarr"):
                    stack.append((entry, depth + 1))
            elif entry.suffix.lower() in CATALOGUE_SUFFIXES and "metadata" not in entry.name:
                found.append(str(entry))
    return sorted(found)[:limit]


@dataclass
class BandInfo:
    """What the UI knows about one band (one position in ``fits_file_paths``)."""

    index: int
    name: str
    example_file: str
    n_files: int
    extensions: list[str] = field(default_factory=list)
    pixel_scale_arcsec: float | None = None


@dataclass
class CatalogueInfo:
    """Summary of a catalogue shown in step 2.

    Attributes
    ----------
    path : str
        The catalogue file.
    n_sources : int
        Number of rows.
    n_files : int
        Number of distinct FITS files referenced.
    bands : list of BandInfo
        One entry per position in ``fits_file_paths``.
    size_column : str or None
        ``diameter_pixel`` or ``diameter_arcsec``.
    size_range : tuple of float or None
        Min and max of the size column.
    ra_range, dec_range : tuple of float or None
        Coordinate extent.
    problems : list of str
        Validation problems (empty when the catalogue is usable).
    dataframe : DataFrame or None
        The catalogue rows (used to pick preview sources).
    """

    path: str
    n_sources: int = 0
    n_files: int = 0
    bands: list[BandInfo] = field(default_factory=list)
    size_column: str | None = None
    size_range: tuple[float, float] | None = None
    ra_range: tuple[float, float] | None = None
    dec_range: tuple[float, float] | None = None
    problems: list[str] = field(default_factory=list)
    dataframe: pd.DataFrame | None = field(default=None, repr=False)

    @property
    def ok(self) -> bool:
        """True when the catalogue loaded and no problem was found."""
        return self.dataframe is not None and not self.problems

    def to_html(self) -> str:
        """Render the summary as a small HTML table (shown in step 2)."""
        rows = [
            ("Catalogue", _esc(self.path)),
            ("Sources", f"{self.n_sources:,}"),
            ("FITS files", f"{self.n_files:,}"),
            ("Bands", str(len(self.bands))),
        ]
        if self.size_column and self.size_range:
            rows.append((self.size_column, f"{self.size_range[0]:g} – {self.size_range[1]:g}"))
        if self.ra_range and self.dec_range:
            rows.append(
                (
                    "RA / Dec",
                    f"{self.ra_range[0]:.4f}–{self.ra_range[1]:.4f} / "
                    f"{self.dec_range[0]:.4f}–{self.dec_range[1]:.4f} deg",
                )
            )
        body = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows)
        band_rows = "".join(
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>".format(
                b.index,
                _esc(b.name),
                "–" if b.pixel_scale_arcsec is None else f"{b.pixel_scale_arcsec:.4g}″",
                _esc(", ".join(b.extensions) or "–"),
                _esc(Path(b.example_file).name),
            )
            for b in self.bands
        )
        bands = (
            "<table class='cutana-band-table'><tr><th>#</th><th>band</th><th>pixel scale</th>"
            f"<th>image HDUs</th><th>example file</th></tr>{band_rows}</table>"
            if self.bands
            else ""
        )
        if self.problems:
            items = "".join(f"<li>{_esc(p)}</li>" for p in self.problems)
            problems = f"<div class='cutana-problems'><b>Problems</b><ul>{items}</ul></div>"
        else:
            problems = "<div class='cutana-no-problems'>✔ No validation problems found.</div>"
        return f"<table class='cutana-summary'>{body}</table>{bands}{problems}"


def _esc(text: str) -> str:
    return str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def parse_path_list(value) -> list[str]:
    """Parse one ``fits_file_paths`` cell (list, array or a Python/JSON list string).

    Parsing is data-only (``json``/``ast.literal_eval``): nothing in a catalogue is executed.
    """
    if isinstance(value, (list, tuple, np.ndarray)):
        return [str(v) for v in value]
    if isinstance(value, str):
        text = value.strip()
        for parser in (json.loads, ast.literal_eval):
            try:
                parsed = parser(text)
            except (ValueError, SyntaxError, TypeError):
                continue
            if isinstance(parsed, (list, tuple)):
                return [str(v) for v in parsed]
            if isinstance(parsed, str):
                return [parsed]
        return [text]
    return []


def read_sample(path: str | Path, max_rows: int = SAMPLE_ROWS) -> pd.DataFrame:
    """Read the first ``max_rows`` rows of a CSV or Parquet catalogue (bounded memory).

    ``fits_file_paths`` is parsed into lists of absolute paths (relative paths are relative to
    the catalogue's folder, as in the workflow), so the rows can be handed to the preview engine
    from any working directory.
    """
    path = Path(path).expanduser()
    if path.suffix.lower() in (".parquet", ".pq"):
        import pyarrow.parquet as pq

        batches = pq.ParquetFile(path).iter_batches(batch_size=max_rows)
        first = next(batches, None)
        df = first.to_pandas() if first is not None else pd.DataFrame()
    else:
        df = pd.read_csv(path, nrows=max_rows)
    base = path.resolve().parent
    if "fits_file_paths" in df:
        df["fits_file_paths"] = [
            [str((base / Path(p).expanduser()).resolve()) for p in parse_path_list(v)]
            for v in df["fits_file_paths"]
        ]
    return df


def inspect_fits(path: str) -> tuple[list[str], float | None, str | None]:
    """Image HDUs with a celestial WCS, the pixel scale and a band name of one FITS file.

    Only headers are read. Returns ``(hdu names, pixel scale in arcsec or None, band or None)``.
    """
    import warnings

    from astropy.io import fits
    from astropy.wcs import WCS, FITSFixedWarning
    from astropy.wcs.utils import proj_plane_pixel_scales

    names: list[str] = []
    scale = None
    band = None
    with fits.open(path, memmap=True, lazy_load_hdus=True) as hdul:
        for i, hdu in enumerate(hdul):
            header = hdu.header
            naxis = header.get("ZNAXIS", header.get("NAXIS", 0))
            if naxis < 2:
                if band is None:
                    band = _band_from_header(header)
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FITSFixedWarning)
                try:
                    wcs = WCS(header).celestial
                except Exception:  # noqa: BLE001 - an HDU without WCS is just not offered
                    continue
            if not wcs.has_celestial:
                continue
            name = hdu.name or str(i)
            names.append(name if name != "" else str(i))
            if scale is None:
                scale = float(np.mean(proj_plane_pixel_scales(wcs)) * 3600.0)
            if band is None:
                band = _band_from_header(header)
    return names, scale, band


def _band_from_header(header) -> str | None:
    for key in BAND_KEYWORDS:
        value = header.get(key)
        if isinstance(value, str) and value.strip():
            return value.strip()
    return None


def _band_from_filename(path: str, others: list[str]) -> str | None:
    """A band name from the part of a file name that differs between bands (``tile_VIS.fits``)."""
    stem = Path(path).stem
    other_stems = [Path(p).stem for p in others if p != path]
    if not other_stems:
        return None
    tokens = [t for t in re.split(r"[_\-.]", stem) if t]
    common = set.intersection(*(set(re.split(r"[_\-.]", s)) for s in other_stems))
    distinct = [t for t in tokens if t not in common]
    return "_".join(distinct) if distinct else None


def _sanitise_band(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]+", "_", name).strip("_") or "band"


def analyse(path: str | Path, max_files_checked: int = 1000) -> CatalogueInfo:
    """Summarise a catalogue for step 2 of the UI.

    Counts, ranges and row problems come from cutana's streaming
    :func:`cutana.catalogue_preprocessor.analyse_catalogue` (bounded memory for any size); band
    names, HDUs and pixel scales from the headers of the files of the first rows.

    Parameters
    ----------
    path : str or Path
        CSV or Parquet catalogue.
    max_files_checked : int
        Existence of at most this many distinct FITS files is checked (a stat each), so a
        catalogue over a whole survey stays quick to open.

    Returns
    -------
    CatalogueInfo
        Never raises for bad input: problems are listed in ``problems``. ``dataframe`` holds
        the first :data:`SAMPLE_ROWS` rows (the pool the previews are drawn from).
    """
    from cutana.catalogue_preprocessor import analyse_catalogue

    path = Path(str(path).strip()).expanduser()
    info = CatalogueInfo(path=str(path))
    if not path.is_file():
        info.problems.append(f"catalogue file {path} does not exist: check the path")
        return info
    try:
        summary = analyse_catalogue(str(path))
        sample = read_sample(path)
    except Exception as exc:  # noqa: BLE001 - unreadable catalogues are reported, not raised
        info.problems.append(str(exc))
        return info
    info.problems.extend(summary.get("problems") or [])
    info.n_sources = int(summary.get("n_sources") or 0)
    info.n_files = int(summary.get("n_files") or 0)
    info.size_column = summary.get("size_column")
    for key in ("size_range", "ra_range", "dec_range"):
        value = summary.get(key)
        setattr(info, key, tuple(float(v) for v in value) if value else None)
    if sample.empty or "fits_file_paths" not in sample:
        return info
    info.dataframe = sample
    files = (summary.get("files") or [])[:max_files_checked]
    missing = [p for p in files if not Path(p).is_file()]
    if missing:
        shown = ", ".join(missing[:3]) + (" …" if len(missing) > 3 else "")
        info.problems.append(
            f"{len(missing)} FITS file(s) not found, e.g. {shown}: fix fits_file_paths"
        )
    path_lists = list(sample["fits_file_paths"])
    n_bands = int(summary.get("n_bands") or max(len(p) for p in path_lists))
    per_band: list[list[str]] = [[] for _ in range(n_bands)]
    for paths in path_lists:
        if len(paths) == n_bands:
            for i, p in enumerate(paths):
                per_band[i].append(p)
    examples = [band[0] for band in per_band if band]
    used_names: set[str] = set()
    for i in range(n_bands):
        if not per_band[i]:
            continue
        example = per_band[i][0]
        extensions, scale, band = [], None, None
        if Path(example).is_file():
            try:
                extensions, scale, band = inspect_fits(example)
            except Exception as exc:  # noqa: BLE001
                info.problems.append(f"cannot read FITS file {example}: {exc}")
        name = band or _band_from_filename(example, examples) or f"band{i + 1}"
        name = _sanitise_band(name)
        while name in used_names:  # channel_weights keys must be unique
            name = f"{name}_{i + 1}"
        used_names.add(name)
        info.bands.append(
            BandInfo(
                index=i,
                name=name,
                example_file=example,
                n_files=len(set(per_band[i])),
                extensions=extensions,
                pixel_scale_arcsec=scale,
            )
        )
    return info
