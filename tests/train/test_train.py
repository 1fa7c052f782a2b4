"""Ray Train on a real local Ray instance (2 CPU workers, DDP over gloo), tracked in MLflow."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from chemmap.config import load_config
from chemmap.errors import InputError
from chemmap.pipeline import train_stage

ROOT = Path(__file__).resolve().parents[2]
QUIET = {"progress": False, "log": lambda s: None}
pytestmark = pytest.mark.slow


def _cfg(tmp_path: Path, *extra: str):
    return load_config(
        ROOT / "configs" / "ci.yaml",
        [
            f"workdir={tmp_path}",
            f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
            "train.epochs=2",
            "train.folds=[1]",
            "train.num_workers=2",
            *extra,
        ],
    )


def _digests(d: Path, epoch: int) -> set[str]:
    return {p.read_text() for p in d.glob(f"epoch{epoch}_rank*.txt")}


def test_ddp_on_two_workers_against_a_real_mlflow_server(ray_local, mlflow_server, tiny_dataset, tmp_path):
    from mlflow.tracking import MlflowClient

    _, pre = tiny_dataset
    cfg = _cfg(tmp_path, f"mlflow.tracking_uri={mlflow_server}")
    digests = tmp_path / "digests"
    digests.mkdir()
    stage = train_stage(cfg, pre, debug={"digest_dir": str(digests)}, **QUIET)
    for epoch in (0, 1):
        assert len(list(digests.glob(f"epoch{epoch}_rank*.txt"))) == 2
        assert len(_digests(digests, epoch)) == 1, "ranks hold different parameters after a DDP step"
    assert _digests(digests, 0) != _digests(digests, 1)  # and training did change them
    summary = stage.summary()
    assert Path(summary["checkpoints"]["1"]).is_dir()
    assert (stage.path / "fold1" / "best.pt").is_file() and (stage.path / "model.json").is_file()
    assert (stage.path / "learning_curve.png").stat().st_size > 5000
    # Read the runs back through the server.
    client = MlflowClient(mlflow_server)
    fold_run = summary["fold_run_ids"]["1"]
    hist = client.get_metric_history(fold_run, "val_rmse")
    assert sorted(m.step for m in hist) == [0, 1]
    parent = client.get_run(summary["mlflow_run_id"])
    assert parent.data.params["model.depth"] == "3"
    assert parent.data.metrics["rmsecv"] == pytest.approx(summary["rmsecv"])
    assert client.get_run(fold_run).data.tags["mlflow.parentRunId"] == summary["mlflow_run_id"]


def test_stopped_run_resumes_from_its_checkpoint(ray_local, tiny_dataset, tmp_path):
    from mlflow.tracking import MlflowClient

    _, pre = tiny_dataset
    cfg = _cfg(tmp_path, "train.epochs=3", "train.max_failures=0", "train.early_stopping=10")
    with pytest.raises(RuntimeError, match="fold 1 failed"):
        train_stage(cfg, pre, debug={"stop_at_epoch": 2}, **QUIET)
    runs = json.loads(next(tmp_path.glob("train/*/mlflow_runs.json")).read_text())
    stage = train_stage(cfg, pre, **QUIET)  # the same run, started again
    result = json.loads((stage.path / "fold1" / "result.json").read_text())
    assert [h["epoch"] for h in result["history"]] == [0, 1, 2]  # epochs 0-1 from the checkpoint
    summary = stage.summary()
    assert summary["fold_run_ids"]["1"] == runs["fold1"]  # the same MLflow run, continued
    client = MlflowClient(cfg.tracking_uri)
    assert sorted(m.step for m in client.get_metric_history(runs["fold1"], "val_rmse")) == [0, 1, 2]


def test_a_worker_killed_mid_epoch_is_replaced(ray_local, tiny_dataset, tmp_path):
    _, pre = tiny_dataset
    marker = tmp_path / "killed.txt"
    cfg = _cfg(tmp_path, "train.max_failures=1", "train.early_stopping=10")
    stage = train_stage(
        cfg, pre, debug={"kill_once": {"epoch": 1, "rank": 1, "marker": str(marker)}}, **QUIET
    )
    assert marker.is_file()  # the worker did die
    result = json.loads((stage.path / "fold1" / "result.json").read_text())
    assert [h["epoch"] for h in result["history"]] == [0, 1]


def test_uneven_patch_counts_neither_hang_nor_diverge(ray_local, tiny_dataset, tmp_path):
    import zarr

    _, pre = tiny_dataset
    root = zarr.open_group(pre.path / "dataset.zarr", mode="r")
    name = pre.summary()["patches"]
    idx = root[f"patches/{name}"][...]
    counts = {s: int((idx[:, 0] == i).sum()) for i, s in enumerate(x["scan_id"] for x in root.attrs["scans"])}
    assert len(set(counts.values())) > 1  # samples do differ in patch count
    digests = tmp_path / "digests"
    digests.mkdir()
    cfg = _cfg(tmp_path, "train.mode=patches", "train.batch_size=2")
    train_stage(cfg, pre, debug={"digest_dir": str(digests)}, **QUIET)
    for epoch in (0, 1):
        assert len(_digests(digests, epoch)) == 1


def test_config_errors_come_before_any_worker(ray_local, tiny_dataset, tmp_path):
    _, pre = tiny_dataset
    with pytest.raises(InputError, match=r"model\.in_channels=99 but the dataset has \d+"):
        train_stage(_cfg(tmp_path, "model.in_channels=99"), pre, **QUIET)
    with pytest.raises(InputError, match=r"cannot reach MLflow server at http://127\.0\.0\.1:9"):
        train_stage(_cfg(tmp_path, "mlflow.tracking_uri=http://127.0.0.1:9"), pre, **QUIET)
    with pytest.raises(InputError, match="dataset not found"):
        train_stage(_cfg(tmp_path, "synth.seed=12345"), **QUIET)
    assert not list(tmp_path.glob("train/*/ray"))  # nothing was started


def test_unreachable_ray_address_is_one_line_from_the_cli(tiny_dataset, tmp_path):
    sets, _ = tiny_dataset
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "chemmap.cli",
            "train",
            str(ROOT / "configs" / "ci.yaml"),
            *[a for s in [*sets, "train.ray_address=127.0.0.1:9"] for a in ("--set", s)],
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2, res.stderr
    assert (
        res.stderr.strip()
        .splitlines()[-1]
        .startswith("error: train.ray_address: cannot reach Ray at 127.0.0.1:9")
    )
