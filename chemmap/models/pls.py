"""The paper's baseline: PLS regression on mean spectra, applied pixel by pixel to make maps.

One PLS1 model per target (the usual chemometric practice; PLS2 would force one component
count on fat, protein and water alike), fitted with ``ikpls`` (Improved Kernel PLS,
Dayal & MacGregor 1997, by the paper's first author). The component count is chosen by
ikpls' fast cross-validation over the training folds (Engstrøm & Jensen 2025,
arXiv 2401.13185): centering (and optional scaling) statistics are computed from each
fold's training part only, so no validation sample leaks into its own model.

A fitted model is just ``y = x @ coef + intercept`` per target, stored as plain arrays
(:meth:`PLSBaseline.to_dict`), never pickled, so a map can be scored without ikpls.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["MAX_COMPONENTS", "PLSBaseline", "choose_components", "cv_curve"]

_SELECTION_RULES = ("min", "one_se")
MAX_COMPONENTS = 20  # the largest component count the baseline's cross-validation tries


def _check_xy(X: np.ndarray, Y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(X, dtype=np.float64)
    y = np.asarray(Y, dtype=np.float64)
    if y.ndim == 1:
        y = y[:, None]
    if x.ndim != 2:
        raise ValueError(f"X must be mean spectra of shape (n_samples, bands), got {x.shape}.")
    if y.ndim != 2 or y.shape[0] != x.shape[0]:
        raise ValueError(f"Y must have shape (n_samples={x.shape[0]}, n_targets), got {y.shape}.")
    for name, a in (("X", x), ("Y", y)):
        if not np.all(np.isfinite(a)):
            raise ValueError(f"{name} contains {int(np.sum(~np.isfinite(a)))} NaN or inf values.")
    return x, y


def _check_folds(folds: np.ndarray, n_samples: int) -> np.ndarray:
    """Training fold labels, one per sample: never split 0 (the test split), at least 2 folds."""
    f = np.asarray(folds).ravel()
    if f.shape[0] != n_samples:
        raise ValueError(f"folds must have one label per sample ({n_samples}), got {f.shape[0]}.")
    if np.any(f == 0):
        raise ValueError(
            f"folds contains split 0 ({int(np.sum(f == 0))} samples): that is the test split; "
            "pass training samples only."
        )
    labels = np.unique(f)
    if labels.size < 2:
        raise ValueError(f"cross-validation needs at least 2 folds, got {labels.tolist()}.")
    return f


def cv_curve(
    X: np.ndarray,
    y: np.ndarray,
    folds: np.ndarray,
    max_components: int,
    *,
    scale_x: bool = False,
    algorithm: int = 1,
    n_jobs: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """Out-of-fold PLS1 predictions for every component count, via ikpls' fast CV.

    Args:
        X: Predictors, shape ``(n_samples, bands)``.
        y: One target, shape ``(n_samples,)``.
        folds: Fold label per sample, shape ``(n_samples,)``; each label is left out once.
        max_components: Largest component count ``A`` tried (1..A).
        scale_x: Divide X by its training-part standard deviation per band (default: centre only,
            as usual for spectra). Y is always centred and never scaled.
        algorithm: Improved Kernel PLS algorithm 1 or 2 (2 is faster when n_samples >> bands).
        n_jobs: joblib processes over folds (-1: one per fold); 1 avoids process start-up, which
            dominates for a few hundred samples.

    Returns:
        ``(pred, se_by_fold)``: ``pred`` ``(n_samples, A)`` out-of-fold predictions (column ``a``
        uses ``a + 1`` components); ``se_by_fold`` ``(n_folds, A)`` squared-error sums per fold,
        folds in sorted label order.
    """
    from ikpls.fast_cross_validation.numpy import PLS as FastCVPLS

    folds = np.asarray(folds).ravel()
    pls = FastCVPLS(algorithm=algorithm, center_X=True, center_Y=True, scale_X=scale_x, scale_Y=False)

    def keep_predictions(y_val: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
        return y_pred[:, :, 0]  # (A, n_val)

    # ikpls prints one line per call; keep library output quiet, the caller reports progress.
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "residual below machine precision": A > rank
        per_fold = pls.cross_validate(
            X,
            y[:, None],
            max_components,
            folds=folds,
            metric_function=keep_predictions,
            n_jobs=n_jobs,
            verbose=0,
        )
    pred = np.empty((folds.shape[0], max_components))
    labels = np.unique(folds)
    se = np.empty((labels.size, max_components))
    for i, label in enumerate(labels):
        idx = np.flatnonzero(folds == label)
        pred[idx] = per_fold[label].T
        se[i] = np.sum((pred[idx] - y[idx, None]) ** 2, axis=0)
    return pred, se


def choose_components(rmsecv: np.ndarray, per_fold_rmse: np.ndarray | None = None, rule: str = "min") -> int:
    """Component count from an RMSECV curve.

    Args:
        rmsecv: Pooled RMSECV for 1..A components, shape ``(A,)``.
        per_fold_rmse: RMSE of each fold, shape ``(n_folds, A)``; needed by ``"one_se"``.
        rule: ``"min"``: the count with the lowest RMSECV. ``"one_se"``: the fewest components
            whose RMSECV is within one standard error (std of the per-fold RMSEs / sqrt(folds))
            of the minimum (Hastie, Tibshirani & Friedman 2009, sec. 7.10) — more parsimonious.

    Returns:
        The chosen number of components (1-based).
    """
    curve = np.asarray(rmsecv, dtype=np.float64)
    best = int(np.argmin(curve))
    if rule == "min":
        return best + 1
    if rule == "one_se":
        if per_fold_rmse is None:
            raise ValueError("rule='one_se' needs per_fold_rmse.")
        pf = np.asarray(per_fold_rmse, dtype=np.float64)
        se = pf[:, best].std(ddof=1) / np.sqrt(pf.shape[0])
        return int(np.flatnonzero(curve <= curve[best] + se)[0]) + 1
    raise ValueError(f"rule must be one of {_SELECTION_RULES}, got {rule!r}.")


@dataclass
class PLSBaseline:
    """PLS1 per target on mean spectra, component count chosen by cross-validation.

    Args:
        max_components: Largest component count tried (clipped to bands and to the smallest
            training part minus one).
        rule: Component selection rule, ``"min"`` or ``"one_se"`` (see :func:`choose_components`).
        scale_x: Scale bands to unit variance inside each fold (default: centre only).
        algorithm: Improved Kernel PLS algorithm, 1 or 2.
        n_jobs: joblib processes for the CV over folds.

    Attributes (after :meth:`fit` or :meth:`from_dict`):
        coef: ``(bands, T)`` regression coefficients on the raw (uncentred) spectra.
        intercept: ``(T,)``, so that ``y = x @ coef + intercept``.
        x_mean: ``(bands,)`` training mean spectrum; ``y_mean``: ``(T,)``.
        n_components: Chosen component count per target.
        cv: Per target: ``rmsecv`` curve (list over 1..A), ``per_fold_rmse``, ``rmsecv_at_chosen``,
            ``n_components``, and out-of-fold predictions at the chosen count (``oof_pred``).
    """

    max_components: int = 20
    rule: str = "min"
    scale_x: bool = False
    algorithm: int = 1
    n_jobs: int = 1
    target_names: list[str] = field(default_factory=list)
    coef: np.ndarray | None = None
    intercept: np.ndarray | None = None
    x_mean: np.ndarray | None = None
    y_mean: np.ndarray | None = None
    n_components: list[int] = field(default_factory=list)
    cv: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.rule not in _SELECTION_RULES:
            raise ValueError(f"rule must be one of {_SELECTION_RULES}, got {self.rule!r}.")
        if self.max_components < 1:
            raise ValueError(f"max_components must be >= 1, got {self.max_components}.")

    # ------------------------------------------------------------------ fit / predict
    def fit(
        self,
        X: np.ndarray,
        Y: np.ndarray,
        folds: np.ndarray,
        target_names: Sequence[str] | None = None,
    ) -> PLSBaseline:
        """Choose the component count by CV over ``folds``, then refit on all given samples.

        Args:
            X: Mean spectra of the training samples, shape ``(n_samples, bands)``.
            Y: Lab values, shape ``(n_samples, n_targets)`` or ``(n_samples,)``, e.g. % fat.
            folds: Training fold per sample, shape ``(n_samples,)``, e.g. 1..5. Split 0 is the
                test split and is refused: it must never inform the model.
            target_names: Names of the ``T`` targets (default ``target0``...).

        Returns:
            ``self``, fitted.
        """
        x, y = _check_xy(X, Y)
        f = _check_folds(folds, x.shape[0])
        a_max = self._component_limit(x, f)
        names = list(target_names) if target_names is not None else [f"target{t}" for t in range(y.shape[1])]
        if len(names) != y.shape[1]:
            raise ValueError(f"target_names has {len(names)} names for {y.shape[1]} targets.")

        self.target_names = names
        self.x_mean = x.mean(axis=0)
        self.y_mean = y.mean(axis=0)
        self.coef = np.empty((x.shape[1], y.shape[1]))
        self.intercept = np.empty(y.shape[1])
        self.n_components, self.cv = [], []
        for t, name in enumerate(names):
            b, cv = self._fit_target(x, y[:, t], f, a_max, name)
            self.coef[:, t] = b
            self.intercept[t] = self.y_mean[t] - self.x_mean @ b
            self.n_components.append(cv["n_components"])
            self.cv.append(cv)
        return self

    def _component_limit(self, x: np.ndarray, folds: np.ndarray) -> int:
        """The largest component count every CV training part can carry (and ``max_components``)."""
        n, k = x.shape
        largest_fold = int(np.unique(folds, return_counts=True)[1].max())
        a_max = int(min(self.max_components, k, n - largest_fold - 1))
        if a_max < 1:
            raise ValueError(f"too few training samples ({n}) for PLS with folds of up to {largest_fold}.")
        return a_max

    def _fit_target(
        self, x: np.ndarray, y: np.ndarray, folds: np.ndarray, a_max: int, name: str
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """One target: the CV curve, the chosen count, and the coefficients refitted on all samples.

        Returns:
            ``(coef, cv)``: ``(bands,)`` coefficients on the raw spectra and the CV record of
            :attr:`cv` (curve, per-fold RMSE, chosen count, out-of-fold predictions).
        """
        labels, counts = np.unique(folds, return_counts=True)
        pred, se = cv_curve(
            x, y, folds, a_max, scale_x=self.scale_x, algorithm=self.algorithm, n_jobs=self.n_jobs
        )
        curve = np.sqrt(se.sum(axis=0) / x.shape[0])  # pooled RMSECV (A,)
        per_fold = np.sqrt(se / counts[:, None])  # (folds, A)
        a = choose_components(curve, per_fold, self.rule)
        cv = {
            "target": name,
            "folds": [lab.item() for lab in labels],
            "rmsecv": curve.tolist(),
            "per_fold_rmse": per_fold.tolist(),
            "n_components": a,
            "rmsecv_at_chosen": float(curve[a - 1]),
            "oof_pred": pred[:, a - 1].tolist(),
        }
        return self._refit(x, y, a), cv

    def _refit(self, x: np.ndarray, y: np.ndarray, n_components: int) -> np.ndarray:
        """PLS1 with ``n_components`` on all samples: ``(bands,)`` coefficients on the raw spectra."""
        from ikpls.numpy import PLS

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "residual below machine precision"
            pls = PLS(
                algorithm=self.algorithm, center_X=True, center_Y=True, scale_X=self.scale_x, scale_Y=False
            )
            pls.fit(x, y, n_components)
        b = pls.B[n_components - 1][:, 0]  # (bands,) on centred (and maybe scaled) X
        return b / pls.X_std[0] if self.scale_x else b

    def _check_fitted(self) -> None:
        if self.coef is None or self.intercept is None:
            raise RuntimeError("PLSBaseline is not fitted: call fit() or from_dict() first.")

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Predict targets from spectra.

        Args:
            X: Spectra, shape ``(n, bands)`` (mean spectra or single pixels).

        Returns:
            ``(n, T)`` float64 predictions in the targets' units.
        """
        self._check_fitted()
        x = np.asarray(X, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.coef.shape[0]:
            raise ValueError(f"X must have shape (n, {self.coef.shape[0]}) (bands), got {x.shape}.")
        return x @ self.coef + self.intercept

    def predict_cube(
        self, cube: Any, mask: np.ndarray | None = None, *, max_pixels: int = 1 << 16
    ) -> np.ndarray:
        """Pixel-by-pixel PLS maps of one scan, computed in row blocks to bound memory.

        Args:
            cube: Calibrated, preprocessed cube ``(bands, H, W)``: a numpy array or anything whose
                row slices ``cube[:, r0:r1, :]`` convert with ``np.asarray`` (zarr, dask, xarray,
                memmap), so the whole cube never has to be in memory.
            mask: Sample pixels, bool ``(H, W)``; default all pixels.
            max_pixels: Pixels per block (a block costs about ``bands * max_pixels * 8`` bytes).

        Returns:
            ``(T, H, W)`` float32 maps, NaN outside the mask. Pixels with NaN spectra inside the
            mask come out NaN (and :func:`chemmap.evaluate.metrics.map_metrics` refuses them).
        """
        self._check_fitted()
        shape = tuple(getattr(cube, "shape", ()))
        if len(shape) != 3 or shape[0] != self.coef.shape[0]:
            raise ValueError(f"cube must have shape (bands={self.coef.shape[0]}, H, W), got {shape}.")
        _, h, w = shape
        msk = np.ones((h, w), dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
        if msk.shape != (h, w):
            raise ValueError(f"mask shape {msk.shape} differs from the cube's (H, W) = {(h, w)}.")
        n_t = self.coef.shape[1]
        coef_t = np.ascontiguousarray(self.coef.T)  # (T, bands)
        out = np.full((n_t, h, w), np.nan, dtype=np.float32)
        rows = max(1, max_pixels // max(w, 1))
        for r0 in range(0, h, rows):
            r1 = min(h, r0 + rows)
            m = msk[r0:r1]
            if not m.any():
                continue
            block = np.asarray(cube[:, r0:r1, :]).astype(np.float64)  # (bands, rows, W)
            # Whole rows at once, then mask: about twice as fast as gathering masked pixels first.
            pred = np.tensordot(coef_t, block, axes=(1, 0))  # (T, rows, W)
            pred += self.intercept[:, None, None]
            out[:, r0:r1] = np.where(m, pred, np.nan)
        return out

    # ------------------------------------------------------------------ storage
    def to_dict(self, include_cv_predictions: bool = True) -> dict[str, Any]:
        """Plain, JSON-serialisable description of the fitted model (lists and numbers only).

        Args:
            include_cv_predictions: Keep the out-of-fold predictions in ``cv`` (n numbers per
                target).

        Returns:
            ``{"kind": "pls", "version": 1, "coef": [[...]] (bands x T), "intercept", "x_mean",
            "y_mean", "target_names", "n_components", "settings", "cv"}``.
        """
        self._check_fitted()
        cv = [dict(c) for c in self.cv]
        if not include_cv_predictions:
            for c in cv:
                c.pop("oof_pred", None)
        return {
            "kind": "pls",
            "version": 1,
            "coef": self.coef.tolist(),
            "intercept": self.intercept.tolist(),
            "x_mean": None if self.x_mean is None else self.x_mean.tolist(),
            "y_mean": None if self.y_mean is None else self.y_mean.tolist(),
            "target_names": list(self.target_names),
            "n_components": [int(a) for a in self.n_components],
            "settings": {
                "max_components": self.max_components,
                "rule": self.rule,
                "scale_x": self.scale_x,
                "algorithm": self.algorithm,
            },
            "cv": cv,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PLSBaseline:
        """Rebuild a fitted model from :meth:`to_dict` output (or the same keys loaded from npz).

        Raises:
            ValueError: not a PLS description, or ``coef`` and ``intercept`` disagree.
        """
        if d.get("kind") != "pls":
            raise ValueError(f"not a PLS model description: kind={d.get('kind')!r}.")
        coef = np.asarray(d["coef"], dtype=np.float64)
        if coef.ndim == 1:
            coef = coef[:, None]
        intercept = np.atleast_1d(np.asarray(d["intercept"], dtype=np.float64))
        if coef.ndim != 2 or intercept.shape != (coef.shape[1],):
            raise ValueError(
                f"coef {coef.shape} and intercept {intercept.shape} do not match (bands, T) / (T,)."
            )
        settings = dict(d.get("settings", {}))
        model = cls(
            **{k: settings[k] for k in ("max_components", "rule", "scale_x", "algorithm") if k in settings}
        )
        model.coef = coef
        model.intercept = intercept
        model.x_mean = None if d.get("x_mean") is None else np.asarray(d["x_mean"], dtype=np.float64)
        model.y_mean = None if d.get("y_mean") is None else np.asarray(d["y_mean"], dtype=np.float64)
        model.target_names = [
            str(s) for s in d.get("target_names", [f"target{t}" for t in range(coef.shape[1])])
        ]
        model.n_components = [int(a) for a in np.atleast_1d(d.get("n_components", []))]
        model.cv = list(d.get("cv", []))
        return model
