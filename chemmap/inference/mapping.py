"""A raw scan in memory -> its chemical map, through the one path for a scan.

The steps are exactly those that built the dataset the model was trained and evaluated on
(:mod:`chemmap.preprocess.scan`): reference means, :func:`transform`, :func:`sample_mask`,
:func:`check_finite`, :func:`model_input`; then the fold ensemble, tiled exactly for large
scans. So a scan scored here gives the map the evaluate stage gave for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from chemmap.inference.ensemble import predict_map
from chemmap.inference.flags import scan_mean_spectrum
from chemmap.models.tiling import Geometry
from chemmap.preprocess.recipe import Recipe
from chemmap.preprocess.scan import check_finite, model_input, sample_mask, transform

__all__ = ["ScanMap", "map_arrays"]


@dataclass(frozen=True)
class ScanMap:
    """One scored scan.

    Attributes:
        maps: ``(targets, lines, samples)`` float32 in the targets' units, NaN outside the mask.
        mask: ``(lines, samples)`` bool sample pixels.
        bad_removed: saturated or dead pixels taken out of the mask.
        saturated: ``(lines, samples)`` bool pixels flagged bad (saturated or dead element).
        mean_spectrum: ``(channels,)`` float64 mean of the preprocessed cube over the mask
            (what the spectral outlier flags look at).
    """

    maps: np.ndarray
    mask: np.ndarray
    bad_removed: int
    saturated: np.ndarray
    mean_spectrum: np.ndarray


def map_arrays(
    model: nn.Module,
    recipe: Recipe,
    raw: Any,
    white: Any | None,
    dark: Any | None,
    *,
    saturation: float,
    geometry: Geometry | None = None,
    mask_file: Path | None = None,
    source: str = "scan",
) -> ScanMap:
    """The map of one raw scan held in memory.

    Args:
        model: the fold ensemble (or one U-Net) the recipe belongs to.
        recipe: the bundle's preprocessing recipe.
        raw: ``(bands, lines, samples)`` counts, every raw band the recipe expects.
        white, dark: the references as recorded, ``(bands, lines_ref, samples)``; averaged
            over their lines here (None with ``calibration: none``).
        saturation: counts at or above this are saturated.
        geometry: the model's tiling geometry (measured when needed and not given).
        mask_file: the scan's mask image (``mask.method: files``).
        source: what error messages call the scan.
    """
    raw = np.asarray(raw)
    w = None if white is None else np.asarray(white, dtype=np.float64).mean(axis=1)  # (bands, samples)
    d = None if dark is None else np.asarray(dark, dtype=np.float64).mean(axis=1)
    t = transform(raw, w, d, recipe, saturation)
    cube = np.asarray(t.cube)  # (channels, lines, samples)
    sm = sample_mask(
        np.asarray(t.reflectance_mean),
        np.asarray(t.bad),
        recipe.config.mask,
        mask_file=mask_file,
        source=source,
    )
    check_finite(~np.isfinite(cube).all(axis=0), sm.mask, source)
    pred = predict_map(model, model_input(cube, recipe), geometry).numpy()  # (targets, lines, samples)
    maps = np.where(sm.mask[None], pred, np.nan).astype(np.float32)
    return ScanMap(maps, sm.mask, sm.bad_removed, np.asarray(t.bad), scan_mean_spectrum(cube, sm.mask))
