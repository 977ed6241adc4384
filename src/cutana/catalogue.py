"""Streaming, validation and splitting of the source catalogue (SPEC §3.1, §4, §5).

The catalogue is read in chunks (CSV through ``pyarrow.csv.open_csv``, Parquet through
``pyarrow.parquet.ParquetFile.iter_batches``), so catalogues of tens of millions of rows are
handled in bounded memory. Every chunk is normalised and checked with vectorised operations;
problems are collected over the whole file and reported together, each naming the rows (0-based
data rows, header excluded), the column, the bad value and the fix.

Normalised columns
------------------
``row_index`` (int64, 0-based data row), ``SourceID`` (string, surrounding whitespace removed),
``RA`` and ``Dec`` (float64, ICRS degrees), ``fits_file_paths`` (list of str: absolute paths;
relative paths in the catalogue are resolved against the directory of the catalogue file, or
the current directory for an in-memory DataFrame), ``diameter_pixel`` and ``diameter_arcsec``
(float64; the column the catalogue does not have is all NaN). Extra columns are ignored.

Splitting
---------
:func:`split_catalogue` streams the catalogue once: it validates every row and spools the rows,
bucketed by tile (the tuple of FITS files), to temporary Parquet files. Only when the catalogue
and its FITS files are valid are the spools read back one bucket at a time, sorted by (tile, Dec,
RA, row) for locality and cut into batches of at most ``N_batch_cutout_process`` sources.
"""

from __future__ import annotations

import ast
import csv
import difflib
import hashlib
import json
import math
import os
import shutil
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from . import arrow_tables
from .exceptions import CatalogueValidationError, CutanaError
from .fits_io import LAYOUTS_METADATA_KEY, POSITION_COLUMNS

REQUIRED_COLUMNS = ("SourceID", "RA", "Dec", "fits_file_paths")
SIZE_COLUMNS = ("diameter_pixel", "diameter_arcsec")
#: Largest stamp diameters accepted; bigger values are almost surely unit mistakes.
MAX_DIAMETER = {"diameter_pixel": 100_000.0, "diameter_arcsec": 3600.0}
#: Example rows shown per problem, and problems shown per error message.
MAX_EXAMPLES = 5
MAX_PROBLEMS = 25
#: Spool buckets used by split_catalogue (tiles are spread over them by tile number).
N_SPOOL_BUCKETS = 32
#: Largest spool bucket sorted in memory at once; bigger ones are cut into Dec slabs.
MAX_SORT_ROWS = 2_000_000
#: Column order and types of the batch files (docs/DESIGN.md, "Batch files").
BATCH_SCHEMA = pa.schema(
    [
        ("row_index", pa.int64()),
        ("SourceID", pa.string()),
        ("RA", pa.float64()),
        ("Dec", pa.float64()),
        ("fits_file_paths", pa.list_(pa.string())),
        ("diameter_pixel", pa.float64()),
        ("diameter_arcsec", pa.float64()),
        ("tile", pa.string()),
        # 0-based pixel position in each band's image; null when the tile's images could not
        # be described (the job then opens them with astropy and uses their WCS).
        *((name, pa.list_(pa.float64())) for name in POSITION_COLUMNS),
    ]
)
_SPOOL_SCHEMA = pa.schema(
    [
        ("row_index", pa.int64()),
        ("SourceID", pa.string()),
        ("RA", pa.float64()),
        ("Dec", pa.float64()),
        ("diameter_pixel", pa.float64()),
        ("diameter_arcsec", pa.float64()),
        ("tile_code", pa.int64()),
    ]
)
# Parquet list columns are joined into one string per row so that identical path lists can be
# factorised like CSV text; the marker tells the parser the text is already split.
_LIST_MARKER = "\x1e"
_LIST_SEPARATOR = "\x1f"
_PATH_FORMAT_FIX = (
    'write a list with one path per band, e.g. ["/data/vis.fits", "/data/nir.fits"] '
    "(JSON or Python list syntax; in CSV quote the whole field)"
)
_PARSE_CACHE_LIMIT = 200_000
_UNITS = {
    "RA": "degrees",
    "Dec": "degrees",
    "diameter_pixel": "pixels",
    "diameter_arcsec": "arcsec",
}

if TYPE_CHECKING:
    import pandas as pd

#: A catalogue: a CSV or Parquet path, or rows in a pandas DataFrame.
CatalogueSource = "str | os.PathLike | pd.DataFrame"


def _is_frame(value) -> bool:
    """Whether ``value`` is a pandas DataFrame, without importing pandas: the split job reads
    files and never loads it (~0.25 s of every run), and a DataFrame implies pandas is loaded.
    """
    pandas = sys.modules.get("pandas")
    return pandas is not None and isinstance(value, pandas.DataFrame)


# --------------------------------------------------------------------------------------------
# Problem collection
# --------------------------------------------------------------------------------------------


