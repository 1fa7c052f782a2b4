"""Known-answer tests for chemmap.evaluate.metrics."""

from __future__ import annotations

import numpy as np
import pytest

from chemmap.evaluate.metrics import map_metrics, paired_bootstrap, regression_metrics, rmse, rmsecv
from chemmap.spatial import spatial_correlated_share


def test_perfect_predictions():
    y = np.array([10.0, 20.0, 30.0, 45.0])
    m = regression_metrics(y, y.copy())
    assert m["n"] == 4
    assert m["rmse"] == 0.0 and m["bias"] == 0.0 and m["sep"] == 0.0
    assert m["r2"] == 1.0
    assert m["rpd"] == float("inf")
    assert m["slope"] == pytest.approx(1.0) and m["intercept"] == pytest.approx(0.0, abs=1e-12)


def test_constant_bias():
    y = np.array([10.0, 20.0, 30.0, 45.0, 12.0])
    m = regression_metrics(y, y + 2.5)
    assert m["bias"] == pytest.approx(2.5)
    assert m["rmse"] == pytest.approx(2.5)
    assert m["sep"] == pytest.approx(0.0, abs=1e-12)
    assert m["slope"] == pytest.approx(1.0)
    assert m["intercept"] == pytest.approx(2.5)
    assert m["r2"] == pytest.approx(1.0 - 5 * 2.5**2 / np.sum((y - y.mean()) ** 2))


def test_hand_computed_example():
    # ref 1,2,3; pred 2,2,5 -> residuals 1,0,2
    y = np.array([1.0, 2.0, 3.0])
    p = np.array([2.0, 2.0, 5.0])
    m = regression_metrics(y, p)
    assert m["rmse"] == pytest.approx(np.sqrt(5 / 3))
    assert m["r2"] == pytest.approx(1 - 5 / 2)  # SS_res 5, SS_tot 2
    assert m["bias"] == pytest.approx(1.0)
    assert m["sep"] == pytest.approx(1.0)  # std of (1, 0, 2), ddof=1
    assert m["rpd"] == pytest.approx(1.0)  # SD(ref) = 1
    # pred on ref: slope = cov/var = ((-1)(-1) + 0 + (1)(2)) / 2 = 1.5, intercept = 3 - 1.5 * 2 = 0
    assert m["slope"] == pytest.approx(1.5)
    assert m["intercept"] == pytest.approx(0.0, abs=1e-12)
    # RMSE^2 = bias^2 + SEP^2 (n-1)/n
    assert m["rmse"] ** 2 == pytest.approx(m["bias"] ** 2 + m["sep"] ** 2 * 2 / 3)


def test_column_vectors_and_bad_input():
    y = np.arange(5.0)
    assert rmse(y[:, None], y[:, None] + 1) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="differ in length"):
        regression_metrics(y, y[:4])
    with pytest.raises(ValueError, match="non-finite"):
        regression_metrics(y, np.array([0, 1, np.nan, 3, 4.0]))
    with pytest.raises(ValueError, match=r"shape \(n,\)"):
        regression_metrics(np.ones((5, 2)), np.ones((5, 2)))


def test_rmsecv_pools_squared_errors():
    y = np.array([0.0, 0.0, 0.0, 0.0])
    pred = np.array([1.0, 1.0, 1.0, 3.0])
    folds = np.array([1, 1, 1, 2])
    out = rmsecv(y, pred, folds)
    assert out["rmsecv"] == pytest.approx(np.sqrt(12 / 4))  # not the mean of per-fold RMSEs (2.0)
    assert out["per_fold"] == {1: pytest.approx(1.0), 2: pytest.approx(3.0)}
    curve = rmsecv(y, np.stack([pred, 2 * pred], axis=1))
    assert curve["rmsecv"] == pytest.approx([np.sqrt(3), 2 * np.sqrt(3)])


