"""The training stage: 5-fold cross-validation with Ray Train, tracked in MLflow.

Every input is checked before a worker starts: the dataset, the model's channel count
against it, in patch mode the dataset's patch index against the model's geometry, the
MLflow server and the Ray address (``cluster:``). The folds train one after another in one
``TorchTrainer`` run (one worker group: :func:`chemmap.train.loop.train_folds`) named after
the stage key, with its checkpoints under ``cluster.storage_path``; running the stage again
resumes the unfinished fold from its latest checkpoint and skips the finished ones, and
logs into the same MLflow runs (one per fold). The trained model is the ensemble of the folds' best
epochs, written as state dicts (``fold<k>/best.pt``) beside ``model.json``.
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import torch

from chemmap import console, tracking
from chemmap.config import ChemmapConfig, dump_config
from chemmap.errors import InputError
from chemmap.figures import plot_learning_curve
from chemmap.files import atomic_path, write_json_atomic
from chemmap.models.tiling import Geometry, model_geometry
from chemmap.models.unet import UNet, UNetConfig
from chemmap.preprocess.store import Dataset
from chemmap.stages import StageDir, stage_dir
from chemmap.train.feed import EpochFeed
from chemmap.train.loop import STATE_FILE, train_folds

Log = Callable[[str], None]

# train: settings that change how robustly or how fast training runs, not what it learns:
# not in the stage key (where it runs, cluster:, never was).
NOT_IN_KEY = {"max_failures", "prefetch", "torch_threads", "checkpoints_to_keep"}
# model: keys that are not the U-Net's: checked channel counts, and the bound the ensemble
# applies after the fold models' mean (so not in the training's key either).
NOT_UNET = {"in_channels", "out_channels", "bounded"}


def model_config(cfg: ChemmapConfig, n_channels: int, n_targets: int) -> UNetConfig:
    """The U-Net config for a dataset; a channel count that contradicts it is an error."""
    given = {"in_channels": cfg.model.in_channels, "out_channels": cfg.model.out_channels}
    have = {"in_channels": n_channels, "out_channels": n_targets}
    for key, value in given.items():
        if value is not None and value != have[key]:
            raise InputError(
                f"{cfg.source}: model.{key}={value} but the dataset has {have[key]} "
                f"({'channels after preprocessing' if key == 'in_channels' else 'targets'})"
            )
    try:
        return UNetConfig(**cfg.model.model_dump(exclude=NOT_UNET), **have)
    except (TypeError, ValueError) as err:
        raise InputError(f"{cfg.source}: model: {err}") from None


def check_ray_address(address: str, key: str = "cluster.ray_address", timeout: float = 5.0) -> None:
    """A TCP probe of ``host:port`` / ``ray://host:port``: ray.init itself retries for minutes."""
    if address == "auto":
        return
    hostport = urlsplit(address if "://" in address else f"ray://{address}")
    host, port = hostport.hostname, hostport.port
    if not host or not port:
        raise InputError(f"{key}: expected host:port, ray://host:port or auto, got {address!r}")
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as err:
        raise InputError(f"{key}: cannot reach Ray at {address} ({err})") from None


def ray_address(configured: str | None) -> str | None:
    """The cluster to join: ``cluster.ray_address``, else ``RAY_ADDRESS`` (set inside a Ray job)."""
    return configured or os.environ.get("RAY_ADDRESS") or None


def connect_ray(address: str | None, num_cpus: int | None = None) -> None:
    """Join the Ray cluster the config names (or ``RAY_ADDRESS``), or start a local one.

    ``num_cpus`` sizes a local Ray only: Ray refuses resource arguments when joining a
    cluster, as a Ray job's driver does (``RAY_ADDRESS`` is set there). One line if unreachable.
    """
    import ray

    if ray.is_initialized():
        return
    key = "cluster.ray_address" if address else "RAY_ADDRESS"
    address = ray_address(address)
    if address:
        check_ray_address(address, key)
    try:
        with console.keep_sigterm_handler():
            if address:
                ray.init(address=address, **console.ray_init_options())
            else:
                ray.init(num_cpus=num_cpus, include_dashboard=False, **console.ray_init_options())
    except (ConnectionError, RuntimeError, ValueError) as err:
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise InputError(f"{key}: cannot connect to Ray at {address!r}: {msg}") from None


# ----------------------------------------------------------------------------- the stage's plan


