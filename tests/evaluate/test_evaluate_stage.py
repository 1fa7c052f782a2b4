"""The evaluation stage end to end on the tiny preset: report files, metrics, MLflow artifacts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from chemmap.config import load_config
from chemmap.pipeline import evaluate_stage, train_stage

ROOT = Path(__file__).resolve().parents[2]
QUIET = {"progress": False, "log": lambda s: None}


@pytest.mark.slow
def test_report_compares_the_ensemble_with_pls(ray_local, tiny_dataset, tmp_path):
    from mlflow.tracking import MlflowClient

    _, pre = tiny_dataset
    cfg = load_config(
        ROOT / "configs" / "ci.yaml",
        [
            f"workdir={tmp_path}",
            f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
            "train.num_workers=1",
        ],
    )
    tr = train_stage(cfg, pre, **QUIET)
    ev = evaluate_stage(cfg, pre, tr, **QUIET)
    m = json.loads((ev.path / "metrics.json").read_text())
    n_test = m["n_test"]
    assert n_test >= 2 and len(m["test_predictions"]["unet"]) == n_test
    for name in ("unet", "pls"):
        r = m["models"][name]
        assert r["n"] == n_test and np.isfinite(r["rmse"])
        assert 0 <= r["out_of_range_fraction"] <= 1 and 0 <= r["spatial_correlated_share"] <= 1
        assert r["pixel_rmse"] > 0  # synthetic data: compared with the true maps
    # The RMSE in the report is the RMSE of the stored predictions (nothing hard-coded).
    ref = np.array(m["test_predictions"]["reference"])
    pls = np.array(m["test_predictions"]["pls"])
    assert m["models"]["pls"]["rmse"] == pytest.approx(np.sqrt(np.mean((pls - ref) ** 2)))
    assert (
        len(m["rmsecv"]) == 2
        and m["bootstrap_rmse_unet_minus_pls"]["ci_low"] <= m["bootstrap_rmse_unet_minus_pls"]["ci_high"]
    )
    for f in ("summary.md", "summary.html", "scatter.png", "residuals.png"):
        assert (ev.path / f).stat().st_size > 500, f
    assert list(ev.path.glob("map_*.png"))
    client = MlflowClient(cfg.tracking_uri)
    run = tr.summary()["mlflow_run_id"]
    names = {a.path for a in client.list_artifacts(run, "evaluation")}
    assert "evaluation/metrics.json" in names
    assert "test_unet_rmse" in client.get_run(run).data.metrics
