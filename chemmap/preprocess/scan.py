"""One path for a scan: raw counts -> model input. Building a dataset and scoring both use it.

Three steps, and only these, turn a raw scan into what the model sees:

1. :func:`transform`, per block of lines: calibration with the white and dark references,
   band selection, binning, transforms, and the saturated/dead flags;
2. :func:`sample_mask`, on the whole 2-D scan (opening, hole filling and the minimum
   size are global, so this step cannot run per block);
3. :func:`model_input`: standardisation with the recipe's training statistics, and
   NaN (outside the scan) -> 0.

:func:`reference_means` averages the white and dark references over their lines first.
Arrays are band-first, ``(bands, lines, samples)``, NumPy or Dask alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from chemmap.config import MaskConfig
from chemmap.errors import InputError
from chemmap.io import Scan, ScanFiles, check_references, open_scan
from chemmap.preprocess.mask import read_mask_file, threshold_mask
from chemmap.preprocess.recipe import Recipe


@dataclass(frozen=True)
class Transformed:
    """What :func:`transform` makes of a block of raw lines.

    Attributes:
        cube: ``(channels, lines, samples)`` float32, preprocessed, not normalised.
        reflectance_mean: ``(lines, samples)`` float32 mean reflectance over the mask's band
            range (what the threshold mask looks at).
        bad: ``(lines, samples)`` bool: saturated, or a dead detector element, in a selected band.
    """

    cube: Any
    reflectance_mean: Any
    bad: Any


@dataclass(frozen=True)
class SampleMask:
    """The sample's pixels of one scan, and how many bad pixels were taken out of them."""

    mask: np.ndarray  # (lines, samples) bool
    bad_removed: int


def reference_means(scan: Scan, files: ScanFiles, recipe: Recipe) -> tuple[Any, Any]:
    """White and dark references averaged over their lines, ``(bands, samples)`` float64 each.

    ``(None, None)`` with ``calibration: none``. The references must match the scan
    (:func:`chemmap.io.check_references` says which file and field do not).
    """
    if recipe.config.calibration != "white_dark":
        return None, None
    import dask

    white = open_scan(files.white) if files.white else None
    dark = open_scan(files.dark) if files.dark else None
    check_references(scan, white, dark, files)
    return dask.compute(white.data.astype(np.float64).mean(axis=1), dark.data.astype(np.float64).mean(axis=1))


def transform(
    raw: Any, white: Any, dark: Any, recipe: Recipe, saturation: float, first_band: int = 0
) -> Transformed:
    """Raw counts of a block of lines -> the preprocessed cube and the flags the mask needs.

    Args:
        raw: ``(bands, lines, samples)`` counts, every raw band (NumPy or Dask), or with
            ``first_band`` the bands from that one on (a reader of :attr:`Recipe.band_span` only).
        white, dark: :func:`reference_means` (None with ``calibration: none``), every raw band.
        recipe: the preprocessing recipe.
        saturation: counts at or above this are saturated (:meth:`Recipe.saturation_level`).
    """
    cube, refl_mean, bad = recipe.apply(raw, white, dark, saturation, first_band)
    return Transformed(cube, refl_mean, bad)


def sample_mask(
    reflectance_mean: np.ndarray,
    bad: np.ndarray,
    config: MaskConfig,
    *,
    mask_file: Path | None = None,
    source: str = "scan",
) -> SampleMask:
    """The sample's pixels of a whole scan: threshold (or mask file), then bad pixels out.

    Args:
        reflectance_mean, bad: ``(lines, samples)`` from :func:`transform`, for the whole scan.
        config: the mask section of the recipe.
        mask_file: the scan's mask image (``method: files``).
        source: the scan's path, for error messages.

    Raises:
        InputError: no mask file where one is needed, or no sample pixel left.
    """
    if config.method == "files":
        if mask_file is None:
            raise InputError(f"{source}: no mask file found (mask.pattern={config.pattern!r})")
        mask = read_mask_file(mask_file, reflectance_mean.shape)
    else:
        mask = threshold_mask(reflectance_mean, config)
    bad_removed = int((mask & bad).sum())
    mask &= ~bad
    if not mask.any():
        raise InputError(
            f"{source}: no sample pixels found (mask method {config.method}, "
            f"threshold {config.threshold}); is the scan empty or the threshold wrong?"
        )
    return SampleMask(mask, bad_removed)


def check_finite(nonfinite: np.ndarray, mask: np.ndarray, source: str = "scan") -> None:
    """No sample pixel may be NaN or infinite after preprocessing; one line says where one is."""
    hit = mask & nonfinite
    if hit.any():
        y, x = np.argwhere(hit)[0]
        raise InputError(
            f"{source}: {int(hit.sum())} sample pixels are NaN or infinite after "
            f"preprocessing (first at line {y}, sample {x}); check the raw values and references"
        )


def model_input(cube: Any, recipe: Recipe, channel_axis: int = 0, *, overwrite: bool = False) -> Any:
    """Standardise with the recipe's training statistics; NaN and +-inf (outside the scan) become 0.

    ``overwrite``: a float32 NumPy ``cube`` the caller no longer needs is standardised in place
    (the same operations, the same values; no temporary arrays): the scorer's hot path.
    """
    if overwrite and isinstance(cube, np.ndarray) and cube.dtype == np.float32:
        mean, std = recipe.stats_shaped(cube.ndim, channel_axis)
        np.subtract(cube, mean, out=cube)
        np.divide(cube, std, out=cube)
        return np.nan_to_num(cube, copy=False, nan=0.0, posinf=0.0, neginf=0.0)
    z = recipe.normalize(cube, channel_axis=channel_axis)
    return np.nan_to_num(z, nan=0.0, posinf=0.0, neginf=0.0)
