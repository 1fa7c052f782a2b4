"""The training stage: 5-fold cross-validation with Ray Train, tracked in MLflow.

Every input is checked before a worker starts: the dataset, the model's channel count
against it, the MLflow server and the Ray address. Each fold is a ``TorchTrainer`` run
named after the stage key and fold, with its checkpoints under ``storage_path``;
running the stage again resumes each unfinished fold from its latest checkpoint, and
logs into the same MLflow runs. The trained model is the ensemble of the folds' best
epochs, written as state dicts (``fold<k>.pt``) beside ``model.json``.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict
from pathlib import Path

import torch

from chemmap.config import ChemmapConfig, dump_config
from chemmap.errors import InputError
from chemmap.files import write_json_atomic
from chemmap.stages import StageDir, stage_dir


def model_config(cfg: ChemmapConfig, n_channels: int, n_targets: int):
    """The U-Net config for a dataset; a channel count that contradicts it is an error."""
    from chemmap.models.unet import UNetConfig

    opts = dict(cfg.model)
    for key, have in (("in_channels", n_channels), ("out_channels", n_targets)):
        if key in opts and int(opts[key]) != have:
            raise InputError(
                f"{cfg.source}: model.{key}={opts[key]} but the dataset has {have} "
                f"({'channels after preprocessing' if key == 'in_channels' else 'targets'})"
            )
        opts[key] = have
    try:
        return UNetConfig(**opts)
    except (TypeError, ValueError) as err:
        raise InputError(f"{cfg.source}: model: {err}") from None


def check_ray_address(address: str, timeout: float = 5.0) -> None:
    """A TCP probe of ``host:port`` / ``ray://host:port``: ray.init itself retries for minutes."""
    import socket
    from urllib.parse import urlsplit

    if address == "auto":
        return
    hostport = urlsplit(address if "://" in address else f"ray://{address}")
    host, port = hostport.hostname, hostport.port
    if not host or not port:
        raise InputError(f"train.ray_address: expected host:port, ray://host:port or auto, got {address!r}")
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as err:
        raise InputError(f"train.ray_address: cannot reach Ray at {address} ({err})") from None


def connect_ray(address: str | None, num_cpus: int | None = None) -> None:
    """Join the Ray cluster the config names, or start a local one; one line if unreachable."""
    import ray

    if ray.is_initialized():
        return
    if address:
        check_ray_address(address)
    try:
        if address:
            ray.init(address=address, log_to_driver=True)
        else:
            ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=True)
    except (ConnectionError, RuntimeError, ValueError) as err:
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise InputError(f"train.ray_address: cannot connect to Ray at {address!r}: {msg}") from None


def _fold_done(path: Path) -> dict | None:
    f = path / "result.json"
    return json.loads(f.read_text()) if f.is_file() else None


def training_dir(cfg: ChemmapConfig, dataset: StageDir):
    """The training stage folder for a config and dataset, after checking that they fit.

    Returns ``(stage, unet_config, folds, train_section)``.
    """
    from chemmap.preprocess.dataset import open_dataset

    if not dataset.complete:
        raise InputError(f"dataset not found: {dataset.path} is unfinished; run `chemmap preprocess`")
    meta = open_dataset(dataset.path / "dataset.zarr")
    missing = [t for t in cfg.targets if t not in meta["targets"]]
    if missing:
        raise InputError(f"{cfg.source}: targets {missing} are not in the dataset (it has {meta['targets']})")
    ucfg = model_config(cfg, meta["recipe"].n_channels, len(cfg.targets))
    splits = sorted({s["split"] for s in meta["samples"]})
    folds = cfg.train.folds or [s for s in splits if s != 0]
    bad = [f for f in folds if f not in splits or f == 0]
    if bad:
        raise InputError(f"{cfg.source}: train.folds {bad} are not CV folds of the dataset (splits {splits})")
    # Settings that change where or how robustly training runs, not what it learns, stay out of the key.
    where = {"ray_address", "storage_path", "max_failures", "prefetch", "torch_threads"}
    tsec = cfg.train.model_dump(mode="json", exclude=where | {"resources_per_worker", "checkpoints_to_keep"})
    section = {"model": asdict(ucfg), "train": tsec, "seed": cfg.seed, "targets": cfg.targets}
    return stage_dir(cfg.workdir_path, "train", section, [dataset.key]), ucfg, folds, tsec


