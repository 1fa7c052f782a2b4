"""``chemmap run`` as a person sees it: the tiny preset end to end in a subprocess.

The console holds chemmap's own lines (a line or a progress bar per stage, one line per
epoch per fold), then the summary, and nothing of Ray's or MLflow's. The score stage
scores the test split with the model just registered; ``--from``, ``--to``/``--until`` and
``--force`` choose what runs.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from chemmap.errors import InputError
from chemmap.pipeline import RunPlan

ROOT = Path(__file__).resolve().parents[1]

# What a default run printed before it was quiet (issue 12), and what else would be noise.
NOISE = [
    "RayTrainWorker",
    "TrainController",
    "PlacementGroupCleaner",
    "Failed to query Ray Train Controller",
    "Checkpoint successfully created",
    "Reporting training result",
    "TrainingReport",
    "Moving model to device",
    "DistributedDataParallel",
    "Started a local Ray instance",
    "Token authentication",
    "INFO mlflow",
    "Warning",
    "Traceback",
    "pid=",
]
# Every line before the summary starts with its stage's name, an epoch line's or a progress bar's.
STAGE_LINE = re.compile(
    r"^(synth|preprocess|train: |fold \d+ epoch |evaluate|out-of-fold maps|register: |score)"
)


def _chemmap_run(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    """The CLI with stdout and stderr in one stream, as on a terminal; no Ray address inherited."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    sets = [f"workdir={workdir}", f"cluster.tracking_uri=sqlite:///{workdir / 'mlflow.db'}"]
    cmd = [sys.executable, "-m", "chemmap.cli", "run", str(ROOT / "configs" / "ci.yaml")]
    cmd += [a for s in sets for a in ("--set", s)] + list(args)
    return subprocess.run(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900
    )


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run")
    return workdir, _chemmap_run(workdir)


@pytest.mark.slow
def test_a_default_run_shows_stage_and_epoch_lines_then_the_summary(first_run):
    _, res = first_run
    assert res.returncode == 0, res.stdout[-3000:]
    lines = res.stdout.rstrip().splitlines()
    for noise in NOISE:
        assert not [ln for ln in lines if noise in ln], noise
    for fold in (1, 2):  # configs/ci.yaml: folds [1, 2], 2 epochs; each epoch line once, from rank 0
        for epoch in (1, 2):
            assert sum(ln.startswith(f"fold {fold} epoch {epoch}/2:") for ln in lines) == 1, (fold, epoch)
    start = lines.index("summary")
    assert lines[start - 1] == ""
    assert [ln for ln in lines[: start - 1] if not STAGE_LINE.match(ln)] == []
    summary = lines[start:]
    assert summary[1].startswith("  test split, 2 samples")
    means = r"    fat, sample means vs the lab: U-Net \d+\.\d\d \| PLS \d+\.\d\d \(U-Net - PLS "
    assert re.match(means, summary[2])
    assert re.match(r"    fat, per pixel vs the true maps: U-Net .* best label-free baseline", summary[3])
    assert summary[4].startswith("  report       ") and summary[4].endswith("summary.html")
    assert summary[5].startswith("  maps         ") and summary[5].endswith("(2 scans)")
    assert summary[6].startswith("  summary.csv  ")
    assert summary[7] == "  model        models:/pork_belly/1, alias champion (models:/pork_belly@champion)"
    assert summary[8].startswith("  tracking     sqlite:///") and len(summary) == 9


@pytest.mark.slow
def test_the_score_stage_maps_the_test_split_as_evaluate_did(first_run):
    from chemmap.inference.score_output import read_map_zarr

    workdir, res = first_run
    assert res.returncode == 0, res.stdout[-3000:]
    (stage,) = (workdir / "score").iterdir()
    done = json.loads((stage / "_COMPLETE.json").read_text())
    assert done["config"]["input"] == "test split" and done["model_uri"] == "models:/pork_belly/1"
    assert done["alias"] == "champion" and done["scans"] == 2
    evaluated = sorted((next((workdir / "evaluate").iterdir()) / "maps").glob("*.zarr"))
    scored = sorted((stage / "maps").glob("*.zarr"))
    assert [p.name for p in scored] == [p.name for p in evaluated] and len(scored) == 2
    for a, b in zip(evaluated, scored, strict=True):
        ref, ref_mask, _ = read_map_zarr(a)
        got, mask, attrs = read_map_zarr(b)
        assert np.array_equal(mask, ref_mask) and attrs["model_version"] == "1"
        np.testing.assert_allclose(got, ref, atol=1e-5, equal_nan=True)
    assert (stage / "maps" / "samples.csv").is_file()  # the test samples' means, through scans.csv


@pytest.mark.slow
def test_from_to_and_force_choose_what_runs(first_run):
    workdir, res = first_run
    assert res.returncode == 0, res.stdout[-3000:]
    marker = next((workdir / "score").iterdir()) / "_COMPLETE.json"
    before = marker.stat().st_mtime_ns

    again = _chemmap_run(workdir, "--from", "evaluate", "--force", "score", "--quiet")
    assert again.returncode == 0, again.stdout[-3000:]
    out = again.stdout
    assert "preprocess: done already" in out and "train: done already" in out  # found, before --from
    assert "evaluate: done already" in out and "register: done already" in out  # run, finished: skipped
    assert "score: 2 scans: 2 scored" in out and marker.stat().st_mtime_ns != before  # made again
    assert "fold 1 epoch" not in out and "synth" not in out

    until = _chemmap_run(workdir, "--until", "train", "--quiet")  # today's --until: --to's alias
    assert until.returncode == 0, until.stdout[-3000:]
    assert "train: done already" in until.stdout and "evaluate" not in until.stdout
    assert until.stdout.rstrip().splitlines()[-1].startswith("  training     ")


def test_the_run_plan_refuses_what_cannot_run_in_one_line():
    plan = RunPlan("train", "register", "evaluate")
    assert [plan.runs(s) for s in ("preprocess", "train", "score")] == [False, True, False]
    assert [plan.forced(s) for s in ("train", "evaluate", "register", "score")] == [False, True, True, False]
    assert not RunPlan().forced("synth") and RunPlan(force="synth").forced("score")
    for args, match in [
        (("score", "train"), "--from score comes after --to train"),
        (("synth", "score", "nope"), "--force: unknown stage 'nope'"),
        (("evaluate", "score", "train"), "--force train: not a stage this run runs"),
        (("synth", "nope"), "--to: unknown stage 'nope'; stages: synth, preprocess"),
    ]:
        with pytest.raises(InputError, match=match):
            RunPlan(*args)


def test_run_with_a_bad_stage_or_a_stray_word_is_one_line_with_exit_status_2(tmp_path):
    for args in (["--from", "score", "--to", "train"], ["train"], ["--force", "train", "extra"]):
        res = _chemmap_run(tmp_path, *args)
        assert res.returncode == 2 and len(res.stdout.strip().splitlines()) == 1, res.stdout
        assert res.stdout.startswith("error: ")
    assert not (tmp_path / "synth").exists()
