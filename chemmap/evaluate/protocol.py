"""One protocol for every tunable map setting (docs/evaluation.md).

A setting (a smoothing width, a median window, the brightness baseline's width and slope,
which baseline is "the best label-free one") is chosen on *out-of-fold* maps of the
training samples, splits 1-5, against their true maps: every training sample is mapped by
a model that did not see its fold. The chosen settings are then applied once to the test
split. Nothing here reads a test sample: :func:`out_of_fold` walks
``Dataset.ids(training splits)`` only, and a test replaces the test split's truth by noise
to check the choices do not move.

The out-of-fold models: for PLS, one model per fold fitted on the other folds' mean spectra
(its component count chosen by CV over those folds alone); for the U-Net, the training
stage's fold model ``k`` on fold ``k`` (the fold it validated on, which also chose its
early-stopping epoch: the U-Net's RMSECV is a selection criterion, not a test result).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.progress import track
from torch import nn

from chemmap.evaluate.baselines import (
    BRIGHTNESS_SIGMAS,
    MEDIAN_SIZES,
    SIGMAS,
    pls_candidates,
    setting_key,
    smoothed_brightness,
)
from chemmap.evaluate.blindspot import BlindSpotConfig, MapDenoiser, cached_map_denoiser
from chemmap.inference.ensemble import predict_map
from chemmap.models.loss import MAP_RANGE
from chemmap.models.pls import PLSBaseline
from chemmap.models.tiling import Geometry
from chemmap.preprocess.store import Dataset

__all__ = [
    "LABEL_FREE",
    "BrightnessFit",
    "Choices",
    "OutOfFold",
    "add_denoised",
    "choose",
    "fold_pls_models",
    "out_of_fold",
    "training_splits",
]

# The label-free map baselines, each at its chosen setting; the best of them by out-of-fold
# pixel RMSE is "the best label-free baseline" of the report.
# pls_n2v (a blind-spot denoiser of the PLS map) only where evaluate.blindspot_steps asks for it.
LABEL_FREE = ("pls", "pls_clip", "pls_gauss", "pls_median", "pls_bin2", "pls_bin4", "pls_n2v")


def training_splits(data: Dataset) -> list[int]:
    """Every split but 0 (the test split)."""
    return [s for s in data.splits if s != 0]


@dataclass
class BrightnessFit:
    """Sufficient statistics of the brightness baseline, per fold and smoothing width.

    The baseline maps a scan to ``lab + slope * (b - mean b)``; its squared error over a
    scan's mask pixels is ``n c² + slope² Sxx - 2 slope Sxy + Syy`` with ``c`` = lab - mean
    truth, ``Sxx`` = Σ(b - mean b)², ``Sxy`` = Σ(b - mean b)(t - mean t), ``Syy`` = Σ(t - mean t)²
    (the cross terms vanish: both deviations sum to 0 over the scan). So a slope fitted on
    some folds is scored on another from these sums alone.
    """

    sums: dict[tuple[int, float], np.ndarray] = field(default_factory=dict)  # (fold, sigma) -> 5 sums
    # The folds :meth:`oof_rmse` scores (None: all). Slopes are fitted on every fold added, as
    # the PLS models are: a reduced fold set scores its folds with slopes from the others.
    scored: frozenset[int] | None = None

    def add(self, fold: int, sigma: float, b: np.ndarray, t: np.ndarray, lab: float) -> None:
        """One scan's mask pixels: smoothed brightness ``b`` and truth ``t``, both ``(n,)``."""
        db, dt = b - b.mean(), t - t.mean()
        c = lab - t.mean()
        row = np.array([db @ db, db @ dt, dt @ dt, b.size * c * c, b.size])
        self.sums[fold, sigma] = self.sums.get((fold, sigma), np.zeros(5)) + row

    def folds(self) -> list[int]:
        return sorted({f for f, _ in self.sums})

    def slope(self, sigma: float, leave_out: int | None = None) -> float:
        """Least-squares slope over every fold but ``leave_out``."""
        total = sum(v for (f, s), v in self.sums.items() if s == sigma and f != leave_out)
        return float(total[1] / total[0]) if total[0] > 0 else 0.0

    def oof_rmse(self, sigma: float) -> float:
        """Pooled RMSE of each fold's scans mapped with the slope of the other folds."""
        sse, n = 0.0, 0.0
        for fold in self.folds():
            if self.scored is not None and fold not in self.scored:
                continue
            sxx, sxy, syy, ncc, px = self.sums[fold, sigma]
            b = self.slope(sigma, leave_out=fold)
            sse += ncc + b * b * sxx - 2 * b * sxy + syy
            n += px
        return float(np.sqrt(sse / n)) if n else float("nan")


