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

Several scorers may write into one output folder at once (two processes, a watcher and a
batch run, Ray actors on several hosts over a shared file system). They agree through one
lock file per scan, ``<output>/.locks/<scan_id>.lock`` (:func:`acquire_lock`):

- it is created with ``O_CREAT | O_EXCL`` (one creator wins) and holds JSON: the host, the
  process id and its start time (Linux), when the lock was taken (UTC) and a random token;
- while it is held, a thread touches it every ``min(stale_seconds / 4, 60)`` s (a heartbeat);
- its holder is dead, and the lock is broken and taken over, when the holder ran on this
  host and its process is gone (or is a zombie, or the pid now names a younger process),
  or ran on another host and the heartbeat is older than ``stale_seconds``. An unreadable
  (just created) lock file counts as held for ``min(stale_seconds, 30)`` s after its mtime;
- breaking is serialised by a second ``O_EXCL`` file (``<scan_id>.lock.break``): the breaker
  reads the lock again and removes it only when it is still the dead holder's;
- it is released (removed, if it still carries the holder's token) after the scan's
  outputs are in place.

The tables (``summary.csv``, ``samples.csv``) are written under the lock ``.tables`` (a name
no scan id can have). A temporary ``.<scan_id>.zarr.*.tmp`` or ``.<scan_id>.png.*.tmp`` is
removed by :func:`remove_leftovers` only when no live process holds that scan's lock, a
temporary table only when no live process holds ``.tables``. The ``.locks`` folder is
removed when a run ends and it is empty.
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
import socket
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from chemmap.errors import InputError
from chemmap.files import write_text_atomic

__all__ = [
    "DEFAULT_STALE_SECONDS",
    "LOCKS_DIR",
    "MAP_FORMAT",
    "MAP_FORMAT_VERSION",
    "TABLES_LOCK",
    "LockBusy",
    "LockFile",
    "LockInfo",
    "ScanLock",
    "acquire_lock",
    "create_map_array",
    "finish_map_group",
    "holder_alive",
    "lock_path",
    "read_lock",
    "read_map_array",
    "read_map_attrs",
    "read_map_zarr",
    "remove_leftovers",
    "remove_lock_dir",
    "staged_dir",
    "wait_for_lock",
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
_LEFTOVER_OWNER = re.compile(r"^\.(?P<base>.+)\.[0-9a-f]{12}\.tmp$")
# Locks: one file per scan in this folder of the output folder (see the module's docstring).
LOCKS_DIR = ".locks"
TABLES_LOCK = ".tables"  # the lock of summary.csv and samples.csv (a scan id never starts with ".")
TABLES = ("summary.csv", "samples.csv")
# A lock whose holder runs on another host is dead when its heartbeat is older than this (s).
DEFAULT_STALE_SECONDS = 300.0
# A lock file that cannot be read (created, content not yet written) is held this long (s).
UNREADABLE_LOCK_GRACE_S = 30.0
# A break file (a breaker that died while breaking a lock) older than this is removed (s).
BREAK_GRACE_S = 30.0
HOST = socket.gethostname()


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


# ---------------------------------------------------------------------------------------------
# Locks: one scorer per scan (see the module's docstring)
# ---------------------------------------------------------------------------------------------


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """``(state, start time in clock ticks after boot)`` of a process from ``/proc``, None without it."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rfind(")") + 2 :].split()  # after "pid (comm) ": state is field 3, start 22
    try:
        return fields[0], int(fields[19])
    except (IndexError, ValueError):
        return None


def _pid_alive(pid: int, start: int | None) -> bool:
    """Whether process ``pid`` of this host exists, is not a zombie and (if known) started at ``start``."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        pass
    stat = _proc_stat(pid)
    if stat is None:
        return True
    state, started = stat
    return state != "Z" and (start is None or started == start)


@dataclass(frozen=True)
class LockInfo:
    """What a lock file holds.

    Attributes:
        host: the holder's host name.
        pid: the holder's process id on that host.
        started: when the lock was taken, UTC (ISO 8601).
        token: random hex: which lock this is (a broken and retaken lock has another).
        pid_start: the holder process's start time (clock ticks after boot, Linux), or None.
    """

    host: str
    pid: int
    started: str
    token: str
    pid_start: int | None = None

    @classmethod
    def mine(cls) -> LockInfo:
        own = _proc_stat(os.getpid())
        return cls(
            host=HOST,
            pid=os.getpid(),
            started=datetime.now(UTC).isoformat(timespec="seconds"),
            token=secrets.token_hex(8),
            pid_start=own[1] if own else None,
        )

    def describe(self) -> str:
        return f"{self.host} pid {self.pid} (since {self.started})"


@dataclass(frozen=True)
class LockFile:
    """A lock file as read: its content (None when unreadable), mtime (s since the epoch) and inode."""

    info: LockInfo | None
    mtime: float
    inode: int

    def describe(self) -> str:
        return self.info.describe() if self.info else "a scorer that is taking the lock"


def lock_path(output_dir: str | os.PathLike, name: str) -> Path:
    """``<output_dir>/.locks/<name>.lock``: the lock of scan ``name`` (or of :data:`TABLES_LOCK`)."""
    return Path(output_dir) / LOCKS_DIR / f"{name}.lock"


def read_lock(path: Path) -> LockFile | None:
    """The lock file at ``path``, None when there is none."""
    try:
        with open(path, "rb") as fh:
            st = os.fstat(fh.fileno())
            raw = fh.read(4096)
    except FileNotFoundError:
        return None
    try:
        data = json.loads(raw)
        info = LockInfo(
            host=str(data["host"]),
            pid=int(data["pid"]),
            started=str(data.get("started", "")),
            token=str(data["token"]),
            pid_start=None if data.get("pid_start") is None else int(data["pid_start"]),
        )
    except (ValueError, TypeError, KeyError):
        info = None
    return LockFile(info, st.st_mtime, st.st_ino)


def holder_alive(lock: LockFile, stale_seconds: float = DEFAULT_STALE_SECONDS) -> bool:
    """Whether a lock's holder may still be working (the rule in the module's docstring)."""
    age = time.time() - lock.mtime
    if lock.info is None:
        return age < min(stale_seconds, UNREADABLE_LOCK_GRACE_S)
    if lock.info.host == HOST:
        return _pid_alive(lock.info.pid, lock.info.pid_start)
    return age < stale_seconds


class LockBusy(Exception):
    """The lock is held by a live scorer (``holder``: its lock file as read)."""

    def __init__(self, path: Path, holder: LockFile | None) -> None:
        self.path, self.holder = path, holder
        super().__init__(f"{path}: held by {holder.describe() if holder else 'another scorer'}")


class ScanLock:
    """A held lock: a heartbeat thread keeps its mtime fresh until :meth:`release`.

    Attributes:
        path: the lock file.
        info: what it holds.
        lost: the lock file went away while held (broken by a scorer that judged us dead).
    """

    def __init__(self, path: Path, info: LockInfo, heartbeat_seconds: float) -> None:
        self.path, self.info, self.lost = path, info, False
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._beat, args=(heartbeat_seconds,), name=f"lock {path.name}", daemon=True
        )
        self._thread.start()

    def _beat(self, every: float) -> None:
        while not self._stop.wait(every):
            try:
                os.utime(self.path)
            except FileNotFoundError:
                self.lost = True
                return
            except OSError:
                continue

    def release(self) -> None:
        """Stop the heartbeat and remove the lock file if it is still this lock."""
        self._stop.set()
        self._thread.join()
        now = read_lock(self.path)
        if now is not None and now.info is not None and now.info.token == self.info.token:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> ScanLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _remove_old_guard(guard: Path) -> None:
    """Remove a break file whose breaker died while breaking (older than :data:`BREAK_GRACE_S`)."""
    with contextlib.suppress(OSError):
        if time.time() - guard.stat().st_mtime > BREAK_GRACE_S:
            guard.unlink()


def _break_lock(path: Path, seen: LockFile, stale_seconds: float) -> None:
    """Remove a dead holder's lock, unless another scorer is breaking it or it changed meanwhile."""
    guard = path.with_name(path.name + ".break")
    try:
        os.close(os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
    except FileExistsError:
        _remove_old_guard(guard)
        return
    except FileNotFoundError:  # the lock and its folder are gone already
        return
    try:
        now = read_lock(path)
        same = now is not None and now.inode == seen.inode and now.info == seen.info
        if same and not holder_alive(now, stale_seconds):
            path.unlink(missing_ok=True)
    finally:
        guard.unlink(missing_ok=True)


def _create_lock(path: Path) -> LockInfo | None:
    """Create the lock file with ``O_EXCL`` and write this process's info; None if it exists."""
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileNotFoundError:  # no .locks folder (yet, or a run ending removed it)
            path.parent.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            return None
    info = LockInfo.mine()
    try:
        os.write(fd, json.dumps(asdict(info)).encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    return info


def acquire_lock(
    output_dir: str | os.PathLike, name: str, *, stale_seconds: float = DEFAULT_STALE_SECONDS
) -> ScanLock:
    """Take the lock of scan ``name`` in ``output_dir``, breaking a dead holder's.

    Args:
        output_dir: the scoring output folder.
        name: a scan id (checked by the caller) or :data:`TABLES_LOCK`.
        stale_seconds: a holder on another host is dead when its heartbeat is older (s).

    Returns:
        The held lock (a context manager that releases it).

    Raises:
        LockBusy: a live scorer holds it.
    """
    path = lock_path(output_dir, name)
    for _ in range(200):
        info = _create_lock(path)
        if info is not None:
            return ScanLock(path, info, min(stale_seconds / 4.0, 60.0))
        seen = read_lock(path)
        if seen is None:  # released meanwhile
            continue
        if holder_alive(seen, stale_seconds):
            raise LockBusy(path, seen)
        _break_lock(path, seen, stale_seconds)
        time.sleep(0.005)
    raise LockBusy(path, read_lock(path))


@contextlib.contextmanager
def wait_for_lock(
    output_dir: Path, name: str, *, stale_seconds: float, timeout: float = 60.0
) -> Iterator[ScanLock | None]:
    """Hold a lock that is held only briefly (the tables'), waiting up to ``timeout`` seconds.

    Yields None (the caller goes on without it) when a live holder keeps it longer.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            lock = acquire_lock(output_dir, name, stale_seconds=stale_seconds)
            break
        except LockBusy:
            if time.monotonic() > deadline:
                yield None
                return
            time.sleep(0.01)
    with lock:
        yield lock


def _leftover_owner(name: str) -> str | None:
    """The lock a temporary name belongs to: its scan's, the tables', or None (no lock)."""
    m = _LEFTOVER_OWNER.match(name)
    base = m.group("base") if m else ""
    for suffix in (".zarr", ".png"):
        if base.endswith(suffix) and len(base) > len(suffix):
            return base[: -len(suffix)]
    return TABLES_LOCK if base in TABLES else None


def _lock_held(folder: Path, name: str | None, stale_seconds: float) -> bool:
    if name is None:
        return False
    lock = read_lock(lock_path(folder, name))
    return lock is not None and holder_alive(lock, stale_seconds)


def remove_leftovers(folder: Path, *, stale_seconds: float = DEFAULT_STALE_SECONDS) -> list[Path]:
    """Remove what interrupted scorers left in ``folder``: dead locks and their temporary files.

    Only chemmap's own temporary names (``.<name>.<12 hex digits>.tmp``) are touched, and
    only those whose lock (the scan's, or the tables' for ``summary.csv`` and ``samples.csv``)
    is not held by a live process, so a scorer running beside this one keeps its files.

    Returns:
        The temporary files and folders removed.
    """
    if not folder.is_dir():
        return []
    locks = folder / LOCKS_DIR
    for path in sorted(locks.glob("*.lock")) if locks.is_dir() else []:
        seen = read_lock(path)
        if seen is not None and not holder_alive(seen, stale_seconds):
            _break_lock(path, seen, stale_seconds)
    for guard in sorted(locks.glob("*.lock.break")) if locks.is_dir() else []:
        _remove_old_guard(guard)
    removed = []
    for p in sorted(folder.iterdir()):
        if _LEFTOVER.match(p.name) and not _lock_held(folder, _leftover_owner(p.name), stale_seconds):
            _remove(p)
            removed.append(p)
    return removed


def remove_lock_dir(folder: Path) -> None:
    """Remove ``folder/.locks`` if it is empty (no scorer holds a lock there)."""
    with contextlib.suppress(OSError):
        (folder / LOCKS_DIR).rmdir()


# ---------------------------------------------------------------------------------------------
# Maps
# ---------------------------------------------------------------------------------------------


def _check_map(shape: tuple[int, ...], mask_shape: tuple[int, ...], targets: Sequence[str]) -> None:
    """Maps of ``shape`` ``(T, y, x)``, a mask of ``mask_shape`` ``(y, x)`` and T target names."""
    if len(shape) != 3:
        raise ValueError(f"maps must be (target, y, x), got shape {shape}")
    if tuple(mask_shape) != tuple(shape[1:]):
        raise ValueError(f"mask must be (y, x) = {tuple(shape[1:])}, got shape {tuple(mask_shape)}")
    if len(targets) != shape[0]:
        raise ValueError(f"got {len(targets)} target names for {shape[0]} maps")


def create_map_array(
    folder: Path, shape: tuple[int, int, int], *, chunk_lines: int = MAP_CHUNK, units: str = "%"
) -> Any:
    """A new map group in ``folder`` (replaced) with its empty float32 ``map`` array ``(T, y, x)``,
    chunked ``(1, chunk_lines, x)``: one tile row of a scan per chunk, so that the one writer of a
    streamed map writes each chunk once, whole. Finish the group with :func:`finish_map_group`."""
    import zarr

    _, h, w = shape
    group = zarr.open_group(str(folder), mode="w", zarr_format=3)
    return group.create_array(
        "map",
        shape=shape,
        dtype="float32",
        chunks=(1, max(1, min(h, chunk_lines)), max(1, w)),
        fill_value=np.nan,
        dimension_names=("target", "y", "x"),
        attributes={"units": units},
    )


def read_map_array(folder: Path) -> np.ndarray:
    """The ``map`` array of a map group in ``folder``, complete or not: ``(T, y, x)`` float32."""
    import zarr

    return np.asarray(zarr.open_array(str(Path(folder) / "map"), mode="r")[...], dtype=np.float32)


def finish_map_group(
    folder: Path, mask: np.ndarray, *, targets: Sequence[str], attrs: Mapping[str, Any], units: str = "%"
) -> None:
    """Complete the map group in ``folder`` whose ``map`` array is written: the mask and target
    arrays, then the attributes with the metadata consolidated (what xarray opens fastest), and
    ``complete: true`` last of all."""
    import warnings

    import zarr

    mask = np.asarray(mask, dtype=bool)
    group = zarr.open_group(str(folder), mode="r+")
    t, h, w = group["map"].shape
    _check_map((t, h, w), mask.shape, targets)
    chunk = (min(h, MAP_CHUNK), min(w, MAP_CHUNK))
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


def write_map_group(
    folder: Path,
    maps: np.ndarray,
    mask: np.ndarray,
    *,
    targets: Sequence[str],
    attrs: Mapping[str, Any],
    units: str = "%",
) -> None:
    """Write a map group into ``folder`` in place (no staging; see :func:`write_map_zarr`):
    :func:`create_map_array`, the maps, :func:`finish_map_group`."""
    maps = np.asarray(maps, dtype=np.float32)
    mask = np.asarray(mask, dtype=bool)
    _check_map(maps.shape, mask.shape, targets)
    arr = create_map_array(folder, maps.shape, units=units)
    arr[...] = maps
    finish_map_group(folder, mask, targets=targets, attrs=attrs, units=units)


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
