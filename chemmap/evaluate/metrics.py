"""Numbers that compare predictions with lab values and maps with each other.

Mean-fat metrics follow the chemometric conventions (Williams & Norris, *Near-Infrared
Technology*, 2001): SEP is the standard deviation of the residuals after the bias is
removed, RPD = SD(reference) / SEP, and the slope/intercept are those of the least-squares
line of predicted on reference. Map metrics are what the paper reports about its maps:
how much of a map's variance is spatially correlated and how many pixels leave 0-100 %.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from chemmap.spatial import spatial_correlated_share

__all__ = [
    "TISSUE_FAT_THRESHOLD",
    "MapTally",
    "map_metrics",
    "paired_bootstrap",
    "regression_metrics",
    "rmse",
    "rmsecv",
]

TISSUE_FAT_THRESHOLD = 50.0  # % fat: a pixel whose true fat is at or above this is fat tissue


def _as_vector(a: np.ndarray, name: str) -> np.ndarray:
    """``(n,)`` or ``(n, 1)`` -> float64 ``(n,)``; anything else is an error naming ``name``."""
    arr = np.asarray(a, dtype=np.float64)
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1:
        raise ValueError(f"{name} must have shape (n,) or (n, 1), got {arr.shape}.")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains {int(np.sum(~np.isfinite(arr)))} non-finite values.")
    return arr


def _paired(y_true: np.ndarray, y_pred: np.ndarray, names: tuple[str, str]) -> tuple[np.ndarray, np.ndarray]:
    y = _as_vector(y_true, names[0])
    p = _as_vector(y_pred, names[1])
    if y.shape != p.shape:
        raise ValueError(f"{names[0]} and {names[1]} differ in length: {y.shape[0]} vs {p.shape[0]}.")
    if y.size == 0:
        raise ValueError(f"{names[0]} is empty.")
    return y, p


def rmse(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Root mean squared error.

    Args:
        y_true: Reference values, shape ``(n,)`` or ``(n, 1)``.
        y_pred: Predictions, same shape.

    Returns:
        RMSE in the units of ``y_true`` (e.g. % fat).
    """
    y, p = _paired(y_true, y_pred, ("y_true", "y_pred"))
    return float(np.sqrt(np.mean((p - y) ** 2)))


def regression_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """Prediction-vs-reference statistics for one target.

    Args:
        y_true: Reference (lab) values, shape ``(n,)`` or ``(n, 1)``, e.g. % fat.
        y_pred: Predicted values, same shape and units.

    Returns:
        ``n``; ``rmse``; ``r2`` = 1 - SS_res / SS_tot (SS_tot about the mean of the reference;
        NaN when the reference is constant); ``bias`` = mean(pred - ref); ``sep`` = std of
        ``pred - ref`` with ddof=1 (bias removed; NaN for n < 2); ``rpd`` = SD(ref, ddof=1) / SEP
        (inf when SEP is 0); ``slope`` and ``intercept`` of the least-squares line
        ``pred = slope * ref + intercept`` (NaN when the reference is constant).
        Note RMSE² = bias² + SEP² · (n - 1) / n.
    """
    y, p = _paired(y_true, y_pred, ("y_true", "y_pred"))
    n = y.size
    resid = p - y
    ss_res = float(np.sum(resid**2))
    yc = y - y.mean()
    ss_tot = float(np.sum(yc**2))
    sep = float(np.std(resid, ddof=1)) if n > 1 else float("nan")
    sd_ref = float(np.std(y, ddof=1)) if n > 1 else float("nan")
    if ss_tot > 0:
        r2 = 1.0 - ss_res / ss_tot
        slope = float(np.sum(yc * (p - p.mean())) / ss_tot)
        intercept = float(p.mean() - slope * y.mean())
    else:
        r2 = slope = intercept = float("nan")
    if n < 2:
        rpd = float("nan")
    elif sep > 0:
        rpd = sd_ref / sep
    else:
        rpd = float("inf")
    return {
        "n": int(n),
        "rmse": float(np.sqrt(ss_res / n)),
        "r2": float(r2),
        "bias": float(resid.mean()),
        "sep": sep,
        "rpd": float(rpd),
        "slope": float(slope),
        "intercept": float(intercept),
    }


