"""Training speed: chemmap's Ray Train loop against a plain single-process PyTorch loop.

Both train the default pipeline's U-Net on the default pipeline's dataset (fold 1: its
training samples, one sample per optimiser step, random flips, the paper's loss with
chemmap's loss functions, Adam) and validate on the fold's validation samples each epoch.

- **plain**: one process, every input preprocessed into memory first, ``net(x)`` on each
  image, ``loss.backward()``, ``opt.step()``; ``torch.set_num_threads(threads)``.
- **chemmap**: :func:`chemmap.train.trainer.train_ensemble` as ``chemmap train`` runs it:
  Ray Train workers (DDP over gloo with 2), the input cache, the prefetching thread,
  MLflow metrics, a checkpoint and ``ray.train.report`` every epoch; ``train.torch_threads``
  threads per worker.

Steady state is the epochs after the first ``--warmup``: training pixels per second (sample
pixels of the training pass / its seconds, rank 0's clock) and per second of the whole epoch
(validation, metrics, checkpoint and report included). Start-up is reported apart: for
chemmap the stage's wall time less its epochs (worker group start, dataset open, model,
MLflow runs, writing the fold's results), and Ray's start once (``ray.init``); for the plain
loop reading the inputs and building the model. Runs are interleaved, ``--repeats`` rounds.

    .venv/bin/python bench/train.py                  # ~6 min on 2 cores (the dataset: `make run`'s, or made)
    .venv/bin/python bench/train.py --json bench/out/train.json
    .venv/bin/python bench/train.py --tiny           # smoke run, seconds: CI preset, Ray Train's local mode
    python bench/train.py --gpu --repeats 2          # a CUDA machine: both loops on the GPU, bf16, 1 worker

Target: chemmap with one worker >= 0.9x the plain loop's steady-state pixels/s at the same
number of threads; the speed-up with two workers is reported against both plain loops.
``--tiny`` runs chemmap's loop in Ray Train's local mode (in this process, no workers): a
smoke run of this script, its figures mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from anywhere without installing

from chemmap.config import ChemmapConfig, load_config  # noqa: E402
from chemmap.models.loss import l2_penalty  # noqa: E402
from chemmap.models.unet import UNet  # noqa: E402
from chemmap.pipeline import preprocess_stage  # noqa: E402
from chemmap.preprocess.store import Dataset  # noqa: E402
from chemmap.stages import StageDir  # noqa: E402
from chemmap.train.objective import sample_loss, scan_sums  # noqa: E402
from chemmap.train.trainer import connect_ray, plan_training, train_ensemble, worker_config  # noqa: E402

FOLD = 1


# ----------------------------------------------------------------------------- plain PyTorch


def plain_loop(cfg: ChemmapConfig, pre: StageDir, epochs: int, threads: int) -> dict[str, Any]:
    """The textbook loop on the same model, data, loss and optimiser; its per-epoch figures.

    With ``train.use_gpu`` it runs on the first CUDA device, every input moved there first,
    under bf16 autocast as chemmap's loop runs there (``train.amp: auto``).
    """
    torch.set_num_threads(threads)
    device = torch.device("cuda" if cfg.train.use_gpu else "cpu")
    t0 = time.perf_counter()
    plan = plan_training(cfg, pre)
    data = Dataset(plan.store)
    train_ids = data.ids([s for s in data.splits if s not in (0, FOLD)])
    val_ids = data.ids([FOLD])

    def load(sid: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
        out = []
        for scan in data.samples[sid].scans:
            h, w = data.shape(scan)
            x = data.model_input(data.raw_window(scan, 0, 0, h, w))  # (C, H, W)
            out.append((torch.from_numpy(x).to(device), torch.from_numpy(data.mask(scan)).to(device)))
        return out

    inputs = {sid: load(sid) for sid in train_ids + val_ids}
    targets = {
        sid: torch.tensor(data.samples[sid].targets, dtype=torch.float32, device=device) for sid in inputs
    }
    torch.manual_seed(cfg.seed * 1000 + FOLD)
    net = UNet(plan.unet).to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    for x, _ in inputs[train_ids[0]]:
        if not (net.accepts(x.shape[-2]) and net.accepts(x.shape[-1])):
            raise SystemExit(
                f"the plain loop feeds whole images: {tuple(x.shape)} is not accepted by the model"
            )
    opt = torch.optim.Adam(net.parameters(), lr=cfg.train.lr)
    tcfg = cfg.train
    startup = time.perf_counter() - t0
    rng = np.random.default_rng(cfg.seed)
    history = []
    for _ in range(epochs):
        t = time.perf_counter()
        net.train()
        pixels = 0
        for i in rng.permutation(len(train_ids)):
            sid = train_ids[i]
            opt.zero_grad(set_to_none=True)
            parts = []
            for x, m in inputs[sid]:
                dims = [d for d in (-2, -1) if tcfg.augment.flips and rng.integers(2)]
                if dims:
                    x, m = x.flip(dims), m.flip(dims)
                with autocast:
                    parts.append(scan_sums(net(x[None])[0], m))  # (T, H, W) map
                pixels += int(m.sum())
            loss = sample_loss(parts, targets[sid], tcfg.loss)["loss"] + tcfg.loss.l2 * l2_penalty(net)
            loss.backward()
            opt.step()
        _sync(device)
        train_s = time.perf_counter() - t
        net.eval()
        with torch.no_grad(), autocast:
            sq = 0.0
            for sid in val_ids:
                parts = [scan_sums(net(x[None])[0], m) for x, m in inputs[sid]]
                sq += float(sample_loss(parts, targets[sid], tcfg.loss)["mse"])
        history.append({"pixels": pixels, "train_seconds": train_s, "epoch_seconds": time.perf_counter() - t})
    return {"startup_s": startup, "history": history}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- chemmap


def _train_cfg(
    config: Path, work: Path, epochs: int, workers: int, threads: int, gpu: bool = False
) -> ChemmapConfig:
    return load_config(
        config,
        [
            f"workdir={work}",
            f"cluster.tracking_uri=sqlite:///{work / 'mlflow.db'}",
            f"train.folds=[{FOLD}]",
            f"train.epochs={epochs}",
            f"train.early_stopping={epochs}",  # the same number of epochs in every run
            f"train.num_workers={max(workers, 1)}",
            f"train.torch_threads={threads}",
            f"train.use_gpu={str(gpu).lower()}",
        ],
    )


def chemmap_loop(cfg: ChemmapConfig, pre: StageDir) -> dict[str, Any]:
    """``train_ensemble`` on one fold; per-epoch figures from the fold's ``result.json``."""
    t0 = time.perf_counter()
    stage = train_ensemble(cfg, pre, progress=False, log=lambda s: None)
    wall = time.perf_counter() - t0
    result = json.loads((stage.path / f"fold{FOLD}" / "result.json").read_text())
    return {"wall_s": wall, "history": _epochs(result["history"])}


