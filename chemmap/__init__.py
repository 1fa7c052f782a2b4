"""chemmap: hyperspectral scans to chemical maps."""

from __future__ import annotations

__version__ = "0.1.0"
