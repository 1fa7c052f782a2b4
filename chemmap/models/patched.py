"""Exact sample-level gradients from patches, for samples too large for one pass.

Every supervised term of the loss is a sum over pixels (or pixel pairs) divided by
per-sample constants, so its gradient is a sum over patches once those constants are
known:

1. one no-grad tiled pass gives the map, hence the masked mean ``M`` of every target;
2. one pass per patch then backpropagates the exact per-pixel gradient through that
   patch's core only:

   - mean term: ``w_mean * 2 * (M - y) / N`` per in-mask pixel (a constant: the
     surrogate ``c * sum(p * m)`` has exactly that gradient);
   - smoothness: the pairs whose first pixel (top or left) lies in the core, with the
     partner taken from the same window (its core plus one row and column of seam),
     so every pair is counted once, across patch seams too;
   - out of range and per-pixel MSE: their local sums over the core.

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

import torch
import torch.nn.functional as F
from torch import nn

from chemmap.models.loss import TERMS, UPPER, LossConfig
from chemmap.models.tiling import Box, Geometry, model_geometry, plan_window

ReadWindow = Callable[[int, int, int, int], torch.Tensor]


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
    param = next(model.parameters())
    mask = mask.to(device=param.device, dtype=param.dtype)  # (H, W)
    total: torch.Tensor | None = None
    with torch.no_grad():
        for box in windows:
            m = mask[box[0] : box[2], box[1] : box[3]]
            if not bool(m.any()):
                continue
            window = plan_window(model, geometry, height, width, box, halo)
            p = window.crop(_forward_window(model, read_window, window.read), box)  # (T, h, w)
            s = (p * m).sum((-2, -1))
            total = s if total is None else total + s
    if total is None:
        raise ValueError("empty sample mask: the masked mean is undefined.")
    return total, mask.sum()


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
    pixel_labels: torch.Tensor | None = None,
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
        pixel_labels: optional ``(T, H, W)`` per-pixel references, NaN where unlabelled.
        scale: multiplies the gradient, e.g. ``1 / batch_size`` to average over a batch.
        sample_totals: for a sample spanning several images, ``(sum, count)`` of
            :func:`patched_sum` added over all of them: the mean and ``N`` of the mean and
            smoothness terms are then the sample's, and this call adds this image's share
            of the gradient (the "mean" term it returns is the sample's).

    Returns:
        The sample's unweighted terms ("mean", "smooth", "out_of_range", "pixel"), each
        summed over targets, and "total", their weighted sum (before ``scale``).
    """
    cfg = LossConfig() if loss_cfg is None else loss_cfg
    geometry = model_geometry(model) if geometry is None else geometry
    height, width = mask.shape
    param = next(model.parameters())
    mask = mask.to(device=param.device, dtype=param.dtype)  # (H, W)
    y = torch.as_tensor(y).to(device=param.device, dtype=param.dtype).reshape(-1)  # (T,)
    _check_cover(windows, mask)
    active = [box for box in windows if bool(mask[box[0] : box[2], box[1] : box[3]].any())]

    # 1. The masked mean of every target from a no-grad tiled pass (or the sample's, given).
    if sample_totals is None:
        total, n = patched_sum(model, read_window, active, mask, halo, geometry=geometry)
    else:
        total, n = (torch.as_tensor(t).to(device=param.device, dtype=param.dtype) for t in sample_totals)
    if n <= 0:
        raise ValueError("empty sample mask: the masked mean is undefined.")
    mean = total / n  # (T,)
    known = ~torch.isnan(y)
    coef = torch.where(known, 2.0 * (mean - y) / n, torch.zeros_like(y))  # (T,) dL_mean/dp per pixel

    labelled = None
    if pixel_labels is not None:
        pixel_labels = pixel_labels.to(device=param.device, dtype=param.dtype)  # (T, H, W)
        labelled = (~torch.isnan(pixel_labels)).to(param.dtype) * mask  # (T, H, W)
        n_labelled = labelled.sum((-2, -1)).clamp_min(1.0)  # (T,)

    # 2. One pass per patch: core + one seam row/column for the pairs that cross it.
    smooth = torch.zeros((), dtype=param.dtype, device=param.device)
    oor = torch.zeros_like(smooth)
    pixel = torch.zeros_like(smooth)
    for y0, x0, y1, x1 in active:
        h, w = y1 - y0, x1 - x0
        ext = (y0, x0, min(y1 + 1, height), min(x1 + 1, width))
        window = plan_window(model, geometry, height, width, ext, halo)
        pe = window.crop(_forward_window(model, read_window, window.read), ext)  # (T, he, we)
        me = mask[ext[0] : ext[2], ext[1] : ext[3]]  # (he, we)
        pc, mc = pe[:, :h, :w], me[:h, :w]  # core: (T, h, w), (h, w)

        col = pe[:, :, :w]  # (T, he, w): vertical pairs whose upper pixel is in the core
        pairs_y = (col[:, 1:] - col[:, :-1]) ** 2 * (me[1:, :w] * me[:-1, :w])  # (T, he-1, w)
        row = pe[:, :h, :]  # (T, h, we): horizontal pairs whose left pixel is in the core
        pairs_x = (row[..., 1:] - row[..., :-1]) ** 2 * (me[:h, 1:] * me[:h, :-1])  # (T, h, we-1)
        smooth_part = pairs_y[:, :h].sum() + pairs_x[..., :w].sum()
        oor_part = (mc * (F.relu(-pc) ** 2 + F.relu(pc - UPPER) ** 2)).sum()

        surrogate = cfg.mean * (coef[:, None, None] * pc * mc).sum()
        surrogate = surrogate + cfg.smooth * smooth_part / n + cfg.out_of_range * oor_part
        if labelled is not None:
            lab = labelled[:, y0:y1, x0:x1]  # (T, h, w)
            ref = torch.nan_to_num(pixel_labels[:, y0:y1, x0:x1])  # (T, h, w)
            err = torch.where(lab > 0, pc - ref, torch.zeros_like(pc))
            pixel_part = ((err**2 * lab).sum((-2, -1)) / n_labelled).sum()
            surrogate = surrogate + cfg.pixel * pixel_part
            pixel += pixel_part.detach()
        (scale * surrogate).backward()
        smooth += smooth_part.detach()
        oor += oor_part.detach()

    terms = {
        "mean": torch.where(known, (y - mean) ** 2, torch.zeros_like(y)).sum(),
        "smooth": smooth / n,
        "out_of_range": oor,
        "pixel": pixel,
    }
    out = {name: float(value) for name, value in terms.items()}
    out["total"] = sum(getattr(cfg, name) * out[name] for name in TERMS)
    return out
