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
    return data.recipe.normalize(data.mean_spectrum(sample_id))


def add_fold_args(ap: argparse.ArgumentParser) -> None:
    """The dataset and the folds: the ridge fitted on some, maps scored on others."""
    ap.add_argument("dataset", type=Path)
    ap.add_argument("--fit-folds", type=int, nargs="+", default=[3, 4, 5])
    ap.add_argument("--eval-folds", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--scans", type=int, default=20, help="first N samples of the evaluated folds")


def fold_fit(args: argparse.Namespace):
    """``(dataset, the ridge fit of the fit folds' lab values on their mean inputs)``; never split 0."""
    from chemmap.models.ridge import ridge_loo
    from chemmap.preprocess.store import Dataset

    if 0 in args.fit_folds + args.eval_folds:
        raise SystemExit("split 0 is the test split: use CV folds only")
    data = Dataset(args.dataset)
    fit_ids = data.ids(args.fit_folds)
    fit = ridge_loo(
        np.array([mean_input(data, s) for s in fit_ids]), np.array([data.samples[s].targets for s in fit_ids])
    )
    return data, fit


def ridge_map(data, fit, scan: str) -> np.ndarray:
    """The ridge fit's per-pixel map of one scan ``(H, W)``, the first target."""
    return np.einsum("c,chw->hw", fit.coef[:, 0], data.model_input(data.cube(scan)[...])) + fit.intercept[0]


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


def energies(t: np.ndarray, s: np.ndarray, mask: np.ndarray, args: argparse.Namespace) -> tuple[float, float]:
    """The weighted smoothness and residual energies of map ``t`` against the spectral map ``s``."""
    import torch

    from chemmap.models.loss import Smoothness, smooth_sum

    form = Smoothness(penalty=args.penalty, delta=args.delta)
    tt, st = (torch.tensor(a, dtype=torch.float64)[None, None] for a in (t, s))
    m = torch.tensor(mask, dtype=torch.float64)[None]
    n = m.sum()
    smooth = float(smooth_sum(tt[0], m, form).sum() / n)
    return args.smooth * smooth, args.residual * float((form.cost(tt - st)[0] * m).sum() / n)


def fold_model(train_dir: Path, fold: int, data):
    """A trained fold's U-Net (float64, eval mode) from a training stage folder."""
    import torch
    import yaml

    from chemmap.models.unet import UNet, UNetConfig
    from chemmap.train.trainer import NOT_UNET

    section = yaml.safe_load((train_dir / "config.yaml").read_text())["model"]
    given = {k: v for k, v in section.items() if k not in NOT_UNET and v is not None}
    net = UNet(UNetConfig(in_channels=data.n_channels, out_channels=len(data.targets), **given))
    state = torch.load(train_dir / f"fold{fold}" / "best.pt", weights_only=True)
    net.load_state_dict(state.get("model", state))
    return net.double().eval()


def main() -> None:
    from scipy.ndimage import median_filter

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_fold_args(ap)
    ap.add_argument("--mean", type=float, default=100.0)
    ap.add_argument("--smooth", type=float, default=1.0)
    ap.add_argument("--residual", type=float, default=2.0)
    ap.add_argument("--penalty", choices=("quadratic", "huber"), default="huber")
    ap.add_argument("--delta", type=float, default=5.0)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--lr", type=float, default=0.5)
    ap.add_argument("--train-dir", type=Path, help="a training stage: also score its fold model")
    ap.add_argument("--fold", type=int, default=1, help="with --train-dir: the fold model (validated on it)")
    args = ap.parse_args()
    data, fit = fold_fit(args)
    errors: dict[str, list[np.ndarray]] = {"ridge map": [], "median 5x5": [], "energy minimiser": []}
    spent: dict[str, list[tuple[float, float]]] = {}
    net = fold_model(args.train_dir, args.fold, data) if args.train_dir else None
    if net is not None and net.spectral is None:
        raise SystemExit(f"{args.train_dir}: the model has no spectral path")
    for sid in data.ids(args.eval_folds)[: args.scans]:
        for scan in data.samples[sid].scans:
            mask, truth = data.mask(scan), data.truth(scan)
            if truth is None:
                raise SystemExit(f"{args.dataset}: no true maps (not a synthetic dataset)")
            truth = truth[data.targets[0]] if data.targets[0] in truth else next(iter(truth.values()))
            ok = mask & np.isfinite(truth)
            s = ridge_map(data, fit, scan)
            filled = np.where(mask, s, np.median(s[mask]))
            errors["ridge map"].append((s - truth)[ok])
            errors["median 5x5"].append((np.clip(median_filter(filled, size=5), 0, 100) - truth)[ok])
            y = float(data.samples[sid].targets[0])
            t = minimise(s, mask, y, args)
            errors["energy minimiser"].append((t - truth)[ok])
            if net is not None:
                _score_model(net, data, scan, mask, y, truth, ok, args, errors, spent)
    print(f"ridge leave-one-out RMSE {fit.loo_rmse[0]:.2f} on {len(data.ids(args.fit_folds))} samples")
    for name, parts in errors.items():
        print(f"{name}: per-pixel RMSE {np.sqrt(np.mean(np.concatenate(parts) ** 2)):.2f}")
    for name, values in spent.items():
        smooth, residual = np.mean(values, axis=0)
        print(f"{name}: weighted smoothness {smooth:.1f}, residual {residual:.1f} per image")


def _score_model(net, data, scan, mask, y, truth, ok, args, errors, spent) -> None:
    """The fold model's map, and the minimiser started from the model's own spectral map."""
    import torch

    from chemmap.models.tiling import predict_full

    x = torch.from_numpy(data.model_input(data.cube(scan)[...]).astype(np.float64))  # (C, H, W)
    with torch.no_grad():
        t_net = predict_full(net, x)[0].numpy()
        s_net = net.spectral(x[None])[0, 0].numpy()
    t_min = minimise(s_net, mask, y, args)
    for name, t in (("U-Net", t_net), ("minimiser from the U-Net's spectral map", t_min)):
        errors.setdefault(name, []).append((t - truth)[ok])
        spent.setdefault(name, []).append(energies(t, s_net, mask, args))


if __name__ == "__main__":
    main()