def rmsecv(y_true: np.ndarray, y_pred_cv: np.ndarray, folds: np.ndarray | None = None) -> dict:
    """Root mean squared error of cross-validation from out-of-fold predictions.

    The pooled RMSECV is ``sqrt(sum of squared errors over all folds / n)``: every sample is
    predicted once, by the model that did not see its fold (this is the usual definition, not
    the mean of the per-fold RMSEs, which weighs small folds too much).

    Args:
        y_true: Reference values, shape ``(n,)`` or ``(n, 1)``.
        y_pred_cv: Out-of-fold predictions, ``(n,)``/``(n, 1)``; or ``(n, A)`` for a curve over
            ``A`` component counts (column ``a`` = predictions with ``a + 1`` components).
        folds: Optional fold label per sample, shape ``(n,)``; adds per-fold RMSEs.

    Returns:
        ``{"rmsecv": float or list[float] (length A), "per_fold": {fold: float or list}}``
        (``per_fold`` only when ``folds`` is given).
    """
    y = _as_vector(y_true, "y_true")
    p = np.asarray(y_pred_cv, dtype=np.float64)
    curve = p.ndim == 2 and p.shape[1] > 1
    if not curve:
        p = _as_vector(p, "y_pred_cv")[:, None]
    if p.ndim != 2 or p.shape[0] != y.size:
        raise ValueError(f"y_pred_cv must have {y.size} rows like y_true, got shape {p.shape}.")
    if not np.all(np.isfinite(p)):
        raise ValueError("y_pred_cv contains non-finite values.")
    se = (p - y[:, None]) ** 2  # (n, A)

    def pack(v: np.ndarray) -> float | list[float]:
        return [float(x) for x in v] if curve else float(v[0])

    out: dict = {"rmsecv": pack(np.sqrt(se.mean(axis=0)))}
    if folds is not None:
        f = np.asarray(folds).ravel()
        if f.shape[0] != y.size:
            raise ValueError(f"folds must have one label per sample ({y.size}), got {f.shape[0]}.")
        out["per_fold"] = {
            (k.item() if hasattr(k, "item") else k): pack(np.sqrt(se[f == k].mean(axis=0)))
            for k in np.unique(f)
        }
    return out


