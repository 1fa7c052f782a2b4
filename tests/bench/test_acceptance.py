"""bench/acceptance.py's statistics across datasets, on numbers worked out by hand (no pipeline run)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from bench import acceptance  # the script's own functions (bench/ is importable from the repo root)

ROOT = Path(__file__).resolve().parents[2]


def test_log_ratio_interval_on_known_numbers():
    # log-ratios exactly -0.2, -0.1, 0, 0.1, 0.3 (other = 1): mean 0.02, sd sqrt(0.037),
    # t(0.975, 4) = 2.776445105...
    logs = [-0.2, -0.1, 0.0, 0.1, 0.3]
    r = acceptance.paired_log_ratio([math.exp(v) for v in logs], [1.0] * 5)
    half = 2.7764451051977934 * math.sqrt(0.037) / math.sqrt(5)
    assert r["n"] == 5 and r["df"] == 4
    assert r["log_ratios"] == pytest.approx(logs)
    assert r["mean"] == pytest.approx(0.02)
    assert r["sd"] == pytest.approx(math.sqrt(0.037))
    assert (r["ci_low"], r["ci_high"]) == pytest.approx((0.02 - half, 0.02 + half))
    assert (r["ratio"], r["ratio_low"], r["ratio_high"]) == pytest.approx(
        (math.exp(0.02), math.exp(0.02 - half), math.exp(0.02 + half))
    )


def test_the_ratio_is_scale_free_and_paired():
    # The same relative gap on datasets of very different error levels: no spread, zero width.
    r = acceptance.paired_log_ratio([1.0, 10.0, 100.0], [2.0, 20.0, 200.0])
    assert r["mean"] == pytest.approx(math.log(0.5))
    assert r["ci_low"] == pytest.approx(r["ci_high"])
    assert r["ratio"] == pytest.approx(0.5)
    assert r["wins"] == 3


def test_wins_count_strictly_lower_and_ties_apart():
    r = acceptance.paired_log_ratio([1.0, 2.0, 3.0, 4.0, 5.0], [2.0, 2.0, 1.0, 5.0, 4.0])
    assert (r["wins"], r["ties"]) == (2, 1)


def test_two_datasets_use_one_degree_of_freedom():
    r = acceptance.paired_log_ratio([1.0, 2.0], [2.0, 2.0])
    half = 12.706204736174694 * (math.log(2) / math.sqrt(2)) / math.sqrt(2)
    assert r["df"] == 1
    assert r["ci_high"] - r["mean"] == pytest.approx(half)


@pytest.mark.parametrize(
    ("unet", "other", "match"),
    [
        ([1.0], [2.0], "at least 2 datasets, got 1"),
        ([1.0, 2.0], [1.0], "equal lengths, got 2 and 1"),
        ([1.0, 0.0], [1.0, 1.0], "finite and > 0"),
        ([1.0, float("nan")], [1.0, 1.0], "finite and > 0"),
    ],
)
def test_refuses_what_has_no_interval(unet, other, match):
    with pytest.raises(ValueError, match=match):
        acceptance.paired_log_ratio(unet, other)


def test_across_pairs_every_map_by_dataset():
    def dataset(seed, unet_px, gauss_px, unet_fat, pls_fat, best="pls_gauss"):
        return {
            "seed": seed,
            "mean_fat": {"unet_rmse": unet_fat, "pls_rmse": pls_fat},
            "maps": {
                "unet": {"role": "model: the fold ensemble", "pixel_rmse": unet_px},
                "pls_gauss": {"role": "baseline: label-free", "pixel_rmse": gauss_px},
            },
            "best_label_free": best,
        }

    rows = acceptance.across([dataset(100, 20.0, 10.0, 2.0, 2.5), dataset(101, 30.0, 15.0, 3.0, 2.0)])
    by = {(r["against"], r["measure"]): r for r in rows}
    assert set(by) == {
        ("pls", "mean-fat RMSE"),
        ("pls_gauss", "per-pixel RMSE"),
        ("best label-free", "per-pixel RMSE"),
    }
    assert by[("pls", "mean-fat RMSE")]["wins"] == 1
    assert by[("pls_gauss", "per-pixel RMSE")]["ratio"] == pytest.approx(2.0)
    assert by[("best label-free", "per-pixel RMSE")]["ratio"] == pytest.approx(2.0)
