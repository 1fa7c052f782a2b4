"""The Ray Train worker loop: one fold of the paper's recipe, DDP over N workers.

DDP rules (DESIGN.md): every rank takes the same number of optimiser steps (padding with
zero-weight samples), a step's samples (and patches) accumulate under ``no_sync()`` with
one gradient synchronisation on the step's last backward, augmentations come from a seed
per (sample, epoch), L2 is added once per step, and early stopping looks at validation
metrics all-reduced over the ranks, so every rank stops at the same epoch.

One epoch, step by step: :func:`train_epoch` (:func:`whole_step` or :func:`patch_step` per
optimiser step), :func:`validate`, :func:`epoch_metrics`, :func:`update_state`, then
:func:`report_epoch` (MLflow from rank 0, the checkpoint, ``ray.train.report``).

The folds of a training run one after another in one worker group (:func:`train_folds`):
starting Ray Train's workers (processes, imports, the process group) took 15-20 s, as long
as four epochs of the default pipeline, so a worker group per fold cost more than a fold's
tenth. Each fold starts from its own seed, so it trains exactly as it would alone. Every
checkpoint names the folds finished so far and the checkpoint each one ended with (kept
for good: :func:`checkpoint_score`); a restarted worker group skips them and goes on with
the fold it was in.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import hashlib
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from chemmap import tracking
from chemmap.config import AugmentSection, LossSection, TrainSection
from chemmap.models.loss import LossConfig, Smoothness, l2_penalty, output_grid_mask, weighted_total
from chemmap.models.patched import patched_backward, patched_sum
from chemmap.models.pls import MAX_COMPONENTS, PLSBaseline
from chemmap.models.ridge import ridge_loo
from chemmap.models.tiling import Geometry, canvas_pads, forward_full, predict_full, read_padded
from chemmap.models.unet import UNet, UNetConfig, channels_last_2d
from chemmap.preprocess.store import Dataset, PatchIndex
from chemmap.train.data import InputCache, Prefetcher, ScanView, sample_views, shard_for_rank
from chemmap.train.feed import send, send_done
from chemmap.train.objective import blind_spot, residual_form, sample_loss, scan_sums
from chemmap.train.pathfit import draw_pixels, fit_path

STATE_FILE = "state.pt"


# ----------------------------------------------------------------------------- model calls


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


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


def forward_map(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The map of a whole image with gradients: ``(C, H, W)`` -> ``(T, H, W)``.

    :func:`chemmap.models.tiling.forward_full` through the (possibly DDP-wrapped) model,
    whose geometry questions go to the net inside.
    """
    net = _unwrap(model)
    return forward_full(_Geometric(model, net) if model is not net else model, x)


def sync_step(
    model: torch.nn.Module, net: torch.nn.Module, in_channels: int, extra: torch.Tensor | None
) -> None:
    """One DDP gradient synchronisation after a step accumulated under ``no_sync``.

    A minimal forward through DDP and a backward of ``0 * output + extra`` (the step's L2
    term) make DDP all-reduce the accumulated ``.grad`` of every parameter exactly once.
    """
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


@dataclass(frozen=True)
class PatchPlan:
    """What patch-wise training needs: the dataset's patch index, its halo, the model's geometry."""

    index: PatchIndex
    halo: int  # the index's halo (checked >= geometry.radius on the driver)
    geometry: Geometry


