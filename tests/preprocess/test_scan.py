"""The one path for a scan: the dataset builder and a direct call of its three functions agree bit for bit.

Scoring will call :mod:`chemmap.preprocess.scan` directly on a raw scan held in memory;
the builder runs the same functions over Dask blocks. Both must give the same bits.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from chemmap.io import discover_scans, open_scan
from chemmap.preprocess.scan import model_input, reference_means, sample_mask, transform
from chemmap.preprocess.store import open_dataset


@pytest.fixture(scope="module")
def dataset(tiny_dataset):
    _, stage = tiny_dataset
    return open_dataset(stage.path / "dataset.zarr")


@pytest.mark.parametrize("which", [0, -1])  # a training scan and a test scan
def test_raw_scan_through_the_three_functions_equals_the_dataset(dataset, which):
    info = dataset.scan_table[which]
    raw_path = Path(info["raw"])
    files = {f.scan_id: f for f in discover_scans(raw_path.parents[2])}[info["scan_id"]]
    recipe = dataset.recipe
    scan = open_scan(raw_path)
    white, dark = reference_means(scan, files, recipe)
    raw = np.asarray(scan.data.compute())  # the whole scan in memory, as scoring holds a block
    out = transform(raw, white, dark, recipe, recipe.saturation_level(scan.header, scan.dtype))
    sm = sample_mask(
        np.asarray(out.reflectance_mean), np.asarray(out.bad), recipe.config.mask, source=str(raw_path)
    )

    stored = dataset.cube(info["scan_id"])[...]
    assert out.cube.dtype == stored.dtype == np.float32
    assert np.array_equal(out.cube, stored, equal_nan=True)
    assert np.array_equal(sm.mask, dataset.mask(info["scan_id"]))
    assert sm.bad_removed == info["bad_pixels_in_mask"]
    x = model_input(out.cube, recipe)
    h, w = dataset.shape(info["scan_id"])
    assert np.array_equal(x, dataset.model_input(dataset.raw_window(info["scan_id"], 0, 0, h, w)))
    assert np.isfinite(x).all()
    # Normalisation really happened: the training statistics standardise the masked pixels.
    if dataset.samples[info["sample_id"]].split != 0:
        assert abs(float(x[:, sm.mask].mean())) < 3.0


def test_model_input_standardises_and_zeroes_what_is_outside_the_scan(dataset):
    recipe = dataset.recipe
    mean = np.asarray(recipe.mean, np.float32)
    std = np.asarray(recipe.std, np.float32)
    x = np.stack([mean + 2 * std, np.full_like(mean, np.nan)], axis=1)[:, :, None]  # (C, 2, 1)
    z = model_input(x.astype(np.float32), recipe)
    np.testing.assert_allclose(z[:, 0, 0], 2.0, rtol=1e-5)
    assert (z[:, 1, 0] == 0).all()
    y = x.astype(np.float32)
    inplace = model_input(y, recipe, overwrite=True)
    assert inplace is y and np.array_equal(inplace, z)  # in place: the same values, bit for bit
