"""Lab values and splits: the one split rule, assign_splits and read_references."""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from chemmap.errors import InputError
from chemmap.io import assign_splits, read_references
from chemmap.io.references import shuffled_splits

# The split column of the default synthetic dataset (SynthSpec(): 180 samples, seed 0), as the
# scanner wrote it before the rule moved here: a sha256 of its values, comma-joined, in sample order.
DEFAULT_SPLIT_SHA256 = "302ac7afe5d1f60e345bd58c408998e86b58351bcda96f48c1c6fdb83584891a"
DEFAULT_SPLIT_HEAD = [4, 3, 3, 5, 4, 5, 3, 1, 0, 5, 3, 1, 1, 3, 0, 1, 0, 2, 5, 4]


def _column_sha256(split) -> str:
    return hashlib.sha256(",".join(str(int(v)) for v in split).encode()).hexdigest()


# --- the split rule ---------------------------------------------------------------------------------


def test_rule_pins_the_default_synthetic_splits():
    split = shuffled_splits(180, seed=0)
    assert split.dtype == np.int64
    assert Counter(split.tolist()) == {0: 30, 1: 30, 2: 30, 3: 30, 4: 30, 5: 30}
    assert split[:20].tolist() == DEFAULT_SPLIT_HEAD
    assert _column_sha256(split) == DEFAULT_SPLIT_SHA256


def test_assign_splits_gives_the_scanners_samples_their_splits():
    """references.csv without a split column: the scanner's own samples get the scanner's splits."""
    ids = [f"belly{i:04d}" for i in range(180)]
    splits = assign_splits(list(reversed(ids)), seed=0)
    assert _column_sha256(splits[s] for s in ids) == DEFAULT_SPLIT_SHA256


@pytest.mark.parametrize(("n", "n_test"), [(6, 1), (7, 1), (9, 2), (12, 2), (15, 2), (21, 4), (180, 30)])
def test_rule_test_share(n: int, n_test: int):
    """n_test = max(1, round(n / 6)), Python's rounding (half to even: 9 -> 2, 15 -> 2, 21 -> 4)."""
    split = shuffled_splits(n, seed=7)
    assert (split == 0).sum() == n_test
    folds = Counter(split[split > 0].tolist())
    assert sorted(folds) == [1, 2, 3, 4, 5]
    assert max(folds.values()) - min(folds.values()) <= 1  # round robin


def test_rule_arguments():
    assert sorted(shuffled_splits(5, seed=0, test_fraction=0).tolist()) == [1, 2, 3, 4, 5]
    assert sorted(shuffled_splits(4, seed=0, n_folds=3).tolist()) == [0, 1, 2, 3]
    assert (shuffled_splits(2, seed=0, n_folds=1, test_fraction=0.1) == 0).sum() == 1  # at least one
    with pytest.raises(ValueError, match="n_folds must be >= 1, got 0"):
        shuffled_splits(10, seed=0, n_folds=0)
    with pytest.raises(ValueError, match="test_fraction must be >= 0 and < 1, got 1"):
        shuffled_splits(10, seed=0, test_fraction=1)


# --- assign_splits ----------------------------------------------------------------------------------


def test_assign_splits_balanced_and_seeded():
    ids = [f"S{i:03d}" for i in range(180)]
    splits = assign_splits(ids)
    assert Counter(splits.values()) == {0: 30, 1: 30, 2: 30, 3: 30, 4: 30, 5: 30}
    assert all(type(v) is int for v in splits.values())
    assert assign_splits(ids, seed=0) == splits
    other = assign_splits(ids, seed=1)
    assert Counter(other.values()) == Counter(splits.values())
    assert sum(other[s] != splits[s] for s in ids) > 100  # another seed: another shuffle


def test_assign_splits_depends_on_the_set_of_ids_only():
    ids = [f"S{i:03d}" for i in range(40)]
    splits = assign_splits(ids, seed=3)
    shuffled = [ids[k] for k in np.random.default_rng(1).permutation(len(ids))]
    assert assign_splits(shuffled, seed=3) == splits
    assert assign_splits(list(reversed(ids)) + ids[:5], seed=3) == splits  # repeats change nothing
    assert assign_splits(ids[1:], seed=3) != {s: splits[s] for s in ids[1:]}  # another set: redrawn


def test_assign_splits_by_sample_not_scan():
    samples = [f"S{i:02d}" for i in range(12)]
    per_scan = [s for s in samples for _side in ("top", "bottom")]  # two scans per sample
    splits = assign_splits(per_scan, n_folds=5)
    assert splits == assign_splits(samples, n_folds=5)  # scans count once, by their sample
    assert Counter(splits.values()) == {0: 2, 1: 2, 2: 2, 3: 2, 4: 2, 5: 2}


def test_assign_splits_too_few_samples():
    with pytest.raises(InputError, match="5 samples leave 4 outside the test split, fewer than the 5 folds"):
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
