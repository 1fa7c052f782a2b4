"""The evaluation stage end to end on the tiny preset, with random fold weights written to disk.

No training runs: two randomly initialised U-Nets (seeded) are saved the way the training
stage saves its folds, so every number in the report can be recomputed here from the
dataset, ``pls.json`` and the weights. The dataset is a copy whose true maps are set to a
known constant, so the per-pixel metrics can only have come from the dataset's truth.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

from chemmap.config import load_config
from chemmap.errors import InputError
from chemmap.evaluate.stage import N_BOOT, evaluate_ensemble
from chemmap.files import write_json_atomic
from chemmap.inference.ensemble import load_ensemble, predict_map
from chemmap.models.pls import PLSBaseline
from chemmap.models.unet import UNet, UNetConfig
from chemmap.preprocess.store import Dataset
from chemmap.spatial import spatial_correlated_share
from chemmap.stages import StageDir, stage_dir

ROOT = Path(__file__).resolve().parents[2]
TRUTH = 50.0  # % fat: every true map of the copied dataset
RMSECV = 3.25  # what the fake training reports
SEED = 20251126

pytestmark = pytest.mark.slow  # the shared tiny dataset and one evaluation: about 20 s on 2 cores


def _dataset_with_known_truth(pre: StageDir, work: Path) -> StageDir:
    """A copy of the preprocessed dataset, away from the raw scans, with every true map = TRUTH."""
    import zarr

    stage = stage_dir(work, "preprocess", {"copy_of": pre.key})
    stage.begin()
    shutil.copytree(pre.path / "dataset.zarr", stage.path / "dataset.zarr")
    root = zarr.open_group(str(stage.path / "dataset.zarr"), mode="r+")
    data = Dataset(stage.path / "dataset.zarr")
    for scan in data.scan_ids:
        truth = data.truth(scan)
        assert truth, f"{scan}: the preprocessed synthetic dataset carries no true maps"
        for target in truth:
            root[f"scans/{scan}/truth/{target}"][...] = TRUTH
    stage.finish({})
    return stage


def _random_training(work: Path, dataset: StageDir, uri: str) -> StageDir:
    """A finished training stage holding two seeded random fold models and an MLflow run."""
    from mlflow.tracking import MlflowClient

    data = Dataset(dataset.path / "dataset.zarr")
    stage = stage_dir(work, "train", {"random_weights": SEED}, [dataset.key])
    stage.begin()
    config = UNetConfig(
        in_channels=data.n_channels, out_channels=len(data.targets), depth=3, features=4, front_end=True
    )
    torch.manual_seed(SEED)
    weights = []
    for fold in (1, 2):
        (stage.path / f"fold{fold}").mkdir()
        torch.save(UNet(config).state_dict(), stage.path / f"fold{fold}" / "best.pt")
        weights.append(f"fold{fold}/best.pt")
    card = {"unet": asdict(config), "targets": data.targets, "folds": [1, 2], "weights": weights}
    write_json_atomic(stage.path / "model.json", card)
    client = MlflowClient(tracking_uri=uri)
    run = client.create_run(client.create_experiment("evaluate-test")).info.run_id
    stage.finish({"rmsecv": RMSECV, "mlflow_run_id": run, "tracking_uri": uri})
    return stage


@pytest.fixture(scope="module")
def evaluated(tiny_dataset, tmp_path_factory):
    """(config, dataset stage, training stage, evaluation stage, metrics.json) of one evaluation."""
    _, pre = tiny_dataset
    work = tmp_path_factory.mktemp("evaluate")
    cfg = load_config(ROOT / "configs" / "ci.yaml", [f"workdir={work}"])
    dataset = _dataset_with_known_truth(pre, work)
    training = _random_training(work, dataset, f"sqlite:///{work / 'mlflow.db'}")
    ev = evaluate_ensemble(cfg, dataset, training, progress=False, log=lambda s: None)
    metrics = json.loads((ev.path / "metrics.json").read_text())
    return cfg, dataset, training, ev, metrics


def _members(training: StageDir) -> list[UNet]:
    """The fold models, one by one, as the fake training saved them."""
    _, card = load_ensemble(training.path)
    config = UNetConfig(**card["unet"])
    nets = []
    for rel in card["weights"]:
        net = UNet(config)
        net.load_state_dict(torch.load(training.path / rel, weights_only=True))
        nets.append(net.eval())
    return nets


def _test_maps(dataset: StageDir, training: StageDir, ev: StageDir) -> list[dict]:
    """Every test scan's maps of the first target, recomputed from the weights and ``pls.json``."""
    data = Dataset(dataset.path / "dataset.zarr")
    pls = PLSBaseline.from_dict(json.loads((ev.path / "pls.json").read_text()))
    ensemble, _ = load_ensemble(training.path)
    out = []
    for sid in data.ids([0]):
        for scan in data.samples[sid].scans:
            mask = data.mask(scan)
            x = torch.from_numpy(data.model_input(data.cube(scan)[...]))
            out.append(
                {
                    "sample": sid,
                    "mask": mask,
                    "unet": predict_map(ensemble, x).numpy()[0],
                    "pls": pls.predict_cube(data.cube(scan), mask)[0],
                }
            )
    return out


