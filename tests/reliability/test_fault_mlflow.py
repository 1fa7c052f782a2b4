"""The MLflow server down: at the start of a run (one clear line, before any work), and for a
few seconds in the middle of training (MLflow's client retries; no metric is lost).

The server is a real ``mlflow server`` subprocess with a SQLite backend, killed with SIGKILL
and started again on the same port with the same store.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from pathlib import Path

import pytest

from tests.reliability.faultkit import (
    CI,
    Chemmap,
    MlflowServer,
    free_port,
    read_json,
    run,
    sets,
    with_dataset,
)

OUTAGE_S = 5.0  # how long the server stays down once a metric call is under way (then its start-up)


def _steps_stored(db: Path, run_id: str) -> set[int]:
    """The steps of a run's ``val_rmse`` in the server's SQLite store, read directly."""
    with contextlib.closing(sqlite3.connect(db)) as con:
        rows = con.execute("SELECT step FROM metrics WHERE run_uuid = ? AND key = 'val_rmse'", (run_id,))
        return {int(step) for (step,) in rows}


@pytest.mark.slow
def test_mlflow_down_at_start_is_one_clear_line_before_any_work(tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"  # no server there: as after it went down
    work = tmp_path / "w"
    rc, text = run(["run", CI, *sets(work, tracking=uri), "--quiet"], tmp_path / "run.log", timeout=300)
    assert rc == 2, text[-3000:]
    assert text.strip().splitlines() == [text.strip()]  # one line
    assert text.startswith(f"error: mlflow.tracking_uri: cannot reach MLflow server at {uri} (")
    assert not work.exists() or not any(work.iterdir())  # no stage started, nothing written


@pytest.mark.slow
def test_mlflow_down_for_seconds_mid_training_is_retried_and_no_metric_is_lost(tiny_dataset, tmp_path):
    from mlflow.tracking import MlflowClient

    server = MlflowServer(tmp_path / "mlflow").start()
    work = with_dataset(tiny_dataset, tmp_path / "w")
    train = ["train.epochs=6", "train.folds=[1]", "train.early_stopping=20"]
    try:
        with Chemmap(
            ["train", CI, *sets(work, *train, tracking=server.uri), "--quiet"], tmp_path / "t.log"
        ) as c:
            c.wait_for(r"^fold 1 epoch 2/6")
            server.kill()
            down, seen = time.time(), len(c.text())
            (stage,) = (work / "train").iterdir()
            fold_run = read_json(stage / "mlflow_runs.json")["fold1"]
            stored = _steps_stored(server.folder / "mlflow.db", fold_run)  # what the dead server holds
            # Rank 0 prints an epoch's line, then logs its metrics: a line after the kill means
            # a metric call is under way while the server is down.
            c.wait_for(r"^fold 1 epoch \d/6", after=seen)
            time.sleep(OUTAGE_S)  # the outage itself, while the workers train on
            assert c.proc.poll() is None, c.text()[-3000:]
            server.start()
            up = time.time()
            rc = c.wait()
        assert rc == 0, c.text()[-3000:]
        (stage,) = (work / "train").iterdir()
        runs = read_json(stage / "mlflow_runs.json")
        client = MlflowClient(server.uri)
        for key in ("train_rmse", "val_rmse", "lr"):
            steps = {m.step for m in client.get_metric_history(runs["fold1"], key)}
            assert sorted(steps) == list(range(6)), key
        # Metrics stamped before the server was back, and not stored when it went down: sent (or in
        # flight) while it was down, and retried.
        hist = client.get_metric_history(runs["fold1"], "val_rmse")
        retried = sorted(m.step for m in hist if m.timestamp < up * 1000 and m.step not in stored)
        assert retried, "no metric call met the outage: the test did not test the retry"
        assert client.get_run(runs["training"]).data.metrics["rmsecv"] > 0
        assert {client.get_run(r).info.status for r in runs.values()} == {"FINISHED"}
        print(f"\nserver down {up - down:.1f} s; epochs whose metrics were retried: {retried}")
    finally:
        server.kill()
