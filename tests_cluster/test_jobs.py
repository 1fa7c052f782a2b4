"""``chemmap submit`` and ``chemmap jobs`` against a real Ray head on loopback (conftest.py).

The tiny pipeline goes in as a job through the CLI, is followed to its end, and leaves its
stage folders and registered model in an absolute workdir; a job with a bad data folder
fails and says so; the head's token is the front door; two nodes need an MLflow server.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests_cluster.conftest import ROOT, chemmap, clean_env

TINY = ["train.folds=[1]", "train.epochs=1"]  # the CI preset, one fold of one epoch


def _sets(*items: str) -> list[str]:
    return [a for s in items for a in ("--set", s)]


def _one_error_line(res) -> str:
    assert res.returncode == 2, (res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    return lines[0]


def _status(head, job_id: str) -> str:
    res = chemmap("jobs", "status", job_id, "--address", head.address, env=head.env)
    assert res.returncode == 0, res.stderr
    first = res.stdout.strip().splitlines()[0]
    assert first.startswith(f"{job_id} ")
    return first


def _wait_until_ended(head, job_id: str, timeout: float = 120) -> str:
    deadline = time.time() + timeout
    while (line := _status(head, job_id)).split()[1].rstrip(":") not in {"SUCCEEDED", "FAILED", "STOPPED"}:
        assert time.time() < deadline, line
        time.sleep(1)
    return line


def _submit(head, config: Path, *sets: str, env: dict[str, str] | None = None):
    args = ["submit", str(config), "--address", head.address, *_sets(*sets)]
    return chemmap(*args, env=env or head.env)


@pytest.mark.slow
def test_the_tiny_pipeline_runs_as_a_job_and_a_bad_one_fails(ray_head, tmp_path):
    work = tmp_path / "shared"  # absolute, and every node of this cluster sees it
    env = {
        **ray_head.env,
        "AWS_ACCESS_KEY_ID": "chemmap-test-key",
        "MLFLOW_S3_ENDPOINT_URL": "http://127.0.0.1:9",
    }
    good = _submit(ray_head, ROOT / "configs" / "ci.yaml", f"workdir={work}", *TINY, env=env)
    assert good.returncode == 0, good.stderr
    job = good.stdout.strip()
    assert job.startswith("raysubmit_") and "\n" not in job
    assert "AWS_ACCESS_KEY_ID" in good.stderr and "MLFLOW_S3_ENDPOINT_URL" in good.stderr
    assert "Ignoring upload" not in good.stderr  # Ray's per-file packaging notes stay quiet
    bad = _submit(
        ray_head,
        ROOT / "configs" / "ci.yaml",
        f"workdir={tmp_path / 'bad'}",
        "data.source=folder",
        "data.root=/nonexistent/chemmap-scans",
    )
    assert bad.returncode == 0, bad.stderr
    bad_job = bad.stdout.strip()

    # Followed to its end: the logs stream, then the final status.
    follow = chemmap(
        "jobs", "logs", job, "--follow", "--address", ray_head.address, env=ray_head.env, timeout=600
    )
    assert follow.returncode == 0, follow.stderr
    assert follow.stderr.strip().splitlines()[-1] == f"{job} SUCCEEDED", follow.stdout[-3000:]
    assert _status(ray_head, job).startswith(f"{job} SUCCEEDED")

    # Its outputs, in the shared workdir: every stage complete, the model registered.
    for stage in ("synth", "preprocess", "train", "evaluate", "register"):
        assert list((work / stage).glob("*/_COMPLETE.json")), f"{stage} did not complete"
    registered = json.loads(next((work / "register").glob("*/_COMPLETE.json")).read_text())
    from mlflow.tracking import MlflowClient

    mv = MlflowClient(f"sqlite:///{work / 'mlflow.db'}").get_model_version_by_alias(
        registered["name"], "champion"
    )
    assert (mv.name, str(mv.version)) == (registered["name"], str(registered["version"]))

    # The job joined this cluster (its Ray Train workers are this head's actors) and got the
    # submitting shell's object-store variables, never a Ray token.
    info = ray_head.get(f"/api/jobs/{job}")
    env_vars = info["runtime_env"]["env_vars"]
    assert env_vars["AWS_ACCESS_KEY_ID"] == "chemmap-test-key"
    assert env_vars["MLFLOW_S3_ENDPOINT_URL"] == "http://127.0.0.1:9"
    assert not [k for k in env_vars if k.startswith("RAY_")]
    assert info["entrypoint"].startswith("chemmap run configs/ci.yaml --set")
    actors = ray_head.get("/api/v0/actors?limit=10000")["data"]["result"]["result"]
    assert {a["class_name"] for a in actors if a["job_id"] == info["job_id"]} >= {"RayTrainWorker"}

    # The bad job failed, says so, and its log carries chemmap's one line.
    assert _wait_until_ended(ray_head, bad_job).startswith(f"{bad_job} FAILED")
    logs = chemmap("jobs", "logs", bad_job, "--address", ray_head.address, env=ray_head.env)
    assert logs.returncode == 0 and "error: " in logs.stdout and "/nonexistent/chemmap-scans" in logs.stdout
    listed = chemmap("jobs", "list", "--address", ray_head.address, env=ray_head.env)
    assert listed.returncode == 0
    assert {job: "SUCCEEDED", bad_job: "FAILED"}.items() <= {
        line.split()[0]: line.split()[1] for line in listed.stdout.splitlines()
    }.items()
    stop = chemmap("jobs", "stop", bad_job, "--address", ray_head.address, env=ray_head.env)
    assert stop.returncode == 0 and stop.stdout.strip() == f"{bad_job}: had already ended"


def test_a_relative_workdir_is_refused_before_anything_is_uploaded(ray_head):
    # configs/ci.yaml says workdir: ../runs/ci, which would land in the job's vanishing copy.
    line = _one_error_line(_submit(ray_head, ROOT / "configs" / "ci.yaml"))
    assert "workdir='../runs/ci'" in line and "absolute path on storage every node shares" in line


def test_the_token_is_the_front_door(ray_head):
    without = clean_env()  # no RAY_AUTH_MODE: the client sends no token
    line = _one_error_line(chemmap("jobs", "list", "--address", ray_head.address, env=without))
    assert (
        f"Ray at {ray_head.address} requires token authentication" in line and "RAY_AUTH_MODE=token" in line
    )
    wrong = clean_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="not-the-token")
    line = _one_error_line(chemmap("jobs", "list", "--address", ray_head.address, env=wrong))
    assert "refused this token" in line
    unknown = chemmap(
        "jobs", "status", "raysubmit_nosuchjob", "--address", ray_head.address, env=ray_head.env
    )
    assert "raysubmit_nosuchjob" in _one_error_line(unknown)


def test_two_nodes_need_an_mlflow_server(ray_head, tmp_path):
    node = ray_head.add_worker_node(num_cpus=1)
    try:
        deadline = time.time() + 90
        while len(ray_head.get("/nodes?view=summary")["data"]["summary"]) < 2:
            assert time.time() < deadline and node.proc.poll() is None, node.log.read_text()[-2000:]
            time.sleep(0.5)
        res = _submit(ray_head, ROOT / "configs" / "ci.yaml", f"workdir={tmp_path}")
        line = _one_error_line(res)
        assert "cluster.tracking_uri='unset, so sqlite:///" in line and "2 node(s)" in line
        assert "MLflow server" in line
    finally:
        node.stop()
