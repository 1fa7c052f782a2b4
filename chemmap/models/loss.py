"""The paper's loss, term by term, with its normalisers (DESIGN.md "The science", "Loss").

For one sample with prediction ``p`` and mask ``m`` at the model's output geometry and
``N = sum(m)``:

- mean MSE (weight 1): ``(y - sum(p * m) / N) ** 2``;
- smoothness (weight 20 in the paper): ``sum over neighbouring pixel pairs that are both
  in the mask, along x and along y, of (p_a - p_b) ** 2``, divided by ``N``;
- out of range (weight 1e-3): ``sum(m * relu(-p) ** 2) + sum(m * relu(p - 100) ** 2)``,
  a sum, so its weight scales with the image size;
- L2 (weight 1e-3): sum of squared convolution weights, once per optimiser step
  (:func:`l2_penalty`, not part of the per-sample terms);
- per-pixel MSE (weight 0 unless a dataset has pixel labels): mean over labelled
  in-mask pixels of ``(p - label) ** 2``.

Per-sample terms are summed over targets (``T`` maps at once; a NaN reference leaves
that target out for that sample) and averaged over the batch.

The smoothness weight decides how much detail survives, and only the mean is
supervised, so validation RMSE cannot choose it; DESIGN.md notes that weight 1 halved
the per-pixel error of weight 20 on synthetic data. The default stays the paper's 20:
set ``LossConfig(smooth=...)`` from the training config.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

TERMS = ("mean", "smooth", "out_of_range", "pixel")
UPPER = 100.0  # percent: fat (or any constituent) cannot exceed 100 %


@dataclass(frozen=True)
class LossConfig:
    """Weights of the loss terms (the paper's values by default)."""

    mean: float = 1.0  # squared error of the masked mean against the lab value
    smooth: float = 20.0  # neighbouring-pixel differences / N (paper: 20; DESIGN.md: 1 may be better)
    out_of_range: float = 1e-3  # squared excursions below 0 and above 100, summed over pixels
    l2: float = 1e-3  # squared conv weights, once per optimiser step (see l2_penalty)
    pixel: float = 0.0  # per-pixel MSE where pixel labels exist (NaN = unlabelled)


# ----------------------------------------------------------------------------- shapes


def _as_bthw(p: torch.Tensor) -> torch.Tensor:
    if p.ndim == 3:
        return p.unsqueeze(1)  # (B, 1, H, W)
    if p.ndim != 4:
        raise ValueError(f"expected predictions (B, T, H, W) or (B, H, W), got shape {tuple(p.shape)}.")
    return p


def _as_mask(mask: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Mask as (B, 1, H, W) or (B, T, H, W) in p's dtype."""
    if mask.ndim == 3:
        mask = mask.unsqueeze(1)  # (B, 1, H, W)
    if mask.ndim != 4 or mask.shape[0] != p.shape[0] or mask.shape[-2:] != p.shape[-2:]:
        raise ValueError(
            f"mask shape {tuple(mask.shape)} does not match predictions {tuple(p.shape)}: bring it to "
            "the output geometry first (chemmap.models.loss.output_mask)."
        )
    return mask.to(p.dtype)


def _as_targets(y: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    y = y.to(p.dtype)
    if y.ndim == 1:
        y = y.unsqueeze(1)  # (B, 1)
    if y.shape != p.shape[:2]:
        raise ValueError(
            f"targets shape {tuple(y.shape)} does not match predictions (B, T) = {tuple(p.shape[:2])}."
        )
    return y


def output_mask(
    mask: torch.Tensor, model: nn.Module | int, shape: tuple[int, int] | None = None
) -> torch.Tensor:
    """Bring an image mask to the model's output geometry.

    A valid-convolution model loses ``margin`` pixels per side: output pixel ``(i, j)`` sits
    on image pixel ``(i + margin, j + margin)``, so the mask is cropped alike.

    Args:
        mask: ``(..., H, W)`` mask of the model's input.
        model: the model (its ``margin``) or the margin itself.
        shape: the output ``(h, w)``; default ``(H - 2 * margin, W - 2 * margin)``.

    Returns:
        ``(..., h, w)`` mask.
    """
    margin = model if isinstance(model, int) else int(getattr(model, "margin", 0))
    height, width = mask.shape[-2:]
    h, w = shape if shape is not None else (height - 2 * margin, width - 2 * margin)
    if h <= 0 or w <= 0 or margin + h > height or margin + w > width:
        raise ValueError(f"cannot crop a mask of {(height, width)} by margin {margin} to {(h, w)}.")
    return mask[..., margin : margin + h, margin : margin + w]


# ----------------------------------------------------------------------------- terms


def pixel_count(mask: torch.Tensor) -> torch.Tensor:
    """N per sample: ``(B,)`` number of in-mask pixels; an empty mask is an error."""
    n = mask.flatten(1).sum(1)  # (B,)
    if bool((n <= 0).any()):
        empty = torch.nonzero(n <= 0).flatten().tolist()
        raise ValueError(f"empty sample mask for batch element(s) {empty}: the masked mean is undefined.")
    return n


def masked_mean(p: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``sum(p * m) / N`` per sample and target: p (B, T, H, W), mask (B, [1|T], H, W) -> (B, T)."""
    p = _as_bthw(p)
    m = _as_mask(mask, p)
    return (p * m).sum((-2, -1)) / m.sum((-2, -1)).clamp_min(1e-12)  # (B, T)


def mean_term(p: torch.Tensor, mask: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``(y - sum(p * m) / N) ** 2`` per sample and target -> (B, T); 0 where y is NaN."""
    p = _as_bthw(p)
    y = _as_targets(y, p)
    pixel_count(_as_mask(mask, p))
    err = torch.where(torch.isnan(y), torch.zeros_like(y), y - masked_mean(p, mask))  # (B, T)
    return err**2


def smooth_sum(p: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum over in-mask neighbouring pairs along x and y of ``(p_a - p_b) ** 2`` -> (B, T).

    Not yet divided by N (the patched gradient sums it over patches first).
    """
    p = _as_bthw(p)
    m = _as_mask(mask, p)
    pair_y = m[..., 1:, :] * m[..., :-1, :]  # (B, ., H-1, W): both pixels of a vertical pair in the mask
    pair_x = m[..., :, 1:] * m[..., :, :-1]  # (B, ., H, W-1)
    dy = (p[..., 1:, :] - p[..., :-1, :]) ** 2 * pair_y  # (B, T, H-1, W)
    dx = (p[..., :, 1:] - p[..., :, :-1]) ** 2 * pair_x  # (B, T, H, W-1)
    return dy.sum((-2, -1)) + dx.sum((-2, -1))  # (B, T)


def smooth_term(p: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Smoothness per sample and target, divided by N -> (B, T)."""
    p = _as_bthw(p)
    n = pixel_count(_as_mask(mask, p))  # (B,)
    return smooth_sum(p, mask) / n[:, None]


def out_of_range_term(p: torch.Tensor, mask: torch.Tensor, upper: float = UPPER) -> torch.Tensor:
    """``sum(m * relu(-p) ** 2) + sum(m * relu(p - upper) ** 2)`` per sample and target -> (B, T)."""
    p = _as_bthw(p)
    m = _as_mask(mask, p)
    return (m * (F.relu(-p) ** 2 + F.relu(p - upper) ** 2)).sum((-2, -1))  # (B, T)


def pixel_term(p: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-pixel MSE over labelled in-mask pixels (NaN = unlabelled) -> (B, T); 0 without labels."""
    p = _as_bthw(p)
    labels = _as_bthw(labels).to(p.dtype)
    m = _as_mask(mask, p) * (~torch.isnan(labels)).to(p.dtype)  # (B, T, H, W)
    sq = torch.where(m > 0, p - torch.nan_to_num(labels), torch.zeros_like(p)) ** 2  # (B, T, H, W)
    return (sq * m).sum((-2, -1)) / m.sum((-2, -1)).clamp_min(1.0)  # (B, T)


def sample_loss(
    p: torch.Tensor,
    mask: torch.Tensor,
    y: torch.Tensor,
    config: LossConfig | None = None,
    pixel_labels: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The per-sample loss terms, summed over targets and averaged over the batch.

    Args:
        p: predictions ``(B, T, H, W)`` (or ``(B, H, W)``) at the output geometry.
        mask: ``(B, H, W)`` or ``(B, 1|T, H, W)`` sample mask at the output geometry
            (see :func:`output_mask`); 1 inside, 0 outside.
        y: lab values ``(B, T)`` (or ``(B,)``); NaN leaves that target out of the mean term.
        config: weights; default :class:`LossConfig`.
        pixel_labels: optional ``(B, T, H, W)`` per-pixel references, NaN where unlabelled.

    Returns:
        Scalars: each unweighted term ("mean", "smooth", "out_of_range", "pixel") and
        "total", the weighted sum (L2 excluded: add ``config.l2 * l2_penalty(model)``
        once per optimiser step).
    """
    config = LossConfig() if config is None else config
    terms = {
        "mean": mean_term(p, mask, y),
        "smooth": smooth_term(p, mask),
        "out_of_range": out_of_range_term(p, mask),
    }
    if pixel_labels is not None:
        terms["pixel"] = pixel_term(p, mask, pixel_labels)
    out = {name: value.sum(1).mean() for name, value in terms.items()}  # sum targets, mean batch
    out.setdefault("pixel", torch.zeros((), dtype=out["mean"].dtype, device=out["mean"].device))
    out["total"] = sum(getattr(config, name) * out[name] for name in TERMS)
    return out


def l2_penalty(model: nn.Module) -> torch.Tensor:
    """Sum of squared convolution weights: no biases, no normalisation layers.

    Add ``LossConfig.l2 * l2_penalty(model)`` once per optimiser step (not per sample or
    per patch).
    """
    convs = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
    weights = [module.weight for module in model.modules() if isinstance(module, convs)]
    if not weights:
        return torch.zeros(())
    return sum((w**2).sum() for w in weights)  # type: ignore[return-value]
