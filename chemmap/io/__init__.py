"""Reading and writing scans (ENVI), finding them on disk, and reading their lab values."""

from __future__ import annotations

from chemmap.io.envi import Scan, create_envi, open_scan
from chemmap.io.layout import ScanFiles, check_references, discover_scans
from chemmap.io.references import assign_splits, read_references

__all__ = [
    "Scan",
    "ScanFiles",
    "assign_splits",
    "check_references",
    "create_envi",
    "discover_scans",
    "open_scan",
    "read_references",
]