@dataclass(frozen=True)
class TrainingPlan:
    """What a config trains on a dataset, checked against it (:func:`plan_training`)."""

    stage: StageDir  # the training stage folder
    unet: UNetConfig
    folds: list[int]  # the CV folds (splits) to train
    train_section: dict[str, Any]  # the train: settings in the stage key
    store: Path  # dataset.zarr


def train_key_section(cfg: ChemmapConfig) -> dict[str, Any]:
    """The ``train:`` settings in the stage key: what decides what training learns."""
    return cfg.train.model_dump(mode="json", exclude=NOT_IN_KEY)


def training_section(cfg: ChemmapConfig, ucfg: UNetConfig) -> dict[str, Any]:
    """The config section of the training stage's key (its other input: the dataset's key).

    Unchanged settings give an unchanged key: trainings made before are found again.
    """
    return {"model": asdict(ucfg), "train": train_key_section(cfg), "seed": cfg.seed, "targets": cfg.targets}


def plan_training(cfg: ChemmapConfig, dataset: StageDir) -> TrainingPlan:
    """The training stage for a config and a finished dataset stage, after checking that they fit."""
    if not dataset.complete:
        raise InputError(f"dataset not found: {dataset.path} is unfinished; run `chemmap preprocess`")
    store = dataset.path / "dataset.zarr"
    data = Dataset(store)
    missing = [t for t in cfg.targets if t not in data.targets]
    if missing:
        raise InputError(f"{cfg.source}: targets {missing} are not in the dataset (it has {data.targets})")
    ucfg = model_config(cfg, data.n_channels, len(cfg.targets))
    splits = data.splits
    folds = cfg.train.folds or [s for s in splits if s != 0]
    bad = [f for f in folds if f not in splits or f == 0]
    if bad:
        raise InputError(f"{cfg.source}: train.folds {bad} are not CV folds of the dataset (splits {splits})")
    section = training_section(cfg, ucfg)
    stage = stage_dir(cfg.workdir_path, "train", section, [dataset.key])
    return TrainingPlan(stage, ucfg, list(folds), section["train"], store)


def training_dir(cfg: ChemmapConfig, dataset: StageDir) -> StageDir:
    """The training stage folder for a config and a finished dataset stage (checked to fit)."""
    return plan_training(cfg, dataset).stage


def check_patch_index(data: Dataset, ucfg: UNetConfig) -> Geometry:
    """The model's geometry, if the dataset's patch index fits it; one line saying why not otherwise.

    Patch-wise gradients are exact when each core window keeps a halo of at least the
    model's receptive radius and the windows lie on the model's stride grid.
    """
    index = data.patch_index()
    geometry = model_geometry(UNet(ucfg))
    if index.halo < geometry.radius or index.stride % geometry.stride:
        raise InputError(
            f"{data.path}: its patch index (halo {index.halo} px, stride {index.stride} px) does not fit "
            f"the model (receptive radius {geometry.radius} px, stride {geometry.stride} px); "
            "train.mode=patches needs halo >= radius and the index on the model's stride grid: "
            "preprocess the dataset again with this model: section"
        )
    return geometry


# ----------------------------------------------------------------------------- running it


def _check_services(cfg: ChemmapConfig) -> None:
    """MLflow, the GPU and Ray (``cluster:``), each refused in one line before any worker starts."""
    import ray

    tracking.check_tracking_uri(cfg.tracking_uri)
    address = ray_address(cfg.cluster.ray_address)
    if cfg.train.use_gpu and not address and not torch.cuda.is_available():
        raise InputError(f"{cfg.source}: train.use_gpu is true but this machine has no CUDA device")
    workers = cfg.train.num_workers
    connect_ray(cfg.cluster.ray_address, num_cpus=None if address else max(os.cpu_count() or 1, workers))
    cpus = ray.cluster_resources().get("CPU", 0)
    if cpus < workers and not cfg.train.use_gpu:
        raise InputError(f"train.num_workers={workers} but the Ray cluster has {cpus:g} CPUs")


def _storage_path(cfg: ChemmapConfig, stage: StageDir) -> str:
    """Where Ray Train keeps checkpoints: ``cluster.storage_path`` (a URL or a path), else the stage."""
    path = cfg.cluster.storage_path
    if path and "://" in path:
        return path
    return str(cfg.resolve_path(path) if path else stage.path / "ray")


