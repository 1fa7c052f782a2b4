"""The evaluation stage: the fold ensemble against the paper's PLS baseline on the test split.

Both models see the same preprocessed data, read through :class:`chemmap.preprocess.store.Dataset`
only: PLS is fitted on the mean spectra of the training samples (splits 1-5, components by CV
over those folds) and applied pixel by pixel, as the paper does; the U-Net ensemble is exactly
what the registry will hold (:mod:`chemmap.inference.ensemble`) and sees the stored cube through
:meth:`Dataset.model_input`. Maps are compared with the true maps the dataset carries
(synthetic data). The report (metrics.json, summary tables, maps, scatter, residuals) goes
into the stage folder and into the training run in MLflow.

The steps, in order: :func:`mean_spectra`, :func:`fit_pls`, :func:`score_test_split` (one
test sample at a time: :func:`score_sample`), :func:`aggregate_metrics`, the paired
bootstrap, :func:`write_evaluation_report`, :func:`log_to_mlflow`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.progress import track

from chemmap import tracking
from chemmap.config import ChemmapConfig, dump_config
from chemmap.errors import InputError
from chemmap.evaluate.metrics import map_metrics, paired_bootstrap, regression_metrics
from chemmap.evaluate.pls import PLSBaseline
from chemmap.evaluate.report import write_report
from chemmap.figures import plot_maps, plot_residuals, plot_scatter
from chemmap.files import write_bytes_atomic, write_json_atomic
from chemmap.inference.ensemble import MapEnsemble, load_ensemble, predict_map
from chemmap.models.tiling import Geometry, model_geometry
from chemmap.preprocess.store import Dataset
from chemmap.stages import StageDir, stage_dir

__all__ = [
    "EvaluatedModels",
    "Evaluation",
    "SampleScore",
    "ScanMaps",
    "StoredInput",
    "TestScores",
    "aggregate_metrics",
    "bootstrap_first_target",
    "evaluate_ensemble",
    "fit_pls",
    "flat_metrics",
    "lab_values",
    "load_models",
    "log_to_mlflow",
    "mean_spectra",
    "score_sample",
    "score_scan",
    "score_test_split",
    "write_evaluation_report",
]

N_MAP_FIGURES = 4  # test samples drawn as map figures
N_BOOT = 10000
MODELS = ("unet", "pls")  # names in metrics.json, in this order
MODEL_LABELS = {"unet": "U-Net", "pls": "PLS"}  # names in figures
MAP_KEYS = ("spatial_correlated_share", "out_of_range_fraction", "pixel_rmse")  # averaged over maps

Log = Callable[[str], None]


# ----------------------------------------------------------------------------- inputs


class StoredInput:
    """Model input of a stored scan, ``(C, H, W)``: :meth:`Dataset.model_input` of what is read.

    Reads like an array (``shape``, ``x[...]``, ``x[:, y0:y1, x0:x1]``), so a large scan is
    scored tile by tile without ever being read whole.
    """

    def __init__(self, data: Dataset, scan_id: str) -> None:
        self.data = data
        self.cube = data.cube(scan_id)
        self.shape = tuple(self.cube.shape)

    def __getitem__(self, key: Any) -> np.ndarray:
        return self.data.model_input(np.asarray(self.cube[key]))


def mean_spectra(data: Dataset) -> dict[str, np.ndarray]:
    """Mean spectrum of every sample over the masked pixels of all its scans.

    Returns:
        ``{sample_id: (C,)}`` float64, in the stored (physical) units, not normalised.
    """
    spectra: dict[str, np.ndarray] = {}
    for sid, info in data.samples.items():
        total, count = np.zeros(data.n_channels), 0
        for scan in info.scans:
            mask = data.mask(scan)
            total = total + data.cube(scan)[...][:, mask].sum(axis=1, dtype=np.float64)
            count += int(mask.sum())
        spectra[sid] = total / max(count, 1)
    return spectra


def _target_index(data: Dataset, targets: Sequence[str]) -> list[int]:
    """Positions of ``targets`` among the dataset's targets (lab values and model outputs)."""
    missing = [t for t in targets if t not in data.targets]
    if missing:
        raise InputError(f"{data.path}: targets {missing} are not in the dataset (it has {data.targets})")
    return [data.targets.index(t) for t in targets]


