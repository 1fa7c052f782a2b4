"""The register stage: the evaluated fold ensemble into the MLflow model registry.

What was evaluated is what is registered: the training's fold weights, with the dataset's
recipe, in a bundle of plain files (:mod:`chemmap.inference.bundle`). The bundle is logged
as a pyfunc model (models-from-code) into the evaluation's run, so the registered version
links to the run that evaluated it; the stage's own run records the version and its alias.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from chemmap import tracking
from chemmap.config import ChemmapConfig, dump_config
from chemmap.errors import InputError
from chemmap.inference.bundle import BUNDLE_FORMAT, write_bundle
from chemmap.inference.flags import fit_spectral_model
from chemmap.preprocess.store import Dataset
from chemmap.registry.registry import Registration, log_model, register
from chemmap.stages import StageDir, stage_dir

__all__ = ["provenance", "register_model", "registration_dir"]

Log = Callable[[str], None]


def _raw_saturation(data: Dataset) -> float | None:
    """The saturation level of the training data's raw counts, if every scan had the same one."""
    levels = {row.get("saturation") for row in data.scan_table}
    if len(levels) == 1:
        level = levels.pop()
        return None if level is None else float(level)
    return None


def provenance(
    data: Dataset, keys: dict[str, str], runs: dict[str, str], metrics: dict[str, Any]
) -> dict[str, Any]:
    """Where a model came from and how it scored on its test split: the bundle's provenance.

    Args:
        keys: ``dataset_key``, ``training_key``, ``evaluate_key``.
        runs: ``training_run``, ``evaluate_run`` (MLflow run ids).
        metrics: the evaluation's ``metrics.json``.
    """
    models = metrics["models"]
    unet = models["unet"] if "rmse" in models["unet"] else next(iter(models["unet"].values()))
    maps = metrics.get("maps", {})
    unet_map = maps.get("unet", {}) if "unet" in maps else {}
    return {
        **keys,
        **runs,
        "test_sample_ids": list(metrics["test_predictions"]["sample_id"]),
        "test_predictions": metrics["test_predictions"],
        "test_metrics": {
            "rmse": unet["rmse"],
            "r2": unet["r2"],
            "pixel_rmse": unet_map.get("pixel_rmse"),
            "rmse_pls": (models["pls"] if "rmse" in models["pls"] else next(iter(models["pls"].values())))[
                "rmse"
            ],
        },
        "raw_saturation": _raw_saturation(data),
    }


def registration_dir(
    cfg: ChemmapConfig, dataset_stage: StageDir, training_stage: StageDir, evaluate_stage: StageDir
) -> StageDir:
    """The register stage's folder for this config and these finished upstream stages."""
    # flags: the spectral model's limits are learnt here, so its settings key this stage.
    section = {
        "registered_model": cfg.mlflow.registered_model or cfg.name,
        "bundle_format": BUNDLE_FORMAT,
        "spectral_model": 1,
        "flags": cfg.flags.model_dump(mode="json"),
    }
    upstream = [dataset_stage.key, training_stage.key, evaluate_stage.key]
    return stage_dir(cfg.workdir_path, "register", section, upstream)


def register_model(
    cfg: ChemmapConfig,
    dataset_stage: StageDir,
    training_stage: StageDir,
    evaluate_stage: StageDir,
    *,
    runs: tracking.PipelineRuns | None = None,
    log: Log = print,
) -> StageDir:
    """Log and register the evaluated ensemble under ``mlflow.registered_model``; set its alias.

    Returns:
        The finished stage (``bundle/``: what was logged; summary: name, version, alias, why).
    """
    if not evaluate_stage.complete:
        raise InputError(f"no finished evaluation at {evaluate_stage.path}; run `chemmap evaluate` first")
    stage = registration_dir(cfg, dataset_stage, training_stage, evaluate_stage)
    name = stage.config["registered_model"]
    if stage.complete:
        s = stage.summary()
        log(f"register: done already ({name} version {s.get('version')}, {s.get('alias')})")
        if runs is not None:
            runs.cached("register", s.get("mlflow_run_id"))
        return stage
    tracking.check_tracking_uri(cfg.tracking_uri)
    out = stage.begin()
    data = Dataset(dataset_stage.path / "dataset.zarr")
    metrics = json.loads((evaluate_stage.path / "metrics.json").read_text())
    evaluate_run = evaluate_stage.summary()["mlflow_run_id"]
    keys = {
        "dataset_key": dataset_stage.key,
        "training_key": training_stage.key,
        "evaluate_key": evaluate_stage.key,
    }
    run_ids = {
        "training_run": training_stage.summary().get("mlflow_run_id", ""),
        "evaluate_run": evaluate_run,
    }
    facts = provenance(data, keys, run_ids, metrics)
    spectral = fit_spectral_model(data, percentile=cfg.flags.percentile)  # the limits scoring flags with
    bound = evaluate_stage.config.get("bound")  # the map as it was evaluated is what is registered
    bundle = write_bundle(
        out / "bundle",
        training_stage.path,
        data.recipe,
        provenance=facts,
        spectral_model=spectral,
        bound=bound,
    )
    model_uri = log_model(cfg.tracking_uri, evaluate_run, bundle, bands=len(data.recipe.raw_wavelengths))
    reg = register(cfg.tracking_uri, name, model_uri, evaluation=metrics, tags={**keys, **run_ids})
    summary = {
        "name": reg.name,
        "version": reg.version,
        "alias": reg.alias,
        "reason": reg.reason,
        "model_uri": model_uri,
        "mlflow_run_id": _log_register_run(cfg, stage, reg, runs),
        "tracking_uri": cfg.tracking_uri,
    }
    stage.finish(summary, dump_config(cfg))
    log(
        f"register: {reg.name} version {reg.version} -> {reg.alias}"
        + (f" ({reg.reason})" if reg.reason else "")
    )
    return stage


def _log_register_run(
    cfg: ChemmapConfig, stage: StageDir, reg: Registration, runs: tracking.PipelineRuns | None
) -> str:
    """The stage's own run: which version it registered and the alias it got."""
    tags = {
        "chemmap.registered_model": reg.name,
        "chemmap.model_version": reg.version,
        "chemmap.alias": reg.alias,
    }
    if runs is not None:
        rid = runs.stage("register", stage.key, tags=tags)
    else:
        experiment = cfg.mlflow.experiment or cfg.name
        rid = tracking.stage_run(cfg.tracking_uri, experiment, "register", stage.key, tags=tags)
    c = tracking.client(cfg.tracking_uri)
    if reg.reason:
        c.set_tag(rid, "chemmap.alias_reason", reg.reason[:5000])
    c.set_terminated(rid)
    return rid