def clear_training(cfg: ChemmapConfig, stage: StageDir) -> None:
    """Remove a training stage's outputs and its folds' Ray checkpoints (``chemmap run --force``).

    Checkpoints under ``cluster.storage_path`` are removed too: a fold run of the same name
    would otherwise resume from them instead of training afresh.
    """
    import pyarrow.fs as pafs

    storage = _storage_path(cfg, stage)
    if not Path(storage).is_relative_to(stage.path):
        fs, root = pafs.FileSystem.from_uri(storage if "://" in storage else str(Path(storage).resolve()))
        for info in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True)):
            if info.type == pafs.FileType.Directory and info.base_name.startswith(f"{stage.key}-fold"):
                fs.delete_dir(info.path)
    stage.clear()


@dataclass(frozen=True)
class _Run:
    """One training stage run: the plan, its MLflow runs, and how workers are started."""

    cfg: ChemmapConfig
    plan: TrainingPlan
    dataset_key: str
    book: tracking.RunBook
    parent: str  # MLflow run of the whole training
    geometry: Geometry | None  # the model's (patch mode)
    debug: dict[str, Any]
    log: Log
    feed: EpochFeed | None = None  # rank 0's epoch lines to the driver's console


def _open_runs(
    cfg: ChemmapConfig, plan: TrainingPlan, dataset: StageDir, pipeline_run: str | None
) -> tuple[tracking.RunBook, str]:
    """The MLflow run of the training (the same one when a run resumes), with its params.

    A new run is nested under ``pipeline_run``; a resumed one keeps the parent it has.
    """
    book = tracking.RunBook(
        plan.stage.path / "mlflow_runs.json", cfg.tracking_uri, cfg.mlflow.experiment or cfg.name
    )
    parent = book.run(
        "training",
        f"train-{plan.stage.key[:8]}",
        parent=pipeline_run,
        tags={
            tracking.STAGE_TAG: "train",
            "chemmap.stage_key": plan.stage.key,
            "chemmap.dataset_key": dataset.key,
        },
    )
    params = {
        "model": asdict(plan.unet),
        "train": plan.train_section,
        "seed": cfg.seed,
        "targets": ",".join(cfg.targets),
        "dataset_key": dataset.key,
        "n_channels": plan.unet.in_channels,
    }
    tracking.log_params(book.client, parent, params)
    book.client.log_text(parent, dump_config(cfg), "config.yaml")
    return book, parent