def map_metrics(
    map2d: np.ndarray,
    mask: np.ndarray | None = None,
    truth: np.ndarray | None = None,
    *,
    name: str = "map",
    valid_range: tuple[float, float] = (0.0, 100.0),
    native: tuple[np.ndarray, np.ndarray] | None = None,
    fat_tissue: np.ndarray | None = None,
) -> dict[str, float]:
    """Statistics of one chemical map inside its sample mask.

    Args:
        map2d: Predicted map, shape ``(H, W)``, in percent; values outside the mask are ignored
            (NaN there is the contract).
        mask: Sample pixels, bool ``(H, W)``; default: the finite pixels of ``map2d``.
        truth: Optional true per-pixel map ``(H, W)`` (synthetic data), same units.
        name: What the map is called in error messages (e.g. the scan id).
        valid_range: Physically possible values, default 0-100 %.
        native: ``(map, mask)`` of the same map on the grid its model made it on (e.g. the
            U-Net's half-resolution output before up-sampling, a binned map's bins); the
            spatially correlated share is computed there. Default: ``map2d`` is native.
        fat_tissue: ``(H, W)`` bool, pixels whose true fat is at or above
            :data:`TISSUE_FAT_THRESHOLD`; with ``truth``, adds the bias inside fat and lean tissue.

    Returns:
        ``n_pixels``; ``mean`` and ``std`` of the map in the mask; ``spatial_correlated_share``
        on the native grid (1 - nugget/sill, see :mod:`chemmap.spatial`; a smoothness property,
        not accuracy) and ``spatial_correlated_share_full`` on ``map2d``'s grid;
        ``out_of_range_fraction`` (share of masked pixels below or above ``valid_range``); with
        ``truth``: ``pixel_rmse``, ``pixel_bias`` (mean map - truth) and ``true_mean`` over
        the mask pixels where the truth has a value (``pixels_without_truth``: those where it
        is NaN, background the estimated mask took in); with ``fat_tissue`` too:
        ``bias_fat_tissue`` and ``bias_lean_tissue`` (NaN where the map has no such pixel).

    Raises:
        ValueError: shapes differ, the mask is empty, or the map (or truth) has NaN/inf inside
            the mask — a broken map must not be averaged into a report.
    """
    m2 = np.asarray(map2d, dtype=np.float64)
    if m2.ndim != 2:
        raise ValueError(f"{name}: a map must be 2-D (H, W), got shape {m2.shape}.")
    msk = np.isfinite(m2) if mask is None else np.asarray(mask, dtype=bool)
    if msk.shape != m2.shape:
        raise ValueError(f"{name}: mask shape {msk.shape} differs from map shape {m2.shape}.")
    n = int(msk.sum())
    if n == 0:
        raise ValueError(f"{name}: the mask is empty.")
    vals = m2[msk]
    bad = int(np.sum(~np.isfinite(vals)))
    if bad:
        raise ValueError(f"{name}: {bad} of {n} pixels inside the mask are NaN or inf.")
    lo, hi = valid_range
    full_share = float(spatial_correlated_share(np.where(msk, m2, np.nan), msk))
    out = {
        "n_pixels": n,
        "mean": float(vals.mean()),
        "std": float(vals.std()),
        "spatial_correlated_share": full_share if native is None else _native_share(native, name),
        "spatial_correlated_share_full": full_share,
        "out_of_range_fraction": float(np.mean((vals < lo) | (vals > hi))),
    }
    if truth is not None:
        out.update(_truth_metrics(vals, truth, msk, fat_tissue, name))
    return out


def _native_share(native: tuple[np.ndarray, np.ndarray], name: str) -> float:
    """The spatially correlated share of a map on its own grid."""
    z, m = np.asarray(native[0], dtype=np.float64), np.asarray(native[1], dtype=bool)
    if z.shape != m.shape or z.ndim != 2:
        raise ValueError(f"{name}: native map {z.shape} and its mask {m.shape} must be one 2-D shape.")
    return float(spatial_correlated_share(np.where(m, z, np.nan), m))


def _truth_metrics(
    vals: np.ndarray, truth: np.ndarray, msk: np.ndarray, fat_tissue: np.ndarray | None, name: str
) -> dict[str, float]:
    """Per-pixel error of a map's mask pixels ``vals`` against the true map."""
    t = np.asarray(truth, dtype=np.float64)
    if t.shape != msk.shape:
        raise ValueError(f"{name}: truth shape {t.shape} differs from map shape {msk.shape}.")
    tv = t[msk]
    known = np.isfinite(tv)  # the estimated mask may take in a pixel the truth calls background
    if not known.any():
        raise ValueError(f"{name}: the true map has no value inside the mask.")
    err = vals[known] - tv[known]
    out = {
        "pixel_rmse": float(np.sqrt(np.mean(err**2))),
        "pixel_bias": float(np.mean(err)),
        "true_mean": float(tv[known].mean()),
        "pixels_without_truth": int((~known).sum()),
    }
    if fat_tissue is not None:
        fat = np.asarray(fat_tissue, dtype=bool)[msk][known]
        for key, sel in (("bias_fat_tissue", fat), ("bias_lean_tissue", ~fat)):
            out[key] = float(err[sel].mean()) if sel.any() else float("nan")
    return out


