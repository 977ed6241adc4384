"""Upstream-compatible catalogue loading (``cutana.catalogue_preprocessor``, SPEC §8).

:func:`load_and_validate_catalogue` reads a whole catalogue into memory after validating it
with the streaming validator of :mod:`cutana.catalogue` (same checks and messages as the
workflow's split step). :func:`analyse_catalogue` summarises a catalogue for the UI without
raising on bad rows.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import pandas as pd
import pyarrow as pa

from .catalogue import (
    CatalogueSource,
    raise_if_problems,
    scan_catalogue,
    spool_table_to_frame,
)
from .exceptions import CatalogueValidationError

__all__ = ["CatalogueValidationError", "analyse_catalogue", "load_and_validate_catalogue"]

#: Files listed by analyse_catalogue (the count is always complete).
MAX_LISTED_FILES = 1000


def load_and_validate_catalogue(
    filepath: CatalogueSource,
    bands: Mapping | Sequence[str] | int | None = None,
    chunk_rows: int = 200_000,
) -> pd.DataFrame:
    """Load a CSV or Parquet catalogue (or check a DataFrame) and validate every row.

    Parameters
    ----------
    filepath : str, Path or pandas.DataFrame
        The catalogue.
    bands : config dict, sequence of band names, int or None
        What ``fits_file_paths`` must match: a validated config (its ``channel_weights`` keys),
        band names, a count, or None to require every row to have as many paths as the first.
    chunk_rows : int
        Rows per streamed chunk while validating.

    Returns
    -------
    pandas.DataFrame
        Normalised columns ``row_index, SourceID, RA, Dec, fits_file_paths (list of absolute
        paths), diameter_pixel, diameter_arcsec`` (the size column the file lacks is NaN).

    Raises
    ------
    CatalogueValidationError
        Listing every problem (rows, column, bad value, fix).
    """
    tables: list[pa.Table] = []
    scan = scan_catalogue(
        filepath, bands, chunk_rows=chunk_rows, on_chunk=lambda table, _: tables.append(table)
    )
    raise_if_problems(scan.problems, scan.source)
    if not tables:
        raise CatalogueValidationError(f"catalogue '{filepath}' has no data rows")
    return spool_table_to_frame(pa.concat_tables(tables), scan.tiles)


def analyse_catalogue(
    path: CatalogueSource, bands: Mapping | Sequence[str] | int | None = None
) -> dict:
    """Summarise a catalogue for the UI (never raises for bad rows; they are listed).

    Parameters
    ----------
    path : str, Path or pandas.DataFrame
        The catalogue.
    bands : config dict, sequence of band names, int or None
        Expected bands; None takes the band count from the first valid row.

    Returns
    -------
    dict
        ``n_sources``, ``n_tiles``, ``n_files``, ``files`` (first 1000 distinct files, in
        order of appearance), ``n_bands``, ``size_column``, ``size_range``, ``ra_range``,
        ``dec_range``, ``valid`` (bool) and ``problems`` (list of messages).

    Raises
    ------
    CatalogueValidationError
        Only when the file cannot be read at all (missing, bad header, unparsable CSV).
    """
    scan = scan_catalogue(path, bands)
    files: dict[str, None] = {}
    for paths in scan.tiles:
        files.update(dict.fromkeys(paths))
    return {
        "catalogue": None if scan.source is None else os.path.abspath(scan.source),
        "n_sources": scan.total_rows,
        "n_tiles": len(scan.tiles),
        "n_files": len(files),
        "files": list(files)[:MAX_LISTED_FILES],
        "n_bands": scan.n_bands,
        "size_column": scan.size_column,
        "size_range": scan.size_range,
        "ra_range": scan.ra_range,
        "dec_range": scan.dec_range,
        "valid": not scan.problems,
        "problems": scan.problems.lines(),
    }