def worker_config(
    cfg: ChemmapConfig,
    plan: TrainingPlan,
    folds: list[int],
    run_ids: dict[int, str | None] | None = None,
    *,
    geometry: Geometry | None = None,
    debug: dict[str, Any] | None = None,
    feed: EpochFeed | None = None,
) -> dict[str, Any]:
    """The ``train_loop_config`` of :func:`chemmap.train.loop.train_folds` for ``folds``.

    ``run_ids``: each fold's MLflow run (None: not logged); ``geometry``: the model's (patch
    mode); ``feed``: where rank 0's lines go (None: printed by the worker).
    """
    tcfg = cfg.train
    run_ids = {fold: (run_ids or {}).get(fold) for fold in folds}
    lines = {
        fold: f"train: fold {fold}/{len(plan.folds)} on {tcfg.num_workers} worker(s) "
        f"({'GPU' if tcfg.use_gpu else 'CPU'}, mode {tcfg.mode})"
        + (f", MLflow run {run_ids[fold]}" if run_ids[fold] else "")
        for fold in folds
    }
    return {
        "store": str(plan.store),
        "model": asdict(plan.unet),
        "train": tcfg.model_dump(mode="json"),
        "folds": list(folds),
        "seed": cfg.seed,
        "tracking_uri": cfg.tracking_uri,
        "run_ids": run_ids,
        "fold_lines": lines,
        "threads": tcfg.torch_threads or max(1, (os.cpu_count() or 1) // tcfg.num_workers),
        "geometry": asdict(geometry) if geometry is not None else None,
        "debug": debug or {},
        "epoch_feed": feed.queue if feed is not None else None,
    }


def _fit_folds(run: _Run, folds: list[int], run_ids: dict[int, str]):
    """One ``TorchTrainer`` run training ``folds`` in turn (resumed from its checkpoints); its ``Result``.

    One worker group for all folds (:func:`chemmap.train.loop.train_folds`): Ray Train starts
    its workers once, not once per fold. ``train.max_failures`` counts for the whole run.
    Checkpoints kept: each fold's last (scored highest, :func:`~chemmap.train.loop.checkpoint_score`)
    and ``train.checkpoints_to_keep`` of the latest.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cfg, stage = run.cfg, run.plan.stage
    workers = cfg.train.num_workers
    loop_config = worker_config(
        cfg, run.plan, folds, run_ids, geometry=run.geometry, debug=run.debug, feed=run.feed
    )
    resources = cfg.cluster.resources_per_worker or ({"CPU": 1} if not cfg.train.use_gpu else None)
    trainer = TorchTrainer(
        train_folds,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=workers, use_gpu=cfg.train.use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=_run_name(stage),
            storage_path=_storage_path(cfg, stage),
            checkpoint_config=CheckpointConfig(
                num_to_keep=cfg.train.checkpoints_to_keep + len(folds),
                checkpoint_score_attribute="keep",
                checkpoint_score_order="max",
            ),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
        ),
    )
    try:
        result = trainer.fit()
    except Exception as err:  # a training error: keep what is checkpointed, say where
        fold = folds[0]
        if run.feed is not None:
            try:
                run.feed.flush()
            except Exception:  # the feed's actor may be gone with the failure
                pass
            fold = run.feed.fold if run.feed.fold in folds else fold
        raise RuntimeError(f"training fold {fold} failed: {err}") from err
    if result.checkpoint is None:
        raise RuntimeError(f"training folds {folds} finished without a checkpoint")
    return result


def _run_name(stage: StageDir) -> str:
    """The Ray Train run of a training stage (:func:`clear_training` removes it by its prefix)."""
    return f"{stage.key}-folds"


def _checkpoint_path(run: _Run, name: str) -> str:
    """Where the run's checkpoint folder ``name`` is: a local path, or a URL on object storage."""
    return f"{_storage_path(run.cfg, run.plan.stage).rstrip('/')}/{_run_name(run.plan.stage)}/{name}"


def _save_fold(run: _Run, fold: int, run_id: str, checkpoint: str) -> dict[str, Any]:
    """The fold's best weights, learning curve and ``result.json`` from the checkpoint it ended with."""
    from ray.train import Checkpoint

    fdir = run.plan.stage.path / f"fold{fold}"
    fdir.mkdir(parents=True, exist_ok=True)
    with Checkpoint(checkpoint).as_directory() as d:
        saved = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=True)
    if saved.get("fold") != fold:
        raise RuntimeError(f"checkpoint {checkpoint} holds fold {saved.get('fold')}, not fold {fold}")
    st = saved["state"]
    with atomic_path(fdir / "best.pt") as tmp:
        torch.save(st["best_model"] if st["best_model"] is not None else saved["model"], tmp)
    plot_learning_curve(st["history"], fdir / "learning_curve.png")
    run.book.client.log_artifact(run_id, str(fdir / "learning_curve.png"))
    info = {
        "fold": fold,
        "best_val_rmse": st["best_rmse"],
        "best_epoch": st["best_epoch"],
        "epochs_run": st["epoch"] + 1,
        "seconds": sum(h.get("epoch_seconds", 0.0) for h in st["history"]),  # its epochs
        "run_id": run_id,
        "weights": str(fdir / "best.pt"),
        "checkpoint": checkpoint,
        "history": st["history"],
    }
    run.book.client.log_metric(run_id, "best_val_rmse", st["best_rmse"])
    run.book.client.set_terminated(run_id)
    write_json_atomic(fdir / "result.json", info)
    return info


def _result(run: _Run, fold: int) -> dict[str, Any] | None:
    path = run.plan.stage.path / f"fold{fold}" / "result.json"
    return json.loads(path.read_text()) if path.is_file() else None


def run_folds(run: _Run) -> dict[int, dict[str, Any]]:
    """Train the folds not done yet in one Ray Train run; every fold's ``result.json`` record.

    A fold's results are written as soon as it ends (through the epoch feed, while the next
    fold trains), and otherwise from the run's last checkpoint once training is over.
    """
    results: dict[int, dict[str, Any]] = {}
    for fold in run.plan.folds:
        done = _result(run, fold)
        if done is not None:
            results[fold] = done
            run.log(f"train: fold {fold} done already (val RMSE {done['best_val_rmse']:.3f})")
    todo = [fold for fold in run.plan.folds if fold not in results]
    if todo:
        run_ids = {
            fold: run.book.run(f"fold{fold}", f"fold{fold}", parent=run.parent, tags={"chemmap.fold": fold})
            for fold in todo
        }

        def save(fold: int, name: str) -> None:
            if fold in run_ids and _result(run, fold) is None:
                _save_fold(run, fold, run_ids[fold], _checkpoint_path(run, name))

        if run.feed is not None:
            run.feed.on_fold_done = save
        result = _fit_folds(run, todo, run_ids)
        if run.feed is not None:
            run.feed.flush()  # the last epoch lines (and folds) before the driver's next line
        with result.checkpoint.as_directory() as d:
            last = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=True)
        ended = {**(last.get("done") or {}), last["fold"]: Path(result.checkpoint.path).name}
        for fold, name in ended.items():
            save(fold, name)
        for fold in todo:
            record = _result(run, fold)
            if record is None:
                raise RuntimeError(
                    f"training ended without fold {fold} (last checkpoint {result.checkpoint.path})"
                )
            results[fold] = record
    return {fold: results[fold] for fold in run.plan.folds}


