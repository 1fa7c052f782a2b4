"""Map baselines built from one per-pixel map: clipped, smoothed inside the mask, binned.

Every function takes a map ``(H, W)`` with NaN outside the sample, and the sample mask, and
returns a :class:`BaselineMap`: the map on the scan's pixel grid (NaN outside the mask) and
the map on its own *native* grid, where the spatially correlated share is computed
(DESIGN.md, "How we judge maps"). Smoothing never mixes background into the sample: the
Gaussian is a normalised convolution over mask pixels only, and the median is taken over
the mask pixels of each window.

Binning a linear model's map is binning its input: PLS is ``y = x @ b + c``, so the mean
of its per-pixel predictions over a bin's mask pixels is exactly PLS applied to the bin's
mean spectrum. :func:`bin_map` therefore gives "PLS on a spatially binned cube" from the
per-pixel PLS map, without reading the cube again (a test checks both ways agree).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from chemmap.models.loss import MAP_RANGE

__all__ = [
    "BaselineMap",
    "bin_map",
    "brightness_map",
    "flat_map",
    "gaussian_in_mask",
    "median_in_mask",
]

_MEDIAN_BLOCK = 1 << 22  # window values held at once by median_in_mask


@dataclass(frozen=True)
class BaselineMap:
    """A map on the scan's grid and on the grid it was made on.

    Attributes:
        full: ``(H, W)`` float32 map, NaN outside the mask.
        native: ``(h, w)`` the map on its own grid (the binned grid for a binned map; the
            scan's grid otherwise), NaN outside ``native_mask``.
        native_mask: ``(h, w)`` bool pixels of ``native`` that hold sample.
    """

    full: np.ndarray
    native: np.ndarray
    native_mask: np.ndarray

    @classmethod
    def on_scan_grid(cls, full: np.ndarray, mask: np.ndarray) -> BaselineMap:
        full = np.where(mask, full, np.nan).astype(np.float32)
        return cls(full, full, np.asarray(mask, dtype=bool))

    def clipped(self, valid_range: tuple[float, float] = MAP_RANGE) -> BaselineMap:
        """The same map clipped to ``valid_range`` on both grids (NaN stays NaN)."""
        return BaselineMap(
            np.clip(self.full, *valid_range), np.clip(self.native, *valid_range), self.native_mask
        )


def _check(map2d: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    z = np.asarray(map2d, dtype=np.float64)
    m = np.asarray(mask, dtype=bool)
    if z.ndim != 2 or m.shape != z.shape:
        raise ValueError(f"map {z.shape} and mask {m.shape} must be the same 2-D shape (H, W).")
    return z, m


def gaussian_in_mask(map2d: np.ndarray, mask: np.ndarray, sigma: float) -> BaselineMap:
    """Normalised Gaussian convolution inside the mask: ``G*(m z) / G*m`` at mask pixels.

    Args:
        map2d: ``(H, W)`` map; values outside ``mask`` are never read.
        mask: ``(H, W)`` bool sample pixels.
        sigma: Gaussian standard deviation in px (> 0), truncated at 4 sigma.
    """
    from scipy.ndimage import gaussian_filter

    if sigma <= 0:
        raise ValueError(f"sigma must be > 0 px, got {sigma}.")
    z, m = _check(map2d, mask)
    weight = m.astype(np.float64)
    num = gaussian_filter(np.where(m, z, 0.0), sigma, mode="constant", cval=0.0, truncate=4.0)
    den = gaussian_filter(weight, sigma, mode="constant", cval=0.0, truncate=4.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = num / den
    return BaselineMap.on_scan_grid(out, m)


def median_in_mask(map2d: np.ndarray, mask: np.ndarray, size: int) -> BaselineMap:
    """Median over the mask pixels of the ``size x size`` window around each mask pixel.

    Args:
        size: odd window side in px (>= 3).
    """
    if size < 3 or size % 2 == 0:
        raise ValueError(f"size must be an odd number of px >= 3, got {size}.")
    z, m = _check(map2d, mask)
    h, w = z.shape
    r = size // 2
    padded = np.pad(np.where(m, z, np.nan), r, constant_values=np.nan)  # (H + 2r, W + 2r)
    windows = np.lib.stride_tricks.sliding_window_view(padded, (size, size))  # (H, W, size, size)
    out = np.full((h, w), np.nan)
    rows = max(1, _MEDIAN_BLOCK // max(w * size * size, 1))
    for y0 in range(0, h, rows):
        y1 = min(h, y0 + rows)
        sel = m[y0:y1]
        if sel.any():
            block = windows[y0:y1][sel].reshape(-1, size * size)  # (mask pixels, size²)
            out[y0:y1][sel] = np.nanmedian(block, axis=1)
    return BaselineMap.on_scan_grid(out, m)


def bin_map(map2d: np.ndarray, mask: np.ndarray, size: int) -> BaselineMap:
    """The mean of the map's mask pixels in each ``size x size`` bin, spread back over them.

    Bins start at pixel (0, 0); edge bins hold what is left. A bin holds sample when at
    least one of its pixels is in the mask.

    Returns:
        ``full``: every mask pixel carries its bin's value; ``native``: the binned grid
        ``(ceil(H / size), ceil(W / size))``.
    """
    if size < 1:
        raise ValueError(f"bin size must be >= 1 px, got {size}.")
    z, m = _check(map2d, mask)
    h, w = z.shape
    hb, wb = -(-h // size), -(-w // size)
    pad = ((0, hb * size - h), (0, wb * size - w))
    vals = np.pad(np.where(m, z, 0.0), pad).reshape(hb, size, wb, size)
    count = np.pad(m, pad).reshape(hb, size, wb, size).sum(axis=(1, 3))  # (hb, wb)
    with np.errstate(invalid="ignore", divide="ignore"):
        native = vals.sum(axis=(1, 3)) / count
    native_mask = count > 0
    native = np.where(native_mask, native, np.nan)
    full = np.repeat(np.repeat(native, size, axis=0), size, axis=1)[:h, :w]
    full = np.where(m, full, np.nan).astype(np.float32)
    return BaselineMap(full, native.astype(np.float32), native_mask)


def flat_map(mask: np.ndarray, value: float) -> BaselineMap:
    """``value`` at every mask pixel (the lab value: it uses the label)."""
    m = np.asarray(mask, dtype=bool)
    return BaselineMap.on_scan_grid(np.full(m.shape, float(value)), m)


def brightness_map(brightness: np.ndarray, mask: np.ndarray, lab: float, slope: float) -> BaselineMap:
    """Brightness mapped linearly to the target, its mask mean set to the lab value (uses the label).

    ``lab + slope * (b - mean_mask(b))``: the slope comes from the training samples, the
    offset from the sample's own lab value.
    """
    b, m = _check(brightness, mask)
    return BaselineMap.on_scan_grid(lab + slope * (b - b[m].mean()), m)


# ----------------------------------------------------------------------------- the candidates

SIGMAS = (0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0)  # px: Gaussian widths tried
MEDIAN_SIZES = (3, 5, 7, 9, 11)  # px: median windows tried
BIN_SIZES = (2, 4)  # px: bins, each reported (nothing to choose)
BRIGHTNESS_SIGMAS = (0.0, 1.0, 2.0, 4.0, 8.0)  # px: brightness smoothing tried; 0 = none


def setting_key(method: str, value: float) -> str:
    """``pls_gauss@2``: a method at one setting, as the protocol's tables name it."""
    return f"{method}@{value:g}"


def pls_candidates(pls_map: np.ndarray, mask: np.ndarray) -> dict[str, BaselineMap]:
    """Every label-free map made from one per-pixel PLS map, at every setting tried.

    Keys: ``pls`` (raw), ``pls_clip``, ``pls_gauss@<sigma>`` and ``pls_median@<size>``
    (smoothed, then clipped), ``pls_bin<size>`` (binned, then clipped).
    """
    raw = BaselineMap.on_scan_grid(pls_map, mask)
    out = {"pls": raw, "pls_clip": raw.clipped()}
    for sigma in SIGMAS:
        out[setting_key("pls_gauss", sigma)] = gaussian_in_mask(pls_map, mask, sigma).clipped()
    for size in MEDIAN_SIZES:
        out[setting_key("pls_median", size)] = median_in_mask(pls_map, mask, size).clipped()
    for size in BIN_SIZES:
        out[f"pls_bin{size}"] = bin_map(pls_map, mask, size).clipped()
    return out


def smoothed_brightness(brightness: np.ndarray, mask: np.ndarray, sigma: float) -> np.ndarray:
    """A scan's brightness ``(H, W)`` (:meth:`Dataset.brightness`), smoothed inside the mask (sigma 0: not).

    The brightness is read from the dataset, not from the stored cube: a recipe with SNV
    sets every pixel's channel mean to 0, which would leave nothing to scale.

    Returns:
        ``(H, W)`` float64, NaN outside the mask.
    """
    b = np.asarray(brightness, dtype=np.float64)
    if sigma > 0:
        return gaussian_in_mask(b, mask, sigma).full.astype(np.float64)
    return np.where(mask, b, np.nan)
