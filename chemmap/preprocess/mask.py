"""Sample masks: which pixels of a scan belong to the sample."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import ndimage

from chemmap.config import MaskConfig
from chemmap.errors import InputError


def _disk(radius: int) -> np.ndarray:
    r = np.arange(-radius, radius + 1)
    return (r[:, None] ** 2 + r[None, :] ** 2) <= radius**2


def threshold_mask(refl_mean: np.ndarray, cfg: MaskConfig) -> np.ndarray:
    """Sample pixels of a scan from its mean reflectance, ``(lines, samples)`` -> bool.

    Meat is bright and the belt dark in every band, so a threshold on mean reflectance
    separates them; an opening removes specks of belt glare, hole filling takes back
    dark spots inside the sample, small components go, and an erosion drops the edge
    pixels that mix meat and belt.
    """
    m = np.asarray(refl_mean) > cfg.threshold
    if cfg.opening:
        m = ndimage.binary_opening(m, structure=_disk(cfg.opening))
    if cfg.fill_holes:
        m = ndimage.binary_fill_holes(m)
    labels, n = ndimage.label(m)
    if n:
        sizes = ndimage.sum_labels(m, labels, index=np.arange(1, n + 1))
        keep = np.zeros(n + 1, dtype=bool)
        keep[1:] = sizes >= cfg.min_size
        m = keep[labels]
    if cfg.erode:
        m = ndimage.binary_erosion(m, structure=_disk(cfg.erode))
    return m


def read_mask_file(path: Path, shape: tuple[int, int]) -> np.ndarray:
    """A mask image (``.npy`` or ``.png``; non-zero = sample) of the scan's ``(lines, samples)``."""
    if not path.is_file():
        raise InputError(f"mask file not found: {path}")
    if path.suffix.lower() == ".npy":
        arr = np.load(path, allow_pickle=False)
    elif path.suffix.lower() == ".png":
        import matplotlib.image as mpimg

        arr = mpimg.imread(path)
        if arr.ndim == 3:
            arr = arr[..., :3].max(axis=-1)
    else:
        raise InputError(f"{path}: mask files must be .npy or .png, got {path.suffix!r}")
    if arr.shape != tuple(shape):
        raise InputError(f"{path}: mask is {arr.shape[0]}x{arr.shape[1]}, the scan is {shape[0]}x{shape[1]}")
    return np.asarray(arr) != 0
