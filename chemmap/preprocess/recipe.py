"""The preprocessing recipe: raw counts -> model input, one function for training and scoring.

Every array here is band-first, ``(bands, lines, samples)``, and may be a NumPy or a Dask
array: the dataset builder runs the recipe chunk-parallel over Dask, the scorer runs the
very same code on a tile in memory. Per-band normalisation statistics are part of the
recipe but are applied at read time (:meth:`Recipe.normalize`), so the stored cube stays
in physical units (reflectance or absorbance).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from chemmap.config import PreprocessConfig
from chemmap.errors import InputError

# Reflectance below this is treated as this before taking -log10: a black or dead pixel
# would otherwise give +inf absorbance (1e-4 is far below any meat or belt reflectance).
MIN_REFLECTANCE = 1e-4


def select_bands(
    wavelengths: np.ndarray, wl_min: float | None, wl_max: float | None, source: str = "scan"
) -> np.ndarray:
    """Indices of the bands inside ``[wl_min, wl_max]`` (nm, inclusive)."""
    wl = np.asarray(wavelengths, dtype=np.float64)
    keep = np.ones(wl.shape, dtype=bool)
    if wl_min is not None:
        keep &= wl >= wl_min
    if wl_max is not None:
        keep &= wl <= wl_max
    idx = np.flatnonzero(keep)
    if idx.size == 0:
        raise InputError(
            f"{source}: no band lies in {wl_min}-{wl_max} nm (the scan covers {wl[0]:.1f}-{wl[-1]:.1f} nm)"
        )
    return idx


def bin_bands(x, factor: int):
    """Average ``factor`` adjacent bands along axis 0; a remainder at the end is dropped.

    Works on ``(bands, ...)`` arrays and on 1-D wavelength vectors alike.
    """
    if factor == 1:
        return x
    n = (x.shape[0] // factor) * factor
    if n == 0:
        raise InputError(f"cannot bin {x.shape[0]} bands by {factor}")
    x = x[:n]
    return x.reshape((n // factor, factor, *x.shape[1:])).mean(axis=1)


def _xp(x):
    """The array module of x: dask.array for Dask arrays, numpy otherwise."""
    if type(x).__module__.startswith("dask"):
        import dask.array as da

        return da
    return np


def calibrate(raw, white: np.ndarray, dark: np.ndarray, min_signal: float):
    """Reflectance ``(raw - dark) / (white - dark)`` with per-element references.

    Args:
        raw: counts, ``(bands, lines, samples)``.
        white, dark: reference counts averaged over their lines, ``(bands, samples)``.
        min_signal: white minus dark below this (counts) marks a dead detector element.

    Returns:
        ``(reflectance float32 (bands, lines, samples), dead bool (bands, samples))``.
        Dead elements give 0 reflectance here; the caller flags their pixels.
    """
    span = (np.asarray(white, np.float64) - np.asarray(dark, np.float64)).astype(np.float32)
    dead = ~(span >= min_signal)  # NaN-safe: a NaN reference is dead too
    inv = np.where(dead, 0.0, 1.0 / np.where(dead, 1.0, span)).astype(np.float32)
    dark32 = np.asarray(dark, np.float32)
    refl = (raw.astype(np.float32) - dark32[:, None, :]) * inv[:, None, :]
    return refl, dead


def snv(x):
    """Standard normal variate: centre and scale each pixel's spectrum (axis 0)."""
    xp = _xp(x)
    mu = x.mean(axis=0, keepdims=True)
    sd = x.std(axis=0, keepdims=True)
    return (x - mu) / xp.maximum(sd, np.float32(1e-6))


def _savgol_block(block: np.ndarray, window: int, polyorder: int, deriv: int) -> np.ndarray:
    from scipy.signal import savgol_filter

    return savgol_filter(block, window, polyorder, deriv=deriv, axis=0, mode="interp").astype(np.float32)


def savgol(x, window: int, polyorder: int, deriv: int):
    """Savitzky-Golay smoothing/derivative along bands (needs all bands in one chunk)."""
    if x.shape[0] < window:
        raise InputError(f"savgol window {window} is longer than the {x.shape[0]} selected bands")
    if _xp(x) is np:
        return _savgol_block(x, window, polyorder, deriv)
    if x.numblocks[0] != 1:
        x = x.rechunk({0: -1})
    return x.map_blocks(_savgol_block, window, polyorder, deriv, dtype=np.float32)


