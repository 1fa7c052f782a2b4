"""chemmap.evaluate.blindspot: the blind pixels never see themselves, and the learned
denoiser brings a noisy map closer to its clean version without ever seeing the clean one."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from chemmap.evaluate.blindspot import (
    REACH,
    BlindSpotConfig,
    _crop,
    cached_map_denoiser,
    denoiser_key,
    train_map_denoiser,
)


def test_a_blind_pixel_gets_a_neighbours_value_never_its_own() -> None:
    rng = np.random.default_rng(0)
    x = np.arange(40 * 30, dtype=np.float32).reshape(40, 30)  # every value unique
    mask = np.zeros((40, 30), bool)
    mask[5:35, 3:27] = True
    cfg = BlindSpotConfig(crop=64, share=0.2)
    seen, own, (py, px) = _crop(x, mask, cfg, rng)
    assert np.array_equal(own, x) and py.size == int(0.2 * mask.sum())
    assert mask[py, px].all()
    changed = seen != own
    assert changed[py, px].all() and changed.sum() == py.size  # only the blind pixels changed
    for y, xx in zip(py, px, strict=True):
        qy, qx = np.argwhere(x == seen[y, xx])[0]
        assert (qy, qx) != (y, xx) and abs(qy - y) <= REACH and abs(qx - xx) <= REACH


def test_the_denoiser_learns_from_noisy_maps_alone() -> None:
    """Piecewise-smooth maps (layers of fat) with independent pixel noise: trained on the noisy
    maps only, the net's maps are much closer to the clean ones than the noisy maps are."""
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:48, 0:48]
    clean, noisy, masks = [], [], []
    for _ in range(12):
        layers = 20 + 50 * (np.sin(yy / rng.uniform(4, 9) + rng.uniform(0, 6)) > 0) + 0.3 * xx
        mask = (yy - 24) ** 2 / 20**2 + (xx - 24) ** 2 / 18**2 < 1
        clean.append(layers)
        noisy.append(layers + rng.normal(0, 12, layers.shape))
        masks.append(mask)
    cfg = BlindSpotConfig(steps=250, batch=4, crop=32, share=0.05, features=16, dilations=(1, 2, 4, 2, 1))
    net = train_map_denoiser(list(zip(noisy, masks, strict=True)), cfg)
    before = np.sqrt(np.mean([((n - c)[m] ** 2).mean() for n, c, m in zip(noisy, clean, masks, strict=True)]))
    after = np.sqrt(
        np.mean([((net.apply(n) - c)[m] ** 2).mean() for n, c, m in zip(noisy, clean, masks, strict=True)])
    )
    assert after < 0.7 * before, (before, after)


def test_bad_input_is_one_clear_error() -> None:
    with pytest.raises(ValueError, match="no map with a mask pixel"):
        train_map_denoiser([(np.ones((8, 8)), np.zeros((8, 8), bool))], BlindSpotConfig(steps=1))
    with pytest.raises(ValueError, match="share"):
        BlindSpotConfig(share=0.0)
    net = train_map_denoiser([(np.ones((8, 8)), np.ones((8, 8), bool))], BlindSpotConfig(steps=1, crop=8))
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        net.apply(np.ones((2, 8, 8)))


def _noisy_maps(seed: int, n: int = 3) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    mask = np.zeros((20, 24), bool)
    mask[2:18, 3:21] = True
    return [((40 + rng.normal(0, 10, mask.shape)).astype(np.float32), mask) for _ in range(n)]


def test_a_cached_denoiser_is_found_again_only_for_the_same_maps_and_settings(tmp_path, monkeypatch) -> None:
    import chemmap.evaluate.blindspot as blindspot

    maps, cfg = _noisy_maps(0), BlindSpotConfig(steps=5, batch=2, crop=16, features=4, dilations=(1, 2))
    first = cached_map_denoiser(maps, cfg, tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [f"{denoiser_key(maps, cfg)}.pt"]
    trained = []
    real = blindspot.train_map_denoiser
    monkeypatch.setattr(blindspot, "train_map_denoiser", lambda m, c: trained.append(c) or real(m, c))
    again = cached_map_denoiser(maps, cfg, tmp_path)
    assert trained == [] and np.array_equal(again.apply(maps[0][0]), first.apply(maps[0][0]))
    cached_map_denoiser(_noisy_maps(1), cfg, tmp_path)  # other maps
    cached_map_denoiser(maps, replace(cfg, seed=1), tmp_path)  # another setting
    assert len(trained) == 2 and len(list(tmp_path.glob("*.pt"))) == 3
    (tmp_path / f"{denoiser_key(maps, cfg)}.pt").write_bytes(b"not a state dict")  # damaged: made again
    cached_map_denoiser(maps, cfg, tmp_path)
    assert len(trained) == 3 and not list(tmp_path.glob("*.tmp*"))