@dataclass
class OutOfFold:
    """Out-of-fold maps of the training samples, reduced to what the choices need (one target).

    Attributes:
        sse: candidate key (``pls_gauss@2``, ``unet``...) -> ``[squared-error sum, pixels]``.
        brightness: the brightness baseline's sums.
        unet_means: training sample id -> ``[map sum, pixels, lab]`` of its fold model's maps.
        scans: training scans with a true map; ``no_truth``: those without.
    """

    sse: dict[str, list[float]] = field(default_factory=dict)
    brightness: BrightnessFit = field(default_factory=BrightnessFit)
    unet_means: dict[str, list[float]] = field(default_factory=dict)
    scans: int = 0
    no_truth: int = 0
    # With a pls_n2v baseline to fit: every training scan's (fold, out-of-fold PLS map, mask,
    # truth, scored: whether its fold is scored, i.e. has a U-Net).
    kept: list[tuple[int, np.ndarray, np.ndarray, np.ndarray, bool]] | None = None

    def add_error(self, key: str, full: np.ndarray, mask: np.ndarray, truth: np.ndarray) -> None:
        """One map's squared errors over ``mask`` (pixels with a true value)."""
        err = np.asarray(full, dtype=np.float64)[mask] - truth[mask]
        acc = self.sse.setdefault(key, [0.0, 0])
        acc[0] += float(err @ err)
        acc[1] += err.size

    def rmse(self) -> dict[str, float]:
        """Candidate -> pooled out-of-fold pixel RMSE."""
        return {k: float(np.sqrt(s / n)) for k, (s, n) in self.sse.items() if n}

    def unet_rmsecv(self) -> float:
        """Pooled RMSECV of the U-Net's sample means (every fold model on its own fold)."""
        if not self.unet_means:
            return float("nan")
        err = [total / px - lab for total, px, lab in self.unet_means.values()]
        return float(np.sqrt(np.mean(np.square(err))))


def fold_pls_models(
    data: Dataset, spectra: Mapping[str, np.ndarray], targets: Sequence[str], fit: Callable[..., PLSBaseline]
) -> dict[int, PLSBaseline]:
    """Fold ``k`` -> PLS fitted on the training samples of the other folds (CV over them alone).

    Args:
        fit: ``fit(data, spectra, targets, sample_ids)``, the stage's own PLS fit.
    """
    folds = training_splits(data)
    out = {}
    for k in folds:
        rest = data.ids([f for f in folds if f != k])
        out[k] = fit(data, spectra, targets, rest)
    return out


def _add_scan(
    oof: OutOfFold,
    fold: int,
    scan: dict[str, Any],
    pls_map: np.ndarray | None,  # None only for a scan that is not scored
    lab: float,
    unet_map: np.ndarray | None,
    scored: bool = True,
) -> None:
    """One training scan's out-of-fold maps of one target into the tallies.

    Maps are made on the sample mask; errors are taken where the truth has a value. A scan
    of a fold that is not ``scored`` adds only to the brightness fit (its slopes).
    """
    mask, truth = scan["mask"], scan["truth"]
    known = mask & np.isfinite(truth)
    if scored:
        for key, bm in pls_candidates(pls_map, mask).items():
            oof.add_error(key, bm.full, known, truth)
        oof.add_error("flat_lab", np.full(mask.shape, lab), known, truth)
    if unet_map is not None:
        oof.add_error("unet", unet_map, known, truth)
    for sigma in BRIGHTNESS_SIGMAS:
        b = smoothed_brightness(scan["brightness"], mask, sigma)
        oof.brightness.add(fold, sigma, b[known], truth[known], lab)


