"""Exact sample-level gradients from patches, for samples too large for one pass.

Every supervised term of the loss is a sum over pixels (or pixel pairs) divided by
per-sample constants, so its gradient is a sum over patches once those constants are
known:

1. one no-grad tiled pass gives the map, hence the masked mean ``M`` of every target;
2. one pass per patch then backpropagates the exact per-pixel gradient through that
   patch's core only:

   - mean term: its derivative with respect to the sample's masked sum, a constant per
     target (``w_mean * 2 * (M - y) / N``), times ``sum(p * m)`` over the core;
   - smoothness: the pairs whose first pixel (top or left) lies in the core, with the
     partner taken from the same window (its core plus one row and column of seam),
     so every pair is counted once, across patch seams too;
   - out of range: its sum over the core.

The terms are :mod:`chemmap.models.loss`'s own functions, applied to the core (and seam).
Tiling is exact (see :mod:`chemmap.models.tiling`), so the core and seam pixels of each
window, and their derivatives with respect to the weights, are those of the
whole-image pass: the accumulated gradient equals the whole-image loss gradient to
float precision. With batch normalisation in training mode it does not: each window
normalises with its own batch statistics (eval-mode batch norm is exact).

Gradients accumulate into ``.grad`` of the model's parameters; the caller owns
``zero_grad``, DDP's ``no_sync`` and the optimiser step (and adds the L2 term once).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from chemmap.models.loss import (
    QUADRATIC,
    LossConfig,
    Smoothness,
    TermWeights,
    masked_sum,
    mean_error,
    neighbour_sum,
    oor_per,
    out_of_range_term,
    weighted_total,
)
from chemmap.models.tiling import Box, Geometry, model_geometry, plan_window

ReadWindow = Callable[[int, int, int, int], torch.Tensor]


@dataclass(frozen=True)
class MeanTerm:
    """The mean term of one sample, fixed before any patch is backpropagated.

    Attributes:
        value: ``(y - M) ** 2`` summed over targets (NaN targets left out).
        coef: ``(T,)`` its derivative with respect to the sample's masked sum
            ``sum(p * m)``: the same for every in-mask pixel of the map.
        count: ``N``, the sample's in-mask pixels.
    """

    value: torch.Tensor
    coef: torch.Tensor
    count: torch.Tensor


@dataclass(frozen=True)
class PatchTerms:
    """One patch's share of the per-sample sums (unweighted, summed over targets).

    Attributes:
        mean: ``sum(coef * p * m)`` over the core: the mean term's surrogate, whose
            gradient is the mean term's.
        smooth: squared differences of in-mask pairs whose first pixel is in the core.
        out_of_range: squared excursions below 0 and above 100 inside the core.
    """

    mean: torch.Tensor
    smooth: torch.Tensor
    out_of_range: torch.Tensor


@dataclass(frozen=True)
class _Pass:
    """What every patch of one :func:`patched_backward` call shares."""

    model: nn.Module
    read_window: ReadWindow
    geometry: Geometry
    halo: int | None
    mask: torch.Tensor  # (H, W) in the model's dtype
    weights: TermWeights
    scale: float


def _forward_window(model: nn.Module, read_window: ReadWindow, read: Box) -> torch.Tensor:
    x = read_window(*read)  # (C, h, w)
    param = next(model.parameters())
    x = torch.as_tensor(x).to(device=param.device, dtype=param.dtype)
    return model(x.unsqueeze(0))[0]  # (T, h', w')


def _check_cover(windows: Sequence[Box], mask: torch.Tensor) -> None:
    count = torch.zeros(mask.shape, dtype=torch.int32)
    for y0, x0, y1, x1 in windows:
        count[y0:y1, x0:x1] += 1
    inside = mask.cpu() > 0
    if bool((count[inside] != 1).any()):
        raise ValueError("windows must cover every in-mask pixel exactly once (use tiling.core_windows).")


def _like_param(model: nn.Module, t: torch.Tensor) -> torch.Tensor:
    param = next(model.parameters())
    return torch.as_tensor(t).to(device=param.device, dtype=param.dtype)


def patched_sum(
    model: nn.Module,
    read_window: ReadWindow,
    windows: Sequence[Box],
    mask: torch.Tensor,
    halo: int | None = None,
    *,
    geometry: Geometry | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """No-grad tiled pass: ``(sum of the masked map per target (T,), pixel count)`` of one image.

    A sample of several scans (both sides of a belly) adds these over its scans and hands
    the totals to :func:`patched_backward` for each scan, so the mean term sees the sample.
    """
    geometry = model_geometry(model) if geometry is None else geometry
    height, width = mask.shape
    mask = _like_param(model, mask)  # (H, W)
    total: torch.Tensor | None = None
    with torch.no_grad():
        for box in windows:
            m = mask[box[0] : box[2], box[1] : box[3]]  # (h, w)
            if not bool(m.any()):
                continue
            window = plan_window(model, geometry, height, width, box, halo)
            p = window.crop(_forward_window(model, read_window, window.read), box)  # (T, h, w)
            s = masked_sum(p[None], m[None])[0]  # (T,)
            total = s if total is None else total + s
    if total is None:
        raise ValueError("empty sample mask: the masked mean is undefined.")
    return total, mask.sum()


def mean_term_of(total: torch.Tensor, count: torch.Tensor, y: torch.Tensor) -> MeanTerm:
    """The sample's mean term and its derivative, from the masked sum ``(T,)`` and ``N``."""
    total = total.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        value = mean_error(total[None], count.reshape(1, 1), y[None]).sum()  # models.loss's term
        (coef,) = torch.autograd.grad(value, total)  # (T,)
    return MeanTerm(value.detach(), coef, count)


