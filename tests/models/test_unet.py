"""The U-Net: shapes for every option, valid sizes, init, gradients, checkpointing."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from chemmap.models.tiling import predict_full
from chemmap.models.unet import SpectralFrontEnd, UNet, UNetConfig, Up

# Identities checked in float64 differ by rounding only (the same operations in another
# blocking or order, a few dozen layers each adding ~eps): bound 1000 eps = 2.2e-13.
EXACT = 1000 * torch.finfo(torch.float64).eps


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


OPTIONS = list(
    itertools.product(
        [True, False],  # bilinear
        [None, "bn", "ln"],  # normalization
        [False, True],  # front_end
        ["plain", "resnet"],  # encoder
        [False, True],  # align_corners
    )
)


@pytest.mark.parametrize(("bilinear", "normalization", "front_end", "encoder", "align_corners"), OPTIONS)
def test_pad_true_keeps_the_size_for_every_option(
    bilinear: bool, normalization: str | None, front_end: bool, encoder: str, align_corners: bool
) -> None:
    """Same size out as in, and (eval mode) each map depends on its own batch element only."""
    torch.manual_seed(0)
    model = UNet(
        in_channels=9, out_channels=2, depth=3, features=4, pad=True, bilinear=bilinear,
        normalization=normalization, front_end=front_end, encoder=encoder, align_corners=align_corners,
    ).double().eval()  # fmt: skip
    with torch.no_grad():
        for height, width in [(33, 47), (47, 61), (61, 64), (64, 33)]:
            x = torch.randn(2, 9, height, width, dtype=torch.float64)
            out = model(x)  # (B, T, H, W)
            assert out.shape == (2, 2, height, width)
            assert rel(out[1], model(x[1:])[0]) < EXACT


@pytest.mark.parametrize("depth", [1, 2, 3, 4])
@pytest.mark.parametrize("front_end", [False, True])
def test_pad_false_sizes(depth: int, front_end: bool) -> None:
    """Accepted sizes shrink by 2 * margin; the others are refused with the nearest sizes named."""
    model = UNet(in_channels=8, depth=depth, features=2, pad=False, bilinear=False, front_end=front_end)
    accepted = [n for n in range(1, 260) if model.accepts(n)]
    assert accepted, "some size must be accepted"
    # Every valid-convolution level trims 4 px and pooling halves: the sizes step by the stride.
    body = sorted({math.ceil(n / 2) for n in accepted} if front_end else set(accepted))
    assert all(b - a == 2 ** (depth - 1) for a, b in itertools.pairwise(body))
    with torch.no_grad():
        for n in accepted[:3]:
            out = model(torch.randn(1, 8, n, accepted[0]))
            assert out.shape[-2:] == (n - 2 * model.margin, accepted[0] - 2 * model.margin)
        refused = max(n for n in range(1, accepted[-1]) if not model.accepts(n))  # a gap, or too small
        with pytest.raises(ValueError, match=rf"height {refused} is not accepted.*nearest accepted"):
            model(torch.randn(1, 8, refused, accepted[0]))


def test_classic_configuration_maps_572_to_388() -> None:
    """The seed's original U-Net: depth 5, transposed convolutions, valid convolutions, 64 features."""
    model = UNet(in_channels=1, out_channels=1, depth=5, features=64, pad=False, bilinear=False)
    assert model.margin == 92 and model.accepts(572) and not model.accepts(570)
    with torch.no_grad():
        assert model(torch.randn(1, 1, 572, 572)).shape == (1, 1, 388, 388)