def lab_values(data: Dataset, sample_ids: Sequence[str], targets: Sequence[str]) -> np.ndarray:
    """Lab values ``(n_samples, T)`` float64 of ``targets``, in the order of ``sample_ids``."""
    index = _target_index(data, targets)
    return np.array([[data.samples[s].targets[i] for i in index] for s in sample_ids])


def fit_pls(data: Dataset, spectra: dict[str, np.ndarray], targets: Sequence[str]) -> PLSBaseline:
    """The paper's baseline on the training samples' mean spectra (every split but 0, the test)."""
    train_ids = data.ids([s for s in data.splits if s != 0])
    X = np.stack([spectra[s] for s in train_ids])
    Y = lab_values(data, train_ids, targets)
    folds = np.array([data.samples[s].split for s in train_ids])
    return PLSBaseline(max_components=min(20, X.shape[1])).fit(X, Y, folds, target_names=list(targets))


# ----------------------------------------------------------------------------- scoring


@dataclass(frozen=True)
class EvaluatedModels:
    """The two models compared, ready to score scans.

    Attributes:
        unet: the fold ensemble; ``channels`` are its outputs for the evaluated targets.
        geometry: its tiling geometry (for scans scored in tiles).
        pls: the fitted baseline, outputs in the evaluated targets' order.
    """

    unet: MapEnsemble
    channels: list[int]
    geometry: Geometry
    pls: PLSBaseline


@dataclass(frozen=True)
class ScanMaps:
    """The maps of one test scan.

    Attributes:
        maps: model name -> ``(T, H, W)`` float32 maps of the evaluated targets, NaN outside
            the mask.
        mask: ``(H, W)`` bool sample pixels.
        truth: the dataset's true maps ``{target: (H, W)}``, or None (not synthetic data).
    """

    scan_id: str
    maps: dict[str, np.ndarray]
    mask: np.ndarray
    truth: dict[str, np.ndarray] | None


@dataclass
class SampleScore:
    """One test sample: the U-Net's mean over its scans' sample pixels and its maps' metrics."""

    unet_mean: np.ndarray  # (T,)
    per_map: dict[str, list[dict[str, Any]]]  # model -> one row per (scan, target)
    figures: list[Path] = field(default_factory=list)


@dataclass
class TestScores:
    """The test split as both models see it.

    Attributes:
        sample_ids: test samples, sorted.
        reference: ``(n, T)`` lab values.
        predictions: model name -> ``(n, T)`` predicted sample means (U-Net: mean of its map
            over the sample pixels; PLS: applied to the mean spectrum).
        per_map: model name -> :func:`map_metrics` rows of every (scan, target), with ``target``.
        figures: map figures drawn so far.
    """

    sample_ids: list[str]
    reference: np.ndarray
    predictions: dict[str, np.ndarray]
    per_map: dict[str, list[dict[str, Any]]]
    figures: list[Path]


def score_scan(data: Dataset, scan_id: str, models: EvaluatedModels) -> ScanMaps:
    """Both models' maps of one scan, with its mask and true maps."""
    mask = data.mask(scan_id)
    umap = predict_map(models.unet, StoredInput(data, scan_id), models.geometry).numpy()[models.channels]
    pmap = models.pls.predict_cube(data.cube(scan_id), mask)  # (T, H, W)
    umap = np.where(mask[None], umap, np.nan).astype(np.float32)  # (T, H, W)
    return ScanMaps(scan_id, {"unet": umap, "pls": pmap}, mask, data.truth(scan_id))


def _scan_map_metrics(scan: ScanMaps, targets: Sequence[str]) -> dict[str, list[dict[str, Any]]]:
    """:func:`map_metrics` of every map of a scan (against its true map where there is one)."""
    rows: dict[str, list[dict[str, Any]]] = {}
    for name, maps in scan.maps.items():
        rows[name] = []
        for j, t in enumerate(targets):
            truth = scan.truth.get(t) if scan.truth else None
            r = map_metrics(maps[j], scan.mask, truth, name=f"{name} map of {scan.scan_id}")
            rows[name].append({"target": t, **r})
    return rows


