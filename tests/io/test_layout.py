"""Finding scans on disk, checking their references, reading lab values and assigning splits."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from chemmap.errors import InputError
from chemmap.io import ScanFiles, discover_scans, open_scan, read_references
from chemmap.io.envi import create_envi
from chemmap.io.layout import assign_splits, check_references

WL = np.linspace(900.0, 1700.0, 6)


def _scan(hdr: Path, *, bands: int = 6, lines: int = 4, samples: int = 5, wavelengths=WL) -> Path:
    mm = create_envi(hdr, bands=bands, lines=lines, samples=samples, wavelengths=wavelengths)
    mm[...] = 7
    mm.flush()
    return hdr


def _specim(root: Path, scan_id: str, *, white: bool = True, dark: bool = True, **kwargs) -> None:
    cap = root / scan_id / "capture"
    _scan(cap / f"{scan_id}.hdr", **kwargs)
    if white:
        _scan(cap / f"WHITEREF_{scan_id}.hdr", lines=2, **kwargs)
    if dark:
        _scan(cap / f"DARKREF_{scan_id}.hdr", lines=3, **kwargs)


# --- discover_scans -------------------------------------------------------------------------------


def test_specim_layout_found_without_configuration(tmp_path: Path):
    for sid in ["B002", "B001", "B010"]:
        _specim(tmp_path, sid)
    (tmp_path / "notes.txt").write_text("not a scan")
    found = discover_scans(tmp_path)
    assert [f.scan_id for f in found] == ["B001", "B002", "B010"]
    f = found[0]
    cap = tmp_path / "B001" / "capture"
    assert f == ScanFiles(
        "B001",
        cap / "B001.hdr",
        cap / "WHITEREF_B001.hdr",
        cap / "DARKREF_B001.hdr",
        str(cap / "WHITEREF_B001.hdr"),
        str(cap / "DARKREF_B001.hdr"),
    )


def test_specim_missing_reference_is_none(tmp_path: Path):
    _specim(tmp_path, "B001", dark=False)
    (f,) = discover_scans(tmp_path)
    assert f.white is not None and f.dark is None
    assert "DARKREF_B001.hdr" in f.dark_searched


def test_patterns_per_scan_references(tmp_path: Path):
    for sid in ["s1", "s2"]:
        _scan(tmp_path / "scans" / f"{sid}.hdr")
        _scan(tmp_path / "refs" / f"WHITE_{sid}.hdr")
        _scan(tmp_path / "refs" / f"DARK_{sid}.hdr")
    found = discover_scans(
        tmp_path, "scans/{scan_id}.hdr", "refs/WHITE_{scan_id}.hdr", "refs/DARK_{scan_id}.hdr"
    )
    assert [(f.scan_id, f.raw.name, f.white.name, f.dark.name) for f in found] == [
        ("s1", "s1.hdr", "WHITE_s1.hdr", "DARK_s1.hdr"),
        ("s2", "s2.hdr", "WHITE_s2.hdr", "DARK_s2.hdr"),
    ]


def test_shared_references(tmp_path: Path):
    for sid in ["a", "b", "c"]:
        _scan(tmp_path / f"{sid}.hdr")
    _scan(tmp_path / "refs" / "white.hdr")
    _scan(tmp_path / "refs" / "dark.hdr")
    found = discover_scans(tmp_path, "{scan_id}.hdr", "refs/white.hdr", "refs/dark.hdr")
    assert [f.scan_id for f in found] == ["a", "b", "c"]
    assert {f.white for f in found} == {tmp_path / "refs" / "white.hdr"}
    assert {f.dark for f in found} == {tmp_path / "refs" / "dark.hdr"}


def test_reference_files_are_not_scans(tmp_path: Path):
    """Raw and reference patterns in one folder: the references are not taken for scans."""
    _scan(tmp_path / "s1.hdr")
    _scan(tmp_path / "white_s1.hdr")
    _scan(tmp_path / "dark.hdr")
    found = discover_scans(tmp_path, "{scan_id}.hdr", "white_{scan_id}.hdr", "dark.hdr")
    assert [f.scan_id for f in found] == ["s1"]
    # Default reference naming beside a user raw pattern: WHITEREF_/DARKREF_ are not scans either.
    _scan(tmp_path / "flat" / "x.hdr")
    _scan(tmp_path / "flat" / "WHITEREF_x.hdr")
    _scan(tmp_path / "flat" / "DARKREF_x.hdr")
    (f,) = discover_scans(tmp_path / "flat", "{scan_id}.hdr")
    assert f.scan_id == "x" and f.white.name == "WHITEREF_x.hdr" and f.dark.name == "DARKREF_x.hdr"


def test_wildcards_in_pattern(tmp_path: Path):
    _scan(tmp_path / "day1" / "p1.hdr")
    _scan(tmp_path / "day2" / "p2.hdr")
    found = discover_scans(tmp_path, "day*/{scan_id}.hdr")
    assert [f.scan_id for f in found] == ["p1", "p2"]


def test_specim_needs_matching_folder_and_file_names(tmp_path: Path):
    _specim(tmp_path, "B001")
    _scan(tmp_path / "B002" / "capture" / "other.hdr")
    assert [f.scan_id for f in discover_scans(tmp_path)] == ["B001"]


def test_no_scan_found(tmp_path: Path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=r"empty: no scan matches '\{scan_id\}/capture/\{scan_id\}\.hdr'"):
        discover_scans(tmp_path / "empty")
    with pytest.raises(InputError, match=r"no scan matches 'x/\{scan_id\}\.hdr'"):
        discover_scans(tmp_path / "empty", "x/{scan_id}.hdr")


def test_root_missing_or_pattern_without_id(tmp_path: Path):
    with pytest.raises(InputError, match="nope: data root is not a folder"):
        discover_scans(tmp_path / "nope")
    with pytest.raises(InputError, match="must contain"):
        discover_scans(tmp_path, "scans/*.hdr")


def test_duplicate_scan_id(tmp_path: Path):
    _scan(tmp_path / "a" / "s1.hdr")
    _scan(tmp_path / "b" / "s1.hdr")
    with pytest.raises(InputError, match="scan id 's1' matches both"):
        discover_scans(tmp_path, "*/{scan_id}.hdr")


def test_ambiguous_reference_pattern(tmp_path: Path):
    _scan(tmp_path / "s1.hdr")
    _scan(tmp_path / "refs" / "w1.hdr")
    _scan(tmp_path / "refs" / "w2.hdr")
    with pytest.raises(InputError, match="white pattern matches 2 files"):
        discover_scans(tmp_path, "{scan_id}.hdr", "refs/w*.hdr")


# --- check_references -----------------------------------------------------------------------------


def _opened(files: ScanFiles):
    return (
        open_scan(files.raw),
        open_scan(files.white) if files.white else None,
        open_scan(files.dark) if files.dark else None,
    )


def test_check_references_ok(tmp_path: Path):
    _specim(tmp_path, "B001")
    (f,) = discover_scans(tmp_path)
    check_references(*_opened(f), f)  # lines differ (4, 2, 3): allowed


@pytest.mark.parametrize(("missing", "label"), [("white", "WHITEREF"), ("dark", "DARKREF")])
def test_check_references_missing(tmp_path: Path, missing: str, label: str):
    _specim(tmp_path, "B001", **{missing: False})
    (f,) = discover_scans(tmp_path)
    with pytest.raises(InputError) as info:
        check_references(*_opened(f), f)
    msg = str(info.value)
    assert msg.startswith(f"{f.raw}: no {label} found (looked for ")
    assert f"{label}_B001.hdr" in msg
    check_references(*_opened(f), f, required=False)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"samples": 6}, "has 6 samples"),
        ({"bands": 5, "wavelengths": WL[:5]}, "has 5 bands"),
        ({"wavelengths": WL + 2.0}, "wavelengths differ"),
        ({"wavelengths": None}, "has no wavelengths"),
    ],
)
def test_check_references_mismatch(tmp_path: Path, kwargs: dict, fragment: str):
    cap = tmp_path / "B001" / "capture"
    _scan(cap / "B001.hdr")
    _scan(cap / "WHITEREF_B001.hdr", **kwargs)
    _scan(cap / "DARKREF_B001.hdr")
    (f,) = discover_scans(tmp_path)
    with pytest.raises(InputError) as info:
        check_references(*_opened(f), f)
    msg = str(info.value)
    assert fragment in msg
    assert "WHITEREF_B001.hdr" in msg and "/B001.hdr" in msg


# --- assign_splits ----------------------------------------------------------------------------------


def test_assign_splits_balanced_and_seeded():
    ids = [f"S{i:03d}" for i in range(180)]
    splits = assign_splits(ids)
    counts = Counter(splits.values())
    assert counts == {0: 30, 1: 30, 2: 30, 3: 30, 4: 30, 5: 30}
    assert assign_splits(list(reversed(ids))) == splits  # the set decides, not the order
    assert assign_splits(ids, seed=1) != splits
    assert assign_splits(ids, seed=0) == splits


def test_assign_splits_by_sample_not_scan():
    scans_of = {f"S{i}": 2 for i in range(12)}
    sample_per_scan = [s for s, n in scans_of.items() for _ in range(n)]
    splits = assign_splits(sample_per_scan, n_folds=5)
    assert set(splits) == set(scans_of)
    assert Counter(splits.values())[0] == 2


def test_assign_splits_too_few_samples():
    with pytest.raises(InputError, match="fewer than the 5 folds"):
        assign_splits(["a", "b", "c", "d", "e"])
    assert sorted(assign_splits(["a", "b", "c", "d", "e"], test_fraction=0).values()) == [1, 2, 3, 4, 5]


# --- read_references ----------------------------------------------------------------------------------


def _csv(path: Path, text: str) -> Path:
    path.write_text(text.strip() + "\n")
    return path


IDS = [f"B{i:03d}" for i in range(1, 13)]


def _plain_csv(tmp_path: Path, ids=IDS, extra: str = "") -> Path:
    rows = "\n".join(f"{sid},{10 + i}.5,{20 + i}" for i, sid in enumerate(ids))
    return _csv(tmp_path / "references.csv", f"sample_id,fat,protein\n{rows}\n{extra}")


def test_read_references_one_scan_per_sample(tmp_path: Path):
    csv = _plain_csv(tmp_path)
    table, skipped = read_references(csv, IDS, ["fat"])
    assert skipped == []
    assert list(table.columns) == ["scan_id", "sample_id", "fat", "split"]
    assert list(table["scan_id"]) == IDS and list(table["sample_id"]) == IDS
    assert table["fat"].dtype == np.float64 and table["fat"].iloc[0] == 10.5
    assert table["split"].dtype.kind == "i"
    assert dict(zip(table["sample_id"], table["split"], strict=True)) == assign_splits(IDS)
    table2, _ = read_references(csv, IDS, ["fat", "protein"])
    assert list(table2.columns) == ["scan_id", "sample_id", "fat", "protein", "split"]


def test_read_references_several_scans_per_sample(tmp_path: Path):
    samples = [f"P{i}" for i in range(8)]
    lines = ["scan_id,sample_id,fat"]
    for i, s in enumerate(samples):
        lines += [f"{s}_top,{s},{30 + i}", f"{s}_bottom,{s},{30 + i}"]
    csv = _csv(tmp_path / "references.csv", "\n".join(lines))
    scans = [f"{s}_{side}" for s in samples for side in ("top", "bottom")]
    table, skipped = read_references(csv, scans, ["fat"], n_folds=3)
    assert skipped == [] and len(table) == 16
    per_sample = table.groupby("sample_id")["split"].nunique()
    assert (per_sample == 1).all()  # both scans of a sample share its split
    assert dict(table.groupby("sample_id")["split"].first()) == assign_splits(samples, n_folds=3)


def test_read_references_given_splits(tmp_path: Path):
    csv = _csv(tmp_path / "references.csv", "sample_id,fat,split\na,1,0\nb,2,3\nc,3,5\n")
    table, _ = read_references(csv, ["a", "b", "c"], ["fat"])
    assert list(table["split"]) == [0, 3, 5]


@pytest.mark.parametrize("value", ["6", "-1", "1.5", "x", ""])
def test_read_references_bad_split(tmp_path: Path, value: str):
    csv = _csv(tmp_path / "references.csv", f"sample_id,fat,split\na,1,0\nb,2,{value}\n")
    with pytest.raises(InputError, match=r"references\.csv line 3: split must be an integer 0\.\.5"):
        read_references(csv, ["a", "b"], ["fat"], on_error="skip")


def test_read_references_split_disagrees_within_sample(tmp_path: Path):
    csv = _csv(tmp_path / "references.csv", "scan_id,sample_id,fat,split\nx1,x,1,1\nx2,x,1,2\n")
    with pytest.raises(InputError, match="sample_id 'x' has different split values"):
        read_references(csv, ["x1", "x2"], ["fat"])


def test_read_references_missing_file(tmp_path: Path):
    with pytest.raises(InputError, match=r"references\.csv: reference file not found"):
        read_references(tmp_path / "references.csv", IDS, ["fat"])


def test_read_references_missing_target_column(tmp_path: Path):
    csv = _plain_csv(tmp_path)
    with pytest.raises(InputError) as info:
        read_references(csv, IDS, ["fat", "water"], on_error="skip")
    assert str(info.value) == f"{csv}: no column 'water' (columns: sample_id, fat, protein)"


def test_read_references_id_without_scan(tmp_path: Path):
    csv = _plain_csv(tmp_path, extra="B017,12,13")
    with pytest.raises(InputError) as info:
        read_references(csv, IDS, ["fat"], root=tmp_path / "scans")
    assert str(info.value) == f"{csv}: sample_id 'B017' has no scan under {tmp_path / 'scans'}"
    table, skipped = read_references(csv, IDS, ["fat"], on_error="skip", root=tmp_path / "scans")
    assert list(table["scan_id"]) == IDS
    assert skipped == [f"{csv}: sample_id 'B017' has no scan under {tmp_path / 'scans'}"]


def test_read_references_scan_id_column_message(tmp_path: Path):
    csv = _csv(tmp_path / "references.csv", "scan_id,sample_id,fat\nB017,P1,3\n")
    with pytest.raises(InputError, match="scan_id 'B017' has no scan under"):
        read_references(csv, ["B001"], ["fat"])


def test_read_references_scan_without_row(tmp_path: Path):
    csv = _plain_csv(tmp_path)
    scans = [*IDS, "B099"]
    with pytest.raises(InputError, match=r"scan 'B099' under .* has no reference row"):
        read_references(csv, scans, ["fat"])
    table, skipped = read_references(csv, scans, ["fat"], on_error="skip")
    assert "B099" not in set(table["scan_id"]) and len(skipped) == 1 and "B099" in skipped[0]


@pytest.mark.parametrize("value", ["abc", "", "nan", "NaN", "inf"])
def test_read_references_bad_target_value(tmp_path: Path, value: str):
    csv = _plain_csv(tmp_path, extra=f"B099,{value},5")
    scans = [*IDS, "B099"]
    with pytest.raises(InputError) as info:
        read_references(csv, scans, ["fat"])
    assert str(info.value) == f"{csv} line 14 (sample_id 'B099'): fat is {value!r}, not a number"
    table, skipped = read_references(csv, scans, ["fat"], on_error="skip")
    assert list(table["scan_id"]) == IDS
    assert len(skipped) == 1  # the bad row, not again as "scan without a row"


def test_read_references_duplicate_id(tmp_path: Path):
    csv = _plain_csv(tmp_path, extra="B001,1,2")
    with pytest.raises(InputError, match="line 14: sample_id 'B001' repeats line 2"):
        read_references(csv, IDS, ["fat"])


def test_read_references_values_disagree_within_sample(tmp_path: Path):
    csv = _csv(tmp_path / "references.csv", "scan_id,sample_id,fat\nx1,x,1\nx2,x,2\n")
    with pytest.raises(InputError, match="sample_id 'x' has different fat values"):
        read_references(csv, ["x1", "x2"], ["fat"])


def test_read_references_whitespace_and_ids_as_text(tmp_path: Path):
    csv = _csv(tmp_path / "references.csv", "sample_id, fat\n007, 12.5\n 010 ,3\n")
    table, _ = read_references(csv, ["007", "010"], ["fat"], test_fraction=0, n_folds=2)
    assert list(table["sample_id"]) == ["007", "010"]  # leading zeros kept
    assert list(table["fat"]) == [12.5, 3.0]


def test_read_references_empty_file(tmp_path: Path):
    csv = _csv(tmp_path / "references.csv", "")
    with pytest.raises(InputError, match="cannot read as CSV"):
        read_references(csv, IDS, ["fat"])


def test_read_references_nothing_matches(tmp_path: Path):
    csv = _plain_csv(tmp_path)
    with pytest.raises(InputError, match="no reference row matches a scan"):
        read_references(csv, ["X1"], ["fat"], on_error="skip")


def test_end_to_end_specim_folder(tmp_path: Path):
    root = tmp_path / "line"
    for sid in IDS:
        _specim(root, sid)
    _plain_csv(root)
    found = discover_scans(root)
    for f in found:
        check_references(*_opened(f), f)
    table, skipped = read_references(root / "references.csv", [f.scan_id for f in found], ["fat"])
    assert skipped == [] and list(table["scan_id"]) == IDS
    assert isinstance(table, pd.DataFrame)
