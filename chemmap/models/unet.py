"""The U-Net that turns a hyperspectral cube into chemical maps, in one file.

The network follows the U-Net of Ronneberger et al. (2015) as implemented by
Engstrøm et al. for the pork-belly chemical-map paper (arXiv 2504.14131): two 3x3
convolutions per level, each followed by a ReLU and then (optionally) a normalisation
layer; 2x2 max pooling down; bilinear x2 + 1x1 convolution or a 2x2 transposed
convolution up; the skip concatenated before the up-sampled tensor; a 1x1 head.
Kaiming-normal weights and zero biases.

What chemmap adds (see DESIGN.md, "The science" and "Exact tiling"):

- ``features`` and ``depth`` instead of a fixed 64..1024 x 5 levels;
- ``align_corners=False`` by default: bilinear up-sampling on a grid that does not
  depend on the tensor's size, so that tiles reproduce the whole-image output exactly;
- the paper's spectral front-end, ``Conv3d(1, 1, (7, 2, 2), stride=(1, 2, 2))``
  (C -> C - 6 bands, half resolution), with the map brought back to the input's
  geometry (odd sizes padded in, cropped out);
- a ResNet-style encoder (residual blocks, built here, no downloaded weights);
- gradient checkpointing per block.

Geometry contract of :meth:`UNet.forward`: an input of ``(H, W)`` gives an output of
``(H - 2 * margin, W - 2 * margin)`` and output pixel ``(i, j)`` sits on input pixel
``(i + margin, j + margin)``; ``margin`` is 0 with ``pad=True``. Sizes the network
cannot take raise a ``ValueError`` that names the nearest sizes it can.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from chemmap.models.geometry import DENOISER_DILATIONS, body_output_size, unet_margin, unet_stride

NORMALIZATIONS = (None, "bn", "ln")
ENCODERS = ("plain", "resnet")
DENOISER_INPUTS = ("path+features", "path", "path+spectra")  # UNetConfig.denoiser_input
DENOISER_SPECTRA = 8  # denoiser_input "path+spectra": learned 1x1 projections of the spectra beside S
DENOISER_SCALE = 25.0  # percent: the spectral map enters the denoiser as (S - 50) / this
FRONT_END_BANDS = 7  # spectral kernel of the paper's front-end: C -> C - 6 channels


@dataclass(frozen=True)
class UNetConfig:
    """Every option of the U-Net; frozen, so it can key a cache (e.g. the tiling geometry)."""

    in_channels: int = 3  # input bands; with front_end, the raw band count (>= 7)
    out_channels: int = 1  # predicted maps, one per target (fat, protein, ...)
    depth: int = 5  # levels including the bottleneck: depth - 1 poolings
    features: int = 64  # width of the first level; doubles at every level down
    pad: bool = True  # True: "same" 3x3 convolutions; False: valid ones (the original U-Net)
    bilinear: bool = True  # up-sampling: bilinear x2 + 1x1 conv (True) or 2x2 transposed conv
    normalization: str | None = None  # None, "bn" (batch norm) or "ln" (layer norm over channels)
    align_corners: bool = False  # bilinear grid; False is shift-equivariant (exact tiling)
    front_end: bool = False  # paper's Conv3d(1, 1, (7, 2, 2), stride (1, 2, 2)) before the U-Net
    encoder: str = "plain"  # "plain" double convolutions or "resnet" residual blocks
    checkpointing: bool = False  # recompute each block in backward: less memory, more time
    # A per-pixel linear map of the input spectra (a 1x1 convolution at the input's full
    # resolution) added to the U-Net's output: the U-Net then predicts a residual over a
    # PLS-like map, and full-resolution spectral detail does not pass through the stride-2
    # front-end and the up-sampling. Zero at the start.
    spectral_path: bool = False
    # With spectral_path: H > 0 makes the path a per-pixel MLP instead of the linear map: 1x1
    # convolutions C -> H -> H -> T with GELU between (no spatial context: it can only
    # denoise by reading the spectrum, not by averaging neighbours). Its output layer starts
    # at zero; train.spectral_init: pixel fits it before training (chemmap.train.pathfit).
    spectral_hidden: int = 0
    # With spectral_path: K > 0 (odd) adds a kernel-predicting head at the output's full
    # resolution: from the U-Net's last features (up-sampled with the map) a 1x1 convolution
    # predicts, per pixel, K*K weights a_k, and the map gains sum_k a_k (S(p + k) - S(p)),
    # S the spectral path's map: a per-pixel, context-steered filter of the per-pixel
    # spectral map (edge-aware smoothing is in its reach; the half-resolution U-Net alone
    # cannot change S pixel by pixel). Zero at the start, like the path.
    kernel_head: int = 0
    # With kernel_head and pad=True: G > 0 full-resolution guide channels, a 3x3 convolution
    # of the input spectra (+ ReLU) beside the up-sampled features that steer the kernel, so
    # the weights can follow an edge at the input's resolution, not only the half one.
    kernel_guide: int = 0
    # With spectral_path and pad=True: N > 0 layers of a full-resolution denoiser head, 3x3
    # convolutions dilated 1, 2, 4, 8, 4, 2, 1 (the first N; ReLU between), of the spectral
    # path's map beside the U-Net's up-sampled features, adding its output to the map: a
    # non-linear filter of S over a wide neighbourhood (22 px for all 7), for the blind-spot
    # term (train.loss.blindspot) to train. Its last 1x1 convolution starts at zero.
    denoiser: int = 0
    denoiser_features: int = 32
    # What the denoiser reads: "path+features", the spectral map as (S - 50) / 25 and the
    # U-Net's features, its output added to U-Net + S; "path", the spectral map alone,
    # clipped to 0-100 % first (the background's spectra give it values far outside), its
    # output standing in for S (map = U-Net + denoiser(S)), as bench/blindspot.py's
    # standalone denoiser (chemmap.evaluate.blindspot) reads and predicts. Without the skip the head
    # need not cancel the centre pixel, which the blind-spot term never shows it.
    # "path+spectra": the same, with 8 learned 1x1 projections of the input spectra (+ ReLU)
    # beside S, so the head sees more of the neighbours' spectra than S's one direction.
    denoiser_input: str = "path+features"
    # The head's output units: "percent" (added to the map as it is) or "scaled" (in the
    # units of its input, 50 + 25 x output, as bench/blindspot.py's net predicts: a head that
    # starts at zero then starts at 50 % and moves by its input's scale, not by Adam's step
    # in percent). "scaled" needs a stand-in input (path, path+spectra).
    denoiser_output: str = "percent"

    def __post_init__(self) -> None:
        if self.denoiser and not (
            0 < self.denoiser <= len(DENOISER_DILATIONS) and self.spectral_path and self.pad
        ):
            raise ValueError(
                f"denoiser must be 0..{len(DENOISER_DILATIONS)} with spectral_path=True and pad=True, got "
                f"denoiser={self.denoiser}, spectral_path={self.spectral_path}, pad={self.pad}."
            )
        if self.denoiser_output not in ("percent", "scaled") or (
            self.denoiser_output == "scaled" and self.denoiser_input == "path+features"
        ):
            raise ValueError(
                f"denoiser_output must be 'percent' or 'scaled' (with denoiser_input path or path+spectra), "
                f"got {self.denoiser_output!r} with {self.denoiser_input!r}."
            )
        if self.denoiser_input not in DENOISER_INPUTS:
            raise ValueError(f"denoiser_input must be one of {DENOISER_INPUTS}, got {self.denoiser_input!r}.")
        if self.kernel_guide and (self.kernel_guide < 0 or not self.kernel_head or not self.pad):
            raise ValueError(
                f"kernel_guide needs kernel_head and pad=True, got kernel_guide={self.kernel_guide}, "
                f"kernel_head={self.kernel_head}, pad={self.pad}."
            )
        if self.kernel_head and (self.kernel_head < 3 or self.kernel_head % 2 == 0 or not self.spectral_path):
            raise ValueError(
                f"kernel_head must be 0 or an odd size >= 3 with spectral_path=True, got "
                f"kernel_head={self.kernel_head}, spectral_path={self.spectral_path}."
            )
        if self.spectral_hidden < 0 or (self.spectral_hidden and not self.spectral_path):
            raise ValueError(
                f"spectral_hidden must be 0 or > 0 with spectral_path=True, got "
                f"spectral_hidden={self.spectral_hidden}, spectral_path={self.spectral_path}."
            )
        if self.in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {self.in_channels}.")
        if self.front_end and self.in_channels < FRONT_END_BANDS:
            raise ValueError(
                f"front_end needs in_channels >= {FRONT_END_BANDS} (its kernel spans "
                f"{FRONT_END_BANDS} bands), got {self.in_channels}."
            )
        if self.out_channels < 1:
            raise ValueError(f"out_channels must be >= 1, got {self.out_channels}.")
        if self.depth < 1:
            raise ValueError(f"depth must be >= 1, got {self.depth}.")
        if self.features < 1:
            raise ValueError(f"features must be >= 1, got {self.features}.")
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {self.normalization!r}.")
        if self.encoder not in ENCODERS:
            raise ValueError(f"encoder must be one of {ENCODERS}, got {self.encoder!r}.")


# ----------------------------------------------------------------------------- blocks


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channel dimension of a ``(B, C, H, W)`` tensor (per pixel)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)  # (B, H, W, C)
        x = super().forward(x)
        return x.permute(0, 3, 1, 2)  # (B, C, H, W)


def norm_layer(normalization: str | None, channels: int) -> nn.Module:
    """The normalisation that follows each ReLU: identity, BatchNorm2d or channel LayerNorm."""
    if normalization == "bn":
        return nn.BatchNorm2d(channels, momentum=0.01)  # the reference implementation's momentum
    if normalization == "ln":
        return ChannelLayerNorm(channels)
    return nn.Identity()


def center_crop(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Central ``(height, width)`` window of ``x`` (B, C, H, W)."""
    top = (x.shape[-2] - height) // 2
    left = (x.shape[-1] - width) // 2
    return x[..., top : top + height, left : left + width]


