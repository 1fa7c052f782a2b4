"""Every file in pipelines/ and configs/ loads and builds its U-Net; the paper's and the NIR
pipelines are what their names say; README's scale-out table says what the code does to the
stage keys."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from chemmap.config import ChemmapConfig, load_config
from chemmap.evaluate.stage import evaluation_dir
from chemmap.models.unet import UNet
from chemmap.pipeline import _dataset_config, patch_geometry
from chemmap.preprocess.recipe import Recipe
from chemmap.stages import stage_dir
from chemmap.synth import SynthSpec
from chemmap.train.trainer import model_config, training_section

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted([*ROOT.glob("pipelines/*.yaml"), *ROOT.glob("configs/*.yaml")])


def _recipe(cfg: ChemmapConfig) -> Recipe:
    """The recipe for the raw bands of the config's built-in scanner: the data of a synthetic
    pipeline; for a folder pipeline a stand-in (its camera's bands are known once scans are read)."""
    return Recipe.create(cfg.preprocess, SynthSpec.from_config(cfg.synth).wavelengths(), source=cfg.source)


def _unet(cfg: ChemmapConfig) -> UNet:
    """The U-Net as the trainer builds it (``model_config`` checks ``model.in_channels``)."""
    channels = _recipe(cfg).n_channels
    if cfg.data.source == "folder" and cfg.model.in_channels is not None:
        channels = cfg.model.in_channels
    return UNet(model_config(cfg, channels, len(cfg.targets)))


def test_the_pipelines_and_presets_the_docs_name_are_there():
    names = {f"{p.parent.name}/{p.name}" for p in CONFIGS}
    assert {
        "pipelines/pork_belly.yaml",
        "pipelines/pork_belly_paper.yaml",
        "pipelines/pork_belly_nir.yaml",
        "configs/ci.yaml",
        "configs/folder_example.yaml",
    } <= names
    # The default pipeline's comment sends folder users to the example.
    assert "configs/folder_example.yaml" in (ROOT / "pipelines" / "pork_belly.yaml").read_text()


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_config_loads_and_builds_its_model(path: Path):
    cfg = load_config(path)
    net = _unet(cfg)
    geometry = patch_geometry(cfg)  # the patch index preprocessing would write
    assert geometry.stride % net.stride == 0 and geometry.halo >= 0

    # The smallest input the network takes gives a map of the size its geometry promises.
    size = net.valid_size(1)
    with torch.no_grad():
        y = net(torch.zeros(1, net.config.in_channels, size, size))  # (1, C, size, size)
    out = size - 2 * net.margin
    assert y.shape == (1, len(cfg.targets), out, out)
    if cfg.data.source == "synthetic":  # whole images of the scanner's size go through
        assert net.accepts(cfg.synth.lines) and net.accepts(cfg.synth.samples)


def test_the_paper_pipeline_is_the_papers():
    cfg = load_config(ROOT / "pipelines" / "pork_belly_paper.yaml")
    wl = SynthSpec.from_config(cfg.synth).wavelengths()
    assert cfg.data.source == "synthetic" and cfg.synth.instrument == "vnir"
    assert wl.size == 300 and wl[0] == pytest.approx(400, abs=1) and wl[-1] == pytest.approx(1000, abs=1)
    assert (cfg.synth.lines, cfg.synth.samples) == (2360, 1272)  # the paper's image size

    # 300 bands -> those below 750 nm dropped -> adjacent pairs averaged -> 62 channels.
    recipe = _recipe(cfg)
    kept = wl[list(recipe.band_index)]
    assert kept.min() >= 750 and wl[: recipe.band_index[0]].max() < 750
    assert cfg.preprocess.bin == 2 and recipe.n_channels == 62 and cfg.model.in_channels == 62

    net = _unet(cfg)
    c = net.config
    assert (c.depth, c.features, c.pad, c.bilinear, c.normalization) == (5, 64, False, True, None)
    assert net.front_end is not None
    with torch.no_grad():  # the spectral front-end: 62 -> 56 channels at half resolution
        assert net.front_end(torch.zeros(1, 62, 8, 6)).shape == (1, 56, 4, 3)

    t = cfg.train
    loss = t.loss
    assert (loss.mean, loss.smooth, loss.out_of_range, loss.l2) == (1.0, 20.0, 1e-3, 1e-3)
    assert (t.lr, t.batch_size, t.mode, t.augment.flips) == (1e-3, 1, "whole", True)
    assert t.num_workers == 1  # DDP over N workers would make each step a batch of N samples
    assert t.folds is None  # all five CV folds: the model is their ensemble
    assert t.use_gpu


def test_the_nir_finalist_is_the_finalist_on_the_nir_pipelines_data():
    """pipelines/pork_belly_nir_denoiser.yaml repeats the NIR recipe: it must not drift from it."""
    nir = load_config(ROOT / "pipelines" / "pork_belly_nir.yaml")
    finalist = load_config(ROOT / "pipelines" / "pork_belly_denoiser.yaml")
    both = load_config(ROOT / "pipelines" / "pork_belly_nir_denoiser.yaml")
    assert (both.synth, both.preprocess, both.data) == (nir.synth, nir.preprocess, nir.data)
    assert (both.model, both.train, both.evaluate) == (finalist.model, finalist.train, finalist.evaluate)


def test_the_third_finalist_is_the_second_plus_its_recipe_and_path():
    """pipelines/pork_belly_pixel.yaml changes only what was screened (docs/loss.md, "Seventh
    step"); its NIR check is the NIR pipeline's data and recipe, with SNV, under its model."""
    second = load_config(ROOT / "pipelines" / "pork_belly_denoiser.yaml")
    third = load_config(ROOT / "pipelines" / "pork_belly_pixel.yaml")
    screened = load_config(
        ROOT / "pipelines" / "pork_belly_denoiser.yaml",
        ["preprocess.transform=absorbance", "preprocess.snv=true", "model.spectral_hidden=64",
         "train.spectral_init=pixel", "name=pork_belly_pixel"],
    )  # fmt: skip
    assert third.model_dump() == screened.model_dump() != second.model_dump()
    nir = load_config(ROOT / "pipelines" / "pork_belly_nir.yaml")
    both = load_config(ROOT / "pipelines" / "pork_belly_nir_pixel.yaml")
    assert (both.synth, both.data) == (nir.synth, nir.data)
    assert both.preprocess == nir.preprocess.model_copy(update={"snv": True})
    assert (both.model, both.train, both.evaluate) == (third.model, third.train, third.evaluate)


def test_the_nir_pipeline_has_its_own_recipe():
    cfg = load_config(ROOT / "pipelines" / "pork_belly_nir.yaml")
    wl = SynthSpec.from_config(cfg.synth).wavelengths()
    assert cfg.synth.instrument == "nir" and wl.size == 224
    assert wl[0] == pytest.approx(900, abs=1) and wl[-1] == pytest.approx(1700, abs=1)
    recipe = _recipe(cfg)
    assert cfg.preprocess.wavelength_min is None  # not the VNIR camera's 750 nm cut
    assert min(recipe.wavelengths) < 935  # fat's C-H band near 930 nm stays
    assert recipe.n_channels == len(recipe.band_index) // cfg.preprocess.bin
    assert cfg.preprocess.transform == "absorbance"
    default = load_config(ROOT / "pipelines" / "pork_belly.yaml")
    assert cfg.preprocess != default.preprocess


def test_the_folder_example_reads_a_scanner_folder():
    cfg = load_config(ROOT / "configs" / "folder_example.yaml")
    assert cfg.data.source == "folder" and cfg.data.root and cfg.data.references == "references.csv"
    assert cfg.resolve_path(cfg.data.root).is_absolute()


# --------------------------------------------------------------------------- README's scale-out table

STAGES = ("synth", "preprocess", "train", "evaluate")


def _stage_keys(cfg: ChemmapConfig) -> dict[str, str]:
    """The keys of the stages that can be computed without data, chained as the pipeline chains
    them (the preprocess stage's input key, which hashes the scans, stands in as the synth key)."""
    work = cfg.workdir_path
    synth = stage_dir(work, "synth", cfg.synth.model_dump(mode="json"))
    pre = stage_dir(work, "preprocess", _dataset_config(cfg, patch_geometry(cfg)), [synth.key])
    unet = model_config(cfg, _recipe(cfg).n_channels, len(cfg.targets))
    train = stage_dir(work, "train", training_section(cfg, unet), [pre.key])
    evaluate = evaluation_dir(cfg, pre, train)
    return {"synth": synth.key, "preprocess": pre.key, "train": train.key, "evaluate": evaluate.key}


def test_the_map_bound_keys_the_evaluation_and_not_the_training():
    """``model.bounded`` is applied after the fold models' mean: trainings are found again."""
    free = _stage_keys(load_config(ROOT / "pipelines" / "pork_belly.yaml"))
    bounded = _stage_keys(load_config(ROOT / "pipelines" / "pork_belly.yaml", ["model.bounded=true"]))
    assert [free[s] for s in STAGES[:3]] == [bounded[s] for s in STAGES[:3]]
    assert free["evaluate"] != bounded["evaluate"]


def _scale_out_table() -> list[tuple[str, str]]:
    """(setting, stage-keys claim) rows of README's table under "At scale, the same file"."""
    lines = (ROOT / "README.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| setting |") and "stage keys" in line)
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        rows.append((cells[0].strip("`"), cells[-1]))
    return rows


def _flatten(prefix: str, value) -> list[str]:
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in _flatten(f"{prefix}.{k}", v)]
    return [f"{prefix}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"]


def test_readme_scale_out_table_matches_the_stage_keys():
    rows = _scale_out_table()
    assert any(s.startswith("train.use_gpu") for s, _ in rows)  # the row the code disagreed with
    path = ROOT / "pipelines" / "pork_belly.yaml"
    before = _stage_keys(load_config(path))
    for setting, claim in rows:
        ((key, value),) = yaml.safe_load(setting).items()  # "cluster.ray_address: ray://head:10001"
        after = _stage_keys(load_config(path, _flatten(key, value)))
        changed = [s for s in STAGES if after[s] != before[s]]
        if claim == "unchanged":
            assert not changed, f"README says {setting!r} leaves the stage keys alone; it changes {changed}"
        else:
            assert claim.startswith("new from ") and claim.endswith(" on"), f"unknown claim {claim!r}"
            first = claim.removeprefix("new from ").removesuffix(" on")
            assert first in STAGES, claim
            expected = list(STAGES[STAGES.index(first) :])
            assert changed == expected, (
                f"README says {setting!r} gives new keys {expected}; it gives {changed}"
            )
