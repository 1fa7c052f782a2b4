"""Shared by the fault tests: the installed ``chemmap`` command as a real process, watched and signalled.

:class:`Chemmap` starts the command with its output in a log file (never a pipe that could
fill), waits for lines in that log with a deadline (:meth:`Chemmap.wait_for`), and sends
it real signals. :func:`reap` deals with what a killed driver leaves behind (Ray's agents).
Every wait polls with a deadline: the tests run on a slow shared machine.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[2]
CI = ROOT / "configs" / "ci.yaml"
CHEMMAP = Path(sys.executable).with_name("chemmap")
SLOW = 600.0  # seconds any single wait may take on a loaded 2-core machine before the test fails


def env() -> dict[str, str]:
    """This environment without a Ray cluster or tracking server to join; output unbuffered."""
    drop = ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")
    return {**{k: v for k, v in os.environ.items() if k not in drop}, "PYTHONUNBUFFERED": "1"}


def sets(workdir: Path, *extra: str, tracking: str | None = None) -> list[str]:
    """``--set`` options: the workdir, a tracking store (SQLite in the workdir unless given), ``extra``."""
    uri = tracking or f"sqlite:///{workdir / 'mlflow.db'}"
    out = []
    for s in (f"workdir={workdir}", f"cluster.tracking_uri={uri}", *extra):
        out += ["--set", s]
    return out


def with_dataset(tiny_dataset, workdir: Path) -> Path:
    """A new workdir that finds the session's tiny dataset (its preprocess index, nothing else).

    ``chemmap train`` (and ``run --from train``) there trains on that dataset without copying it.
    """
    sets_, _ = tiny_dataset
    source = Path(sets_[0].split("=", 1)[1]) / "preprocess" / "index.json"
    (workdir / "preprocess").mkdir(parents=True)
    shutil.copyfile(source, workdir / "preprocess" / "index.json")
    return workdir


def scanner_folder(data, folder: Path) -> Path:
    """A scanner's folder holding the raw scans of ``data`` (a ``Dataset``), hard-linked: no copy,
    and no symbolic link (scoring refuses links that lead out of its input folder)."""
    root = Path(data.scan_table[0]["raw"]).parents[2]  # <root>/<id>/capture/<id>.hdr
    for sid in data.scan_ids:
        shutil.copytree(root / sid, folder / sid, copy_function=os.link)
    return folder


class Chemmap:
    """``chemmap ARGS`` in a real process, stdout and stderr in ``log``.

    Args:
        args: the command's arguments.
        log: the file its output goes to.
        preexec_fn: run in the child before ``chemmap`` starts (e.g. a resource limit).
    """

    def __init__(
        self, args: list[str], log: Path, preexec_fn: Callable[[], None] | None = None, start: bool = True
    ) -> None:
        self.args, self.log, self.preexec_fn = [str(CHEMMAP), *map(str, args)], log, preexec_fn
        self.proc: subprocess.Popen | None = None
        if start:
            self.start()

    @classmethod
    def later(cls, args: list[str], log: Path, **kw) -> Chemmap:
        """Not started yet: :meth:`start` starts it."""
        return cls(args, log, start=False, **kw)

    def start(self) -> None:
        with open(self.log, "w") as fh:
            self.proc = subprocess.Popen(
                self.args,
                cwd=ROOT,
                stdout=fh,
                stderr=subprocess.STDOUT,
                env=env(),
                preexec_fn=self.preexec_fn,
            )
        self.pid = self.proc.pid

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, pattern: str, timeout: float = SLOW, after: int = 0) -> re.Match:
        """The first match of ``pattern`` (a regex, multiline) in the output from character
        ``after`` on, once it is there. Fails when the process ends without it or ``timeout`` passes.
        """
        rx = re.compile(pattern, re.M)
        deadline = time.monotonic() + timeout
        while True:
            text = self.text()
            if m := rx.search(text, after):
                return m
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"chemmap ended ({self.proc.returncode}) before {pattern!r}:\n{text[-3000:]}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"no {pattern!r} after {timeout:.0f} s:\n{text[-3000:]}")
            time.sleep(0.05)

    def descendants(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def send(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = SLOW) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"chemmap still running after {timeout:.0f} s:\n{self.text()[-3000:]}"
            ) from None

    def stop(self) -> None:
        """Kill it and what it started, if still running (a failed test's cleanup)."""
        if self.proc is not None and self.proc.poll() is None:
            kids = self.descendants()
            self.proc.kill()
            self.proc.wait()
            reap(kids, grace=0)

    def __enter__(self) -> Chemmap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def run(args: list[str], log: Path, timeout: float = SLOW, **kw) -> tuple[int, str]:
    """Run ``chemmap ARGS`` to its end: ``(exit status, output)``."""
    with Chemmap(args, log, **kw) as c:
        return c.wait(timeout), c.text()


def reap(procs: list[psutil.Process], grace: float = 20.0) -> list[str]:
    """Wait up to ``grace`` s for processes a killed command started to end; SIGKILL the rest.

    Only these processes (descendants recorded before the kill) are touched. Returns the names
    of those that had to be killed: what the kill left running.
    """
    deadline = time.monotonic() + grace
    alive = procs
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if _running(p)]
        time.sleep(0.1)
    left = []
    for p in alive:
        if _running(p):
            try:
                left.append(p.name())
                p.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
    return left