class ConvUnit(nn.Sequential):
    """3x3 convolution -> ReLU -> normalisation (the U-Net's basic step)."""

    def __init__(self, in_channels: int, out_channels: int, config: UNetConfig) -> None:
        bias = config.normalization is None  # a normalisation layer brings its own shift
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1 if config.pad else 0, bias=bias),
            nn.ReLU(inplace=True),
            norm_layer(config.normalization, out_channels),
        )


class DoubleConv(nn.Sequential):
    """Two :class:`ConvUnit`; with ``pad=False`` it trims 2 pixels per side."""

    def __init__(self, in_channels: int, out_channels: int, config: UNetConfig) -> None:
        super().__init__(
            ConvUnit(in_channels, out_channels, config),
            ConvUnit(out_channels, out_channels, config),
        )


class ResidualBlock(nn.Module):
    """ResNet basic block in the U-Net's conv order: conv-ReLU-norm, conv, + shortcut, ReLU-norm.

    The shortcut is a 1x1 convolution when the width changes, and is centre-cropped by
    2 pixels per side with ``pad=False`` so that it lines up with the valid convolutions.
    """

    def __init__(self, in_channels: int, out_channels: int, config: UNetConfig) -> None:
        super().__init__()
        bias = config.normalization is None
        self.pad = config.pad
        self.conv1 = ConvUnit(in_channels, out_channels, config)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1 if config.pad else 0, bias=bias)
        self.shortcut = (
            nn.Identity()
            if in_channels == out_channels
            else nn.Conv2d(in_channels, out_channels, 1, bias=bias)
        )
        self.act = nn.ReLU(inplace=True)
        self.norm = norm_layer(config.normalization, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(self.conv1(x))  # (B, C_out, H', W')
        skip = self.shortcut(x)  # (B, C_out, H, W)
        if not self.pad:
            skip = center_crop(skip, out.shape[-2], out.shape[-1])
        return self.norm(self.act(out + skip))


class Down(nn.Module):
    """One encoder level: 2x2 max pooling (not on the first level), then a conv block."""

    def __init__(self, in_channels: int, out_channels: int, config: UNetConfig, pool: bool) -> None:
        super().__init__()
        self.pool = nn.MaxPool2d(2) if pool else nn.Identity()
        block = ResidualBlock if config.encoder == "resnet" else DoubleConv
        self.block = block(in_channels, out_channels, config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(self.pool(x))


class Up(nn.Module):
    """One decoder level: up-sample x2 to half the width, join the skip, double conv.

    Bilinear mode applies its 1x1 convolution *before* interpolating: both are linear
    (the convolution mixes channels, interpolation mixes pixels, constants stay
    constant), so the result equals the reference order at a quarter of the cost.
    """

    def __init__(self, in_channels: int, out_channels: int, config: UNetConfig) -> None:
        super().__init__()
        self.pad = config.pad
        self.bilinear = config.bilinear
        self.align_corners = config.align_corners
        if config.bilinear:
            self.proj: nn.Module = nn.Conv2d(in_channels, out_channels, 1)
        else:
            bias = config.normalization is None
            self.proj = nn.ConvTranspose2d(in_channels, out_channels, 2, stride=2, bias=bias)
        self.act = nn.ReLU(inplace=True)
        self.norm = norm_layer(config.normalization, out_channels)
        self.block = DoubleConv(2 * out_channels, out_channels, config)

    def forward(self, skip: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)  # (B, C_out, h, w) bilinear; (B, C_out, 2h, 2w) transposed
        if self.bilinear:
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=self.align_corners)
        x = self.norm(self.act(x))  # (B, C_out, 2h, 2w)
        if self.pad:
            # Odd sizes: pooling floored, so the up-sampled tensor may be a row/column short.
            dh, dw = skip.shape[-2] - x.shape[-2], skip.shape[-1] - x.shape[-1]
            x = F.pad(x, (dw // 2, dw - dw // 2, dh // 2, dh - dh // 2))
        else:
            skip = center_crop(skip, x.shape[-2], x.shape[-1])
        return self.block(torch.cat([skip, x], dim=1))  # (B, C_out, H', W')


class SpectralFrontEnd(nn.Module):
    """The paper's front-end: ``Conv3d(1, 1, (7, 2, 2), stride=(1, 2, 2), padding="valid")``.

    It slides one 7-band x 2 x 2 kernel over the cube: (B, C, H, W) -> (B, C - 6, H/2, W/2).

    The weight is the ``Conv3d``'s (checkpoints keep its name), but the forward pass runs it
    as one ``Conv2d`` with a banded ``(C - 6, C, 2, 2)`` weight: output channel ``o`` weighs
    bands ``o .. o + 6``. Same sums in another order (equal to ``self.conv`` to float
    rounding, tested); on the CPU 3x faster forward and 1.7x faster forward + backward than
    ``Conv3d``, which unfolds its input (56 x 1472 x 1300 window: 0.42 s against 1.05 s).
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(1, 1, (FRONT_END_BANDS, 2, 2), stride=(1, 2, 2))

    def banded_weight(self, channels: int) -> torch.Tensor:
        """The ``Conv2d`` weight ``(channels - 6, channels, 2, 2)`` equal to the ``Conv3d``'s kernel."""
        w = self.conv.weight[0, 0]  # (7, 2, 2)
        k, out = w.shape[0], channels - w.shape[0] + 1
        eye = torch.eye(channels, dtype=w.dtype, device=w.device)
        shifts = torch.stack([eye[j : j + out] for j in range(k)])  # (7, out, channels): [j, o, o + j] = 1
        return torch.einsum("kij,koc->ocij", w, shifts)  # (out, channels, 2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.banded_weight(x.shape[1]).to(x.dtype)
        bias = self.conv.bias.to(x.dtype).expand(weight.shape[0])  # type: ignore[union-attr]
        return nn.functional.conv2d(x, weight, bias, stride=2)  # (B, C - 6, H/2, W/2)


# ----------------------------------------------------------------------------- model


def spectral_path(in_channels: int, out_channels: int, hidden: int = 0) -> nn.Module:
    """The per-pixel spectral path: a 1x1 convolution (``hidden=0``), or an MLP of 1x1
    convolutions ``in -> hidden -> hidden -> out`` with GELU between; output zero at the start.
    The hidden layers keep PyTorch's default draw, which :func:`chemmap.train.pathfit.fit_path`
    also starts from."""
    if not hidden:
        path: nn.Module = nn.Conv2d(in_channels, out_channels, 1)
    else:
        path = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 1),
            nn.GELU(),
            nn.Conv2d(hidden, hidden, 1),
            nn.GELU(),
            nn.Conv2d(hidden, out_channels, 1),
        )
    _zero_output(path)
    return path


def channels_last_2d(model: nn.Module) -> nn.Module:
    """Put the weights of every 2-D (transposed) convolution in channels-last layout, in place.

    ``model.to(memory_format=torch.channels_last)`` refuses a model with the front-end: it
    converts every 4-D and 5-D tensor, and a ``Conv3d`` weight is 5-D. Returns ``model``.
    """
    for module in model.modules():
        if isinstance(module, nn.Conv2d | nn.ConvTranspose2d):
            module.to(memory_format=torch.channels_last)
    return model


def _zero_output(module: nn.Module) -> None:
    """Zero the weight and bias of a head, or of the last layer of a sequence of them."""
    last = module[-1] if isinstance(module, nn.Sequential) else module
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)


