"""cutana.arrow_tables: Arrow columns to NumPy and back from buffers, nulls, slices and chunks
included, checked against pyarrow's own conversions."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from cutana import arrow_tables


def chunked(values, kind):
    """A sliced two-chunk column of ``values`` (None: null), so offsets and bitmaps matter."""
    whole = pa.array([None, *values, None], kind)
    middle = len(values) // 2 + 1
    return pa.chunked_array(
        [whole.slice(1, middle - 1), whole.slice(middle, len(values) - middle + 1)]
    )


@pytest.mark.parametrize("kind", [pa.int32(), pa.int64(), pa.float32(), pa.float64()])
def test_numpy_values_match_pyarrow_with_nulls(kind):
    values = [3, None, 7, 1, None, 9, 4]
    column = chunked(values, kind)
    expected = np.array([np.nan if v is None else v for v in values])
    np.testing.assert_array_equal(arrow_tables.numpy_values(column, np.float64), expected)
    as_int = arrow_tables.numpy_values(column, np.int64, null_value=-1)
    np.testing.assert_array_equal(as_int, [-1 if v is None else v for v in values])
    assert as_int.flags.writeable
    np.testing.assert_array_equal(arrow_tables.null_mask(column), [v is None for v in values])


def test_integer_nulls_without_a_null_value_raise():
    with pytest.raises(TypeError):
        arrow_tables.numpy_values(pa.array([1, None], pa.int64()), np.int64)


def test_string_lengths_and_blanks_match_pyarrow():
    words = ["ab", None, "", "ééé", "x", None, "  "]
    column = chunked(words, pa.string())
    np.testing.assert_array_equal(
        arrow_tables.string_lengths(column),
        [0 if w is None else len(w.encode()) for w in words],
    )
    np.testing.assert_array_equal(
        arrow_tables.empty_or_null(column), [w is None or w == "" for w in words]
    )
    large = pc.cast(column, pa.large_string())
    np.testing.assert_array_equal(
        arrow_tables.string_lengths(large), arrow_tables.string_lengths(column)
    )
