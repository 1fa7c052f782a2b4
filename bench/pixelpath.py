"""What a per-pixel spectral path fitted from lab values is worth, before any U-Net (issue 15).

On a development dataset, fitted on some folds and scored on the first ``--scans`` samples
of others against their true maps (per-pixel RMSE, clipped to 0-100 %), with the dataset's
own recipe:

- ``pls``: the PLS baseline on the fit folds' mean spectra, applied pixel by pixel;
- ``mlp, smooth S``: the per-pixel MLP path of ``train.spectral_init: pixel``
  (:mod:`chemmap.train.pathfit`), fitted from the lab values with neighbour smoothness S;
- ``mlp on pixel truth``: the same MLP fitted on the fit folds' true maps, pixel by pixel: not
  a competitor (it uses what no user has), the headroom of a 1x1 model on these spectra;

each also through the blind-spot denoiser of ``pls_n2v`` (:mod:`chemmap.evaluate.blindspot`,
trained on that method's maps of the fit folds), and each method's sample means against the
lab values.

    .venv/bin/python bench/pixelpath.py <workdir>/preprocess/<key>/dataset.zarr   # ~25 min on 2 cores

``dataset.zarr``: a development dataset's (``bench/screen.py`` makes them for seeds 1 and 2),
never a reporting dataset (seeds 100-104).
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


def _truth(data, scan: str) -> np.ndarray:
    truth = data.truth(scan)
    if truth is None:
        raise SystemExit("no true maps (not a synthetic dataset)")
    return truth[data.targets[0]] if data.targets[0] in truth else next(iter(truth.values()))


def _mlp_on_truth(data, ids: list[str], hidden: int, steps: int, seed: int):
    """The path's MLP fitted to the true maps of ``ids`` pixel by pixel (headroom, not a method)."""
    import torch

    from chemmap.models.unet import spectral_path

    torch.manual_seed(seed)
    xs, ts = [], []
    for sid in ids:
        for scan in data.samples[sid].scans:
            ok = data.mask(scan) & np.isfinite(_truth(data, scan))
            xs.append(data.model_input(data.cube(scan)[...])[:, ok].T)
            ts.append(_truth(data, scan)[ok])
    x, t = torch.from_numpy(np.concatenate(xs).astype(np.float32)), torch.from_numpy(np.concatenate(ts))
    path = spectral_path(x.shape[1], 1, hidden)
    with torch.no_grad():
        path[-1].bias.fill_(float(t.mean()))
    opt = torch.optim.AdamW(path.parameters(), 1e-3, weight_decay=0.01)
    for _ in range(steps):
        i = torch.randint(0, len(x), (4096,))
        loss = ((path(x[i][:, :, None, None])[:, 0, 0, 0] - t[i]) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return path


def _rmse(parts: list[np.ndarray]) -> float:
    """Pooled RMSE of error arrays; NaN for none (a column not computed)."""
    return float(np.sqrt(np.mean(np.concatenate(parts) ** 2))) if parts else float("nan")


def _path_map(path, data, scan: str) -> np.ndarray:
    import torch

    x = torch.from_numpy(data.model_input(data.cube(scan)[...]).astype(np.float32))[None]
    with torch.no_grad():
        out = path(x)[0, 0].numpy().astype(np.float64)
    return np.where(data.mask(scan), out, np.nan)  # as the evaluation's PLS maps: NaN off the sample


def main() -> None:
    import torch
    from energy import add_fold_args

    from chemmap.config import PathFitSection
    from chemmap.evaluate.blindspot import BlindSpotConfig, train_map_denoiser
    from chemmap.evaluate.stage import fit_pls, mean_spectra
    from chemmap.models.unet import spectral_path
    from chemmap.preprocess.store import Dataset
    from chemmap.train.pathfit import draw_pixels, fit_path

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_fold_args(ap)
    ap.add_argument("--smooth", type=float, nargs="+", default=[0.0, 1.0])
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--steps", type=int, default=1200, help="the path's fit (train.path_fit.steps)")
    ap.add_argument("--pixels", type=int, default=1024, help="drawn per scan (train.path_fit.pixels)")
    ap.add_argument("--n2v-steps", type=int, default=1500, help="the blind-spot denoiser's; 0: none")
    ap.add_argument("--no-oracle", action="store_true", help="skip the MLP fitted on pixel truth")
    args = ap.parse_args()
    if 0 in args.fit_folds + args.eval_folds:
        raise SystemExit("split 0 is the test split: use CV folds only")
    torch.set_num_threads(2)
    started = time.perf_counter()
    data = Dataset(args.dataset)
    fit_ids, eval_ids = data.ids(args.fit_folds), data.ids(args.eval_folds)[: args.scans]
    pls = fit_pls(data, mean_spectra(data), data.targets[:1], fit_ids)
    maps = {"pls": lambda scan: pls.predict_cube(data.cube(scan)[...], data.mask(scan))[0].astype(np.float64)}
    draws = draw_pixels(data, fit_ids, args.pixels, seed=0)
    for smooth in args.smooth:
        torch.manual_seed(0)
        path = spectral_path(data.n_channels, 1, args.hidden)
        fit_path(path, draws, PathFitSection(steps=args.steps, smooth=smooth), seed=0)
        maps[f"mlp, smooth {smooth:g}"] = lambda scan, p=path: _path_map(p, data, scan)
        print(f"fitted smooth {smooth:g} ({time.perf_counter() - started:.0f} s)", flush=True)
    if not args.no_oracle:
        oracle = _mlp_on_truth(data, fit_ids, args.hidden, args.steps, seed=0)
        maps["mlp on pixel truth (headroom)"] = lambda scan: _path_map(oracle, data, scan)
    rows = []
    for name, make in maps.items():
        denoiser = None
        if args.n2v_steps:
            fit_maps = [(make(s), data.mask(s)) for sid in fit_ids for s in data.samples[sid].scans]
            denoiser = train_map_denoiser(fit_maps, BlindSpotConfig(steps=args.n2v_steps))
        raw, den, means = [], [], []
        for sid in eval_ids:
            for scan in data.samples[sid].scans:
                mask, truth = data.mask(scan), _truth(data, scan)
                ok = mask & np.isfinite(truth)
                m = make(scan)
                raw.append(np.clip(m, 0, 100)[ok] - truth[ok])
                if denoiser is not None:
                    den.append(np.clip(denoiser.apply(m), 0, 100)[ok] - truth[ok])
                means.append(m[mask].mean() - data.samples[sid].targets[0])
        rows.append((name, _rmse(raw), _rmse(den), float(np.sqrt(np.mean(np.square(means))))))
        print(f"scored {name} ({time.perf_counter() - started:.0f} s)", flush=True)
    scored = f"scored on {len(eval_ids)} samples of folds {args.eval_folds}"
    print(f"\n{args.dataset}: fitted on folds {args.fit_folds}, {scored}")
    print(f"{'map':34s} {'px RMSE':>8s} {'+ n2v':>8s} {'sample-mean RMSE':>17s}")
    for name, a, b, c in rows:
        print(f"{name:34s} {a:8.2f} {b:8.2f} {c:17.2f}")


if __name__ == "__main__":
    main()