def sample_backward_by_patches(
    model: torch.nn.Module,
    net: torch.nn.Module,
    views: list[ScanView],
    y: torch.Tensor,
    loss_w: LossSection,
    plan: PatchPlan,
    scale: float,
) -> dict[str, float]:
    """Accumulate the exact gradient of one sample (one or more scans) patch by patch.

    The patches are the dataset's patch-index windows mapped into each view
    (:meth:`ScanView.patch_windows`). A no-grad tiled pass over every scan gives the
    sample's mean; then each scan's patches backpropagate their share
    (:func:`chemmap.models.patched.patched_backward`), so memory stays one patch whatever
    the sample's size. Returns the sample's unweighted terms and their weighted ``total``.
    """
    geo_model = _Geometric(model, net)
    jobs = [
        (functools.partial(read_padded, v), v.patch_windows(plan.index), torch.from_numpy(v.mask()))
        for v in views
    ]
    sums = [patched_sum(geo_model, read, win, m, plan.halo, geometry=plan.geometry) for read, win, m in jobs]
    totals = (sum(s for s, _ in sums), sum(n for _, n in sums))
    lc = image_loss_config(loss_w)
    terms: dict[str, float] = {"smooth": 0.0, "out_of_range": 0.0}
    for read, win, m in jobs:
        t = patched_backward(
            geo_model,
            read,
            win,
            m,
            y,
            lc,
            plan.halo,
            geometry=plan.geometry,
            scale=scale,
            sample_totals=totals,
        )
        terms["smooth"] += t["smooth"]
        terms["out_of_range"] += t["out_of_range"]
        terms["mean"] = t["mean"]  # the sample's: the same from every scan
    terms["total"] = weighted_total(terms, lc)
    return terms


def image_loss_config(loss_w: Any) -> LossConfig:
    """The image loss's weights and forms from the training config's loss section, L2 left out
    (it is added once per step). Every field of :class:`LossConfig` is carried: patch mode
    once took only the three weights, and so trained with the quadratic smoothness whatever
    ``smooth_penalty`` said."""
    fields = {f.name: getattr(loss_w, f.name) for f in dataclasses.fields(LossConfig) if f.name != "l2"}
    return LossConfig(**fields, l2=0.0)


def _autocast(device: torch.device, amp: str):
    use = amp == "bf16" or (amp == "auto" and device.type == "cuda")
    if use:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def predict_sample(model, views, device, amp: str) -> tuple[np.ndarray, list[np.ndarray]]:
    """Mean prediction ``(T,)`` of a sample and its maps (no gradients, eval mode)."""
    net = _unwrap(model)
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


def _debug_hooks(debug: dict[str, Any], epoch: int, rank: int, step: int, steps: int, fold: int = 0) -> None:
    """Fault injection for the tests (``train_ensemble(..., debug=...)``); a no-op otherwise.

    ``kill_once``: ``{"epoch", "rank", "marker"}`` -- that worker process dies mid-epoch, once
    (the marker file records it did). ``stop_at_epoch``: rank 0 raises at that epoch's start
    (of every fold, or of fold ``stop_in_fold`` only), as if the job were stopped.
    """
    kill = debug.get("kill_once")
    if kill and kill["epoch"] == epoch and kill["rank"] == rank and step == steps // 2:
        marker = Path(kill["marker"])
        if not marker.exists():
            marker.write_text(f"worker {rank} died at epoch {epoch}, step {step}\n")
            os._exit(1)
    if (
        debug.get("stop_at_epoch") == epoch
        and debug.get("stop_in_fold", fold) == fold
        and rank == 0
        and step == 0
    ):
        raise RuntimeError(f"stopped at epoch {epoch} (test hook)")


