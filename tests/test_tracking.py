"""MLflow tracking on a real server: runs survive a restart, params are logged once, bad URIs are one line."""

from __future__ import annotations

import json

import pytest

from chemmap import tracking
from chemmap.errors import InputError


def test_run_book_resumes_the_same_runs_after_a_restart(mlflow_server, tmp_path):
    book = tracking.RunBook(tmp_path / "runs.json", mlflow_server, "tracking-test")
    parent = book.run("training", "train-x", tags={"chemmap.stage_key": "k1"})
    fold = book.run("fold1", "fold1", parent=parent)
    book.client.set_terminated(fold)
    assert json.loads((tmp_path / "runs.json").read_text()) == {"training": parent, "fold1": fold}

    again = tracking.RunBook(tmp_path / "runs.json", mlflow_server, "tracking-test")  # a new process would
    assert again.run("training", "train-x") == parent
    assert again.run("fold1", "fold1", parent=parent) == fold
    run = again.client.get_run(fold)
    assert run.info.status == "RUNNING"  # reopened for the resumed training
    assert run.data.tags["mlflow.parentRunId"] == parent


def test_a_deleted_run_is_replaced_by_a_new_one(mlflow_server, tmp_path):
    book = tracking.RunBook(tmp_path / "runs.json", mlflow_server, "tracking-test")
    first = book.run("training", "t")
    book.client.delete_run(first)
    second = book.run("training", "t")
    assert second != first and book.runs["training"] == second


def test_params_and_metrics_are_logged_once_and_flattened(mlflow_server, tmp_path):
    book = tracking.RunBook(tmp_path / "runs.json", mlflow_server, "tracking-test")
    rid = book.run("r", "r")
    tracking.log_params(book.client, rid, {"model": {"depth": 4, "pad": True}, "seed": 0})
    tracking.log_params(
        book.client, rid, {"model": {"depth": 4, "pad": True}, "seed": 0}
    )  # resumed: no error
    params = book.client.get_run(rid).data.params
    assert params == {"model.depth": "4", "model.pad": "True", "seed": "0"}
    book.log_metrics(rid, {"val_rmse": 1.5, "skipped": None}, step=3)
    history = book.client.get_metric_history(rid, "val_rmse")
    assert [(m.step, m.value) for m in history] == [(3, 1.5)]
    assert book.client.get_metric_history(rid, "skipped") == []


@pytest.mark.parametrize(
    ("uri", "needle"),
    [
        ("http://127.0.0.1:9", "cannot reach MLflow server at http://127.0.0.1:9"),
        ("/tmp/mlruns", "refuses the file store"),
        ("file:///tmp/mlruns", "refuses the file store"),
    ],
)
def test_bad_tracking_uris_are_one_line(uri, needle):
    with pytest.raises(InputError) as info:
        tracking.check_tracking_uri(uri, timeout=2)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_a_sqlite_store_gets_its_folder(tmp_path):
    db = tmp_path / "deep" / "er" / "mlflow.db"
    tracking.check_tracking_uri(f"sqlite:///{db}")
    assert db.parent.is_dir()
