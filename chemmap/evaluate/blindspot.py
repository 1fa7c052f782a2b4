"""A blind-spot (Noise2Void) denoiser of per-pixel maps, learned from the maps alone.

A per-pixel spectral map ``S`` (a PLS or ridge model applied pixel by pixel) carries the
camera's noise, independent from pixel to pixel. A network that predicts ``S(p)`` from the
map around ``p`` while the loss only uses pixels whose own value it was not shown (their
input replaced by a neighbour's, Krull et al. 2019) learns ``E[S(p) | neighbours]``, which is
``E[truth(p) | neighbours]`` where the noise is independent and zero-mean. It needs no lab
value and no true map: a label-free map, like a median of ``S``, but a filter fitted to the
data's own structure.

The network reads the map clipped to 0-100 % (the background's spectra give values far
outside), centred and scaled; it never reads the mask, so it sees what a head inside a
model would (``model.denoiser_input: path``). The loss uses mask pixels only.

    net = train_map_denoiser([(s, mask), ...], BlindSpotConfig(steps=1500))
    clean = net.apply(s)   # (H, W) float32

:func:`cached_map_denoiser` finds a denoiser again that the same maps and settings trained
before (a content-addressed cache of state dicts): evaluations of different trainings on one
dataset train the same ``pls_n2v`` denoisers, a few minutes each.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from chemmap.files import atomic_path

CENTRE, SCALE = 50.0, 25.0  # percent: the clipped map enters as (S - 50) / 25
REACH = 2  # the replacing neighbour is within this many pixels on each axis, never the pixel
# In the cache key: a change of how a denoiser trains (not of its settings) must make it anew.
TRAINING_VERSION = 1


@dataclass(frozen=True)
class BlindSpotConfig:
    """Training of :func:`train_map_denoiser` (the defaults: ``bench/blindspot.py``'s run)."""

    steps: int = 1500
    batch: int = 8  # crops per step
    crop: int = 64  # px; a crop is the whole map where the map is smaller
    share: float = 0.02  # of a crop's mask pixels, whose input is replaced and which the loss uses
    features: int = 32
    dilations: tuple[int, ...] = (1, 2, 4, 8, 4, 2, 1)  # 3x3 convolutions, ReLU between
    lr: float = 2e-3  # Adam, annealed to 0 (cosine) over the steps
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch < 1 or self.crop < 3 or not 0 < self.share <= 0.5:
            raise ValueError(
                f"blind spot: steps, batch >= 1, crop >= 3 and 0 < share <= 0.5, got steps={self.steps}, "
                f"batch={self.batch}, crop={self.crop}, share={self.share}"
            )


class MapDenoiser:
    """Trained blind-spot networks; :meth:`apply` maps a whole ``(H, W)`` map with each and
    averages them (one network, or a fold ensemble like the U-Net's)."""

    def __init__(self, *nets: nn.Module) -> None:
        if not nets:
            raise ValueError("blind spot: a denoiser needs at least one network")
        self.nets = [net.eval() for net in nets]

    @classmethod
    def ensemble(cls, members: Sequence[MapDenoiser]) -> MapDenoiser:
        """One denoiser averaging every member's networks."""
        return cls(*(net for m in members for net in m.nets))

    def apply(self, s: np.ndarray) -> np.ndarray:
        """The denoised map ``(H, W)`` float32, in percent (not clipped)."""
        if s.ndim != 2:
            raise ValueError(f"blind spot: a map is (H, W), got shape {s.shape}")
        with torch.no_grad():
            x = torch.from_numpy(_inputs(s))[None, None]  # (1, 1, H, W)
            out = torch.stack([net(x)[0, 0] for net in self.nets]).mean(0)
            return (out.numpy() * SCALE + CENTRE).astype(np.float32)


def make_net(features: int, dilations: Sequence[int]) -> nn.Sequential:
    """Dilated 3x3 convolutions over the one-channel map (the border replicated, so any map
    size), then a 1x1 convolution to the map."""
    layers: list[nn.Module] = []
    channels = 1
    for d in dilations:
        conv = nn.Conv2d(channels, features, 3, padding=d, dilation=d, padding_mode="replicate")
        layers += [conv, nn.ReLU()]
        channels = features
    layers.append(nn.Conv2d(channels, 1, 1))
    return nn.Sequential(*layers)


def _inputs(s: np.ndarray) -> np.ndarray:
    return ((np.clip(np.nan_to_num(s, nan=CENTRE), 0.0, 100.0) - CENTRE) / SCALE).astype(np.float32)


def _crop(
    x: np.ndarray, mask: np.ndarray, cfg: BlindSpotConfig, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """One random crop with its blind pixels: ``(input with them replaced, rows, cols)``, or
    None where the crop holds no mask pixel. The loss's targets are the crop's own values."""
    h, w = x.shape
    c = cfg.crop
    y0, x0 = rng.integers(0, max(h - c, 0) + 1), rng.integers(0, max(w - c, 0) + 1)
    crop, m = x[y0 : y0 + c, x0 : x0 + c].copy(), mask[y0 : y0 + c, x0 : x0 + c]
    ys, xs = np.nonzero(m)
    if ys.size == 0:
        return None
    pick = rng.choice(ys.size, size=max(1, int(cfg.share * ys.size)), replace=False)
    py, px = ys[pick], xs[pick]
    dy, dx = rng.integers(-REACH, REACH + 1, size=(2, py.size))
    dx[(dy == 0) & (dx == 0)] = 1  # never the pixel itself
    qy, qx = py + dy, px + dx
    qy = np.where((qy < 0) | (qy >= crop.shape[0]), py - dy, qy)  # reflected inward, axis by axis:
    qx = np.where((qx < 0) | (qx >= crop.shape[1]), px - dx, qx)  # still not the pixel itself
    seen = crop.copy()
    seen[py, px] = crop[qy, qx]
    return seen, crop, np.stack([py, px])


def train_map_denoiser(
    maps: Sequence[tuple[np.ndarray, np.ndarray]],
    cfg: BlindSpotConfig = BlindSpotConfig(),
    progress: Callable[[int, float], None] | None = None,
) -> MapDenoiser:
    """Noise2Void on random crops of ``maps`` (``(map, mask)`` pairs, ``(H, W)`` each).

    Args:
        progress: called with ``(step, loss)`` every tenth of the steps.

    Raises:
        ValueError: if no map has a mask pixel.
    """
    xs = [(_inputs(s), np.asarray(m, bool)) for s, m in maps if np.asarray(m).any()]
    if not xs:
        raise ValueError("blind spot: no map with a mask pixel to train on")
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    net = make_net(cfg.features, cfg.dilations)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.steps)
    for step in range(cfg.steps):
        crops = [_crop(*xs[rng.integers(len(xs))], cfg, rng) for _ in range(cfg.batch)]
        crops = [c for c in crops if c is not None]
        if not crops:
            continue
        size = max(c[0].shape[0] for c in crops), max(c[0].shape[1] for c in crops)
        batch = torch.stack([torch.from_numpy(_pad_to(c[0], size)) for c in crops])[:, None]  # (B, 1, h, w)
        out = net(batch)[:, 0]
        pred = torch.cat([out[i, c[2][0], c[2][1]] for i, c in enumerate(crops)])
        target = torch.from_numpy(np.concatenate([c[1][c[2][0], c[2][1]] for c in crops]))
        loss = ((pred - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if progress is not None and step % max(1, cfg.steps // 10) == 0:
            progress(step, float(loss))
    return MapDenoiser(net)


def denoiser_key(maps: Sequence[tuple[np.ndarray, np.ndarray]], cfg: BlindSpotConfig) -> str:
    """SHA-256 of the settings, :data:`TRAINING_VERSION` and every map and mask, in order."""
    h = hashlib.sha256(json.dumps([TRAINING_VERSION, asdict(cfg)], sort_keys=True).encode())
    for s, m in maps:
        for a in (np.ascontiguousarray(s, np.float32), np.ascontiguousarray(m, bool)):
            h.update(repr(a.shape).encode())
            h.update(a.tobytes())
    return h.hexdigest()


def cached_map_denoiser(
    maps: Sequence[tuple[np.ndarray, np.ndarray]], cfg: BlindSpotConfig, cache: str | Path | None
) -> MapDenoiser:
    """:func:`train_map_denoiser`, or the denoiser the same maps and settings trained before.

    ``cache/<key>.pt`` (:func:`denoiser_key`) holds the network's state dict, written
    atomically and read with ``weights_only=True``; a file that does not load as one is
    trained again and replaced. No cache: trained every time.
    """
    if cache is None:
        return train_map_denoiser(maps, cfg)
    path = Path(cache) / f"{denoiser_key(maps, cfg)}.pt"
    if path.is_file():
        net = make_net(cfg.features, cfg.dilations)
        try:
            net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            return MapDenoiser(net)
        except Exception:  # a damaged cache entry is only trained again
            pass
    found = train_map_denoiser(maps, cfg)
    with atomic_path(path) as tmp:
        torch.save(found.nets[0].state_dict(), tmp)
    return found


def _pad_to(a: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Crops of maps smaller than ``crop`` differ in size: edge-padded up to the batch's."""
    ph, pw = size[0] - a.shape[0], size[1] - a.shape[1]
    return np.pad(a, ((0, ph), (0, pw)), mode="edge") if ph or pw else a
