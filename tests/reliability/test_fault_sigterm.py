"""A graceful stop: SIGTERM (what systemd and Kubernetes send) to ``chemmap run`` and to
``chemmap score --watch``, then a restart.

``chemmap run`` stops at once, in the middle of an epoch: that epoch is rolled back (the
fold resumes from its last checkpoint), the stage stays unfinished, MLflow marks the runs
KILLED, Ray goes down with the process, and one line says what happened (exit status 143).
``chemmap score --watch`` finishes the scan it is scoring and exits 0; a restart scores
each remaining scan once.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from chemmap.inference.score_output import read_map_zarr
from chemmap.preprocess.store import Dataset
from tests.inference.test_score import _random_bundle, _read_csv
from tests.reliability.faultkit import (
    CI,
    Chemmap,
    complete,
    read_json,
    reap,
    recorded_checkpoints,
    run,
    scanner_folder,
    sets,
    wait_until,
    with_dataset,
)

TRAIN = ["train.epochs=5", "train.folds=[1]", "train.early_stopping=10"]


@pytest.mark.slow
def test_sigterm_stops_chemmap_run_at_once_and_a_rerun_resumes_the_fold(tiny_dataset, tmp_path):
    from mlflow.tracking import MlflowClient

    work = with_dataset(tiny_dataset, tmp_path / "w")
    args = ["run", CI, *sets(work, *TRAIN), "--from", "train", "--to", "train", "--quiet"]
    with Chemmap(args, tmp_path / "stopped.log") as c:
        wait_until(lambda: recorded_checkpoints(work), what="a recorded checkpoint")  # something to resume
        kids = c.descendants()
        t0 = time.monotonic()
        c.send(signal.SIGTERM)
        rc = c.wait(120)
        seconds = time.monotonic() - t0
        text = c.text()
    assert rc == 128 + signal.SIGTERM, text[-3000:]
    assert text.rstrip().splitlines()[-1].startswith("stopped by SIGTERM: what was finished is kept")
    assert "Traceback" not in text and "SIGTERM received" not in text  # no stack dump from Ray
    left = reap(kids, grace=30)
    assert left == [], f"the stopped run left {left} running"  # Ray went down with it
    (stage,) = (work / "train").iterdir()
    assert not complete(stage)
    runs = read_json(stage / "mlflow_runs.json")
    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    assert {client.get_run(r).info.status for r in runs.values()} == {"KILLED"}
    pipeline = [r for r in client.search_runs([client.get_experiment_by_name("pork_belly").experiment_id])]
    assert [r.info.status for r in pipeline if r.data.tags.get("chemmap.stage") == "pipeline"] == ["KILLED"]

    rc, again = run(args, tmp_path / "again.log")
    assert rc == 0, again[-3000:]
    assert "fold 1 epoch 1/5" not in again and "fold 1 epoch 5/5" in again  # resumed, not restarted
    assert complete(stage) and read_json(stage / "mlflow_runs.json") == runs
    assert [h["epoch"] for h in read_json(stage / "fold1" / "result.json")["history"]] == [0, 1, 2, 3, 4]
    assert {client.get_run(r).info.status for r in runs.values()} == {"FINISHED"}
    print(f"\nchemmap run exited {seconds:.1f} s after SIGTERM")


def _done(out) -> list[str]:
    return sorted(p.name[: -len(".zarr")] for p in out.glob("*.zarr") if not p.name.startswith("."))


def _writing(out) -> list[str]:
    """Scans whose map is being written (temporary folders), once at least one map is done."""
    if not out.is_dir() or not _done(out):
        return []
    return [p.name[1:].split(".zarr.")[0] for p in out.glob(".*.zarr.*.tmp")]


@pytest.mark.slow
def test_sigterm_stops_score_watch_after_the_scan_in_progress_and_a_restart_scores_the_rest(
    tiny_dataset, tmp_path
):
    _, pre = tiny_dataset
    data = Dataset(pre.path / "dataset.zarr")
    bundle = _random_bundle(tmp_path / "model", data)
    ids = sorted(data.scan_ids)
    folder, out = scanner_folder(data, tmp_path / "scans"), tmp_path / "maps"
    model = ["--model", bundle.path, "--output", out, "--quiet"]
    watch = ["score", folder, *model, "--watch", "--poll", "0.1", "--settle", "0"]
    with Chemmap(watch, tmp_path / "watch.log") as c:
        in_progress: list[str] = []

        def stopped_mid_scan() -> bool:
            """SIGTERM while a map is half written (checked with the process stopped: no race)."""
            if _writing(out):
                c.send(signal.SIGSTOP)
                os.waitpid(c.pid, os.WUNTRACED)
                if writing := _writing(out):
                    in_progress.extend([writing[0], *_done(out)])
                    c.send(signal.SIGTERM)
                c.send(signal.SIGCONT)
            return bool(in_progress)

        wait_until(stopped_mid_scan, what="a scan being written")
        t0 = time.monotonic()
        rc = c.wait(120)
        seconds = time.monotonic() - t0
        text = c.text()
    scan, done_before = in_progress[0], in_progress[1:]
    assert rc == 0, text[-3000:]
    assert "score: stopping (SIGTERM), no scan left half done" in text
    assert _done(out) == sorted([*done_before, scan])  # the scan in progress was finished, no other begun
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporary map, no lock
    stopped = _done(out)
    assert len(stopped) < len(ids)

    rc, again = run(["score", folder, *model], tmp_path / "again.log")
    assert rc == 0, again[-3000:]
    closing = f"score: {len(ids)} scans: {len(ids) - len(stopped)} scored, {len(stopped)} skipped"
    assert closing in again  # each scan scored once over the two runs
    assert _done(out) == ids
    rows = _read_csv(out / "summary.csv")
    assert [(r["scan_id"], r["status"]) for r in rows] == [(s, "ok") for s in ids]
    for sid in ids:
        assert read_map_zarr(out / f"{sid}.zarr")[2]["complete"] is True
    print(f"\nchemmap score --watch exited {seconds:.1f} s after SIGTERM ({len(stopped)} maps by then)")
