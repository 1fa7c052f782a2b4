"""Where scans and their lab values are on disk: the recorder's folder layout and ``references.csv``.

Specim's recorders write one folder per scan::

    <root>/<id>/capture/<id>.hdr|.raw
    <root>/<id>/capture/WHITEREF_<id>.hdr|.raw
    <root>/<id>/capture/DARKREF_<id>.hdr|.raw

which :func:`discover_scans` finds without configuration. Other layouts are named by glob
patterns relative to the root that contain ``{scan_id}``.
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from chemmap.errors import InputError

if TYPE_CHECKING:
    import pandas as pd

    from chemmap.io.envi import Scan

SCAN_ID = "{scan_id}"
# Specim's recorder layout (the default when no raw pattern is given).
SPECIM_RAW_PATTERN = "{scan_id}/capture/{scan_id}.hdr"
# With no white/dark pattern, references sit beside the raw header with these name prefixes.
WHITE_PREFIX = "WHITEREF_"
DARK_PREFIX = "DARKREF_"


@dataclass(frozen=True)
class ScanFiles:
    """The headers of one scan and of its references.

    Attributes:
        scan_id: the scan's name (``{scan_id}`` in the patterns).
        raw: the scan's ``.hdr``.
        white, dark: the reference headers, None where none was found.
        white_searched, dark_searched: where the references were looked for (for messages).
    """

    scan_id: str
    raw: Path
    white: Path | None
    dark: Path | None
    white_searched: str = ""
    dark_searched: str = ""


# ---------------------------------------------------------------------------------------------
# Finding scans
# ---------------------------------------------------------------------------------------------


def _glob_regex(pattern: str) -> re.Pattern[str]:
    """A regex that matches what ``pattern`` globs (``*``, ``?``, ``[...]``) and captures ``{scan_id}``."""
    out: list[str] = []
    first_id = True
    i = 0
    while i < len(pattern):
        if pattern.startswith(SCAN_ID, i):
            out.append("(?P<scan_id>[^/]+)" if first_id else "(?P=scan_id)")
            first_id = False
            i += len(SCAN_ID)
            continue
        c = pattern[i]
        if c == "*":
            if pattern.startswith("**/", i):
                out.append("(?:.*/)?")
                i += 3
                continue
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            j = pattern.find("]", i + 1)
            if j == -1:
                out.append(re.escape(c))
            else:
                body = pattern[i + 1 : j]
                if body.startswith("!"):
                    body = "^" + body[1:]
                out.append(f"[{body}]")
                i = j
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out))


def _glob(root: Path, pattern: str) -> list[Path]:
    return sorted(Path(p) for p in glob.glob(pattern, root_dir=root, recursive=True))


def _find_reference(
    root: Path, pattern: str | None, prefix: str, scan_id: str, raw: Path, kind: str
) -> tuple[Path | None, str]:
    """One reference header for a scan, and a description of where it was looked for."""
    if pattern is None:
        candidate = raw.with_name(prefix + raw.name)
        return (candidate if candidate.is_file() else None), str(candidate)
    concrete = pattern.replace(SCAN_ID, glob.escape(scan_id))
    matches = [p for p in _glob(root, concrete) if (root / p).is_file()]
    searched = str(root / concrete)
    if len(matches) > 1:
        shown = ", ".join(str(root / m) for m in matches[:3])
        raise InputError(
            f"{root / pattern}: {kind} pattern matches {len(matches)} files for scan '{scan_id}' ({shown}); "
            "it must match one"
        )
    return (root / matches[0] if matches else None), searched


def discover_scans(
    root: str | os.PathLike,
    raw_pattern: str | None = None,
    white_pattern: str | None = None,
    dark_pattern: str | None = None,
) -> list[ScanFiles]:
    """Find the scans under a folder and their white and dark references.

    Args:
        root: the scanner's output folder.
        raw_pattern: glob relative to ``root`` that contains ``{scan_id}``, e.g.
            ``"scans/{scan_id}.hdr"``; None: Specim's ``"{scan_id}/capture/{scan_id}.hdr"``.
        white_pattern, dark_pattern: globs relative to ``root``; with ``{scan_id}`` one file
            per scan (``"refs/WHITE_{scan_id}.hdr"``), without it one file shared by all scans
            (``"white.hdr"``); None: ``WHITEREF_<name>`` / ``DARKREF_<name>`` beside each raw
            header (Specim's naming).

    Returns:
        One :class:`ScanFiles` per scan, sorted by ``scan_id``. A reference that is not found
        is None here; :func:`check_references` says so when it is needed.

    Raises:
        InputError: ``root`` is not a folder, a pattern lacks ``{scan_id}`` where it needs
            it, no scan matches, two files give the same scan id, or a reference pattern
            matches several files.
    """
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{root}: data root is not a folder")
    pattern = SPECIM_RAW_PATTERN if raw_pattern is None else raw_pattern
    if SCAN_ID not in pattern:
        raise InputError(f"raw_pattern {pattern!r} must contain {SCAN_ID}")
    regex = _glob_regex(pattern)
    exclude = [_glob_regex(p) for p in (white_pattern, dark_pattern) if p is not None]

    found: dict[str, Path] = {}
    for rel in _glob(root, pattern.replace(SCAN_ID, "*")):
        rel_posix = rel.as_posix()
        m = regex.fullmatch(rel_posix)
        if m is None or not (root / rel).is_file():
            continue
        if any(x.fullmatch(rel_posix) for x in exclude):
            continue
        if white_pattern is None and rel.name.startswith(WHITE_PREFIX):
            continue
        if dark_pattern is None and rel.name.startswith(DARK_PREFIX):
            continue
        scan_id = m.group("scan_id")
        if scan_id in found:
            raise InputError(
                f"{root / pattern}: scan id '{scan_id}' matches both {found[scan_id]} and {root / rel}"
            )
        found[scan_id] = root / rel
    if not found:
        raise InputError(f"{root}: no scan matches {pattern!r}")

    out: list[ScanFiles] = []
    for scan_id in sorted(found):
        raw = found[scan_id]
        white, white_searched = _find_reference(root, white_pattern, WHITE_PREFIX, scan_id, raw, "white")
        dark, dark_searched = _find_reference(root, dark_pattern, DARK_PREFIX, scan_id, raw, "dark")
        out.append(ScanFiles(scan_id, raw, white, dark, white_searched, dark_searched))
    return out


def check_references(
    scan: Scan,
    white: Scan | None,
    dark: Scan | None,
    scan_files: ScanFiles,
    *,
    required: bool = True,
    tol_nm: float = 0.01,
) -> None:
    """Check that a scan's white and dark references exist and fit it.

    References must have the scan's samples (detector width), bands and wavelengths; their
    line counts may differ.

    Args:
        scan: the opened raw scan.
        white, dark: the opened references, None where :func:`discover_scans` found none.
        scan_files: where they came from (for messages).
        required: False (calibration ``none``) accepts missing references.
        tol_nm: largest wavelength difference taken as the same band.

    Raises:
        InputError: a missing reference (when required) or one that does not fit the scan.
    """
    for kind, label, ref, searched in (
        ("white", "WHITEREF", white, scan_files.white_searched),
        ("dark", "DARKREF", dark, scan_files.dark_searched),
    ):
        if ref is None:
            if required:
                where = f" (looked for {searched})" if searched else ""
                raise InputError(f"{scan.path}: no {label} found{where}")
            continue
        if ref.samples != scan.samples:
            raise InputError(
                f"{ref.path}: {kind} reference has {ref.samples} samples, scan {scan.path} has {scan.samples}"
            )
        if ref.bands != scan.bands:
            raise InputError(
                f"{ref.path}: {kind} reference has {ref.bands} bands, scan {scan.path} has {scan.bands}"
            )
        if (ref.wavelengths is None) != (scan.wavelengths is None):
            has, lacks = (ref.path, scan.path) if scan.wavelengths is None else (scan.path, ref.path)
            raise InputError(f"{lacks}: header has no wavelengths but {has} has")
        if ref.wavelengths is not None and scan.wavelengths is not None:
            diff = np.abs(ref.wavelengths - scan.wavelengths)
            if np.any(diff > tol_nm):
                i = int(np.argmax(diff))
                raise InputError(
                    f"{ref.path}: {kind} reference wavelengths differ from scan {scan.path} "
                    f"(band {i + 1}: {ref.wavelengths[i]:g} nm vs {scan.wavelengths[i]:g} nm)"
                )


# ---------------------------------------------------------------------------------------------
# Lab values and splits
# ---------------------------------------------------------------------------------------------


def assign_splits(
    sample_ids: Sequence[str], n_folds: int = 5, test_fraction: float = 1 / 6, seed: int = 0
) -> dict[str, int]:
    """Split samples (never scans) into a test split and cross-validation folds.

    The unique sample ids are sorted, shuffled with ``seed``; the first
    ``round(test_fraction * n)`` go to split 0 (test) and the rest to folds
    ``1..n_folds`` round robin. The result depends on the set of ids only.

    Args:
        sample_ids: sample ids (duplicates allowed: several scans of one sample).
        n_folds: number of cross-validation folds.
        test_fraction: share of samples in the test split, in ``[0, 1)``.
        seed: shuffle seed.

    Returns:
        ``{sample_id: split}``, split 0 = test, ``1..n_folds`` = folds.

    Raises:
        InputError: fewer samples outside the test split than folds.
    """
    if n_folds < 1:
        raise ValueError(f"n_folds must be >= 1, got {n_folds}.")
    if not 0 <= test_fraction < 1:
        raise ValueError(f"test_fraction must be >= 0 and < 1, got {test_fraction}.")
    ids = sorted(set(sample_ids))
    n = len(ids)
    n_test = round(test_fraction * n)
    if n - n_test < n_folds:
        raise InputError(
            f"{n} samples leave {n - n_test} outside the test split, fewer than the {n_folds} folds"
        )
    order = np.random.default_rng(seed).permutation(n)
    splits: dict[str, int] = {}
    for rank, i in enumerate(order):
        splits[ids[i]] = 0 if rank < n_test else 1 + (rank - n_test) % n_folds
    return splits


def read_references(
    csv_path: str | os.PathLike,
    scan_ids: Sequence[str],
    targets: Sequence[str],
    on_error: Literal["fail", "skip"] = "fail",
    *,
    root: str | os.PathLike | None = None,
    n_folds: int = 5,
    test_fraction: float = 1 / 6,
    seed: int = 0,
) -> tuple[pd.DataFrame, list[str]]:
    """Read lab values, match them to the scans found, and give every sample a split.

    ``references.csv`` has a ``sample_id`` column, one column per target (``fat``, ...), and
    optionally ``scan_id`` (several scans per sample, one row per scan with the sample's
    values repeated) and ``split`` (integers ``0..n_folds``, 0 = test). Without ``scan_id``
    the sample id is the scan id. Without ``split``, :func:`assign_splits` shuffles samples.

    Args:
        csv_path: the CSV file.
        scan_ids: ids of the scans found on disk.
        targets: target columns to read (at least one).
        on_error: ``"fail"`` raises on the first row or scan that cannot be used; ``"skip"``
            leaves it out and reports it in the returned messages. A missing file, a missing
            column or a bad split column always fail.
        root: where the scans were looked for (for messages); default: the CSV's folder.
        n_folds, test_fraction, seed: passed to :func:`assign_splits` when there is no
            ``split`` column.

    Returns:
        ``(table, skipped)``: one row per usable scan, sorted by ``scan_id``, with columns
        ``scan_id``, ``sample_id``, the targets (float64) and ``split`` (int); and one message
        per left-out row or scan.

    Raises:
        InputError: one line naming the CSV and the problem.
    """
    import pandas as pd

    if on_error not in ("fail", "skip"):
        raise ValueError(f"on_error must be 'fail' or 'skip', got {on_error!r}.")
    if not targets:
        raise ValueError("targets must name at least one column.")
    csv_path = Path(csv_path)
    root = csv_path.parent if root is None else Path(root)
    if not csv_path.is_file():
        raise InputError(f"{csv_path}: reference file not found")
    try:
        df = pd.read_csv(csv_path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as err:
        raise InputError(f"{csv_path}: cannot read as CSV ({str(err).splitlines()[0]})") from None
    df.columns = [str(c).strip() for c in df.columns]
    present = ", ".join(df.columns)
    for col in ("sample_id", *targets):
        if col not in df.columns:
            raise InputError(f"{csv_path}: no column '{col}' (columns: {present})")
    has_scan_col = "scan_id" in df.columns
    has_split = "split" in df.columns
    id_col = "scan_id" if has_scan_col else "sample_id"

    skipped: list[str] = []

    def problem(msg: str) -> None:
        if on_error == "fail":
            raise InputError(msg)
        skipped.append(msg)

    for col in df.columns:
        df[col] = df[col].str.strip()
    df["_line"] = np.arange(len(df)) + 2  # line in the file: 1 is the header

    # Split column: integers 0..n_folds, all or nothing, one per sample.
    if has_split:
        split_num = pd.to_numeric(df["split"], errors="coerce")
        bad = split_num.isna() | (split_num != split_num.round()) | (split_num < 0) | (split_num > n_folds)
        if bad.any():
            row = df[bad].iloc[0]
            raise InputError(
                f"{csv_path} line {row['_line']}: split must be an integer 0..{n_folds}, got {row['split']!r}"
            )
        df["split"] = split_num.astype(int)

    # Rows: ids present, unique, numeric targets.
    keep = np.ones(len(df), dtype=bool)
    seen: dict[str, int] = {}
    for i, r in enumerate(df.to_dict("records")):
        line = r["_line"]
        if not r["sample_id"] or (has_scan_col and not r["scan_id"]):
            problem(f"{csv_path} line {line}: empty {'sample_id' if not r['sample_id'] else 'scan_id'}")
            keep[i] = False
            continue
        key = r[id_col]
        if key in seen:
            raise InputError(f"{csv_path} line {line}: {id_col} '{key}' repeats line {seen[key]}")
        seen[key] = line
    values = {t: pd.to_numeric(df[t], errors="coerce") for t in targets}
    for i in range(len(df)):
        if not keep[i]:
            continue
        for t in targets:
            v = values[t].iloc[i]
            if not np.isfinite(v):
                row = df.iloc[i]
                problem(
                    f"{csv_path} line {row['_line']} ({id_col} '{row[id_col]}'): {t} is "
                    f"{row[t]!r}, not a number"
                )
                keep[i] = False
                break
    for t in targets:
        df[t] = values[t].astype(np.float64)
    reported = set(df.loc[~keep, id_col])  # rows already reported: not again as "no reference row"
    df = df[keep]

    # A sample's rows must agree on its values and split.
    if has_scan_col:
        for col in [*targets, *(["split"] if has_split else [])]:
            n_distinct = df.groupby("sample_id")[col].nunique()
            if (n_distinct > 1).any():
                sample = n_distinct[n_distinct > 1].index[0]
                raise InputError(f"{csv_path}: sample_id '{sample}' has different {col} values on its rows")

    # Match to scans on disk.
    scans = set(scan_ids)
    in_csv = set(df[id_col])
    for key in sorted(in_csv - scans):
        problem(f"{csv_path}: {id_col} '{key}' has no scan under {root}")
    for key in sorted(scans - in_csv - reported):
        problem(f"{csv_path}: scan '{key}' under {root} has no reference row")
    df = df[df[id_col].isin(scans)]
    if df.empty:
        raise InputError(f"{csv_path}: no reference row matches a scan under {root}")

    if not has_scan_col:
        df = df.assign(scan_id=df["sample_id"])
    if not has_split:
        splits = assign_splits(list(df["sample_id"]), n_folds=n_folds, test_fraction=test_fraction, seed=seed)
        df = df.assign(split=df["sample_id"].map(splits).astype(int))
    table = df[["scan_id", "sample_id", *targets, "split"]].sort_values("scan_id").reset_index(drop=True)
    return table, skipped
