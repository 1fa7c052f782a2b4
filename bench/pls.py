"""Benchmark: ikpls vs scikit-learn PLSRegression for chemmap's PLS baseline (not run in CI).

Times, on the same synthetic spectra (mean-centred, unscaled X, as in
``chemmap.models.pls``):

1. fit with A components + predict on the training samples;
2. the cross-validation that picks the component count over 5 folds for A = 1..max:
   ikpls' fast CV, a plain ikpls per-fold refit loop, and scikit-learn's
   ``cross_val_predict`` once per component count;
3. pixel-by-pixel prediction of ~1e6 pixel spectra: chemmap's ``predict_cube``
   (``x @ coef + intercept`` in row blocks), ikpls ``predict`` and sklearn ``predict``.

For every pair it prints seconds, the ratio sklearn / ikpls, and the largest absolute
difference between their predictions (they implement the same estimator).

    .venv/bin/python bench/pls.py            # full run, a few minutes on 2-16 cores
    .venv/bin/python bench/pls.py --tiny     # smoke test, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np


def synthetic_spectra(n: int, bands: int, seed: int = 0, n_latent: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Smooth, correlated spectra ``(n, bands)`` and a fat-like target ``(n,)`` linear in the latents."""
    rng = np.random.default_rng(seed)
    wl = np.linspace(0, 1, bands)
    centres = rng.uniform(0.05, 0.95, n_latent)
    widths = rng.uniform(0.03, 0.2, n_latent)
    loadings = np.exp(-(((wl[None] - centres[:, None]) / widths[:, None]) ** 2))  # (L, bands)
    scores = rng.normal(size=(n, n_latent)) * np.geomspace(1, 0.05, n_latent)
    baseline = rng.normal(0, 0.05, (n, 1)) + rng.normal(0, 0.05, (n, 1)) * wl[None]  # additive scatter
    X = 0.4 + 0.1 * scores @ loadings + baseline + 0.002 * rng.normal(size=(n, bands))
    y = 25 + scores @ rng.normal(0, 8, n_latent) + 0.5 * rng.normal(size=n)
    return X, y


