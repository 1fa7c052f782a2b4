"""Where scans are on disk: the recorder's folder layout, and the white/dark references that fit a scan.

Specim's recorders write one folder per scan::

    <root>/<id>/capture/<id>.hdr|.raw
    <root>/<id>/capture/WHITEREF_<id>.hdr|.raw
    <root>/<id>/capture/DARKREF_<id>.hdr|.raw

which :func:`discover_scans` finds without configuration. Other layouts are named by glob
patterns relative to the root that contain ``{scan_id}``. Lab values and splits
(``references.csv``) are read by :mod:`chemmap.io.references`.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from chemmap.errors import InputError
from chemmap.io.envi import Scan, find_data_file

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
        refused: why the scan must not be read, one line naming the file ("" when it may):
            its id is no safe file name, or one of its files is a link that leads outside
            the root. Scoring gives it an error row; preprocessing stops.
    """

    scan_id: str
    raw: Path
    white: Path | None
    dark: Path | None
    white_searched: str = ""
    dark_searched: str = ""
    refused: str = ""


# Folders a scan file's links may lead into besides the root: set only around chemmap's score
# stage, whose input is a folder of links to the scanner folder's test scans.
_LINKS_INTO: ContextVar[tuple[Path, ...]] = ContextVar("chemmap_links_into", default=())


@contextlib.contextmanager
def links_may_lead_into(*folders: str | os.PathLike) -> Iterator[None]:
    """While open, :func:`discover_scans` accepts links that lead into ``folders`` too."""
    token = _LINKS_INTO.set(tuple(Path(f).resolve() for f in folders))
    try:
        yield
    finally:
        _LINKS_INTO.reset(token)


def unsafe_id(scan_id: str) -> str | None:
    """Why an id cannot name a file or a Zarr group inside a folder, or None when it can."""
    if not scan_id or scan_id.startswith(".") or ".." in scan_id:
        return "is empty, starts with '.' or contains '..'"
    if any(c in scan_id for c in ("/", "\\")):
        return "contains a path separator ('/' or '\\')"
    if not scan_id.isprintable():
        return "contains a control character (a line break, a tab, a NUL...)"
    return None


def _refusal(root: Path, scan_id: str, headers: Sequence[Path | None]) -> str:
    """:attr:`ScanFiles.refused` of a scan found under ``root``."""
    why = unsafe_id(scan_id)
    if why is not None:
        return f"{headers[0]}: scan id {scan_id!r} {why}; it cannot name the scan's outputs"
    allowed = (root.resolve(), *_LINKS_INTO.get())
    for header in (h for h in headers if h is not None):
        files = [header]
        with contextlib.suppress(InputError):  # a missing data file is the scan's reader's to report
            files.append(find_data_file(header))
        for f in files:
            target = f.resolve()
            if not any(target.is_relative_to(folder) for folder in allowed):
                return f"{f}: a link that leads outside the input folder {root} (to {target}); refusing it"
    return ""


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


def _raw_headers(
    root: Path, pattern: str, white_pattern: str | None, dark_pattern: str | None
) -> dict[str, Path]:
    """``{scan_id: raw header}`` of the files ``pattern`` matches that are not references.

    Raises:
        InputError: two files give the same scan id, or no file matches.
    """
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
    return found


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
        is None here; :func:`check_references` says so when it is needed. A scan whose id is
        no safe file name, or with a file that resolves outside ``root`` (a link leading out;
        see :func:`links_may_lead_into`), has :attr:`ScanFiles.refused` set.

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
    found = _raw_headers(root, pattern, white_pattern, dark_pattern)
    out: list[ScanFiles] = []
    for scan_id in sorted(found):
        raw = found[scan_id]
        white, white_searched = _find_reference(root, white_pattern, WHITE_PREFIX, scan_id, raw, "white")
        dark, dark_searched = _find_reference(root, dark_pattern, DARK_PREFIX, scan_id, raw, "dark")
        refused = _refusal(root, scan_id, (raw, white, dark))
        out.append(ScanFiles(scan_id, raw, white, dark, white_searched, dark_searched, refused))
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
