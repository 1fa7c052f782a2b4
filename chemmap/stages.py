"""Stage outputs keyed by what made them.

Every stage writes under ``workdir/<stage>/<key>/`` where ``key`` hashes the stage's
resolved config section and the keys of its inputs. The stage writes its outputs, then
the resolved config, then ``_COMPLETE.json`` last (atomically): a folder without that
marker is unfinished, whatever else it holds. A rerun with the same key finds the marker
and does nothing; an interrupted run finds the folder unfinished and resumes or rebuilds
it; the next stage computes its input's key and finds the folder.

Two processes on one workdir: whoever makes a stage folder holds its lock
(:meth:`StageDir.lock`, an ``fcntl.flock`` on ``workdir/.locks/<stage>-<key>.lock``), and another
process that wants the same folder waits for it, then finds it finished (or resumes what a
killed holder left: the kernel drops a lock when its holder dies, however it dies).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import socket
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from chemmap.errors import StorageError
from chemmap.files import write_json_atomic, write_text_atomic

# Bump when a stage's output format changes, so old outputs are not mistaken for new ones.
FORMAT_VERSION = 1
MARKER = "_COMPLETE.json"
LOCKS = ".locks"  # under the workdir: one lock file per stage folder (small, never removed)
# A write refused for want of space: the disk or a quota full, or the file size limit (ulimit -f).
OUT_OF_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


@contextlib.contextmanager
def file_lock(path: Path, what: str, log: Callable[[str], None] = print) -> Iterator[None]:
    """Hold an exclusive ``fcntl.flock`` on ``path`` (created if missing) while the block runs.

    If another process holds it, one line says who (the holder writes its pid, host and start
    into the file) and this one waits. The kernel releases the lock when its holder's
    descriptor closes, so a holder killed by any signal leaves no stale lock. The descriptor
    is close-on-exec: programs the holder starts (Ray, an MLflow server) cannot keep it.
    Local filesystems and NFSv4 honour ``flock`` across hosts; some network filesystems do not.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 300, 0).decode(errors="replace").strip() or "another process"
            log(f"{what}: waiting for {holder} (lock {path})")
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        since = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        os.pwrite(fd, f"chemmap pid {os.getpid()} on {socket.gethostname()} since {since}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


@contextlib.contextmanager
def out_of_space_names(path: Path) -> Iterator[None]:
    """A write refused for want of space (:data:`OUT_OF_SPACE`) inside the block becomes a
    :class:`~chemmap.errors.StorageError` naming the file, or ``path`` when the error names none
    (a Zarr chunk written by a Dask thread)."""
    try:
        yield
    except OSError as err:
        if err.errno not in OUT_OF_SPACE:
            raise
        where = err.filename or path
        raise StorageError(
            f"{where}: {err.strerror or os.strerror(err.errno)} while writing {path}; "
            "the folder is left unfinished: free space and run again to resume"
        ) from err


def stable_hash(obj: Any, length: int = 16) -> str:
    """A short sha256 of a JSON-able object, independent of dict order."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


@dataclass(frozen=True)
class StageDir:
    """One stage output folder."""

    name: str
    key: str
    path: Path
    config: Mapping[str, Any]
    inputs: tuple[str, ...]

    @property
    def marker(self) -> Path:
        return self.path / MARKER

    @property
    def complete(self) -> bool:
        return self.marker.is_file()

    @contextlib.contextmanager
    def lock(self, log: Callable[[str], None] = print) -> Iterator[None]:
        """Hold this folder's lock while making, resuming or clearing it (:func:`file_lock`).

        Check :attr:`complete` once it is held: the process waited for may have finished it.
        A full disk while the block writes is one error naming the folder (:func:`out_of_space_names`).
        """
        lock = self.path.parent.parent / LOCKS / f"{self.name}-{self.key}.lock"
        with file_lock(lock, f"{self.name}: {self.path} is being made by another process", log):
            with out_of_space_names(self.path):
                yield

    def summary(self) -> dict[str, Any]:
        """What the stage recorded on completion (raises if it is not complete)."""
        if not self.complete:
            raise FileNotFoundError(f"stage {self.name} at {self.path} has not completed")
        return json.loads(self.marker.read_text())

    def begin(self, *, fresh: bool = False) -> Path:
        """Create the folder for writing; ``fresh`` removes leftovers of an interrupted run first."""
        if self.complete:
            raise RuntimeError(f"stage {self.name} at {self.path} is already complete")
        if fresh and self.path.exists():
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        return self.path

    def clear(self) -> None:
        """Remove the folder, finished or not (``chemmap run --force``): the marker first, so
        that an interrupted removal leaves an unfinished folder, never a finished-looking one."""
        self.marker.unlink(missing_ok=True)
        shutil.rmtree(self.path, ignore_errors=True)

    def finish(self, summary: Mapping[str, Any] | None = None, resolved_config: str | None = None) -> None:
        """Write the resolved config and then the completion marker, last."""
        cfg_text = resolved_config if resolved_config is not None else yaml.safe_dump(dict(self.config))
        write_text_atomic(self.path / "config.yaml", cfg_text)
        record = {
            "stage": self.name,
            "key": self.key,
            "inputs": list(self.inputs),
            "config": dict(self.config),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "format_version": FORMAT_VERSION,
            **(dict(summary) if summary else {}),
        }
        write_json_atomic(self.marker, record)


def stage_dir(workdir: Path, name: str, config: Mapping[str, Any], inputs: Sequence[str] = ()) -> StageDir:
    """The output folder of stage ``name`` for this config section and these input keys."""
    key = stable_hash({"stage": name, "v": FORMAT_VERSION, "config": config, "inputs": sorted(inputs)})
    return StageDir(name=name, key=key, path=Path(workdir) / name / key, config=config, inputs=tuple(inputs))


def file_entries(paths: Sequence[Path], root: Path | None = None) -> list[list[Any]]:
    """``[name, size, mtime_ns]`` of input files on disk, sorted: cheap (no reading), and it
    changes whenever a scanner rewrites a file. Names are relative to ``root`` when given."""
    entries: list[list[Any]] = []
    for p in sorted(Path(x) for x in paths):
        st = p.stat()
        name = str(p.relative_to(root)) if root else str(p)
        entries.append([name, st.st_size, st.st_mtime_ns])
    return entries


def files_key(paths: Sequence[Path], root: Path | None = None) -> str:
    """A key for input files on disk: a hash of their :func:`file_entries`."""
    return stable_hash(file_entries(paths, root))
