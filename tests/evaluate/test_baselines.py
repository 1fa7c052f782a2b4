"""Map baselines and map metrics on tiny maps whose answers are known."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from chemmap.evaluate.baselines import (
    bin_map,
    brightness_map,
    flat_map,
    gaussian_in_mask,
    median_in_mask,
    pls_candidates,
)
from chemmap.evaluate.metrics import MapTally, map_metrics
from chemmap.models.pls import PLSBaseline
from chemmap.spatial import coarse_mask


def _ellipse(h: int = 40, w: int = 32) -> np.ndarray:
    y, x = np.mgrid[:h, :w]
    return ((y - h / 2) / (0.42 * h)) ** 2 + ((x - w / 2) / (0.42 * w)) ** 2 < 1


def test_smoothing_never_reads_outside_the_mask():
    rng = np.random.default_rng(0)
    mask = _ellipse()
    inside = np.where(mask, rng.normal(30, 10, mask.shape), np.nan)
    a = np.where(mask, inside, 1e6)  # background that would dominate if it leaked in
    b = np.where(mask, inside, -1e6)
    for smooth in (lambda z: gaussian_in_mask(z, mask, 3.0), lambda z: median_in_mask(z, mask, 5)):
        ma, mb = smooth(a), smooth(b)
        np.testing.assert_array_equal(ma.full, mb.full)
        assert np.all(np.isnan(ma.full[~mask])) and np.all(np.isfinite(ma.full[mask]))
        assert np.nanmax(ma.full) < 100


def test_smoothing_keeps_a_constant_map_and_flattens_a_spike():
    mask = _ellipse()
    const = np.full(mask.shape, 42.0)
    np.testing.assert_allclose(gaussian_in_mask(const, mask, 2.0).full[mask], 42.0, rtol=1e-6)
    np.testing.assert_array_equal(median_in_mask(const, mask, 3).full[mask], 42.0)
    spike = const.copy()
    spike[20, 16] = 1000.0
    assert median_in_mask(spike, mask, 3).full[20, 16] == 42.0  # 1 of 9 values: the median ignores it
    # A normalised Gaussian of a spike: the spike's weight at its own pixel, 1 / (2 pi sigma²) in 2-D.
    g = gaussian_in_mask(spike, mask, 2.0).full[20, 16]
    assert g == pytest.approx(42.0 + (1000 - 42) / (2 * np.pi * 4), rel=1e-3)


def test_median_of_an_edge_pixel_uses_only_mask_pixels():
    z = np.arange(25, dtype=float).reshape(5, 5)
    mask = np.zeros((5, 5), bool)
    mask[0, :3] = True  # values 0, 1, 2
    out = median_in_mask(z, mask, 3)
    assert out.full[0, 0] == 0.5 and out.full[0, 1] == 1.0 and out.full[0, 2] == 1.5


def test_binning_a_pls_map_is_pls_on_the_binned_cube():
    rng = np.random.default_rng(1)
    c, h, w = 6, 11, 9  # odd sizes: edge bins hold what is left
    cube = rng.normal(0.5, 0.1, (c, h, w))
    mask = rng.random((h, w)) > 0.3
    pls = PLSBaseline.from_dict(
        {"kind": "pls", "coef": rng.normal(0, 10, (c, 1)).tolist(), "intercept": [20.0]}
    )
    per_pixel = pls.predict_cube(cube.astype(np.float32), mask)[0]
    for size in (2, 4):
        binned = bin_map(per_pixel, mask, size)
        for by in range(-(-h // size)):
            for bx in range(-(-w // size)):
                cell = (slice(by * size, (by + 1) * size), slice(bx * size, (bx + 1) * size))
                m = mask[cell]
                assert binned.native_mask[by, bx] == m.any()
                if m.any():
                    spectrum = cube[:, cell[0], cell[1]][:, m].mean(axis=1)  # the bin's mean spectrum
                    expected = pls.predict(spectrum[None])[0, 0]
                    assert binned.native[by, bx] == pytest.approx(expected, rel=1e-5)
                    np.testing.assert_allclose(binned.full[cell][m], expected, rtol=1e-5)
        assert binned.native.shape == (-(-h // size), -(-w // size))


def test_candidates_are_clipped_and_the_raw_map_is_not():
    mask = _ellipse()
    z = np.where(mask, np.linspace(-50, 150, mask.size).reshape(mask.shape), np.nan)
    cands = pls_candidates(z, mask)
    assert np.nanmin(cands["pls"].full) < 0 and np.nanmax(cands["pls"].full) > 100
    for key, bm in cands.items():
        if key != "pls":
            assert 0 <= np.nanmin(bm.full) and np.nanmax(bm.full) <= 100, key
    assert {"pls_clip", "pls_gauss@2", "pls_median@5", "pls_bin2", "pls_bin4"} <= set(cands)


def test_label_maps_keep_the_lab_value_as_their_mean():
    mask = _ellipse()
    rng = np.random.default_rng(2)
    b = rng.normal(0.4, 0.05, mask.shape)
    assert np.nanmean(flat_map(mask, 23.5).full) == pytest.approx(23.5)
    m = brightness_map(b, mask, 23.5, slope=80.0)
    assert m.full[mask].astype(np.float64).mean() == pytest.approx(23.5, rel=1e-6)
    np.testing.assert_allclose(np.diff(m.full[mask]), 80.0 * np.diff(b[mask]), rtol=1e-4, atol=1e-3)


def test_a_map_equal_to_the_truth_scores_zero():
    rng = np.random.default_rng(3)
    tally = MapTally()
    for i, shape in enumerate([(20, 16), (12, 30)]):
        truth = rng.uniform(0, 100, shape)
        mask = rng.random(shape) > 0.2
        tally.add(f"s{i}", np.where(mask, truth, np.nan), mask, truth, fat_tissue=truth >= 50)
    labs = {"s0": 10.0, "s1": 20.0}
    s = tally.summary(labs)
    for key in ("pixel_rmse", "pixel_bias", "pixel_rmse_per_map", "bias_fat_tissue", "bias_lean_tissue"):
        assert s[key] == 0.0, key
    assert s["mean_rmse_truth"] == pytest.approx(0.0, abs=1e-12)
    assert s["mean_rmse_lab"] > 10  # the truth's mean is not the lab value here


def test_pooled_per_map_tissue_and_mean_errors_by_hand():
    tally = MapTally()
    truth_a = np.array([[0.0, 100.0], [80.0, 20.0]])
    tally.add(
        "a",
        truth_a + np.array([[1.0, -2.0], [-2.0, 1.0]]),
        np.ones((2, 2), bool),
        truth_a,
        fat_tissue=truth_a >= 50,
    )
    truth_b = np.zeros((1, 2))
    tally.add("b", np.array([[3.0, 3.0]]), np.ones((1, 2), bool), truth_b, fat_tissue=truth_b >= 50)
    s = tally.summary({"a": 50.0, "b": 0.0})
    assert s["pixel_rmse"] == pytest.approx(np.sqrt((1 + 4 + 4 + 1 + 9 + 9) / 6))  # pooled: every pixel once
    assert s["pixel_rmse_per_map"] == pytest.approx((np.sqrt(10 / 4) + 3.0) / 2)  # every map once
    assert s["bias_fat_tissue"] == pytest.approx(-2.0)  # true 100 and 80
    assert s["bias_lean_tissue"] == pytest.approx((1 + 1 + 3 + 3) / 4)
    assert s["mean_rmse_lab"] == pytest.approx(np.sqrt(((49.5 - 50) ** 2 + 9) / 2))
    assert s["mean_rmse_truth"] == pytest.approx(np.sqrt((0.5**2 + 9) / 2))
    assert tally.sample_means() == pytest.approx({"a": 49.5, "b": 3.0})


def test_upsampled_white_noise_is_smooth_only_on_the_upsampled_grid():
    rng = np.random.default_rng(4)
    noise = rng.normal(0, 1, (64, 48)).astype(np.float32)
    up = F.interpolate(
        torch.from_numpy(noise)[None, None], scale_factor=2, mode="bilinear", align_corners=False
    )
    up = up[0, 0].numpy()  # (128, 96): what the U-Net's front-end does to its map
    mask = np.ones(up.shape, bool)
    r = map_metrics(up, mask, native=(noise, coarse_mask(mask, 2)))
    assert r["spatial_correlated_share_full"] > 0.99  # "100 %": built in by the up-sampling
    assert r["spatial_correlated_share"] < 0.05
    assert map_metrics(noise)["spatial_correlated_share"] < 0.1


def test_coarse_mask_needs_every_covered_pixel():
    mask = np.ones((5, 4), bool)
    mask[0, 0] = False
    cm = coarse_mask(mask, 2)
    assert cm.shape == (3, 2)
    assert not cm[0, 0] and cm[0, 1] and cm[2, 0]  # the odd last row covers one real row


def test_mask_pixels_the_truth_calls_background_are_left_out_and_counted():
    truth = np.array([[10.0, np.nan], [30.0, 40.0]])  # the estimated mask took in one background pixel
    pred = np.array([[11.0, 99.0], [29.0, 42.0]])
    mask = np.ones((2, 2), bool)
    r = map_metrics(pred, mask, truth)
    assert r["pixel_rmse"] == pytest.approx(np.sqrt((1 + 1 + 4) / 3)) and r["pixels_without_truth"] == 1
    tally = MapTally()
    tally.add("a", pred, mask, truth)
    s = tally.summary({"a": 0.0})
    assert s["pixel_rmse"] == pytest.approx(r["pixel_rmse"]) and s["pixels_without_truth"] == 1
    assert s["mean_rmse_truth"] == pytest.approx(abs((11 + 29 + 42) / 3 - (10 + 30 + 40) / 3))
    assert s["mean_rmse_lab"] == pytest.approx(pred.mean())  # the map's mean over all its pixels
    with pytest.raises(ValueError, match="no value inside the mask"):
        map_metrics(pred, mask, np.full((2, 2), np.nan))