def paired_bootstrap(
    y: np.ndarray,
    pred_a: np.ndarray,
    pred_b: np.ndarray,
    n_boot: int = 10000,
    seed: int = 0,
    ci: float = 0.95,
    *,
    chunk: int = 1000,
) -> dict[str, float]:
    """Paired bootstrap of the RMSE difference ``RMSE(a) - RMSE(b)`` over test samples.

    Both models are scored on the same resampled samples, so the sample-to-sample difficulty
    cancels out (Efron & Tibshirani 1993, ch. 16; a percentile interval).

    Args:
        y: Reference values of the test samples, shape ``(n,)``.
        pred_a: Predictions of model a, shape ``(n,)``.
        pred_b: Predictions of model b, shape ``(n,)``.
        n_boot: Number of bootstrap resamples (>= 1).
        seed: Seed of the resampling generator (``numpy.random.default_rng``).
        ci: Coverage of the percentile confidence interval, in (0, 1).
        chunk: Resamples drawn at a time, bounding memory to ``chunk * n`` indices.

    Returns:
        ``estimate`` (the difference on the full test set), ``ci_low``, ``ci_high``, ``ci``,
        ``prob_a_better`` (share of resamples with ``RMSE(a) < RMSE(b)``), ``rmse_a``,
        ``rmse_b``, ``n``, ``n_boot``, ``seed``. Negative differences favour model a.
    """
    y, a = _paired(y, pred_a, ("y", "pred_a"))
    _, b = _paired(y, pred_b, ("y", "pred_b"))
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}.")
    if not 0.0 < ci < 1.0:
        raise ValueError(f"ci must be in (0, 1), got {ci}.")
    n = y.size
    se_a = (a - y) ** 2
    se_b = (b - y) ** 2
    rng = np.random.default_rng(seed)
    diffs = np.empty(n_boot)
    for start in range(0, n_boot, chunk):
        stop = min(start + chunk, n_boot)
        idx = rng.integers(0, n, size=(stop - start, n))  # (chunk, n)
        diffs[start:stop] = np.sqrt(se_a[idx].mean(axis=1)) - np.sqrt(se_b[idx].mean(axis=1))
    alpha = (1.0 - ci) / 2.0
    lo, hi = np.quantile(diffs, [alpha, 1.0 - alpha])
    rmse_a, rmse_b = float(np.sqrt(se_a.mean())), float(np.sqrt(se_b.mean()))
    return {
        "estimate": rmse_a - rmse_b,
        "ci_low": float(lo),
        "ci_high": float(hi),
        "ci": float(ci),
        "prob_a_better": float(np.mean(diffs < 0)),
        "rmse_a": rmse_a,
        "rmse_b": rmse_b,
        "n": int(n),
        "n_boot": int(n_boot),
        "seed": int(seed),
    }


