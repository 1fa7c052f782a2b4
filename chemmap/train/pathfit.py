"""The per-pixel spectral path fitted on its own, from one lab value per sample (issue 15).

``train.spectral_init: pixel`` fits the U-Net's spectral path (:func:`chemmap.models.unet.spectral_path`:
a 1x1 linear map or, with ``model.spectral_hidden``, a per-pixel MLP) before the fold's
training, on the fold's training samples only. Per step, for a batch of samples:

    (y - mean of the path over the sample's drawn pixels)^2
        + smooth * mean over drawn neighbour pairs of huber(path(p) - path(q))

The first term is the paper's mean constraint. The second is its smoothness, but on a model
that sees one pixel's spectrum at a time: it cannot blur an edge, so the only way to pay
less for it is to read the spectrum past what changes from pixel to pixel on the same tissue
(shading, scatter, path length, camera noise), which no linear map of a reflectance
spectrum can do. ``huber`` is torch's (``0.5 d^2`` up to ``delta``, linear beyond); a step's
mean term is the average over its samples, its smoothness the average over all their pairs.

The pixels and pairs are drawn once per scan, ``pixels`` of each, from a generator seeded by
the fold, so every DDP rank fits the same path, and a paper-size scan costs no more than a
small one. docs/loss.md ("Seventh step") has what it is worth.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from chemmap.config import PathFitSection
from chemmap.preprocess.store import Dataset


@dataclass(frozen=True)
class PixelDraws:
    """One sample's drawn inputs, in the model's input units: ``(n, C)`` float32 each."""

    pixels: torch.Tensor  # for the mean term
    first: torch.Tensor  # pairs of 4-neighbours inside the mask: first and second pixel
    second: torch.Tensor
    target: torch.Tensor  # (T,) lab values


def _neighbour_pairs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flat indices ``(a, b)`` of every pair of horizontal or vertical neighbours both in ``mask``."""
    h, w = mask.shape
    index = np.arange(h * w).reshape(h, w)
    across = mask[:, 1:] & mask[:, :-1]
    down = mask[1:, :] & mask[:-1, :]
    a = np.concatenate([index[:, :-1][across], index[:-1, :][down]])
    b = np.concatenate([index[:, 1:][across], index[1:, :][down]])
    return a, b


def draw_pixels(data: Dataset, sample_ids: list[str], n: int, seed: int) -> list[PixelDraws]:
    """``n`` mask pixels and ``n`` neighbour pairs per scan of each sample (fewer if the mask has fewer)."""
    rng = np.random.default_rng(seed)
    draws = []
    for sid in sample_ids:
        target = np.asarray(data.samples[sid].targets, np.float32)
        if not np.isfinite(target).all():
            raise ValueError(f"train.spectral_init: pixel needs every sample's lab value (NaN: {sid})")
        parts: list[list[np.ndarray]] = [[], [], []]
        for scan in data.samples[sid].scans:
            mask = data.mask(scan)
            x = data.model_input(data.cube(scan)[...]).reshape(data.n_channels, -1)  # (C, H*W)
            inside = np.flatnonzero(mask)
            a, b = _neighbour_pairs(mask)
            if inside.size:
                parts[0].append(x[:, rng.choice(inside, min(n, inside.size), replace=False)].T)
            if a.size:
                pick = rng.choice(a.size, min(n, a.size), replace=False)
                parts[1].append(x[:, a[pick]].T)
                parts[2].append(x[:, b[pick]].T)
        if not parts[0]:
            raise ValueError(f"train.spectral_init: pixel: sample {sid} has no mask pixels")
        empty = [np.zeros((0, data.n_channels), np.float32)]
        tensors = [torch.from_numpy(np.concatenate(p or empty).astype(np.float32)) for p in parts]
        draws.append(PixelDraws(*tensors, target=torch.from_numpy(target)))
    return draws


def rows(layers: list[torch.nn.Module], x: torch.Tensor) -> torch.Tensor:
    """The path's layers (1x1 convolutions and activations) on ``(n, C)`` rows of spectra.

    The same map as the convolutions on ``(n, C, 1, 1)``, as matrix products: a convolution
    over a batch of 1x1 images took about twice as long per step on the 2-core machine.
    """
    for layer in layers:
        if isinstance(layer, torch.nn.Conv2d):
            x = F.linear(x, layer.weight.flatten(1), layer.bias)
        else:
            x = layer(x)
    return x


def fit_path(
    path: torch.nn.Module, draws: list[PixelDraws], cfg: PathFitSection, seed: int
) -> dict[str, float]:
    """Fit ``path`` (a module on ``(N, C, 1, 1)`` inputs) in place; returns the last step's terms.

    The fit draws the path afresh (PyTorch's default initialisation, from ``seed``), with
    the output layer's bias at the samples' mean lab value, so the first steps fit the
    contrast, not the offset.
    """
    gen = torch.Generator().manual_seed(seed)
    dtype = next(path.parameters()).dtype
    layers = list(path) if isinstance(path, torch.nn.Sequential) else [path]
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        for layer in layers:  # PyTorch's default draw (docs/loss.md: a kaiming-normal one fitted worse)
            if isinstance(layer, torch.nn.Conv2d):
                layer.reset_parameters()
        layers[-1].bias.copy_(torch.stack([d.target for d in draws]).mean(0).to(dtype))
    opt = torch.optim.AdamW(path.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.steps)

    def run(x: torch.Tensor) -> torch.Tensor:  # (n, C) -> (n, T)
        return rows(layers, x.to(dtype))

    terms = {"mean": 0.0, "smooth": 0.0}
    for _ in range(cfg.steps):
        batch = [draws[i] for i in torch.randperm(len(draws), generator=gen)[: cfg.batch].tolist()]
        sizes = [len(d.pixels) for d in batch]
        out = run(torch.cat([d.pixels for d in batch] + [d.first for d in batch] + [d.second for d in batch]))
        means = torch.stack([part.mean(0) for part in out[: sum(sizes)].split(sizes)])  # (B, T)
        targets = torch.stack([d.target for d in batch]).to(dtype)
        mean_term = ((means - targets) ** 2).sum(1).mean()
        first, second = out[sum(sizes) :].chunk(2)
        diff = first - second
        zero = torch.zeros_like(diff)
        smooth_term = F.huber_loss(diff, zero, delta=cfg.delta) if len(diff) else 0 * mean_term
        loss = mean_term + cfg.smooth * smooth_term
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        terms = {"mean": mean_term.item(), "smooth": float(smooth_term.detach())}
    return terms
