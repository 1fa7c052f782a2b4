"""What lies on the belt: a pork-belly-like slab and its constituent maps.

A scan sees an irregular slab on a dark belt. Inside it, adipose tissue and lean form
wavy layers (a belly's alternating fat and muscle) with marbling; the adipose share of
each pixel is a soft threshold of smooth random fields, set so that the scan's mean fat
hits the sample's target. The belly's adipose lipid and lean intramuscular fat vary over it;
rind runs along one long side and connective-tissue membranes cross the lean. Everything
here is 2-D ``(lines, samples)`` and cheap next to
the cube, so it is made whole per scan (a paper-size scan, 2400 x 1300 px, is 12 MB a map).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from math import gamma
from typing import Any

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


@dataclass(frozen=True)
class Tissues:
    """A belly's own tissue compositions, drawn once per sample (shared by its scans).

    Attributes:
        adipose_fat: lipid in its adipose tissue, % (the mean of the within-belly field).
        lean_fat: intramuscular fat in its lean, %.
        water_share: water / (water + protein) of the fat-free, ash-free mass of meat.
    """

    adipose_fat: float
    lean_fat: float
    water_share: float


@dataclass
class Scene:
    """One scan's geometry and composition.

    The meat of a pixel is a mix, by mass share, of lean, adipose tissue, rind (skin) and
    connective-tissue membrane: ``lean + adipose + rind + membrane = 1``.

    Attributes:
        coverage: float32 ``(lines, samples)``, share of each pixel covered by meat (0-1);
            edge pixels mix meat and belt.
        mask: bool ``(lines, samples)``, ``coverage >= 0.5``: the sample's pixels.
        lean, adipose, rind, membrane: float32 ``(lines, samples)``, tissue shares (0-1).
        fat, protein, water: float32 ``(lines, samples)``, % by mass (defined everywhere; the
            truth files set them to NaN outside ``mask``).
        edge: float32 ``(lines, samples)``, 0 deep inside the slab rising to 1 at its rim
            (thinner slab: shorter optical path).
        glare: float32 ``(lines, samples)``, additive specular reflectance (0 almost everywhere).
        pitch_mm: the pixel pitch this scene stands for (the belly's width over its pixels).
    """

    coverage: np.ndarray
    mask: np.ndarray
    lean: np.ndarray
    adipose: np.ndarray
    rind: np.ndarray
    membrane: np.ndarray
    fat: np.ndarray
    protein: np.ndarray
    water: np.ndarray
    edge: np.ndarray
    glare: np.ndarray
    pitch_mm: float


@dataclass(frozen=True)
class _Slab:
    coverage: np.ndarray  # float32, 0-1
    depth: np.ndarray  # float32, px from the rim, positive inside
    across: np.ndarray  # float32, -1..1 along the slab's short axis (the sides of the belly)
    minor_px: float  # the slab's short axis, px


def _slab(rng: np.random.Generator, lines: int, samples: int) -> _Slab:
    """An irregular rounded slab: its coverage, depth from the rim and short-axis coordinate."""
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
    across = v if b <= a else u
    return _Slab(
        coverage=coverage.astype(np.float32),
        depth=depth.astype(np.float32),
        across=across.astype(np.float32),
        minor_px=float(2 * min(a, b)),
    )


def _layers(rng: np.random.Generator, lines: int, samples: int) -> np.ndarray:
    """The field whose soft threshold is the adipose share: wavy layers, blotches and marbling."""
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
    return (0.9 * layers + 0.45 * blotch + 0.35 * marbling).astype(np.float32)


def _rind(rng: np.random.Generator, slab: _Slab, pitch_mm: float) -> np.ndarray:
    """Rind share: a strip along the rim of one long side of the slab (the skin rolling up)."""
    width_px = rng.uniform(*ph.RIND_WIDTH_MM) / pitch_mm
    side = 1.0 if rng.random() < 0.5 else -1.0
    strip = np.clip(width_px + 0.5 - slab.depth, 0.0, 1.0)
    on_side = np.clip((side * slab.across - 0.55) / 0.15, 0.0, 1.0)
    return (strip * on_side).astype(np.float32)


def _membrane_lines(rng: np.random.Generator, lines: int, samples: int, pitch_mm: float) -> np.ndarray:
    """Share of each pixel covered by membranes seen edge-on: lines along a field's zero set.

    A membrane ``W`` px wide covers ``min(1, W)`` of the pixels it crosses (a partial share where
    it is thinner than a pixel), tapering off over half a pixel on either side.
    """
    size = min(lines, samples)
    f = smooth_field(rng, (lines, samples), size / 7.0)
    gy, gx = np.gradient(f)
    dist = np.abs(f) / (np.hypot(gy, gx) + 1e-6)  # px to the zero line (first order)
    width_px = rng.uniform(*ph.MEMBRANE_WIDTH_MM) / pitch_mm
    return np.clip((width_px + 1.0) / 2.0 - dist, 0.0, min(1.0, width_px)).astype(np.float32)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _varying(
    rng: np.random.Generator, shape: tuple[int, int], mean: float, sd: float, bounds: tuple[float, float]
) -> np.ndarray:
    """``mean`` plus a smooth within-belly field of SD ``sd`` (correlation ~ a fifth of the image)."""
    f = mean + sd * smooth_field(rng, shape, min(shape) / 5.0)
    return np.clip(f, *bounds).astype(np.float32)


@dataclass(frozen=True)
class _Tissue:
    """The fields that make a scan's tissue shares and fat, before the adipose threshold is set."""

    z: np.ndarray  # the layers field (adipose where above the threshold)
    rind: np.ndarray  # rind share
    lines_share: np.ndarray  # membrane share where the pixel is lean
    lean_fat: np.ndarray  # %, intramuscular fat of the lean here
    adipose_fat: np.ndarray  # %, lipid of the adipose tissue here

    def shares(self, threshold: float, tau: float, sel: Any = slice(None)) -> tuple[np.ndarray, ...]:
        """``(lean, adipose, membrane)`` shares of the pixels ``sel`` for this threshold."""
        ad = _sigmoid((self.z[sel] - threshold) / tau)
        membrane = (1.0 - self.rind[sel]) * self.lines_share[sel] * (1.0 - ad)  # fascia lies in the lean
        meat = 1.0 - self.rind[sel] - membrane
        return meat * (1.0 - ad), meat * ad, membrane

    def fat(self, lean: np.ndarray, adipose: np.ndarray, membrane: np.ndarray, sel: Any = slice(None)):
        """Fat (%) of pixels with these shares."""
        return (
            lean * self.lean_fat[sel]
            + adipose * self.adipose_fat[sel]
            + self.rind[sel] * ph.RIND_FAT_PCT
            + membrane * ph.MEMBRANE_FAT_PCT
        )

    def threshold(self, mask: np.ndarray, target_fat_pct: float) -> tuple[float, float]:
        """``(threshold, tau)`` whose mean fat over ``mask`` is the target (bisection)."""
        inside = self.z[mask] if mask.any() else self.z.ravel()
        sel = mask if mask.any() else np.ones(self.z.shape, bool)
        # Soft threshold: the transition is ~1-2 px wide (tissue boundaries are sharp at mm scale).
        tau = 0.04 * float(np.std(inside) or 1.0)
        lo, hi = float(inside.min()) - 10 * tau, float(inside.max()) + 10 * tau
        for _ in range(40):  # fat falls as the threshold rises
            mid = 0.5 * (lo + hi)
            if float(np.mean(self.fat(*self.shares(mid, tau, sel), sel))) > target_fat_pct:
                lo = mid
            else:
                hi = mid
        return 0.5 * (lo + hi), tau


def _glare(rng: np.random.Generator, adipose: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Specular glare: small clusters on adipose pixels (wet fat surface facing the lights)."""
    glare = np.zeros(mask.shape, np.float32)
    fat_px = np.flatnonzero((adipose > 0.7) & mask)
    n_glare = rng.binomial(fat_px.size, ph.GLARE_PIXEL_SHARE) if fat_px.size else 0
    if n_glare:
        from scipy import ndimage

        seeds = rng.choice(fat_px, size=n_glare, replace=False)
        glare.flat[seeds] = rng.uniform(*ph.GLARE_STRENGTH, size=n_glare)
        grown = ndimage.grey_dilation(glare, size=(2, 2))
        glare = np.where(mask, np.maximum(glare, 0.5 * grown), 0.0).astype(np.float32)
    return glare


def make_scene(
    rng: np.random.Generator, lines: int, samples: int, target_fat_pct: float, tissues: Tissues
) -> Scene:
    """Draw one scan's slab and composition.

    Args:
        rng: the scan's generator (consumed deterministically).
        lines, samples: image size (px).
        target_fat_pct: mean fat (%) the scan's masked pixels should have (met where the belly's
            tissues allow it: the adipose share is kept within 0-1).
        tissues: the belly's :class:`Tissues`.

    Returns:
        The :class:`Scene`.
    """
    shape = (lines, samples)
    slab = _slab(rng, lines, samples)
    mask = slab.coverage >= 0.5
    pitch = ph.BELLY_WIDTH_MM / max(slab.minor_px, 1.0)
    z = _layers(rng, lines, samples)
    adipose_fat = _varying(
        rng, shape, tissues.adipose_fat, ph.ADIPOSE_FAT_WITHIN_SD, ph.ADIPOSE_FAT_RANGE_PCT
    )
    lean_fat = _varying(rng, shape, tissues.lean_fat, ph.LEAN_FAT_WITHIN_SD, ph.LEAN_FAT_RANGE_PCT)
    rind = _rind(rng, slab, pitch)
    tissue = _Tissue(z, rind, _membrane_lines(rng, lines, samples, pitch), lean_fat, adipose_fat)
    lean, adipose, membrane = tissue.shares(*tissue.threshold(mask, target_fat_pct))
    fat = tissue.fat(lean, adipose, membrane)
    rest = 100.0 - ph.ASH_PCT  # water + protein + fat of each tissue
    water = (
        tissues.water_share * (lean * (rest - lean_fat) + adipose * (rest - adipose_fat))
        + rind * ph.RIND_WATER_PCT
        + membrane * ph.MEMBRANE_WATER_PCT
    )
    # Rim: the slab thins over the outer ~6 % of its size.
    rim = max(2.0, 0.06 * min(lines, samples))
    f32 = partial(np.asarray, dtype=np.float32)
    return Scene(
        coverage=slab.coverage,
        mask=mask,
        lean=f32(lean),
        adipose=f32(adipose),
        rind=rind,
        membrane=f32(membrane),
        fat=f32(fat),
        protein=f32(rest - fat - water),
        water=f32(water),
        edge=f32(np.clip(1.0 - slab.depth / rim, 0.0, 1.0)),
        glare=_glare(rng, adipose, mask),
        pitch_mm=float(pitch),
    )
