"""The tiling geometry from a config alone equals the one measured on the built network."""

from __future__ import annotations

import itertools
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from chemmap.config import load_config
from chemmap.models.geometry import core_windows, unet_geometry
from chemmap.models.tiling import model_geometry
from chemmap.models.unet import UNet, UNetConfig
from chemmap.train.trainer import NOT_UNET

ROOT = Path(__file__).resolve().parents[2]
GEOMETRY_FIELDS = ("depth", "pad", "bilinear", "front_end", "align_corners")


def _pipeline_models() -> list[UNetConfig]:
    """The model sections of the shipped pipelines (what preprocessing sizes its index for)."""
    configs = []
    for path in (ROOT / "configs" / "ci.yaml", ROOT / "pipelines" / "pork_belly.yaml"):
        section = load_config(path).model
        configs.append(UNetConfig(in_channels=9, **section.model_dump(exclude=NOT_UNET)))
    return configs


def _test_models() -> list[UNetConfig]:
    """Every geometry the tests build (tests/models, tests/train, configs/ci.yaml, the pipeline).

    tests/models build depths 1 to 4 with every combination of pad, bilinear and front-end
    (test_unet, test_tiling, test_patched, test_loss, test_hub), the classic depth-5
    valid-convolution U-Net (test_unet) and DESIGN.md's depth-5 nets (test_tiling, which
    checks those two against unet_geometry itself: measuring them costs seconds each).
    """
    product = [
        UNetConfig(in_channels=9, depth=depth, pad=pad, bilinear=bilinear, front_end=front_end)
        for depth, pad, bilinear, front_end in itertools.product([1, 2, 3, 4], *[[True, False]] * 3)
    ]
    classic = UNetConfig(in_channels=1, depth=5, pad=False, bilinear=False)
    transposed_corners = UNetConfig(in_channels=3, depth=3, bilinear=False, align_corners=True)
    configs = [*product, classic, transposed_corners, *_pipeline_models()]
    unique = {tuple(getattr(c, f) for f in GEOMETRY_FIELDS): c for c in configs}
    return list(unique.values())


def _name(config: UNetConfig) -> str:
    return "-".join(f"{f}={getattr(config, f)}" for f in GEOMETRY_FIELDS)


@pytest.mark.parametrize("config", _test_models(), ids=_name)
def test_geometry_from_the_config_equals_the_measurement(config: UNetConfig) -> None:
    measured = model_geometry(UNet(config, features=1))
    assert unet_geometry(config) == measured


def test_any_object_with_the_fields_will_do_and_widths_do_not_matter() -> None:
    section = load_config(ROOT / "configs" / "ci.yaml").model  # the pipeline's pydantic section
    fields = section.model_dump(exclude=NOT_UNET)
    config = UNetConfig(in_channels=62, out_channels=3, **fields)
    wider = replace(config, features=64, encoder="resnet", normalization="ln")
    assert unet_geometry(section) == unet_geometry(config) == unet_geometry(wider)


def test_align_corners_true_has_no_exact_radius() -> None:
    with pytest.raises(ValueError, match=r"align_corners=True .* no radius makes tiles exact"):
        unet_geometry(UNetConfig(depth=3, bilinear=True, align_corners=True))
    assert not model_geometry(UNet(depth=3, features=1, align_corners=True)).exact  # as measured


def test_a_config_without_the_fields_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"needs a U-Net config; dict has no \['depth'"):
        unet_geometry({"depth": 3})


def test_geometry_imports_no_torch() -> None:
    """Preprocessing sizes its patch index from the config without loading torch."""
    code = (
        "import sys, types; from chemmap.models.geometry import unet_geometry; "
        "cfg = types.SimpleNamespace(depth=4, pad=True, bilinear=True, front_end=True, align_corners=False); "
        "print(unet_geometry(cfg).radius, 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    expected = unet_geometry(UNetConfig(in_channels=9, depth=4, front_end=True)).radius
    assert out.stdout.split() == [str(expected), "False"]


def test_core_windows_start_on_the_grid_and_cover_the_image_once() -> None:
    boxes = core_windows(61, 70, 16, stride=4)
    count = [[0] * 70 for _ in range(61)]
    for y0, x0, y1, x1 in boxes:
        assert y0 % 4 == 0 and x0 % 4 == 0
        for y in range(y0, y1):
            for x in range(x0, x1):
                count[y][x] += 1
    assert all(c == 1 for row in count for c in row)
    with pytest.raises(ValueError, match="multiple of the stride 4, got 10"):
        core_windows(61, 70, 10, stride=4)