def patch_terms(
    p: torch.Tensor,
    mask: torch.Tensor,
    core: tuple[int, int],
    coef: torch.Tensor,
    smooth: Smoothness = QUADRATIC,
) -> PatchTerms:
    """A patch's share of the sample's sums, from its core and one seam row and column.

    Args:
        p: ``(T, h + 1, w + 1)`` map of the core and the seam (less at the image's border).
        mask: ``(h + 1, w + 1)`` mask alike.
        core: ``(h, w)``, the core's size; the core is ``p[:, :h, :w]``.
        coef: ``(T,)`` :attr:`MeanTerm.coef`.
        smooth: the smoothness term's form; a pair belongs to the patch of its upper (or left)
            pixel, its anchor, so ``pairs="anchor"`` sums the same pairs as the whole image.
    """
    h, w = core
    p, mask = p[None], mask[None]  # (1, T, h+1, w+1), (1, h+1, w+1)
    vertical = neighbour_sum(p[..., : h + 1, :w], mask[..., : h + 1, :w], -2, smooth)  # upper pixel in core
    horizontal = neighbour_sum(p[..., :h, : w + 1], mask[..., :h, : w + 1], -1, smooth)  # left pixel in core
    core_p, core_m = p[..., :h, :w], mask[..., :h, :w]  # (1, T, h, w), (1, h, w)
    return PatchTerms(
        mean=(masked_sum(core_p, core_m)[0] * coef).sum(),
        smooth=(vertical + horizontal).sum(),
        out_of_range=out_of_range_term(core_p, core_m).sum(),
    )


def _backward_patch(run: _Pass, box: Box, mean: MeanTerm) -> PatchTerms:
    """Backpropagate one core's share of the weighted loss; returns its (detached) sums."""
    y0, x0, y1, x1 = box
    height, width = run.mask.shape
    seam = (y0, x0, min(y1 + 1, height), min(x1 + 1, width))  # the core and one seam row and column
    window = plan_window(run.model, run.geometry, height, width, seam, run.halo)
    p = window.crop(_forward_window(run.model, run.read_window, window.read), seam)  # (T, h+1, w+1)
    part = patch_terms(
        p,
        run.mask[seam[0] : seam[2], seam[1] : seam[3]],
        (y1 - y0, x1 - x0),
        mean.coef,
        Smoothness.of(run.weights),
    )
    oor = part.out_of_range / oor_per(run.weights, mean.count)
    normalised = {"mean": part.mean, "smooth": part.smooth / mean.count, "out_of_range": oor}
    (run.scale * weighted_total(normalised, run.weights)).backward()
    return PatchTerms(part.mean.detach(), part.smooth.detach(), part.out_of_range.detach())


def patched_backward(
    model: nn.Module,
    read_window: ReadWindow,
    windows: Sequence[Box],
    mask: torch.Tensor,
    y: torch.Tensor,
    loss_cfg: LossConfig | None = None,
    halo: int | None = None,
    *,
    geometry: Geometry | None = None,
    scale: float = 1.0,
    sample_totals: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> dict[str, float]:
    """Accumulate the exact gradient of one sample's loss, one patch at a time.

    Args:
        model: map model whose output has the image's geometry (as in
            :func:`chemmap.models.tiling.predict_full`).
        read_window: ``read_window(y0, x0, y1, x1) -> (C, y1 - y0, x1 - x0)`` input in
            image coordinates; outside the image it must pad exactly as the whole-image
            canvas does (e.g. :func:`chemmap.models.tiling.read_padded`).
        windows: core boxes ``(y0, x0, y1, x1)`` covering every in-mask pixel exactly
            once, edges on the stride grid (:func:`chemmap.models.tiling.core_windows`).
        mask: ``(H, W)`` sample mask at the map's geometry; 1 inside, 0 outside.
        y: ``(T,)`` lab values (NaN leaves a target out of the mean term).
        loss_cfg: weights; default :class:`LossConfig`. The L2 term is not included.
        halo: input pixels around each core; default the measured radius (exact).
        geometry: from :func:`chemmap.models.tiling.model_geometry` (measured if not given).
        scale: multiplies the gradient, e.g. ``1 / batch_size`` to average over a batch.
        sample_totals: for a sample spanning several images, ``(sum, count)`` of
            :func:`patched_sum` added over all of them: the mean and ``N`` of the mean and
            smoothness terms are then the sample's, and this call adds this image's share
            of the gradient (the "mean" term it returns is the sample's).

    Returns:
        The sample's unweighted terms ("mean", "smooth", "out_of_range"), each summed over
        targets, and "total", their weighted sum (before ``scale``).
    """
    weights = LossConfig() if loss_cfg is None else loss_cfg
    geometry = model_geometry(model) if geometry is None else geometry
    mask = _like_param(model, mask)  # (H, W)
    y = _like_param(model, y).reshape(-1)  # (T,)
    _check_cover(windows, mask)
    active = [box for box in windows if bool(mask[box[0] : box[2], box[1] : box[3]].any())]
    # 1. The masked mean of every target from a no-grad tiled pass (or the sample's, given).
    if sample_totals is None:
        total, count = patched_sum(model, read_window, active, mask, halo, geometry=geometry)
    else:
        total, count = (_like_param(model, t) for t in sample_totals)
    mean = mean_term_of(total, count, y)
    # 2. One pass per patch: core + one seam row/column for the pairs that cross it.
    run = _Pass(model, read_window, geometry, halo, mask, weights, scale)
    parts = [_backward_patch(run, box, mean) for box in active]
    terms = {
        "mean": float(mean.value),
        "smooth": float(sum(part.smooth for part in parts) / count),
        "out_of_range": float(sum(part.out_of_range for part in parts) / oor_per(weights, count)),
    }
    terms["total"] = float(weighted_total(terms, weights))
    return terms
