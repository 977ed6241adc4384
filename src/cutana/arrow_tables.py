"""Columns in and out of Arrow tables without pandas, for the cutout job's start-up.

The column readers also take a DataFrame, so callers handle both kinds of table alike.


pyarrow imports pandas (~0.25 s) the first time it converts between Arrow and Python or NumPy
through ``pa.array``, ``pq.read_table`` or ``ChunkedArray.to_numpy``, only to recognise pandas
objects. A cutout job has none, so it reads and writes its tables through the calls below, which
build arrays from buffers and read values as Python lists. Where pandas is loaded anyway this
changes nothing. ``tests/test_engine.py`` checks that a job's process never imports pandas.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def read_table(path: str | os.PathLike) -> pa.Table:
    """Read a Parquet file (``pq.read_table`` without its pandas import)."""
    return pq.ParquetFile(path).read()


def float_column(table, name: str) -> np.ndarray:
    """Column ``name`` of a pyarrow Table or a DataFrame as float64.

    NaN for nulls and values that are no number; all NaN when the column is absent.
    """
    if not isinstance(table, pa.Table):  # a DataFrame: pandas is loaded by whoever made it
        import pandas as pd

        if name not in table:
            return np.full(len(table), np.nan)
        return pd.to_numeric(table[name], errors="coerce").to_numpy(
            dtype=np.float64, na_value=np.nan
        )
    if name not in table.column_names:
        return np.full(table.num_rows, np.nan)
    values = []
    for value in table[name].to_pylist():
        try:
            values.append(math.nan if value is None else float(value))
        except (TypeError, ValueError):
            values.append(math.nan)
    return np.array(values, dtype=np.float64)


def int_column(table, name: str) -> np.ndarray:
    """Column ``name`` of a pyarrow Table or a DataFrame as int64 (no nulls allowed)."""
    if isinstance(table, pa.Table) and pa.types.is_integer(table[name].type):
        return numpy_values(table[name], np.int64)
    return np.array(values_of(table, name), dtype=np.int64)


def text_column(table, name: str) -> np.ndarray:
    """Column ``name`` of a pyarrow Table or a DataFrame as an object array of str.

    Nulls of an Arrow table become ""; a DataFrame's values are converted with ``str``.
    """
    return np.array(["" if v is None else str(v) for v in values_of(table, name)], dtype=object)


def values_of(table, name: str) -> list:
    """Column ``name`` of a pyarrow Table or a DataFrame as a list of Python values."""
    if isinstance(table, pa.Table):
        return table[name].to_pylist()
    return table[name].tolist()


def has_column(table, name: str) -> bool:
    """Whether a pyarrow Table or a DataFrame has column ``name``."""
    return name in (table.column_names if isinstance(table, pa.Table) else table.columns)


def n_rows(table) -> int:
    """Rows of a pyarrow Table or a DataFrame."""
    return table.num_rows if isinstance(table, pa.Table) else len(table)


def numeric_array(values: np.ndarray, dtype) -> pa.Array:
    """An Arrow array of ``values`` (a numeric ``dtype``, no nulls) built from their buffer."""
    values = np.ascontiguousarray(values, dtype=dtype)
    arrow_type = pa.from_numpy_dtype(values.dtype)
    return pa.Array.from_buffers(arrow_type, len(values), [None, pa.py_buffer(values)])


def string_array(values) -> pa.Array:
    """An Arrow string array of ``values`` (each converted with ``str``)."""
    encoded = [str(v).encode("utf-8") for v in values]
    lengths = np.fromiter((len(e) for e in encoded), dtype=np.int64, count=len(encoded))
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    data = pa.py_buffer(b"".join(encoded))
    if offsets[-1] < 2**31:
        return pa.Array.from_buffers(
            pa.string(), len(encoded), [None, pa.py_buffer(offsets.astype(np.int32)), data]
        )
    return pa.Array.from_buffers(
        pa.large_string(), len(encoded), [None, pa.py_buffer(offsets), data]
    )


def boolean_array(mask: np.ndarray) -> pa.Array:
    """An Arrow boolean array of ``mask`` (no nulls) built from its bit-packed buffer."""
    mask = np.asarray(mask, dtype=bool)
    bits = np.packbits(mask, bitorder="little")
    return pa.Array.from_buffers(pa.bool_(), len(mask), [None, pa.py_buffer(bits)])


def repeated_string(value: str, n: int) -> pa.Array:
    """An Arrow string array of ``n`` times ``value``."""
    encoded = value.encode("utf-8")
    offsets = np.arange(n + 1, dtype=np.int64) * len(encoded)
    if offsets[-1] < 2**31:
        offsets = offsets.astype(np.int32)
        kind = pa.string()
    else:
        kind = pa.large_string()
    return pa.Array.from_buffers(kind, n, [None, pa.py_buffer(offsets), pa.py_buffer(encoded * n)])


def numpy_values(column, dtype, null_value=None) -> np.ndarray:
    """An integer or float column (Array or ChunkedArray) as a NumPy array of ``dtype``.

    Chunks are read from their buffers (no pandas import). Nulls become ``null_value`` when it
    is given, else NaN for a float ``dtype``; otherwise the chunk is read value by value and its
    nulls raise. The result is a new, writable array.
    """
    parts = []
    for chunk in _chunks(column):
        kind = chunk.type
        floating = pa.types.is_floating(kind)
        if chunk.null_count and (null_value is not None or np.dtype(dtype).kind == "f"):
            # The same values without their validity bitmap (the slots of nulls hold
            # arbitrary numbers), read from the buffer, then the nulls overwritten.
            unmasked = pa.Array.from_buffers(
                kind, len(chunk), [None, *chunk.buffers()[1:]], offset=chunk.offset
            )
            values = numpy_values(unmasked, dtype)
            values[~_validity(chunk)] = np.nan if null_value is None else null_value
            parts.append(values)
        elif chunk.null_count == 0 and (pa.types.is_integer(kind) or floating):
            letter = (
                "f"
                if pa.types.is_floating(kind)
                else ("i" if pa.types.is_signed_integer(kind) else "u")
            )
            stored = np.dtype(f"<{letter}{kind.bit_width // 8}")
            values = np.frombuffer(
                chunk.buffers()[1],
                dtype=stored,
                count=len(chunk),
                offset=chunk.offset * stored.itemsize,
            )
            parts.append(values.astype(dtype, copy=False))
        else:
            values = chunk.to_pylist()
            if np.dtype(dtype).kind == "f":
                values = [math.nan if v is None else v for v in values]
            parts.append(np.array(values, dtype=dtype))
    if len(parts) == 1:  # a view of Arrow's read-only buffer: callers get their own array
        return np.array(parts[0], dtype=dtype)
    return np.concatenate(parts) if parts else np.empty(0, dtype=dtype)


def _validity(chunk: pa.Array) -> np.ndarray:
    """True where ``chunk`` holds a value (not null), from its validity bitmap."""
    bitmap = chunk.buffers()[0]
    if bitmap is None or chunk.null_count == 0:
        return np.ones(len(chunk), bool)
    bits = np.unpackbits(np.frombuffer(bitmap, np.uint8), bitorder="little")
    return bits[chunk.offset : chunk.offset + len(chunk)].astype(bool)


def _chunks(column) -> list[pa.Array]:
    return column.chunks if isinstance(column, pa.ChunkedArray) else [column]


def _joined(parts: list[np.ndarray], dtype) -> np.ndarray:
    return np.concatenate(parts) if parts else np.empty(0, dtype=dtype)


def null_mask(column) -> np.ndarray:
    """True where an Arrow Array or ChunkedArray is null."""
    return _joined([~_validity(chunk) for chunk in _chunks(column)], bool)


def string_lengths(column) -> np.ndarray:
    """Bytes of every value of a string Array or ChunkedArray (0 for nulls), as int64."""
    parts = []
    for chunk in _chunks(column):
        width = np.int64 if pa.types.is_large_string(chunk.type) else np.int32
        offsets = np.frombuffer(
            chunk.buffers()[1],
            dtype=width,
            count=len(chunk) + 1,
            offset=chunk.offset * np.dtype(width).itemsize,
        )
        lengths = np.diff(offsets).astype(np.int64)
        if chunk.null_count:
            lengths[~_validity(chunk)] = 0
        parts.append(lengths)
    return _joined(parts, np.int64)


def empty_or_null(column) -> np.ndarray:
    """True where a string Array or ChunkedArray is null or the empty string."""
    return null_mask(column) | (string_lengths(column) == 0)


def table_of(columns: dict[str, pa.Array]) -> pa.Table:
    """A table of named Arrow arrays, in order."""
    return pa.Table.from_arrays(list(columns.values()), names=list(columns))
