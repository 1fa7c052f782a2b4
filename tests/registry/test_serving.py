"""The registered champion as anyone loads it: ``mlflow.pyfunc.load_model`` in a fresh process.

A real ``mlflow server`` holds the model; a new Python process loads ``models:/NAME@champion``
knowing nothing but the tracking URI, and scores one of the tiny dataset's raw scans handed in
band-last, as MLflow users hold arrays. Its maps must be those :func:`map_arrays` gives in
this process for the same scan and bundle, and its mask the one the dataset stored.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from chemmap import tracking
from chemmap.inference.bundle import read_bundle
from chemmap.inference.mapping import map_arrays
from chemmap.io import discover_scans, open_scan
from chemmap.registry.registry import fetch_bundle, log_model, register, resolve
from tests.registry import helpers

pytestmark = pytest.mark.slow  # an MLflow server and a fresh Python process: about 20 s on 2 cores

NAME = "fat-served"
HIGH = 1e9  # a saturation level no count reaches

LOAD_AND_PREDICT = """
import sys
import mlflow
import numpy as np

model = mlflow.pyfunc.load_model(sys.argv[1])
scan = dict(np.load(sys.argv[2]))
np.save(sys.argv[3], model.predict(scan))
np.save(sys.argv[4], model.predict(scan, params={"saturation": float(sys.argv[5])}))
"""


@pytest.fixture(scope="module")
def served(tiny_dataset, mlflow_server, tmp_path_factory):
    """A bundle logged and registered (the first version: champion) on the real server."""
    root = tmp_path_factory.mktemp("served")
    data = helpers.dataset(tiny_dataset)
    ev = helpers.evaluation(tiny_dataset[1].key, helpers.BASE_ERRORS)
    bundle = helpers.bundle(root, data, 7, ev, "served")
    run = helpers.new_run(tracking.client(mlflow_server), "registry-serving")
    model_uri = log_model(mlflow_server, run, bundle, bands=len(data.recipe.raw_wavelengths))
    reg = register(mlflow_server, NAME, model_uri, evaluation=ev, tags={"chemmap.training_run_id": run})
    assert reg.alias == "champion"
    return SimpleNamespace(uri=mlflow_server, data=data, bundle=bundle, registration=reg)


def _scan_with_saturated_pixels(data, bundle) -> tuple[str, dict, np.ndarray, np.ndarray, np.ndarray]:
    """A scan whose mask lost saturated pixels: ``(scan id, row, raw, white, dark)`` float32 band-first.

    Dead detector columns leave the mask too, whatever the saturation level: the scan must be
    one whose mask grows when nothing counts as saturated.
    """
    model = bundle.ensemble()
    for row in (r for r in data.scan_table if r["bad_pixels_in_mask"] > 0):
        raw_hdr = Path(row["raw"])
        files = {s.scan_id: s for s in discover_scans(raw_hdr.parents[2])}[row["scan_id"]]
        assert files.raw == raw_hdr
        arrays = [
            np.asarray(open_scan(p).data.compute(), dtype=np.float32)
            for p in (files.raw, files.white, files.dark)
        ]
        unsaturated = map_arrays(model, bundle.recipe, *arrays, saturation=HIGH).mask
        if unsaturated.sum() > data.mask(row["scan_id"]).sum():
            return row["scan_id"], row, *arrays
    raise AssertionError("no scan of the tiny dataset has a saturated pixel in its sample")


def test_a_fresh_process_loads_the_champion_and_reproduces_the_in_process_map(served, tmp_path):
    scan_id, row, raw, white, dark = _scan_with_saturated_pixels(served.data, read_bundle(served.bundle))
    np.savez(
        tmp_path / "scan.npz",
        **{
            k: np.moveaxis(a, 0, -1)
            for k, a in zip(("raw", "white", "dark"), (raw, white, dark), strict=True)
        },
    )
    env = {**os.environ, "MLFLOW_TRACKING_URI": served.uri}
    env.pop("MLFLOW_REGISTRY_URI", None)
    out = [tmp_path / "default.npy", tmp_path / "high.npy"]
    args = [f"models:/{NAME}@champion", tmp_path / "scan.npz", *out, repr(HIGH)]
    done = subprocess.run(
        [sys.executable, "-c", LOAD_AND_PREDICT, *map(str, args)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    got, got_high = (np.load(p) for p in out)

    bundle = read_bundle(served.bundle)
    model = bundle.ensemble()
    level = math.inf if row["saturation"] is None else row["saturation"]
    expected = map_arrays(model, bundle.recipe, raw, white, dark, saturation=level)
    assert got.shape == (1, *raw.shape[1:]) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected.maps, rtol=0, atol=1e-5, equal_nan=True)
    assert np.array_equal(np.isfinite(got[0]), served.data.mask(scan_id))
    assert np.array_equal(expected.mask, served.data.mask(scan_id))

    # The saturation parameter reaches the model: no pixel is saturated, the mask keeps them.
    high = map_arrays(model, bundle.recipe, raw, white, dark, saturation=HIGH)
    np.testing.assert_allclose(got_high, high.maps, rtol=0, atol=1e-5, equal_nan=True)
    assert np.isfinite(got_high[0]).sum() > np.isfinite(got[0]).sum()


def test_fetch_bundle_downloads_from_the_server(served, tmp_path):
    name, version = resolve(served.uri, f"models:/{NAME}@champion")
    assert (name, version) == (NAME, served.registration.version)
    bundle, name, version = fetch_bundle(served.uri, f"models:/{NAME}@champion", tmp_path)
    assert (name, version) == (NAME, served.registration.version)
    assert bundle.manifest == read_bundle(served.bundle).manifest
    folder = bundle.path.relative_to(tmp_path / NAME).parts[0]  # <version>-<identity>
    assert folder.startswith(f"{version}-")
