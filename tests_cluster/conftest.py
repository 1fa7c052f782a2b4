"""A real Ray head on loopback, with its dashboard and token authentication, for the job tests.

These tests run in a pytest session of their own (``make test`` runs ``pytest tests_cluster``
after the main suite): the head's address and token reach only the subprocesses given
:attr:`Head.env`, never this process's environment. The head is ``ray start --head --block``
in a temporary folder of its own, stopped by its process id (``ray stop`` would stop every
Ray on the machine).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
HEAD_CPUS = 3  # two Ray Train workers and the controller
START_TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without any Ray setting, the venv's scripts first on PATH, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


@dataclass
class RayNode:
    """One ``ray start --block`` process and its log."""

    proc: subprocess.Popen
    log: Path

    def stop(self) -> None:
        """SIGTERM to this node's ``ray start``: it stops the processes it started, and only those."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@dataclass
class Head:
    """The running head: its dashboard URL, GCS address, and the client environment with its token."""

    address: str  # http://127.0.0.1:PORT, the dashboard (job submission)
    gcs: str  # 127.0.0.1:PORT, where another node joins
    token: str
    env: dict[str, str]  # RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH, no other Ray variable
    root: Path  # the head's temporary folder (short: Ray's socket paths live under it)
    nodes: list[RayNode] = field(default_factory=list)

    def get(self, path: str) -> dict:
        """GET a dashboard endpoint with the token (the REST API under the job client)."""
        import json

        req = urllib.request.Request(self.address + path, headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())

    def add_worker_node(self, num_cpus: int = 1) -> RayNode:
        """Another node on this machine joined to the head (a two-node cluster on loopback)."""
        node_dir = Path(tempfile.mkdtemp(prefix="w", dir=self.root))
        cmd = [
            str(BIN / "ray"), "start", "--block", "--address", self.gcs, "--node-ip-address", "127.0.0.1",
            "--num-cpus", str(num_cpus), "--temp-dir", str(node_dir / "r"),
            "--dashboard-agent-listen-port", str(free_port()), "--disable-usage-stats",
        ]  # fmt: skip
        node = _start(cmd, self.env, node_dir / "node.log")
        self.nodes.append(node)
        return node


def _start(cmd: list[str], env: dict[str, str], log: Path) -> RayNode:
    # No 30 s drain on SIGTERM (it waits for Ray Serve proxies; there are none here).
    env = {**env, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=log.parent)
    return RayNode(proc, log)


def _wait_for_dashboard(head: Head, node: RayNode) -> None:
    deadline = time.time() + START_TIMEOUT_S
    while True:
        try:
            head.get("/api/version")
            return
        except (urllib.error.URLError, OSError):
            pass
        if node.proc.poll() is not None or time.time() > deadline:
            node.stop()
            raise RuntimeError(f"the Ray head did not start: {node.log.read_text()[-3000:]}")
        time.sleep(0.5)


@pytest.fixture(scope="session")
def ray_head():
    """A Ray head on loopback with the dashboard, ``HEAD_CPUS`` CPUs and token authentication."""
    root = Path(tempfile.mkdtemp(prefix="cmr", dir="/tmp"))
    token_file = root / "auth_token"
    token = secrets.token_hex(32)
    token_file.write_text(token)
    env = clean_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_file))
    port, dash = free_port(), free_port()
    cmd = [
        str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
        "--port", str(port), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
        "--include-dashboard=true", "--num-cpus", str(HEAD_CPUS), "--temp-dir", str(root / "r"),
        "--ray-client-server-port", str(free_port()), "--dashboard-agent-listen-port", str(free_port()),
        "--disable-usage-stats",
    ]  # fmt: skip
    node = _start(cmd, env, root / "head.log")
    head = Head(f"http://127.0.0.1:{dash}", f"127.0.0.1:{port}", token, env, root, [node])
    try:
        _wait_for_dashboard(head, node)
        yield head
    finally:
        for n in reversed(head.nodes):  # workers first, then the head
            n.stop()
        shutil.rmtree(root, ignore_errors=True)


def chemmap(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    """The real CLI in a subprocess, run from the repository (the job's working directory)."""
    return subprocess.run(
        [sys.executable, "-m", "chemmap.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
    )
