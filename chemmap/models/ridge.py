"""Ridge regression with its penalty chosen by leave-one-out, for the spectral path's start.

A U-Net with ``spectral_path`` can start as a per-pixel linear map of its input spectra
(:meth:`chemmap.models.unet.UNet.start_from_spectral`). Its coefficients come from the
samples' mean spectra and lab values: a linear map of the pixels has the linear map of their
mean as its mean, so a regression on mean spectra is the per-pixel map whose masked mean
fits the lab values (the reason per-pixel PLS maps exist). ``train.spectral_init: ridge``
fits it here, ``pls`` with the evaluation's PLS baseline (:mod:`chemmap.models.pls`). Ridge's
leave-one-out error has a closed form: for each penalty on a log grid, the hat matrix's
diagonal gives every sample's held-out residual without refitting, and the penalty with the
smallest pooled leave-one-out error is taken.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PENALTIES = np.logspace(-6, 3, 37)  # relative to the largest squared singular value


@dataclass(frozen=True)
class Ridge:
    """A fitted ridge regression ``y = x @ coef + intercept``.

    Attributes:
        coef: ``(C, T)``; intercept: ``(T,)``.
        penalty: the chosen penalty per target, relative to the largest squared singular value.
        loo_rmse: ``(T,)`` pooled leave-one-out RMSE at the chosen penalty.
    """

    coef: np.ndarray
    intercept: np.ndarray
    penalty: np.ndarray
    loo_rmse: np.ndarray


def ridge_loo(x: np.ndarray, y: np.ndarray, penalties: np.ndarray = PENALTIES) -> Ridge:
    """Ridge regression of ``y`` ``(n, T)`` on ``x`` ``(n, C)``, each target's penalty by leave-one-out.

    Raises:
        ValueError: with fewer than 3 samples, mismatched rows or non-finite values.
    """
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    y = y[:, None] if y.ndim == 1 else y
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0] or x.shape[0] < 3:
        raise ValueError(f"expected x (n, C) and y (n, T) with n >= 3, got {x.shape} and {y.shape}.")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("ridge_loo: x and y must be finite.")
    n = x.shape[0]
    xm, ym = x.mean(0), y.mean(0)
    u, s, vt = np.linalg.svd(x - xm, full_matrices=False)  # (n, r), (r,), (r, C)
    uy = u.T @ (y - ym)  # (r, T)
    coefs, chosen, errors = [], [], []
    for t in range(y.shape[1]):
        best = None
        for rel in penalties:
            lam = rel * s[0] ** 2
            shrink = s**2 / (s**2 + lam)  # (r,)
            fit = u @ (shrink * uy[:, t])  # (n,) centred fitted values
            hat = (u**2) @ shrink + 1.0 / n  # (n,) hat diagonal, the intercept's 1/n included
            loo = (y[:, t] - ym[t] - fit) / (1.0 - hat)
            rmse = float(np.sqrt(np.mean(loo**2)))
            if best is None or rmse < best[0]:
                best = (rmse, rel, vt.T @ (s / (s**2 + lam) * uy[:, t]))
        errors.append(best[0])
        chosen.append(best[1])
        coefs.append(best[2])
    coef = np.stack(coefs, axis=1)  # (C, T)
    return Ridge(coef, ym - xm @ coef, np.asarray(chosen), np.asarray(errors))
