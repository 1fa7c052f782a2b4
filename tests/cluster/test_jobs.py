"""What ``chemmap submit`` checks before it reaches a cluster (no Ray here: tests_cluster/ has the head)."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from chemmap.cluster.jobs import (
    api_address,
    check_job_config,
    check_tracking_for_nodes,
    config_in_working_dir,
    entrypoint,
    passed_env,
    runtime_env,
)
from chemmap.config import load_config
from chemmap.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
CI = ROOT / "configs" / "ci.yaml"


def _cfg(*sets: str):
    return load_config(CI, ["workdir=/shared/chemmap", *sets])


def test_the_address_is_the_option_else_ray_api_server_address_else_ray_address():
    env = {"RAY_API_SERVER_ADDRESS": "http://api:8265", "RAY_ADDRESS": "http://ray:8265"}
    assert api_address("http://given:8265/", env) == "http://given:8265"
    assert api_address(None, env) == "http://api:8265"
    assert api_address(None, {"RAY_ADDRESS": "http://ray:8265"}) == "http://ray:8265"
    with pytest.raises(ConfigError, match=r"--address: no Ray cluster given"):
        api_address(None, {})


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["workdir=~/runs"], r"workdir='~/runs': .*absolute path on storage every node shares"),
        (["workdir=s3://bucket/runs"], r"workdir='s3://bucket/runs'"),
        (["cluster.storage_path=ckpt"], r"cluster\.storage_path='ckpt' is relative"),
        (["data.source=folder", "data.root=scans"], r"data\.root='scans' is relative"),
        (["cluster.tracking_uri=sqlite:///mlflow.db"], r"'sqlite:///mlflow\.db' is a relative SQLite file"),
    ],
)
def test_what_would_land_in_the_vanishing_job_folder_is_refused(sets, message):
    with pytest.raises(ConfigError, match=message):
        check_job_config(_cfg(*sets))


def test_a_password_in_a_url_is_refused_without_being_printed():
    with pytest.raises(ConfigError) as err:
        check_job_config(_cfg("cluster.tracking_uri=https://alice:hunter2@mlflow:5000"))
    line = str(err.value)
    assert "cluster.tracking_uri='https://alice:***@mlflow:5000' carries a password" in line
    assert "hunter2" not in line and "\n" not in line


def test_absolute_paths_and_urls_pass():
    check_job_config(
        _cfg(
            "cluster.storage_path=s3://bucket/ckpt",
            "data.source=folder",
            "data.root=/shared/scans",
            "cluster.tracking_uri=sqlite:////shared/mlflow.db",
        )
    )


def test_several_nodes_need_an_mlflow_server():
    one, two = [("10.0.0.1", 8.0)], [("10.0.0.1", 8.0), ("10.0.0.2", 8.0)]
    check_tracking_for_nodes(_cfg(), one)  # one node: SQLite on its disk is fine
    with pytest.raises(
        ConfigError, match=r"tracking_uri='unset, so sqlite:////shared/chemmap/mlflow\.db'.*2 node"
    ):
        check_tracking_for_nodes(_cfg(), two)
    with pytest.raises(ConfigError, match=r"1 node\(s\) \(10\.0\.0\.1 0 CPU\)"):
        check_tracking_for_nodes(_cfg(), [("10.0.0.1", 0.0)])  # a CPU-less head: workers come later
    check_tracking_for_nodes(_cfg("cluster.tracking_uri=http://mlflow:5000"), two)


def test_object_store_variables_pass_but_files_profiles_and_ray_tokens_do_not():
    env = {
        "AWS_ACCESS_KEY_ID": "k",
        "AWS_SECRET_ACCESS_KEY": "s",
        "AWS_ENDPOINT_URL_S3": "http://minio:9000",
        "MLFLOW_S3_ENDPOINT_URL": "http://minio:9000",
        "MLFLOW_TRACKING_PASSWORD": "p",
        "AWS_CA_BUNDLE": "/etc/ssl/mine.pem",
        "AWS_PROFILE": "laptop",
        "RAY_AUTH_TOKEN": "t",
        "HOME": "/home/me",
    }
    assert set(passed_env(env)) == {
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_ENDPOINT_URL_S3",
        "MLFLOW_S3_ENDPOINT_URL",
        "MLFLOW_TRACKING_PASSWORD",
    }


def test_the_upload_leaves_out_environments_outputs_and_a_workdir_inside_it(tmp_path):
    cfg = load_config(CI, [f"workdir={tmp_path / 'out' / 'runs'}"])
    env = runtime_env(cfg, tmp_path, {"AWS_REGION": "eu-north-1"})
    assert env["working_dir"] == str(tmp_path) and env["env_vars"] == {"AWS_REGION": "eu-north-1"}
    assert {"/.venv", "/runs", "/data", "/mlruns", "/bench/out", "/.git", "/out/runs"} <= set(env["excludes"])


def test_the_config_and_its_base_must_lie_in_the_working_dir(tmp_path):
    assert config_in_working_dir(CI, ROOT) == "configs/ci.yaml"
    with pytest.raises(ConfigError, match=r"pork_belly\.yaml: outside the working directory"):
        config_in_working_dir(CI, ROOT / "configs")  # ci.yaml's base: is ../pipelines/pork_belly.yaml


def test_the_entrypoint_is_chemmap_run_with_the_overrides_quoted():
    cmd = entrypoint("configs/ci.yaml", ["train.folds=[1, 2]", "workdir=/shared/a b"])
    assert shlex.split(cmd) == [
        "chemmap", "run", "configs/ci.yaml", "--set", "train.folds=[1, 2]", "--set", "workdir=/shared/a b",
    ]  # fmt: skip