@dataclass(frozen=True)
class Recipe:
    """Everything needed to turn a raw scan into model input, stored with data and model.

    Attributes:
        config: the preprocessing section it was made from.
        raw_wavelengths: the band centres (nm) of the raw scans it was made for.
        band_index: indices of the selected raw bands (before binning).
        wavelengths: band centres (nm) of the output channels (after binning).
        mean, std: per-channel normalisation statistics from the training samples
            (never split 0); empty until computed.
    """

    config: PreprocessConfig
    raw_wavelengths: tuple[float, ...]
    band_index: tuple[int, ...]
    wavelengths: tuple[float, ...]
    mean: tuple[float, ...] = field(default=())
    std: tuple[float, ...] = field(default=())

    @classmethod
    def create(cls, config: PreprocessConfig, raw_wavelengths: np.ndarray, source: str = "scan") -> Recipe:
        wl = np.asarray(raw_wavelengths, dtype=np.float64)
        idx = select_bands(wl, config.wavelength_min, config.wavelength_max, source)
        if idx.size < config.bin:
            raise InputError(f"{source}: {idx.size} selected bands cannot be binned by {config.bin}")
        out_wl = bin_bands(wl[idx], config.bin)
        return cls(
            config=config,
            raw_wavelengths=tuple(float(w) for w in wl),
            band_index=tuple(int(i) for i in idx),
            wavelengths=tuple(float(w) for w in out_wl),
        )

    @property
    def n_channels(self) -> int:
        return len(self.wavelengths)

    def check_wavelengths(self, wavelengths: np.ndarray | None, source: str, tol_nm: float = 0.05) -> None:
        """A scan must have the raw bands this recipe was made for."""
        if wavelengths is None:
            raise InputError(f"{source}: header has no 'wavelength' list; the recipe needs band centres")
        wl = np.asarray(wavelengths, np.float64)
        ref = np.asarray(self.raw_wavelengths)
        if wl.shape != ref.shape or not np.allclose(wl, ref, atol=tol_nm):
            raise InputError(
                f"{source}: wavelengths do not match the recipe: {wl.size} bands "
                f"{wl[0]:.2f}-{wl[-1]:.2f} nm, expected {ref.size} bands {ref[0]:.2f}-{ref[-1]:.2f} nm"
            )

    def saturation_level(self, header: dict[str, Any], dtype: np.dtype) -> float:
        if self.config.saturation is not None:
            return float(self.config.saturation)
        ceiling = header.get("ceiling")
        if ceiling is not None:
            try:
                return float(ceiling)
            except (TypeError, ValueError):
                pass
        dt = np.dtype(dtype)
        return float(np.iinfo(dt).max) if dt.kind in "ui" else float("inf")

    @property
    def band_span(self) -> tuple[int, int]:
        """``(first, last + 1)``: the raw bands :meth:`apply` reads (a reader may skip the rest)."""
        return min(self.band_index), max(self.band_index) + 1

    def apply(
        self,
        raw,
        white: np.ndarray | None,
        dark: np.ndarray | None,
        saturation: float,
        first_band: int = 0,
    ):
        """Raw counts -> preprocessed cube and a per-pixel validity flag.

        Args:
            raw: ``(bands, lines, samples)`` counts (NumPy or Dask): every raw band, or with
                ``first_band`` the raw bands from that one on (at least up to :attr:`band_span`'s end).
            white, dark: ``(bands, samples)`` reference means over lines, all raw bands
                (None with ``calibration: none``).
            saturation: counts at or above this are saturated.

        Returns:
            ``(cube, reflectance_mean, bad)``: ``cube`` float32 ``(channels, lines, samples)``
            after band selection, calibration, binning and transforms (not normalised);
            ``reflectance_mean`` float32 ``(lines, samples)`` over the mask's band range (for
            the threshold mask); ``bad`` bool ``(lines, samples)``: saturated in a selected
            band, or a dead detector element in a selected band.
        """
        xp = _xp(raw)
        idx = np.asarray(self.band_index)
        at = idx - first_band  # where the selected bands are in ``raw``
        if np.all(np.diff(at) == 1):
            sel = raw[at[0] : at[-1] + 1]  # a view: a contiguous range is not copied by fancy indexing
        else:
            sel = raw[at]
        saturated = (sel >= saturation).any(axis=0)
        if self.config.calibration == "white_dark":
            assert white is not None and dark is not None
            refl, dead = calibrate(sel, white[idx], dark[idx], self.config.min_white_signal)
            dead_col = dead.any(axis=0)  # (samples,)
            bad = saturated | dead_col[None, :]
        else:
            refl = sel.astype(np.float32)
            bad = saturated
        wl_sel = np.asarray(self.raw_wavelengths)[idx]
        if self.config.mask.band_range is not None:
            lo, hi = self.config.mask.band_range
            m = (wl_sel >= lo) & (wl_sel <= hi)
            if not m.any():
                raise InputError(f"mask.band_range {lo}-{hi} nm holds none of the selected bands")
            refl_mean = refl[np.flatnonzero(m)].mean(axis=0)
        else:
            refl_mean = refl.mean(axis=0)
        cube = bin_bands(refl, self.config.bin)
        if self.config.transform == "absorbance":
            cube = -xp.log10(xp.maximum(cube, np.float32(MIN_REFLECTANCE)))
        if self.config.snv:
            cube = snv(cube)
        if self.config.savgol is not None:
            sg = self.config.savgol
            cube = savgol(cube, sg.window, sg.polyorder, sg.deriv)
        return cube.astype(np.float32), refl_mean.astype(np.float32), bad

    def with_stats(self, mean: np.ndarray, std: np.ndarray) -> Recipe:
        return Recipe(
            config=self.config,
            raw_wavelengths=self.raw_wavelengths,
            band_index=self.band_index,
            wavelengths=self.wavelengths,
            mean=tuple(float(v) for v in mean),
            std=tuple(float(v) for v in std),
        )

    def stats_shaped(self, ndim: int, channel_axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """The training mean and std, float32, shaped to broadcast along ``channel_axis`` of ``ndim`` axes."""
        if not self.mean:
            raise RuntimeError("recipe has no normalisation statistics yet")
        shape = [1] * ndim
        shape[channel_axis] = -1
        mean = np.asarray(self.mean, np.float32).reshape(shape)
        return mean, np.asarray(self.std, np.float32).reshape(shape)

    def normalize(self, x, channel_axis: int = 0):
        """Standardise channels with the training statistics: ``(x - mean) / std`` along ``channel_axis``."""
        mean, std = self.stats_shaped(x.ndim, channel_axis)
        return (x - mean) / std

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["config"] = self.config.model_dump(mode="json")
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Recipe:
        return cls(
            config=PreprocessConfig.model_validate(d["config"]),
            raw_wavelengths=tuple(d["raw_wavelengths"]),
            band_index=tuple(d["band_index"]),
            wavelengths=tuple(d["wavelengths"]),
            mean=tuple(d.get("mean", ())),
            std=tuple(d.get("std", ())),
        )
