"""Lab values and splits: ``references.csv`` matched to the scans found, and the one split rule.

``references.csv`` has a ``sample_id`` column, one column per target (``fat``, ..., in % from 0
to 100), and optionally ``scan_id`` (several scans per sample, one row per scan with the sample's values
repeated) and ``split`` (integers ``0..n_folds``, 0 = test). Without ``split``, samples (never
scans) are split by :func:`shuffled_splits`, the rule the synthetic scanner uses too.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from chemmap.errors import InputError

if TYPE_CHECKING:
    import pandas as pd

# The paper's protocol: split 0 = test (one sample in six), splits 1-5 = cross-validation folds.
N_FOLDS = 5
TEST_FRACTION = 1 / 6
# Last word of the split shuffle's SeedSequence: the synthetic scanner's word for its split
# stream, kept so that its datasets (and any split drawn before) stay as they are.
SPLIT_STREAM = 5


# ---------------------------------------------------------------------------------------------
# The split rule
# ---------------------------------------------------------------------------------------------


def shuffled_splits(
    n_samples: int, *, seed: int, n_folds: int = N_FOLDS, test_fraction: float = TEST_FRACTION
) -> np.ndarray:
    """Splits of ``n_samples`` samples by a seeded shuffle: the one split rule of chemmap.

    The samples ``0..n_samples-1`` are shuffled with ``seed``; the first
    ``n_test = max(1, round(test_fraction * n_samples))`` go to split 0 (test), the rest to folds
    ``1..n_folds`` round robin. ``test_fraction = 0`` makes no test split.

    Args:
        n_samples: number of samples; sample ``k`` is the ``k``-th of a fixed order (sorted ids).
        seed: shuffle seed.
        n_folds: number of cross-validation folds, >= 1.
        test_fraction: share of samples in the test split, in ``[0, 1)``.

    Returns:
        int64 ``(n_samples,)``: the split of each sample, 0 = test, ``1..n_folds`` = folds.

    Raises:
        ValueError: ``n_folds`` or ``test_fraction`` out of range.
        InputError: fewer samples outside the test split than folds.
    """
    if n_folds < 1:
        raise ValueError(f"n_folds must be >= 1, got {n_folds}.")
    if not 0 <= test_fraction < 1:
        raise ValueError(f"test_fraction must be >= 0 and < 1, got {test_fraction}.")
    n_test = max(1, round(test_fraction * n_samples)) if test_fraction > 0 else 0
    if n_samples - n_test < n_folds:
        raise InputError(
            f"{n_samples} samples leave {n_samples - n_test} outside the test split, "
            f"fewer than the {n_folds} folds"
        )
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), SPLIT_STREAM])))
    order = rng.permutation(n_samples)
    split = np.empty(n_samples, np.int64)
    split[order[:n_test]] = 0
    split[order[n_test:]] = 1 + np.arange(n_samples - n_test) % n_folds
    return split


def assign_splits(
    sample_ids: Sequence[str], n_folds: int = N_FOLDS, test_fraction: float = TEST_FRACTION, seed: int = 0
) -> dict[str, int]:
    """Split samples (never scans) into a test split and cross-validation folds.

    The unique sample ids are sorted and split by :func:`shuffled_splits`, so the result
    depends on the set of ids only, and the synthetic scanner's ``belly0000``, ... get the
    splits its ``references.csv`` gives them.

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
    ids = sorted(set(sample_ids))
    split = shuffled_splits(len(ids), seed=seed, n_folds=n_folds, test_fraction=test_fraction)
    return dict(zip(ids, split.tolist(), strict=True))


# ---------------------------------------------------------------------------------------------
# references.csv
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _RefFile:
    """What the steps of :func:`read_references` need to know about the CSV.

    Attributes:
        path: the CSV (for messages).
        root: where the scans were looked for (for messages).
        id_col: the column that names a scan: ``scan_id`` if present, else ``sample_id``.
        has_split: whether the CSV gives the splits.
    """

    path: Path
    root: Path
    id_col: str
    has_split: bool

    @property
    def has_scan_col(self) -> bool:
        return self.id_col == "scan_id"