def _short_repr(value, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass
class _RowProblem:
    column: str
    what: str
    fix: str
    count: int = 0
    examples: list = field(default_factory=list)


class ProblemLog:
    """Collects validation problems over a whole catalogue and formats one error message.

    Row problems are grouped by (column, kind): the message shows the first few rows with their
    values and how many more rows have the same problem.
    """

    def __init__(self) -> None:
        self._row_problems: dict[tuple[str, str], _RowProblem] = {}
        self._messages: list[str] = []

    def add_rows(self, column: str, what: str, fix: str, rows, values) -> None:
        """Record that ``rows`` (0-based) of ``column`` have the problem ``what``.

        Parameters
        ----------
        column, what, fix : str
            The column, a description of the problem ("is not a number") and how to fix it.
        rows : array-like of int
            The 0-based data rows affected.
        values : sequence or callable
            The bad values of those rows, or a callable ``f(k) -> list`` returning the first
            ``k`` of them (so that the values are only materialised for the examples shown).
        """
        n_rows = len(rows)
        if n_rows == 0:
            return
        entry = self._row_problems.setdefault(
            (column, what), _RowProblem(column=column, what=what, fix=fix)
        )
        entry.count += n_rows
        room = MAX_EXAMPLES - len(entry.examples)
        if room > 0:
            shown = values(room) if callable(values) else list(values[:room])
            entry.examples.extend(zip(np.asarray(rows[:room]).tolist(), shown, strict=False))

    def add(self, message: str) -> None:
        """Record a problem that is not about individual rows (a missing column, a bad file)."""
        self._messages.append(message)

    def __bool__(self) -> bool:
        return bool(self._row_problems or self._messages)

    def __len__(self) -> int:
        return len(self._row_problems) + len(self._messages)

    @property
    def has_row_problems(self) -> bool:
        return bool(self._row_problems)

    def lines(self) -> list[str]:
        """One human-readable line per problem."""
        out = []
        for entry in self._row_problems.values():
            shown = ", ".join(f"row {row} = {_short_repr(value)}" for row, value in entry.examples)
            more = entry.count - len(entry.examples)
            more_text = f" (and {more} more row{'s' if more != 1 else ''})" if more > 0 else ""
            plural = "rows" if entry.count != 1 else "row"
            out.append(
                f"column '{entry.column}': value {entry.what} in {entry.count} {plural}: "
                f"{shown}{more_text}. Fix: {entry.fix}"
            )
        return out + self._messages

    def extend(self, other: ProblemLog) -> None:
        """Append the problems of ``other`` (used to merge catalogue and FITS checks)."""
        self._messages.extend(other._messages)
        for key, entry in other._row_problems.items():
            mine = self._row_problems.setdefault(
                key, _RowProblem(column=entry.column, what=entry.what, fix=entry.fix)
            )
            mine.count += entry.count
            mine.examples.extend(entry.examples[: MAX_EXAMPLES - len(mine.examples)])

    def format(self, title: str) -> str:
        """The full error message: ``title`` then one bullet per problem (capped)."""
        lines = self.lines()
        shown = lines[:MAX_PROBLEMS]
        text = title + "\n  - " + "\n  - ".join(shown)
        if len(lines) > MAX_PROBLEMS:
            text += f"\n  ... and {len(lines) - MAX_PROBLEMS} more problems"
        return text


def _describe_source(source) -> str:
    if source is None or _is_frame(source):
        return "catalogue (in-memory DataFrame)"
    return f"catalogue '{source}'"


def _error_title(source) -> str:
    where = _describe_source(source)
    hint = ""
    if source is not None and str(source).lower().endswith((".csv", ".txt", ".tsv")):
        hint = "; in the CSV file row r is on line r + 2"
    return f"{where} is invalid (rows are 0-based data rows, header excluded{hint}):"


# --------------------------------------------------------------------------------------------
# Columns
# --------------------------------------------------------------------------------------------


#: Other names people give the required columns (lower case, underscores removed).
_SYNONYMS = {
    "SourceID": ("id", "sourceid", "objectid", "objid", "name", "sourcename", "srcid"),
    "RA": ("ra", "radeg", "raj2000", "alpha"),
    "Dec": ("dec", "decdeg", "decl", "dej2000", "decj2000", "delta"),
    "fits_file_paths": ("fitsfiles", "fitspaths", "paths", "files", "fitsfile", "filepaths"),
    "diameter_pixel": ("diameterpix", "diameterpixels", "sizepix", "sizepixel", "diampix"),
    "diameter_arcsec": ("diameterarcsec", "sizearcsec", "diamarcsec", "diameterasec"),
}


def _suggest(name: str, candidates: Sequence[str]) -> str | None:
    for candidate in candidates:
        if candidate.lower().replace("_", "").replace(" ", "") in _SYNONYMS.get(name, ()):
            return candidate
    lowered = {c.lower().replace("_", "").replace(" ", ""): c for c in candidates}
    key = name.lower().replace("_", "")
    if key in lowered:
        return lowered[key]
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    if not close:
        close = difflib.get_close_matches(key, list(lowered), n=1, cutoff=0.6)
        close = [lowered[c] for c in close]
    return close[0] if close else None


def check_columns(columns: Sequence[str], source=None) -> str:
    """Check the column names of a catalogue and return the size column it uses.

    Parameters
    ----------
    columns : sequence of str
        The header of the catalogue.
    source : path or None
        The catalogue, named in the error message.

    Returns
    -------
    str
        ``"diameter_pixel"`` or ``"diameter_arcsec"``.

    Raises
    ------
    CatalogueValidationError
        For missing or misspelt required columns (with the closest existing name), for a
        header with neither or both size columns (saying which one to drop), for repeated
        column names.
    """
    columns = [str(c) for c in columns]
    problems = ProblemLog()
    repeated = sorted({c for c in columns if columns.count(c) > 1})
    for name in repeated:
        problems.add(f"column '{name}' appears more than once in the header: keep one of them")
    unknown = [c for c in columns if c not in REQUIRED_COLUMNS + SIZE_COLUMNS]
    for name in REQUIRED_COLUMNS:
        if name not in columns:
            guess = _suggest(name, unknown)
            fix = (
                f"found column '{guess}': rename it to '{name}'"
                if guess
                else f"add a column '{name}'"
            )
            problems.add(f"required column '{name}' is missing; {fix}")
    present = [c for c in SIZE_COLUMNS if c in columns]
    if len(present) == 2:
        problems.add(
            "both 'diameter_pixel' and 'diameter_arcsec' are present, so the stamp size is "
            "ambiguous: drop 'diameter_arcsec' to size stamps in pixels, or drop "
            "'diameter_pixel' to size them on the sky"
        )
    elif not present:
        guesses = [g for g in (_suggest(n, unknown) for n in SIZE_COLUMNS) if g]
        found = f" (found column '{guesses[0]}': rename it)" if guesses else ""
        problems.add(
            "no stamp size column: add 'diameter_pixel' (pixels) or 'diameter_arcsec' "
            f"(arcseconds){found}"
        )
    if problems:
        found_text = ", ".join(repr(c) for c in columns) or "none"
        raise CatalogueValidationError(
            problems.format(
                f"{_describe_source(source)} has a bad header (columns found: {found_text}):"
            )
        )
    return present[0]


# --------------------------------------------------------------------------------------------
# Raw chunk readers
# --------------------------------------------------------------------------------------------


def _is_parquet(path: Path) -> bool:
    if path.suffix.lower() in (".parquet", ".pq", ".parq"):
        return True
    if path.suffix.lower() in (".csv", ".txt", ".tsv"):
        return False
    with open(path, "rb") as handle:
        return handle.read(4) == b"PAR1"


def _csv_header(path: Path) -> list[str]:
    # utf-8-sig drops a byte-order mark; the csv module removes quotes around names.
    with open(path, newline="", encoding="utf-8-sig", errors="replace") as handle:
        header = next(csv.reader(handle), None)
    if not header or not any(h.strip() for h in header):
        raise CatalogueValidationError(
            f"{_describe_source(path)} is empty (no header line): write a header "
            "'SourceID,RA,Dec,diameter_pixel,fits_file_paths' and one row per source"
        )
    return [h.strip() for h in header]


def _csv_block_size(path: Path, chunk_rows: int) -> int:
    with open(path, "rb") as handle:
        sample = handle.read(1 << 16)
    n_lines = max(sample.count(b"\n"), 1)
    bytes_per_row = max(len(sample) // n_lines, 16)
    return int(min(max(chunk_rows * bytes_per_row, 1 << 20), 1 << 28))


def _slice_table(table: pa.Table, chunk_rows: int) -> Iterator[pa.Table]:
    for start in range(0, table.num_rows, chunk_rows):
        yield table.slice(start, chunk_rows)


def _frame_to_raw_table(frame: pd.DataFrame) -> pa.Table:
    """Convert in-memory catalogue rows to a raw Arrow table without failing on mixed types.

    Path lists held as Python lists, tuples or arrays become JSON text (so lists and list text
    may be mixed); a column whose values Arrow cannot convert as a whole is passed as text, so
    the validator names the bad values instead of crashing.
    """
    columns = {}
    for name in frame.columns:
        values = frame[name]
        if name == "fits_file_paths" and values.dtype == object:
            values = values.map(_list_to_json)
        try:
            columns[str(name)] = pa.array(values, from_pandas=True)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            columns[str(name)] = pa.array([_text_or_none(v) for v in values], pa.string())
    return pa.table(columns)


def _list_to_json(value):
    if isinstance(value, (list, tuple, np.ndarray)):
        return json.dumps([str(p) for p in value])
    return value


def _text_or_none(value) -> str | None:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    return str(value)


def _open_raw(source: CatalogueSource, chunk_rows: int) -> tuple[list[str], Iterator[pa.Table]]:
    """Return the header and an iterator of raw chunks (pyarrow Tables of the known columns)."""
    if _is_frame(source):
        columns = [str(c) for c in source.columns]
        wanted = [c for c in columns if c in REQUIRED_COLUMNS + SIZE_COLUMNS]

        def frames():
            for start in range(0, len(source), chunk_rows):
                part = source.iloc[start : start + chunk_rows][wanted]
                yield _frame_to_raw_table(part)

        return columns, frames()

    path = Path(source)
    if not path.is_file():
        raise CatalogueValidationError(
            f"{_describe_source(path)} does not exist or is not a file: check the "
            "'source_catalogue' path (relative paths are relative to the working directory)"
        )
    if _is_parquet(path):
        try:
            parquet = pq.ParquetFile(path)
        except (pa.ArrowException, OSError) as exc:
            raise CatalogueValidationError(
                f"{_describe_source(path)} is not a readable Parquet file ({exc}): rewrite it "
                "with pandas.DataFrame.to_parquet or give a CSV file"
            ) from exc
        columns = list(parquet.schema_arrow.names)
        wanted = [c for c in columns if c in REQUIRED_COLUMNS + SIZE_COLUMNS]

        def batches():
            for batch in parquet.iter_batches(batch_size=chunk_rows, columns=wanted):
                yield pa.Table.from_batches([batch])

        return columns, batches()

    columns = _csv_header(path)
    wanted = [c for c in columns if c in REQUIRED_COLUMNS + SIZE_COLUMNS]

    def csv_chunks():
        # Every column is read as text: numbers are parsed by the validator, which can then
        # name the bad value instead of failing on the first one.
        read_options = pacsv.ReadOptions(
            column_names=[c if c else f"_unnamed_{i}" for i, c in enumerate(columns)],
            skip_rows=1,
            block_size=_csv_block_size(path, chunk_rows),
        )
        convert_options = pacsv.ConvertOptions(
            column_types={c: pa.string() for c in wanted},
            include_columns=wanted,
            strings_can_be_null=False,
        )
        try:
            reader = pacsv.open_csv(
                path, read_options=read_options, convert_options=convert_options
            )
            for batch in reader:
                yield from _slice_table(pa.Table.from_batches([batch]), chunk_rows)
        except pa.ArrowInvalid as exc:
            raise CatalogueValidationError(
                f"{_describe_source(path)} cannot be parsed as CSV: {exc}. Fix: every line "
                "needs one value per header column; quote fields that contain commas (such as "
                "the fits_file_paths list) with double quotes; save the file as UTF-8"
            ) from exc

    return columns, csv_chunks()


# --------------------------------------------------------------------------------------------
# Column normalisation (vectorised)
# --------------------------------------------------------------------------------------------


def _as_array(column) -> pa.Array:
    if isinstance(column, pa.ChunkedArray):
        return column.combine_chunks()
    return column


def _float_column(column: pa.Array) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Parse a column as float64.

    Returns
    -------
    values : ndarray of float64 (NaN where missing or unparsable)
    missing : ndarray of bool (null or blank)
    unparsable : ndarray of bool (text that is not a number; "nan"/"inf" are numbers)
    """
    n_rows = len(column)
    kind = column.type
    if pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_decimal(kind):
        values = arrow_tables.numpy_values(pc.cast(column, pa.float64()), np.float64)
        return values, arrow_tables.null_mask(column), np.zeros(n_rows, bool)
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        try:
            column = pc.cast(column, pa.string())
        except pa.ArrowException:
            column = pa.array([None if v is None else str(v) for v in column.to_pylist()])
    try:  # fast path: clean numeric text
        values = arrow_tables.numpy_values(pc.cast(column, pa.float64()), np.float64)
        return values, arrow_tables.null_mask(column), np.zeros(n_rows, bool)
    except pa.ArrowInvalid:
        pass
    stripped = pc.utf8_trim_whitespace(column)
    missing = arrow_tables.empty_or_null(stripped)
    text = stripped.to_numpy(zero_copy_only=False)
    import pandas as pd  # only for text that is not clean numbers (a catalogue to fix)

    values = pd.to_numeric(pd.Series(text, dtype=object), errors="coerce").to_numpy(
        dtype=np.float64, na_value=np.nan
    )
    unparsable = np.isnan(values) & ~missing
    if unparsable.any():
        candidates = np.flatnonzero(unparsable)
        lowered = np.char.lower(text[candidates].astype(str))
        nan_literal = np.isin(lowered, ["nan", "+nan", "-nan"])
        unparsable[candidates[nan_literal]] = False
    return values, missing, unparsable


def _parse_path_text(text: str) -> list[str] | str:
    """Parse one ``fits_file_paths`` value; return the list of paths or a reason string."""
    if text.startswith(_LIST_MARKER):
        value = text[1:].split(_LIST_SEPARATOR) if len(text) > 1 else []
    else:
        stripped = text.strip()
        if not stripped:
            return "is empty"
        try:
            value = json.loads(stripped)
        except ValueError:
            try:  # upstream catalogues use Python list syntax: ['a.fits', 'b.fits']
                value = ast.literal_eval(stripped)
            except (ValueError, SyntaxError, MemoryError, RecursionError, TypeError):
                return "is not a list of paths"
    if not isinstance(value, (list, tuple)):
        return "is not a list of paths"
    if len(value) == 0:
        return "is an empty list"
    if not all(isinstance(v, str) and v.strip() for v in value):
        return "has an entry that is not a non-empty path string"
    return [v.strip() for v in value]


def _path_text_column(column: pa.Array) -> pa.Array:
    kind = column.type
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        joined = pc.binary_join(pc.cast(column, pa.list_(pa.string())), _LIST_SEPARATOR)
        return pc.binary_join_element_wise(_LIST_MARKER, joined, "")
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return column
    return pc.cast(column, pa.string())


def _band_text(bands: int | Sequence[str] | None) -> str:
    if isinstance(bands, int):
        return f"{bands} band{'s' if bands != 1 else ''}"
    return f"{len(bands)} band{'s' if len(bands) != 1 else ''} ({', '.join(map(str, bands))})"


def _resolve(path: str, base_dir: str) -> str:
    path = os.path.expanduser(path)
    return os.path.normpath(path if os.path.isabs(path) else os.path.join(base_dir, path))


def tile_id(paths: Sequence[str]) -> str:
    """Short stable id of a tile (tuple of absolute FITS paths): 12 hex chars of a sha1."""
    return hashlib.sha1("\0".join(paths).encode("utf-8")).hexdigest()[:12]


@dataclass
class CatalogueScan:
    """What one streaming pass over a catalogue found.

    Attributes
    ----------
    source : str or None
        The catalogue path (None for a DataFrame).
    total_rows : int
    size_column : str
        ``"diameter_pixel"`` or ``"diameter_arcsec"``.
    n_bands : int or None
        Paths per row (from the config, or the first valid row when no config was given).
    tiles : list of tuple of str
        Distinct tuples of absolute FITS paths, in order of first appearance (the tile code).
    tile_rows : list of int
        Rows per tile.
    tile_first_row : list of int
        First catalogue row of each tile (to name rows in FITS errors).
    problems : ProblemLog
    size_range, ra_range, dec_range : tuple of float or None
        (min, max) over valid rows.
    """

    source: str | None
    total_rows: int = 0
    size_column: str = "diameter_pixel"
    n_bands: int | None = None
    tiles: list = field(default_factory=list)
    tile_rows: list = field(default_factory=list)
    tile_first_row: list = field(default_factory=list)
    problems: ProblemLog = field(default_factory=ProblemLog)
    size_range: tuple | None = None
    ra_range: tuple | None = None
    dec_range: tuple | None = None

    @property
    def tile_ids(self) -> list[str]:
        return [tile_id(t) for t in self.tiles]


class _Scanner:
    """Normalises and validates raw chunks, tracking tiles and SourceID hashes across chunks."""

    def __init__(self, source, bands, size_column: str, base_dir: str) -> None:
        self.bands = bands
        self.expected_bands = (
            None if bands is None else (bands if isinstance(bands, int) else len(bands))
        )
        self.scan = CatalogueScan(
            source=None if _is_frame(source) else str(source),
            size_column=size_column,
            n_bands=self.expected_bands,
        )
        self.base_dir = base_dir
        self._tile_codes: dict[tuple, int] = {}
        self._parse_cache: dict[str, list[str] | str] = {}
        self._id_hashes: list[np.ndarray] = []
        self._first_hashed_row: int | None = None  # hash i belongs to row i + this

    @property
    def problems(self) -> ProblemLog:
        return self.scan.problems

    def _examples(self, column: pa.Array, positions: np.ndarray):
        return lambda k: column.take(pa.array(positions[:k])).to_pylist()

    def _tile_code(self, paths: list[str]) -> int:
        resolved = tuple(_resolve(p, self.base_dir) for p in paths)
        code = self._tile_codes.get(resolved)
        if code is None:
            code = len(self.scan.tiles)
            self._tile_codes[resolved] = code
            self.scan.tiles.append(resolved)
            self.scan.tile_rows.append(0)
            self.scan.tile_first_row.append(-1)
        return code

    def feed(self, raw: pa.Table) -> tuple[pa.Table, np.ndarray]:
        """Normalise and check one raw chunk.

        Returns
        -------
        table : pyarrow.Table
            Normalised columns in the spool schema (``tile_code`` -1 where the paths are bad).
        valid : ndarray of bool
            Rows without any problem.
        """
        problems = self.problems
        n_rows = raw.num_rows
        first_row = self.scan.total_rows
        rows = np.arange(first_row, first_row + n_rows, dtype=np.int64)
        valid = np.ones(n_rows, bool)

        def report(mask, column, what, fix, raw_column):
            if mask.any():
                positions = np.flatnonzero(mask)
                problems.add_rows(
                    column, what, fix, rows[positions], self._examples(raw_column, positions)
                )
                valid[positions] = False

        # SourceID: text, surrounding whitespace removed, never blank.
        raw_ids = _as_array(raw.column("SourceID"))
        ids = raw_ids if pa.types.is_string(raw_ids.type) else pc.cast(raw_ids, pa.string())
        ids = pc.utf8_trim_whitespace(ids)
        blank = arrow_tables.empty_or_null(ids)
        report(blank, "SourceID", "is empty", "give every source a unique SourceID", raw_ids)
        if self._first_hashed_row is None:
            self._first_hashed_row = first_row
        # Python's string hash (SipHash, salted per process: the hashes are only compared
        # within this scan, and equal hashes are confirmed on the strings in finish()).
        self._id_hashes.append(np.fromiter(map(hash, ids.to_pylist()), np.int64, n_rows))

        # RA, Dec, size: numbers in range.
        numbers = {}
        checks = {
            "RA": ("give RA in ICRS degrees in [0, 360) (wrap values with RA % 360)",),
            "Dec": ("give Dec in ICRS degrees in [-90, 90]",),
        }
        for name in ("RA", "Dec", self.scan.size_column):
            raw_column = _as_array(raw.column(name))
            values, missing, unparsable = _float_column(raw_column)
            numbers[name] = values
            unit = _UNITS[name]
            report(missing, name, "is empty", f"give a value in {unit} for every row", raw_column)
            report(
                unparsable, name, "is not a number", f"give a plain number in {unit}", raw_column
            )
            present = ~missing & ~unparsable
            finite = np.isfinite(values)
            report(
                present & ~finite,
                name,
                "is NaN or infinite",
                f"give a finite value in {unit} (remove or fix these rows)",
                raw_column,
            )
            with np.errstate(invalid="ignore"):
                if name == "RA":
                    bad = finite & ((values < 0.0) | (values >= 360.0))
                    report(bad, name, "is outside [0, 360)", checks[name][0], raw_column)
                elif name == "Dec":
                    bad = finite & ((values < -90.0) | (values > 90.0))
                    report(bad, name, "is outside [-90, 90]", checks[name][0], raw_column)
                else:
                    report(
                        finite & (values <= 0.0),
                        name,
                        "is zero or negative",
                        f"give a positive stamp diameter in {unit}",
                        raw_column,
                    )
                    limit = MAX_DIAMETER[name]
                    report(
                        finite & (values > limit),
                        name,
                        f"is absurdly large (> {limit:g} {unit})",
                        f"check the unit: diameters are in {unit}, at most {limit:g}",
                        raw_column,
                    )

        # fits_file_paths: factorise, parse each distinct text once, map back.
        raw_paths = _as_array(raw.column("fits_file_paths"))
        encoded = pc.dictionary_encode(_path_text_column(raw_paths))
        codes = arrow_tables.numpy_values(encoded.indices, np.int64, null_value=-1)
        uniques = encoded.dictionary.to_pylist()
        tile_of_unique = np.full(len(uniques) + 1, -1, dtype=np.int64)  # last slot: missing
        reason_of_unique = [None] * len(uniques)
        for k, text in enumerate(uniques):
            parsed = self._parse_cache.get(text)
            if parsed is None:
                if len(self._parse_cache) > _PARSE_CACHE_LIMIT:
                    self._parse_cache.clear()  # one file per source: caching does not help
                parsed = self._parse_cache[text] = _parse_path_text(text)
            if isinstance(parsed, str):
                reason_of_unique[k] = parsed
                continue
            if self.expected_bands is None:
                self.expected_bands = self.scan.n_bands = len(parsed)
            if len(parsed) != self.expected_bands:
                reason_of_unique[k] = f"has {len(parsed)} paths"
                continue
            tile_of_unique[k] = self._tile_code(parsed)
        tile_codes = tile_of_unique[codes]
        report(codes == -1, "fits_file_paths", "is empty", _PATH_FORMAT_FIX, raw_paths)
        reasons = {r for r in reason_of_unique if r is not None}
        for reason in sorted(reasons):
            bad_uniques = [k for k, r in enumerate(reason_of_unique) if r == reason]
            mask = np.isin(codes, bad_uniques)
            if reason.startswith("has ") and reason.endswith(" paths"):
                expected = (
                    f"channel_weights has {_band_text(self.bands)}"
                    if self.bands is not None
                    else f"the first valid row has {self.expected_bands}"
                )
                report(
                    mask,
                    "fits_file_paths",
                    f"{reason} but {expected}",
                    "list one FITS file per band, in the order of the channel_weights keys "
                    "(or change channel_weights to match the catalogue)",
                    raw_paths,
                )
            else:
                report(mask, "fits_file_paths", reason, _PATH_FORMAT_FIX, raw_paths)

        # Tile statistics over rows whose paths are fine.
        good_tiles = tile_codes[tile_codes >= 0]
        if good_tiles.size:
            counts = np.bincount(good_tiles, minlength=len(self.scan.tiles))
            for code in np.flatnonzero(counts):
                self.scan.tile_rows[code] += int(counts[code])
                if self.scan.tile_first_row[code] < 0:
                    self.scan.tile_first_row[code] = int(rows[np.argmax(tile_codes == code)])
        self._update_ranges(numbers, valid)

        n_rows_missing_size = np.full(n_rows, np.nan)
        table = pa.table(
            {
                "row_index": arrow_tables.numeric_array(rows, np.int64),
                "SourceID": ids,
                "RA": arrow_tables.numeric_array(numbers["RA"], np.float64),
                "Dec": arrow_tables.numeric_array(numbers["Dec"], np.float64),
                "diameter_pixel": arrow_tables.numeric_array(
                    numbers.get("diameter_pixel", n_rows_missing_size), np.float64
                ),
                "diameter_arcsec": arrow_tables.numeric_array(
                    numbers.get("diameter_arcsec", n_rows_missing_size), np.float64
                ),
                "tile_code": arrow_tables.numeric_array(tile_codes, np.int64),
            },
            schema=_SPOOL_SCHEMA,
        )
        self.scan.total_rows += n_rows
        return table, valid

    def _update_ranges(self, numbers: dict, valid: np.ndarray) -> None:
        if not valid.any():
            return
        for attr, name in (
            ("ra_range", "RA"),
            ("dec_range", "Dec"),
            ("size_range", self.scan.size_column),
        ):
            values = numbers[name][valid]
            low, high = float(values.min()), float(values.max())
            old = getattr(self.scan, attr)
            setattr(
                self.scan,
                attr,
                (low, high) if old is None else (min(old[0], low), max(old[1], high)),
            )

    def finish(self, lookup_ids: Callable[[list[int]], dict[int, str]]) -> CatalogueScan:
        """Whole-catalogue checks: not empty, SourceIDs unique. Returns the scan."""
        scan = self.scan
        if scan.total_rows == 0:
            scan.problems.add(
                f"{_describe_source(scan.source)} has a header but no data rows: add one row "
                "per source"
            )
            return scan
        hashes = np.concatenate(self._id_hashes)
        self._id_hashes = []
        order = np.argsort(hashes, kind="stable")
        sorted_hashes = hashes[order]
        same_as_previous = sorted_hashes[1:] == sorted_hashes[:-1]
        del sorted_hashes
        if not same_as_previous.any():
            return scan
        in_group = np.zeros(len(order), bool)
        in_group[1:] |= same_as_previous
        in_group[:-1] |= same_as_previous
        candidate_rows = np.sort(order[in_group]) + self._first_hashed_row
        # Only the first rows are looked up (the error shows a few); hash collisions between
        # different IDs are filtered out by comparing the real strings.
        shown_rows = candidate_rows[:200].tolist()
        ids = lookup_ids(shown_rows)
        by_id: dict[str, list[int]] = {}
        for row in shown_rows:
            by_id.setdefault(ids[row], []).append(row)
        duplicates = {k: v for k, v in by_id.items() if len(v) > 1}
        if not duplicates and len(candidate_rows) <= len(shown_rows):
            return scan
        n_extra = int(same_as_previous.sum())
        examples = "; ".join(
            f"{_short_repr(k)} at rows {', '.join(map(str, v))}"
            for k, v in list(duplicates.items())[:MAX_EXAMPLES]
        )
        more = len(duplicates) - MAX_EXAMPLES
        scan.problems.add(
            f"column 'SourceID': {n_extra} row{'s repeat' if n_extra != 1 else ' repeats'} an "
            f"earlier SourceID: {examples}"
            + (f" (and more: {more}+ further IDs)" if more > 0 else "")
            + ". Fix: make every SourceID unique (e.g. append the tile or a counter), or "
            "remove the repeated rows"
        )
        return scan


def _bands_of(cfg_or_bands) -> int | list[str] | None:
    if cfg_or_bands is None or isinstance(cfg_or_bands, int):
        return cfg_or_bands
    if isinstance(cfg_or_bands, Mapping):
        return [str(b) for b in cfg_or_bands["channel_weights"]]
    return [str(b) for b in cfg_or_bands]


def _base_dir(source) -> str:
    if _is_frame(source):
        return os.getcwd()
    return str(Path(source).resolve().parent)


def scan_catalogue(
    source: CatalogueSource,
    cfg_or_bands=None,
    chunk_rows: int = 200_000,
    on_chunk: Callable[[pa.Table, np.ndarray], None] | None = None,
) -> CatalogueScan:
    """Stream a catalogue once, validating every row and collecting its tiles.

    Parameters
    ----------
    source : path or pandas.DataFrame
        CSV or Parquet catalogue.
    cfg_or_bands : dict, int, sequence of str or None
        The validated config (its ``channel_weights`` keys are the bands), a band count, the
        band names, or None to take the band count from the first valid row.
    chunk_rows : int
        Rows per chunk (memory is proportional to it).
    on_chunk : callable, optional
        Called as ``on_chunk(table, valid)`` with each normalised chunk (spool schema) and the
        mask of its rows without problems.

    Returns
    -------
    CatalogueScan
        Problems are collected in ``scan.problems``, not raised (see :func:`raise_if_problems`).

    Raises
    ------
    CatalogueValidationError
        Only for problems that stop reading: missing file, bad header, unparsable CSV.
    """
    columns, chunks = _open_raw(source, chunk_rows)
    size_column = check_columns(columns, None if _is_frame(source) else source)
    scanner = _Scanner(source, _bands_of(cfg_or_bands), size_column, _base_dir(source))
    for raw in chunks:
        table, valid = scanner.feed(raw)
        if on_chunk is not None:
            on_chunk(table, valid)

    def lookup_ids(rows: list[int]) -> dict[int, str]:
        wanted = set(rows)
        found: dict[int, str] = {}
        start = 0
        for chunk in iter_catalogue(source, chunk_rows, _bands=scanner.bands):
            stop = start + len(chunk)
            hits = [r for r in wanted if start <= r < stop]
            for row in hits:
                found[row] = chunk["SourceID"].iloc[row - start]
            start = stop
            if len(found) == len(wanted):
                break
        return found

    return scanner.finish(lookup_ids)


def raise_if_problems(problems: ProblemLog, source) -> None:
    """Raise one CatalogueValidationError listing every collected problem, if any."""
    if problems:
        raise CatalogueValidationError(problems.format(_error_title(source)))


# --------------------------------------------------------------------------------------------
# Public streaming and validation API
# --------------------------------------------------------------------------------------------


def spool_table_to_frame(table: pa.Table, tiles: Sequence[tuple]) -> pd.DataFrame:
    """Turn a normalised chunk (spool schema, with ``tile_code``) into the public DataFrame."""
    frame = table.drop_columns(["tile_code"]).to_pandas()
    codes = table.column("tile_code").to_numpy()
    path_lists = np.empty(len(tiles) + 1, dtype=object)
    for code, paths in enumerate(tiles):
        path_lists[code] = list(paths)
    path_lists[-1] = None  # code -1: invalid path list
    frame.insert(4, "fits_file_paths", path_lists[codes])
    return frame


def iter_catalogue(
    path: CatalogueSource,
    chunk_rows: int = 200_000,
    *,
    _bands=None,
) -> Iterator[pd.DataFrame]:
    """Stream a catalogue as normalised DataFrames.

    Parameters
    ----------
    path : str, Path or pandas.DataFrame
        CSV (UTF-8 with or without BOM, quoted header names, LF or CRLF line ends) or Parquet
        (``fits_file_paths`` as a list column or as list text).
    chunk_rows : int
        Largest number of rows per yielded DataFrame.

    Yields
    ------
    pandas.DataFrame
        Columns ``row_index, SourceID, RA, Dec, fits_file_paths, diameter_pixel,
        diameter_arcsec`` (see the module docstring). Values that cannot be parsed become NaN
        (numbers) or None (path lists); use :func:`validate_catalogue_chunk` or
        :func:`scan_catalogue` to have them reported.

    Raises
    ------
    CatalogueValidationError
        For a missing file, a header without the required columns, or unparsable CSV.
    """
    columns, chunks = _open_raw(path, chunk_rows)
    size_column = check_columns(columns, None if _is_frame(path) else path)
    scanner = _Scanner(path, _bands, size_column, _base_dir(path))
    for raw in chunks:
        table, _ = scanner.feed(raw)
        yield spool_table_to_frame(table, scanner.scan.tiles)


def normalise_columns(df: pd.DataFrame, first_row: int = 0, path=None) -> pd.DataFrame:
    """Normalise the columns of an in-memory catalogue (no validation errors raised).

    Parameters
    ----------
    df : pandas.DataFrame
        Raw catalogue rows.
    first_row : int
        Catalogue row of ``df``'s first row (``row_index`` starts there).
    path : path, optional
        File the rows came from: relative FITS paths are resolved against its directory.

    Returns
    -------
    pandas.DataFrame
        Normalised columns as yielded by :func:`iter_catalogue`.
    """
    size_column = check_columns([str(c) for c in df.columns], path)
    base = str(Path(path).resolve().parent) if path is not None else os.getcwd()
    scanner = _Scanner(df, None, size_column, base)
    scanner.scan.total_rows = first_row
    wanted = [c for c in df.columns if c in REQUIRED_COLUMNS + SIZE_COLUMNS]
    table, _ = scanner.feed(_frame_to_raw_table(df[wanted]))
    return spool_table_to_frame(table, scanner.scan.tiles)


def validate_catalogue_chunk(
    df: pd.DataFrame,
    n_bands: int | Sequence[str] | None,
    first_row: int = 0,
    path=None,
) -> pd.DataFrame:
    """Validate catalogue rows held in memory and return them normalised.

    Parameters
    ----------
    df : pandas.DataFrame
        Raw (or already normalised) catalogue rows.
    n_bands : int, sequence of str or None
        Paths expected per row: a count, the band names (``channel_weights`` keys, named in
        messages) or None to require the length of the first valid row.
    first_row : int
        Catalogue row of ``df``'s first row, used in messages.
    path : path, optional
        File the rows came from (named in messages; relative FITS paths resolve against its
        directory).

    Returns
    -------
    pandas.DataFrame
        The normalised rows (see :func:`iter_catalogue`).

    Raises
    ------
    CatalogueValidationError
        Listing every problem: rows, column, bad value and fix. SourceIDs must be unique
        within ``df`` (:func:`scan_catalogue` checks across a whole file).
    """
    size_column = check_columns([str(c) for c in df.columns], path)
    if len(df) == 0:
        raise CatalogueValidationError(
            f"{_describe_source(path)} has no data rows: add one row per source"
        )
    base = str(Path(path).resolve().parent) if path is not None else os.getcwd()
    scanner = _Scanner(path if path is not None else df, n_bands, size_column, base)
    scanner.scan.total_rows = first_row
    frame = df.drop(columns=["row_index"], errors="ignore")
    wanted = [c for c in frame.columns if c in REQUIRED_COLUMNS + SIZE_COLUMNS]
    table, _ = scanner.feed(_frame_to_raw_table(frame[wanted]))
    ids = table.column("SourceID").to_pandas()
    scanner.finish(
        lambda rows: {row: ids.iloc[row - first_row] for row in rows},
    )
    raise_if_problems(scanner.problems, path)
    return spool_table_to_frame(table, scanner.scan.tiles)


# --------------------------------------------------------------------------------------------
# Splitting into batches
# --------------------------------------------------------------------------------------------


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _batch_content_id(batch: pa.Table, paths: Sequence[str]) -> str:
    """First 10 hex chars of a sha256 over the batch's SourceIDs, positions, paths and sizes."""
    digest = hashlib.sha256()
    digest.update("\0".join(paths).encode("utf-8") + b"\0\0")
    digest.update("\0".join(batch.column("SourceID").to_pylist()).encode("utf-8") + b"\0\0")
    for name in ("RA", "Dec", "diameter_pixel", "diameter_arcsec"):
        values = arrow_tables.numpy_values(batch.column(name), np.dtype("<f8"))
        digest.update(np.ascontiguousarray(values).tobytes())
    return digest.hexdigest()[:10]


def _batch_sizes(n_rows: int, limit: int) -> list[int]:
    """Split ``n_rows`` into ceil(n/limit) batches of nearly equal size (each <= limit)."""
    n_batches = max(1, math.ceil(n_rows / limit))
    base, extra = divmod(n_rows, n_batches)
    return [base + 1] * extra + [base] * (n_batches - extra)


class _Spool:
    """Rows bucketed by tile code into temporary Parquet files (bounded memory)."""

    def __init__(self, directory: Path, n_buckets: int = N_SPOOL_BUCKETS) -> None:
        self.directory = directory
        self.n_buckets = n_buckets
        self.writers: dict[int, pq.ParquetWriter] = {}

    def path(self, bucket: int) -> Path:
        return self.directory / f"bucket_{bucket:03d}.parquet"

    def write(self, table: pa.Table) -> None:
        buckets = arrow_tables.numpy_values(table.column("tile_code"), np.int64) % self.n_buckets
        order = np.argsort(buckets, kind="stable")
        sorted_buckets = buckets[order]
        table = table.take(arrow_tables.numeric_array(order, np.int64))
        present = np.unique(sorted_buckets)
        starts = np.searchsorted(sorted_buckets, present, side="left")
        stops = np.searchsorted(sorted_buckets, present, side="right")
        for bucket, start, stop in zip(present.tolist(), starts, stops, strict=True):
            writer = self.writers.get(bucket)
            if writer is None:
                writer = self.writers[bucket] = pq.ParquetWriter(
                    self.path(bucket), _SPOOL_SCHEMA, compression="none"
                )
            writer.write_table(table.slice(start, stop - start))

    def close(self) -> list[int]:
        for writer in self.writers.values():
            writer.close()
        return sorted(self.writers)


_SORT_KEYS = [
    ("tile_code", "ascending"),
    ("Dec", "ascending"),
    ("RA", "ascending"),
    ("row_index", "ascending"),
]


def _sorted_runs(spool_path: Path, max_rows: int) -> Iterator[tuple[pa.Table, pa.Array]]:
    """Yield ``(table, order)`` pieces of one spool bucket sorted by (tile, Dec, RA, row).

    A bucket of at most ``max_rows`` rows is one piece. A larger one (a catalogue dominated by
    a few tiles) is first cut into Dec slabs of about ``max_rows / 2`` rows at Dec quantiles,
    each sorted on its own: because a slab holds every row within its Dec range, concatenating
    a tile's rows over the slabs in order gives the same order as one global sort, while only
    one slab is in memory at a time.
    """
    parquet = pq.ParquetFile(spool_path)
    n_rows = parquet.metadata.num_rows
    slab_paths = [spool_path]
    if n_rows > max_rows:
        dec = arrow_tables.numpy_values(parquet.read(columns=["Dec"]).column("Dec"), np.float64)
        n_slabs = math.ceil(2 * n_rows / max_rows)
        edges = np.unique(np.quantile(dec, np.linspace(0, 1, n_slabs + 1)[1:-1]))
        del dec
        slab_paths = [
            spool_path.with_name(f"{spool_path.stem}_slab{k:04d}.parquet")
            for k in range(len(edges) + 1)
        ]
        writers = {}
        for batch in parquet.iter_batches(batch_size=200_000):
            table = pa.Table.from_batches([batch])
            # side="right": equal Dec values share a slab, so ties keep the global order.
            dec = arrow_tables.numpy_values(table.column("Dec"), np.float64)
            slab = np.searchsorted(edges, dec, side="right")
            for k in np.unique(slab).tolist():
                if k not in writers:
                    writers[k] = pq.ParquetWriter(slab_paths[k], _SPOOL_SCHEMA, compression="none")
                writers[k].write_table(table.filter(arrow_tables.boolean_array(slab == k)))
        for writer in writers.values():
            writer.close()
        parquet.close()
        spool_path.unlink()
        slab_paths = [slab_paths[k] for k in sorted(writers)]
    for path in slab_paths:
        # One contiguous chunk: taking rows from a many-chunk table costs O(chunks) per take.
        table = arrow_tables.read_table(path).combine_chunks()
        yield table, pc.sort_indices(table, sort_keys=_SORT_KEYS)
        del table
        path.unlink()


class _TileLocator:
    """Where a batch's sources lie in each image of its tile, and how to read those images.

    For every band: the sources' pixel positions (the WCS call a cutout job would make) and the
    image's :func:`cutana.fits_io.image_layout`, both from the descriptions the file checks
    took while each file was open (:func:`cutana.inputs_check.check_tile_files`), so no file
    is opened again. Stored with the batch, they let the cutout job read the images without
    importing astropy (~0.5 s of every job's start-up).
    """

    def __init__(self, cfg: Mapping, descriptions: Mapping[tuple[str, object], tuple]) -> None:
        from .config import band_extensions

        self.extensions = band_extensions(cfg)
        self.descriptions = descriptions

    def locate(
        self, paths: Sequence[str], ra: np.ndarray, dec: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, list[dict]] | None:
        """(N, B) x and y positions and one layout per band; None if an image has none."""
        xs, ys, layouts = [], [], []
        for path, extension in zip(paths, self.extensions, strict=True):
            wcs, layout = self.descriptions.get((path, extension), (None, None))
            if layout is None:
                return None
            try:
                x, y = wcs.all_world2pix(ra, dec, 0, quiet=True)
            except Exception:  # noqa: BLE001 - the job opens the image itself and reports why
                return None
            xs.append(np.asarray(x, dtype=np.float64))
            ys.append(np.asarray(y, dtype=np.float64))
            layouts.append({**layout, "path": path})  # the exact string the rows name
        return np.stack(xs, axis=1), np.stack(ys, axis=1), layouts


def _list_column(values: np.ndarray | None, n_rows: int) -> pa.Array:
    """A list<double> column of the rows of ``values`` (N, B), or all null."""
    if values is None:
        return pa.nulls(n_rows, pa.list_(pa.float64()))
    n_bands = values.shape[1]
    offsets = arrow_tables.numeric_array(np.arange(0, (n_rows + 1) * n_bands, n_bands), np.int32)
    return pa.ListArray.from_arrays(
        offsets, arrow_tables.numeric_array(values.reshape(-1), np.float64)
    )


def _repeated_path_list(paths: Sequence[str], n_rows: int) -> pa.Array:
    """A list<string> column holding ``paths`` in each of ``n_rows`` rows."""
    n_bands = len(paths)
    offsets = arrow_tables.numeric_array(np.arange(0, (n_rows + 1) * n_bands, n_bands), np.int32)
    return pa.ListArray.from_arrays(offsets, arrow_tables.string_array(list(paths) * n_rows))


class _BatchWriter:
    """Cuts each tile's sorted rows into its predetermined batches and writes them."""

    def __init__(
        self,
        scan: CatalogueScan,
        batch_limit: int,
        out_dir: Path,
        locator: _TileLocator | None = None,
    ) -> None:
        self.scan = scan
        self.locator = locator
        self.out_dir = out_dir
        self.tile_ids = scan.tile_ids
        if len(set(self.tile_ids)) != len(self.tile_ids):  # 48-bit ids: practically impossible
            raise CutanaError("two different tiles got the same short id; please report this")
        self.sizes = [_batch_sizes(n, batch_limit) for n in scan.tile_rows]
        counts = [len(sizes) for sizes in self.sizes]
        self.first_index = np.concatenate([[0], np.cumsum(counts)]).astype(int).tolist()
        self.pending: dict[int, list[pa.Table]] = {}
        self.pending_rows: dict[int, int] = {}
        self.next_batch: dict[int, int] = {}
        self.entries: list[dict] = []

    def add(self, code: int, rows: pa.Table) -> None:
        """Append sorted rows of tile ``code``; write every batch that becomes complete."""
        offset = 0
        while offset < rows.num_rows:
            k = self.next_batch.get(code, 0)
            have = self.pending_rows.get(code, 0)
            n_take = min(self.sizes[code][k] - have, rows.num_rows - offset)
            self.pending.setdefault(code, []).append(rows.slice(offset, n_take))
            self.pending_rows[code] = have + n_take
            offset += n_take
            if self.pending_rows[code] == self.sizes[code][k]:
                self._write(code, k, pa.concat_tables(self.pending.pop(code)))
                self.pending_rows[code] = 0
                self.next_batch[code] = k + 1

    def _write(self, code: int, k: int, rows: pa.Table) -> None:
        size = rows.num_rows
        paths = list(self.scan.tiles[code])
        missing_size = pa.nulls(size, pa.float64())  # the size column the catalogue lacks
        has_pixel = self.scan.size_column == "diameter_pixel"
        located = None
        if self.locator is not None:
            ra = arrow_tables.numpy_values(rows.column("RA"), np.float64)
            dec = arrow_tables.numpy_values(rows.column("Dec"), np.float64)
            located = self.locator.locate(paths, ra, dec)
        positions = (None, None) if located is None else located[:2]
        schema = BATCH_SCHEMA
        if located is not None:  # the images' layouts: with the positions, no astropy in jobs
            schema = schema.with_metadata({LAYOUTS_METADATA_KEY: json.dumps(located[2])})
        batch = pa.table(
            {
                "row_index": rows.column("row_index"),
                "SourceID": rows.column("SourceID"),
                "RA": rows.column("RA"),
                "Dec": rows.column("Dec"),
                "fits_file_paths": _repeated_path_list(paths, size),
                "diameter_pixel": rows.column("diameter_pixel") if has_pixel else missing_size,
                "diameter_arcsec": missing_size if has_pixel else rows.column("diameter_arcsec"),
                "tile": arrow_tables.repeated_string(self.tile_ids[code], size),
                **{
                    column: _list_column(values, size)
                    for column, values in zip(POSITION_COLUMNS, positions, strict=True)
                },
            },
            schema=schema,
        ).combine_chunks()
        index = self.first_index[code] + k
        content_id = _batch_content_id(batch, paths)
        name = f"{index:05d}_{content_id}"
        pq.write_table(batch, self.out_dir / f"{name}.parquet")
        self.entries.append(
            {
                "name": name,
                "index": index,
                "id": content_id,
                "n_sources": size,
                "tile": self.tile_ids[code],
            }
        )


def _write_batches(
    spool: _Spool,
    scan: CatalogueScan,
    batch_limit: int,
    out_dir: Path,
    locator: _TileLocator | None = None,
) -> list[dict]:
    writer = _BatchWriter(scan, batch_limit, out_dir, locator)
    for bucket in spool.close():
        for table, order in _sorted_runs(spool.path(bucket), MAX_SORT_ROWS):
            codes = arrow_tables.numpy_values(table.column("tile_code").take(order), np.int64)
            present = np.unique(codes)
            starts = np.searchsorted(codes, present, side="left")
            stops = np.searchsorted(codes, present, side="right")
            for code, start, stop in zip(present.tolist(), starts, stops, strict=True):
                writer.add(code, table.take(order.slice(int(start), int(stop - start))))
    if writer.pending_rows and any(writer.pending_rows.values()):
        raise CutanaError("internal error: rows left over after cutting batches")
    return sorted(writer.entries, key=lambda e: e["index"])


def _replace_dir(new: Path, target: Path) -> None:
    if target.exists():
        trash = target.with_name(f"{target.name}.old-{os.getpid()}")
        target.rename(trash)
        new.rename(target)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        new.rename(target)


def split_catalogue(
    path: CatalogueSource,
    cfg: Mapping,
    work_dir: str | os.PathLike,
    chunk_rows: int = 200_000,
    check_files: bool = True,
) -> dict:
    """Validate a catalogue and split it into batch files grouped by tile.

    One streaming pass validates every row (SPEC §5) and spools the rows by tile to temporary
    Parquet files; then, if ``check_files``, every distinct FITS file is checked
    (:func:`cutana.inputs_check.check_tile_files`). Only when everything is valid are the
    batches written: each tile's rows are sorted by Dec then RA and cut into nearly equal
    batches of at most ``cfg["N_batch_cutout_process"]`` rows.

    Parameters
    ----------
    path : str, Path or pandas.DataFrame
        The catalogue. Relative FITS paths in it are resolved against its directory.
    cfg : dict
        Validated configuration (:func:`cutana.config.validate_config`).
    work_dir : path
        Receives ``batches/{index:05d}_{id}.parquet`` and ``batches/manifest.json`` (see
        docs/DESIGN.md). The folder is built under a temporary name and renamed at the end,
        so it is either complete or absent (an older ``batches`` folder is replaced).
    chunk_rows : int
        Rows per streamed chunk.
    check_files : bool
        Also check the FITS files (existence, readable image, celestial WCS, flux keyword,
        consistent pixel scales) before writing anything.

    Returns
    -------
    dict
        The manifest (also written to ``batches/manifest.json``).

    Raises
    ------
    CatalogueValidationError
        Listing every catalogue problem (and FITS problems found alongside).
    FitsValidationError
        Listing every FITS problem when the catalogue itself is fine.
    """
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{os.urandom(3).hex()}"
    spool_dir = work_dir / f".spool-{tag}"
    staging = work_dir / f".batches-{tag}"
    spool_dir.mkdir()
    try:
        spool = _Spool(spool_dir)
        problems_seen = [False]

        def on_chunk(table: pa.Table, valid: np.ndarray) -> None:
            # After the first problem the run will fail: keep validating, stop spooling.
            if problems_seen[0] or not valid.all():
                problems_seen[0] = True
                return
            spool.write(table)

        scan = scan_catalogue(path, cfg, chunk_rows=chunk_rows, on_chunk=on_chunk)
        spool.close()
        source = None if _is_frame(path) else path
        locator = None
        if check_files:
            from .inputs_check import check_tile_files, raise_input_problems

            file_problems, _, descriptions = check_tile_files(scan, cfg, describe=True)
            raise_input_problems(scan.problems, file_problems, source)
            # Each batch also gets its sources' pixel positions and its images' layouts, so
            # the cutout jobs need no astropy.
            locator = _TileLocator(cfg, descriptions)
        else:
            raise_if_problems(scan.problems, source)

        staging.mkdir()
        entries = _write_batches(spool, scan, int(cfg["N_batch_cutout_process"]), staging, locator)
        manifest = {
            "total_rows": scan.total_rows,
            "batches": entries,
            "tiles": {
                tid: list(paths) for tid, paths in zip(scan.tile_ids, scan.tiles, strict=True)
            },
            "tile_rows": dict(zip(scan.tile_ids, scan.tile_rows, strict=True)),
            "size_column": scan.size_column,
            "bands": [str(b) for b in cfg["channel_weights"]],
            "n_batch_max": int(cfg["N_batch_cutout_process"]),
            "catalogue": None if source is None else str(Path(source).resolve()),
            "catalogue_sha256": None if source is None else _file_sha256(Path(source)),
            "catalogue_size": None if source is None else Path(source).stat().st_size,
        }
        with open(staging / "manifest.json", "w", encoding="utf-8") as handle:
            json.dump(manifest, handle, indent=1)
            handle.write("\n")
        _replace_dir(staging, work_dir / "batches")
        return manifest
    finally:
        shutil.rmtree(spool_dir, ignore_errors=True)
        shutil.rmtree(staging, ignore_errors=True)
