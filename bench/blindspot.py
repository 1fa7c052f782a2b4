"""A blind-spot denoiser of the ridge map, learned without labels: is there more to gain than a
median or the energy's minimiser?

The spectral map ``S`` (a ridge fit of lab values on mean spectra, folds ``--fit-folds``) is
noisy pixel by pixel: the camera's shot and read noise is independent from pixel to pixel.
A network that predicts ``S(p)`` from ``S`` around ``p`` but never sees ``S(p)`` itself
(Noise2Void: the pixels the loss uses have their input replaced by a neighbour's) learns
``E[S(p) | neighbours]``, which is ``E[truth(p) | neighbours]`` where the noise is independent
and zero-mean: a denoiser fitted to the data's own structure, from no pixel truth and no lab
value. Trained on the fit folds' scans, scored on the first ``--scans`` samples of
``--eval-folds`` against their true maps, beside the raw map and medians of it.

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


def make_net(features: int, dilations: tuple[int, ...], channels: int = 2):
    """``channels`` 2: the map (outside the mask: the scan's median) and the mask; 1: the map
    clipped to 0-100 %, as a network without the mask sees it (``--input clipped``)."""
    from torch import nn

    layers: list[nn.Module] = []
    for d in dilations:
        layers += [nn.Conv2d(channels, features, 3, padding=d, dilation=d, padding_mode="reflect"), nn.ReLU()]
        channels = features
    layers.append(nn.Conv2d(channels, 1, 1))
    return nn.Sequential(*layers)


def _inputs(s: np.ndarray, mask: np.ndarray, centre: float, scale: float, form: str = "masked") -> np.ndarray:
    """``(2, H, W)``: the map and the mask. ``clipped``: the map clipped to 0-100 % and not
    filled; the network then reads channel 0 only (the mask still picks the loss's pixels)."""
    if form == "clipped":
        return np.stack([(np.clip(s, 0.0, 100.0) - centre) / scale, mask.astype(np.float32)])
    filled = np.where(mask, s, np.median(s[mask]))
    return np.stack([(filled - centre) / scale, mask.astype(np.float32)])


def train(maps, args: argparse.Namespace, centre: float, scale: float):
    """Noise2Void on random crops of the training maps: the loss at a few mask pixels per crop,
    whose input is replaced by a random neighbour's (within 2 px)."""
    import torch

    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    seen = 1 if args.input == "clipped" else 2  # input channels the network reads
    net = make_net(args.features, tuple(args.dilations), seen)
    opt = torch.optim.Adam(net.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.steps)
    xs = [_inputs(s, m, centre, scale, args.input) for s, m, _ in maps]
    c = args.crop
    for step in range(args.steps):
        batch, targets, where = [], [], []
        for _ in range(args.batch):
            x = xs[rng.integers(len(xs))]
            _, h, w = x.shape
            y0, x0 = rng.integers(0, max(h - c, 0) + 1), rng.integers(0, max(w - c, 0) + 1)
            crop = x[:, y0 : y0 + c, x0 : x0 + c].copy()
            ys, xs_ = np.nonzero(crop[1] > 0)
            if ys.size == 0:
                continue
            pick = rng.choice(ys.size, size=max(1, int(args.share * ys.size)), replace=False)
            py, px = ys[pick], xs_[pick]
            dy, dx = rng.integers(-2, 3, size=(2, py.size))
            same = (dy == 0) & (dx == 0)
            dx[same] = 1  # never the pixel itself
            qy, qx = np.clip(py + dy, 0, crop.shape[1] - 1), np.clip(px + dx, 0, crop.shape[2] - 1)
            targets.append(torch.from_numpy(crop[0, py, px].copy()))
            crop[0, py, px] = crop[0, qy, qx]
            batch.append(torch.from_numpy(crop))
            where.append((len(batch) - 1, torch.from_numpy(py), torch.from_numpy(px)))
        x = torch.stack(batch)
        out = net(x[:, :seen])[:, 0]
        pred = torch.cat([out[i, py, px] for i, py, px in where])
        loss = ((pred - torch.cat(targets)) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % max(1, args.steps // 5) == 0:
            print(f"step {step}: loss {loss.item():.4f}", flush=True)
    return net.eval()


def main() -> None:
    import torch
    from energy import add_fold_args, fold_fit
    from scipy.ndimage import median_filter

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
    ap.add_argument(
        "--input",
        choices=("masked", "clipped"),
        default="masked",
        help="masked: the map filled outside the mask, and the mask; clipped: the map clipped to "
        "0-100 %% alone, as a head inside the model (which has no mask) would see it",
    )
    args = ap.parse_args()
    torch.set_num_threads(2)
    data, fit = fold_fit(args)
    fit_ids = data.ids(args.fit_folds)
    t0 = time.perf_counter()
    fit_maps = spectral_maps(data, fit, fit_ids)
    pix = np.concatenate([s[m] for s, m, _ in fit_maps])
    centre, scale = float(np.median(pix)), float(pix.std())
    net = train(fit_maps, args, centre, scale)
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
        with torch.no_grad():
            x = torch.from_numpy(_inputs(s, mask, centre, scale, args.input))[None]
            t = net(x[:, : 1 if args.input == "clipped" else 2])[0, 0].numpy() * scale + centre
        errors["blind-spot net"].append((np.clip(t, 0, 100) - truth)[ok])
    print(f"ridge leave-one-out RMSE {fit.loo_rmse[0]:.2f} on {len(fit_ids)} samples")
    for name, parts in errors.items():
        print(f"{name}: per-pixel RMSE {np.sqrt(np.mean(np.concatenate(parts) ** 2)):.2f}")


if __name__ == "__main__":
    main()