def chemmap_local(cfg: ChemmapConfig, pre: StageDir) -> dict[str, Any]:
    """chemmap's worker loop in Ray Train's local mode (in this process, no workers): --tiny.

    Local mode keeps no checkpoint: the epochs' metrics are taken as the loop reports them.
    """
    import ray.train
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from chemmap.train.loop import train_folds

    plan = plan_training(cfg, pre)
    history: list[dict[str, float]] = []
    report = ray.train.report

    def record(metrics: dict[str, Any], *a: Any, **kw: Any) -> None:
        history.append(dict(metrics))
        report(metrics, *a, **kw)

    t0 = time.perf_counter()
    trainer = TorchTrainer(
        train_folds,
        train_loop_config=worker_config(cfg, plan, [FOLD]),
        scaling_config=ScalingConfig(num_workers=0),
        run_config=RunConfig(name="bench-local", storage_path=str(cfg.workdir_path / "ray")),
    )
    ray.train.report = record
    try:
        trainer.fit()
    finally:
        ray.train.report = report
    return {"wall_s": time.perf_counter() - t0, "history": _epochs(history)}


def _epochs(history: list[dict[str, float]]) -> list[dict[str, float]]:
    return [
        {
            "pixels": h["pixels_per_s"] * h["train_seconds"],
            "train_seconds": h["train_seconds"],
            "epoch_seconds": h["epoch_seconds"],
            "data_seconds": h.get("data_seconds", 0.0),
            "val_seconds": h.get("val_seconds", 0.0),
        }
        for h in history
    ]


# ----------------------------------------------------------------------------- figures


def steady(run: dict[str, Any], warmup: int) -> dict[str, float]:
    """Pixels per second over the epochs after ``warmup``: training pass and whole epoch."""
    hist = run["history"][warmup:] or run["history"][-1:]
    pixels = sum(h["pixels"] for h in hist)
    out = {
        "train_px_s": pixels / sum(h["train_seconds"] for h in hist),
        "epoch_px_s": pixels / sum(h["epoch_seconds"] for h in hist),
        "epoch_s": statistics.mean(h["epoch_seconds"] for h in hist),
    }
    if "wall_s" in run:  # chemmap: what the stage took beyond its epochs
        out["startup_s"] = run["wall_s"] - sum(h["epoch_seconds"] for h in run["history"])
    else:
        out["startup_s"] = run["startup_s"]
    return out