def test_report_files_and_mlflow_artifacts(evaluated):
    from mlflow.tracking import MlflowClient

    _, dataset, training, ev, m = evaluated
    data = Dataset(dataset.path / "dataset.zarr")
    test_ids = data.ids([0])
    assert m["n_test"] == len(test_ids) >= 2
    assert m["test_predictions"]["sample_id"] == test_ids
    for f in ("summary.md", "summary.html", "scatter.png", "residuals.png", "pls.json"):
        assert (ev.path / f).stat().st_size > 500, f
    drawn = [scan for sid in test_ids[:4] for scan in data.samples[sid].scans]
    assert sorted(p.name for p in ev.path.glob("map_*.png")) == sorted(f"map_{s}.png" for s in drawn)
    summary = ev.summary()
    client = MlflowClient(summary["tracking_uri"])
    names = {a.path for a in client.list_artifacts(summary["mlflow_run_id"], "evaluation")}
    assert {"evaluation/metrics.json", "evaluation/summary.html", "evaluation/scatter.png"} <= names
    run = client.get_run(summary["mlflow_run_id"])  # the evaluation's own run, tied to the training's
    assert run.data.tags["chemmap.training_run"] == training.summary()["mlflow_run_id"]
    assert run.data.tags["chemmap.stage"] == "evaluate" and run.info.status == "FINISHED"
    logged = run.data.metrics
    assert logged["test_unet_rmse"] == m["models"]["unet"]["rmse"]
    assert logged["test_map_pls_pixel_rmse"] == m["maps"]["pls"]["pixel_rmse"]
    share = m["maps"]["unet_fold2"]["spatial_correlated_share"]
    assert logged["test_map_unet_fold2_spatial_correlated_share"] == share
    assert ev.summary()["rmse_pls"] == m["models"]["pls"]["rmse"]


def test_metrics_are_those_of_the_stored_predictions(evaluated):
    cfg, _, _, _, m = evaluated
    pred = m["test_predictions"]
    ref = np.array(pred["reference"])
    rmse = {}
    for name in ("unet", "pls"):
        p = np.array(pred[name])
        r = m["models"][name]
        rmse[name] = np.sqrt(np.mean((p - ref) ** 2))
        assert r["n"] == len(ref)
        assert r["rmse"] == pytest.approx(rmse[name], rel=1e-12)
        assert r["bias"] == pytest.approx(np.mean(p - ref), rel=1e-12)
        ss_tot = np.sum((ref - ref.mean()) ** 2)
        assert r["r2"] == pytest.approx(1 - np.sum((p - ref) ** 2) / ss_tot, rel=1e-12)
    boot = m["bootstrap_rmse_unet_minus_pls"]
    assert boot["estimate"] == pytest.approx(rmse["unet"] - rmse["pls"], rel=1e-12)
    assert (boot["n"], boot["n_boot"], boot["seed"]) == (len(ref), N_BOOT, cfg.seed)
    assert boot["ci_low"] <= boot["ci_high"]
    assert m["relative_rmse_change"] == pytest.approx(rmse["unet"] / rmse["pls"] - 1, rel=1e-12)


