"""The multi-scan sample loss is chemmap.models.loss's: on one image, and on scans side by side."""

from __future__ import annotations

import functools

import pytest
import torch

from chemmap.config import LossSection
from chemmap.models.loss import LossConfig
from chemmap.models.loss import sample_loss as image_loss
from chemmap.models.patched import patched_backward, patched_sum
from chemmap.models.tiling import core_windows, forward_full, model_geometry, read_padded
from chemmap.models.unet import UNet, UNetConfig
from chemmap.train.objective import sample_loss, scan_sums

# The objective and models.loss do the same sums, some in another order: in float64 they
# differ by rounding only, ~eps per sum. Bound: 1000 eps = 2.2e-13.
EXACT = 1000 * torch.finfo(torch.float64).eps
WEIGHTS = LossConfig(mean=1.0, smooth=3.0, out_of_range=0.01, l2=0.0)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def scans(
    seed: int, targets: int, shapes: list[tuple[int, int]]
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Seeded maps ``(T, H, W)`` (some pixels below 0 or above 100 %) and bool masks ``(H, W)``."""
    g = torch.Generator().manual_seed(seed)
    maps = [50 + 60 * torch.randn(targets, h, w, generator=g, dtype=torch.float64) for h, w in shapes]
    masks = [torch.rand(h, w, generator=g) > 0.3 for h, w in shapes]
    return [p.requires_grad_(True) for p in maps], masks


def side_by_side(maps: list[torch.Tensor], masks: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """One image holding every scan, separated by a masked-out column: no pair joins two scans."""
    height = max(p.shape[-2] for p in maps)
    width = sum(p.shape[-1] + 1 for p in maps)
    pieces, mask_pieces = [], []
    for p, m in zip(maps, masks, strict=True):
        pad = (0, 1, 0, height - p.shape[-2])  # one empty column right, empty rows below
        pieces.append(torch.nn.functional.pad(p, pad))
        mask_pieces.append(torch.nn.functional.pad(m.double(), pad))
    canvas, mask = torch.cat(pieces, -1), torch.cat(mask_pieces, -1)
    assert canvas.shape[-2:] == (height, width)
    return canvas, mask  # (T, H, W), (H, W)


@pytest.mark.parametrize("targets", [1, 2])
@pytest.mark.parametrize("shapes", [[(9, 11)], [(9, 11), (6, 13), (12, 7)]], ids=["one scan", "three scans"])
def test_objective_is_the_image_loss_of_its_scans_side_by_side(targets: int, shapes: list) -> None:
    """Terms and gradients equal models.loss.sample_loss (one scan: the image itself)."""
    maps, masks = scans(len(shapes) + 10 * targets, targets, shapes)
    y = torch.tensor([30.0, 60.0][:targets], dtype=torch.float64)
    ours = sample_loss([scan_sums(p, m) for p, m in zip(maps, masks, strict=True)], y, WEIGHTS)
    canvas, mask = side_by_side(maps, masks) if len(maps) > 1 else (maps[0], masks[0].double())
    ref = image_loss(canvas[None], mask[None], y[None], WEIGHTS)
    for name, ref_name in [("loss", "total"), ("mse", "mean"), ("smooth", "smooth"), ("oor", "out_of_range")]:
        assert ours[name].item() == pytest.approx(ref[ref_name].item(), rel=EXACT), name
    grads = torch.autograd.grad(ours["loss"], maps)
    ref_grads = torch.autograd.grad(ref["total"], maps)
    for g, r in zip(grads, ref_grads, strict=True):
        assert rel(g, r) < EXACT


def test_the_out_of_range_term_per_pixel_is_the_sum_divided_by_the_samples_pixels() -> None:
    """``out_of_range_norm: pixel``: the excursions' sum over the sample's N mask pixels (of
    all its scans), in the objective as in models.loss; ``sum`` (the paper) leaves it whole."""
    maps, masks = scans(7, 1, [(9, 11), (6, 13)])
    y = torch.tensor([40.0], dtype=torch.float64)
    parts = [scan_sums(p, m) for p, m in zip(maps, masks, strict=True)]
    n = sum(int(m.sum()) for m in masks)
    whole = sample_loss(parts, y, LossSection(smooth=3.0, out_of_range=0.01))
    per = sample_loss(parts, y, LossSection(smooth=3.0, out_of_range=0.01, out_of_range_norm="pixel"))
    assert whole["oor"].item() > 0
    assert per["oor"].item() == pytest.approx(whole["oor"].item() / n, rel=EXACT)
    assert (whole["loss"] - per["loss"]).item() == pytest.approx(
        0.01 * (whole["oor"] - per["oor"]).item(), rel=1e-9
    )
    canvas, mask = side_by_side(maps, masks)
    cfg = LossConfig(mean=1.0, smooth=3.0, out_of_range=0.01, l2=0.0, out_of_range_norm="pixel")
    ref = image_loss(canvas[None], mask[None], y[None], cfg)
    assert per["oor"].item() == pytest.approx(ref["out_of_range"].item(), rel=EXACT)
    assert per["loss"].item() == pytest.approx(ref["total"].item(), rel=EXACT)
    with pytest.raises(ValueError, match="out_of_range_norm"):
        image_loss(canvas[None], mask[None], y[None], LossConfig(out_of_range_norm="mean"))


def test_config_section_weights_and_a_missing_lab_value() -> None:
    """The training config's loss section weighs like LossConfig; a NaN target leaves the mean term."""
    maps, masks = scans(3, 2, [(8, 9), (7, 10)])
    y = torch.tensor([25.0, float("nan")], dtype=torch.float64)
    parts = [scan_sums(p, m) for p, m in zip(maps, masks, strict=True)]
    ours = sample_loss(parts, y, LossSection(smooth=3.0, out_of_range=0.01))
    pooled = torch.cat([p[0][m] for p, m in zip(maps, masks, strict=True)]).mean()  # first target's mean
    assert ours["mean_pred"][0].item() == pytest.approx(pooled.item(), rel=EXACT)
    assert ours["mse"].item() == pytest.approx(((pooled - 25.0) ** 2).item(), rel=EXACT)
    assert ours["loss"].item() == pytest.approx(sample_loss(parts, y, WEIGHTS)["loss"].item(), rel=EXACT)


def test_a_sample_without_pixels_is_an_error() -> None:
    maps, masks = scans(4, 1, [(5, 6)])
    with pytest.raises(ValueError, match="empty sample mask"):
        sample_loss([scan_sums(maps[0], torch.zeros_like(masks[0]))], torch.tensor([1.0]), WEIGHTS)


def test_patched_gradient_of_a_two_scan_sample_equals_the_whole_sample_gradient() -> None:
    torch.manual_seed(0)
    model = UNet(UNetConfig(in_channels=3, out_channels=1, depth=3, features=4)).double()
    images = [torch.randn(3, 37, 41, dtype=torch.float64), torch.randn(3, 30, 45, dtype=torch.float64)]
    masks = [torch.rand(37, 41) > 0.3, torch.rand(30, 45) > 0.5]
    y = torch.tensor([25.0], dtype=torch.float64)
    w = LossSection(smooth=2.0, out_of_range=0.01)

    model.zero_grad()
    parts = [scan_sums(forward_full(model, x), m) for x, m in zip(images, masks, strict=True)]
    sample_loss(parts, y, w)["loss"].backward()
    whole = torch.cat([p.grad.flatten() for p in model.parameters()]).clone()

    model.zero_grad()
    geo = model_geometry(model)
    cfg = LossConfig(mean=w.mean, smooth=w.smooth, out_of_range=w.out_of_range, l2=0.0)
    jobs = [
        (functools.partial(read_padded, x), core_windows(*x.shape[-2:], 16, geo.stride), m.double())
        for x, m in zip(images, masks, strict=True)
    ]
    sums = [patched_sum(model, read, win, m, geometry=geo) for read, win, m in jobs]
    totals = (sum(s for s, _ in sums), sum(n for _, n in sums))
    for read, win, m in jobs:
        patched_backward(model, read, win, m, y, cfg, geometry=geo, sample_totals=totals)
    patched = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert rel(patched, whole) < EXACT


@pytest.mark.parametrize("penalty", ["quadratic", "huber"])
def test_the_spectral_path_terms(penalty: str) -> None:
    """Its own mean term and the residual penalty, summed over a sample's scans / N."""
    from chemmap.train.objective import residual_form

    maps, masks = scans(3, 1, [(9, 11), (6, 13)])
    paths, _ = scans(4, 1, [(9, 11), (6, 13)])
    y = torch.tensor([30.0], dtype=torch.float64)
    cfg = LossSection(smooth=3.0, spectral=0.5, residual=0.2, residual_penalty=penalty, residual_delta=4.0)
    form = residual_form(cfg)
    trio = [(p.detach(), q.detach(), m) for p, q, m in zip(maps, paths, masks, strict=True)]  # values only
    terms = sample_loss([scan_sums(p, m, path=q, residual=form) for p, q, m in trio], y, cfg)
    n = sum(int(m.sum()) for m in masks)
    path_mean = sum(float(q[0][m].sum()) for _, q, m in trio) / n
    d = torch.cat([(p - q)[0][m] for p, q, m in trio])
    cost = d**2 if penalty == "quadratic" else torch.where(d.abs() <= 4, d**2, 8 * d.abs() - 16)
    assert float(terms["spectral"]) == pytest.approx((30.0 - path_mean) ** 2, rel=1e-12)
    assert float(terms["residual"]) == pytest.approx(float(cost.sum()) / n, rel=1e-12)
    plain = sample_loss([scan_sums(p, m) for p, _, m in trio], y, cfg)
    assert "spectral" not in plain
    expected = plain["loss"] + 0.5 * terms["spectral"] + 0.2 * terms["residual"]
    assert float(terms["loss"]) == pytest.approx(float(expected), rel=1e-12)


def test_blind_spot_replaces_a_share_of_mask_pixels_by_neighbours_never_themselves() -> None:
    from chemmap.train.objective import blind_spot

    torch.manual_seed(0)
    h, w = 7, 9
    x = torch.arange(3 * h * w, dtype=torch.float64).reshape(3, h, w)  # every pixel's spectrum distinct
    mask = torch.zeros(h, w, dtype=torch.bool)
    mask[:, :4] = True  # touches the top, bottom and left borders
    for _ in range(20):
        seen, p = blind_spot(x, mask, 0.25)
        assert p.shape == (2, round(0.25 * 28)) and mask[p[0], p[1]].all()
        assert len({(int(a), int(b)) for a, b in p.T}) == p.shape[1]  # distinct pixels
        changed = (seen != x).any(0)
        assert changed[p[0], p[1]].all() and int(changed.sum()) == p.shape[1]  # those, and only those
        for y0, x0 in p.T.tolist():  # each took the whole spectrum of a pixel within 2 px
            src = (x[0] == seen[0, y0, x0]).nonzero()[0].tolist()
            assert src != [y0, x0] and max(abs(src[0] - y0), abs(src[1] - x0)) <= 2
            assert torch.equal(seen[:, y0, x0], x[:, src[0], src[1]])
    with pytest.raises(ValueError, match="must be on the input's grid"):
        blind_spot(x, mask[:, :5], 0.1)


def test_the_blind_spot_term() -> None:
    """The mean squared error at the picked pixels over a sample's scans, weighted into the loss."""
    maps, masks = scans(3, 1, [(9, 11), (6, 13)])
    y = torch.tensor([30.0], dtype=torch.float64)
    cfg = LossSection(smooth=3.0, blindspot=0.7)
    picks = [torch.tensor([[0, 2, 4], [1, 3, 5]]), torch.tensor([[1], [7]])]
    targets = [
        torch.tensor([[10.0, 20.0, 30.0]], dtype=torch.float64),
        torch.tensor([[5.0]], dtype=torch.float64),
    ]
    maps = [p.detach() for p in maps]
    terms = sample_loss(
        [scan_sums(p, m, blind=(k, t)) for p, m, k, t in zip(maps, masks, picks, targets, strict=True)],
        y,
        cfg,
    )
    errs = torch.cat([(p[0, k[0], k[1]] - t[0]) for p, k, t in zip(maps, picks, targets, strict=True)])
    assert float(terms["blindspot"]) == pytest.approx(float((errs**2).mean()), rel=1e-12)
    plain = sample_loss([scan_sums(p, m) for p, m in zip(maps, masks, strict=True)], y, cfg)
    assert "blindspot" not in plain
    assert float(terms["loss"]) == pytest.approx(float(plain["loss"] + 0.7 * terms["blindspot"]), rel=1e-12)


def test_the_loss_on_the_output_grid_uses_the_half_resolution_map_and_its_mask() -> None:
    """``train.loss.grid: output``: one view's sums are those of the front-end's
    half-resolution map (before the x2 up-sampling) over the mask brought to that grid; the
    default ``input`` grid sums the full-resolution map over the scan's own mask."""
    from types import SimpleNamespace

    from chemmap.config import TrainSection
    from chemmap.models.loss import Smoothness, output_grid_mask
    from chemmap.train.loop import _scan_sums

    torch.manual_seed(0)
    net = UNet(UNetConfig(in_channels=7, depth=2, features=3, front_end=True, pad=True)).double().eval()
    x = torch.randn(7, 21, 18, dtype=torch.float64) * 3 + 40  # an odd height: a half-filled border block
    m = torch.zeros(21, 18, dtype=torch.bool)
    m[3:17, 4:15] = True
    form = Smoothness.of(LossSection())
    sums = {}
    for grid in ("input", "output"):
        train = TrainSection(loss={"grid": grid, "smooth": 1.0})
        f = SimpleNamespace(train=train, net=net, model=net, device=torch.device("cpu"))
        with torch.no_grad():
            sums[grid] = _scan_sums(f, x, m, form, form)
    assert not net.native_grid  # the flag is reset after the forward
    with torch.no_grad():
        full = forward_full(net, x)
        net.native_grid = True
        native = forward_full(net, x)[..., :11, :9]
        net.native_grid = False
    small = output_grid_mask(m)
    assert small.shape == (11, 9) and int(small.sum()) < int(m.sum()) / 3
    assert float(sums["output"].count) == int(small.sum())
    assert torch.allclose(sums["output"].total, native.float()[:, small].sum(-1))
    assert float(sums["input"].count) == int(m.sum())
    assert torch.allclose(sums["input"].total, full.float()[:, m].sum(-1))


def test_patch_mode_gets_every_loss_setting_of_the_config_section() -> None:
    """Patch-wise training builds the image loss's config from the section: the smoothness's
    penalty, delta and pairs and the out-of-range norm come along, not only the weights."""
    import dataclasses

    from chemmap.train.loop import image_loss_config

    section = LossSection(
        mean=2.0,
        smooth=0.5,
        out_of_range=3.0,
        out_of_range_norm="pixel",
        smooth_penalty="huber",
        smooth_delta=2.5,
        smooth_pairs="anchor",
    )
    cfg = image_loss_config(section)
    for f in dataclasses.fields(LossConfig):
        assert getattr(cfg, f.name) == (0.0 if f.name == "l2" else getattr(section, f.name)), f.name
