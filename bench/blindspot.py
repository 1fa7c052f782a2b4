"""A blind-spot denoiser of the ridge map, learned without labels: is there more to gain than a
median or the energy's minimiser?

The spectral map ``S`` (a ridge fit of lab values on mean spectra, folds ``--fit-folds``) is
noisy pixel by pixel: the camera's shot and read noise is independent from pixel to pixel.
A network that predicts ``S(p)`` from ``S`` around ``p`` but never sees ``S(p)`` itself
(Noise2Void: the pixels the loss uses have their input replaced by a neighbour's) learns
``E[S(p) | neighbours]``, which is ``E[truth(p) | neighbours]`` where the noise is independent
and zero-mean: a denoiser fitted to the data's own structure, from no pixel truth and no lab
value. Trained on the fit folds' scans (:mod:`chemmap.evaluate.blindspot`: the map clipped to
0-100 %, no mask channel), scored on the first ``--scans`` samples of ``--eval-folds``
against their true maps, beside the raw map and medians of it.

    .venv/bin/python bench/blindspot.py DATASET.zarr --steps 1500

``DATASET.zarr``: a development dataset (``bench/screen.py`` seeds 1 and 2), never a reporting
dataset (seeds 100-104). Nothing here reads the test split (split 0).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def spectral_maps(data, fit, ids):
    """``[(S, mask, truth or None)]`` for every scan of ``ids``: the ridge map, float32."""
    from energy import ridge_map

    out = []
    for sid in ids:
        for scan in data.samples[sid].scans:
            mask = data.mask(scan)
            s = ridge_map(data, fit, scan)
            truth = data.truth(scan)
            if truth is not None:
                truth = truth[data.targets[0]] if data.targets[0] in truth else next(iter(truth.values()))
            out.append((s.astype(np.float32), mask, truth))
    return out


def main() -> None:
    import torch
    from energy import add_fold_args, fold_fit
    from scipy.ndimage import median_filter

    from chemmap.evaluate.blindspot import BlindSpotConfig, train_map_denoiser

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_fold_args(ap)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--crop", type=int, default=64)
    ap.add_argument("--share", type=float, default=0.02, help="share of a crop's mask pixels the loss uses")
    ap.add_argument("--features", type=int, default=32)
    ap.add_argument("--dilations", type=int, nargs="+", default=[1, 2, 4, 8, 4, 2, 1])
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(2)
    cfg = BlindSpotConfig(
        steps=args.steps, batch=args.batch, crop=args.crop, share=args.share, features=args.features,
        dilations=tuple(args.dilations), lr=args.lr, seed=args.seed,
    )  # fmt: skip
    data, fit = fold_fit(args)
    fit_ids = data.ids(args.fit_folds)
    t0 = time.perf_counter()
    fit_maps = spectral_maps(data, fit, fit_ids)
    net = train_map_denoiser(
        [(s, m) for s, m, _ in fit_maps],
        cfg,
        lambda step, loss: print(f"step {step}: loss {loss:.4f}", flush=True),
    )
    print(f"trained on {len(fit_maps)} scans in {time.perf_counter() - t0:.0f} s")
    errors: dict[str, list[np.ndarray]] = {"ridge map": [], "blind-spot net": []}
    for size in (3, 5, 7, 9):
        errors[f"median {size}x{size}"] = []
    for s, mask, truth in spectral_maps(data, fit, data.ids(args.eval_folds)[: args.scans]):
        if truth is None:
            raise SystemExit(f"{args.dataset}: no true maps (not a synthetic dataset)")
        ok = mask & np.isfinite(truth)
        errors["ridge map"].append((s - truth)[ok])
        filled = np.where(mask, s, np.median(s[mask]))
        for size in (3, 5, 7, 9):
            errors[f"median {size}x{size}"].append(
                (np.clip(median_filter(filled, size=size), 0, 100) - truth)[ok]
            )
        errors["blind-spot net"].append((np.clip(net.apply(s), 0, 100) - truth)[ok])
    print(f"ridge leave-one-out RMSE {fit.loo_rmse[0]:.2f} on {len(fit_ids)} samples")
    for name, parts in errors.items():
        e = np.concatenate(parts)
        rmse, sq = np.sqrt(np.mean(e**2)), np.sum(e**2)
        print(f"{name}: per-pixel RMSE {rmse:.2f} ({e.size} px, squared errors {sq:.6g})")


if __name__ == "__main__":
    main()