def test_rmsecv_and_pls_come_from_the_out_of_fold_models_and_the_fit(evaluated):
    _, dataset, training, ev, m = evaluated
    pls_record = json.loads((ev.path / "pls.json").read_text())
    data = Dataset(dataset.path / "dataset.zarr")
    # The U-Net's RMSECV: each fold model on the samples of its own fold, pooled.
    _, card = load_ensemble(training.path)
    errors = []
    for fold, net in zip(card["folds"], _members(training), strict=True):
        for sid in data.ids([fold]):
            errors.append(_sample_mean(data, sid, net) - data.samples[sid].targets[0])
    assert m["rmsecv"]["unet"] == pytest.approx(np.sqrt(np.mean(np.square(errors))), rel=1e-6)
    assert m["rmsecv"]["pls"] == pls_record["cv"][0]["rmsecv_at_chosen"]
    assert m["rmsecv_unet_training"] == RMSECV and "selection criterion" in m["rmsecv_note"]
    assert m["pls_components"] == pls_record["n_components"]
    # PLS predicts a test sample from its mean spectrum (stored units, sample pixels of its scans).
    pls = PLSBaseline.from_dict(pls_record)
    for sid, p in zip(m["test_predictions"]["sample_id"], m["test_predictions"]["pls"], strict=True):
        pixels = [data.cube(s)[...][:, data.mask(s)] for s in data.samples[sid].scans]
        spectrum = np.concatenate(pixels, axis=1).astype(np.float64).mean(axis=1)
        assert p == pytest.approx(pls.predict(spectrum[None])[0, 0], rel=1e-9)
        assert (
            m["test_predictions"]["reference"][m["test_predictions"]["sample_id"].index(sid)]
            == (data.samples[sid].targets[0])
        )


def _sample_mean(data: Dataset, sid: str, net: UNet) -> float:
    """One model's map of a sample, averaged over the mask pixels of all its scans."""
    pixels = []
    for scan in data.samples[sid].scans:
        x = torch.from_numpy(data.model_input(data.cube(scan)[...]))
        pixels.append(predict_map(net, x).numpy()[0][data.mask(scan)].astype(np.float64))
    return float(np.concatenate(pixels).mean())


def _pooled(maps: list[dict], name: str) -> tuple[float, float]:
    """(pooled over all pixels, mean over maps) RMSE of a method's maps against the flat truth."""
    inside = [t[name][t["mask"]].astype(np.float64) for t in maps]
    pooled = np.sqrt(np.mean((np.concatenate(inside) - TRUTH) ** 2))
    return float(pooled), float(np.mean([np.sqrt(np.mean((v - TRUTH) ** 2)) for v in inside]))


def test_map_metrics_come_from_the_dataset_truth_and_the_registered_ensemble(evaluated):
    _, dataset, training, ev, m = evaluated
    maps = _test_maps(dataset, training, ev)
    for name in ("unet", "pls"):
        r = m["maps"][name]
        pooled, per_map = _pooled(maps, name)
        assert r["pixel_rmse"] == pytest.approx(pooled, rel=1e-6)
        assert r["pixel_rmse_per_map"] == pytest.approx(per_map, rel=1e-6)
        inside = np.concatenate([t[name][t["mask"]] for t in maps])
        assert r["out_of_range_fraction"] == pytest.approx(np.mean((inside < 0) | (inside > 100)))
        full_shares = [
            spatial_correlated_share(np.where(t["mask"], t[name], np.nan), t["mask"]) for t in maps
        ]
        assert r["spatial_correlated_share_full"] == pytest.approx(np.mean(full_shares))
    # PLS makes its map pixel by pixel: its own grid is the scan's. The U-Net's is half of it.
    assert m["maps"]["pls"]["spatial_correlated_share"] == m["maps"]["pls"]["spatial_correlated_share_full"]
    assert m["maps"]["unet"]["spatial_correlated_share"] != m["maps"]["unet"]["spatial_correlated_share_full"]
    # The U-Net's sample prediction is the mean of its map over the sample's pixels.
    for sid, p in zip(m["test_predictions"]["sample_id"], m["test_predictions"]["unet"], strict=True):
        inside = np.concatenate([t["unet"][t["mask"]] for t in maps if t["sample"] == sid])
        assert p == pytest.approx(inside.astype(np.float64).mean(), rel=1e-6)


