"""The protocol: settings chosen out of fold on the training splits, never on the test split."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from chemmap.evaluate.baselines import BRIGHTNESS_SIGMAS, SIGMAS, setting_key
from chemmap.evaluate.protocol import (
    BrightnessFit,
    OutOfFold,
    choose,
    fold_pls_models,
    out_of_fold,
    training_splits,
)
from chemmap.evaluate.stage import fit_pls, mean_spectra
from chemmap.preprocess.store import Dataset

ROOT = Path(__file__).resolve().parents[2]


def test_brightness_slope_is_scored_on_the_fold_it_was_not_fitted_on():
    rng = np.random.default_rng(0)
    fit, scans = BrightnessFit(), []
    for fold in (1, 2, 3):
        for _ in range(4):
            b = rng.normal(0.4, 0.05, 50)
            t = 30 + 300 * (b - 0.4) + rng.normal(0, 5, 50)
            lab = t.mean() + rng.normal(0, 1)
            fit.add(fold, 2.0, b, t, lab)
            scans.append((fold, b, t, lab))
    sse, n = 0.0, 0
    for fold in (1, 2, 3):
        rest = [(b - b.mean(), t - t.mean()) for f, b, t, _ in scans if f != fold]
        x = np.concatenate([r[0] for r in rest])
        y = np.concatenate([r[1] for r in rest])
        slope = (x @ y) / (x @ x)
        for f, b, t, lab in scans:
            if f == fold:
                pred = lab + slope * (b - b.mean())
                sse += np.sum((pred - t) ** 2)
                n += t.size
    assert fit.oof_rmse(2.0) == pytest.approx(np.sqrt(sse / n), rel=1e-10)
    assert fit.slope(2.0) == pytest.approx(300, rel=0.1)


def test_choose_takes_the_lowest_out_of_fold_score_and_the_first_of_equals():
    oof = OutOfFold(scans=3)
    for s in SIGMAS:
        oof.sse[setting_key("pls_gauss", s)] = [abs(s - 3.0) + 1.0, 1]
    for k in (3, 5, 7, 9, 11):
        oof.sse[setting_key("pls_median", k)] = [2.0, 1]  # all equal: the first wins
    for key, v in {"pls": 50.0, "pls_clip": 40.0, "pls_bin2": 30.0, "pls_bin4": 0.5}.items():
        oof.sse[key] = [v, 1]
    for s in BRIGHTNESS_SIGMAS:
        oof.brightness.add(1, s, np.array([0.0, 1.0]), np.array([0.0, 1.0]), 0.5)
        oof.brightness.add(2, s, np.array([0.0, 1.0]), np.array([0.0, 2.0]), 1.0)
    c = choose(oof)
    assert c.gauss_sigma == 3.0 and c.median_size == 3
    assert c.best_label_free == "pls_bin4"  # sqrt(0.5) beats sqrt(1) of pls_gauss@3
    assert c.setting("pls_gauss") == "pls_gauss@3" and c.setting("pls_bin4") == "pls_bin4"


def _copy(pre, tmp_path, name: str) -> Dataset:
    shutil.copytree(pre.path / "dataset.zarr", tmp_path / name)
    return Dataset(tmp_path / name)


def _noise_truth(data: Dataset, splits: list[int], seed: int) -> None:
    import zarr

    root = zarr.open_group(str(data.path), mode="r+")
    rng = np.random.default_rng(seed)
    for sid in data.ids(splits):
        for scan in data.samples[sid].scans:
            arr = root[f"scans/{scan}/truth/fat"]
            arr[...] = rng.uniform(0, 100, arr.shape).astype(arr.dtype)


def _choices(data: Dataset):
    spectra = mean_spectra(data)
    by_fold = fold_pls_models(data, spectra, ["fat"], fit_pls)
    oof = out_of_fold(data, ["fat"], by_fold, {}, progress=False)["fat"]
    return choose(oof), oof


@pytest.mark.slow
def test_the_test_truth_chooses_nothing(tiny_dataset, tmp_path):
    _, pre = tiny_dataset
    original = _copy(pre, tmp_path, "original.zarr")
    noisy_test = _copy(pre, tmp_path, "noisy_test.zarr")
    _noise_truth(noisy_test, [0], seed=1)
    assert not np.array_equal(
        original.truth(original.samples[original.ids([0])[0]].scans[0])["fat"],
        noisy_test.truth(noisy_test.samples[noisy_test.ids([0])[0]].scans[0])["fat"],
    )
    c0, oof0 = _choices(original)
    c1, oof1 = _choices(noisy_test)
    assert c0.scans == len(original.ids([1, 2, 3, 4, 5])) > 0
    assert c1 == c0  # every setting and every out-of-fold score
    assert oof1.sse == oof0.sse

    # The same noise in the training splits' truth moves every score: the choices do read them.
    noisy_train = _copy(pre, tmp_path, "noisy_train.zarr")
    _noise_truth(noisy_train, [1, 2, 3, 4, 5], seed=1)
    c2, _ = _choices(noisy_train)
    assert all(c2.oof_rmse[k] != c0.oof_rmse[k] for k in c0.oof_rmse)


def test_a_reduced_fold_set_scores_every_method_on_the_trained_folds_scans_only(tiny_dataset):
    """With U-Nets for folds 1 and 2 only (``train.folds``), the baselines are scored on those
    folds' scans too: the same pixels as the U-Net, not all five folds'."""
    import torch

    from chemmap.config import load_config
    from chemmap.models.unet import UNet
    from chemmap.train.trainer import model_config

    sets, pre = tiny_dataset
    data = Dataset(pre.path / "dataset.zarr")
    cfg = load_config(ROOT / "configs" / "ci.yaml", sets)
    torch.manual_seed(0)
    net = UNet(model_config(cfg, data.n_channels, len(cfg.targets))).eval()
    by_fold = fold_pls_models(data, mean_spectra(data), ["fat"], fit_pls)
    oof = out_of_fold(data, ["fat"], by_fold, {1: net, 2: net}, progress=False)["fat"]
    scans = [s for sid in data.ids([1, 2]) for s in data.samples[sid].scans]
    pixels = sum(int((data.mask(s) & np.isfinite(data.truth(s)["fat"])).sum()) for s in scans)
    assert oof.scans == len(scans) < sum(len(data.samples[s].scans) for s in data.ids([1, 2, 3, 4, 5]))
    assert oof.sse["unet"][1] == oof.sse["pls"][1] == oof.sse["pls_median@3"][1] == pixels
    # The brightness slopes still come from every fold; one trained fold is scored with the others'.
    everything = out_of_fold(data, ["fat"], by_fold, {}, progress=False)["fat"]
    one = out_of_fold(data, ["fat"], by_fold, {1: net}, progress=False)["fat"]
    sigma = BRIGHTNESS_SIGMAS[1]
    assert one.brightness.slope(sigma) == pytest.approx(everything.brightness.slope(sigma), rel=1e-12)
    fold1 = [s for sid in data.ids([1]) for s in data.samples[sid].scans]
    assert one.scans == len(fold1) and np.isfinite(choose(one).oof_rmse[setting_key("brightness_lab", sigma)])


@pytest.mark.slow
def test_the_brightness_baseline_scales_the_stored_brightness_not_the_cube(tiny_dataset):
    """Its slope is the least-squares slope of the truth on the dataset's brightness map (mean
    reflectance before any transform), per scan about its mean: a recipe with SNV, whose cube
    has a channel mean of 0 at every pixel, still has a brightness to scale."""
    _, pre = tiny_dataset
    data = Dataset(pre.path / "dataset.zarr")
    by_fold = fold_pls_models(data, mean_spectra(data), ["fat"], fit_pls)
    oof = out_of_fold(data, ["fat"], by_fold, {}, progress=False)["fat"]
    sxx = sxy = 0.0
    for sid in data.ids(training_splits(data)):
        for scan in data.samples[sid].scans:
            known = data.mask(scan) & np.isfinite(data.truth(scan)["fat"])
            b = data.brightness(scan)[known].astype(np.float64)
            t = data.truth(scan)["fat"][known].astype(np.float64)
            sxx += ((b - b.mean()) ** 2).sum()
            sxy += ((b - b.mean()) * (t - t.mean())).sum()
    assert oof.brightness.slope(0.0) == pytest.approx(sxy / sxx, rel=1e-9)
    assert abs(sxy / sxx) > 1.0  # % fat per unit reflectance: fat is whiter than lean


def test_the_blind_spot_baseline_scores_each_fold_with_a_denoiser_that_never_saw_it(monkeypatch):
    """``pls_n2v`` is cross-fitted like the U-Net: fold k's maps are mapped by a denoiser
    trained on the other folds' maps (unscored folds' included), and the test split gets
    their mean."""
    from chemmap.evaluate import protocol
    from chemmap.evaluate.blindspot import BlindSpotConfig, train_map_denoiser

    rng = np.random.default_rng(0)
    truth = np.full((24, 24), 40.0)
    mask = np.ones((24, 24), bool)
    oof = OutOfFold(kept=[])
    for fold, scored in ((1, True), (1, True), (2, True), (3, False)):
        noisy = (truth + rng.normal(0, 8, truth.shape)).astype(np.float32)
        noisy[0, 0] = 1000.0 + fold  # a tag: which fold a training map came from
        oof.kept.append((fold, noisy, mask, truth, scored))
    trained_on = []

    def recording(maps, cfg, cache):
        assert cache is None  # add_denoised's default: trained every time
        trained_on.append(sorted(int(s[0, 0]) - 1000 for s, _ in maps))
        return train_map_denoiser(maps, cfg)

    monkeypatch.setattr(protocol, "cached_map_denoiser", recording)
    ensemble = protocol.add_denoised(oof, BlindSpotConfig(steps=3, batch=2, crop=16))
    assert trained_on == [[2, 3], [1, 1, 3]]  # fold 1's denoiser, then fold 2's; fold 3 is not scored
    assert len(ensemble.nets) == 2
    assert oof.sse["pls_n2v"][1] == 3 * mask.sum()  # the three scored maps, each once
    one = ensemble.apply(oof.kept[0][1])
    assert one.shape == truth.shape and np.isfinite(one).all()
