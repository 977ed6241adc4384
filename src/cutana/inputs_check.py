"""Everything SPEC §5 asks to check before any work starts.

The catalogue is validated by one streaming pass (:func:`cutana.catalogue.scan_catalogue`); then
every *distinct* FITS file (not every row) is opened lazily through
:func:`cutana.fits_io.open_image` and checked: it exists, is a readable FITS file, the chosen
extension holds 2-D image data with a celestial WCS, and it has the flux zero-point keyword when
flux conversion is on. With ``diameter_pixel`` all bands of a tile must share one pixel scale
(the same pixel count would otherwise cover different sky areas). All problems are collected
and raised as one error.

:func:`cutana.catalogue.split_catalogue` calls :func:`check_tile_files` with the tiles its own
streaming pass found, so the workflow's split rule validates everything in a single pass
before it writes any batch.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from .catalogue import CatalogueScan, ProblemLog, _error_title, scan_catalogue
from .config import band_extensions
from .exceptions import CatalogueValidationError, CutanaError, FitsValidationError

#: Relative difference of pixel scales above which two bands count as different.
PIXEL_SCALE_RTOL = 1e-3


def _file_usage(scan: CatalogueScan, cfg: Mapping) -> dict[tuple[str, object], dict]:
    """Distinct (file, extension) pairs with the band, row count and first row using them."""
    bands = [str(b) for b in cfg["channel_weights"]]
    extensions = band_extensions(cfg)
    usage: dict[tuple[str, object], dict] = {}
    for code, paths in enumerate(scan.tiles):
        n_rows = scan.tile_rows[code]
        first_row = scan.tile_first_row[code]
        for band_index, file_path in enumerate(paths):
            if band_index >= len(extensions):
                continue
            key = (file_path, extensions[band_index])
            entry = usage.setdefault(
                key, {"band": bands[band_index], "rows": 0, "first_row": first_row}
            )
            entry["rows"] += n_rows
            entry["first_row"] = min(entry["first_row"], first_row)
    return usage


def _usage_text(extension, entry: dict) -> str:
    rows = entry["rows"]
    return (
        f"[extension {extension!r}, band {entry['band']}, used by {rows} "
        f"row{'s' if rows != 1 else ''}, first row {entry['first_row']}]"
    )


def _check_one_file(
    file_path: str, extension, entry: dict, cfg: Mapping, catalogue_dir: str, describe: bool
):
    """Open one file; return ``(pixel_scale_arcsec or None, [problem, ...], description)``.

    ``description`` (only when ``describe``) is ``(celestial WCS, fits_io.image_layout or
    None)``, taken while the file is open so the split need not open it again.
    """
    usage = _usage_text(extension, entry)
    if not os.path.exists(file_path):
        return (
            None,
            [
                f"FITS file '{file_path}' {usage} does not exist. Fix: correct the path in "
                "fits_file_paths (where it is written as a relative path, it is read relative "
                f"to the catalogue's directory {catalogue_dir!r})"
            ],
            None,
        )
    from .fits_io import image_layout, open_image, zeropoint  # late: astropy is slow to import

    try:
        handle = open_image(file_path, extension)
    except FitsValidationError as exc:
        return None, [f"{exc} {usage}"], None
    except (OSError, ValueError, TypeError, KeyError, IndexError) as exc:
        return (
            None,
            [
                f"FITS file '{file_path}' {usage} cannot be read ({type(exc).__name__}: {exc}). "
                "Fix: check the file is a complete FITS image and the extension exists"
            ],
            None,
        )
    problems = []
    description = None
    try:
        # open_image guarantees a 2-D image with a celestial WCS and a positive pixel scale.
        scale = float(handle.pixel_scale_arcsec)
        keyword = cfg["flux_conversion_keywords"]["AB_zeropoint"]
        if cfg.get("apply_flux_conversion", True):
            try:
                zeropoint(handle.header, keyword, file_path)
            except FitsValidationError as exc:
                problems.append(f"{exc} {usage}")
        if describe:
            description = (handle.wcs, image_layout(handle, (keyword,)))
    finally:
        handle.close()
    return scale, problems, description


def check_tile_files(
    scan: CatalogueScan, cfg: Mapping, describe: bool = False
) -> tuple[ProblemLog, dict, dict]:
    """Check every distinct FITS file of the tiles a catalogue scan found.

    Parameters
    ----------
    scan : CatalogueScan
        From :func:`cutana.catalogue.scan_catalogue` (tiles hold absolute paths).
    cfg : dict
        Validated configuration: ``channel_weights``, ``fits_extensions``,
        ``apply_flux_conversion``, ``flux_conversion_keywords``.
    describe : bool
        Also return each file's WCS and :func:`cutana.fits_io.image_layout` (the split stores
        positions and layouts with its batches).

    Returns
    -------
    problems : ProblemLog
        One entry per unusable file, and per tile mixing pixel scales under ``diameter_pixel``.
    pixel_scales : dict
        ``{(path, extension): arcsec per pixel}`` of the files that could be opened.
    descriptions : dict
        ``{(path, extension): (celestial WCS, layout or None)}`` of those files when
        ``describe``, else empty.
    """
    problems = ProblemLog()
    catalogue_dir = str(Path(scan.source).resolve().parent) if scan.source else os.getcwd()
    scales: dict[tuple[str, object], float] = {}
    descriptions: dict[tuple[str, object], tuple] = {}
    usage = _file_usage(scan, cfg)
    for (file_path, extension), entry in usage.items():
        scale, file_problems, description = _check_one_file(
            file_path, extension, entry, cfg, catalogue_dir, describe
        )
        for message in file_problems:
            problems.add(message)
        if scale is not None:
            scales[(file_path, extension)] = scale
        if description is not None:
            descriptions[(file_path, extension)] = description
    if scan.size_column == "diameter_pixel":
        extensions = band_extensions(cfg)
        bands = [str(b) for b in cfg["channel_weights"]]
        for code, paths in enumerate(scan.tiles):
            tile_scales = [scales.get((p, extensions[i])) for i, p in enumerate(paths)]
            known = [s for s in tile_scales if s is not None]
            if len(known) < 2 or max(known) - min(known) <= PIXEL_SCALE_RTOL * max(known):
                continue
            listing = ", ".join(
                f"{bands[i]}: {s:.4g}" for i, s in enumerate(tile_scales) if s is not None
            )
            problems.add(
                f"rows using files {list(paths)} (first row {scan.tile_first_row[code]}, "
                f"{scan.tile_rows[code]} rows) mix pixel scales ({listing} arcsec/pixel): "
                "with diameter_pixel the same pixel count covers different sky areas in each "
                "band. Fix: give the stamp sizes as diameter_arcsec instead"
            )
    return problems, scales, descriptions


def raise_input_problems(catalogue_problems: ProblemLog, file_problems: ProblemLog, source):
    """Raise one error listing catalogue and FITS problems together (if there are any).

    Raises
    ------
    CatalogueValidationError
        When the catalogue has problems (FITS problems are listed too).
    FitsValidationError
        When only FITS files have problems.
    """
    if catalogue_problems:
        merged = ProblemLog()
        merged.extend(catalogue_problems)
        merged.extend(file_problems)
        raise CatalogueValidationError(merged.format(_error_title(source)))
    if file_problems:
        n_problems = len(file_problems)
        where = "in-memory catalogue" if source is None else f"catalogue '{source}'"
        raise FitsValidationError(
            file_problems.format(
                f"{n_problems} problem{'s' if n_problems != 1 else ''} with the FITS files of "
                f"the {where}:"
            )
        )


def check_inputs(cfg: Mapping, catalogue=None, chunk_rows: int = 200_000) -> dict:
    """Check the catalogue and every FITS file it names before any work starts (SPEC §5).

    Parameters
    ----------
    cfg : dict
        The validated configuration (:func:`cutana.config.validate_config`).
    catalogue : path or pandas.DataFrame, optional
        Defaults to ``cfg["source_catalogue"]``.
    chunk_rows : int
        Rows per streamed chunk.

    Returns
    -------
    dict
        Summary: ``n_sources``, ``n_tiles``, ``n_files``, ``n_bands``, ``bands``,
        ``size_column``, ``size_range``, ``ra_range``, ``dec_range``, ``pixel_scales``
        (``{path: arcsec}``).

    Raises
    ------
    CatalogueValidationError, FitsValidationError
        One error listing every problem found (capped, with a count of the rest).
    """
    source = catalogue if catalogue is not None else cfg.get("source_catalogue")
    if source is None or (isinstance(source, str) and not source.strip()):
        raise CutanaError(
            "config key 'source_catalogue' is not set: give the path of a CSV or Parquet catalogue"
        )
    scan = scan_catalogue(source, cfg, chunk_rows=chunk_rows)
    file_problems, scales, _ = check_tile_files(scan, cfg)
    raise_input_problems(scan.problems, file_problems, scan.source)
    return {
        "n_sources": scan.total_rows,
        "n_tiles": len(scan.tiles),
        "n_files": len({path for path, _ in scales}),
        "n_bands": len(cfg["channel_weights"]),
        "bands": [str(b) for b in cfg["channel_weights"]],
        "size_column": scan.size_column,
        "size_range": scan.size_range,
        "ra_range": scan.ra_range,
        "dec_range": scan.dec_range,
        "pixel_scales": {path: scale for (path, _), scale in scales.items()},
    }