def test_widths_and_kwargs_spellings() -> None:
    config = UNetConfig(in_channels=5, out_channels=2, depth=4, features=8, pad=False)
    a = UNet(config)
    b = UNet(in_channels=5, out_channels=2, depth=4, features=8, pad=False)
    assert a.config == b.config
    assert [down.block[1][0].out_channels for down in a.encoder] == [8, 16, 32, 64]
    assert UNet(config, pad=True).config.pad is True  # kwargs override a config
    assert sum(p.numel() for p in a.parameters()) == sum(p.numel() for p in b.parameters())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"normalization": "gn"}, "normalization must be one of"),
        ({"encoder": "vit"}, "encoder must be one of"),
        ({"depth": 0}, "depth must be >= 1"),
        ({"features": 0}, "features must be >= 1"),
        ({"front_end": True, "in_channels": 6}, "front_end needs in_channels >= 7"),
    ],
)
def test_config_errors_name_the_value(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        UNetConfig(**kwargs)


def test_wrong_input_channels_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"expected input \(B, 3, H, W\), got \(1, 4, 32, 32\)"):
        UNet(depth=2, features=2)(torch.zeros(1, 4, 32, 32))


def test_kaiming_init_and_zero_biases() -> None:
    torch.manual_seed(0)
    model = UNet(in_channels=3, depth=3, features=16, normalization="ln", bilinear=False, front_end=False)
    for module in model.modules():
        if isinstance(module, nn.Conv2d | nn.ConvTranspose2d) and module.bias is not None:
            assert torch.all(module.bias == 0)
        if isinstance(module, nn.LayerNorm):
            assert torch.all(module.weight == 1) and torch.all(module.bias == 0)
    conv = model.decoder[0].block[0][0]  # 3x3 conv, 32 -> 16 channels: 288 fan-in
    assert isinstance(conv, nn.Conv2d)
    expected = math.sqrt(2.0 / (conv.in_channels * 9))
    assert abs(float(conv.weight.detach().std()) / expected - 1) < 0.05


def test_bilinear_projection_before_interpolation_equals_the_reference_order() -> None:
    """The 1x1 conv runs at low resolution: equal to interpolating first (both are linear)."""
    torch.manual_seed(0)
    for align_corners in (False, True):
        config = UNetConfig(in_channels=3, depth=2, features=4, align_corners=align_corners)
        up = Up(8, 4, config)
        x = torch.randn(2, 8, 7, 9, dtype=torch.float64)
        proj = up.proj.double()
        ours = F.interpolate(proj(x), scale_factor=2, mode="bilinear", align_corners=align_corners)
        reference = proj(F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=align_corners))
        assert rel(ours, reference) < 1e-12


@pytest.mark.parametrize(("pad", "height"), [(True, 33), (True, 64), (False, 87), (False, 88)])
def test_front_end_map_has_the_input_geometry(pad: bool, height: int) -> None:
    torch.manual_seed(0)
    model = UNet(in_channels=10, depth=3, features=4, pad=pad, front_end=True)
    x = torch.randn(1, 10, height, 95 if pad else 103)
    with torch.no_grad():
        out = model(x)
    assert out.shape[-2:] == (height - 2 * model.margin, x.shape[-1] - 2 * model.margin)
    assert predict_full(model, x).shape == (1, 1, height, x.shape[-1])  # the scan's own geometry


@pytest.mark.parametrize(
    ("encoder", "bilinear", "normalization", "front_end", "pad"),
    [
        ("plain", True, None, False, True),
        ("plain", False, "bn", True, False),
        ("resnet", True, "ln", True, True),
        ("resnet", False, None, False, False),
        ("resnet", True, "bn", False, False),
    ],
)
def test_every_parameter_gets_a_gradient(
    encoder: str, bilinear: bool, normalization: str | None, front_end: bool, pad: bool
) -> None:
    """Every parameter moves the loss ``mean((out - 3) ** 2)``; the head's bias by a known amount.

    The bias adds a constant to the head's output, and up-sampling and cropping keep a
    constant, so its gradient is ``2 * mean(out - 3)`` exactly. In float64 a gradient that
    is zero in exact arithmetic rounds to ~1e-16; the smallest genuine ones here are
    ~1e-3: the threshold 1e-6 lies far from both.
    """
    torch.manual_seed(0)
    model = UNet(
        in_channels=9, depth=3, features=4, encoder=encoder, bilinear=bilinear,
        normalization=normalization, front_end=front_end, pad=pad,
    ).double()  # fmt: skip
    size = model.valid_size(60)
    out = model(torch.randn(2, 9, size, size, dtype=torch.float64))
    ((out - 3) ** 2).mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert p.grad.abs().max() > 1e-6, name
    expected = 2 * (out.detach().mean() - 3)
    assert abs(float(model.head.bias.grad[0] / expected) - 1) < EXACT


