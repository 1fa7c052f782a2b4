"""The paper's loss for one sample that may span several scans (DESIGN.md, "Loss").

A sample's scans (both sides of a belly) together form its masked pixels, so the mean,
the smoothness normaliser and ``N`` run over all of them: the terms are built from
per-scan sums and combined here.
"""

from __future__ import annotations

import torch

from chemmap.config import LossSection


def scan_sums(pred: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-scan sums of one map.

    Args:
        pred: ``(T, H, W)`` predicted maps (percent).
        mask: ``(H, W)`` bool, the sample's pixels at the map's resolution.

    Returns:
        ``sum`` (T,) of masked predictions, ``n`` pixel count, ``smooth`` (T,) sum of squared
        differences of neighbouring in-mask pairs along y and x, ``oor`` (T,) sum of squared
        excursions below 0 % and above 100 % inside the mask.
    """
    m = mask.to(pred.dtype)  # (H, W)
    total = (pred * m).sum(dim=(-2, -1))  # (T,)
    pair_y = m[1:, :] * m[:-1, :]  # (H-1, W): both pixels of a vertical pair inside
    pair_x = m[:, 1:] * m[:, :-1]  # (H, W-1)
    dy = (pred[:, 1:, :] - pred[:, :-1, :]).pow(2) * pair_y
    dx = (pred[:, :, 1:] - pred[:, :, :-1]).pow(2) * pair_x
    smooth = dy.sum(dim=(-2, -1)) + dx.sum(dim=(-2, -1))  # (T,)
    oor = ((torch.relu(-pred) ** 2 + torch.relu(pred - 100.0) ** 2) * m).sum(dim=(-2, -1))  # (T,)
    return {"sum": total, "n": m.sum(), "smooth": smooth, "oor": oor}


def sample_loss(
    sums: list[dict[str, torch.Tensor]], target: torch.Tensor, w: LossSection
) -> dict[str, torch.Tensor]:
    """The loss terms of one sample from its scans' sums, summed over targets (as ``models.loss``).

    Args:
        sums: :func:`scan_sums` of each of the sample's scans.
        target: ``(T,)`` the sample's lab values (percent).
        w: term weights.

    Returns:
        ``loss`` (weighted total without L2) and each unweighted term, plus ``mean_pred`` (T,).
    """
    n = torch.stack([s["n"] for s in sums]).sum().clamp_min(1.0)
    mean_pred = torch.stack([s["sum"] for s in sums]).sum(0) / n  # (T,)
    mse = (mean_pred - target).pow(2).sum()
    smooth = (torch.stack([s["smooth"] for s in sums]).sum(0) / n).sum()
    oor = torch.stack([s["oor"] for s in sums]).sum(0).sum()
    loss = w.mean * mse + w.smooth * smooth + w.out_of_range * oor
    return {"loss": loss, "mse": mse, "smooth": smooth, "oor": oor, "mean_pred": mean_pred}