def out_of_fold(
    data: Dataset,
    targets: Sequence[str],
    pls_by_fold: Mapping[int, PLSBaseline],
    unet_by_fold: Mapping[int, nn.Module],
    geometry: Geometry | None = None,
    *,
    channels: Sequence[int] | None = None,
    progress: bool = True,
    tick: Callable[[], Any] | None = None,
    keep_maps: bool = False,
) -> dict[str, OutOfFold]:
    """Every training scan mapped by the models that did not see its fold.

    Args:
        pls_by_fold: fold -> PLS of the other folds (:func:`fold_pls_models`), outputs in
            ``targets`` order.
        unet_by_fold: fold -> the fold's U-Net (outputs: the dataset's targets; ``channels``
            picks ``targets`` among them); folds without one have no U-Net maps.

        progress: a bar of its own over the samples; ``tick``: a caller's bar (one call per sample).
        keep_maps: keep each scan's PLS map, mask and truth (:attr:`OutOfFold.kept`).

    Returns:
        target -> :class:`OutOfFold`.
    """
    splits = training_splits(data)
    # A reduced fold set (train.folds) scores the folds it trained, every method on the same
    # scans; the other folds' scans still fit the brightness slopes and train pls_n2v.
    scored = frozenset(unet_by_fold) or frozenset(splits)
    out = {
        t: OutOfFold(brightness=BrightnessFit(scored=scored), kept=[] if keep_maps else None) for t in targets
    }
    channels = list(range(len(targets))) if channels is None else list(channels)
    index = [data.targets.index(t) for t in targets]
    ids = data.ids(splits)
    for sid in track(ids, description="out-of-fold maps", disable=not progress or tick is not None):
        info = data.samples[sid]
        for scan_id in info.scans:
            truth = data.truth(scan_id) or {}
            cube = np.asarray(data.cube(scan_id)[...])
            mask = data.mask(scan_id)
            brightness = data.brightness(scan_id) if truth else None
            net = unet_by_fold.get(info.split)
            unet = None if net is None else predict_map(net, data.model_input(cube), geometry).numpy()
            wants_pls = truth and (info.split in scored or keep_maps)  # else: the brightness fit only
            pls_maps = pls_by_fold[info.split].predict_cube(cube, mask) if wants_pls else None  # (T, H, W)
            for j, t in enumerate(targets):
                lab = info.targets[index[j]]
                umap = None if unet is None else unet[channels[j]]
                if umap is not None:  # the U-Net's RMSECV needs no true map
                    acc = out[t].unet_means.setdefault(sid, [0.0, 0, lab])
                    acc[0] += float(umap[mask].astype(np.float64).sum())
                    acc[1] += int(mask.sum())
                if t not in truth:
                    out[t].no_truth += info.split in scored
                    continue
                scan = {"mask": mask, "truth": truth[t].astype(np.float64), "brightness": brightness}
                if out[t].kept is not None:
                    pls_map = pls_maps[j].astype(np.float32)
                    out[t].kept.append((info.split, pls_map, mask, scan["truth"], info.split in scored))
                pls_j = None if pls_maps is None else pls_maps[j]
                _add_scan(out[t], info.split, scan, pls_j, lab, umap, info.split in scored)
                out[t].scans += info.split in scored
        if tick is not None:
            tick()
    return out


