"""PLS baseline: known linear models, CV equivalence with a brute-force refit, pixel maps."""

from __future__ import annotations

import json

import numpy as np
import pytest

from chemmap.models.pls import PLSBaseline, choose_components, cv_curve


def _latent_data(n: int = 150, bands: int = 40, n_latent: int = 3, noise: float = 0.002, seed: int = 0):
    """Spectra from ``n_latent`` smooth components of falling variance; fat needs all of them."""
    rng = np.random.default_rng(seed)
    wl = np.linspace(0, 1, bands)
    loadings = np.stack([np.exp(-(((wl - c) / 0.08) ** 2)) for c in np.linspace(0.2, 0.8, n_latent)])
    scores = rng.normal(size=(n, n_latent)) * np.array([3.0, 1.0, 0.3, 0.2, 0.1][:n_latent])
    X = 0.5 + scores @ loadings * 0.1 + noise * rng.normal(size=(n, bands))
    y = 25 + scores @ np.array([1.0, -4.0, 10.0, 5.0, 5.0][:n_latent]) + 0.2 * rng.normal(size=n)
    folds = np.resize(np.arange(1, 6), n)
    rng.shuffle(folds)
    return X, y, folds


def test_recovers_linear_model_and_sensible_component_count():
    X, y, folds = _latent_data()
    model = PLSBaseline(max_components=12).fit(X, y, folds, target_names=["fat"])
    assert model.n_components[0] == 3  # 3 latent factors, each needed
    cv = model.cv[0]
    assert len(cv["rmsecv"]) == 12
    assert cv["rmsecv_at_chosen"] == pytest.approx(min(cv["rmsecv"]))
    assert cv["rmsecv"][0] > 2 * cv["rmsecv_at_chosen"]  # one component is clearly not enough
    assert cv["rmsecv_at_chosen"] < 0.5  # lab noise is 0.2
    X_new, y_new, _ = _latent_data(n=100, seed=1)
    pred = model.predict(X_new)[:, 0]
    assert np.sqrt(np.mean((pred - y_new) ** 2)) < 0.5


def test_cv_matches_brute_force_refit_with_sklearn():
    from sklearn.cross_decomposition import PLSRegression

    X, y, folds = _latent_data(n=90, bands=25, seed=2)
    pred, se = cv_curve(X, y, folds, max_components=6)
    for a in (1, 3):
        brute = np.empty_like(y)
        for f in np.unique(folds):
            train = folds != f
            reg = PLSRegression(n_components=a, scale=False).fit(X[train], y[train])
            brute[~train] = reg.predict(X[~train]).ravel()
        np.testing.assert_allclose(pred[:, a - 1], brute, rtol=1e-8, atol=1e-8)
        np.testing.assert_allclose(se.sum(axis=0)[a - 1], np.sum((brute - y) ** 2), rtol=1e-8)


def test_final_model_equals_ikpls_refit_on_all_training_samples():
    from ikpls.numpy import PLS

    X, y, folds = _latent_data(n=80, seed=3)
    model = PLSBaseline(max_components=8).fit(X, y, folds)
    a = model.n_components[0]
    ref = PLS(center_X=True, center_Y=True, scale_X=False, scale_Y=False).fit(X, y, a)
    np.testing.assert_allclose(model.predict(X), ref.predict(X, n_components=a), rtol=1e-9, atol=1e-9)


def test_multi_target_and_scaling():
    X, y, folds = _latent_data(n=100, seed=4)
    Y = np.stack([y, 100 - y], axis=1)
    model = PLSBaseline(max_components=8, scale_x=True).fit(X, Y, folds, target_names=["fat", "lean"])
    pred = model.predict(X)
    assert pred.shape == (100, 2)
    np.testing.assert_allclose(pred[:, 0] + pred[:, 1], 100, atol=1e-6)  # linear in Y, same A
    assert model.target_names == ["fat", "lean"]