def best_time(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """Smallest wall time of ``repeats`` calls and the last result."""
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def bench_fit_predict(X: np.ndarray, y: np.ndarray, A: int, repeats: int) -> dict[str, float]:
    from ikpls.numpy import PLS
    from sklearn.cross_decomposition import PLSRegression

    def ik(alg: int) -> np.ndarray:
        return PLS(algorithm=alg, scale_X=False, scale_Y=False).fit(X, y, A).predict(X, n_components=A)[:, 0]

    def sk() -> np.ndarray:
        return PLSRegression(n_components=A, scale=False).fit(X, y).predict(X).ravel()

    t1, p1 = best_time(lambda: ik(1), repeats)
    t2, p2 = best_time(lambda: ik(2), repeats)
    ts, ps = best_time(sk, repeats)
    return {
        "ikpls_alg1_s": t1,
        "ikpls_alg2_s": t2,
        "sklearn_s": ts,
        "ratio_sklearn_over_ikpls": ts / min(t1, t2),
        "max_abs_diff": float(max(np.abs(p1 - ps).max(), np.abs(p2 - ps).max())),
    }


def bench_cv(X: np.ndarray, y: np.ndarray, folds: np.ndarray, A: int, repeats: int) -> dict[str, float]:
    from ikpls.numpy import PLS
    from sklearn.cross_decomposition import PLSRegression
    from sklearn.model_selection import PredefinedSplit, cross_val_predict

    from chemmap.models.pls import cv_curve

    def ik_fast(n_jobs: int) -> np.ndarray:
        pred, _ = cv_curve(X, y, folds, A, n_jobs=n_jobs)
        return pred  # (n, A)

    def ik_loop() -> np.ndarray:
        pred = np.empty((len(y), A))
        for f in np.unique(folds):
            tr = folds != f
            m = PLS(scale_X=False, scale_Y=False).fit(X[tr], y[tr], A)
            pred[~tr] = m.predict(X[~tr])[:, :, 0].T
        return pred

    def sk_loop() -> np.ndarray:
        split = PredefinedSplit(folds - folds.min())
        cols = [
            cross_val_predict(PLSRegression(n_components=a, scale=False), X, y, cv=split).ravel()
            for a in range(1, A + 1)
        ]
        return np.stack(cols, axis=1)

    tf1, pf1 = best_time(lambda: ik_fast(1), repeats)
    tfp, pfp = best_time(lambda: ik_fast(-1), repeats)
    tl, pl = best_time(ik_loop, repeats)
    ts, ps = best_time(sk_loop, max(1, repeats // 3))
    return {
        "ikpls_fastcv_1job_s": tf1,
        "ikpls_fastcv_alljobs_s": tfp,
        "ikpls_fold_loop_s": tl,
        "sklearn_cross_val_predict_s": ts,
        "ratio_sklearn_over_ikpls_fastcv": ts / min(tf1, tfp),
        "max_abs_diff_fastcv_vs_sklearn": float(np.abs(pf1 - ps).max()),
        "max_abs_diff_fastcv_jobs": float(np.abs(pf1 - pfp).max()),
        "max_abs_diff_fastcv_vs_loop": float(np.abs(pf1 - pl).max()),
    }


def bench_pixels(X: np.ndarray, y: np.ndarray, A: int, n_pixels: int, repeats: int) -> dict[str, float]:
    from ikpls.numpy import PLS
    from sklearn.cross_decomposition import PLSRegression

    from chemmap.models.pls import PLSBaseline

    bands = X.shape[1]
    w = 1000
    h = max(1, n_pixels // w)
    rng = np.random.default_rng(1)
    # noisy single-pixel spectra around the mean spectra, as a (bands, H, W) float32 cube
    rows = X[rng.integers(0, len(X), h * w)] + 0.02 * rng.normal(size=(h * w, bands))
    cube = np.ascontiguousarray(rows.T.reshape(bands, h, w).astype(np.float32))
    mask = np.ones((h, w), dtype=bool)
    pix = cube.reshape(bands, -1).T  # (H*W, bands) float32 view-transposed

    ik = PLS(scale_X=False, scale_Y=False).fit(X, y, A)
    sk = PLSRegression(n_components=A, scale=False).fit(X, y)
    model = PLSBaseline.from_dict(
        {
            "kind": "pls",
            "coef": ik.B[A - 1],
            "intercept": (ik.Y_mean - ik.X_mean @ ik.B[A - 1]).ravel(),
        }
    )
    tc, pc = best_time(lambda: model.predict_cube(cube, mask)[0].ravel(), repeats)
    ti, pi = best_time(lambda: ik.predict(pix, n_components=A)[:, 0], repeats)
    ts, ps = best_time(lambda: sk.predict(pix).ravel(), repeats)
    return {
        "n_pixels": h * w,
        "chemmap_predict_cube_s": tc,
        "ikpls_predict_s": ti,
        "sklearn_predict_s": ts,
        "ratio_sklearn_over_ikpls": ts / ti,
        "ratio_sklearn_over_predict_cube": ts / tc,
        "max_abs_diff_ikpls_vs_sklearn": float(np.abs(pi - ps).max()),
        "max_abs_diff_cube_vs_ikpls": float(np.abs(pc - pi).max()),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark and print one block per data size; returns all numbers."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="smoke test on tiny data (seconds)")
    ap.add_argument("--components", type=int, default=20, help="max PLS components (default 20)")
    ap.add_argument("--pixels", type=int, default=1_000_000, help="pixels for the map benchmark")
    ap.add_argument("--repeats", type=int, default=3, help="best of N timings")
    ap.add_argument("--json", help="also write the numbers to this JSON file")
    args = ap.parse_args(argv)

    import ikpls
    import sklearn

    sizes = [(60, 20)] if args.tiny else [(180, 62), (180, 300), (1000, 62), (1000, 300)]
    A = min(args.components, 8) if args.tiny else args.components
    n_pixels = 20_000 if args.tiny else args.pixels
    repeats = 1 if args.tiny else args.repeats
    env = {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "ikpls": ikpls.__version__,
        "sklearn": sklearn.__version__,
        "cpus": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
    }
    print("environment:", env)
    results: dict[str, Any] = {"env": env, "components": A, "sizes": {}}
    warnings.simplefilter("ignore", UserWarning)
    for n, bands in sizes:
        X, y = synthetic_spectra(n, bands)
        folds = np.resize(np.arange(1, 6), n)
        np.random.default_rng(2).shuffle(folds)
        key = f"{n}x{bands}"
        r = {
            "fit_predict": bench_fit_predict(X, y, A, repeats),
            "cv": bench_cv(X, y, folds, A, repeats),
        }
        print(f"\n== {n} samples x {bands} bands, A = {A} ==")
        for part, vals in r.items():
            print(f"  {part}: " + ", ".join(f"{k}={v:.4g}" for k, v in vals.items()))
        results["sizes"][key] = r
    X, y = synthetic_spectra(180, 62)
    results["pixels"] = bench_pixels(X, y, A, n_pixels, repeats)
    print(f"\n== pixel maps: model from 180 x 62, {results['pixels']['n_pixels']} pixels ==")
    print("  " + ", ".join(f"{k}={v:.4g}" for k, v in results["pixels"].items()))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)
    return results


if __name__ == "__main__":
    main()
