"""User-facing errors: one clear line naming the file, key or value."""

from __future__ import annotations


class ChemmapError(Exception):
    """Base class for errors caused by input the user controls (files, config, references).

    The CLI prints ``str(err)`` as a single line and exits with status 2, no traceback.
    """


class ConfigError(ChemmapError, ValueError):
    """A configuration file or override is invalid."""


class InputError(ChemmapError, ValueError):
    """A scan, reference file or dataset on disk is missing, truncated or inconsistent."""


class StorageError(ChemmapError):
    """The output's storage refused a write: disk full, quota, or the file size limit; names the path."""
