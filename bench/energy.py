"""The denoising prior's energy minimised directly, per image: what the training objective is worth.

The U-Net with a spectral path, a ridge start and the residual and smoothness terms
(docs/loss.md) is trained to minimise, per sample, ``mean * (y - mean(T))^2 + smooth *
roughness(T) / N + residual * penalty(T - S) / N`` with ``S`` the ridge map. This script
minimises that energy with every pixel of ``T`` a free variable (Adam, no network), on the
scans of some folds of a development dataset, the ridge fitted on the other folds, and
prints the per-pixel RMSE against the true maps of the raw ridge map, of a 5 x 5 median of it
(clipped to 0-100 %) and of the minimiser. The network cannot do better than its objective's
minimum unless its own bias helps; the minimiser is also a label-free map in its own right.

    .venv/bin/python bench/energy.py DATASET.zarr --smooth 1 --residual 2 --penalty huber --delta 5

``DATASET.zarr``: a development dataset's (``<workdir>/preprocess/<key>/dataset.zarr``, made
by ``bench/screen.py`` for seeds 1 and 2): never a reporting dataset (seeds 100-104).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def mean_input(data, sample_id: str) -> np.ndarray:
    """A sample's mean model input over its masked pixels (normalised channels)."""
    total, count = np.zeros(data.n_channels), 0
    for scan in data.samples[sample_id].scans:
        mask = data.mask(scan)
        total += data.cube(scan)[...][:, mask].sum(1, dtype=np.float64)
        count += int(mask.sum())
    return data.recipe.normalize(total / count)


def minimise(s: np.ndarray, mask: np.ndarray, y: float, args: argparse.Namespace) -> np.ndarray:
    """The energy's minimiser for one image, from ``T = S``."""
    import torch

    from chemmap.models.loss import Smoothness, smooth_sum

    form = Smoothness(penalty=args.penalty, delta=args.delta)
    s_t = torch.tensor(s, dtype=torch.float64)[None, None]  # (1, 1, H, W)
    m = torch.tensor(mask, dtype=torch.float64)[None]  # (1, H, W)
    n = m.sum()
    t = s_t.clone().requires_grad_(True)
    opt = torch.optim.Adam([t], lr=args.lr)
    for _ in range(args.steps):
        opt.zero_grad()
        mean = (t[0] * m).sum() / n
        energy = (
            args.mean * (mean - y) ** 2
            + args.smooth * smooth_sum(t[0], m, form).sum() / n
            + args.residual * (form.cost(t - s_t)[0] * m).sum() / n
        )
        energy.backward()
        opt.step()
    return t.detach().numpy()[0, 0]


def main() -> None:
    from scipy.ndimage import median_filter

    from chemmap.models.ridge import ridge_loo
    from chemmap.preprocess.store import Dataset

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dataset", type=Path)
    ap.add_argument("--fit-folds", type=int, nargs="+", default=[3, 4, 5])
    ap.add_argument("--eval-folds", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--scans", type=int, default=20, help="first N samples of the evaluated folds")
    ap.add_argument("--mean", type=float, default=100.0)
    ap.add_argument("--smooth", type=float, default=1.0)
    ap.add_argument("--residual", type=float, default=2.0)
    ap.add_argument("--penalty", choices=("quadratic", "huber"), default="huber")
    ap.add_argument("--delta", type=float, default=5.0)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--lr", type=float, default=0.5)
    args = ap.parse_args()
    if 0 in args.fit_folds + args.eval_folds:
        raise SystemExit("split 0 is the test split: use CV folds only")
    data = Dataset(args.dataset)
    fit_ids = data.ids(args.fit_folds)
    fit = ridge_loo(
        np.array([mean_input(data, s) for s in fit_ids]), np.array([data.samples[s].targets for s in fit_ids])
    )
    errors: dict[str, list[np.ndarray]] = {"ridge map": [], "median 5x5": [], "energy minimiser": []}
    for sid in data.ids(args.eval_folds)[: args.scans]:
        for scan in data.samples[sid].scans:
            mask, truth = data.mask(scan), data.truth(scan)
            if truth is None:
                raise SystemExit(f"{args.dataset}: no true maps (not a synthetic dataset)")
            truth = truth[data.targets[0]] if data.targets[0] in truth else next(iter(truth.values()))
            ok = mask & np.isfinite(truth)
            s = (
                np.einsum("c,chw->hw", fit.coef[:, 0], data.model_input(data.cube(scan)[...]))
                + fit.intercept[0]
            )
            filled = np.where(mask, s, np.median(s[mask]))
            errors["ridge map"].append((s - truth)[ok])
            errors["median 5x5"].append((np.clip(median_filter(filled, size=5), 0, 100) - truth)[ok])
            t = minimise(s, mask, float(data.samples[sid].targets[0]), args)
            errors["energy minimiser"].append((t - truth)[ok])
    print(f"ridge leave-one-out RMSE {fit.loo_rmse[0]:.2f} on {len(fit_ids)} samples")
    for name, parts in errors.items():
        print(f"{name}: per-pixel RMSE {np.sqrt(np.mean(np.concatenate(parts) ** 2)):.2f}")


if __name__ == "__main__":
    main()
