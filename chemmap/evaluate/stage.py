"""The evaluation stage: the fold ensemble against PLS and strong map baselines on the test split.

Every method sees the same preprocessed data, read through :class:`chemmap.preprocess.store.Dataset`
only. PLS is fitted on the mean spectra of the training samples (splits 1-5, components by CV
over those folds) and applied pixel by pixel, as the paper does; from its map come the map
baselines (clipped, smoothed, binned) and, as headroom, maps that use the label or the test
truth (:mod:`chemmap.evaluate.baselines`). The U-Net ensemble is exactly what the registry will
hold (:mod:`chemmap.inference.ensemble`); each of its fold models is scored too.

Every setting is chosen by one protocol (docs/evaluation.md, :mod:`chemmap.evaluate.protocol`):
on out-of-fold maps of the training splits against their true maps; the test split is then
scored once (:mod:`chemmap.evaluate.scoring`). The report (metrics.json, summary tables,
maps, scatter, residuals) goes into the stage folder and into the training run in MLflow.

The steps, in order: :func:`mean_spectra`, :func:`fit_pls`, :func:`choose_settings`,
:func:`score_test_split`, :func:`aggregate_metrics` and :func:`map_summaries`, the paired
bootstrap, :func:`write_evaluation_report`, :func:`log_to_mlflow`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from chemmap import tracking
from chemmap.config import ChemmapConfig, dump_config
from chemmap.console import stage_bar
from chemmap.errors import InputError
from chemmap.evaluate.baselines import SIGMAS, setting_key
from chemmap.evaluate.blindspot import BlindSpotConfig, MapDenoiser
from chemmap.evaluate.metrics import TISSUE_FAT_THRESHOLD, paired_bootstrap, regression_metrics
from chemmap.evaluate.protocol import (
    Choices,
    add_denoised,
    choose,
    fold_pls_models,
    out_of_fold,
    training_splits,
)
from chemmap.evaluate.report import ReportTable, write_report
from chemmap.evaluate.scoring import (
    EvaluatedModels,
    TestScores,
    lab_values,
    method_roles,
    score_test_split,
    target_index,
)
from chemmap.figures import plot_residuals, plot_scatter
from chemmap.files import write_bytes_atomic, write_json_atomic
from chemmap.inference.ensemble import MAP_RANGE, MapEnsemble, load_ensemble
from chemmap.models.pls import MAX_COMPONENTS, PLSBaseline
from chemmap.models.tiling import model_geometry
from chemmap.preprocess.store import Dataset
from chemmap.stages import StageDir, stage_dir

__all__ = [
    "Evaluation",
    "aggregate_metrics",
    "bootstrap_first_target",
    "choose_settings",
    "evaluate_ensemble",
    "evaluation_dir",
    "fit_pls",
    "flat_metrics",
    "load_models",
    "log_to_mlflow",
    "map_summaries",
    "mean_spectra",
    "write_evaluation_report",
]

N_BOOT = 10000
MODELS = ("unet", "pls")  # mean-fat predictions in metrics.json, in this order
MODEL_LABELS = {"unet": "U-Net", "pls": "PLS"}  # names in figures
# Columns of the maps table, in this order.
MAP_COLUMNS = (
    "role",
    "setting",
    "pixel_rmse",
    "pixel_rmse_per_map",
    "oof_pixel_rmse",
    "pixel_bias",
    "bias_fat_tissue",
    "bias_lean_tissue",
    "mean_rmse_lab",
    "mean_rmse_truth",
    "spatial_correlated_share",
    "spatial_correlated_share_full",
    "out_of_range_fraction",
)
PROTOCOL_VERSION = 1  # in the stage key: a change of the protocol makes a new evaluation

Log = Callable[[str], None]


# ----------------------------------------------------------------------------- inputs


def mean_spectra(data: Dataset) -> dict[str, np.ndarray]:
    """Mean spectrum of every sample over the masked pixels of all its scans.

    Returns:
        ``{sample_id: (C,)}`` float64, in the stored (physical) units, not normalised.
    """
    return {sid: data.mean_spectrum(sid) for sid in data.samples}


def fit_pls(
    data: Dataset,
    spectra: dict[str, np.ndarray],
    targets: Sequence[str],
    sample_ids: Sequence[str] | None = None,
) -> PLSBaseline:
    """The paper's baseline on mean spectra, components by CV over the samples' folds.

    Args:
        sample_ids: the samples to fit on; default every training sample (every split but 0,
            the test split). Out-of-fold models pass the training samples of the other folds.
    """
    ids = data.ids(training_splits(data)) if sample_ids is None else list(sample_ids)
    X = np.stack([spectra[s] for s in ids])
    Y = lab_values(data, ids, targets)
    folds = np.array([data.samples[s].split for s in ids])
    pls = PLSBaseline(max_components=min(MAX_COMPONENTS, X.shape[1]))
    return pls.fit(X, Y, folds, target_names=list(targets))


def load_models(
    data: Dataset,
    training: StageDir,
    pls: PLSBaseline,
    targets: Sequence[str],
    bound: tuple[float, float] | None = None,
) -> tuple[EvaluatedModels, dict[int, Any]]:
    """The training's fold ensemble (as it will be registered) beside the fitted PLS.

    Args:
        bound: the range the maps are clamped to (``model.bounded``), or None. A fold's
            member is then a one-model ensemble with that bound, so its out-of-fold maps
            are bounded as the registered ensemble's maps are.

    Returns:
        ``(models, fold -> member)``; the models' ``choices`` are still empty.
    """
    unet, card = load_ensemble(training.path, bound)
    folds = [int(k) for k in card.get("folds", range(1, len(unet.members) + 1))]
    if len(folds) != len(unet.members):
        raise InputError(
            f"{training.path / 'model.json'}: {len(folds)} folds for {len(unet.members)} weights"
        )
    models = EvaluatedModels(
        unet, target_index(data, targets), folds, model_geometry(unet.members[0]), pls, choices={}
    )
    members = list(unet.members) if bound is None else [MapEnsemble([m], bound).eval() for m in unet.members]
    return models, dict(zip(folds, members, strict=True))


def choose_settings(
    data: Dataset,
    spectra: dict[str, np.ndarray],
    models: EvaluatedModels,
    members: dict[int, Any],
    targets: Sequence[str],
    *,
    progress: bool = True,
    tick: Callable[[], Any] | None = None,
    blindspot: BlindSpotConfig | None = None,
    blindspot_cache: Path | None = None,
) -> tuple[dict[str, Choices], float, dict[str, MapDenoiser]]:
    """The protocol: out-of-fold maps of the training splits, and the settings they choose.

    Args:
        blindspot: with a config, the ``pls_n2v`` baseline too (a denoiser per target,
            trained on the out-of-fold PLS maps).
        blindspot_cache: a folder where those denoisers are found again when the same maps
            and settings trained them before (any training's evaluation on the same dataset).

    Returns:
        ``(target -> choices, the U-Net's pooled RMSECV of the first target, target ->
        the pls_n2v denoiser (none without ``blindspot``))``.
    """
    pls_by_fold = fold_pls_models(data, spectra, targets, fit_pls)
    oof = out_of_fold(
        data,
        targets,
        pls_by_fold,
        members,
        models.geometry,
        channels=models.channels,
        progress=progress,
        tick=tick,
        keep_maps=blindspot is not None,
    )
    denoisers = {}
    for t in targets if blindspot is not None else []:
        net = add_denoised(oof[t], blindspot, blindspot_cache)
        if net is not None:
            denoisers[t] = net
    return {t: choose(oof[t]) for t in targets}, oof[targets[0]].unet_rmsecv(), denoisers


# ----------------------------------------------------------------------------- numbers


def _per_target(per_target: dict[str, Any], targets: Sequence[str]) -> Any:
    """One target's value as it is; several as ``{target: value}``."""
    return per_target if len(targets) > 1 else per_target[targets[0]]


def aggregate_metrics(scores: TestScores, targets: Sequence[str], folds: Sequence[int]) -> dict[str, Any]:
    """Mean-fat metrics per model: :func:`regression_metrics` of its sample means on the test split.

    The U-Net's sample mean is its map's mean over the sample's pixels (each fold model's as
    well); PLS predicts from the mean spectrum, as the paper does.

    Returns:
        ``{model: metrics}`` for one target, ``{model: {target: metrics}}`` for several; models
        ``unet``, ``pls``, then ``unet_fold<k>``.
    """
    preds = {name: scores.predictions[name] for name in MODELS}
    for k in folds:
        preds[f"unet_fold{k}"] = np.array(
            [
                [scores.tallies[t][f"unet_fold{k}"].sample_means()[sid] for t in targets]
                for sid in scores.sample_ids
            ]
        )
    return {
        name: _per_target(
            {t: regression_metrics(scores.reference[:, j], pred[:, j]) for j, t in enumerate(targets)},
            targets,
        )
        for name, pred in preds.items()
    }


def _setting(method: str, choices: Choices, oracle_sigma: float | None) -> str:
    """What a method's setting was, in words (empty for methods with none)."""
    if method == "pls_gauss_oracle":
        return f"sigma {oracle_sigma:g} px (best on the test truth)"
    if method == "pls_gauss" and choices.gauss_sigma is not None:
        return f"sigma {choices.gauss_sigma:g} px"
    if method == "pls_median" and choices.median_size is not None:
        return f"{choices.median_size} px window"
    if method == "brightness_lab" and choices.brightness_sigma is not None:
        return f"sigma {choices.brightness_sigma:g} px, slope {choices.brightness_slope:.4g}"
    return ""


def _oracle(tallies: dict[str, Any]) -> tuple[str | None, float | None]:
    """The smoothing width best on the test split's truth (an oracle, reported as headroom)."""
    keys = [setting_key("pls_gauss", s) for s in SIGMAS if setting_key("pls_gauss", s) in tallies]
    if not keys or not tallies[keys[0]].has_truth:
        return None, None
    best = min(keys, key=lambda k: tallies[k].pixel_rmse)
    return best, float(best.split("@")[1])


def map_summaries(
    scores: TestScores, choices: dict[str, Choices], targets: Sequence[str], folds: Sequence[int]
) -> Any:
    """Every map method's numbers on the test split, with its role, setting and out-of-fold score.

    Returns:
        ``{method: row}`` for one target (``{target: {method: row}}`` for several), in
        :func:`~chemmap.evaluate.scoring.method_roles` order; a row is
        :meth:`~chemmap.evaluate.metrics.MapTally.summary` plus ``role``, ``setting`` and
        ``oof_pixel_rmse`` (the training splits' out-of-fold score the protocol chose on).
    """
    out = {}
    for j, t in enumerate(targets):
        tallies, ch = scores.tallies[t], choices[t]
        labs = dict(zip(scores.sample_ids, scores.reference[:, j].tolist(), strict=True))
        oracle_key, oracle_sigma = _oracle(tallies)
        rows = {}
        for method, role in method_roles(folds).items():
            key = oracle_key if method == "pls_gauss_oracle" else method
            if key not in tallies:
                continue
            oof = ch.oof_rmse.get(ch.setting(method)) if not method.startswith("unet_fold") else None
            rows[method] = {
                "role": role,
                "setting": _setting(method, ch, oracle_sigma),
                "oof_pixel_rmse": None if method == "pls_gauss_oracle" else oof,
                **tallies[key].summary(labs),
            }
        out[t] = rows
    return _per_target(out, targets)


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
    metrics: dict[str, Any], maps: Any, boot: dict[str, float], targets: Sequence[str]
) -> dict[str, float]:
    """The finite numbers of the first target as MLflow metrics.

    ``test_<model>_<metric>`` for the mean-fat metrics, ``test_map_<method>_<metric>`` for the
    maps, and the bootstrap interval.
    """

    def finite(rows: dict[str, dict[str, Any]], prefix: str) -> dict[str, float]:
        return {
            f"{prefix}{name}_{k}": float(v)
            for name, m in rows.items()
            for k, v in m.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        }

    first_maps = maps if len(targets) == 1 else maps[targets[0]]
    flat = finite(_first_target(metrics, targets), "test_") | finite(first_maps, "test_map_")
    flat["test_rmse_diff_ci_low"] = boot["ci_low"]
    flat["test_rmse_diff_ci_high"] = boot["ci_high"]
    return flat


