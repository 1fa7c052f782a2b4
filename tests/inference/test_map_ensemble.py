"""The fold ensemble is the mean of its members, whole-image and tiled, from weights on disk."""

from __future__ import annotations

import json
from dataclasses import asdict

import numpy as np
import pytest
import torch

import chemmap.inference.ensemble as ensemble_module
from chemmap.inference.ensemble import (
    MapEnsemble,
    check_bound,
    load_ensemble,
    load_weights,
    member_maps,
    output_step,
    predict_map,
)
from chemmap.models.tiling import model_geometry
from chemmap.models.unet import UNet, UNetConfig

# The paper's layout in small: a stride-2 spectral front-end, two targets.
CONFIG = UNetConfig(in_channels=9, out_channels=2, depth=3, features=4, front_end=True)
H, W = 33, 47  # odd sizes: padded in, cropped out


@pytest.fixture
def model_dir(tmp_path):
    """Three seeded random fold models saved as the training stage saves them."""
    weights = []
    for fold in (1, 2, 3):
        torch.manual_seed(100 + fold)
        (tmp_path / f"fold{fold}").mkdir()
        torch.save(UNet(CONFIG).state_dict(), tmp_path / f"fold{fold}" / "best.pt")
        weights.append(f"fold{fold}/best.pt")
    card = {"unet": asdict(CONFIG), "targets": ["fat", "water"], "folds": [1, 2, 3], "weights": weights}
    (tmp_path / "model.json").write_text(json.dumps(card))
    return tmp_path


def _members(model_dir) -> list[UNet]:
    """The fold models built one by one from their files."""
    members = []
    for fold in (1, 2, 3):
        net = UNet(CONFIG)
        net.load_state_dict(load_weights(model_dir / f"fold{fold}" / "best.pt"))
        members.append(net.eval())
    return members


def _scan() -> np.ndarray:
    return np.random.default_rng(7).standard_normal((CONFIG.in_channels, H, W), dtype=np.float32)


def test_the_ensemble_map_is_the_mean_of_the_members_maps(model_dir):
    ensemble, card = load_ensemble(model_dir)
    assert isinstance(ensemble, MapEnsemble) and len(ensemble.members) == 3 and not ensemble.training
    assert card["weights"] == ["fold1/best.pt", "fold2/best.pt", "fold3/best.pt"]
    x = _scan()
    one_by_one = [predict_map(m, x).numpy() for m in _members(model_dir)]  # 3 x (T, H, W)
    assert not np.allclose(one_by_one[0], one_by_one[1], atol=1e-3)  # members differ: the mean matters
    got = predict_map(ensemble, x).numpy()
    assert got.shape == (2, H, W) and got.dtype == np.float32
    np.testing.assert_allclose(got, np.mean(one_by_one, axis=0), rtol=1e-6, atol=1e-6)


class _WindowReader:
    """Reads ``(:, y0:y1, x0:x1)`` windows of an array and counts the pixels it hands out."""

    def __init__(self, data: np.ndarray) -> None:
        self.data, self.shape, self.pixels_read = data, data.shape, 0

    def __getitem__(self, key):
        block = self.data[key]
        self.pixels_read += block.shape[-2] * block.shape[-1]
        return block


def test_large_scans_are_scored_in_exact_tiles_from_windows(model_dir, monkeypatch):
    ensemble, _ = load_ensemble(model_dir)
    x = _scan()
    whole = predict_map(ensemble, x).numpy()
    reader = _WindowReader(x)
    assert np.array_equal(predict_map(ensemble, reader).numpy(), whole)  # small: read once, whole
    monkeypatch.setattr(ensemble_module, "TILE_ABOVE_PIXELS", 100)
    monkeypatch.setattr(ensemble_module, "TILE_CORE", 16)
    tiled_reader = _WindowReader(x)
    tiled = predict_map(ensemble, tiled_reader).numpy()
    assert tiled_reader.pixels_read > H * W  # windows with halos, not one read of the whole scan
    np.testing.assert_allclose(tiled, whole, rtol=1e-5, atol=1e-5)


def test_member_maps_give_the_ensemble_bit_for_bit_and_the_maps_before_upsampling(model_dir):
    import torch.nn.functional as F

    ensemble, _ = load_ensemble(model_dir)
    x = _scan()
    maps = member_maps(ensemble, x)
    assert maps.step == output_step(ensemble) == 2
    assert maps.full.shape == (3, 2, H, W)
    assert maps.native.shape == (3, 2, (H + 1) // 2, (W + 1) // 2)
    full, native = maps.ensemble()
    assert np.array_equal(full, predict_map(ensemble, x).numpy())  # what is evaluated is the ensemble
    for m, net in enumerate(_members(model_dir)):
        assert np.array_equal(maps.full[m], predict_map(net, x).numpy())
        # The native map is what the member made: its x2 bilinear up-sampling is the member's map.
        up = F.interpolate(torch.from_numpy(maps.native[m])[None], scale_factor=2, mode="bilinear")[0]
        np.testing.assert_allclose(up[:, :H, :W].numpy()[:, :-1, :-1], maps.full[m][:, :-1, :-1], atol=1e-5)
    np.testing.assert_allclose(native, maps.native.mean(axis=0), rtol=1e-5, atol=1e-6)


def test_member_maps_without_a_front_end_are_native_already(tmp_path):
    config = UNetConfig(in_channels=9, out_channels=1, depth=3, features=4)
    torch.manual_seed(0)
    ensemble = MapEnsemble([UNet(config).eval()])
    maps = member_maps(ensemble, _scan())
    assert maps.step == 1 and np.array_equal(maps.native, maps.full)


def test_a_bound_clamps_the_ensemble_mean_not_its_members_and_tiles_stay_exact(model_dir, monkeypatch):
    free, _ = load_ensemble(model_dir)
    x = _scan()
    raw = predict_map(free, x).numpy()
    lo, hi = (float(q) for q in np.quantile(raw, [0.25, 0.75]))  # a bound that half the pixels cross
    bounded, _ = load_ensemble(model_dir, (lo, hi))
    assert bounded.bound == (lo, hi) and free.bound is None
    got = predict_map(bounded, x).numpy()
    assert np.array_equal(got, np.clip(raw, lo, hi)) and (raw < lo).any() and (raw > hi).any()
    maps = member_maps(bounded, x)
    full, native = maps.ensemble()
    assert np.array_equal(full, got) and native.min() >= lo and native.max() <= hi
    assert np.array_equal(maps.ensemble(bounded=False)[0], raw)  # what the clamp changed stays visible
    assert maps.full.min() < lo and maps.full.max() > hi  # the members' own maps are not clamped
    # Its geometry is its members' (measured on a member: the clamp would hide the probe's reach).
    assert model_geometry(bounded, cache=False) == model_geometry(bounded.members[0], cache=False)
    monkeypatch.setattr(ensemble_module, "TILE_ABOVE_PIXELS", 100)
    monkeypatch.setattr(ensemble_module, "TILE_CORE", 16)
    np.testing.assert_allclose(predict_map(bounded, _WindowReader(x)).numpy(), got, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bound", [(5.0, 5.0), (100.0, 0.0)])
def test_a_bound_must_have_low_below_high(bound):
    with pytest.raises(ValueError, match="low < high"):
        check_bound(bound)