@dataclass
class _Problems:
    """Rows and scans that cannot be used: raised at once (``fail``) or collected (``skip``)."""

    on_error: Literal["fail", "skip"]
    messages: list[str] = field(default_factory=list)

    def report(self, msg: str) -> None:
        if self.on_error == "fail":
            raise InputError(msg)
        self.messages.append(msg)


def read_references(
    csv_path: str | os.PathLike,
    scan_ids: Sequence[str],
    targets: Sequence[str],
    on_error: Literal["fail", "skip"] = "fail",
    *,
    root: str | os.PathLike | None = None,
    n_folds: int = N_FOLDS,
    test_fraction: float = TEST_FRACTION,
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
    if on_error not in ("fail", "skip"):
        raise ValueError(f"on_error must be 'fail' or 'skip', got {on_error!r}.")
    if not targets:
        raise ValueError("targets must name at least one column.")
    csv_path = Path(csv_path)
    df = _read_csv(csv_path)
    _check_columns(df, csv_path, ("sample_id", *targets))
    df["_line"] = np.arange(len(df)) + 2  # line in the file: 1 is the header
    ref = _RefFile(
        path=csv_path,
        root=csv_path.parent if root is None else Path(root),
        id_col="scan_id" if "scan_id" in df.columns else "sample_id",
        has_split="split" in df.columns,
    )
    problems = _Problems(on_error)
    if ref.has_split:
        df["split"] = _parse_splits(df, ref, n_folds)
    keep = _rows_with_ids(df, ref, problems)
    keep &= _rows_with_values(df, ref, targets, keep, problems)
    for t in targets:
        df[t] = _numbers(df[t]).astype(np.float64)
    reported = set(df.loc[~keep, ref.id_col])  # rows already reported: not again as "no reference row"
    df = df[keep]
    if ref.has_scan_col:
        _check_samples_agree(df, ref, [*targets, *(["split"] if ref.has_split else [])])
    df = _match_scans(df, ref, scan_ids, reported, problems)
    if not ref.has_scan_col:
        df = df.assign(scan_id=df["sample_id"])
    if not ref.has_split:
        try:
            splits = assign_splits(
                list(df["sample_id"]), n_folds=n_folds, test_fraction=test_fraction, seed=seed
            )
        except InputError as err:  # too few samples: say which file they are from
            raise InputError(f"{ref.path}: {err}") from None
        df = df.assign(split=df["sample_id"].map(splits).astype(int))
    table = df[["scan_id", "sample_id", *targets, "split"]].sort_values("scan_id").reset_index(drop=True)
    return table, problems.messages


def _separator(csv_path: Path) -> str:
    """``;`` when the header line has semicolons and no comma (spreadsheets in locales with a
    decimal comma save CSV so), else ``,``. A decimal comma in a value is then refused as not
    a number, never read as two columns."""
    with open(csv_path, encoding="utf-8-sig", newline="") as fh:
        header = fh.readline()
    return ";" if ";" in header and "," not in header else ","


def _read_csv(csv_path: Path) -> pd.DataFrame:
    """Every cell as stripped text: ids keep their leading zeros, numbers are parsed later.

    UTF-8 with or without a byte order mark; comma- or semicolon-separated (:func:`_separator`).
    """
    import pandas as pd

    if not csv_path.is_file():
        raise InputError(f"{csv_path}: reference file not found")
    try:
        df = pd.read_csv(
            csv_path,
            sep=_separator(csv_path),
            dtype=str,
            keep_default_na=False,
            skipinitialspace=True,
            encoding="utf-8-sig",
        )
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError, OSError) as err:
        raise InputError(f"{csv_path}: cannot read as CSV ({str(err).splitlines()[0]})") from None
    df.columns = [str(c).strip() for c in df.columns]
    twice = df.columns[df.columns.duplicated()]
    if len(twice):  # " fat" and "fat": one column twice once stripped
        raise InputError(f"{csv_path}: column {twice[0]!r} appears twice in the header")
    for col in df.columns:
        df[col] = df[col].str.strip()
    return df