def dataset(config: Path, workdir: Path | None) -> StageDir:
    """The config's dataset stage (made if missing; found where `make run` left it by default)."""
    base = load_config(config, [f"workdir={workdir}"] if workdir else [])
    t = time.perf_counter()
    pre = preprocess_stage(base, progress=False, log=lambda s: None)
    print(f"dataset {pre.path} ({time.perf_counter() - t:.1f} s)", flush=True)
    return pre


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--config", type=Path, default=ROOT / "pipelines" / "pork_belly.yaml")
    parser.add_argument("--workdir", type=Path, help="where the dataset stage is (default: the config's)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1, help="epochs left out of the steady state")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads of the plain loop and per worker"
    )
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", type=Path, help="write every run's figures here")
    parser.add_argument(
        "--tiny", action="store_true", help="CI preset, 2 epochs, Ray Train local mode: seconds"
    )
    parser.add_argument(
        "--gpu", action="store_true", help="both loops on the first CUDA device, bf16 autocast; one worker"
    )
    args = parser.parse_args()
    tmp = tempfile.TemporaryDirectory(prefix="chemmap-bench-train-")
    work = Path(tmp.name)
    if args.tiny:
        args.config, args.workdir = ROOT / "configs" / "ci.yaml", work / "data"
        args.epochs, args.warmup, args.workers, args.repeats = 2, 1, [0], 1
    if args.gpu:
        if not torch.cuda.is_available():
            raise SystemExit("--gpu: this machine has no CUDA device")
        args.workers = [1]  # one device: DDP (NCCL) cannot put two ranks on it
    print(
        f"torch {torch.__version__}, python {platform.python_version()}, {os.cpu_count()} CPUs, "
        f"{args.threads} torch thread(s) per process; {args.config.name}, fold {FOLD}, "
        f"{args.epochs} epochs ({args.warmup} warm-up)"
        + (f"; {torch.cuda.get_device_name(0)}, bf16 autocast" if args.gpu else ""),
        flush=True,
    )
    pre = dataset(args.config, args.workdir)
    ray_s = 0.0
    if not args.tiny:
        t = time.perf_counter()
        connect_ray(None, num_cpus=max(os.cpu_count() or 1, max(args.workers)))
        ray_s = time.perf_counter() - t
        print(f"ray.init {ray_s:.1f} s", flush=True)
    plans = [("plain", 1, args.threads)] + [("chemmap", w, args.threads) for w in args.workers]
    if not args.tiny and max(args.workers) > 1:
        plans.append(("plain", 1, args.threads * max(args.workers)))  # the same cores, as threads
    rows: list[dict[str, Any]] = []
    for rep in range(args.repeats):
        for loop, workers, threads in plans:
            run_dir = work / f"{loop}-w{workers}-t{threads}-r{rep}"
            cfg = _train_cfg(args.config, run_dir, args.epochs, workers, threads, args.gpu)
            if loop == "plain":
                run = plain_loop(cfg, pre, args.epochs, threads)
            else:
                run = chemmap_local(cfg, pre) if workers == 0 else chemmap_loop(cfg, pre)
            fig = steady(run, args.warmup)
            rows.append(
                {"loop": loop, "workers": workers, "threads": threads, "repeat": rep, **fig, "run": run}
            )
            print(
                f"  round {rep + 1}: {loop:7s} workers {workers} x {threads} thread(s): "
                f"{fig['train_px_s'] / 1e3:6.1f} kpx/s training, "
                f"{fig['epoch_px_s'] / 1e3:6.1f} kpx/s per epoch ({fig['epoch_s']:.2f} s), "
                f"start-up {fig['startup_s']:.1f} s",
                flush=True,
            )
    report(rows, args, ray_s)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"ray_init_s": ray_s, "rows": rows}, indent=1))
    tmp.cleanup()


def report(rows: list[dict[str, Any]], args: argparse.Namespace, ray_s: float) -> None:
    """Medians over the rounds, and ratios against the plain loop at ``--threads``."""

    def med(loop: str, workers: int, threads: int, key: str) -> float:
        return statistics.median(
            r[key] for r in rows if (r["loop"], r["workers"], r["threads"]) == (loop, workers, threads)
        )

    anchor = med("plain", 1, args.threads, "train_px_s")
    anchor_epoch = med("plain", 1, args.threads, "epoch_px_s")
    print(f"\nmedians of {args.repeats} round(s); ratios against plain x {args.threads} thread(s)")
    print("| loop | workers x threads | training kpx/s | ratio | per-epoch kpx/s | ratio | start-up s |")
    print("|---|---|---:|---:|---:|---:|---:|")
    seen = []
    for r in rows:
        key = (r["loop"], r["workers"], r["threads"])
        if key in seen:
            continue
        seen.append(key)
        train, epoch = med(*key, "train_px_s"), med(*key, "epoch_px_s")
        print(
            f"| {key[0]} | {key[1]} x {key[2]} | {train / 1e3:.1f} | {train / anchor:.2f} | "
            f"{epoch / 1e3:.1f} | {epoch / anchor_epoch:.2f} | {med(*key, 'startup_s'):.1f} |"
        )
    if ray_s:
        print(f"(chemmap's start-up excludes ray.init: {ray_s:.1f} s, once per `chemmap run`)")
    if args.tiny:
        print("(--tiny: a smoke run; chemmap in Ray Train's local mode; the figures mean nothing)")


if __name__ == "__main__":
    main()
