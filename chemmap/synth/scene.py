"""What lies on the belt: a pork-belly-like slab and its constituent maps.

A scan sees an irregular slab on a dark belt. Inside it, adipose tissue and lean form
wavy layers (a belly's alternating fat and muscle) with marbling; the adipose share of
each pixel is a soft threshold of smooth random fields, set so that the scan's mean fat
hits the sample's target. Everything here is 2-D ``(lines, samples)`` and cheap next to
the cube, so it is made whole per scan (a paper-size scan, 2400 x 1300 px, is 12 MB a map).
"""

from __future__ import annotations

from dataclasses import dataclass
from math import gamma

import numpy as np

from chemmap.synth import physics as ph


def smooth_field(rng: np.random.Generator, shape: tuple[int, int], cell: float) -> np.ndarray:
    """A zero-mean, unit-variance smooth random field of correlation length ~``cell`` px.

    White noise on a coarse grid (one node per ``cell`` px) is Gaussian-smoothed and
    interpolated up with cubic splines, so the cost does not grow with the correlation length.

    Returns:
        float32 ``shape``.
    """
    from scipy import ndimage  # slow to import: only where it is used

    h, w = shape
    cell = max(float(cell), 1.0)
    gh, gw = int(np.ceil(h / cell)) + 4, int(np.ceil(w / cell)) + 4
    coarse = ndimage.gaussian_filter(rng.standard_normal((gh, gw)), 0.8, mode="wrap")
    zoomed = ndimage.zoom(coarse, cell, order=3, mode="nearest", grid_mode=False)
    f = zoomed[2 * int(cell) : 2 * int(cell) + h, 2 * int(cell) : 2 * int(cell) + w]
    if f.shape != (h, w):  # cell < 1 px rounding at tiny sizes
        f = np.resize(zoomed, (h, w))
    f = f - f.mean()
    sd = f.std()
    return (f / (sd if sd > 0 else 1.0)).astype(np.float32)


@dataclass
class Scene:
    """One scan's geometry and composition.

    Attributes:
        coverage: float32 ``(lines, samples)``, share of each pixel covered by meat (0-1);
            edge pixels mix meat and belt.
        mask: bool ``(lines, samples)``, ``coverage >= 0.5``: the sample's pixels.
        adipose: float32 ``(lines, samples)``, adipose-tissue share of the meat in a pixel (0-1).
        fat, protein, water: float32 ``(lines, samples)``, % by mass (defined everywhere; the
            truth files set them to NaN outside ``mask``).
        edge: float32 ``(lines, samples)``, 0 deep inside the slab rising to 1 at its rim
            (thinner slab: shorter optical path).
        glare: float32 ``(lines, samples)``, additive specular reflectance (0 almost everywhere).
    """

    coverage: np.ndarray
    mask: np.ndarray
    adipose: np.ndarray
    fat: np.ndarray
    protein: np.ndarray
    water: np.ndarray
    edge: np.ndarray
    glare: np.ndarray


def _slab(rng: np.random.Generator, lines: int, samples: int) -> tuple[np.ndarray, np.ndarray]:
    """Coverage (0-1) and depth-from-rim (px) of an irregular rounded slab."""
    area = rng.uniform(*ph.SAMPLE_AREA_RANGE)
    aspect = rng.uniform(0.75, 1.3)  # (half-length along lines) / (half-width across) relative to image
    # A superellipse |u|^p + |v|^p = 1 of exponent p covers 4 Γ(1+1/p)^2 / Γ(1+2/p) of its box.
    p = rng.uniform(2.5, 4.0)
    box_share = gamma(1 + 1 / p) ** 2 / gamma(1 + 2 / p)  # share of its bounding box
    # semi-axes (px) so that area share ~ target: (2a)(2b) box_share = area * lines * samples
    ab = area * lines * samples / (4 * box_share)
    a = np.sqrt(ab * aspect * lines / samples)
    b = ab / a
    a, b = min(a, 0.47 * lines), min(b, 0.47 * samples)
    cy = lines / 2 + rng.uniform(-0.04, 0.04) * lines
    cx = samples / 2 + rng.uniform(-0.04, 0.04) * samples
    theta = rng.uniform(-0.15, 0.15)
    y, x = np.mgrid[0:lines, 0:samples].astype(np.float64)
    y, x = y + 0.5 - cy, x + 0.5 - cx
    u = (np.cos(theta) * y + np.sin(theta) * x) / a
    v = (-np.sin(theta) * y + np.cos(theta) * x) / b
    rho = (np.abs(u) ** p + np.abs(v) ** p) ** (1 / p)
    # Irregular outline: the radius wobbles with a few low angular harmonics.
    ang = np.arctan2(v, u)
    wobble = np.zeros_like(ang)
    for k in range(2, 7):
        wobble += rng.normal(0, 0.035 / k**0.5) * np.cos(k * ang + rng.uniform(0, 2 * np.pi))
    rho = rho / (1.0 + wobble)
    # Signed distance to the rim in px (first order): positive inside.
    depth = (1.0 - rho) * min(a, b)
    coverage = np.clip(depth + 0.5, 0.0, 1.0)
    return coverage.astype(np.float32), depth.astype(np.float32)


