"""``chemmap run`` in MLflow: one run per invocation, a nested run per stage that works.

A real local Ray trains the tiny preset (one fold, one epoch); a real SQLite store records
the runs. The second invocation finds every stage cached: it gets its own pipeline run,
which links the runs of the first by tags and re-parents nothing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from chemmap.config import load_config
from chemmap.pipeline import run

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_one_pipeline_run_per_invocation_and_cached_stages_linked_not_reparented(ray_local, tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config(
        ROOT / "configs" / "ci.yaml",
        [f"workdir={tmp_path}", f"cluster.tracking_uri={uri}", "train.folds=[1]", "train.epochs=1"],
    )
    first = run(cfg, progress=False, log=lambda s: None)
    second = run(cfg, progress=False, log=lambda s: None)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(cfg.name).experiment_id

    def children(parent: str) -> dict[str, str]:
        found = client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent}'")
        return {r.data.tags["chemmap.stage"]: r.info.run_id for r in found}

    made = children(first["mlflow_run_id"])
    assert set(made) == {"preprocess", "train", "evaluate", "register", "score"}
    assert children(second["mlflow_run_id"]) == {}  # nothing worked, nothing nested, nothing moved
    pipeline = client.get_run(second["mlflow_run_id"])
    assert pipeline.data.tags["chemmap.stage"] == "pipeline" and pipeline.info.status == "FINISHED"
    for stage, run_id in made.items():
        assert pipeline.data.tags[f"chemmap.cached.{stage}"] == run_id
    evaluation = client.get_run(made["evaluate"])
    assert evaluation.data.tags["chemmap.training_run"] == made["train"]
    assert "test_map_unet_pixel_rmse" in evaluation.data.metrics
    folds = client.search_runs([exp], f"tags.mlflow.parentRunId = '{made['train']}'")
    assert [r.data.tags.get("chemmap.fold") for r in folds] == ["1"]


def _finalist_sets(name: str) -> list[str]:
    """A finalist's own settings (pipelines/<name> and the files it is based on, down to
    pork_belly.yaml) as overrides of the tiny preset; its pls_n2v baseline and a pixel path's
    fit shortened to a few steps."""
    import yaml

    def flat(d: dict, prefix: str = "") -> list[str]:
        out = []
        for k, v in d.items():
            out += flat(v, f"{prefix}{k}.") if isinstance(v, dict) else [f"{prefix}{k}={v}"]
        return out

    chain = []
    while name != "pork_belly.yaml":
        own = yaml.safe_load((ROOT / "pipelines" / name).read_text())
        chain.insert(0, own)
        name = own["base"]
    sections = ("preprocess", "model", "train", "evaluate")
    sets = [s for own in chain for section in sections for s in flat(own.get(section, {}), f"{section}.")]
    return [*sets, "evaluate.blindspot_steps=5", "train.path_fit.steps=20"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "finalist",
    [None, "pork_belly_denoiser.yaml", "pork_belly_pixel.yaml"],
    ids=["default", "denoiser_finalist", "pixel_finalist"],
)
def test_run_registers_the_champion_and_score_reproduces_the_evaluated_maps(ray_local, tmp_path, finalist):
    """``make run``, then the README's scoring command, on the tiny preset; and the same with
    issue 15's second and third finalists (their recipe, model, loss and baseline)."""
    import json
    import os
    import subprocess
    import sys

    from mlflow.tracking import MlflowClient

    from chemmap.inference.bundle import read_bundle
    from chemmap.inference.score_output import read_map_zarr

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sets = [f"workdir={tmp_path}", f"cluster.tracking_uri={uri}", "train.folds=[1]", "train.epochs=1"]
    cfg = load_config(ROOT / "configs" / "ci.yaml", [*sets, *(_finalist_sets(finalist) if finalist else [])])
    if finalist:  # the finalist's model and recipe, on the tiny preset's data and sizes
        own = load_config(ROOT / "pipelines" / finalist)
        recipe = {"transform", "snv"}
        assert cfg.preprocess.model_dump(include=recipe) == own.preprocess.model_dump(include=recipe)
        assert cfg.model.spectral_hidden == own.model.spectral_hidden
        assert cfg.train.spectral_init == own.train.spectral_init
    out = run(cfg, progress=False, log=lambda s: None)
    registered = json.loads((out["register"] / "_COMPLETE.json").read_text())
    assert (registered["name"], registered["version"], registered["alias"]) == (cfg.name, "1", "champion")

    scans = next((tmp_path / "synth").glob("*/scans"))
    maps_dir = tmp_path / "maps"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    cmd = [
        sys.executable,
        "-m",
        "chemmap.cli",
        "score",
        str(scans),
        "--model",
        f"models:/{cfg.name}@champion",
    ]
    res = subprocess.run(
        [*cmd, "--output", str(maps_dir), "--quiet"], env=env, capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr[-2000:]
    evaluated = sorted((out["evaluate"] / "maps").glob("*.zarr"))
    assert evaluated
    for path in evaluated:  # every test scan: the same mask, the same map within 1e-5
        ref, ref_mask, _ = read_map_zarr(path)
        got, mask, attrs = read_map_zarr(maps_dir / path.name)
        assert np.array_equal(mask, ref_mask) and attrs["model_version"] == "1"
        np.testing.assert_allclose(got, ref, atol=1e-5, equal_nan=True)
    assert (maps_dir / "summary.csv").is_file()
    if finalist:  # model.bounded: the registered map is the evaluated one, clamped to 0-100 %
        assert read_bundle(out["register"] / "bundle").bound == (0.0, 100.0)
        maps = json.loads((out["evaluate"] / "metrics.json").read_text())["maps"]
        assert maps["unet"]["out_of_range_fraction"] == 0.0 and "unet_unbounded" in maps
        assert maps["unet"]["pixel_rmse"] <= maps["unet_unbounded"]["pixel_rmse"]

    version = MlflowClient(uri).get_model_version(cfg.name, "1")
    assert version.run_id == json.loads((out["evaluate"] / "_COMPLETE.json").read_text())["mlflow_run_id"]
    assert version.tags["evaluate_key"] == out["evaluate"].name and version.tags["training_run"]
    promoted = subprocess.run(
        [sys.executable, "-m", "chemmap.cli", "promote", cfg.name, "1", "--alias", "reviewed"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert promoted.returncode == 0, promoted.stderr[-2000:]
    assert (
        str(MlflowClient(uri).get_model_version_by_alias(cfg.name, "reviewed").version) == "1"
    )  # int in SQL

    bad = subprocess.run(
        [*cmd[:-1], f"models:/{cfg.name}@nobody", "--output", str(tmp_path / "none")],
        env=env,
        capture_output=True,
        text=True,
    )
    assert (
        bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and not (tmp_path / "none").exists()
    )
