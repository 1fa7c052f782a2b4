"""torch.hub entry points for chemmap's U-Net (the seed library's names and defaults).

    model = torch.hub.load("/path/to/chemmap", "unet", source="local", in_channels=56, pad=False)

Every entry point takes the keyword arguments of :class:`chemmap.models.unet.UNetConfig`
(``in_channels``, ``out_channels``, ``pad``, ``bilinear``, ``normalization``, ``depth``,
``features``, ``align_corners``, ``front_end``, ``encoder``, ``checkpointing``). No weights
are published: ``pretrained=True`` is an error; load a chemmap checkpoint's state dict instead.
"""

from __future__ import annotations

from typing import Any

from chemmap.models.unet import UNet

dependencies = ["torch"]


def _build(pretrained: bool, defaults: dict[str, Any], kwargs: dict[str, Any]) -> UNet:
    if pretrained:
        raise ValueError(
            "chemmap publishes no pretrained U-Net weights (pretrained=True was given); build with "
            "pretrained=False and load a trained state dict (torch.load(..., weights_only=True))."
        )
    return UNet(**{**defaults, **kwargs})


def unet(pretrained: bool = False, **kwargs: Any) -> UNet:
    """U-Net; defaults in_channels=3, out_channels=1, pad=True, bilinear=True, normalization=None."""
    return _build(pretrained, {}, kwargs)


def unet_bn(pretrained: bool = False, **kwargs: Any) -> UNet:
    """``unet`` with batch normalisation after every ReLU."""
    return _build(pretrained, {"normalization": "bn"}, kwargs)


def unet_ln(pretrained: bool = False, **kwargs: Any) -> UNet:
    """``unet`` with layer normalisation over channels after every ReLU."""
    return _build(pretrained, {"normalization": "ln"}, kwargs)


def unet_medical(pretrained: bool = False, **kwargs: Any) -> UNet:
    """``unet`` with one input and one output channel (grey-scale images)."""
    return _build(pretrained, {"in_channels": 1, "out_channels": 1}, kwargs)


def unet_transconv(pretrained: bool = False, **kwargs: Any) -> UNet:
    """``unet`` up-sampling with 2x2 transposed convolutions instead of bilinear + 1x1."""
    return _build(pretrained, {"bilinear": False}, kwargs)