@dataclass(frozen=True)
class Choices:
    """The settings the protocol chose for one target, and the scores it chose them on.

    Attributes:
        gauss_sigma, median_size: the smoothing of ``pls_gauss`` and ``pls_median``.
        brightness_sigma, brightness_slope: the brightness baseline (slope on all training folds).
        best_label_free: the :data:`LABEL_FREE` baseline with the lowest out-of-fold pixel RMSE.
        oof_rmse: candidate -> out-of-fold pixel RMSE (``brightness_lab@<sigma>`` included).
        None everywhere when no training scan has a true map (nothing to choose on).
    """

    gauss_sigma: float | None
    median_size: int | None
    brightness_sigma: float | None
    brightness_slope: float | None
    best_label_free: str | None
    oof_rmse: dict[str, float]
    scans: int

    def setting(self, method: str) -> str:
        """The candidate key of a method at its chosen setting (``pls_gauss`` -> ``pls_gauss@2``)."""
        if method == "pls_gauss" and self.gauss_sigma is not None:
            return setting_key(method, self.gauss_sigma)
        if method == "pls_median" and self.median_size is not None:
            return setting_key(method, self.median_size)
        if method == "brightness_lab" and self.brightness_sigma is not None:
            return setting_key(method, self.brightness_sigma)
        return method

    def to_dict(self) -> dict[str, Any]:
        return {
            "gauss_sigma": self.gauss_sigma,
            "median_size": self.median_size,
            "brightness_sigma": self.brightness_sigma,
            "brightness_slope": self.brightness_slope,
            "best_label_free": self.best_label_free,
            "training_scans_with_truth": self.scans,
            "oof_pixel_rmse": self.oof_rmse,
        }


def _best(scores: Mapping[str, float], keys: Sequence[str]) -> str:
    """The key with the lowest score (the first of equals); keys without a score are left out."""
    keys = [k for k in keys if k in scores]
    return min(keys, key=lambda k: (scores[k], keys.index(k)))


def add_denoised(oof: OutOfFold, cfg: BlindSpotConfig, cache: Path | None = None) -> MapDenoiser | None:
    """The ``pls_n2v`` baseline of one target, cross-fitted like the U-Net: for each scored
    fold, a blind-spot denoiser trained on the other folds' out-of-fold PLS maps (no lab
    value, no true map) maps that fold's scans, clipped to the valid range like the other
    smoothed maps. A denoiser never scores maps it was trained on, though it could (it needs
    no label): the test split's maps are new to it too.

    Args:
        cache: a folder of denoisers trained before (:func:`cached_map_denoiser`), or None.

    Returns:
        the fold denoisers as one ensemble (their mean, as the U-Net's fold models are
        averaged) for the test split; None without kept maps.
    """
    if not oof.kept:
        return None
    members = []
    for fold in sorted({f for f, *_, scored in oof.kept if scored}):
        train = [(s, m) for f, s, m, _, _ in oof.kept if f != fold]
        if not train:
            raise ValueError(f"pls_n2v: no other fold's maps to train fold {fold}'s denoiser on")
        net = cached_map_denoiser(train, cfg, cache)
        for _, s, mask, truth, _ in (k for k in oof.kept if k[0] == fold):
            known = mask & np.isfinite(truth)
            oof.add_error("pls_n2v", np.clip(net.apply(s), *MAP_RANGE), known, truth)
        members.append(net)
    return MapDenoiser.ensemble(members) if members else None


def choose(oof: OutOfFold) -> Choices:
    """The protocol's choices from out-of-fold scores alone."""
    scores = oof.rmse()
    if not oof.scans:
        return Choices(None, None, None, None, None, scores, 0)
    for sigma in BRIGHTNESS_SIGMAS:
        scores[setting_key("brightness_lab", sigma)] = oof.brightness.oof_rmse(sigma)
    sigma = float(_best(scores, [setting_key("pls_gauss", s) for s in SIGMAS]).split("@")[1])
    size = int(_best(scores, [setting_key("pls_median", s) for s in MEDIAN_SIZES]).split("@")[1])
    b_sigma = float(
        _best(scores, [setting_key("brightness_lab", s) for s in BRIGHTNESS_SIGMAS]).split("@")[1]
    )
    partial = Choices(sigma, size, b_sigma, oof.brightness.slope(b_sigma), None, scores, oof.scans)
    best = _best(scores, [partial.setting(m) for m in LABEL_FREE]).split("@")[0]
    return Choices(sigma, size, b_sigma, partial.brightness_slope, best, scores, oof.scans)
