"""Numbers that compare predictions with lab values and maps with each other.

Mean-fat metrics follow the chemometric conventions (Williams & Norris, *Near-Infrared
Technology*, 2001): SEP is the standard deviation of the residuals after the bias is
removed, RPD = SD(reference) / SEP, and the slope/intercept are those of the least-squares
line of predicted on reference. Map metrics are what the paper reports about its maps:
how much of a map's variance is spatially correlated and how many pixels leave 0-100 %.
"""

from __future__ import annotations

import numpy as np

from chemmap.spatial import spatial_correlated_share

__all__ = ["map_metrics", "paired_bootstrap", "regression_metrics", "rmse", "rmsecv"]


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
) -> dict[str, float]:
    """Statistics of one chemical map inside its sample mask.

    Args:
        map2d: Predicted map, shape ``(H, W)``, in percent; values outside the mask are ignored
            (NaN there is the contract).
        mask: Sample pixels, bool ``(H, W)``; default: the finite pixels of ``map2d``.
        truth: Optional true per-pixel map ``(H, W)`` (synthetic data), same units.
        name: What the map is called in error messages (e.g. the scan id).
        valid_range: Physically possible values, default 0-100 %.

    Returns:
        ``n_pixels``; ``mean`` and ``std`` of the map in the mask; ``spatial_correlated_share``
        (1 - nugget/sill, see :mod:`chemmap.spatial`); ``out_of_range_fraction`` (share of
        masked pixels below or above ``valid_range``); and with ``truth``: ``pixel_rmse`` and
        ``pixel_bias`` (mean map - truth) over the mask.

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
    out = {
        "n_pixels": n,
        "mean": float(vals.mean()),
        "std": float(vals.std()),
        "spatial_correlated_share": float(spatial_correlated_share(np.where(msk, m2, np.nan), msk)),
        "out_of_range_fraction": float(np.mean((vals < lo) | (vals > hi))),
    }
    if truth is not None:
        t = np.asarray(truth, dtype=np.float64)
        if t.shape != m2.shape:
            raise ValueError(f"{name}: truth shape {t.shape} differs from map shape {m2.shape}.")
        tv = t[msk]
        tbad = int(np.sum(~np.isfinite(tv)))
        if tbad:
            raise ValueError(f"{name}: truth has {tbad} NaN or inf pixels inside the mask.")
        out["pixel_rmse"] = float(np.sqrt(np.mean((vals - tv) ** 2)))
        out["pixel_bias"] = float(np.mean(vals - tv))
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
