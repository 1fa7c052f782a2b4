"""One registry on a SQLite store, filled once for the registry tests: five versions of ``fat``.

The versions' evaluations are fabricated on 30 test samples: v1 the first, v2 clearly better
(every error x0.3), v3 as bad as v1, v4 evaluated on another dataset, v5 on other samples.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import mlflow
import pytest

from chemmap import tracking
from chemmap.registry.registry import log_model, register
from tests.registry import helpers

UNREACHABLE = "http://127.0.0.1:9"


@pytest.fixture(scope="session")
def registered(tiny_dataset, tmp_path_factory):
    """The store's URI and folder, the run, and each version's evaluation, model URI and registration."""
    root = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    data = helpers.dataset(tiny_dataset)
    key = tiny_dataset[1].key
    client = tracking.client(uri)
    run = helpers.new_run(client, "registry-test", root / "artifacts")
    # Left RUNNING, as a resumed training run is: log_model's start_run/end_run must not finish it.
    errors = helpers.BASE_ERRORS
    evaluations = {
        "first": helpers.evaluation(key, errors),
        "better": helpers.evaluation(key, errors * 0.3),
        "worse": helpers.evaluation(key, errors),
        "other_dataset": helpers.evaluation("another-dataset-key", errors * 0.1),
        "other_samples": helpers.evaluation(key, errors * 0.1, ids=helpers.sample_ids(prefix="t")),
    }
    models, registrations = {}, {}
    with pytest.MonkeyPatch.context() as mp:
        # A trap: anything that fell back on MLflow's global tracking URI would fail loudly here
        # instead of writing ./mlflow.db; log_model must leave the global URI and the variable alone.
        mp.setenv("MLFLOW_TRACKING_URI", UNREACHABLE)
        uri_before = mlflow.get_tracking_uri()
        for seed, (label, ev) in enumerate(evaluations.items()):
            bundle = helpers.bundle(root, data, seed, ev, label)
            models[label] = log_model(uri, run, bundle, bands=len(data.recipe.raw_wavelengths))
            tags = {"chemmap.training_key": f"train-{label}", "chemmap.training_run_id": run, "seed": seed}
            registrations[label] = register(uri, helpers.NAME, models[label], evaluation=ev, tags=tags)
        global_uri = (uri_before, mlflow.get_tracking_uri(), os.environ.get("MLFLOW_TRACKING_URI"))
    run_status = client.get_run(run).info.status  # test_fetch.py's own logging later finishes the run
    return SimpleNamespace(
        uri=uri,
        root=root,
        run=run,
        data=data,
        key=key,
        client=client,
        evaluations=evaluations,
        models=models,
        registrations=registrations,
        global_uri=global_uri,
        run_status=run_status,
    )
