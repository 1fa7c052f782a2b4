"""The Ray Train worker loop: one fold of the paper's recipe, DDP over N workers.

DDP rules (DESIGN.md): every rank takes the same number of optimiser steps (padding with
zero-weight samples), a step's samples (and patches) accumulate under ``no_sync()`` with
one gradient synchronisation on the step's last backward, augmentations come from a seed
per (sample, epoch), L2 is added once per step, and early stopping looks at validation
metrics all-reduced over the ranks, so every rank stops at the same epoch.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from chemmap.config import AugmentSection, LossSection, TrainSection
from chemmap.models.loss import l2_penalty
from chemmap.train.data import Prefetcher, ZarrSamples, sample_views, shard_for_rank
from chemmap.train.objective import sample_loss, scan_sums

STATE_FILE = "state.pt"


def forward_map(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The map of a whole image with gradients: ``(C, H, W)`` -> ``(T, H, W)``.

    :func:`chemmap.models.tiling.forward_full` through the (possibly DDP-wrapped) model,
    whose geometry questions go to the net inside.
    """
    from chemmap.models.tiling import forward_full

    net = model.module if hasattr(model, "module") else model
    return forward_full(_Geometric(model, net) if model is not net else model, x)


class _Geometric(torch.nn.Module):
    """Calls the (DDP-wrapped) model but answers geometry questions (margin, stride...) as the net."""

    def __init__(self, model: torch.nn.Module, net: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        object.__setattr__(self, "_net", net)  # not a submodule: parameters come via self.model
        self.config = getattr(net, "config", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_net"), name)


def sync_step(
    model: torch.nn.Module, net: torch.nn.Module, in_channels: int, extra: torch.Tensor | None
) -> None:
    """One DDP gradient synchronisation after a step accumulated under ``no_sync``.

    A minimal forward through DDP and a backward of ``0 * output + extra`` (the step's L2
    term) make DDP all-reduce the accumulated ``.grad`` of every parameter exactly once.
    """
    from chemmap.models.tiling import canvas_pads

    top, bottom, left, right = canvas_pads(net, 1, 1)
    param = next(net.parameters())
    x = torch.zeros(
        1, in_channels, 1 + top + bottom, 1 + left + right, device=param.device, dtype=param.dtype
    )
    was_training = net.training
    net.eval()  # batch norm must not learn running statistics from the zero input
    out = model(x).sum() * 0.0
    net.train(was_training)
    (out if extra is None else out + extra).backward()


def patch_backward(model, net, views, y, loss_w: LossSection, geometry, core: int, halo: int, scale: float):
    """The exact gradient of one sample (one or more scans) from patches (:mod:`chemmap.models.patched`).

    A no-grad tiled pass over every scan gives the sample's mean; then each scan's patches
    backpropagate their share, so memory stays one patch whatever the sample's size.
    """
    from chemmap.models.loss import LossConfig
    from chemmap.models.patched import patched_backward, patched_sum
    from chemmap.models.tiling import core_windows, read_padded

    geo_model = _Geometric(model, net)
    jobs = []
    for v in views:
        read = (lambda view: lambda y0, x0, y1, x1: read_padded(view, y0, x0, y1, x1))(v)
        jobs.append((read, core_windows(*v.hw, core, geometry.stride), torch.from_numpy(v.mask())))
    sums = [patched_sum(geo_model, read, win, m, halo, geometry=geometry) for read, win, m in jobs]
    totals = (sum(s for s, _ in sums), sum(n for _, n in sums))
    lc = LossConfig(
        mean=loss_w.mean, smooth=loss_w.smooth, out_of_range=loss_w.out_of_range, l2=0.0, pixel=0.0
    )
    terms: dict[str, float] = {"smooth": 0.0, "out_of_range": 0.0}
    for read, win, m in jobs:
        t = patched_backward(
            geo_model, read, win, m, y, lc, halo, geometry=geometry, scale=scale, sample_totals=totals
        )
        terms["smooth"] += t["smooth"]
        terms["out_of_range"] += t["out_of_range"]
        terms["mean"] = t["mean"]  # the sample's: the same from every scan
    terms["total"] = (
        lc.mean * terms["mean"] + lc.smooth * terms["smooth"] + lc.out_of_range * terms["out_of_range"]
    )
    return terms


def _autocast(device: torch.device, amp: str):
    use = amp == "bf16" or (amp == "auto" and device.type == "cuda")
    if use:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def predict_sample(model, views, device, amp: str) -> tuple[np.ndarray, list[np.ndarray]]:
    """Mean prediction ``(T,)`` of a sample and its maps (no gradients, eval mode)."""
    from chemmap.models.tiling import predict_full

    net = model.module if hasattr(model, "module") else model
    total, n, maps = None, 0, []
    with torch.no_grad(), _autocast(device, amp):
        for v in views:
            m = torch.from_numpy(v.mask())
            p = predict_full(net, torch.from_numpy(v.full()).to(device)).float().cpu()  # (T, H, W)
            s = (p * m).sum(dim=(-2, -1))
            total = s if total is None else total + s
            n += int(m.sum())
            maps.append(p.numpy())
    return (total / max(n, 1)).numpy(), maps


def _reduce(values: list[float], device: torch.device) -> list[float]:
    """Sum over ranks (identity without a process group)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(t)
    return t.cpu().tolist()


def _debug_hooks(debug: dict[str, Any], epoch: int, rank: int, step: int, steps: int) -> None:
    """Fault injection for the tests (``train_stage(..., debug=...)``); a no-op otherwise.

    ``kill_once``: ``{"epoch", "rank", "marker"}`` -- that worker process dies mid-epoch, once
    (the marker file records it did). ``stop_at_epoch``: rank 0 raises at that epoch's start,
    as if the job were stopped.
    """
    kill = debug.get("kill_once")
    if kill and kill["epoch"] == epoch and kill["rank"] == rank and step == steps // 2:
        marker = Path(kill["marker"])
        if not marker.exists():
            marker.write_text(f"worker {rank} died at epoch {epoch}, step {step}\n")
            os._exit(1)
    if debug.get("stop_at_epoch") == epoch and rank == 0 and step == 0:
        raise RuntimeError(f"stopped at epoch {epoch} (test hook)")


def _param_digest(net: torch.nn.Module) -> str:
    import hashlib

    h = hashlib.sha256()
    for k, v in sorted(net.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def train_fold(config: dict[str, Any]) -> None:
    """Ray Train entry point (``train_loop_per_worker``) for one fold.

    ``config`` keys: store, model (UNetConfig fields), train (TrainSection dump), fold,
    seed, tracking_uri, run_id (MLflow run of this fold or None), threads.
    """
    import ray.train
    import ray.train.torch as rt

    from chemmap.models.unet import UNet, UNetConfig

    tcfg = TrainSection.model_validate(config["train"])
    debug = config.get("debug") or {}
    loss_w: LossSection = tcfg.loss
    augment: AugmentSection = tcfg.augment
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if config.get("threads"):
        torch.set_num_threads(int(config["threads"]))
    seed, fold = int(config["seed"]), int(config["fold"])
    torch.manual_seed(seed * 1000 + fold)  # same initial weights on every rank (DDP broadcasts anyway)

    data = ZarrSamples(config["store"])
    train_ids = data.ids([s for s in range(1, 100) if s != fold])
    val_ids = data.ids([fold])
    model = UNet(UNetConfig(**config["model"]))
    opt = torch.optim.Adam(model.parameters(), lr=tcfg.lr)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
        opt, mode="min", factor=tcfg.plateau_factor, patience=tcfg.plateau_patience
    )
    state: dict[str, Any] = {
        "epoch": -1,
        "best_rmse": math.inf,
        "best_epoch": -1,
        "bad_epochs": 0,
        "history": [],
        "best_model": None,
    }
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            saved = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=True)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        sched.load_state_dict(saved["scheduler"])
        state = saved["state"]

    if ckpt is None and hasattr(model, "head") and model.head.bias is not None:
        # Start from the training mean instead of 0 %: the first epochs then learn contrast, not offset.
        mean_y = np.mean([data.samples[s].targets for s in train_ids], axis=0)
        with torch.no_grad():
            model.head.bias.copy_(torch.as_tensor(mean_y, dtype=model.head.bias.dtype))
    model = rt.prepare_model(model)  # DDP over the workers (moves to the worker's device)
    device = rt.get_device()
    net = model.module if hasattr(model, "module") else model
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    client = None
    if rank == 0 and config.get("run_id"):
        from chemmap.tracking import client as mlflow_client

        client = mlflow_client(config["tracking_uri"])

    patches = tcfg.mode == "patches"
    if patches:
        from chemmap.models.tiling import model_geometry

        geometry = model_geometry(net)
        pk = data.root["patches"][next(iter(data.root["patches"].array_keys()))].attrs
        core = int(pk["core"]) if int(pk["core"]) % geometry.stride == 0 else 4 * geometry.stride
        halo = max(int(pk["halo"]), geometry.radius)

    def load(item):
        sid, weight = item
        views = sample_views(data, sid, epoch, seed, augment)
        if patches:  # windows are read on demand: memory is one patch, not one image
            return sid, weight, views
        return sid, weight, [(torch.from_numpy(v.full()), torch.from_numpy(v.mask())) for v in views]

    for epoch in range(state["epoch"] + 1, tcfg.epochs):
        t0 = time.perf_counter()
        items, steps = shard_for_rank(train_ids, rank, world, tcfg.batch_size, rng_seed=seed * 7919 + epoch)
        model.train()
        sums = np.zeros(4)  # loss, mse, weight, pixels
        batches = Prefetcher(items, load, depth=tcfg.prefetch)
        it = iter(batches)
        for step in range(steps):
            _debug_hooks(debug, epoch, rank, step, steps)
            opt.zero_grad(set_to_none=True)
            if patches:
                for _ in range(tcfg.batch_size):
                    sid, weight, views = next(it)
                    y = torch.tensor(data.samples[sid].targets, dtype=torch.float32, device=device)
                    with model.no_sync() if hasattr(model, "no_sync") else contextlib.nullcontext():
                        t = patch_backward(
                            model,
                            net,
                            views,
                            y,
                            loss_w,
                            geometry,
                            core,
                            halo,
                            scale=weight / tcfg.batch_size,
                        )
                    n_px = sum(int(v.mask().sum()) for v in views)
                    sums += [t["total"] * weight, t["mean"] * weight, weight, n_px * weight]
                l2 = loss_w.l2 * l2_penalty(net) if loss_w.l2 else None
                if hasattr(model, "no_sync"):
                    sync_step(model, net, data.n_channels, l2)
                elif l2 is not None:
                    l2.backward()
                opt.step()
                continue
            for j in range(tcfg.batch_size):
                sid, weight, scans = next(it)
                y = torch.tensor(data.samples[sid].targets, dtype=torch.float32, device=device)
                last = j == tcfg.batch_size - 1
                sync = (
                    contextlib.nullcontext() if (last or not hasattr(model, "no_sync")) else model.no_sync()
                )
                with sync, _autocast(device, tcfg.amp):
                    parts = [
                        scan_sums(forward_map(model, x.to(device)).float(), m.to(device)) for x, m in scans
                    ]
                    terms = sample_loss(parts, y, loss_w)
                    loss = terms["loss"] * (weight / tcfg.batch_size)
                    if last and loss_w.l2:
                        loss = loss + loss_w.l2 * l2_penalty(net)  # once per optimiser step
                    loss.backward()
                sums += [
                    float(terms["loss"].detach()) * weight,
                    float(terms["mse"].detach()) * weight,
                    weight,
                    sum(int(m.sum()) for _, m in scans) * weight,
                ]
            opt.step()
        train_seconds = time.perf_counter() - t0

        model.eval()
        sq = np.zeros(2)
        for sid in val_ids[rank::world]:
            mean_pred, _ = predict_sample(model, sample_views(data, sid, 0, seed, None), device, tcfg.amp)
            sq += [float(((mean_pred - np.asarray(data.samples[sid].targets)) ** 2).mean()), 1.0]
        tot = _reduce([*sums.tolist(), *sq.tolist()], device)
        loss_sum, mse_sum, n_train, pixels, val_sq, n_val = tot
        val_rmse = math.sqrt(val_sq / max(n_val, 1))
        metrics = {
            "epoch": epoch,
            "train_loss": loss_sum / max(n_train, 1),
            "train_rmse": math.sqrt(mse_sum / max(n_train, 1)),
            "val_rmse": val_rmse,
            "val_loss": val_sq / max(n_val, 1),
            "lr": opt.param_groups[0]["lr"],
            "pixels_per_s": pixels / max(train_seconds, 1e-9),
            "epoch_seconds": time.perf_counter() - t0,
        }
        sched.step(metrics["val_loss"])
        if val_rmse < state["best_rmse"] - 1e-9:
            state.update(best_rmse=val_rmse, best_epoch=epoch, bad_epochs=0)
            state["best_model"] = copy.deepcopy({k: v.detach().cpu() for k, v in net.state_dict().items()})
        else:
            state["bad_epochs"] += 1
        state["epoch"] = epoch
        state["history"].append(metrics)
        stop = state["bad_epochs"] >= tcfg.early_stopping  # identical on every rank: metrics are reduced
        metrics["stop"] = int(stop)

        if rank == 0:  # one line per epoch on the driver's console (Ray forwards worker output)
            print(
                f"fold {fold} epoch {epoch + 1}/{tcfg.epochs}: train RMSE {metrics['train_rmse']:.3f}, "
                f"val RMSE {val_rmse:.3f}, lr {metrics['lr']:.2g}, {metrics['epoch_seconds']:.1f} s"
                + (" (best)" if state["best_epoch"] == epoch else ""),
                flush=True,
            )
        if debug.get("digest_dir"):  # every rank records its parameters: DDP keeps them identical
            Path(debug["digest_dir"], f"epoch{epoch}_rank{rank}.txt").write_text(_param_digest(net))
        if client is not None:
            from chemmap.tracking import log_metrics

            log_metrics(client, config["run_id"], {k: v for k, v in metrics.items() if k != "epoch"}, epoch)
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if rank == 0:
                torch.save(
                    {
                        "model": {k: v.detach().cpu() for k, v in net.state_dict().items()},
                        "optimizer": opt.state_dict(),
                        "scheduler": sched.state_dict(),
                        "state": state,
                    },
                    Path(tmp) / STATE_FILE,
                )
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"epoch_{epoch:04d}")
        if stop:
            break
