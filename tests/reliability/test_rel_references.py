"""Bad ``references.csv`` files, as a user meets them: ``chemmap preprocess`` refuses with one line.

Every refusal happens while the scans are matched to their rows, before a stage folder is made.
A byte order mark and a ``;`` separator (what spreadsheets write in some locales) are accepted:
the table read is the one the plain comma-separated file gives.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from chemmap.errors import InputError
from chemmap.io import read_references
from tests.reliability.relkit import chemmap, folder_config, no_complete_stage, one_error_line, scanner_folder

GOOD = "scan_id,sample_id,fat,split\nS00,P00,10.0,0\nS01,P01,15.0,1\nS02,P02,20.0,0\n"


@pytest.fixture(scope="module")
def scans(tmp_path_factory):
    """Three scans S00-S02 (their CSV is written by each test)."""
    return scanner_folder(tmp_path_factory.mktemp("refs") / "scans")


def _refused(scans: Path, tmp_path: Path, csv_text: str, *needles: str) -> str:
    csv = tmp_path / "references.csv"
    csv.write_text(csv_text)
    cfg = folder_config(tmp_path, scans, f"data: {{source: folder, root: {scans}, references: {csv}}}\n")
    line = one_error_line(chemmap("preprocess", cfg, "-q"), str(csv), *needles)
    no_complete_stage(tmp_path / "runs")
    assert not (tmp_path / "runs" / "preprocess").exists()  # refused before the stage began
    return line


@pytest.mark.slow
@pytest.mark.parametrize(
    ("text", "needle"),
    [
        (GOOD.replace("S01,P01,", "S01,,"), "line 3: empty sample_id"),
        (GOOD.replace("S02,P02,20.0,0\n", ""), "scan 'S02' under"),
    ],
    ids=["empty-id", "scan-without-row"],
)
def test_missing_ids(scans, tmp_path, text, needle):
    _refused(scans, tmp_path, text, needle)


@pytest.mark.slow
def test_duplicate_ids(scans, tmp_path):
    _refused(scans, tmp_path, GOOD + "S01,P01,15.0,1\n", "line 5: scan_id 'S01' repeats line 3")


@pytest.mark.slow
def test_non_numeric_values(scans, tmp_path):
    _refused(
        scans, tmp_path, GOOD.replace("15.0", "n/a"), "line 3 (scan_id 'S01'): fat is 'n/a', not a number"
    )


@pytest.mark.slow
@pytest.mark.parametrize("value", ["-0.5", "100.5"])
def test_fat_below_0_or_above_100(scans, tmp_path, value):
    _refused(scans, tmp_path, GOOD.replace("15.0", value), f"fat is '{value}', outside 0-100 %")


@pytest.mark.slow
def test_a_target_column_missing(scans, tmp_path):
    text = "\n".join(",".join(r.split(",")[:2] + r.split(",")[3:]) for r in GOOD.splitlines()) + "\n"
    _refused(scans, tmp_path, text, "no column 'fat' (columns: scan_id, sample_id, split)")


@pytest.mark.slow
def test_an_empty_file(scans, tmp_path):
    _refused(scans, tmp_path, "", "cannot read as CSV")


def _table(path: Path):
    return read_references(path, ["S00", "S01", "S02"], ["fat"])[0]


def test_a_byte_order_mark_is_accepted(tmp_path):
    plain, bom = tmp_path / "plain.csv", tmp_path / "bom.csv"
    plain.write_text(GOOD)
    bom.write_bytes(b"\xef\xbb\xbf" + GOOD.encode())
    assert _table(bom).equals(_table(plain))
    assert list(_table(bom).columns) == ["scan_id", "sample_id", "fat", "split"]


def test_a_semicolon_separator_is_accepted(tmp_path):
    plain, semi = tmp_path / "plain.csv", tmp_path / "semi.csv"
    plain.write_text(GOOD)
    semi.write_bytes(b"\xef\xbb\xbf" + GOOD.replace(",", ";").encode())  # as a spreadsheet saves it
    assert _table(semi).equals(_table(plain))


def test_a_decimal_comma_under_semicolons_is_refused_not_misread(tmp_path):
    semi = tmp_path / "semi.csv"
    semi.write_text(GOOD.replace(",", ";").replace("15.0", "15,5"))
    with pytest.raises(InputError) as err:
        _table(semi)
    assert str(err.value) == f"{semi} line 3 (scan_id 'S01'): fat is '15,5', not a number"


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        (
            '"\nscan_id",scan_id,sample_id,fat\nS00,S00,P00,1\n',
            "column 'scan_id' appears twice in the header",
        ),
        ('scan_id,sample_id,fat\n"S0\n1",P00,x\n', "line 2 (scan_id 'S0\\n1'): fat is 'x', not a number"),
        ("sample_id,fat\nS00,1\nS01,2\n", "2 samples leave 2 outside the test split, fewer than the 5 folds"),
    ],
    ids=["columns-equal-once-stripped", "id-with-a-line-break", "too-few-samples-to-split"],
)
def test_inputs_found_by_fuzzing(tmp_path, text, needle):
    """Each was a traceback, a two-line error or a line without the file (docs/reliability.md, Fuzzing)."""
    csv = tmp_path / "references.csv"
    csv.write_text(text)
    with pytest.raises(InputError) as err:
        read_references(csv, ["S00", "S01"], ["fat"], test_fraction=0.0)
    msg = str(err.value)
    assert msg.startswith(f"{csv}") and needle in msg and "\n" not in msg, msg
