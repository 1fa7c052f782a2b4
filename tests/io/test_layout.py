"""Finding scans on disk and checking their white and dark references."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from chemmap.errors import InputError
from chemmap.io import ScanFiles, discover_scans, open_scan, read_references
from chemmap.io.envi import create_envi
from chemmap.io.layout import check_references

WL = np.linspace(900.0, 1700.0, 6)
IDS = [f"B{i:03d}" for i in range(1, 13)]


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


def test_end_to_end_specim_folder(tmp_path: Path):
    root = tmp_path / "line"
    for sid in IDS:
        _specim(root, sid)
    rows = "\n".join(f"{sid},{10 + i}.5" for i, sid in enumerate(IDS))
    (root / "references.csv").write_text(f"sample_id,fat\n{rows}\n")
    found = discover_scans(root)
    for f in found:
        check_references(*_opened(f), f)
    table, skipped = read_references(root / "references.csv", [f.scan_id for f in found], ["fat"])
    assert skipped == [] and list(table["scan_id"]) == IDS
    assert isinstance(table, pd.DataFrame)
