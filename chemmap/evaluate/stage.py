"""The evaluation stage: the fold ensemble against the paper's PLS baseline on the test split.

Both models see the same preprocessed data: PLS is fitted on the mean spectra of the
training samples (splits 1-5, components by CV over those folds) and applied pixel by
pixel, as the paper does; the U-Net ensemble is exactly what the registry will hold.
The report (metrics.json, summary tables, maps, scatter, residuals) goes into the stage
folder and into the training run in MLflow.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from chemmap.config import ChemmapConfig, dump_config
from chemmap.errors import InputError
from chemmap.files import write_json_atomic
from chemmap.stages import StageDir, stage_dir

N_MAP_FIGURES = 4  # test samples drawn as map figures
N_BOOT = 10000


def _truth_dir(raw_path: str) -> Path | None:
    """Synthetic data keep true maps in ``<root>/truth/<scan_id>.npz`` (root = the scanner folder)."""
    p = Path(raw_path)
    for parent in list(p.parents)[:3]:  # <root>/<id>/capture/<id>.hdr: no further up than the root
        if (parent / "truth").is_dir():
            return parent / "truth"
    return None


def _mean_spectrum(cube: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, int]:
    return cube[:, mask].sum(axis=1, dtype=np.float64), int(mask.sum())


def evaluate_stage(
    cfg: ChemmapConfig, dataset: StageDir, training: StageDir, *, progress: bool = True, log=print
) -> StageDir:
    """Score the test split with the U-Net ensemble and with PLS; write and log the report."""
    import torch

    from chemmap import tracking
    from chemmap.evaluate.metrics import map_metrics, paired_bootstrap, regression_metrics
    from chemmap.evaluate.pls import PLSBaseline
    from chemmap.evaluate.report import write_report
    from chemmap.figures import plot_maps, plot_residuals, plot_scatter
    from chemmap.inference.ensemble import load_ensemble, predict_map
    from chemmap.models.tiling import model_geometry
    from chemmap.train.data import ScanView, ZarrSamples

    if not training.complete:
        raise InputError(f"no finished training at {training.path}; run `chemmap train` first")
    section = {"n_boot": N_BOOT, "seed": cfg.seed, "targets": cfg.targets}
    stage = stage_dir(cfg.workdir_path, "evaluate", section, [dataset.key, training.key])
    if stage.complete:
        log(f"evaluate: done already ({stage.path})")
        return stage
    out = stage.begin()
    data = ZarrSamples(dataset.path / "dataset.zarr")
    model, card = load_ensemble(training.path)
    geometry = model_geometry(model.members[0])
    torch.set_num_threads(max(1, torch.get_num_threads()))

    # Mean spectra of every sample (physical units, as stored) for PLS.
    spectra: dict[str, np.ndarray] = {}
    for sid, info in data.samples.items():
        tot, n = np.zeros(data.n_channels), 0
        for scan in info.scans:
            s, k = _mean_spectrum(data.cube(scan)[...], data.mask(scan))
            tot, n = tot + s, n + k
        spectra[sid] = tot / max(n, 1)
    train_ids = data.ids([s for s in range(1, 100)])
    test_ids = data.ids([0])
    if len(test_ids) < 2:
        raise InputError(f"{dataset.path}: the test split (0) has {len(test_ids)} samples; need at least 2")
    targets = data.targets
    ti = [targets.index(t) for t in cfg.targets]
    X = np.stack([spectra[s] for s in train_ids])
    Y = np.array([[data.samples[s].targets[i] for i in ti] for s in train_ids])
    folds = np.array([data.samples[s].split for s in train_ids])
    pls = PLSBaseline(max_components=min(20, X.shape[1]))
    pls.fit(X, Y, folds, target_names=cfg.targets)
    write_json_atomic(out / "pls.json", pls.to_dict(include_cv_predictions=False))

    y_test = np.array([[data.samples[s].targets[i] for i in ti] for s in test_ids])
    unet_pred = np.zeros_like(y_test)
    pls_pred = pls.predict(np.stack([spectra[s] for s in test_ids]))
    per_map: dict[str, list[dict[str, float]]] = {"unet": [], "pls": []}
    figures: list[Path] = []
    from rich.progress import track

    for k, sid in enumerate(track(test_ids, description="evaluate", disable=not progress)):
        tot, n = np.zeros(len(ti)), 0
        for scan in data.samples[sid].scans:
            mask = data.mask(scan)
            view = ScanView(data, scan)
            umap = predict_map(model, view.full(), geometry).numpy()[ti]  # (T, H, W)
            pmap = pls.predict_cube(data.cube(scan), mask)  # (T, H, W)
            umap = np.where(mask[None], umap, np.nan).astype(np.float32)
            tot += np.nansum(umap, axis=(1, 2))
            n += int(mask.sum())
            truth = None
            tdir = _truth_dir(next(s["raw"] for s in data.root.attrs["scans"] if s["scan_id"] == scan))
            if tdir is not None and (tdir / f"{scan}.npz").is_file():
                with np.load(tdir / f"{scan}.npz", allow_pickle=False) as z:
                    truth = {t: z[t] for t in cfg.targets if t in z.files}
            for name, m in (("unet", umap), ("pls", pmap)):
                for j, t in enumerate(cfg.targets):
                    tm = truth.get(t) if truth else None
                    r = map_metrics(m[j], mask, tm, name=f"{name} map of {scan}")
                    per_map[name].append({"target": t, **r})
            if k < N_MAP_FIGURES:
                maps = {"U-Net": umap[0], "PLS": pmap[0]}
                if truth and cfg.targets[0] in truth:
                    maps["truth"] = truth[cfg.targets[0]]
                figures.append(
                    plot_maps(
                        maps,
                        out / f"map_{scan}.png",
                        title=f"{scan}: {cfg.targets[0]} (lab {y_test[k, 0]:.1f} %)",
                    )
                )
        unet_pred[k] = tot / max(n, 1)

    metrics: dict[str, dict[str, Any]] = {}
    for name, pred in (("unet", unet_pred), ("pls", pls_pred)):
        m: dict[str, Any] = {}
        for j, t in enumerate(cfg.targets):
            reg = regression_metrics(y_test[:, j], pred[:, j])
            maps = [r for r in per_map[name] if r["target"] == t]
            for key in ("spatial_correlated_share", "out_of_range_fraction", "pixel_rmse"):
                vals = [r[key] for r in maps if key in r and r[key] is not None]
                if vals:
                    reg[key] = float(np.mean(vals))
            m[t] = reg
        metrics[name] = m if len(cfg.targets) > 1 else m[cfg.targets[0]]
    train_summary = training.summary()
    rmsecv_unet = train_summary["rmsecv"]
    rmsecv_pls = float(pls.cv[0]["rmsecv_at_chosen"])
    boot = paired_bootstrap(y_test[:, 0], unet_pred[:, 0], pls_pred[:, 0], n_boot=N_BOOT, seed=cfg.seed)
    first = cfg.targets[0]
    figures.append(
        plot_scatter(y_test[:, 0], {"U-Net": unet_pred[:, 0], "PLS": pls_pred[:, 0]}, out / "scatter.png")
    )
    figures.append(
        plot_residuals(y_test[:, 0], {"U-Net": unet_pred[:, 0], "PLS": pls_pred[:, 0]}, out / "residuals.png")
    )
    lc = training.path / "learning_curve.png"
    extra = {
        "n_test": len(test_ids),
        "rmsecv": {"unet": rmsecv_unet, "pls": rmsecv_pls},
        "pls_components": pls.n_components,
        "bootstrap_rmse_unet_minus_pls": boot,
        "relative_rmse_change": (metrics["unet"].get("rmse", math.nan) if len(cfg.targets) == 1 else math.nan)
        / (metrics["pls"].get("rmse", math.nan) if len(cfg.targets) == 1 else math.nan)
        - 1.0,
        "dataset_key": dataset.key,
        "training_key": training.key,
        "test_predictions": {
            "sample_id": test_ids,
            "reference": y_test[:, 0].tolist(),
            "unet": unet_pred[:, 0].tolist(),
            "pls": pls_pred[:, 0].tolist(),
        },
    }
    notes = (
        f"Test split: {len(test_ids)} samples, target {first}. U-Net = mean of {len(card['weights'])} fold "
        f"models; PLS = {pls.n_components[0]} components on mean spectra, applied per pixel. "
        f"Paired bootstrap of RMSE(U-Net) - RMSE(PLS): {boot['estimate']:.3f} "
        f"[{boot['ci_low']:.3f}, {boot['ci_high']:.3f}] (95 %)."
    )
    paths = write_report(
        out, metrics, title=f"chemmap evaluation: {cfg.name}", figures=figures, extra=extra, notes=notes
    )
    if lc.is_file():
        (out / "learning_curve.png").write_bytes(lc.read_bytes())

    run_id = train_summary["mlflow_run_id"]
    c = tracking.client(train_summary["tracking_uri"])
    flat = {
        f"test_{name}_{k}": v
        for name, mm in metrics.items()
        for k, v in (mm.items() if len(cfg.targets) == 1 else mm[first].items())
        if isinstance(v, (int, float)) and math.isfinite(v)
    }
    flat["test_rmse_diff_ci_low"] = boot["ci_low"]
    flat["test_rmse_diff_ci_high"] = boot["ci_high"]
    tracking.log_metrics(c, run_id, flat, step=0)
    c.log_artifacts(run_id, str(out), artifact_path="evaluation")
    summary = {
        "metrics": str(paths["json"]),
        "report": str(paths["html"]),
        "rmse_unet": flat.get("test_unet_rmse"),
        "rmse_pls": flat.get("test_pls_rmse"),
        "bootstrap": boot,
        "mlflow_run_id": run_id,
    }
    stage.finish(summary, dump_config(cfg))
    log(
        f"evaluate: test RMSE U-Net {summary['rmse_unet']:.3f} vs PLS {summary['rmse_pls']:.3f} "
        f"(diff {boot['estimate']:+.3f}, 95 % CI [{boot['ci_low']:+.3f}, {boot['ci_high']:+.3f}])"
    )
    return stage
