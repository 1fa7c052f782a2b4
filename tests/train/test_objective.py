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


def test_patched_gradient_of_a_two_scan_sample_equals_the_whole_sample_gradient():
    from chemmap.models.loss import LossConfig
    from chemmap.models.patched import patched_backward, patched_sum
    from chemmap.models.tiling import core_windows, model_geometry, read_padded
    from chemmap.models.unet import UNet, UNetConfig
    from chemmap.train.loop import forward_map

    torch.manual_seed(0)
    model = UNet(UNetConfig(in_channels=3, out_channels=1, depth=3, features=4)).double()
    images = [torch.randn(3, 37, 41, dtype=torch.float64), torch.randn(3, 30, 45, dtype=torch.float64)]
    masks = [torch.rand(37, 41) > 0.3, torch.rand(30, 45) > 0.5]
    y = torch.tensor([25.0], dtype=torch.float64)
    w = LossSection(smooth=2.0, out_of_range=0.01)

    model.zero_grad()
    parts = [scan_sums(forward_map(model, x), m) for x, m in zip(images, masks, strict=True)]
    sample_loss(parts, y, w)["loss"].backward()
    whole = torch.cat([p.grad.flatten() for p in model.parameters()]).clone()

    model.zero_grad()
    geo = model_geometry(model)
    cfg = LossConfig(mean=w.mean, smooth=w.smooth, out_of_range=w.out_of_range, l2=0.0)
    jobs = [
        (lambda *b, x=x: read_padded(x, *b), core_windows(*x.shape[-2:], 16, geo.stride), m.double())
        for x, m in zip(images, masks, strict=True)
    ]
    sums = [patched_sum(model, read, win, m, geometry=geo) for read, win, m in jobs]
    totals = (sum(s for s, _ in sums), sum(n for _, n in sums))
    for read, win, m in jobs:
        patched_backward(model, read, win, m, y, cfg, geometry=geo, sample_totals=totals)
    patched = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert float((patched - whole).norm() / whole.norm()) < 1e-8