# ----------------------------------------------------------------------------- report


@dataclass(frozen=True)
class Evaluation:
    """Everything the report shows."""

    scores: TestScores
    metrics: dict[str, Any]  # mean-fat metrics per model (aggregate_metrics)
    maps: Any  # map metrics per method (map_summaries)
    choices: dict[str, Choices]
    pls: PLSBaseline
    bootstrap: dict[str, float]
    rmsecv_unet: float  # pooled, from out-of-fold predictions
    rmsecv_unet_training: float  # what the training stage reported
    folds: list[int]
    keys: dict[str, str]  # dataset_key, training_key


def _report_extra(ev: Evaluation, targets: Sequence[str]) -> dict[str, Any]:
    """What ``metrics.json`` holds beside the models' metrics."""
    s = ev.scores
    return {
        "maps": ev.maps,
        "protocol": _per_target({t: c.to_dict() for t, c in ev.choices.items()}, targets),
        "n_test": len(s.sample_ids),
        "rmsecv": {"unet": ev.rmsecv_unet, "pls": float(ev.pls.cv[0]["rmsecv_at_chosen"])},
        "rmsecv_note": (
            "U-Net: pooled over its fold models' out-of-fold sample means; those folds also chose "
            "each model's early-stopping epoch, so it is a selection criterion, not evidence for "
            "the U-Net over PLS."
        ),
        "rmsecv_unet_training": ev.rmsecv_unet_training,
        "pls_components": ev.pls.n_components,
        "bootstrap_rmse_unet_minus_pls": ev.bootstrap,
        "relative_rmse_change": _relative_rmse_change(ev.metrics, targets),
        "tissue_fat_threshold": TISSUE_FAT_THRESHOLD,
        **ev.keys,
        "test_predictions": {
            "sample_id": s.sample_ids,
            "reference": s.reference[:, 0].tolist(),
            **{name: s.predictions[name][:, 0].tolist() for name in MODELS},
        },
    }