def _adipose(
    rng: np.random.Generator, lines: int, samples: int, mask: np.ndarray, target: float
) -> np.ndarray:
    """Adipose share (0-1) per pixel: wavy layers plus marbling, mean over ``mask`` = ``target``."""
    size = min(lines, samples)
    # Layers: 2-4 fat/lean bands across the slab, direction near the belt's cross axis.
    n_layers = rng.uniform(1.5, 3.5)
    ang = rng.uniform(-0.4, 0.4) + (np.pi / 2 if rng.random() < 0.5 else 0.0)
    y, x = np.mgrid[0:lines, 0:samples].astype(np.float32)
    t = (np.cos(ang) * y / lines + np.sin(ang) * x / samples).astype(np.float32)
    warp = smooth_field(rng, (lines, samples), size / 3.0)
    layers = np.sin(2 * np.pi * n_layers * t + 0.9 * warp + rng.uniform(0, 2 * np.pi))
    marbling = smooth_field(rng, (lines, samples), size / 14.0)
    blotch = smooth_field(rng, (lines, samples), size / 6.0)
    z = (0.9 * layers + 0.45 * blotch + 0.35 * marbling).astype(np.float32)
    inside = z[mask] if mask.any() else z.ravel()
    # Soft threshold: the transition is ~1-2 px wide (tissue boundaries are sharp at mm scale).
    tau = 0.04 * float(np.std(inside) or 1.0)
    lo, hi = float(inside.min()) - 10 * tau, float(inside.max()) + 10 * tau
    for _ in range(40):  # bisection on the threshold for the target mean
        mid = 0.5 * (lo + hi)
        share = float(np.mean(_sigmoid((inside - mid) / tau)))
        if share > target:
            lo = mid
        else:
            hi = mid
    return _sigmoid((z - 0.5 * (lo + hi)) / tau).astype(np.float32)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def make_scene(
    rng: np.random.Generator, lines: int, samples: int, target_fat_pct: float, water_share: float
) -> Scene:
    """Draw one scan's slab and composition.

    Args:
        rng: the scan's generator (consumed deterministically).
        lines, samples: image size (px).
        target_fat_pct: mean fat (%) the scan's masked pixels should have.
        water_share: water / (water + protein) of the fat-free, ash-free mass.

    Returns:
        The :class:`Scene`.
    """
    coverage, depth = _slab(rng, lines, samples)
    mask = coverage >= 0.5
    target = (target_fat_pct - ph.LEAN_FAT_PCT) / (ph.ADIPOSE_FAT_PCT - ph.LEAN_FAT_PCT)
    adipose = _adipose(rng, lines, samples, mask, float(np.clip(target, 0.01, 0.99)))
    fat = ph.LEAN_FAT_PCT + (ph.ADIPOSE_FAT_PCT - ph.LEAN_FAT_PCT) * adipose
    rest = 100.0 - ph.ASH_PCT - fat
    water = water_share * rest
    protein = rest - water
    # Rim: the slab thins over the outer ~6 % of its size.
    rim = max(2.0, 0.06 * min(lines, samples))
    edge = np.clip(1.0 - depth / rim, 0.0, 1.0)
    # Specular glare: small clusters on adipose pixels (wet fat surface facing the lights).
    glare = np.zeros((lines, samples), np.float32)
    fat_px = np.flatnonzero((adipose > 0.7) & mask)
    n_glare = rng.binomial(fat_px.size, ph.GLARE_PIXEL_SHARE) if fat_px.size else 0
    if n_glare:
        from scipy import ndimage

        seeds = rng.choice(fat_px, size=n_glare, replace=False)
        glare.flat[seeds] = rng.uniform(*ph.GLARE_STRENGTH, size=n_glare)
        grown = ndimage.grey_dilation(glare, size=(2, 2))
        glare = np.where(mask, np.maximum(glare, 0.5 * grown), 0.0).astype(np.float32)
    return Scene(
        coverage=coverage,
        mask=mask,
        adipose=adipose,
        fat=fat.astype(np.float32),
        protein=protein.astype(np.float32),
        water=water.astype(np.float32),
        edge=edge.astype(np.float32),
        glare=glare,
    )
