"""What scoring leaves on disk: maps as Zarr v3 groups, CSV tables, no half-written files.

A map is a Zarr v3 group that ``xarray.open_zarr`` reads::

    <name>.zarr/
      map     float32 (target, y, x)  the chemical maps in ``units`` (% by default), NaN outside the mask
      mask    bool    (y, x)          the sample's pixels
      target  str     (target,)       the coordinate: target names, in the map's order
      attrs:  format, format_version, targets, units, what the writer adds, and ``complete: true``
              (written last)

A group is written under a hidden temporary name beside its final one
(``.<name>.zarr.<random>.tmp``) and renamed into place only when complete, so a map that is
there is whole; :func:`remove_leftovers` clears what an interrupted run left behind. The
evaluate stage writes its test maps with :func:`write_map_zarr` too.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import re
import secrets
import shutil
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from chemmap.errors import InputError
from chemmap.files import write_text_atomic

__all__ = [
    "MAP_FORMAT",
    "MAP_FORMAT_VERSION",
    "read_map_attrs",
    "read_map_zarr",
    "remove_leftovers",
    "staged_dir",
    "write_csv_atomic",
    "write_map_group",
    "write_map_zarr",
]

MAP_FORMAT = "chemmap-map"
MAP_FORMAT_VERSION = 1
MAP_CHUNK = 1024  # px per chunk side of map and mask
# Temporary names chemmap leaves beside a file or folder it writes: ``.<name>.<12 hex>.tmp``
# (chemmap.files.atomic_path for files, staged_dir for map folders).
_LEFTOVER = re.compile(r"^\..+\.[0-9a-f]{12}\.tmp$")


def _temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")


@contextlib.contextmanager
def staged_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a new empty folder beside ``path``; on success it replaces ``path``, on error it goes.

    An old ``path`` is first renamed to a temporary name and removed after the new folder is
    in place, so ``path`` is never a mix of both. A process killed inside the block leaves
    only hidden ``*.tmp`` folders (:func:`remove_leftovers`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = _temp_name(path)
        try:
            tmp.mkdir()
            break
        except FileExistsError:
            continue
    try:
        yield tmp
        old = None
        if path.exists() or path.is_symlink():
            old = _temp_name(path)
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            _remove(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_leftovers(folder: Path) -> list[Path]:
    """Remove the temporary files and folders an interrupted run left in ``folder``.

    Only chemmap's own temporary names (``.<name>.<12 hex digits>.tmp``) are touched. Two
    runs writing into one folder at the same time are not supported.

    Returns:
        What was removed.
    """
    if not folder.is_dir():
        return []
    removed = [p for p in sorted(folder.iterdir()) if _LEFTOVER.match(p.name)]
    for p in removed:
        _remove(p)
    return removed


def _check_map(maps: np.ndarray, mask: np.ndarray, targets: Sequence[str]) -> None:
    if maps.ndim != 3:
        raise ValueError(f"maps must be (target, y, x), got shape {maps.shape}")
    if mask.shape != maps.shape[1:]:
        raise ValueError(f"mask must be (y, x) = {maps.shape[1:]}, got shape {mask.shape}")
    if len(targets) != maps.shape[0]:
        raise ValueError(f"got {len(targets)} target names for {maps.shape[0]} maps")


def write_map_group(
    folder: Path,
    maps: np.ndarray,
    mask: np.ndarray,
    *,
    targets: Sequence[str],
    attrs: Mapping[str, Any],
    units: str = "%",
) -> None:
    """Write a map group into ``folder`` in place (no staging; see :func:`write_map_zarr`).

    Arrays first, then the attributes with the metadata consolidated (what xarray opens
    fastest), and ``complete: true`` last of all.
    """
    import warnings

    import zarr

    maps = np.asarray(maps, dtype=np.float32)
    mask = np.asarray(mask, dtype=bool)
    _check_map(maps, mask, targets)
    t, h, w = maps.shape
    chunk = (min(h, MAP_CHUNK), min(w, MAP_CHUNK))
    group = zarr.open_group(str(folder), mode="w", zarr_format=3)
    arr = group.create_array(
        "map",
        shape=maps.shape,
        dtype="float32",
        chunks=(1, *chunk),
        fill_value=np.nan,
        dimension_names=("target", "y", "x"),
        attributes={"units": units},
    )
    arr[...] = maps
    arr = group.create_array("mask", shape=mask.shape, dtype="bool", chunks=chunk, dimension_names=("y", "x"))
    arr[...] = mask
    arr = group.create_array("target", shape=(t,), dtype=str, dimension_names=("target",))
    arr[...] = np.array([str(name) for name in targets])
    meta = {k: v for k, v in attrs.items() if k != "complete"}
    meta |= {
        "format": MAP_FORMAT,
        "format_version": MAP_FORMAT_VERSION,
        "targets": list(targets),
        "units": units,
    }
    group.attrs.update(meta)
    with warnings.catch_warnings():  # "not part of the v3 spec": xarray and zarr-python read it
        warnings.simplefilter("ignore")
        zarr.consolidate_metadata(str(folder))
    zarr.open_group(str(folder), mode="r+").attrs["complete"] = True


def write_map_zarr(
    path: str | os.PathLike,
    maps: np.ndarray,
    mask: np.ndarray,
    *,
    targets: Sequence[str],
    attrs: Mapping[str, Any],
    units: str = "%",
) -> Path:
    """Write chemical maps as a Zarr v3 group, atomically (see the module's docstring).

    Args:
        path: the group folder, e.g. ``out/belly0001_a.zarr`` (replaced if it exists).
        maps: ``(targets, y, x)`` float32 in ``units``, NaN outside the mask.
        mask: ``(y, x)`` bool sample pixels.
        targets: the target names, one per map (the ``target`` coordinate).
        attrs: JSON-able group attributes (model, recipe, scan...); ``complete`` is set by
            this function, last.
        units: the maps' units.

    Returns:
        ``path``.

    Raises:
        ValueError: shapes that do not fit together.
    """
    path = Path(path)
    with staged_dir(path) as tmp:
        write_map_group(tmp, maps, mask, targets=targets, attrs=attrs, units=units)
    return path


def read_map_attrs(path: str | os.PathLike) -> dict[str, Any] | None:
    """The attributes of a complete map group, or None when there is none (or only part of one)."""
    try:
        meta = json.loads((Path(path) / "zarr.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    attrs = meta.get("attributes") if isinstance(meta, dict) else None
    if not isinstance(attrs, dict) or attrs.get("complete") is not True:
        return None
    return attrs


def read_map_zarr(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Read a map group written by :func:`write_map_zarr`.

    Returns:
        ``(maps (targets, y, x) float32, mask (y, x) bool, attrs)``.

    Raises:
        InputError: no map there, an incomplete one (an interrupted write), or arrays missing.
    """
    import zarr

    path = Path(path)
    attrs = read_map_attrs(path)
    if attrs is None:
        raise InputError(f"{path}: no complete chemmap map here (missing, or an interrupted write)")
    group = zarr.open_group(str(path), mode="r")
    missing = [k for k in ("map", "mask") if k not in group]
    if missing:
        raise InputError(f"{path}: the map group has no {' or '.join(missing)} array")
    maps = np.asarray(group["map"][...], dtype=np.float32)
    mask = np.asarray(group["mask"][...], dtype=bool)
    if maps.ndim != 3 or mask.shape != maps.shape[1:]:
        raise InputError(f"{path}: map {maps.shape} and mask {mask.shape} do not fit together")
    return maps, mask, attrs


def write_csv_atomic(path: Path, columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> Path:
    """A CSV with these columns (missing values empty, extra keys ignored), written atomically."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    return write_text_atomic(path, buf.getvalue())
