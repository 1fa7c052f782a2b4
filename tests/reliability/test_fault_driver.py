"""The training driver killed (SIGKILL) mid-training and started again, against an uninterrupted run.

Two ``chemmap train`` processes on the tiny dataset with the same config: one runs to the
end, the other is killed once its second fold has a checkpoint, then started again. The
restart skips the finished fold, resumes the other from its checkpoint, logs into the same
MLflow runs, and ends with the same weights, bit for bit: CPU training here is
deterministic (seeded initial weights, augmentations seeded per sample and epoch, a fixed
number of threads).

A worker killed mid-epoch (Ray replaces it, training resumes from the last checkpoint):
``tests/train/test_train.py::test_a_worker_killed_mid_epoch_is_replaced``.
"""

from __future__ import annotations

import signal

import pytest
import torch

from tests.reliability.faultkit import (
    CI,
    Chemmap,
    complete,
    read_json,
    reap,
    recorded_checkpoints,
    sets,
    wait_until,
    with_dataset,
)

TRAIN = ["train.epochs=5", "train.folds=[1, 2]", "train.early_stopping=10", "train.max_failures=0"]


def _weights(stage, fold: int) -> tuple[dict, dict]:
    """The fold's best weights and its last checkpoint's weights."""
    result = read_json(stage / f"fold{fold}" / "result.json")
    best = torch.load(stage / f"fold{fold}" / "best.pt", weights_only=True)
    last = torch.load(f"{result['checkpoint']}/state.pt", weights_only=True)["model"]
    return best, last


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_a_killed_driver_resumes_each_fold_into_the_same_runs_with_the_same_weights(tiny_dataset, tmp_path):
    from mlflow.tracking import MlflowClient

    ref_dir, cut_dir = (
        with_dataset(tiny_dataset, tmp_path / "ref"),
        with_dataset(tiny_dataset, tmp_path / "cut"),
    )
    # They overlap, but their Rays start one after the other: Ray gives a starting node 30 s to
    # register, which two at once on a loaded 2-core machine can miss.
    ref = Chemmap(["train", CI, *sets(ref_dir, *TRAIN), "--quiet"], tmp_path / "ref.log")
    cut = Chemmap.later(["train", CI, *sets(cut_dir, *TRAIN), "--quiet"], tmp_path / "cut.log")
    with ref, cut:
        ref.wait_for(r"^train: fold 1/2 on ")
        cut.start()
        # Fold 2 has a recorded checkpoint (Ray Train's, what a restart resumes from) and is not done.
        wait_until(lambda: any(m.get("fold") == 2 for m in recorded_checkpoints(cut_dir)), what="fold 2")
        kids = cut.descendants()
        cut.send(signal.SIGKILL)
        assert cut.wait() == -signal.SIGKILL
        (stage,) = (cut_dir / "train").iterdir()
        assert not complete(stage) and (stage / "fold1" / "result.json").is_file()
        assert not (stage / "fold2" / "result.json").exists()
        runs = read_json(stage / "mlflow_runs.json")

        with Chemmap(["train", CI, *sets(cut_dir, *TRAIN), "--quiet"], tmp_path / "again.log") as again:
            left = reap(kids)  # what the dead driver left running (see the reliability record)
            rc, text = again.wait(), again.text()
        assert rc == 0, text[-3000:]
        assert ref.wait() == 0, ref.text()[-3000:]

    assert "being made by another process" not in text  # the dead driver's lock went with it
    assert "train: fold 1 done already" in text
    assert f"MLflow run {runs['fold2']}" in text  # fold 2 continued in its run
    assert "fold 2 epoch 1/5" not in text  # ... from its checkpoint, not from the start
    assert read_json(stage / "mlflow_runs.json") == runs
    assert complete(stage)
    (ref_stage,) = (ref_dir / "train").iterdir()
    assert ref_stage.name == stage.name  # the same stage key: the same training
    for fold in (1, 2):
        best, last = _weights(stage, fold)
        ref_best, ref_last = _weights(ref_stage, fold)
        assert _equal(best, ref_best) and _equal(last, ref_last), f"fold {fold} differs"
    # Every epoch's metrics are in the fold's run; an epoch the killed run had logged past its
    # last recorded checkpoint is logged again (a second point at its step).
    client = MlflowClient(f"sqlite:///{cut_dir / 'mlflow.db'}")
    steps = sorted(m.step for m in client.get_metric_history(runs["fold2"], "val_rmse"))
    assert set(steps) == {0, 1, 2, 3, 4}
    assert client.get_run(runs["fold2"]).info.status == "FINISHED"
    print(f"\nleft running by the killed driver: {left}; fold 2 val_rmse steps logged: {steps}")
