"""How much of a map's variance is spatially correlated (DESIGN.md, "simple form").

A map ``z`` is signal plus noise. Pixel-independent noise shows up in the semivariogram
``γ(h) = ½ E[(z(s) - z(s+h))²]`` as its limit at lag 0 (the *nugget*); the map's variance
in the mask is the *sill*. The spatially correlated share is ``1 - nugget / sill``: about 0
for white noise, about 1 for a smooth field. Engstrøm et al. 2025 report 99.91 % for their
U-Net maps and 2.4-2.5 % for PLS maps.
"""

from __future__ import annotations

import numpy as np

__all__ = ["coarse_mask", "semivariogram", "spatial_correlated_share"]

LAGS = (1, 2, 3)  # px, along x and y pooled


def semivariogram(map2d: np.ndarray, mask: np.ndarray | None = None, lags=LAGS) -> np.ndarray:
    """Semivariance at each lag, pooling pairs along lines (y) and samples (x).

    Args:
        map2d: ``(H, W)`` map; NaN pixels are left out.
        mask: ``(H, W)`` bool, pixels to use; None: every finite pixel.
        lags: lags in px.

    Returns:
        float64 ``(len(lags),)``; NaN at a lag with no pair inside the mask.
    """
    z = np.asarray(map2d, dtype=np.float64)
    if z.ndim != 2:
        raise ValueError(f"map2d must be 2-D (H, W), got shape {z.shape}.")
    ok = np.isfinite(z)
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != z.shape:
            raise ValueError(f"mask shape {mask.shape} differs from the map's {z.shape}.")
        ok &= mask
    out = np.full(len(lags), np.nan)
    for n, h in enumerate(lags):
        total, count = 0.0, 0
        for a, b, va, vb in (
            (z[h:, :], z[:-h, :], ok[h:, :], ok[:-h, :]),  # along y (lines)
            (z[:, h:], z[:, :-h], ok[:, h:], ok[:, :-h]),  # along x (samples)
        ):
            if a.size == 0:
                continue
            both = va & vb
            d = a[both] - b[both]
            total += float(np.dot(d, d))
            count += int(d.size)
        if count:
            out[n] = 0.5 * total / count
    return out


def spatial_correlated_share(map2d: np.ndarray, mask: np.ndarray | None = None) -> float:
    """``1 - nugget / sill`` of a map inside a mask, clipped to ``[0, 1]``.

    The nugget is the intercept of the least-squares line through the semivariogram at lags
    1, 2 and 3 px (x and y pooled), clipped at >= 0; the sill is the variance of the map's
    finite pixels inside the mask.

    Args:
        map2d: ``(H, W)`` map, e.g. fat % (NaN outside the sample is fine).
        mask: ``(H, W)`` bool; None: every finite pixel.

    Returns:
        The share in ``[0, 1]``; NaN if fewer than two pixels or no pair at some lag, and 1.0
        for a constant map (no variance to explain).
    """
    z = np.asarray(map2d, dtype=np.float64)
    gam = semivariogram(z, mask)
    ok = np.isfinite(z) if mask is None else (np.isfinite(z) & np.asarray(mask, bool))
    vals = z[ok]
    if vals.size < 2 or not np.all(np.isfinite(gam)):
        return float("nan")
    sill = float(np.var(vals))
    if sill <= 0.0:
        return 1.0
    _slope, intercept = np.polyfit(np.asarray(LAGS, dtype=np.float64), gam, 1)
    nugget = max(float(intercept), 0.0)
    return float(np.clip(1.0 - nugget / sill, 0.0, 1.0))


def coarse_mask(mask: np.ndarray, step: int) -> np.ndarray:
    """The mask of a grid ``step`` times coarser: a cell holds sample when all its pixels do.

    Cell ``(i, j)`` covers pixels ``step*i .. step*i + step - 1`` (and the same in x); cells
    at an odd edge cover only the pixels that exist. The evaluation's rule: a cell scored on
    the native grid is all sample. Training on that grid uses a looser one on purpose
    (:func:`chemmap.models.loss.output_grid_mask`: half the cell).

    Returns:
        bool ``(ceil(H / step), ceil(W / step))``.
    """
    m = np.asarray(mask, dtype=bool)
    if m.ndim != 2 or step < 1:
        raise ValueError(f"need a 2-D mask and a step >= 1, got {m.shape} and {step}.")
    h, w = m.shape
    hc, wc = -(-h // step), -(-w // step)
    padded = np.pad(m, ((0, hc * step - h), (0, wc * step - w)), constant_values=True)
    return padded.reshape(hc, step, wc, step).all(axis=(1, 3))