def _draw_scan(scan: ScanMaps, target: str, lab: float, folder: Path) -> Path:
    """``map_<scan>.png``: both models' maps of the first target beside the true map."""
    maps = {MODEL_LABELS[name]: m[0] for name, m in scan.maps.items()}
    if scan.truth and target in scan.truth:
        maps["truth"] = scan.truth[target]
    return plot_maps(
        maps, folder / f"map_{scan.scan_id}.png", title=f"{scan.scan_id}: {target} (lab {lab:.1f} %)"
    )


def score_sample(
    data: Dataset,
    sample_id: str,
    models: EvaluatedModels,
    targets: Sequence[str],
    *,
    draw: tuple[Path, float] | None = None,
) -> SampleScore:
    """One test sample's scans: maps, their metrics, and the U-Net's sample mean.

    Args:
        draw: ``(folder, lab value of the first target)`` to draw the scans' maps there.
    """
    score = SampleScore(np.zeros(len(targets)), {name: [] for name in MODELS})
    count = 0
    for scan_id in data.samples[sample_id].scans:
        scan = score_scan(data, scan_id, models)
        score.unet_mean += np.nansum(scan.maps["unet"], axis=(1, 2))
        count += int(scan.mask.sum())
        for name, rows in _scan_map_metrics(scan, targets).items():
            score.per_map[name] += rows
        if draw is not None:
            score.figures.append(_draw_scan(scan, targets[0], draw[1], draw[0]))
    score.unet_mean = score.unet_mean / max(count, 1)
    return score


def score_test_split(
    data: Dataset,
    spectra: dict[str, np.ndarray],
    models: EvaluatedModels,
    targets: Sequence[str],
    folder: Path,
    *,
    progress: bool = True,
) -> TestScores:
    """Both models on every test sample (split 0); the first :data:`N_MAP_FIGURES` are drawn."""
    test_ids = data.ids([0])
    if len(test_ids) < 2:
        raise InputError(f"{data.path}: the test split (0) has {len(test_ids)} samples; need at least 2")
    reference = lab_values(data, test_ids, targets)
    scores = TestScores(
        sample_ids=test_ids,
        reference=reference,
        predictions={
            "unet": np.zeros_like(reference),
            "pls": models.pls.predict(np.stack([spectra[s] for s in test_ids])),
        },
        per_map={name: [] for name in MODELS},
        figures=[],
    )
    for k, sid in enumerate(track(test_ids, description="evaluate", disable=not progress)):
        draw = (folder, float(reference[k, 0])) if k < N_MAP_FIGURES else None
        sample = score_sample(data, sid, models, targets, draw=draw)
        scores.predictions["unet"][k] = sample.unet_mean
        for name in MODELS:
            scores.per_map[name] += sample.per_map[name]
        scores.figures += sample.figures
    return scores


# ----------------------------------------------------------------------------- numbers


