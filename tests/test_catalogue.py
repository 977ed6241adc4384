"""Catalogue streaming and validation: every bad input of SPEC §5 is reported with its row(s),
column, bad value and fix; good variants (BOM, quoted header, CRLF, Parquet lists, JSON or
Python list text) are accepted and normalised."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from cutana import catalogue as cat
from cutana.catalogue_preprocessor import (
    CatalogueValidationError,
    analyse_catalogue,
    load_and_validate_catalogue,
)
from cutana.config import validate_config

HEADER = ["SourceID", "RA", "Dec", "diameter_pixel", "fits_file_paths"]
GOOD_ROW = ["S0", "150.5", "2.25", "64", "['/d/vis.fits']"]


def write_csv(path: Path, header, rows, bom=False, quote_all=False, crlf=False) -> Path:
    with open(path, "w", newline="", encoding="utf-8-sig" if bom else "utf-8") as handle:
        writer = csv.writer(
            handle,
            quoting=csv.QUOTE_ALL if quote_all else csv.QUOTE_MINIMAL,
            lineterminator="\r\n" if crlf else "\n",
        )
        writer.writerow(header)
        writer.writerows(rows)
    return path


def rows_with(column: str, bad_value: str, n_good: int = 3) -> list[list[str]]:
    """``n_good`` good rows then one row whose ``column`` holds ``bad_value`` (row n_good)."""
    rows = [[f"S{i}", *GOOD_ROW[1:]] for i in range(n_good)]
    bad = [f"S{n_good}", *GOOD_ROW[1:]]
    bad[HEADER.index(column)] = bad_value
    return rows + [bad]


def validation_message(path: Path, bands=("VIS",), chunk_rows: int = 200_000) -> str:
    scan = cat.scan_catalogue(path, list(bands), chunk_rows=chunk_rows)
    with pytest.raises(CatalogueValidationError) as info:
        cat.raise_if_problems(scan.problems, path)
    return str(info.value)


# (case id, column, bad value, expected fragments). The bad row is row 3 of the catalogue.
VALUE_CASES = [
    ("RA not a number", "RA", "abc", ["column 'RA'", "not a number", "row 3 = 'abc'", "Fix:"]),
    ("RA 360", "RA", "360", ["column 'RA'", "outside [0, 360)", "row 3 = '360'", "RA % 360"]),
    ("RA negative", "RA", "-0.5", ["outside [0, 360)", "row 3 = '-0.5'"]),
    ("RA empty", "RA", "", ["column 'RA'", "is empty", "row 3 = ''"]),
    ("RA inf", "RA", "inf", ["column 'RA'", "NaN or infinite", "row 3 = 'inf'"]),
    ("Dec 91", "Dec", "91", ["column 'Dec'", "outside [-90, 90]", "row 3 = '91'"]),
    ("Dec NaN", "Dec", "NaN", ["column 'Dec'", "NaN or infinite", "row 3 = 'NaN'"]),
    ("Dec text", "Dec", "+2d15m", ["column 'Dec'", "not a number", "'+2d15m'"]),
    ("size zero", "diameter_pixel", "0", ["'diameter_pixel'", "zero or negative", "row 3 = '0'"]),
    ("size negative", "diameter_pixel", "-8", ["zero or negative", "row 3 = '-8'"]),
    ("size absurd", "diameter_pixel", "2e6", ["absurdly large (> 100000 pixels)", "'2e6'"]),
    ("size empty", "diameter_pixel", "", ["'diameter_pixel'", "is empty", "row 3 = ''"]),
    ("size nan", "diameter_pixel", "nan", ["'diameter_pixel'", "NaN or infinite"]),
    ("size text", "diameter_pixel", "big", ["'diameter_pixel'", "not a number", "'big'"]),
    ("SourceID empty", "SourceID", "  ", ["column 'SourceID'", "is empty", "row 3"]),
    (
        "paths unparsable",
        "fits_file_paths",
        "['/d/vis.fits'",
        ["'fits_file_paths'", "not a list of paths", "row 3 = \"['/d/vis.fits'\"", "JSON"],
    ),
    ("paths not a list", "fits_file_paths", "/d/vis.fits", ["not a list of paths"]),
    ("paths empty text", "fits_file_paths", "", ["'fits_file_paths'", "is empty", "row 3"]),
    ("paths empty list", "fits_file_paths", "[]", ["is an empty list", "row 3 = '[]'"]),
    ("paths not strings", "fits_file_paths", "[1]", ["not a non-empty path string"]),
    (
        "paths code injection",
        "fits_file_paths",
        "__import__('os').getcwd()",
        ["not a list of paths"],
    ),
    (
        "paths too many",
        "fits_file_paths",
        '["/d/a.fits", "/d/b.fits"]',
        ["has 2 paths but channel_weights has 1 band (VIS)", "row 3", "one FITS file per band"],
    ),
]


@pytest.mark.parametrize(
    "column, bad_value, fragments", [c[1:] for c in VALUE_CASES], ids=[c[0] for c in VALUE_CASES]
)
def test_bad_value_is_reported(tmp_path, column, bad_value, fragments):
    path = write_csv(tmp_path / "cat.csv", HEADER, rows_with(column, bad_value))
    message = validation_message(path)
    assert "cat.csv" in message and "line r + 2" in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    assert "row 0" not in message  # good rows are not blamed


def test_arcsec_size_limit(tmp_path):
    header = [*HEADER[:3], "diameter_arcsec", HEADER[4]]
    path = write_csv(tmp_path / "cat.csv", header, [GOOD_ROW, ["S1", "1", "1", "4000", "['a']"]])
    message = validation_message(path)
    assert "column 'diameter_arcsec'" in message and "> 3600 arcsec" in message
    assert "row 1 = '4000'" in message


# (case id, header, expected fragments)
HEADER_CASES = [
    (
        "misspelt RA",
        ["SourceID", "ra", "Dec", "diameter_pixel", "fits_file_paths"],
        ["required column 'RA' is missing", "found column 'ra': rename it to 'RA'"],
    ),
    (
        "misspelt paths",
        ["SourceID", "RA", "Dec", "diameter_pixel", "fits_files_path"],
        ["'fits_file_paths' is missing", "rename it to 'fits_file_paths'"],
    ),
    (
        "id synonym",
        ["object_id", "RA", "Dec", "diameter_pixel", "fits_file_paths"],
        ["'SourceID' is missing", "found column 'object_id'"],
    ),
    (
        "no paths column",
        ["SourceID", "RA", "Dec", "diameter_pixel"],
        ["'fits_file_paths' is missing", "add a column 'fits_file_paths'"],
    ),
    (
        "both sizes",
        [*HEADER, "diameter_arcsec"],
        [
            "both 'diameter_pixel' and 'diameter_arcsec'",
            "drop 'diameter_arcsec'",
            "drop 'diameter_pixel'",
        ],
    ),
    ("no size", ["SourceID", "RA", "Dec", "fits_file_paths"], ["no stamp size column"]),
    (
        "misspelt size",
        ["SourceID", "RA", "Dec", "diameter_pixels", "fits_file_paths"],
        ["no stamp size column", "found column 'diameter_pixels'"],
    ),
    (
        "repeated column",
        ["SourceID", "RA", "RA", "Dec", "diameter_pixel", "fits_file_paths"],
        ["column 'RA' appears more than once"],
    ),
]


@pytest.mark.parametrize(
    "header, fragments", [c[1:] for c in HEADER_CASES], ids=[c[0] for c in HEADER_CASES]
)
def test_bad_header_is_reported(tmp_path, header, fragments):
    path = write_csv(tmp_path / "cat.csv", header, [["x"] * len(header)])
    with pytest.raises(CatalogueValidationError) as info:
        cat.scan_catalogue(path, ["VIS"])
    message = str(info.value)
    assert "cat.csv" in message and "columns found" in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_empty_catalogues(tmp_path):
    header_only = write_csv(tmp_path / "header.csv", HEADER, [])
    assert "no data rows" in validation_message(header_only)
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(CatalogueValidationError, match="is empty"):
        cat.scan_catalogue(tmp_path / "empty.csv", ["VIS"])
    with pytest.raises(CatalogueValidationError, match="does not exist"):
        cat.scan_catalogue(tmp_path / "missing.csv", ["VIS"])
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(CatalogueValidationError, match="not a readable Parquet"):
        cat.scan_catalogue(tmp_path / "broken.parquet", ["VIS"])


def test_csv_with_wrong_field_count(tmp_path):
    path = tmp_path / "cat.csv"
    path.write_text(",".join(HEADER) + "\nS0,1,2,30,['/a.fits', '/b.fits']\n")
    with pytest.raises(CatalogueValidationError) as info:
        cat.scan_catalogue(path, ["VIS"])
    assert "cannot be parsed as CSV" in str(info.value) and "quote" in str(info.value)


def test_duplicates_across_chunks_name_ids_and_rows(tmp_path):
    rows = [[f"S{i}", *GOOD_ROW[1:]] for i in range(50)]
    rows[41][0] = "S7"
    rows[49][0] = "S7"
    rows[30][0] = "S2"
    path = write_csv(tmp_path / "cat.csv", HEADER, rows)
    message = validation_message(path, chunk_rows=8)
    assert "3 rows repeat an earlier SourceID" in message
    assert "'S2' at rows 2, 30" in message and "'S7' at rows 7, 41, 49" in message
    assert "unique" in message


def test_many_bad_rows_are_capped_and_counted(tmp_path):
    rows = [[f"S{i}", "999", *GOOD_ROW[2:]] for i in range(1000)]
    path = write_csv(tmp_path / "cat.csv", HEADER, rows)
    message = validation_message(path, chunk_rows=128)
    assert "value is outside [0, 360) in 1000 rows" in message
    assert "row 0 = '999', row 1 = '999'" in message and "(and 995 more rows)" in message
    assert "row 5 = " not in message


def test_bom_quoted_header_crlf_and_whitespace_are_accepted(tmp_path):
    rows = [
        ["  A1 ", " 150.5", "2.25 ", "64", "['vis.fits']"],
        ["A2", "0", "-90", "1.5", '["/abs/vis.fits"]'],
    ]
    path = write_csv(
        tmp_path / "cat.csv",
        HEADER + ["notes"],
        [r + ["free, text"] for r in rows],
        bom=True,
        quote_all=True,
        crlf=True,
    )
    frame = load_and_validate_catalogue(path, ["VIS"])
    assert list(frame.columns) == [
        "row_index",
        "SourceID",
        "RA",
        "Dec",
        "fits_file_paths",
        "diameter_pixel",
        "diameter_arcsec",
    ]
    assert list(frame["SourceID"]) == ["A1", "A2"]
    assert frame["RA"].dtype == np.float64 and list(frame["RA"]) == [150.5, 0.0]
    assert list(frame["Dec"]) == [2.25, -90.0]
    assert list(frame["row_index"]) == [0, 1]
    # Relative paths resolve against the catalogue's directory.
    assert frame["fits_file_paths"][0] == [str(tmp_path / "vis.fits")]
    assert frame["fits_file_paths"][1] == ["/abs/vis.fits"]
    assert frame["diameter_arcsec"].isna().all()


def test_iter_catalogue_chunks_and_parquet_list_column(tmp_path):
    n = 1000
    table = pa.table(
        {
            "SourceID": pa.array(np.arange(n), pa.int64()),
            "RA": np.linspace(0, 359, n),
            "Dec": np.linspace(-89, 89, n),
            "diameter_arcsec": np.full(n, 5.0, np.float32),
            "fits_file_paths": pa.array([["/d/v.fits", "/d/n.fits"]] * n, pa.list_(pa.string())),
            "extra": np.zeros(n),
        }
    )
    pq.write_table(table, tmp_path / "cat.parquet", row_group_size=300)
    chunks = list(cat.iter_catalogue(tmp_path / "cat.parquet", chunk_rows=256))
    assert [len(c) for c in chunks] == [256, 256, 256, 232]
    frame = pd.concat(chunks, ignore_index=True)
    np.testing.assert_array_equal(frame["row_index"], np.arange(n))
    assert frame["SourceID"].iloc[17] == "17"
    assert frame["diameter_arcsec"].dtype == np.float64
    assert frame["fits_file_paths"].iloc[999] == ["/d/v.fits", "/d/n.fits"]
    assert "extra" not in frame
    # Parquet path lists with a null element are reported.
    bad = table.set_column(
        4, "fits_file_paths", pa.array([["/d/v.fits", None]] + [["/a", "/b"]] * (n - 1))
    )
    pq.write_table(bad, tmp_path / "bad.parquet")
    message = validation_message(tmp_path / "bad.parquet", bands=("VIS", "NIR"))
    assert "'fits_file_paths'" in message and "row 0" in message


def test_validate_catalogue_chunk_on_dataframe():
    frame = pd.DataFrame(
        {
            "SourceID": ["a", "b", "a"],
            "RA": [1.0, 2.0, 3.0],
            "Dec": [0.0, 0.0, 100.0],
            "diameter_pixel": [10, 10, 10],
            "fits_file_paths": [["/x.fits", "/y.fits"]] * 3,
        }
    )
    with pytest.raises(CatalogueValidationError) as info:
        cat.validate_catalogue_chunk(frame, ["VIS", "NIR"], first_row=100)
    message = str(info.value)
    assert "in-memory DataFrame" in message
    assert "row 102 = 100.0" in message and "'a' at rows 100, 102" in message
    good = cat.validate_catalogue_chunk(frame.iloc[:2], 2, first_row=0)
    assert list(good["fits_file_paths"][1]) == ["/x.fits", "/y.fits"]
    assert list(good["diameter_pixel"]) == [10.0, 10.0]
    with pytest.raises(CatalogueValidationError, match="has 2 paths but channel_weights has 3"):
        cat.validate_catalogue_chunk(frame.iloc[:2], 3)


def test_config_bands_and_first_row_band_count(tmp_path):
    rows = [GOOD_ROW, ["S1", "1", "1", "9", "['/a.fits', '/b.fits']"]]
    path = write_csv(tmp_path / "cat.csv", HEADER, rows)
    cfg = validate_config({"channel_weights": {"VIS": [1.0], "NIR": [1.0]}})
    scan = cat.scan_catalogue(path, cfg)
    assert "channel_weights has 2 bands (VIS, NIR)" in scan.problems.lines()[0]
    assert "row 0" in scan.problems.lines()[0]
    # Without a config the first valid row fixes the band count.
    summary = analyse_catalogue(path)
    assert summary["n_bands"] == 1 and summary["valid"] is False
    assert "the first valid row has 1" in summary["problems"][0]


def test_analyse_catalogue_summary(tmp_path):
    rows = [[f"S{i}", str(10 + i), str(-i), str(20 + i), f"['t{i % 2}.fits']"] for i in range(6)]
    path = write_csv(tmp_path / "cat.csv", HEADER, rows)
    summary = analyse_catalogue(path)
    assert summary["valid"] and summary["problems"] == []
    assert summary["n_sources"] == 6 and summary["n_tiles"] == 2 and summary["n_files"] == 2
    assert summary["files"] == [str(tmp_path / "t0.fits"), str(tmp_path / "t1.fits")]
    assert summary["size_range"] == (20.0, 25.0) and summary["ra_range"] == (10.0, 15.0)
    assert summary["dec_range"] == (-5.0, 0.0) and summary["size_column"] == "diameter_pixel"
    json.dumps(summary)  # UI-friendly: plain JSON types


def test_schema_matches_validator_limits():
    schema_path = Path(__file__).parents[1] / "workflow" / "schemas" / "catalogue.schema.yaml"
    schema = yaml.safe_load(schema_path.read_text())
    props = schema["properties"]
    assert set(schema["required"]) == set(cat.REQUIRED_COLUMNS)
    assert props["RA"]["minimum"] == 0 and props["RA"]["exclusiveMaximum"] == 360
    assert props["Dec"]["minimum"] == -90 and props["Dec"]["maximum"] == 90
    for column in cat.SIZE_COLUMNS:
        assert props[column]["maximum"] == cat.MAX_DIAMETER[column]
        assert props[column]["exclusiveMinimum"] == 0


def test_dataframe_with_mixed_types_is_validated_not_crashed():
    frame = pd.DataFrame(
        {
            "SourceID": ["a", "b", "c"],
            "RA": [1.0, "x", 3],
            "Dec": [0, 0, 0],
            "diameter_pixel": [5, 5, 5],
            "fits_file_paths": [["/a.fits"], "['/a.fits']", ("/a.fits",)],
        }
    )
    scan = cat.scan_catalogue(frame, 1)
    assert scan.problems.lines() == [
        "column 'RA': value is not a number in 1 row: row 1 = 'x'. "
        "Fix: give a plain number in degrees"
    ]
    assert scan.tiles == [("/a.fits",)] and scan.tile_rows == [3]
