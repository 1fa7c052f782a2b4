"""The paper's loss for one sample that may span several scans (DESIGN.md, "Loss").

A sample's scans (both sides of a belly) together form its masked pixels, so the mean,
the smoothness normaliser and ``N`` run over all of them: each scan gives its sums
(:func:`scan_sums`) and :func:`sample_loss` combines them with the terms of
:mod:`chemmap.models.loss`, which holds the one implementation of every term.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from chemmap.models.loss import (
    QUADRATIC,
    Smoothness,
    TermWeights,
    masked_sum,
    mean_error,
    out_of_range_term,
    smooth_sum,
    weighted_total,
)


@dataclass(frozen=True)
class ScanSums:
    """What one scan adds to its sample's loss (every field a sum over its in-mask pixels).

    Attributes:
        total: ``(T,)`` sum of the masked map.
        count: in-mask pixels (0-d).
        smooth: ``(T,)`` squared differences of neighbouring in-mask pairs along y and x.
        out_of_range: ``(T,)`` squared excursions below 0 % and above 100 %.
    """

    total: torch.Tensor
    count: torch.Tensor
    smooth: torch.Tensor
    out_of_range: torch.Tensor
    path_total: torch.Tensor | None = None  # (T,) sum of the spectral path's masked map
    residual: torch.Tensor | None = None  # (T,) penalty of (map - spectral path's map), summed


def residual_form(weights: object) -> Smoothness:
    """The residual penalty of a loss config: Smoothness's costs (quadratic, or huber at ``delta``)."""
    return Smoothness(
        penalty=getattr(weights, "residual_penalty", "huber"),
        delta=float(getattr(weights, "residual_delta", 5.0)),
    )


def scan_sums(
    pred: torch.Tensor,
    mask: torch.Tensor,
    smooth: Smoothness = QUADRATIC,
    path: torch.Tensor | None = None,
    residual: Smoothness = QUADRATIC,
) -> ScanSums:
    """Per-scan sums of one map.

    Args:
        pred: ``(T, H, W)`` predicted maps (percent).
        mask: ``(H, W)`` bool, the sample's pixels at the map's resolution; may be empty
            for one of a sample's scans, not for all.
        smooth: the smoothness term's form (:meth:`Smoothness.of` the loss config).
        path: ``(T, H, W)`` the spectral path's own map (a U-Net with ``emit_parts``), or None.
        residual: the penalty of ``pred - path`` per pixel (:func:`residual_form`).
    """
    p, m = pred[None], mask[None].to(pred.dtype)  # (1, T, H, W), (1, H, W)
    extra = {}
    if path is not None:
        q = path[None]  # (1, T, H, W)
        extra = {"path_total": masked_sum(q, m)[0], "residual": masked_sum(residual.cost(p - q), m)[0]}
    return ScanSums(
        total=masked_sum(p, m)[0],
        count=m.sum(),
        smooth=smooth_sum(p, m, smooth)[0],
        out_of_range=out_of_range_term(p, m)[0],
        **extra,
    )


def sample_loss(sums: list[ScanSums], target: torch.Tensor, w: TermWeights) -> dict[str, torch.Tensor]:
    """The loss terms of one sample from its scans' sums, summed over targets (as ``models.loss``).

    Args:
        sums: :func:`scan_sums` of each of the sample's scans.
        target: ``(T,)`` the sample's lab values (percent); NaN leaves a target out of the
            mean term.
        w: term weights (``LossConfig`` or the training config's loss section).

    Returns:
        ``loss`` (weighted total without L2) and each unweighted term (``mse``, ``smooth``,
        ``oor``; with the spectral path's sums also ``spectral``, its own mean term, and
        ``residual``, the penalty of the map's departure from it / N), plus ``mean_pred`` (T,).

    Raises:
        ValueError: if the sample has no in-mask pixel in any scan.
    """
    n = torch.stack([s.count for s in sums]).sum()
    total = torch.stack([s.total for s in sums]).sum(0)  # (T,)
    mse = mean_error(total[None], n.reshape(1, 1), target.to(total.dtype)[None]).sum()
    smooth = (torch.stack([s.smooth for s in sums]).sum(0) / n).sum()
    oor = torch.stack([s.out_of_range for s in sums]).sum(0).sum()
    loss = weighted_total({"mean": mse, "smooth": smooth, "out_of_range": oor}, w)
    terms = {"loss": loss, "mse": mse, "smooth": smooth, "oor": oor, "mean_pred": total / n}
    if all(s.path_total is not None and s.residual is not None for s in sums):
        path = torch.stack([s.path_total for s in sums]).sum(0)  # type: ignore[misc]
        terms["spectral"] = mean_error(path[None], n.reshape(1, 1), target.to(path.dtype)[None]).sum()
        terms["residual"] = (torch.stack([s.residual for s in sums]).sum(0) / n).sum()  # type: ignore[misc]
        spectral, residual = getattr(w, "spectral", 0.0), getattr(w, "residual", 0.0)
        terms["loss"] = loss + spectral * terms["spectral"] + residual * terms["residual"]
    return terms