def _check_columns(df: pd.DataFrame, csv_path: Path, required: Sequence[str]) -> None:
    present = ", ".join(c if c.isprintable() else repr(c) for c in df.columns)
    for col in required:
        if col not in df.columns:
            raise InputError(f"{csv_path}: no column '{col}' (columns: {present})")


def _numbers(column: pd.Series) -> pd.Series:
    """Text to numbers; what is not a number becomes NaN."""
    import pandas as pd

    return pd.to_numeric(column, errors="coerce")


def _parse_splits(df: pd.DataFrame, ref: _RefFile, n_folds: int) -> pd.Series:
    """The split column as integers ``0..n_folds``; any other value fails, whatever ``on_error``."""
    split = _numbers(df["split"])
    bad = split.isna() | (split != split.round()) | (split < 0) | (split > n_folds)
    if bad.any():
        row = df[bad].iloc[0]
        raise InputError(
            f"{ref.path} line {row['_line']}: split must be an integer 0..{n_folds}, got {row['split']!r}"
        )
    return split.astype(int)


def _rows_with_ids(df: pd.DataFrame, ref: _RefFile, problems: _Problems) -> np.ndarray:
    """Rows whose ids are present; an id that repeats an earlier row always fails."""
    keep = np.ones(len(df), dtype=bool)
    seen: dict[str, int] = {}
    for i, r in enumerate(df.to_dict("records")):
        line = r["_line"]
        if not r["sample_id"] or (ref.has_scan_col and not r["scan_id"]):
            empty = "sample_id" if not r["sample_id"] else "scan_id"
            problems.report(f"{ref.path} line {line}: empty {empty}")
            keep[i] = False
            continue
        key = r[ref.id_col]
        if key in seen:
            raise InputError(f"{ref.path} line {line}: {ref.id_col} {key!r} repeats line {seen[key]}")
        seen[key] = line
    return keep


def _rows_with_values(
    df: pd.DataFrame, ref: _RefFile, targets: Sequence[str], keep: np.ndarray, problems: _Problems
) -> np.ndarray:
    """Rows (among ``keep``) whose targets are numbers in 0-100 % (a map is in percent, and
    the loss holds it there); one report per bad row."""
    values = {t: _numbers(df[t]) for t in targets}
    ok = np.ones(len(df), dtype=bool)
    for i in np.flatnonzero(keep):
        for t in targets:
            value = values[t].iloc[i]
            if not (np.isfinite(value) and 0.0 <= value <= 100.0):
                row = df.iloc[i]
                why = "not a number" if not np.isfinite(value) else "outside 0-100 %"
                problems.report(
                    f"{ref.path} line {row['_line']} ({ref.id_col} {row[ref.id_col]!r}): {t} is "
                    f"{row[t]!r}, {why}"
                )
                ok[i] = False
                break
    return ok


def _check_samples_agree(df: pd.DataFrame, ref: _RefFile, columns: Sequence[str]) -> None:
    """The rows of one sample (its scans) must give it the same values and split."""
    for col in columns:
        n_distinct = df.groupby("sample_id")[col].nunique()
        if (n_distinct > 1).any():
            sample = n_distinct[n_distinct > 1].index[0]
            raise InputError(f"{ref.path}: sample_id {sample!r} has different {col} values on its rows")


def _match_scans(
    df: pd.DataFrame, ref: _RefFile, scan_ids: Sequence[str], reported: set[str], problems: _Problems
) -> pd.DataFrame:
    """The rows that have a scan; rows without a scan and scans without a row are reported."""
    scans = set(scan_ids)
    in_csv = set(df[ref.id_col])
    for key in sorted(in_csv - scans):
        problems.report(f"{ref.path}: {ref.id_col} {key!r} has no scan under {ref.root}")
    for key in sorted(scans - in_csv - reported):
        problems.report(f"{ref.path}: scan {key!r} under {ref.root} has no reference row")
    df = df[df[ref.id_col].isin(scans)]
    if df.empty:
        raise InputError(f"{ref.path}: no reference row matches a scan under {ref.root}")
    return df