def test_predict_cube_equals_predict_on_pixels_and_nan_outside_mask():
    X, y, folds = _latent_data(n=60, bands=17, seed=5)
    model = PLSBaseline(max_components=5).fit(X, np.stack([y, 2 * y], 1), folds)
    rng = np.random.default_rng(6)
    h, w = 33, 47
    cube = rng.uniform(0.3, 0.7, size=(17, h, w)).astype(np.float32)
    mask = rng.random((h, w)) > 0.3
    cube[:, ~mask] = np.nan  # outside the sample nothing needs to be finite
    maps = model.predict_cube(cube, mask, max_pixels=100)  # many small row blocks
    assert maps.shape == (2, h, w) and maps.dtype == np.float32
    assert np.all(np.isnan(maps[:, ~mask]))
    expect = model.predict(cube[:, mask].T.astype(np.float64))  # (n_pix, T)
    np.testing.assert_allclose(maps[:, mask], expect.T, rtol=1e-5, atol=1e-4)
    whole = model.predict_cube(cube, mask)
    np.testing.assert_array_equal(whole, maps)


def test_to_dict_round_trip_is_json_and_npz():
    X, y, folds = _latent_data(n=60, seed=7)
    model = PLSBaseline(max_components=6).fit(X, y, folds, target_names=["fat"])
    d = json.loads(json.dumps(model.to_dict()))
    back = PLSBaseline.from_dict(d)
    np.testing.assert_allclose(back.predict(X), model.predict(X), rtol=1e-12)
    assert back.n_components == model.n_components and back.cv[0]["rmsecv"] == model.cv[0]["rmsecv"]
    assert "oof_pred" not in model.to_dict(include_cv_predictions=False)["cv"][0]
    arrays = {k: np.asarray(v) for k, v in d.items() if k in ("coef", "intercept", "x_mean", "y_mean")}
    back2 = PLSBaseline.from_dict({"kind": "pls", **arrays})
    np.testing.assert_allclose(back2.predict(X), model.predict(X), rtol=1e-12)
    with pytest.raises(ValueError, match="kind"):
        PLSBaseline.from_dict({"kind": "unet"})


def test_input_checks():
    X, y, folds = _latent_data(n=40, seed=8)
    with pytest.raises(ValueError, match="split 0"):
        PLSBaseline().fit(X, y, np.where(folds == 1, 0, folds))
    with pytest.raises(ValueError, match="at least 2 folds"):
        PLSBaseline().fit(X, y, np.ones_like(folds))
    with pytest.raises(ValueError, match="NaN"):
        PLSBaseline().fit(np.where(X > 0.6, np.nan, X), y, folds)
    with pytest.raises(RuntimeError, match="not fitted"):
        PLSBaseline().predict(X)
    model = PLSBaseline(max_components=3).fit(X, y, folds)
    with pytest.raises(ValueError, match="bands"):
        model.predict_cube(np.zeros((5, 4, 4)))


def test_choose_components_rules():
    curve = np.array([3.0, 1.2, 1.05, 1.0, 1.01])
    per_fold = np.array([[3, 1.2, 1.0, 0.8, 0.8], [3, 1.2, 1.1, 1.2, 1.2]], dtype=float)
    assert choose_components(curve) == 4
    assert choose_components(curve, per_fold, "one_se") == 2  # SE = 0.4 / sqrt(2) / sqrt(2)... = 0.2
    with pytest.raises(ValueError, match="rule"):
        choose_components(curve, rule="max")


class _RowBlockCube:
    """A cube that only hands out row blocks and records their sizes (stands in for zarr/dask)."""

    def __init__(self, data: np.ndarray) -> None:
        self._data = data
        self.shape = data.shape
        self.rows_read: list[int] = []

    def __getitem__(self, key):
        block = self._data[key]
        self.rows_read.append(block.shape[1])
        return block


def test_predict_cube_reads_bounded_row_blocks():
    X, y, folds = _latent_data(n=60, bands=17, seed=9)
    model = PLSBaseline(max_components=4).fit(X, y, folds)
    cube = np.random.default_rng(10).uniform(0.3, 0.7, size=(17, 61, 33))
    mask = np.zeros((61, 33), dtype=bool)
    mask[10:50, 5:30] = True
    lazy = _RowBlockCube(cube)
    maps = model.predict_cube(lazy, mask, max_pixels=33 * 4)
    assert max(lazy.rows_read) <= 4
    assert sum(lazy.rows_read) == 44  # rows 8..51: blocks without sample pixels are not read
    np.testing.assert_array_equal(maps, model.predict_cube(cube, mask))
