"""The per-pixel path fitted alone (``train.spectral_init: pixel``, :mod:`chemmap.train.pathfit`)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from chemmap.config import PathFitSection
from chemmap.models.unet import UNet, UNetConfig, spectral_path
from chemmap.train.pathfit import PixelDraws, _neighbour_pairs, fit_path, rows


def test_neighbour_pairs_are_the_4_neighbours_inside_the_mask():
    mask = np.array([[1, 1, 0], [1, 0, 1], [1, 1, 1]], bool)
    a, b = _neighbour_pairs(mask)
    got = {tuple(sorted(p)) for p in zip(a.tolist(), b.tolist(), strict=True)}
    # flat indices: 0 1 2 / 3 4 5 / 6 7 8
    assert got == {(0, 1), (6, 7), (7, 8), (0, 3), (3, 6), (5, 8)}


@pytest.mark.parametrize("hidden", [0, 8])
def test_the_fit_runs_the_path_as_the_model_does(hidden):
    path = spectral_path(5, 2, hidden)
    for p in path.parameters():
        torch.nn.init.normal_(p)
    x = torch.randn(30, 5)
    layers = list(path) if hidden else [path]
    want = path(x[:, :, None, None])[:, :, 0, 0]
    torch.testing.assert_close(rows(layers, x), want, rtol=1e-5, atol=1e-5)


def _shaded_samples(n_samples: int, seed: int) -> tuple[list[PixelDraws], np.ndarray, np.ndarray]:
    """Samples of lean (2 %) and fat (80 %) pixels in varying shares; channel 0 reads
    ``fat / 40`` plus a per-pixel shading ``g`` that channel 1 measures on its own. The
    shading is zero-mean, so the sample means say nothing of channel 1's weight: only the
    smoothness between neighbours of one tissue (equal fat, independent shading) does.
    Returns the draws and held-out pixels ``(x (n, 2), fat (n,))``."""
    rng = np.random.default_rng(seed)

    def pixels(fat: np.ndarray) -> np.ndarray:
        g = rng.normal(0, 0.5, fat.size)
        g -= g.mean()  # exactly zero-mean: the means carry nothing of channel 1
        return np.stack([fat / 40 + g, g], 1).astype(np.float32)

    draws = []
    for share in rng.uniform(0.1, 0.9, n_samples):
        fat = np.where(rng.random(400) < share, 80.0, 2.0)
        pair_fat = np.where(rng.random(400) < share, 80.0, 2.0)  # both pixels of a pair: one tissue
        x, first, second = (torch.from_numpy(pixels(f)) for f in (fat, pair_fat, pair_fat))
        target = torch.tensor([fat.mean()], dtype=torch.float32)
        draws.append(PixelDraws(pixels=x, first=first, second=second, target=target))
    fat = np.where(rng.random(2000) < 0.5, 80.0, 2.0)
    return draws, pixels(fat), fat


@pytest.mark.parametrize(("hidden", "lr"), [(0, 1.0), (16, 3e-2)])
def test_the_smoothness_makes_the_path_read_past_the_shading(hidden, lr):
    draws, x, fat = _shaded_samples(40, seed=0)
    errors = {}
    for smooth in (0.0, 1.0):
        torch.manual_seed(0)
        path = spectral_path(2, 1, hidden)
        cfg = PathFitSection(steps=400, batch=8, lr=lr, smooth=smooth, weight_decay=0.0)
        terms = fit_path(path, draws, cfg, seed=1)
        assert set(terms) == {"mean", "smooth"}
        with torch.no_grad():
            pred = path(torch.from_numpy(x)[:, :, None, None])[:, 0, 0, 0].numpy()
        errors[smooth] = float(np.sqrt(np.mean((pred - fat) ** 2)))
    # Without it the shading passes into the map (up to 40 x 0.5 = 20 % per pixel: what the
    # random start happens to cancel stays cancelled); with it the path subtracts channel 1.
    assert errors[1.0] < 1.0 and errors[0.0] > 3.0, errors


def test_an_mlp_path_starts_at_zero_and_only_a_linear_path_takes_a_linear_start():
    config = UNetConfig(in_channels=8, out_channels=1, depth=2, features=4, spectral_path=True)
    net = UNet(replace(config, spectral_hidden=8))
    assert isinstance(net.spectral, torch.nn.Sequential)
    with torch.no_grad():
        assert torch.count_nonzero(net.spectral(torch.randn(3, 8, 5, 5))) == 0
        assert net.spectral[0].weight.abs().sum() > 0  # its hidden layers are drawn
    with pytest.raises(ValueError, match="linear path"):
        net.start_from_spectral(torch.zeros(8, 1), torch.zeros(1))
    with pytest.raises(ValueError, match="spectral_hidden"):
        UNetConfig(in_channels=8, out_channels=1, spectral_hidden=8)