@dataclass
class MapTally:
    """One way of making maps over the scans of a split: pooled pixel errors and per-map rows.

    :meth:`add` takes one map at a time, so a split's maps are never held in memory together;
    :meth:`summary` pools them. Pooled means every mask pixel of every map weighs the same
    (the headline per-pixel RMSE); ``*_per_map`` values weigh every map the same.
    """

    rows: list[dict[str, Any]] = field(default_factory=list)
    _sums: dict[str, float] = field(default_factory=lambda: dict.fromkeys(_POOLED, 0.0))
    # sample id -> [map sum, px; and over the pixels with a true value: truth sum, map sum, px]
    _samples: dict[str, list[float]] = field(default_factory=dict)

    def add(
        self,
        sample_id: str,
        full: np.ndarray,
        mask: np.ndarray,
        truth: np.ndarray | None = None,
        *,
        native: tuple[np.ndarray, np.ndarray] | None = None,
        fat_tissue: np.ndarray | None = None,
        name: str = "map",
    ) -> dict[str, Any]:
        """Score one map (see :func:`map_metrics` for the arguments); returns its row."""
        row = map_metrics(full, mask, truth, name=name, native=native, fat_tissue=fat_tissue)
        msk = np.asarray(mask, dtype=bool)
        vals = np.asarray(full, dtype=np.float64)[msk]
        s = self._sums
        s["pixels"] += vals.size
        s["out_of_range"] += row["out_of_range_fraction"] * vals.size
        sample = self._samples.setdefault(sample_id, [0.0, 0.0, 0.0, 0.0, 0.0])
        sample[0] += float(vals.sum())
        sample[1] += vals.size
        if truth is not None:
            tv = np.asarray(truth, dtype=np.float64)[msk]
            known = np.isfinite(tv)  # background the estimated mask took in has no true value
            err = vals[known] - tv[known]
            s["known"] += err.size
            s["sse"] += float(np.dot(err, err))
            s["err"] += float(err.sum())
            sample[2:] = [
                sample[2] + float(tv[known].sum()),
                sample[3] + float(vals[known].sum()),
                sample[4] + err.size,
            ]
            if fat_tissue is not None:
                fat = np.asarray(fat_tissue, dtype=bool)[msk][known]
                for tissue, sel in (("fat", fat), ("lean", ~fat)):
                    s[f"{tissue}_err"] += float(err[sel].sum())
                    s[f"{tissue}_px"] += int(sel.sum())
        self.rows.append({"sample_id": sample_id, **row})
        return row

    def sample_means(self) -> dict[str, float]:
        """Sample id -> the mean of its maps over all its scans' mask pixels."""
        return {sid: v[0] / v[1] for sid, v in self._samples.items()}

    @property
    def has_truth(self) -> bool:
        return bool(self.rows) and all("pixel_rmse" in r for r in self.rows)

    @property
    def pixel_rmse(self) -> float:
        """The pooled per-pixel RMSE against the truth (NaN without truth)."""
        s = self._sums
        return float(np.sqrt(s["sse"] / s["known"])) if self.has_truth else float("nan")

    def summary(self, labs: Mapping[str, float]) -> dict[str, Any]:
        """The split's numbers for this kind of map.

        Args:
            labs: sample id -> lab value of the target (every sample added must be there).

        Returns:
            ``n_maps``, ``n_pixels``, ``out_of_range_fraction`` (pooled),
            ``spatial_correlated_share`` (native grid) and ``spatial_correlated_share_full``
            (mean over maps), ``mean_rmse_lab`` (RMSE over samples of the map's mean over the
            sample's mask pixels against the lab value); with truth also ``pixel_rmse`` and
            ``pixel_bias`` (pooled), ``pixel_rmse_per_map`` (mean over maps), ``bias_fat_tissue``
            and ``bias_lean_tissue`` (pooled; when tissue was given) and ``mean_rmse_truth``
            (the map's mean against the true map's mean over the same pixels).
        """
        if not self.rows:
            raise ValueError("no map was added")
        s = self._sums
        ids = list(self._samples)
        means = np.array([self._samples[i][0] / self._samples[i][1] for i in ids])
        out: dict[str, Any] = {
            "n_maps": len(self.rows),
            "n_pixels": int(s["pixels"]),
            "out_of_range_fraction": s["out_of_range"] / s["pixels"],
            "spatial_correlated_share": _nanmean([r["spatial_correlated_share"] for r in self.rows]),
            "spatial_correlated_share_full": _nanmean(
                [r["spatial_correlated_share_full"] for r in self.rows]
            ),
            "mean_rmse_lab": rmse(np.array([labs[i] for i in ids]), means),
        }
        if self.has_truth:
            true_means = np.array([self._samples[i][2] / self._samples[i][4] for i in ids])
            known_means = np.array([self._samples[i][3] / self._samples[i][4] for i in ids])
            out |= {
                "pixel_rmse": self.pixel_rmse,
                "pixel_bias": s["err"] / s["known"],
                "pixel_rmse_per_map": float(np.mean([r["pixel_rmse"] for r in self.rows])),
                "mean_rmse_truth": rmse(true_means, known_means),
                "pixels_without_truth": int(s["pixels"] - s["known"]),
            }
            for tissue in ("fat", "lean"):
                if s[f"{tissue}_px"] > 0:
                    out[f"bias_{tissue}_tissue"] = s[f"{tissue}_err"] / s[f"{tissue}_px"]
        return out


_POOLED = ("pixels", "out_of_range", "known", "sse", "err", "fat_err", "fat_px", "lean_err", "lean_px")


def _nanmean(values: list[float]) -> float:
    v = np.asarray(values, dtype=np.float64)
    return float(v[np.isfinite(v)].mean()) if np.isfinite(v).any() else float("nan")