def _finish(run: _Run, results: dict[int, dict[str, Any]], seconds: float) -> StageDir:
    """RMSECV, the overall learning curve, ``model.json`` and the completion marker."""
    stage, client = run.plan.stage, run.book.client
    rmsecv = math.sqrt(sum(r["best_val_rmse"] ** 2 for r in results.values()) / len(results))
    history = [dict(h, fold=f) for f, r in results.items() for h in r["history"]]
    plot_learning_curve(history, stage.path / "learning_curve.png")
    client.log_artifact(run.parent, str(stage.path / "learning_curve.png"))
    client.log_metric(run.parent, "rmsecv", rmsecv)
    client.set_terminated(run.parent)
    folds = sorted(results)
    model_card = {
        "unet": asdict(run.plan.unet),
        "targets": run.cfg.targets,
        "folds": folds,
        "weights": [f"fold{f}/best.pt" for f in folds],
    }
    write_json_atomic(stage.path / "model.json", model_card)
    summary = {
        "mlflow_run_id": run.parent,
        "tracking_uri": run.cfg.tracking_uri,
        "fold_run_ids": {f: r["run_id"] for f, r in results.items()},
        "checkpoints": {f: r["checkpoint"] for f, r in results.items()},
        "weights": {f: r["weights"] for f, r in results.items()},
        "val_rmse": {f: r["best_val_rmse"] for f, r in results.items()},
        "rmsecv": rmsecv,
        "seconds": seconds,
        "dataset": str(run.plan.store),
        "dataset_key": run.dataset_key,
    }
    stage.finish(summary, dump_config(run.cfg))
    run.log(f"train: RMSECV {rmsecv:.3f} over folds {folds} ({seconds:.0f} s)")
    return stage


def train_ensemble(
    cfg: ChemmapConfig,
    dataset: StageDir,
    *,
    progress: bool = True,
    log: Log = print,
    debug: dict[str, Any] | None = None,
    runs: tracking.PipelineRuns | None = None,
) -> StageDir:
    """Train the fold ensemble on a finished dataset stage; returns the training stage.

    Args:
        cfg: the pipeline's config (``model:``, ``train:``, ``cluster:``, ``mlflow:``).
        dataset: the finished preprocess stage.
        progress: accepted for the pipeline's stage signature (rank 0's one line per epoch
            goes to ``log``, :mod:`chemmap.train.feed`).
        log: where the stage's lines go.
        debug: fault-injection hooks for the workers (tests only; see ``loop._debug_hooks``).
        runs: the pipeline's MLflow runs (``chemmap run``): the training's run nests under it.
    """
    plan = plan_training(cfg, dataset)
    if plan.stage.complete:
        log(f"train: done already ({plan.stage.path})")
        if runs is not None:
            runs.cached("train", plan.stage.summary().get("mlflow_run_id"))
        return plan.stage
    geometry = check_patch_index(Dataset(plan.store), plan.unet) if cfg.train.mode == "patches" else None
    _check_services(cfg)
    plan.stage.begin()
    book, parent = _open_runs(cfg, plan, dataset, runs.parent if runs is not None else None)
    t_start = time.perf_counter()
    try:
        with EpochFeed(log) as feed:
            run = _Run(cfg, plan, dataset.key, book, parent, geometry, debug or {}, log, feed)
            results = run_folds(run)
    except BaseException as err:  # stopped or failed: its runs say so until a rerun resumes them
        book.end_running("KILLED" if isinstance(err, KeyboardInterrupt | SystemExit) else "FAILED")
        raise
    return _finish(run, results, time.perf_counter() - t_start)