def test_map_metrics_counts_out_of_range_and_truth():
    rng = np.random.default_rng(0)
    truth = np.full((20, 30), 40.0)
    m = truth + rng.normal(0, 1, truth.shape)
    m[0, :10] = -5.0
    m[1, :5] = 120.0
    mask = np.ones_like(m, dtype=bool)
    mask[-1] = False
    m[-1] = np.nan  # outside the mask: allowed
    out = map_metrics(m, mask, truth)
    assert out["n_pixels"] == 19 * 30
    assert out["out_of_range_fraction"] == pytest.approx(15 / (19 * 30))
    # The share of the map inside the mask: what lies outside (NaN or anything) changes nothing.
    share = spatial_correlated_share(np.where(mask, m, np.nan), mask)
    assert 0.05 < share < 0.95  # noise plus two correlated runs of outliers: neither extreme
    assert out["spatial_correlated_share"] == share
    garbage = np.where(mask, m, 1e6)
    assert map_metrics(garbage, mask, truth)["spatial_correlated_share"] == share
    diff = (m - truth)[mask]
    assert out["pixel_rmse"] == pytest.approx(np.sqrt(np.mean(diff**2)))
    assert out["pixel_bias"] == pytest.approx(diff.mean())


def test_map_metrics_refuses_nan_inside_mask():
    m = np.full((8, 8), 30.0)
    m[3, 3] = np.nan
    with pytest.raises(ValueError, match=r"scan_07: 1 of 64 pixels"):
        map_metrics(m, np.ones((8, 8), bool), name="scan_07")
    with pytest.raises(ValueError, match="empty"):
        map_metrics(m, np.zeros((8, 8), bool))


def test_map_metrics_smooth_map_is_spatially_correlated():
    yy, xx = np.mgrid[0:64, 0:64]
    smooth = 30 + 10 * np.sin(xx / 9.0) * np.cos(yy / 11.0)
    noise = 30 + np.random.default_rng(1).normal(0, 10, smooth.shape)
    mask = np.ones_like(smooth, dtype=bool)
    assert map_metrics(smooth, mask)["spatial_correlated_share"] > 0.9
    assert map_metrics(noise, mask)["spatial_correlated_share"] < 0.2


def test_bootstrap_clear_case_excludes_zero_and_covers_truth():
    rng = np.random.default_rng(3)
    n = 200
    y = rng.uniform(10, 50, n)
    pred_a = y + rng.normal(0, 1.0, n)
    pred_b = y + rng.normal(0, 2.0, n)
    out = paired_bootstrap(y, pred_a, pred_b, n_boot=2000, seed=0)
    assert out["estimate"] == pytest.approx(rmse(y, pred_a) - rmse(y, pred_b))
    assert out["ci_low"] < out["estimate"] < out["ci_high"]
    assert out["ci_high"] < 0  # a is clearly better
    assert out["ci_low"] < -1.0 < out["ci_high"]  # true difference: 1 - 2
    assert out["prob_a_better"] > 0.99
    again = paired_bootstrap(y, pred_a, pred_b, n_boot=2000, seed=0)
    assert again == out  # seeded


def test_bootstrap_identical_predictions_contains_zero():
    rng = np.random.default_rng(4)
    y = rng.uniform(10, 50, 60)
    p = y + rng.normal(0, 2.0, 60)
    out = paired_bootstrap(y, p, p.copy(), n_boot=500)
    assert out["estimate"] == 0.0
    assert out["ci_low"] <= 0.0 <= out["ci_high"]
    assert out["prob_a_better"] == 0.0


def test_bootstrap_coverage_of_similar_models():
    # two equally good models: the 95% CI must contain 0 in most seeded repetitions
    hits = 0
    for rep in range(20):
        rng = np.random.default_rng(100 + rep)
        y = rng.uniform(10, 50, 80)
        out = paired_bootstrap(
            y, y + rng.normal(0, 1.5, 80), y + rng.normal(0, 1.5, 80), n_boot=500, seed=rep
        )
        hits += out["ci_low"] <= 0.0 <= out["ci_high"]
    assert hits >= 16


def test_bootstrap_arguments():
    y = np.arange(5.0)
    with pytest.raises(ValueError, match="ci"):
        paired_bootstrap(y, y, y, ci=1.5)
    with pytest.raises(ValueError, match="n_boot"):
        paired_bootstrap(y, y, y, n_boot=0)
