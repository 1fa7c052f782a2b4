"""Model URIs and tracking servers that do not exist or do not answer: one line, quickly, no hang.

``chemmap score`` and ``chemmap run`` as subprocesses against an empty SQLite registry, a
closed loopback port and a port that accepts connections but never answers.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from tests.reliability.relkit import CI_CONFIG, chemmap, one_error_line, scanner_folder

pytestmark = pytest.mark.slow  # each test runs the CLI once (2-8 s)


@pytest.fixture(scope="module")
def scans(tmp_path_factory):
    return scanner_folder(tmp_path_factory.mktemp("tracking") / "scans", n=1)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the block ends: nothing listens there


@pytest.fixture
def silent_server():
    """A loopback port that accepts TCP connections (the kernel's backlog) and never answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        yield f"http://127.0.0.1:{s.getsockname()[1]}"


def _score(scans: Path, out: Path, model: str, *extra: str):
    t0 = time.monotonic()
    proc = chemmap(
        "score", scans, "--model", model, "--output", out, "-q", *extra, env={"HOME": str(out.parent)}
    )
    return proc, time.monotonic() - t0


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """An existing, empty SQLite registry (made here: MLflow logs the making of a new store)."""
    from chemmap import tracking

    uri = f"sqlite:///{tmp_path_factory.mktemp('registry') / 'mlflow.db'}"
    assert tracking.client(uri).search_registered_models() == []
    return uri


def test_a_registered_model_that_does_not_exist(scans, tmp_path, registry):
    uri = registry
    proc, _ = _score(scans, tmp_path / "maps", "models:/nope@champion", "--tracking-uri", uri)
    one_error_line(proc, "models:/nope@champion: no registered model 'nope'")
    assert not (tmp_path / "maps").exists()


def test_a_model_uri_that_is_not_one(scans, tmp_path, registry):
    proc, _ = _score(scans, tmp_path / "maps", "models:/nope", "--tracking-uri", registry)
    one_error_line(proc, "'models:/nope': not a registered model version (expected models:/NAME@ALIAS")


def test_a_tracking_server_that_does_not_exist(scans, tmp_path):
    uri = f"http://127.0.0.1:{_closed_port()}"
    proc, seconds = _score(scans, tmp_path / "maps", "models:/fat@champion", "--tracking-uri", uri)
    one_error_line(proc, f"mlflow.tracking_uri: cannot reach MLflow server at {uri}", "Connection refused")
    assert seconds < 60 and not (tmp_path / "maps").exists()


def test_a_tracking_server_that_does_not_answer(scans, tmp_path, silent_server):
    proc, seconds = _score(scans, tmp_path / "maps", "models:/fat@champion", "--tracking-uri", silent_server)
    one_error_line(proc, f"mlflow.tracking_uri: cannot reach MLflow server at {silent_server}", "timed out")
    assert seconds < 60, seconds  # the check waits 5 s for an answer, never MLflow's minutes of retries


def test_chemmap_run_with_an_unreachable_tracking_server_stops_before_any_stage(tmp_path):
    uri = f"http://127.0.0.1:{_closed_port()}"
    cfg = tmp_path / "p.yaml"
    cfg.write_text(f"base: {CI_CONFIG}\nworkdir: runs\ncluster:\n  tracking_uri: {uri}\n")
    one_error_line(chemmap("run", cfg, "-q"), f"cannot reach MLflow server at {uri}")
    assert not (tmp_path / "runs").exists()
