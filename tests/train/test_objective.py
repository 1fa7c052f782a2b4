"""The multi-scan sample loss equals chemmap.models.loss on one image, and pools scans correctly."""

from __future__ import annotations

import torch

from chemmap.config import LossSection
from chemmap.models.loss import LossConfig
from chemmap.models.loss import sample_loss as image_loss
from chemmap.train.objective import sample_loss, scan_sums


def test_one_scan_matches_the_model_loss():
    g = torch.Generator().manual_seed(0)
    p = 50 + 60 * torch.randn(2, 9, 11, generator=g)  # (T, H, W), some pixels out of range
    mask = torch.rand(9, 11, generator=g) > 0.3
    y = torch.tensor([30.0, 60.0])
    w = LossSection(smooth=3.0, out_of_range=0.01)
    ours = sample_loss([scan_sums(p, mask)], y, w)
    ref = image_loss(p[None], mask[None].float(), y[None], LossConfig(smooth=3.0, out_of_range=0.01, l2=0))
    torch.testing.assert_close(ours["loss"], ref["total"])


def test_two_scans_form_one_sample():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(1, 6, 7, generator=g), torch.randn(1, 5, 7, generator=g)
    ma, mb = torch.rand(6, 7, generator=g) > 0.4, torch.rand(5, 7, generator=g) > 0.4
    out = sample_loss([scan_sums(a, ma), scan_sums(b, mb)], torch.tensor([0.5]), LossSection())
    pooled = torch.cat([a[0][ma], b[0][mb]]).mean()  # the sample's mean over both scans' pixels
    torch.testing.assert_close(out["mean_pred"][0], pooled)
    torch.testing.assert_close(out["mse"], (pooled - 0.5) ** 2)
