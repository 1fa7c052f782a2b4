"""Ridge regression for the spectral path's start: the closed-form leave-one-out is the refitted one."""

from __future__ import annotations

import numpy as np
import pytest

from chemmap.models.ridge import PENALTIES, ridge_loo


def _data(seed: int = 0, n: int = 40, c: int = 12, noise: float = 0.5):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, c)) @ rng.normal(size=(c, c))  # correlated bands, like spectra
    beta = rng.normal(size=c)
    return x, x @ beta + 7.0 + noise * rng.normal(size=n), beta


def _refit_loo(x: np.ndarray, y: np.ndarray, lam: float) -> float:
    """Leave each sample out, fit ridge (centred, intercept unpenalised) on the rest, predict it."""
    errors = []
    for i in range(len(y)):
        keep = np.arange(len(y)) != i
        xm, ym = x[keep].mean(0), y[keep].mean()
        xc = x[keep] - xm
        b = np.linalg.solve(xc.T @ xc + lam * np.eye(x.shape[1]), xc.T @ (y[keep] - ym))
        errors.append(y[i] - (ym + (x[i] - xm) @ b))
    return float(np.sqrt(np.mean(np.square(errors))))


def test_closed_form_leave_one_out_is_the_refitted_one() -> None:
    x, y, _ = _data()
    fit = ridge_loo(x, y)
    s0 = np.linalg.svd(x - x.mean(0), compute_uv=False)[0]
    assert fit.loo_rmse[0] == pytest.approx(_refit_loo(x, y, fit.penalty[0] * s0**2), rel=1e-9)
    # and it is the smallest over the grid
    worst = max(_refit_loo(x, y, p * s0**2) for p in PENALTIES[::6])
    assert fit.loo_rmse[0] <= worst


def test_it_recovers_a_linear_relation_and_predicts_with_the_intercept() -> None:
    x, y, beta = _data(noise=1e-3)
    fit = ridge_loo(x, np.stack([y, 2 * y], axis=1))
    assert fit.coef.shape == (12, 2) and fit.intercept.shape == (2,)
    assert np.allclose(fit.coef[:, 0], beta, atol=1e-2) and np.allclose(fit.coef[:, 1], 2 * beta, atol=2e-2)
    assert np.allclose(x @ fit.coef + fit.intercept, np.stack([y, 2 * y], 1), atol=0.05)


def test_noisier_labels_take_a_larger_penalty() -> None:
    x, y_clean, _ = _data(noise=1e-3)
    _, y_noisy, _ = _data(noise=5.0)
    assert ridge_loo(x, y_noisy).penalty[0] > ridge_loo(x, y_clean).penalty[0]


@pytest.mark.parametrize(
    "x, y",
    [
        (np.zeros((2, 3)), np.zeros(2)),
        (np.zeros((5, 3)), np.zeros(4)),
        (np.full((5, 3), np.nan), np.zeros(5)),
    ],
)
def test_bad_input_is_one_clear_error(x: np.ndarray, y: np.ndarray) -> None:
    with pytest.raises(ValueError, match=r"ridge_loo|expected x"):
        ridge_loo(x, y)