def aggregate_metrics(scores: TestScores, targets: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per model: :func:`regression_metrics` of the sample means plus the maps' mean metrics.

    Returns:
        ``{model: metrics}`` for one target, ``{model: {target: metrics}}`` for several.
    """
    metrics: dict[str, dict[str, Any]] = {}
    for name, pred in scores.predictions.items():
        per_target: dict[str, Any] = {}
        for j, t in enumerate(targets):
            reg: dict[str, Any] = regression_metrics(scores.reference[:, j], pred[:, j])
            rows = [r for r in scores.per_map[name] if r["target"] == t]
            for key in MAP_KEYS:
                vals = [r[key] for r in rows if key in r and r[key] is not None]
                if vals:
                    reg[key] = float(np.mean(vals))
            per_target[t] = reg
        metrics[name] = per_target if len(targets) > 1 else per_target[targets[0]]
    return metrics


def _first_target(metrics: dict[str, dict[str, Any]], targets: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``{model: metrics of the first target}`` from :func:`aggregate_metrics`' output."""
    return {name: m if len(targets) == 1 else m[targets[0]] for name, m in metrics.items()}


def _relative_rmse_change(metrics: dict[str, dict[str, Any]], targets: Sequence[str]) -> float:
    """RMSE(U-Net) / RMSE(PLS) - 1 for one target; NaN for several."""
    if len(targets) != 1:
        return math.nan
    return metrics["unet"].get("rmse", math.nan) / metrics["pls"].get("rmse", math.nan) - 1.0


def bootstrap_first_target(scores: TestScores, seed: int) -> dict[str, float]:
    """Paired bootstrap of RMSE(U-Net) - RMSE(PLS) over the test samples, first target."""
    y = scores.reference[:, 0]
    return paired_bootstrap(
        y, scores.predictions["unet"][:, 0], scores.predictions["pls"][:, 0], n_boot=N_BOOT, seed=seed
    )


def flat_metrics(
    metrics: dict[str, dict[str, Any]], boot: dict[str, float], targets: Sequence[str]
) -> dict[str, float]:
    """The finite numbers of the first target as MLflow metrics: ``test_<model>_<metric>``."""
    flat = {
        f"test_{name}_{k}": v
        for name, m in _first_target(metrics, targets).items()
        for k, v in m.items()
        if isinstance(v, (int, float)) and math.isfinite(v)
    }
    flat["test_rmse_diff_ci_low"] = boot["ci_low"]
    flat["test_rmse_diff_ci_high"] = boot["ci_high"]
    return flat


# ----------------------------------------------------------------------------- report


@dataclass(frozen=True)
class Evaluation:
    """Everything the report shows."""

    scores: TestScores
    metrics: dict[str, dict[str, Any]]
    pls: PLSBaseline
    bootstrap: dict[str, float]
    rmsecv_unet: float
    n_members: int
    keys: dict[str, str]  # dataset_key, training_key


def _report_extra(ev: Evaluation, targets: Sequence[str]) -> dict[str, Any]:
    """What ``metrics.json`` holds beside the models' metrics."""
    s = ev.scores
    return {
        "n_test": len(s.sample_ids),
        "rmsecv": {"unet": ev.rmsecv_unet, "pls": float(ev.pls.cv[0]["rmsecv_at_chosen"])},
        "pls_components": ev.pls.n_components,
        "bootstrap_rmse_unet_minus_pls": ev.bootstrap,
        "relative_rmse_change": _relative_rmse_change(ev.metrics, targets),
        **ev.keys,
        "test_predictions": {
            "sample_id": s.sample_ids,
            "reference": s.reference[:, 0].tolist(),
            **{name: s.predictions[name][:, 0].tolist() for name in MODELS},
        },
    }


def _report_notes(ev: Evaluation, targets: Sequence[str]) -> str:
    boot = ev.bootstrap
    return (
        f"Test split: {len(ev.scores.sample_ids)} samples, target {targets[0]}. U-Net = mean of "
        f"{ev.n_members} fold models; PLS = {ev.pls.n_components[0]} components on mean spectra, "
        f"applied per pixel. Paired bootstrap of RMSE(U-Net) - RMSE(PLS): {boot['estimate']:.3f} "
        f"[{boot['ci_low']:.3f}, {boot['ci_high']:.3f}] (95 %)."
    )


def write_evaluation_report(
    folder: Path, ev: Evaluation, targets: Sequence[str], *, title: str, learning_curve: Path | None = None
) -> dict[str, Path]:
    """Scatter and residual plots, then :func:`write_report`; the training's learning curve beside."""
    s = ev.scores
    preds = {MODEL_LABELS[name]: s.predictions[name][:, 0] for name in MODELS}
    figures = [
        *s.figures,
        plot_scatter(s.reference[:, 0], preds, folder / "scatter.png"),
        plot_residuals(s.reference[:, 0], preds, folder / "residuals.png"),
    ]
    paths = write_report(
        folder,
        ev.metrics,
        title=title,
        figures=figures,
        extra=_report_extra(ev, targets),
        notes=_report_notes(ev, targets),
    )
    if learning_curve is not None and learning_curve.is_file():
        write_bytes_atomic(folder / "learning_curve.png", learning_curve.read_bytes())
    return paths


def log_to_mlflow(training: dict[str, Any], folder: Path, flat: dict[str, float]) -> str:
    """Metrics and the whole report folder (as ``evaluation/``) into the training's MLflow run.

    Args:
        training: the training stage's summary (``mlflow_run_id``, ``tracking_uri``).

    Returns:
        The run id.
    """
    run_id = training["mlflow_run_id"]
    client = tracking.client(training["tracking_uri"])
    tracking.log_metrics(client, run_id, flat, step=0)
    client.log_artifacts(run_id, str(folder), artifact_path="evaluation")
    return run_id


# ----------------------------------------------------------------------------- the stage


def load_models(
    data: Dataset, training: StageDir, pls: PLSBaseline, targets: Sequence[str]
) -> EvaluatedModels:
    """The training's fold ensemble (as it will be registered) beside the fitted PLS."""
    unet, _ = load_ensemble(training.path)
    return EvaluatedModels(unet, _target_index(data, targets), model_geometry(unet.members[0]), pls)


def evaluate_ensemble(
    cfg: ChemmapConfig,
    dataset_stage: StageDir,
    training_stage: StageDir,
    *,
    progress: bool = True,
    log: Log = print,
) -> StageDir:
    """Score the test split with the U-Net ensemble and with PLS; write and log the report.

    Args:
        cfg: the pipeline's config (``targets``, ``seed``, ``workdir``, ``name``).
        dataset_stage: the preprocessing stage (``dataset.zarr`` inside).
        training_stage: the finished training stage (``model.json``, ``fold<k>/best.pt``, and a
            summary with ``rmsecv``, ``mlflow_run_id``, ``tracking_uri``).
        progress: show a progress bar over the test samples.
        log: where the stage says what it does.

    Returns:
        The finished evaluation stage (``metrics.json``, ``summary.md|html``, figures).
    """
    if not training_stage.complete:
        raise InputError(f"no finished training at {training_stage.path}; run `chemmap train` first")
    targets = list(cfg.targets)
    section = {"n_boot": N_BOOT, "seed": cfg.seed, "targets": targets}
    stage = stage_dir(cfg.workdir_path, "evaluate", section, [dataset_stage.key, training_stage.key])
    if stage.complete:
        log(f"evaluate: done already ({stage.path})")
        return stage
    out = stage.begin()
    data = Dataset(dataset_stage.path / "dataset.zarr")
    spectra = mean_spectra(data)
    pls = fit_pls(data, spectra, targets)
    write_json_atomic(out / "pls.json", pls.to_dict(include_cv_predictions=False))
    models = load_models(data, training_stage, pls, targets)
    log(f"evaluate: {len(models.unet.members)} fold models vs PLS ({pls.n_components[0]} components)")
    scores = score_test_split(data, spectra, models, targets, out, progress=progress)

    metrics = aggregate_metrics(scores, targets)
    boot = bootstrap_first_target(scores, cfg.seed)
    trained = training_stage.summary()
    ev = Evaluation(
        scores=scores,
        metrics=metrics,
        pls=pls,
        bootstrap=boot,
        rmsecv_unet=trained["rmsecv"],
        n_members=len(models.unet.members),
        keys={"dataset_key": dataset_stage.key, "training_key": training_stage.key},
    )
    paths = write_evaluation_report(
        out,
        ev,
        targets,
        title=f"chemmap evaluation: {cfg.name}",
        learning_curve=training_stage.path / "learning_curve.png",
    )
    flat = flat_metrics(metrics, boot, targets)
    summary = {
        "metrics": str(paths["json"]),
        "report": str(paths["html"]),
        "rmse_unet": flat.get("test_unet_rmse"),
        "rmse_pls": flat.get("test_pls_rmse"),
        "bootstrap": boot,
        "mlflow_run_id": log_to_mlflow(trained, out, flat),
    }
    stage.finish(summary, dump_config(cfg))
    log(
        f"evaluate: test RMSE U-Net {summary['rmse_unet']:.3f} vs PLS {summary['rmse_pls']:.3f} "
        f"(diff {boot['estimate']:+.3f}, 95 % CI [{boot['ci_low']:+.3f}, {boot['ci_high']:+.3f}])"
    )
    return stage