def _report_notes(ev: Evaluation, targets: Sequence[str]) -> str:
    boot, rel = ev.bootstrap, _relative_rmse_change(ev.metrics, targets)
    best = ev.choices[targets[0]].best_label_free
    return (
        f"Test split: {len(ev.scores.sample_ids)} samples, target {targets[0]}. U-Net = mean of "
        f"{len(ev.folds)} fold models; PLS = {ev.pls.n_components[0]} components on mean spectra. "
        f"Mean {targets[0]}: RMSE(U-Net) / RMSE(PLS) - 1 = {100 * rel:+.1f} %, paired bootstrap of "
        f"RMSE(U-Net) - RMSE(PLS) {boot['estimate']:+.3f} [{boot['ci_low']:+.3f}, {boot['ci_high']:+.3f}] "
        f"(95 %). Map figures: truth, U-Net and the best label-free baseline ({best}, chosen out of "
        "fold on the training splits) on one colour scale."
    )


_MAPS_TEXT = (
    "Per-pixel error against the true maps of the test split, pooled over all its mask pixels "
    "(pixel_rmse, the headline) and per map. Settings were chosen by the protocol of "
    "docs/evaluation.md on out-of-fold maps of the training splits (oof_pixel_rmse); the test "
    "truth chose nothing, except for the oracle. Headroom rows use the lab value or the test "
    "truth and are not competitors. Tissue: true fat >= {thr:g} % is fat. spatial_correlated_share "
    "is computed on each map's own grid (the U-Net's half-resolution output, a binned map's bins): "
    "a smoothness property, not accuracy; _full is on the scan's grid, where up-sampling alone "
    "makes white noise look correlated."
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
    maps = ev.maps if len(targets) == 1 else ev.maps[targets[0]]
    oof = ev.choices[targets[0]].oof_rmse
    tables = [
        ReportTable(f"Maps of {targets[0]}", maps, MAP_COLUMNS, _MAPS_TEXT.format(thr=TISSUE_FAT_THRESHOLD)),
        ReportTable(
            "Protocol: out-of-fold pixel RMSE of every setting tried (training splits)",
            {k: {"oof_pixel_rmse": v} for k, v in oof.items()},
            first="setting",
        ),
    ]
    paths = write_report(
        folder,
        _first_target(ev.metrics, targets),
        title=title,
        figures=figures,
        extra=_report_extra(ev, targets),
        notes=_report_notes(ev, targets),
        tables=tables,
    )
    if learning_curve is not None and learning_curve.is_file():
        write_bytes_atomic(folder / "learning_curve.png", learning_curve.read_bytes())
    return paths


def log_to_mlflow(
    cfg: ChemmapConfig,
    stage: StageDir,
    training: dict[str, Any],
    folder: Path,
    flat: dict[str, float],
    runs: tracking.PipelineRuns | None = None,
) -> str:
    """The evaluation's own MLflow run: metrics, and the report folder as ``evaluation/``.

    The run is nested under the pipeline's run (``chemmap run``), and tagged with the
    training run it evaluated.

    Args:
        training: the training stage's summary (``mlflow_run_id``).

    Returns:
        The run id.
    """
    tags = {"chemmap.training_run": training.get("mlflow_run_id", "")}
    if runs is not None:
        run_id = runs.stage("evaluate", stage.key, tags=tags)
    else:
        run_id = tracking.stage_run(
            cfg.tracking_uri, cfg.mlflow.experiment or cfg.name, "evaluate", stage.key, tags=tags
        )
    client = tracking.client(cfg.tracking_uri)
    tracking.log_metrics(client, run_id, flat, step=0)
    client.log_artifacts(run_id, str(folder), artifact_path="evaluation")
    client.set_terminated(run_id)
    return run_id


# ----------------------------------------------------------------------------- the stage


def _evaluate(
    cfg: ChemmapConfig, data: Dataset, training_stage: StageDir, out: Path, *, progress: bool, log: Log
) -> Evaluation:
    """PLS, the protocol's choices, the test split scored once, and the numbers of all of it."""
    targets = list(cfg.targets)
    spectra = mean_spectra(data)
    pls = fit_pls(data, spectra, targets)
    write_json_atomic(out / "pls.json", pls.to_dict(include_cv_predictions=False))
    bound = MAP_RANGE if cfg.model.bounded else None
    models, members = load_models(data, training_stage, pls, targets, bound)
    log(f"evaluate: {len(members)} fold models vs PLS ({pls.n_components[0]} components) and map baselines")
    # One bar for the stage: the training splits' out-of-fold maps, then the test split.
    n_samples = len(data.ids(training_splits(data))) + len(data.ids([0]))
    with stage_bar("evaluate", n_samples, enabled=progress) as tick:
        steps = cfg.evaluate.blindspot_steps
        blindspot = BlindSpotConfig(steps=steps, seed=cfg.seed) if steps else None
        choices, rmsecv_unet, denoisers = choose_settings(
            data,
            spectra,
            models,
            members,
            targets,
            tick=tick,
            blindspot=blindspot,
            blindspot_cache=cfg.workdir_path / "cache" / "pls_n2v",
        )
        models = replace(models, choices=choices, denoisers=denoisers)
        scores = score_test_split(data, spectra, models, targets, out, tick=tick)
    return Evaluation(
        scores=scores,
        metrics=aggregate_metrics(scores, targets, models.folds),
        maps=map_summaries(scores, choices, targets, models.folds),
        choices=choices,
        pls=pls,
        bootstrap=bootstrap_first_target(scores, cfg.seed),
        rmsecv_unet=rmsecv_unet,
        rmsecv_unet_training=float(training_stage.summary().get("rmsecv", math.nan)),
        folds=models.folds,
        keys={"dataset_key": "", "training_key": training_stage.key},
    )


def evaluation_dir(cfg: ChemmapConfig, dataset_stage: StageDir, training_stage: StageDir) -> StageDir:
    """The evaluation's stage folder: keyed by its settings and the dataset's and training's keys."""
    section = {"n_boot": N_BOOT, "seed": cfg.seed, "targets": list(cfg.targets), "protocol": PROTOCOL_VERSION}
    if cfg.evaluate.blindspot_steps:  # keys of earlier evaluations stay as they were without it
        section["blindspot_steps"] = cfg.evaluate.blindspot_steps
    if cfg.model.bounded:
        section["bound"] = list(MAP_RANGE)
    return stage_dir(cfg.workdir_path, "evaluate", section, [dataset_stage.key, training_stage.key])


def evaluate_ensemble(
    cfg: ChemmapConfig,
    dataset_stage: StageDir,
    training_stage: StageDir,
    *,
    progress: bool = True,
    log: Log = print,
    runs: tracking.PipelineRuns | None = None,
) -> StageDir:
    """Score the test split with the U-Net ensemble, PLS and the map baselines; write and log the report.

    Args:
        cfg: the pipeline's config (``targets``, ``seed``, ``workdir``, ``name``).
        dataset_stage: the preprocessing stage (``dataset.zarr`` inside).
        training_stage: the finished training stage (``model.json``, ``fold<k>/best.pt``, and a
            summary with ``rmsecv``, ``mlflow_run_id``, ``tracking_uri``).
        progress: show progress bars over the training and test samples.
        log: where the stage says what it does.
        runs: the pipeline's MLflow runs (``chemmap run``): the evaluation's run nests under it.

    Returns:
        The finished evaluation stage (``metrics.json``, ``summary.md|html``, figures).
    """
    if not training_stage.complete:
        raise InputError(f"no finished training at {training_stage.path}; run `chemmap train` first")
    targets = list(cfg.targets)
    stage = evaluation_dir(cfg, dataset_stage, training_stage)
    if stage.complete:
        log(f"evaluate: done already ({stage.path})")
        if runs is not None:
            runs.cached("evaluate", stage.summary().get("mlflow_run_id"))
        return stage
    tracking.check_tracking_uri(cfg.tracking_uri)
    out = stage.begin()
    data = Dataset(dataset_stage.path / "dataset.zarr")
    ev = _evaluate(cfg, data, training_stage, out, progress=progress, log=log)
    ev = replace(ev, keys={"dataset_key": dataset_stage.key, "training_key": training_stage.key})
    paths = write_evaluation_report(
        out,
        ev,
        targets,
        title=f"chemmap evaluation: {cfg.name}",
        learning_curve=training_stage.path / "learning_curve.png",
    )
    flat = flat_metrics(ev.metrics, ev.maps, ev.bootstrap, targets)
    summary = {
        "metrics": str(paths["json"]),
        "report": str(paths["html"]),
        "rmse_unet": flat.get("test_unet_rmse"),
        "rmse_pls": flat.get("test_pls_rmse"),
        "pixel_rmse_unet": flat.get("test_map_unet_pixel_rmse"),
        "best_label_free": ev.choices[targets[0]].best_label_free,
        "bootstrap": ev.bootstrap,
        "mlflow_run_id": log_to_mlflow(cfg, stage, training_stage.summary(), out, flat, runs),
        "tracking_uri": cfg.tracking_uri,
    }
    stage.finish(summary, dump_config(cfg))
    _say_result(summary, ev, targets, log)
    return stage


def _say_result(summary: dict[str, Any], ev: Evaluation, targets: Sequence[str], log: Log) -> None:
    boot = ev.bootstrap
    log(
        f"evaluate: test RMSE U-Net {summary['rmse_unet']:.3f} vs PLS {summary['rmse_pls']:.3f} "
        f"(diff {boot['estimate']:+.3f}, 95 % CI [{boot['ci_low']:+.3f}, {boot['ci_high']:+.3f}])"
    )
    maps = ev.maps if len(targets) == 1 else ev.maps[targets[0]]
    best = summary["best_label_free"]
    if best and "pixel_rmse" in maps.get("unet", {}):
        log(
            f"evaluate: per-pixel RMSE U-Net {maps['unet']['pixel_rmse']:.2f} vs best label-free baseline "
            f"{best} {maps[best]['pixel_rmse']:.2f} (flat map at the lab value: "
            f"{maps['flat_lab']['pixel_rmse']:.2f})"
        )