def test_batch_norm_before_the_head_zeroes_its_bias_gradient_under_a_zero_target() -> None:
    """Why the test above regresses on 3 and not on 0.

    With batch norm in training mode the head's input has zero batch mean per channel
    (shift 0 as initialised), so ``mean(out)`` equals the head's bias (0) and
    ``d mean(out ** 2) / d bias = 2 * mean(out) = 0`` exactly: a zero gradient that only
    rounding made non-zero. It is the zero target that cancels it, not the model: training
    regresses on lab values (tens of percent), where the bias, which sets the map's level,
    gets ``2 * (M - y)``. The bias therefore stays.
    """
    torch.manual_seed(0)
    model = UNet(in_channels=9, depth=3, features=4, encoder="resnet", normalization="bn", pad=False)
    model = model.double()
    size = model.valid_size(60)
    out = model(torch.randn(2, 9, size, size, dtype=torch.float64))
    out.square().mean().backward()
    scale = float(out.detach().abs().mean())  # the size of the terms that cancel
    assert abs(float(model.head.bias.grad[0])) < EXACT * scale


@pytest.mark.parametrize("normalization", [None, "ln"])
@pytest.mark.parametrize("encoder", ["plain", "resnet"])
def test_checkpointing_changes_neither_outputs_nor_gradients(normalization: str | None, encoder: str) -> None:
    """(Batch norm is left out: recomputation in backward updates its running stats twice.)"""
    torch.manual_seed(0)
    plain = UNet(
        in_channels=9, depth=3, features=4, normalization=normalization, encoder=encoder, front_end=True
    )
    ckpt = UNet(plain.config, checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    plain, ckpt = plain.double(), ckpt.double()
    x = torch.randn(2, 9, 47, 52, dtype=torch.float64)
    outs, grads = [], []
    for model in (plain, ckpt):
        out = model(x)
        out.square().mean().backward()
        outs.append(out.detach())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert rel(outs[1], outs[0]) < EXACT
    assert rel(grads[1], grads[0]) < EXACT


@pytest.mark.parametrize("shape", [(2, 7, 9, 11), (1, 62, 16, 15)])
def test_spectral_front_end_equals_its_conv3d_with_gradients(shape: tuple[int, ...]) -> None:
    """The banded Conv2d of the front-end computes the paper's Conv3d, forward and backward."""
    torch.manual_seed(0)
    fe = SpectralFrontEnd().double()
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    ours = fe(x)
    theirs = fe.conv(x.unsqueeze(1)).squeeze(1)  # (B, C - 6, H // 2, W // 2)
    assert ours.shape == theirs.shape == (shape[0], shape[1] - 6, shape[2] // 2, shape[3] // 2)
    assert rel(ours, theirs) < EXACT
    g = torch.randn_like(ours)
    grads = torch.autograd.grad(ours, [x, fe.conv.weight, fe.conv.bias], g)
    ref = torch.autograd.grad(theirs, [x, fe.conv.weight, fe.conv.bias], g)
    for a, b in zip(grads, ref, strict=True):
        assert rel(a, b) < EXACT


# ----------------------------------------------------------------------------- the spectral path


@pytest.mark.parametrize("kwargs", [{"pad": True}, {"pad": False, "front_end": True, "in_channels": 9}])
def test_the_spectral_path_starts_at_zero_and_adds_a_per_pixel_linear_map(kwargs: dict) -> None:
    base = {"in_channels": 3, "depth": 3, "features": 4, **kwargs}
    torch.manual_seed(0)
    plain = UNet(**base).double().eval()
    torch.manual_seed(0)
    model = UNet(**base, spectral_path=True).double().eval()
    h, w = plain.valid_size(44), plain.valid_size(52)
    x = torch.randn(2, base["in_channels"], h, w, dtype=torch.float64)
    assert torch.equal(model(x), plain(x))  # zero at the start; the rest initialised as before
    with torch.no_grad():
        model.spectral.weight.normal_()
        model.spectral.bias.fill_(3.0)
    m = model.margin
    linear = (
        torch.einsum("tc,bchw->bthw", model.spectral.weight[:, :, 0, 0], x[..., m : h - m, m : w - m]) + 3.0
    )
    assert rel(model(x), plain(x) + linear) < EXACT
    # Changing one pixel's spectrum moves its output by the linear map's change (plus the U-Net's)
    i, j = (h - 2 * m) // 2, (w - 2 * m) // 2  # an output pixel, on input pixel (i + m, j + m)
    y = x.clone()
    y[0, :, i + m, j + m] += 1.0
    with torch.no_grad():
        direct = float(model.spectral.weight[0, :, 0, 0].sum())
        through_unet = float(plain(y)[0, 0, i, j] - plain(x)[0, 0, i, j])
        got = float(model(y)[0, 0, i, j] - model(x)[0, 0, i, j])
    assert got == pytest.approx(direct + through_unet, rel=1e-9)


def test_the_spectral_path_keeps_tiles_exact() -> None:
    from chemmap.models.tiling import model_geometry, predict_tiled

    torch.manual_seed(0)
    model = (
        UNet(in_channels=9, depth=3, features=4, front_end=True, pad=False, spectral_path=True)
        .double()
        .eval()
    )
    with torch.no_grad():
        model.spectral.weight.normal_()
    geometry = model_geometry(model)
    x = torch.randn(9, 61, 70, dtype=torch.float64)
    full = predict_full(model, x)
    tiled = predict_tiled(model, x, core=16, halo=geometry.radius, geometry=geometry)
    assert rel(tiled, full) < EXACT


def test_a_unet_started_from_a_spectral_fit_maps_each_pixel_linearly_and_can_emit_both_maps() -> None:
    torch.manual_seed(0)
    model = UNet(in_channels=9, out_channels=2, depth=3, features=4, front_end=True, spectral_path=True)
    model = model.double().eval()
    coef, intercept = torch.randn(9, 2, dtype=torch.float64), torch.tensor([30.0, 5.0], dtype=torch.float64)
    model.start_from_spectral(coef, intercept)
    h, w = model.valid_size(40), model.valid_size(36)
    x = torch.randn(1, 9, h, w, dtype=torch.float64)
    linear = torch.einsum("ct,bchw->bthw", coef, x) + intercept[None, :, None, None]
    assert rel(model(x), linear) < EXACT  # the U-Net's head starts at zero
    model.emit_parts = True
    with torch.no_grad():
        model.head.weight.normal_()
        both = model(x)
    assert both.shape == (1, 4, h, w) and rel(both[:, 2:], linear) < EXACT
    assert rel(both[:, :2] - both[:, 2:], both[:, :2] - linear) < EXACT
    assert not torch.equal(both[:, :2], linear)
    with pytest.raises(ValueError, match="expected coef"):
        model.start_from_spectral(coef.T, intercept)
    with pytest.raises(ValueError, match="spectral_path=True"):
        UNet(in_channels=9, depth=3, features=4).start_from_spectral(coef[:, :1], intercept[:1])


def _steered_reference(model: UNet, x: torch.Tensor) -> torch.Tensor:
    """The kernel head written out pixel by pixel: U-Net + S + sum_k a_k (S(p + k) - S(p))."""
    k, m = model.config.kernel_head, model.margin
    h, w = x.shape[-2] - 2 * m, x.shape[-1] - 2 * m
    feats = {}
    hook = model.head.register_forward_hook(lambda mod, inp, out: feats.setdefault("f", inp[0]))
    full = model(x)
    hook.remove()
    f = feats["f"]
    if model.front_end is not None:
        f = F.interpolate(f, scale_factor=2, mode="bilinear", align_corners=False)[..., :h, :w]
    a = model.kernel(f)[0]  # (K*K, h, w)
    s = model.spectral(x[..., m : m + h, m : m + w])[0, 0]  # (h, w)
    unet_and_path = full[0, 0] - model._steered(s[None, None], a[None])[0, 0]
    expected = torch.empty_like(s)
    for i in range(h):
        for j in range(w):
            acc = 0.0
            offsets = range(-(k // 2), k // 2 + 1)
            for n, (di, dj) in enumerate(itertools.product(offsets, offsets)):  # row-major
                ii, jj = min(max(i + di, 0), h - 1), min(max(j + dj, 0), w - 1)
                acc = acc + a[n, i, j] * (s[ii, jj] - s[i, j])
            expected[i, j] = unet_and_path[i, j] + acc
    return full[0, 0], expected


@pytest.mark.parametrize("kwargs", [{"pad": True}, {"pad": False, "front_end": True, "in_channels": 9}])
def test_the_kernel_head_starts_at_zero_and_filters_the_spectral_map_per_pixel(kwargs: dict) -> None:
    base = {"in_channels": 3, "depth": 2, "features": 4, "spectral_path": True, **kwargs}
    torch.manual_seed(0)
    plain = UNet(**base).double().eval()
    torch.manual_seed(0)
    model = UNet(**base, kernel_head=3).double().eval()
    h, w = plain.valid_size(14), plain.valid_size(12)
    x = torch.randn(1, base["in_channels"], h, w, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(model(x), plain(x))  # zero at the start
        for conv in (model.spectral, model.kernel):
            conv.weight.normal_()
            conv.bias.normal_()
        got, expected = _steered_reference(model, x)
    assert rel(got, expected) < EXACT


@pytest.mark.parametrize("guide", [0, 3])
def test_the_kernel_head_keeps_tiles_exact_and_its_geometry(guide: int) -> None:
    from chemmap.models.geometry import unet_geometry
    from chemmap.models.tiling import model_geometry, predict_tiled

    torch.manual_seed(0)
    head = {"spectral_path": True, "kernel_head": 5, "kernel_guide": guide}
    config = UNetConfig(in_channels=9, depth=3, features=4, front_end=True, **head)
    model = UNet(config).double().eval()
    with torch.no_grad():
        for conv in (model.spectral, model.kernel):
            conv.weight.normal_()
    assert (model.guide is not None) == bool(guide) and model.kernel.in_channels == 4 + guide
    geometry = model_geometry(model)
    assert geometry == unet_geometry(config)  # the head's 2 px lie inside the U-Net's field
    x = torch.randn(9, 61, 70, dtype=torch.float64)
    tiled = predict_tiled(model, x, core=16, halo=geometry.radius, geometry=geometry)
    assert rel(tiled, predict_full(model, x)) < EXACT


@pytest.mark.parametrize(
    "kwargs",
    [
        {"kernel_head": 4, "spectral_path": True},
        {"kernel_head": 3},
        {"kernel_guide": 2, "spectral_path": True},
        {"kernel_guide": 2, "kernel_head": 3, "spectral_path": True, "pad": False},
    ],
)
def test_a_bad_kernel_head_is_one_clear_error(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="kernel_head"):
        UNetConfig(in_channels=3, **kwargs)


def test_the_denoiser_head_starts_at_zero_keeps_tiles_exact_and_its_geometry_is_computed() -> None:
    """A 7-layer dilated head (22 px more reach at full resolution) on the spectral map: no
    change at the start; with weights, tiles at the computed halo equal the whole image."""
    from chemmap.models.geometry import unet_geometry
    from chemmap.models.tiling import model_geometry, predict_tiled

    base = {"in_channels": 9, "depth": 3, "features": 4, "front_end": True, "spectral_path": True}
    torch.manual_seed(0)
    plain = UNet(UNetConfig(**base)).double().eval()
    torch.manual_seed(0)
    config = UNetConfig(**base, denoiser=7, denoiser_features=6)
    model = UNet(config).double().eval()
    x = torch.randn(9, 61, 70, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(model(x[None]), plain(x[None]))  # zero at the start
        for conv in (model.spectral, model.denoiser[-1]):
            conv.weight.normal_()
        assert not torch.equal(model(x[None]), plain(x[None]))
    geometry = model_geometry(model)
    assert geometry == unet_geometry(config) and geometry.radius > unet_geometry(plain.config).radius
    tiled = predict_tiled(model, x, core=16, halo=geometry.radius, geometry=geometry)
    assert rel(tiled, predict_full(model, x)) < EXACT


def test_a_denoiser_reading_the_path_alone_sees_it_clipped_and_stands_in_for_it() -> None:
    """``denoiser_input: path``: the head's input is the spectral map clipped to 0-100 % (a
    map far outside the range, the background's spectra, enters at the clip) and its output
    stands in for the map S: the map is the U-Net's output plus the head's; tiles stay exact."""
    from chemmap.models.tiling import model_geometry, predict_tiled

    base = {"in_channels": 9, "depth": 3, "features": 4, "front_end": True, "spectral_path": True}
    torch.manual_seed(0)
    model = UNet(UNetConfig(**base, denoiser=3, denoiser_features=5, denoiser_input="path")).double().eval()
    assert model.denoiser[0].in_channels == 1  # the map only
    with torch.no_grad():
        for conv in (model.spectral, model.denoiser[-1]):
            conv.weight.normal_()
        model.spectral.weight.mul_(100.0)  # S far outside 0-100 % at many pixels
    x = torch.randn(9, 45, 38, dtype=torch.float64)
    seen: list[torch.Tensor] = []
    hook = model.denoiser.register_forward_pre_hook(lambda _m, args: seen.append(args[0].clone()))
    with torch.no_grad():
        out = model(x[None])
        path = model.spectral(x[None])
        assert (path < 0).any() and (path > 100).any()
        assert torch.equal(seen[0], (path.clamp(0, 100) - 50) / 25)
        model.head.weight.zero_()
        model.head.bias.zero_()  # the U-Net's own output off: the rest is the path and the head
        without_body = model(x[None])
        assert torch.allclose(without_body, model.denoiser(seen[0]))  # S itself is not added
    hook.remove()
    assert not torch.equal(out, without_body)
    geometry = model_geometry(model)
    tiled = predict_tiled(model, x, core=16, halo=geometry.radius, geometry=geometry)
    assert rel(tiled, predict_full(model, x)) < EXACT


@pytest.mark.parametrize("pad", [True, False])
def test_the_native_grid_is_the_half_resolution_map_the_up_sampling_starts_from(pad: bool) -> None:
    """``native_grid``: behind the front-end the forward stops before the x2 up-sampling;
    up-sampling that map gives the usual output. Without the front-end nothing changes; with
    the spectral path (full resolution) it is refused."""
    torch.manual_seed(0)
    model = UNet(UNetConfig(in_channels=9, depth=3, features=4, front_end=True, pad=pad)).double().eval()
    n = model.valid_size(60)
    x = torch.randn(1, 9, n, n, dtype=torch.float64)
    with torch.no_grad():
        full = model(x)
        model.native_grid = True
        native = model(x)
        model.native_grid = False
    side = full.shape[-1]
    assert native.shape[-1] == math.ceil(side / 2) and native.shape[-2] == math.ceil(full.shape[-2] / 2)
    assert torch.equal(model._to_input_grid(native, n, n), full)
    plain = UNet(UNetConfig(in_channels=9, depth=3, features=4, front_end=False)).double().eval()
    plain.native_grid = True
    assert plain(x).shape[-2:] == x.shape[-2:]
    path = UNet(UNetConfig(in_channels=9, depth=3, features=4, front_end=True, spectral_path=True))
    path.native_grid = True
    with pytest.raises(ValueError, match="native_grid"):
        path(x.float())


def test_a_denoiser_reading_the_path_and_the_spectra_stands_in_for_the_path_and_keeps_tiles_exact() -> None:
    """``denoiser_input: path+spectra``: the clipped map and 8 learned projections of the
    spectra (ReLU) go in; the head's output stands in for S; tiles stay exact."""
    from chemmap.models.tiling import model_geometry, predict_tiled
    from chemmap.models.unet import DENOISER_SPECTRA

    base = {"in_channels": 9, "depth": 3, "features": 4, "front_end": True, "spectral_path": True}
    torch.manual_seed(0)
    model = UNet(UNetConfig(**base, denoiser=4, denoiser_features=5, denoiser_input="path+spectra")).double()
    model.eval()
    assert model.denoiser[0].in_channels == 1 + DENOISER_SPECTRA
    with torch.no_grad():
        for conv in (model.spectral, model.denoiser[-1]):
            conv.weight.normal_()
    x = torch.randn(9, 45, 38, dtype=torch.float64)
    seen: list[torch.Tensor] = []
    hook = model.denoiser.register_forward_pre_hook(lambda _m, args: seen.append(args[0].clone()))
    with torch.no_grad():
        model(x[None])
        path = model.spectral(x[None])
        want = torch.cat([(path.clamp(0, 100) - 50) / 25, torch.relu(model.denoiser_spectra(x[None]))], dim=1)
        assert torch.equal(seen[0], want)
        model.head.weight.zero_()
        model.head.bias.zero_()
        assert torch.allclose(model(x[None]), model.denoiser(want))  # S itself is not added
    hook.remove()
    geometry = model_geometry(model)
    tiled = predict_tiled(model, x, core=16, halo=geometry.radius, geometry=geometry)
    assert rel(tiled, predict_full(model, x)) < EXACT


def test_a_scaled_denoiser_output_is_in_its_inputs_units() -> None:
    """``denoiser_output: scaled``: the head's output enters the map as 50 + 25 x output, so a
    head at zero puts the map at the U-Net's output + 50 %."""
    base = {"in_channels": 9, "depth": 3, "features": 4, "front_end": True, "spectral_path": True}
    torch.manual_seed(0)
    model = UNet(UNetConfig(**base, denoiser=3, denoiser_input="path", denoiser_output="scaled")).double()
    model.eval()
    x = torch.randn(1, 9, 45, 38, dtype=torch.float64)
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.zero_()
        assert torch.allclose(model(x), torch.full_like(model(x), 50.0))  # the head starts at zero
        for conv in (model.spectral, model.denoiser[-1]):
            conv.weight.normal_()
        head = model.denoiser(model._denoiser_input(model.spectral(x), None, x))
        assert torch.allclose(model(x), 50.0 + 25.0 * head)
    with pytest.raises(ValueError, match="denoiser_output"):
        UNetConfig(**base, denoiser=3, denoiser_output="scaled")  # path+features: not a stand-in


@pytest.mark.parametrize(
    "kwargs",
    [
        {"denoiser": 2, "spectral_path": True, "denoiser_input": "features"},
        {"denoiser": 3},
        {"denoiser": 8, "spectral_path": True},
        {"denoiser": 2, "spectral_path": True, "pad": False},
    ],
)
def test_a_bad_denoiser_is_one_clear_error(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="denoiser"):
        UNetConfig(in_channels=3, **kwargs)


def test_channels_last_2d_converts_the_2d_convolutions_and_leaves_the_front_end() -> None:
    """The GPU training loop and scoring both lay the 2-D convolutions out channels-last; the
    whole-model call, which the training loop made before, refuses the front-end's 5-D weight."""
    from chemmap.models.unet import channels_last_2d

    net = UNet(UNetConfig(in_channels=20, out_channels=1, depth=2, features=4, front_end=True))
    x = torch.randn(1, 20, 32, 32)
    before = net(x)
    with pytest.raises(RuntimeError, match="rank 4"):
        net.to(memory_format=torch.channels_last)
    assert channels_last_2d(net) is net
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d | torch.nn.ConvTranspose2d)]
    assert convs and all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs)
    assert any(m.weight.ndim == 4 and m.weight.shape[-1] > 1 for m in convs)  # not only 1x1 (trivially both)
    front = net.front_end.conv.weight
    assert front.ndim == 5 and front.is_contiguous()
    torch.testing.assert_close(net(x), before, rtol=1e-5, atol=1e-6)