def train_stage(
    cfg: ChemmapConfig, dataset: StageDir, *, progress: bool = True, log=print, debug: dict | None = None
) -> StageDir:
    """Train the fold ensemble on a finished dataset stage; returns the training stage.

    ``debug`` passes fault-injection hooks to the workers (tests only; see ``loop._debug_hooks``).
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from chemmap import tracking
    from chemmap.figures import plot_learning_curve
    from chemmap.train.loop import STATE_FILE, train_fold

    stage, ucfg, folds, tsec = training_dir(cfg, dataset)
    store = dataset.path / "dataset.zarr"
    if stage.complete:
        log(f"train: done already ({stage.path})")
        return stage

    uri = cfg.tracking_uri
    tracking.check_tracking_uri(uri)
    if cfg.train.use_gpu and not cfg.train.ray_address and not torch.cuda.is_available():
        raise InputError(f"{cfg.source}: train.use_gpu is true but this machine has no CUDA device")
    workers = cfg.train.num_workers
    connect_ray(
        cfg.train.ray_address, num_cpus=None if cfg.train.ray_address else max(os.cpu_count() or 1, workers)
    )
    cpus = ray.cluster_resources().get("CPU", 0)
    if cpus < workers and not cfg.train.use_gpu:
        raise InputError(f"train.num_workers={workers} but the Ray cluster has {cpus:g} CPUs")

    stage.begin()
    storage = cfg.resolve_path(cfg.train.storage_path) if cfg.train.storage_path else stage.path / "ray"
    storage_str = (
        cfg.train.storage_path if cfg.train.storage_path and "://" in cfg.train.storage_path else str(storage)
    )
    book = tracking.RunBook(stage.path / "mlflow_runs.json", uri, cfg.mlflow.experiment or cfg.name)
    parent = book.run(
        "training",
        f"train-{stage.key[:8]}",
        tags={"chemmap.stage_key": stage.key, "chemmap.dataset_key": dataset.key},
    )
    tracking.log_params(
        book.client,
        parent,
        {
            "model": asdict(ucfg),
            "train": tsec,
            "seed": cfg.seed,
            "targets": ",".join(cfg.targets),
            "dataset_key": dataset.key,
            "n_channels": ucfg.in_channels,
        },
    )
    book.client.log_text(parent, dump_config(cfg), "config.yaml")
    threads = cfg.train.torch_threads or max(1, (os.cpu_count() or 1) // workers)

    results: dict[int, dict] = {}
    t_start = time.perf_counter()
    for fold in folds:
        fdir = stage.path / f"fold{fold}"
        done = _fold_done(fdir)
        if done:
            log(f"train: fold {fold} done already (val RMSE {done['best_val_rmse']:.3f})")
            results[fold] = done
            continue
        fdir.mkdir(parents=True, exist_ok=True)
        run_id = book.run(f"fold{fold}", f"fold{fold}", parent=parent, tags={"chemmap.fold": fold})
        log(
            f"train: fold {fold}/{len(folds)} on {workers} worker(s) "
            f"({'GPU' if cfg.train.use_gpu else 'CPU'}, mode {cfg.train.mode}), MLflow run {run_id}"
        )
        t0 = time.perf_counter()
        trainer = TorchTrainer(
            train_fold,
            train_loop_config={
                "store": str(store),
                "model": asdict(ucfg),
                "train": cfg.train.model_dump(mode="json"),
                "fold": fold,
                "seed": cfg.seed,
                "tracking_uri": uri,
                "run_id": run_id,
                "threads": threads,
                "debug": debug or {},
            },
            scaling_config=ScalingConfig(
                num_workers=workers,
                use_gpu=cfg.train.use_gpu,
                resources_per_worker=cfg.train.resources_per_worker
                or ({"CPU": 1} if not cfg.train.use_gpu else None),
            ),
            run_config=RunConfig(
                name=f"{stage.key}-fold{fold}",
                storage_path=storage_str,
                checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.checkpoints_to_keep),
                failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            ),
        )
        try:
            result = trainer.fit()
        except Exception as err:  # a training error: keep what is checkpointed, say where
            raise RuntimeError(f"training fold {fold} failed: {err}") from err
        if result.checkpoint is None:
            raise RuntimeError(f"training fold {fold} finished without a checkpoint")
        with result.checkpoint.as_directory() as d:
            saved = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=True)
        st = saved["state"]
        best = st["best_model"] if st["best_model"] is not None else saved["model"]
        tmp = fdir / ".best.pt.tmp"
        torch.save(best, tmp)
        os.replace(tmp, fdir / "best.pt")
        plot_learning_curve(st["history"], fdir / "learning_curve.png")
        book.client.log_artifact(run_id, str(fdir / "learning_curve.png"))
        info = {
            "fold": fold,
            "best_val_rmse": st["best_rmse"],
            "best_epoch": st["best_epoch"],
            "epochs_run": st["epoch"] + 1,
            "seconds": time.perf_counter() - t0,
            "run_id": run_id,
            "weights": str(fdir / "best.pt"),
            "checkpoint": result.checkpoint.path,
            "history": st["history"],
        }
        book.client.log_metric(run_id, "best_val_rmse", st["best_rmse"])
        book.client.set_terminated(run_id)
        write_json_atomic(fdir / "result.json", info)
        results[fold] = info

    rmsecv = math.sqrt(sum(r["best_val_rmse"] ** 2 for r in results.values()) / len(results))
    history = [dict(h, fold=f) for f, r in results.items() for h in r["history"]]
    plot_learning_curve(history, stage.path / "learning_curve.png")
    book.client.log_artifact(parent, str(stage.path / "learning_curve.png"))
    book.client.log_metric(parent, "rmsecv", rmsecv)
    book.client.set_terminated(parent)
    model_card = {
        "unet": asdict(ucfg),
        "targets": cfg.targets,
        "folds": sorted(results),
        "weights": [f"fold{f}/best.pt" for f in sorted(results)],
    }
    write_json_atomic(stage.path / "model.json", model_card)
    summary = {
        "mlflow_run_id": parent,
        "tracking_uri": uri,
        "fold_run_ids": {f: r["run_id"] for f, r in results.items()},
        "checkpoints": {f: r["checkpoint"] for f, r in results.items()},
        "weights": {f: r["weights"] for f, r in results.items()},
        "val_rmse": {f: r["best_val_rmse"] for f, r in results.items()},
        "rmsecv": rmsecv,
        "seconds": time.perf_counter() - t_start,
        "dataset": str(store),
        "dataset_key": dataset.key,
    }
    stage.finish(summary, dump_config(cfg))
    log(f"train: RMSECV {rmsecv:.3f} over folds {sorted(results)} ({summary['seconds']:.0f} s)")
    return stage
