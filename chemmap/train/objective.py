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
    oor_per,
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
    blind: torch.Tensor | None = None  # (T,) blind-spot squared errors, summed over the picked pixels
    blind_count: int = 0  # pixels picked for the blind-spot term


def residual_form(weights: object) -> Smoothness:
    """The residual penalty of a loss config: Smoothness's costs (quadratic, or huber at ``delta``)."""
    return Smoothness(
        penalty=getattr(weights, "residual_penalty", "huber"),
        delta=float(getattr(weights, "residual_delta", 5.0)),
    )


def blind_spot(x: torch.Tensor, mask: torch.Tensor, share: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise2Void's input: ``x`` with the spectra of a random ``share`` of the mask pixels
    replaced by a random neighbour's (offsets in -2..2 on each axis, never 0, 0; reflected
    inward at the border, so never the pixel itself). Draws from torch's global generator.

    Args:
        x: ``(C, H, W)`` one image's model input.
        mask: ``(H, W)`` bool, the sample's pixels on the same grid.

    Returns:
        ``(x with the picked pixels replaced (a copy), (2, n) their rows and columns)``.
    """
    height, width = x.shape[-2:]
    if tuple(mask.shape) != (height, width) or min(height, width) < 3:
        raise ValueError(
            f"blind spot: the mask {tuple(mask.shape)} must be on the input's grid {(height, width)}, >= 3 px"
        )
    ys, xs = torch.nonzero(mask, as_tuple=True)
    n = max(1, round(share * ys.numel()))
    pick = torch.randperm(ys.numel())[:n]
    p = torch.stack([ys[pick], xs[pick]])  # (2, n)
    d = torch.randint(-2, 3, (2, n))
    d[1, (d[0] == 0) & (d[1] == 0)] = 1
    q = p + d
    size = torch.tensor([[height], [width]])
    q = torch.where((q < 0) | (q >= size), p - d, q)  # reflected inward: still not p
    out = x.clone()
    out[:, p[0], p[1]] = x[:, q[0], q[1]]
    return out, p


def scan_sums(
    pred: torch.Tensor,
    mask: torch.Tensor,
    smooth: Smoothness = QUADRATIC,
    path: torch.Tensor | None = None,
    residual: Smoothness = QUADRATIC,
    blind: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> ScanSums:
    """Per-scan sums of one map.

    Args:
        pred: ``(T, H, W)`` predicted maps (percent).
        mask: ``(H, W)`` bool, the sample's pixels at the map's resolution; may be empty
            for one of a sample's scans, not for all.
        smooth: the smoothness term's form (:meth:`Smoothness.of` the loss config).
        path: ``(T, H, W)`` the spectral path's own map (a U-Net with ``emit_parts``), or None.
        residual: the penalty of ``pred - path`` per pixel (:func:`residual_form`).
        blind: ``(pixels (2, n), target (T, n))``: the blind-spot pixels (:func:`blind_spot`)
            and the spectral path's values there from their own spectra, or None.
    """
    p, m = pred[None], mask[None].to(pred.dtype)  # (1, T, H, W), (1, H, W)
    extra: dict = {}
    if path is not None:
        q = path[None]  # (1, T, H, W)
        extra = {"path_total": masked_sum(q, m)[0], "residual": masked_sum(residual.cost(p - q), m)[0]}
    if blind is not None:
        pixels, target = blind
        err = pred[:, pixels[0], pixels[1]] - target.to(pred.dtype)  # (T, n)
        extra |= {"blind": (err**2).sum(1), "blind_count": int(pixels.shape[1])}
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
    oor = torch.stack([s.out_of_range for s in sums]).sum(0).sum() / oor_per(w, n)
    loss = weighted_total({"mean": mse, "smooth": smooth, "out_of_range": oor}, w)
    terms = {"loss": loss, "mse": mse, "smooth": smooth, "oor": oor, "mean_pred": total / n}
    if all(s.path_total is not None and s.residual is not None for s in sums):
        path = torch.stack([s.path_total for s in sums]).sum(0)  # type: ignore[misc]
        terms["spectral"] = mean_error(path[None], n.reshape(1, 1), target.to(path.dtype)[None]).sum()
        terms["residual"] = (torch.stack([s.residual for s in sums]).sum(0) / n).sum()  # type: ignore[misc]
        spectral, residual = getattr(w, "spectral", 0.0), getattr(w, "residual", 0.0)
        terms["loss"] = loss + spectral * terms["spectral"] + residual * terms["residual"]
    if all(s.blind is not None for s in sums):
        picked = sum(s.blind_count for s in sums)
        terms["blindspot"] = (torch.stack([s.blind for s in sums]).sum(0) / picked).sum()  # type: ignore[misc]
        terms["loss"] = terms["loss"] + getattr(w, "blindspot", 0.0) * terms["blindspot"]
    return terms