def test_every_baseline_is_reported_with_its_role_and_the_headroom_says_so(evaluated):
    _, dataset, _, _, m = evaluated
    rows = m["maps"]
    expected = ["unet", "unet_fold1", "unet_fold2", "pls", "pls_clip", "pls_gauss", "pls_median"]
    expected += ["pls_bin2", "pls_bin4", "flat_lab", "brightness_lab", "pls_gauss_oracle"]
    assert list(rows) == expected
    for name in ("flat_lab", "brightness_lab", "pls_gauss_oracle"):
        assert rows[name]["role"].startswith("headroom"), name
    assert "test truth" in rows["pls_gauss_oracle"]["role"]
    protocol = m["protocol"]
    assert rows["pls_gauss"]["setting"] == f"sigma {protocol['gauss_sigma']:g} px"
    assert protocol["best_label_free"] in expected[3:9]
    # The oracle is the best width on the test truth: the chosen width cannot beat it there.
    assert rows["pls_gauss_oracle"]["pixel_rmse"] <= rows["pls_gauss"]["pixel_rmse"]
    # A flat map at the lab value against a flat truth: its error is the lab value's distance.
    data = Dataset(dataset.path / "dataset.zarr")
    sq, n = 0.0, 0
    for sid in data.ids([0]):
        for scan in data.samples[sid].scans:
            px = int(data.mask(scan).sum())
            sq, n = sq + px * (data.samples[sid].targets[0] - TRUTH) ** 2, n + px
    # Maps are float32: the lab value as float32 is within 6e-8 of itself (relative).
    assert rows["flat_lab"]["pixel_rmse"] == pytest.approx(np.sqrt(sq / n), rel=1e-6)
    assert rows["flat_lab"]["mean_rmse_lab"] == pytest.approx(0.0, abs=1e-5)
    assert rows["brightness_lab"]["mean_rmse_lab"] == pytest.approx(0.0, abs=1e-4)


def test_each_fold_model_is_scored_on_the_test_split(evaluated):
    _, dataset, training, _, m = evaluated
    data = Dataset(dataset.path / "dataset.zarr")
    ref = np.array(m["test_predictions"]["reference"])
    for fold, net in zip((1, 2), _members(training), strict=True):
        preds = np.array([_sample_mean(data, sid, net) for sid in data.ids([0])])
        expected = np.sqrt(np.mean((preds - ref) ** 2))
        assert m["models"][f"unet_fold{fold}"]["rmse"] == pytest.approx(expected, rel=1e-6)
        assert m["maps"][f"unet_fold{fold}"]["mean_rmse_lab"] == pytest.approx(expected, rel=1e-6)


def test_a_finished_evaluation_is_not_redone(evaluated):
    cfg, dataset, training, ev, _ = evaluated
    said = []
    again = evaluate_ensemble(cfg, dataset, training, progress=False, log=said.append)
    assert again.path == ev.path and said == [f"evaluate: done already ({ev.path})"]


def test_unfinished_training_is_refused(evaluated, tmp_path):
    cfg, dataset, _, _, _ = evaluated
    unfinished = stage_dir(tmp_path, "train", {"never": 1}, [dataset.key])
    with pytest.raises(InputError, match="no finished training"):
        evaluate_ensemble(cfg, dataset, unfinished, progress=False, log=lambda s: None)


def test_without_true_maps_nothing_is_chosen_and_the_rest_is_reported(tiny_dataset, tmp_path):
    """A real scanner's dataset has no true maps: no tuned baseline, no pixel error, no crash."""
    import zarr

    _, pre = tiny_dataset
    cfg = load_config(ROOT / "configs" / "ci.yaml", [f"workdir={tmp_path}"])
    stage = stage_dir(tmp_path, "preprocess", {"no_truth_copy_of": pre.key})
    stage.begin()
    shutil.copytree(pre.path / "dataset.zarr", stage.path / "dataset.zarr")
    root = zarr.open_group(str(stage.path / "dataset.zarr"), mode="r+")
    for scan in Dataset(stage.path / "dataset.zarr").scan_ids:
        del root[f"scans/{scan}/truth"]
    zarr.consolidate_metadata(str(stage.path / "dataset.zarr"))
    stage.finish({})
    training = _random_training(tmp_path, stage, f"sqlite:///{tmp_path / 'mlflow.db'}")
    ev = evaluate_ensemble(cfg, stage, training, progress=False, log=lambda s: None)
    m = json.loads((ev.path / "metrics.json").read_text())
    assert m["protocol"]["training_scans_with_truth"] == 0 and m["protocol"]["best_label_free"] is None
    assert list(m["maps"]) == [
        "unet",
        "unet_fold1",
        "unet_fold2",
        "pls",
        "pls_clip",
        "pls_bin2",
        "pls_bin4",
        "flat_lab",
    ]
    assert all("pixel_rmse" not in row for row in m["maps"].values())
    assert np.isfinite(m["rmsecv"]["unet"]) and m["maps"]["pls"]["mean_rmse_lab"] > 0


