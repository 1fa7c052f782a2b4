"""Bundles and evaluations for the registry tests, made without training.

A bundle here is what the register stage will log: seeded random fold U-Nets saved the way
the training stage saves them, the tiny dataset's recipe, and a provenance holding the test
predictions of a fabricated ``metrics.json`` (so the registry can compare versions).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from chemmap.inference.bundle import write_bundle
from chemmap.models.unet import UNet, UNetConfig
from chemmap.preprocess.store import Dataset
from chemmap.registry.registry import evaluation_provenance

NAME = "fat"  # the registered model of the shared registry
N_TEST = 30  # fabricated test samples: enough for a decisive paired bootstrap
TRUTH = np.linspace(10.0, 40.0, N_TEST)  # % fat
BASE_ERRORS = np.random.default_rng(1).normal(0.0, 2.0, N_TEST) + 0.5  # RMSE about 2 % fat


def sample_ids(n: int = N_TEST, prefix: str = "s") -> list[str]:
    return [f"{prefix}{i:03d}" for i in range(n)]


def evaluation(
    dataset_key: str, errors: np.ndarray, *, ids: list[str] | None = None, training_key: str = "train-k"
) -> dict[str, Any]:
    """The part of the evaluate stage's ``metrics.json`` the registry reads."""
    ids = sample_ids() if ids is None else ids
    truth = TRUTH[: len(ids)]
    unet = truth + np.asarray(errors)[: len(ids)]
    return {
        "dataset_key": dataset_key,
        "training_key": training_key,
        "models": {"unet": {"rmse": float(np.sqrt(np.mean((unet - truth) ** 2)))}},
        "test_predictions": {
            "sample_id": ids,
            "reference": truth.tolist(),
            "unet": unet.tolist(),
            "pls": (truth + 3.0).tolist(),
        },
    }


def dataset(tiny_dataset) -> Dataset:
    _, stage = tiny_dataset
    return Dataset(stage.path / "dataset.zarr")


def saturation(data: Dataset) -> float | None:
    """The raw saturation level the dataset recorded (the same for every synthetic scan)."""
    levels = {row["saturation"] for row in data.scan_table}
    assert len(levels) == 1, levels
    return levels.pop()


def random_training(folder: Path, data: Dataset, seed: int) -> Path:
    """A finished training's files: two seeded random fold U-Nets and ``model.json``."""
    config = UNetConfig(in_channels=data.n_channels, out_channels=1, depth=3, features=4, front_end=True)
    folder.mkdir(parents=True)
    torch.manual_seed(seed)
    weights = []
    for fold in (1, 2):
        (folder / f"fold{fold}").mkdir()
        torch.save(UNet(config).state_dict(), folder / f"fold{fold}" / "best.pt")
        weights.append(f"fold{fold}/best.pt")
    card = {"unet": asdict(config), "targets": data.targets[:1], "folds": [1, 2], "weights": weights}
    (folder / "model.json").write_text(json.dumps(card))
    return folder


def bundle(root: Path, data: Dataset, seed: int, ev: dict[str, Any], name: str) -> Path:
    """A bundle of random weights whose provenance records the evaluation ``ev``."""
    training = random_training(root / f"train-{name}", data, seed)
    level = saturation(data)
    provenance = {
        **evaluation_provenance(ev),
        "raw_saturation": None if level is None or math.isinf(level) else level,
    }
    return write_bundle(root / f"bundle-{name}", training, data.recipe, provenance=provenance)


def new_run(client, experiment: str, artifacts: Path | None = None) -> str:
    """A fresh run in ``experiment`` (created with its artifacts under ``artifacts``, never ./mlruns)."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        location = None if artifacts is None else artifacts.as_uri()
        eid = client.create_experiment(experiment, artifact_location=location)
    else:
        eid = exp.experiment_id
    return client.create_run(eid).info.run_id


def log_pyfunc(uri: str, run_id: str, **kwargs):
    """``mlflow.pyfunc.log_model(name="model", **kwargs)`` into ``run_id``, as anyone could log a model."""
    import mlflow

    from chemmap.registry.registry import _global_tracking_uri

    with _global_tracking_uri(uri), mlflow.start_run(run_id=run_id):
        return mlflow.pyfunc.log_model(name="model", pip_requirements=["chemmap"], **kwargs)


def register_logged(client, name: str, model_uri: str, run_id: str) -> str:
    """A new version of ``name`` (created if missing) for a logged model ``models:/m-...``; its number."""
    if not client.search_registered_models(f"name='{name}'"):
        client.create_registered_model(name)
    logged = client.get_logged_model(model_uri.removeprefix("models:/"))
    # The storage location, not models:/m-..., which MLflow's SQL store resolves on the global URI.
    return str(
        client.create_model_version(name, logged.artifact_location, run_id, model_id=logged.model_id).version
    )