class UNet(nn.Module):
    """U-Net mapping a ``(B, C, H, W)`` cube to ``(B, out_channels, H', W')`` maps.

    Build it from a config or from keyword arguments (the seed library's spelling)::

        UNet(UNetConfig(in_channels=56, pad=False))
        UNet(in_channels=56, out_channels=1, pad=False, bilinear=True, normalization=None)

    Keyword arguments given with a config override its fields.
    """

    def __init__(self, config: UNetConfig | None = None, **kwargs: Any) -> None:
        super().__init__()
        config = UNetConfig(**kwargs) if config is None else replace(config, **kwargs)
        self.config = config
        widths = [config.features * 2**level for level in range(config.depth)]
        body_in = config.in_channels - (FRONT_END_BANDS - 1) if config.front_end else config.in_channels
        self.front_end = SpectralFrontEnd() if config.front_end else None
        self.encoder = nn.ModuleList(
            Down(c_in, c_out, config, pool=level > 0)
            for level, (c_in, c_out) in enumerate(zip([body_in, *widths[:-1]], widths, strict=True))
        )
        self.decoder = nn.ModuleList(
            Up(widths[level + 1], widths[level], config) for level in range(config.depth - 1)
        )
        self.head = nn.Conv2d(widths[0], config.out_channels, 1)
        self.spectral: nn.Module | None = None
        # Training with the spectral path's own terms sets this: forward then returns the map
        # and the spectral path's map stacked, (B, 2 T, H', W') (see forward).
        self.emit_parts = False
        # Training with the loss on the output grid (train.loss.grid: output) sets this: with
        # the front-end, forward then returns the half-resolution map before the x2
        # up-sampling, (B, T, ceil(H'/2), ceil(W'/2)) (pixel k on input pixels 2k, 2k + 1).
        self.native_grid = False
        self.reset_parameters()
        self.kernel: nn.Conv2d | None = None
        if config.spectral_path:  # made after the rest is drawn: the U-Net starts as without it
            self.spectral = spectral_path(config.in_channels, config.out_channels, config.spectral_hidden)
        self.guide: nn.Sequential | None = None
        if config.kernel_guide:  # drawn like the body's convolutions (reset_parameters' rule)
            self.guide = nn.Sequential(
                nn.Conv2d(config.in_channels, config.kernel_guide, 3, padding=1), nn.ReLU(inplace=True)
            )
            nn.init.kaiming_normal_(self.guide[0].weight)
            nn.init.zeros_(self.guide[0].bias)
        if config.kernel_head:
            steer = widths[0] + config.kernel_guide
            self.kernel = nn.Conv2d(steer, config.out_channels * config.kernel_head**2, 1)
            nn.init.zeros_(self.kernel.weight)
            nn.init.zeros_(self.kernel.bias)
        self.denoiser: nn.Sequential | None = None
        self.denoiser_spectra: nn.Conv2d | None = None
        if config.denoiser:
            self._make_denoiser(config, widths[0])

    def _make_denoiser(self, config: UNetConfig, features: int) -> None:
        """The denoiser head (and its spectral projections with ``path+spectra``), drawn like
        the body's convolutions; its output layer starts at zero."""
        extra = {"path+features": features, "path": 0, "path+spectra": DENOISER_SPECTRA}
        if config.denoiser_input == "path+spectra":
            self.denoiser_spectra = nn.Conv2d(config.in_channels, DENOISER_SPECTRA, 1)
            nn.init.kaiming_normal_(self.denoiser_spectra.weight)
            nn.init.zeros_(self.denoiser_spectra.bias)
        layers: list[nn.Module] = []
        channels = config.out_channels + extra[config.denoiser_input]
        for d in DENOISER_DILATIONS[: config.denoiser]:
            conv = nn.Conv2d(channels, config.denoiser_features, 3, padding=d, dilation=d)
            nn.init.kaiming_normal_(conv.weight)
            nn.init.zeros_(conv.bias)
            layers += [conv, nn.ReLU(inplace=True)]
            channels = config.denoiser_features
        out = nn.Conv2d(channels, config.out_channels, 1)
        nn.init.zeros_(out.weight)
        nn.init.zeros_(out.bias)
        self.denoiser = nn.Sequential(*layers, out)

    def reset_parameters(self) -> None:
        """Kaiming-normal convolution weights, zero biases; norm layers at weight 1, bias 0."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d | nn.ConvTranspose2d | nn.Conv3d):
                nn.init.kaiming_normal_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d | nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        for extra in (self.spectral, getattr(self, "kernel", None)):  # zero: the plain U-Net at the start
            if extra is not None:
                _zero_output(extra)

    # ------------------------------------------------------------------ geometry

    @property
    def stride(self) -> int:
        """Input shifts by multiples of this shift the output alike (the pooling grid)."""
        return unet_stride(self.config.depth, self.config.front_end)

    @property
    def margin(self) -> int:
        """Input pixels lost per side (0 with ``pad=True``)."""
        return unet_margin(self.config.depth, self.config.pad, self.config.front_end)

    def output_size(self, n: int) -> int:
        """Output size along one axis for input size ``n``, or -1 if the net cannot take ``n``."""
        depth, pad = self.config.depth, self.config.pad
        if not self.config.front_end:
            return body_output_size(n, depth, pad)
        half = body_output_size(math.ceil(n / 2), depth, pad)
        if half <= 0:
            return -1
        return n if self.config.pad else n - 2 * self.margin

    def accepts(self, n: int) -> bool:
        """Whether an input of size ``n`` (along either axis) is accepted."""
        return n >= 1 and self.output_size(n) > 0

    def valid_size(self, n: int) -> int:
        """Smallest accepted input size >= ``n`` (the sizes form a progression of step ``stride``)."""
        n = max(n, 1)
        while not self.accepts(n):
            n += 1
        return n

    def check_size(self, height: int, width: int) -> None:
        """Raise a ``ValueError`` naming the nearest accepted sizes if ``(height, width)`` is not accepted."""
        for axis, n in (("height", height), ("width", width)):
            if not self.accepts(n):
                below = [k for k in range(max(n - 4 * self.stride, 1), n) if self.accepts(k)]
                hint = f"{below[-1]} or {self.valid_size(n)}" if below else f"{self.valid_size(n)}"
                raise ValueError(
                    f"input {axis} {n} is not accepted by this U-Net (depth={self.config.depth}, "
                    f"pad={self.config.pad}, front_end={self.config.front_end}); nearest accepted: {hint}."
                )

    # ------------------------------------------------------------------ forward

    def _run(self, block: nn.Module, *args: torch.Tensor) -> torch.Tensor:
        if self.config.checkpointing and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Predict maps.

        Args:
            x: cube ``(B, in_channels, H, W)``.

        Returns:
            ``(B, out_channels, H - 2 * margin, W - 2 * margin)``; output pixel ``(i, j)``
            lies on input pixel ``(i + margin, j + margin)``.
        """
        if x.ndim != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(f"expected input (B, {self.config.in_channels}, H, W), got {tuple(x.shape)}.")
        height, width = x.shape[-2:]
        self.check_size(height, width)
        spectra = x
        if self.front_end is not None:
            # Odd sizes: repeat the last row/column so the stride-2 kernel covers every pixel.
            if height % 2 or width % 2:  # F.pad copies the input even when it adds nothing
                x = F.pad(x, (0, width % 2, 0, height % 2), mode="replicate")  # (B, C, 2h, 2w)
            x = self._run(self.front_end, x)  # (B, C - 6, h, w)
        skips = []
        for down in self.encoder:
            x = self._run(down, x)  # (B, F * 2**level, H_l, W_l)
            skips.append(x)
        x = skips.pop()
        for up in reversed(self.decoder):
            x = self._run(up, skips.pop(), x)  # (B, F * 2**level, H_l, W_l)
        features = x  # (B, F, h', w')
        x = self.head(x)  # (B, out_channels, h', w')
        if self.native_grid and self.front_end is not None:
            if self.spectral is not None:
                raise ValueError("native_grid: the spectral path's map has no half-resolution grid")
            return x
        if self.front_end is not None:
            x = self._to_input_grid(x, height, width)  # (B, T, H', W')
        if self.spectral is not None:
            m = self.margin
            path = self.spectral(spectra[..., m : height - m, m : width - m])  # (B, T, H', W')
            if not self._stands_in:
                x = x + path
            with_features = self.denoiser is not None and self.config.denoiser_input == "path+features"
            if self.kernel is not None or with_features:
                if self.front_end is not None:
                    features = self._to_input_grid(features, height, width)  # (B, F, H', W')
            if self.denoiser is not None:  # pad=True: the output's grid is the input's
                head = self.denoiser(self._denoiser_input(path, features, spectra))
                x = x + (50.0 + DENOISER_SCALE * head if self.config.denoiser_output == "scaled" else head)
            if self.kernel is not None:
                if self.guide is not None:  # pad=True: the input's grid is the output's
                    features = torch.cat([features, self.guide(spectra)], dim=1)  # (B, F + G, H, W)
                x = x + self._steered(path, self.kernel(features))
            if self.emit_parts:
                return torch.cat([x, path], dim=1)  # (B, 2 T, H', W'): the map, then the path's
        return x

    @property
    def _stands_in(self) -> bool:
        """Whether the denoiser's output replaces the spectral map in the sum (``denoiser_input``
        ``path`` or ``path+spectra``)."""
        return self.denoiser is not None and self.config.denoiser_input != "path+features"

    def _denoiser_input(
        self, path: torch.Tensor, features: torch.Tensor, spectra: torch.Tensor
    ) -> torch.Tensor:
        """``(B, T [+ F | + 8], H, W)``: the spectral map, centred and scaled (clipped to 0-100 %
        unless ``path+features``), and the U-Net's full-resolution features (``path+features``)
        or the spectra's learned projections (``path+spectra``; pad=True: one grid)."""
        if self.config.denoiser_input == "path+features":
            return torch.cat([(path - 50.0) / DENOISER_SCALE, features], dim=1)
        clipped = (path.clamp(0.0, 100.0) - 50.0) / DENOISER_SCALE
        if self.denoiser_spectra is None:
            return clipped
        return torch.cat([clipped, F.relu(self.denoiser_spectra(spectra))], dim=1)

    def _to_input_grid(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Half resolution back to the input's grid (x2 bilinear); ``align_corners=False`` keeps
        pixel k on input pixel k + margin."""
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)  # (B, C, 2h', 2w')
        return x[..., : height - 2 * self.margin, : width - 2 * self.margin]  # (B, C, H', W')

    def _steered(self, path: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """``sum_k a_k (S(p + k) - S(p))`` over the K x K neighbours ``k`` of each pixel.

        Args:
            path: ``(B, T, H, W)`` the spectral path's map S; replicated past its border.
            weights: ``(B, T * K * K, H, W)`` the a_k, neighbours in row-major order per target.
        """
        b, t, h, w = path.shape
        k = self.config.kernel_head
        padded = F.pad(path, (k // 2,) * 4, mode="replicate")  # (B, T, H + K - 1, W + K - 1)
        shifted = F.unfold(padded, k).view(b, t, k * k, h, w)  # (B, T, K*K, H, W)
        return ((shifted - path[:, :, None]) * weights.view(b, t, k * k, h, w)).sum(2)  # (B, T, H, W)

    def start_from_spectral(self, coef: torch.Tensor, intercept: torch.Tensor) -> None:
        """Start as the per-pixel linear map ``x @ coef + intercept`` of the input spectra.

        The spectral path takes ``coef`` ``(in_channels, T)`` and ``intercept`` ``(T,)``, in the
        model's input units; the U-Net's head starts at zero, so the model's map is the path's
        until training moves the U-Net away from it (its other weights keep their draw).
        """
        if not isinstance(self.spectral, nn.Conv2d):
            raise ValueError(
                "start_from_spectral needs a linear path: a U-Net with spectral_path=True, spectral_hidden=0."
            )
        t, c = self.config.out_channels, self.config.in_channels
        if tuple(coef.shape) != (c, t) or tuple(intercept.shape) != (t,):
            raise ValueError(f"expected coef ({c}, {t}) and intercept ({t},), got "
                             f"{tuple(coef.shape)} and {tuple(intercept.shape)}.")  # fmt: skip
        with torch.no_grad():
            self.spectral.weight.copy_(coef.T.reshape(t, c, 1, 1))
            self.spectral.bias.copy_(intercept)
        self.start_at_path()

    def start_at_path(self) -> None:
        """Zero the U-Net's head, so that the model's map starts as the spectral path's."""
        with torch.no_grad():
            nn.init.zeros_(self.head.weight)
            if self.head.bias is not None:
                nn.init.zeros_(self.head.bias)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in asdict(self.config).items())