def test_the_readme_tables_are_regenerated_from_the_metrics(evaluated, tmp_path):
    import subprocess
    import sys

    _, _, _, ev, m = evaluated
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\nbefore\n<!-- results:begin -->\nstale\n<!-- results:end -->\nafter\n")
    cmd = [
        sys.executable,
        str(ROOT / "bench" / "readme_results.py"),
        "--metrics",
        str(ev.path / "metrics.json"),
    ]
    subprocess.run([*cmd, "--write", str(readme)], check=True, capture_output=True)
    text = readme.read_text()
    assert "stale" not in text and text.startswith("# x\n\nbefore\n") and text.endswith("after\n")
    rows = {line.split(" | ")[0][2:]: line for line in text.splitlines() if line.startswith("| ")}
    assert set(m["maps"]) <= set(rows) and {"unet", "pls", "unet_fold1"} <= set(rows)
    assert f"| {m['maps']['unet']['pixel_rmse']:.2f} |" in rows["unet"]
    assert f"{m['models']['pls']['rmse']:.3f}" in text


def test_test_maps_are_written_as_chemmap_score_writes_them(evaluated):
    from chemmap.inference.score_output import read_map_zarr

    _, dataset, training, ev, _ = evaluated
    data = Dataset(dataset.path / "dataset.zarr")
    recomputed = {(t["sample"], i): t for i, t in enumerate(_test_maps(dataset, training, ev))}
    scans = [scan for sid in data.ids([0]) for scan in data.samples[sid].scans]
    assert sorted(p.name for p in (ev.path / "maps").glob("*.zarr")) == sorted(f"{s}.zarr" for s in scans)
    for (_, i), t in recomputed.items():
        maps, mask, attrs = read_map_zarr(ev.path / "maps" / f"{scans[i]}.zarr")
        assert np.array_equal(mask, t["mask"]) and attrs["scan_id"] == scans[i]
        np.testing.assert_array_equal(maps[0], np.where(t["mask"], t["unet"], np.nan).astype(np.float32))


def test_the_blind_spot_baseline_is_fitted_out_of_fold_and_scored_when_asked(evaluated):
    """``evaluate.blindspot_steps``: a label-free ``pls_n2v`` row, chosen among the label-free
    baselines on its out-of-fold score like the others; off by default (the fixture's run)."""
    cfg, dataset, training, ev, plain = evaluated
    assert "pls_n2v" not in plain["maps"]
    steps = cfg.model_copy(update={"evaluate": cfg.evaluate.model_copy(update={"blindspot_steps": 20})})
    again = evaluate_ensemble(steps, dataset, training, progress=False, log=lambda s: None)
    assert again.path != ev.path  # its own stage: the setting is in the key
    m = json.loads((again.path / "metrics.json").read_text())
    row = m["maps"]["pls_n2v"]
    assert row["role"] == "baseline: label-free" and np.isfinite(row["pixel_rmse"])
    assert np.isfinite(m["protocol"]["oof_pixel_rmse"]["pls_n2v"]) and np.isfinite(row["oof_pixel_rmse"])
    for name in ("pls", "pls_median", "unet"):  # the rest is the same evaluation
        assert m["maps"][name]["pixel_rmse"] == pytest.approx(plain["maps"][name]["pixel_rmse"], rel=1e-9)
    cached = sorted((steps.workdir_path / "cache" / "pls_n2v").glob("*.pt"))
    assert cached  # one per scored fold: another training's evaluation on this dataset finds them


def test_the_map_bound_keeps_the_maps_in_range_and_reports_the_map_before_it(evaluated):
    """``model.bounded``: the same training evaluated again; the U-Net's rows are its maps
    clamped to 0-100 %, and ``unet_unbounded`` is the evaluation without the bound."""
    cfg, dataset, training, ev, plain = evaluated
    bounded = cfg.model_copy(update={"model": cfg.model.model_copy(update={"bounded": True})})
    again = evaluate_ensemble(bounded, dataset, training, progress=False, log=lambda s: None)
    assert again.path != ev.path
    m = json.loads((again.path / "metrics.json").read_text())["maps"]
    assert m["unet"]["out_of_range_fraction"] == 0.0
    # The fixture's one-epoch map leaves the range (about 0.5 % of pixels): the clamp does work.
    assert m["unet_unbounded"]["out_of_range_fraction"] > 0
    assert m["unet"]["pixel_rmse"] < m["unet_unbounded"]["pixel_rmse"]
    for key in ("pixel_rmse", "out_of_range_fraction", "mean_rmse_lab"):
        assert m["unet_unbounded"][key] == pytest.approx(plain["maps"]["unet"][key], rel=1e-9)
    assert m["unet_unbounded"]["role"].startswith("reference")