def _param_digest(net: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(net.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------- one worker's fold


def new_state() -> dict[str, Any]:
    """The fold's progress as checkpointed (plain values: loaded with ``weights_only=True``)."""
    return {
        "epoch": -1,
        "best_rmse": math.inf,
        "best_epoch": -1,
        "bad_epochs": 0,
        "history": [],
        "best_model": None,
    }


@dataclass
class Fold:
    """What one worker trains a fold with: built by :func:`build_fold`, updated every epoch."""

    train: TrainSection
    fold: int
    seed: int
    rank: int
    world: int
    data: Dataset
    train_ids: list[str]
    val_ids: list[str]
    model: torch.nn.Module  # DDP-wrapped when world > 1
    net: torch.nn.Module  # the U-Net inside
    opt: torch.optim.Optimizer
    sched: Any  # ReduceLROnPlateau or CosineAnnealingLR (train.schedule)
    device: torch.device
    state: dict[str, Any] = field(default_factory=new_state)
    patches: PatchPlan | None = None  # None: whole-image training
    mlflow: Any = None  # MLflow client (rank 0, when a run is given)
    run_id: str | None = None
    debug: dict[str, Any] = field(default_factory=dict)
    feed: Any = None  # rank 0: the queue its epoch lines go to the driver by (chemmap.train.feed)
    cache: InputCache | None = None  # whole scans kept between epochs (and folds)
    done: dict[int, str] = field(default_factory=dict)  # earlier folds: their last checkpoint's name


@dataclass
class EpochSums:
    """This rank's training sums of one epoch (weighted by the samples' weights)."""

    loss: float = 0.0
    mse: float = 0.0
    weight: float = 0.0
    pixels: float = 0.0
    data_seconds: float = 0.0  # waiting for the prefetcher's next sample

    def add(self, loss: float, mse: float, weight: float, pixels: int) -> None:
        self.loss += loss * weight
        self.mse += mse * weight
        self.weight += weight
        self.pixels += pixels * weight


@dataclass(frozen=True)
class LoadedSample:
    """One training sample as a step uses it; ``inputs`` are whole-view tensors (whole mode only)."""

    sample_id: str
    weight: float
    views: list[ScanView]
    inputs: list[tuple[torch.Tensor, torch.Tensor]] | None  # (x (C, H, W), mask (H, W)) per scan


@dataclass(frozen=True)
class SampleLoader:
    """Reads ``(sample_id, weight)`` items of one epoch (run by the :class:`Prefetcher`'s thread)."""

    data: Dataset
    seed: int
    epoch: int
    augment: AugmentSection
    whole: bool  # read whole views now; patch mode reads windows on demand (memory: one patch)
    cache: InputCache | None = None

    def __call__(self, item: tuple[str, float]) -> LoadedSample:
        sid, weight = item
        views = sample_views(self.data, sid, self.epoch, self.seed, self.augment, self.cache)
        inputs = None
        if self.whole:
            inputs = [(torch.from_numpy(v.full()), torch.from_numpy(v.mask())) for v in views]
        return LoadedSample(sid, weight, views, inputs)


def _load_checkpoint() -> dict[str, Any] | None:
    """The latest Ray Train checkpoint's ``state.pt`` (plain values only: ``weights_only``), or None."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return None
    with ckpt.as_directory() as d:
        return torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=True)


def _scheduler(opt: torch.optim.Optimizer, tcfg: TrainSection) -> Any:
    """The learning-rate schedule ``train.schedule`` names, stepped once per epoch."""
    if tcfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=tcfg.epochs)
    return torch.optim.lr_scheduler.ReduceLROnPlateau(
        opt, mode="min", factor=tcfg.plateau_factor, patience=tcfg.plateau_patience
    )


def _restore(model, opt, sched, saved: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """Load a checkpoint (default: Ray Train's latest) into model, optimiser and scheduler.

    Returns the fold's progress (:func:`new_state`), or None without a checkpoint.
    """
    saved = _load_checkpoint() if saved is None else saved
    if saved is None:
        return None
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["optimizer"])
    sched.load_state_dict(saved["scheduler"])
    return saved["state"]


def _start_at_training_mean(model: UNet, data: Dataset, train_ids: list[str]) -> None:
    """Head bias at the training mean instead of 0 %: the first epochs then learn contrast, not offset."""
    if model.head.bias is None:
        return
    mean_y = np.mean([data.samples[s].targets for s in train_ids], axis=0)
    with torch.no_grad():
        model.head.bias.copy_(torch.as_tensor(mean_y, dtype=model.head.bias.dtype))


def _patch_plan(config: dict[str, Any], tcfg: TrainSection, data: Dataset) -> PatchPlan | None:
    if tcfg.mode != "patches":
        return None
    index = data.patch_index()
    return PatchPlan(index, index.halo, Geometry(**config["geometry"]))


def build_fold(
    config: dict[str, Any],
    fold: int,
    data: Dataset,
    saved: dict[str, Any] | None = None,
    cache: InputCache | None = None,
    done: dict[int, str] | None = None,
) -> Fold:
    """Model, optimiser, scheduler and data of one fold on this worker.

    Args:
        config: :func:`train_folds`' config.
        fold: the CV fold (split) validated on.
        data: the dataset.
        saved: a checkpoint of this fold to resume from (:func:`_load_checkpoint`), or None.
        cache: whole scans kept in memory between epochs and folds.
        done: the folds finished before this one and their last checkpoints' names (carried in
            this fold's checkpoints).
    """
    import ray.train
    import ray.train.torch as rt

    tcfg = TrainSection.model_validate(config["train"])
    ctx = ray.train.get_context()
    seed = int(config["seed"])
    torch.manual_seed(seed * 1000 + fold)  # same initial weights on every rank (DDP broadcasts anyway)
    train_ids = data.ids([s for s in data.splits if s not in (0, fold)])
    net = UNet(UNetConfig(**config["model"]))
    # foreach: one call per Adam operation for all parameters, bitwise the same as the default loop.
    opt = torch.optim.Adam(net.parameters(), lr=tcfg.lr, foreach=True)
    sched = _scheduler(opt, tcfg)
    state = _restore(net, opt, sched, saved) if saved is not None else None
    if state is None:
        _start_at_training_mean(net, data, train_ids)
        if tcfg.spectral_init == "ridge":
            _start_from_ridge(net, data, train_ids)
        elif tcfg.spectral_init == "pls":
            _start_from_pls(net, data, train_ids)
        elif tcfg.spectral_init == "pixel":
            feed = config.get("epoch_feed") if ctx.get_world_rank() == 0 else None
            say = functools.partial(send, feed) if ctx.get_world_rank() == 0 else None
            _start_from_pixels(net, data, train_ids, tcfg, seed * 1000 + fold, say)
    if tcfg.spectral_freeze and net.spectral is not None:  # restored or not: the path stays put
        net.spectral.requires_grad_(False)
    # DDP over the workers (moves to the worker's device). Gradients as views into DDP's buckets:
    # no copy into the bucket before the all-reduce nor back after it (1-2 ms of a 35 ms step on
    # two CPU workers), the same sums.
    model = rt.prepare_model(net, parallel_strategy_kwargs={"gradient_as_bucket_view": True})
    device = rt.get_device()
    if device.type == "cuda":  # the 2-D convolutions: the front-end's Conv3d weight has no such layout
        channels_last_2d(model)
    rank = ctx.get_world_rank()
    run_id = (config.get("run_ids") or {}).get(fold) if rank == 0 else None
    return Fold(
        train=tcfg,
        fold=fold,
        seed=seed,
        rank=rank,
        world=ctx.get_world_size(),
        data=data,
        train_ids=train_ids,
        val_ids=data.ids([fold]),
        model=model,
        net=_unwrap(model),
        opt=opt,
        sched=sched,
        device=device,
        state=state if state is not None else new_state(),
        patches=_patch_plan(config, tcfg, data),
        mlflow=tracking.client(config["tracking_uri"]) if run_id else None,
        run_id=run_id,
        debug=config.get("debug") or {},
        feed=config.get("epoch_feed") if rank == 0 else None,
        cache=cache,
        done=dict(done or {}),
    )


def _target(f: Fold, sample_id: str) -> torch.Tensor:
    return torch.tensor(f.data.samples[sample_id].targets, dtype=torch.float32, device=f.device)


def _wants_parts(loss: Any) -> bool:
    """Whether the loss has the spectral path's own terms (the model must emit its map too)."""
    return getattr(loss, "spectral", 0.0) > 0 or getattr(loss, "residual", 0.0) > 0


def _scan_sums(f: Fold, x: torch.Tensor, m: torch.Tensor, form: Smoothness, residual: Smoothness):
    """One view's :func:`scan_sums`, with the spectral path's map when the loss asks for it,
    and with the blind-spot term (its pixels' spectra replaced in the input the model sees)."""
    parts = _wants_parts(f.train.loss)
    blind = None
    if getattr(f.train.loss, "blindspot", 0.0) > 0:
        assert f.net.spectral is not None  # the config requires model.spectral_path
        x_seen, pixels = blind_spot(x, m, f.train.loss.blindspot_share)
        with torch.no_grad():  # the target: the path's map from the pixels' own spectra
            own = f.net.spectral(x[:, pixels[0], pixels[1]].T[:, :, None, None].to(f.device))  # (n, T, 1, 1)
        blind = (pixels.to(f.device), own[:, :, 0, 0].T.float())  # (2, n), (T, n)
        x = x_seen
    native = getattr(f.train.loss, "grid", "input") == "output"  # the front-end's half-resolution grid
    f.net.emit_parts, f.net.native_grid = parts, native
    try:
        out = forward_map(f.model, x.to(f.device)).float()  # (T, H, W), or (2 T, H, W) with parts
    finally:
        f.net.emit_parts, f.net.native_grid = False, False
    if native:
        m = output_grid_mask(m)  # (ceil(H/2), ceil(W/2))
        out = out[..., : m.shape[-2], : m.shape[-1]]  # the canvas's extra rows off
    pred, path = out.chunk(2) if parts else (out, None)
    return scan_sums(pred, m.to(f.device), form, path, residual, blind)


def _start_from_ridge(model: UNet, data: Dataset, train_ids: list[str]) -> None:
    """The spectral path at a ridge fit of the training samples' lab values on their mean inputs."""
    spectra = [data.recipe.normalize(data.mean_spectrum(sid)) for sid in train_ids]  # input units
    y = np.asarray([data.samples[sid].targets for sid in train_ids], np.float64)
    if not np.isfinite(y).all():
        raise ValueError("train.spectral_init: ridge needs every training sample's lab values (NaN found)")
    fit = ridge_loo(np.asarray(spectra), y)
    dtype = next(model.parameters()).dtype
    coef, intercept = (torch.as_tensor(a, dtype=dtype) for a in (fit.coef, fit.intercept))
    model.start_from_spectral(coef, intercept)


def _start_from_pls(model: UNet, data: Dataset, train_ids: list[str]) -> None:
    """The spectral path at the PLS baseline of these training samples, as the evaluation fits it.

    PLS1 per target on the samples' mean spectra in stored units, centred, not scaled, with the
    component count chosen by cross-validation over the samples' own folds
    (:class:`chemmap.models.pls.PLSBaseline`): for fold ``k`` this is the model whose maps the
    evaluation's out-of-fold PLS baselines of fold ``k`` are made from. The model reads
    standardised inputs ``(x - mean) / std``, so the coefficients are carried over as
    ``coef * std`` and the intercept as ``intercept + mean @ coef``.
    """
    spectra = np.stack([data.mean_spectrum(sid) for sid in train_ids])  # stored units
    y = np.asarray([data.samples[sid].targets for sid in train_ids], np.float64)
    if not np.isfinite(y).all():
        raise ValueError("train.spectral_init: pls needs every training sample's lab values (NaN found)")
    folds = np.array([data.samples[sid].split for sid in train_ids])
    try:
        pls = PLSBaseline(max_components=min(MAX_COMPONENTS, spectra.shape[1])).fit(spectra, y, folds)
    except ValueError as err:  # e.g. one training fold: no cross-validation to choose components
        raise ValueError(f"train.spectral_init: pls: {err}") from None
    mean, std = (np.asarray(a, np.float64) for a in (data.recipe.mean, data.recipe.std))
    coef = pls.coef * std[:, None]  # (C, T) in input units
    intercept = pls.intercept + mean @ pls.coef
    dtype = next(model.parameters()).dtype
    model.start_from_spectral(*(torch.as_tensor(a, dtype=dtype) for a in (coef, intercept)))


def _start_from_pixels(
    model: UNet, data: Dataset, train_ids: list[str], tcfg: TrainSection, seed: int, say: Any = None
) -> None:
    """The spectral path fitted alone on the training samples' pixels (:mod:`chemmap.train.pathfit`),
    and the U-Net's head at zero, so training starts from the path's map. ``say``: called with
    a line on what the fit did (rank 0 sends it to the driver's console), or None."""
    assert model.spectral is not None  # the config requires model.spectral_path
    started = time.perf_counter()
    draws = draw_pixels(data, train_ids, tcfg.path_fit.pixels, seed)
    terms = fit_path(model.spectral, draws, tcfg.path_fit, seed)
    model.start_at_path()
    if say is not None:
        say(
            f"  spectral path fitted on {len(train_ids)} samples in {time.perf_counter() - started:.0f} s: "
            f"mean term {terms['mean']:.2f}, smoothness {terms['smooth']:.2f} (last step)"
        )


def whole_step(f: Fold, batch: list[LoadedSample], sums: EpochSums) -> None:
    """Gradients of one optimiser step from whole views; DDP synchronises on the last backward."""
    bs = len(batch)
    for j, s in enumerate(batch):
        last = j == bs - 1
        sync = contextlib.nullcontext() if (last or not hasattr(f.model, "no_sync")) else f.model.no_sync()
        with sync, _autocast(f.device, f.train.amp):
            form, residual = Smoothness.of(f.train.loss), residual_form(f.train.loss)
            parts = [_scan_sums(f, x, m, form, residual) for x, m in s.inputs]
            terms = sample_loss(parts, _target(f, s.sample_id), f.train.loss)
            loss = terms["loss"] * (s.weight / bs)
            if last and f.train.loss.l2:
                loss = loss + f.train.loss.l2 * l2_penalty(f.net)  # once per optimiser step
            loss.backward()
        pixels = sum(int(m.sum()) for _, m in s.inputs)
        sums.add(float(terms["loss"].detach()), float(terms["mse"].detach()), s.weight, pixels)


def patch_step(f: Fold, batch: list[LoadedSample], sums: EpochSums) -> None:
    """Gradients of one optimiser step patch by patch, under ``no_sync``; then one synchronisation."""
    assert f.patches is not None
    no_sync = f.model.no_sync if hasattr(f.model, "no_sync") else contextlib.nullcontext
    for s in batch:
        with no_sync():
            t = sample_backward_by_patches(
                f.model,
                f.net,
                s.views,
                _target(f, s.sample_id),
                f.train.loss,
                f.patches,
                scale=s.weight / len(batch),
            )
        sums.add(t["total"], t["mean"], s.weight, sum(int(v.mask().sum()) for v in s.views))
    l2 = f.train.loss.l2 * l2_penalty(f.net) if f.train.loss.l2 else None
    if hasattr(f.model, "no_sync"):
        sync_step(f.model, f.net, f.data.n_channels, l2)
    elif l2 is not None:
        l2.backward()


def train_epoch(f: Fold, epoch: int) -> EpochSums:
    """One pass over this rank's shard of the training samples: the same number of steps on every rank."""
    tcfg = f.train
    items, steps = shard_for_rank(
        f.train_ids, f.rank, f.world, tcfg.batch_size, rng_seed=f.seed * 7919 + epoch
    )
    loader = SampleLoader(f.data, f.seed, epoch, tcfg.augment, whole=f.patches is None, cache=f.cache)
    step_fn = whole_step if f.patches is None else patch_step
    f.model.train()
    sums = EpochSums()
    it = iter(Prefetcher(items, loader, depth=tcfg.prefetch))
    for step in range(steps):
        _debug_hooks(f.debug, epoch, f.rank, step, steps, f.fold)
        f.opt.zero_grad(set_to_none=True)
        t = time.perf_counter()
        batch = [next(it) for _ in range(tcfg.batch_size)]
        sums.data_seconds += time.perf_counter() - t
        step_fn(f, batch, sums)
        f.opt.step()
    return sums


def validate(f: Fold) -> tuple[float, int]:
    """This rank's share of the validation samples: ``(sum of squared errors, samples)``."""
    f.model.eval()
    sq, n = 0.0, 0
    for sid in f.val_ids[f.rank :: f.world]:
        mean_pred, _ = predict_sample(
            f.model, sample_views(f.data, sid, 0, f.seed, None, f.cache), f.device, f.train.amp
        )
        sq += float(((mean_pred - np.asarray(f.data.samples[sid].targets)) ** 2).mean())
        n += 1
    return sq, n


def epoch_metrics(
    f: Fold,
    epoch: int,
    sums: EpochSums,
    val: tuple[float, int],
    train_seconds: float,
    t0: float,
    val_seconds: float = 0.0,
) -> dict[str, float]:
    """The epoch's metrics, summed over every rank (the same numbers on all of them).

    Times are rank 0's: ``train_seconds`` (the training pass), ``data_seconds`` (of it,
    waiting for input), ``val_seconds`` and ``epoch_seconds`` (up to the report).
    """
    tot = _reduce([sums.loss, sums.mse, sums.weight, sums.pixels, *val], f.device)
    loss_sum, mse_sum, n_train, pixels, val_sq, n_val = tot
    return {
        "epoch": epoch,
        "train_loss": loss_sum / max(n_train, 1),
        "train_rmse": math.sqrt(mse_sum / max(n_train, 1)),
        "val_rmse": math.sqrt(val_sq / max(n_val, 1)),
        "val_loss": val_sq / max(n_val, 1),
        "lr": f.opt.param_groups[0]["lr"],
        "pixels_per_s": pixels / max(train_seconds, 1e-9),
        "train_seconds": train_seconds,
        "data_seconds": sums.data_seconds,
        "val_seconds": val_seconds,
        "epoch_seconds": time.perf_counter() - t0,
    }


def update_state(f: Fold, metrics: dict[str, float]) -> bool:
    """Scheduler, best epoch and early stopping; whether to stop (identical on every rank)."""
    epoch, val_rmse = int(metrics["epoch"]), metrics["val_rmse"]
    state = f.state
    if isinstance(f.sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
        f.sched.step(metrics["val_loss"])
    else:  # cosine: one step per epoch, whatever the validation says
        f.sched.step()
    last = f.train.keep_weights == "last"  # every epoch replaces the kept weights; no early stopping
    if last or val_rmse < state["best_rmse"] - 1e-9:
        state.update(best_rmse=val_rmse, best_epoch=epoch, bad_epochs=0)
        state["best_model"] = copy.deepcopy({k: v.detach().cpu() for k, v in f.net.state_dict().items()})
    else:
        state["bad_epochs"] += 1
    state["epoch"] = epoch
    state["history"].append(metrics)
    stop = not last and state["bad_epochs"] >= f.train.early_stopping  # metrics are reduced over ranks
    metrics["stop"] = int(stop)
    return stop


def print_epoch(f: Fold, metrics: dict[str, float]) -> None:
    """One line per epoch on the driver's console, from rank 0 (:mod:`chemmap.train.feed`)."""
    if f.rank != 0:
        return
    epoch = int(metrics["epoch"])
    send(
        f.feed,
        f"fold {f.fold} epoch {epoch + 1}/{f.train.epochs}: train RMSE {metrics['train_rmse']:.3f}, "
        f"val RMSE {metrics['val_rmse']:.3f}, lr {metrics['lr']:.2g}, {metrics['epoch_seconds']:.1f} s"
        + (" (best)" if f.train.keep_weights != "last" and f.state["best_epoch"] == epoch else ""),
    )


def report_epoch(f: Fold, metrics: dict[str, float]) -> None:
    """Metrics to MLflow (rank 0), the checkpoint (rank 0) and ``ray.train.report`` (every rank)."""
    import ray.train

    epoch = int(metrics["epoch"])
    if f.debug.get("digest_dir"):  # every rank records its parameters: DDP keeps them identical
        Path(f.debug["digest_dir"], f"epoch{epoch}_rank{f.rank}.txt").write_text(_param_digest(f.net))
    if f.mlflow is not None:
        tracking.log_metrics(f.mlflow, f.run_id, {k: v for k, v in metrics.items() if k != "epoch"}, epoch)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if f.rank == 0:
            saved = {
                "fold": f.fold,
                "model": {k: v.detach().cpu() for k, v in f.net.state_dict().items()},
                "optimizer": f.opt.state_dict(),
                "scheduler": f.sched.state_dict(),
                "state": f.state,
                "done": f.done,
            }
            torch.save(saved, Path(tmp) / STATE_FILE)
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        keep = checkpoint_score(f, epoch, bool(metrics["stop"]))
        ray.train.report(
            dict(metrics, fold=f.fold, keep=keep),
            checkpoint=checkpoint,
            checkpoint_dir_name=checkpoint_name(f, epoch),
        )


def checkpoint_name(f: Fold, epoch: int) -> str:
    """The folder of a fold's checkpoint of ``epoch`` in the run's storage."""
    return f"fold{f.fold}_epoch_{epoch:04d}"


def checkpoint_score(f: Fold, epoch: int, stop: bool) -> float:
    """Ray Train's ``keep`` score of a checkpoint: the highest scores are kept.

    A fold's last checkpoint scores above every other and is never deleted (the driver reads
    the fold's weights from it; ``result.json`` points at it); the others score by their
    order in the run, so ``train.checkpoints_to_keep`` of the latest stay besides.
    """
    last = stop or epoch == f.train.epochs - 1
    order = len(f.done) * 100_000 + epoch  # the fold's place in the run, then the epoch (< 100000)
    return float(order + (1e12 if last else 0))


def run_epoch(f: Fold, epoch: int) -> bool:
    """Train, validate, record and report one epoch; whether early stopping ends the fold."""
    t0 = time.perf_counter()
    sums = train_epoch(f, epoch)
    train_seconds = time.perf_counter() - t0
    val = validate(f)
    metrics = epoch_metrics(f, epoch, sums, val, train_seconds, t0, time.perf_counter() - t0 - train_seconds)
    stop = update_state(f, metrics)
    print_epoch(f, metrics)
    report_epoch(f, metrics)
    return stop


def fold_finished(f: Fold) -> bool:
    """Whether the fold's state says it has run its last epoch (or stopped early)."""
    last, bad = f.state["epoch"], f.state["bad_epochs"]
    return last >= f.train.epochs - 1 or (last >= 0 and bad >= f.train.early_stopping)


def train_folds(config: dict[str, Any]) -> None:
    """Ray Train entry point (``train_loop_per_worker``): the folds one after another.

    One worker group trains every fold. Each checkpoint names the folds finished before its
    own and the checkpoint each ended with; a restarted group skips them and resumes the fold
    it was in from its last epoch. When a fold ends, rank 0 tells the driver which checkpoint
    holds it (:func:`chemmap.train.feed.send_done`), so its results are written while the
    next fold trains.

    ``config`` keys: store, model (UNetConfig fields), train (TrainSection dump), folds (to
    train, in order), seed, tracking_uri, run_ids (fold -> MLflow run or None), threads,
    debug, fold_lines (fold -> the line rank 0 sends when the fold starts), epoch_feed, and
    geometry (the model's :class:`~chemmap.models.tiling.Geometry` fields; patch mode).
    """
    if config.get("threads"):
        torch.set_num_threads(int(config["threads"]))
    data = Dataset(config["store"])
    cache = InputCache(data)
    saved = _load_checkpoint()
    done: dict[int, str] = dict(saved.get("done") or {}) if saved is not None else {}
    for fold in (int(k) for k in config["folds"]):
        if fold in done:
            continue
        resume = saved if saved is not None and saved.get("fold") == fold else None
        f = build_fold(config, fold, data, resume, cache, done)
        if not fold_finished(f):
            if f.rank == 0 and config.get("fold_lines"):
                send(f.feed, config["fold_lines"][fold], fold=fold)
            for epoch in range(f.state["epoch"] + 1, f.train.epochs):
                if run_epoch(f, epoch):
                    break
        done[fold] = checkpoint_name(f, f.state["epoch"])
        if f.rank == 0 and f.feed is not None:
            send_done(f.feed, fold, done[fold])