def _running(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_until(condition: Callable[[], object], timeout: float = SLOW, what: str = "condition") -> object:
    """Poll ``condition`` until it returns something true; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)
    return value


def stage_folders(workdir: Path, stage: str) -> list[Path]:
    return sorted(p for p in (workdir / stage).glob("*") if p.is_dir())


def complete(folder: Path) -> bool:
    return (folder / "_COMPLETE.json").is_file()


def read_json(path: Path):
    return json.loads(Path(path).read_text())


def _no_paths(obj):
    """``obj`` without the ``raw`` entries (paths of the raw scans, which differ between workdirs)."""
    if isinstance(obj, dict):
        return {k: _no_paths(v) for k, v in obj.items() if k != "raw"}
    if isinstance(obj, list):
        return [_no_paths(v) for v in obj]
    return obj


def dataset_differences(a: Path, b: Path) -> list[str]:
    """What differs between two ``dataset.zarr`` stores: the members, every array's values (NaN
    equal to NaN) and every group's attributes, the raw scans' paths aside. [] when equal."""
    import numpy as np
    import zarr

    ga, gb = zarr.open_group(a, mode="r"), zarr.open_group(b, mode="r")
    ma, mb = dict(ga.members(max_depth=None)), dict(gb.members(max_depth=None))
    diffs = [f"only in one: {sorted(ma.keys() ^ mb.keys())}"] if ma.keys() != mb.keys() else []
    for name in sorted(ma.keys() & mb.keys()):
        x, y = ma[name], mb[name]
        if isinstance(x, zarr.Array):
            if x.shape != y.shape or not np.array_equal(x[...], y[...], equal_nan=x.dtype.kind == "f"):
                diffs.append(f"{name}: values")
        elif _no_paths(dict(x.attrs)) != _no_paths(dict(y.attrs)):
            diffs.append(f"{name}: attributes")
    if _no_paths(dict(ga.attrs)) != _no_paths(dict(gb.attrs)):
        diffs.append("root attributes")
    return diffs


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """A real ``mlflow server`` (SQLite backend, artifacts beside it) on a loopback port, that
    can be killed and started again on the same port with the same store."""

    def __init__(self, folder: Path, port: int | None = None) -> None:
        self.folder, self.port = folder, port or free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        folder.mkdir(parents=True, exist_ok=True)

    def start(self, timeout: float = SLOW) -> MlflowServer:
        import urllib.request

        cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri"]
        cmd += [
            f"sqlite:///{self.folder / 'mlflow.db'}",
            "--artifacts-destination",
            str(self.folder / "artifacts"),
        ]
        cmd += ["--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"]
        with open(self.folder / "server.log", "a") as log:  # its own session: killed with its workers
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

        def up() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"mlflow server ended: {(self.folder / 'server.log').read_text()[-2000:]}"
                )
            try:
                with urllib.request.urlopen(self.uri + "/health", timeout=2) as r:
                    return r.status == 200
            except OSError:
                return False

        wait_until(up, timeout, "the MLflow server")
        return self

    def kill(self) -> None:
        """Down at once, as a crash takes it (SIGKILL to the server and its workers)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None


def recorded_checkpoints(workdir: Path) -> list[dict]:
    """The metrics of the checkpoints Ray Train has recorded for the training under ``workdir``:
    what a restart resumes from. A checkpoint is recorded a little after its epoch is reported
    (and its line printed), later still on a loaded machine; [] while none is."""
    out = []
    for snap in workdir.glob("train/*/ray/*/checkpoint_manager_snapshot.json"):
        try:
            out += [c.get("metrics", {}) for c in json.loads(snap.read_text()).get("checkpoint_results", [])]
        except (OSError, ValueError):
            pass  # being written
    return out
