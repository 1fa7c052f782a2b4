from __future__ import annotations

from pathlib import Path

import pytest

from chemmap.config import dump_config, load_config
from chemmap.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_pipeline_and_ci_presets_validate():
    cfg = load_config(ROOT / "pipelines" / "pork_belly.yaml")
    assert cfg.preprocess.wavelength_min == 750 and cfg.preprocess.bin == 2
    assert cfg.workdir_path.resolve() == (ROOT / "runs").resolve()
    ci = load_config(ROOT / "configs" / "ci.yaml")
    # ci.yaml extends the pipeline: its own keys win, the rest is inherited.
    assert ci.synth.n_samples == 12 and ci.synth.instrument == cfg.synth.instrument
    assert ci.preprocess.bin == 2 and ci.preprocess.mask.min_size == 16
    assert ci.preprocess.mask.threshold == cfg.preprocess.mask.threshold


def test_overrides_parse_as_yaml(tmp_path):
    cfg = load_config(ROOT / "configs" / "ci.yaml", ["preprocess.bin=3", "targets=[fat, water]"])
    assert cfg.preprocess.bin == 3 and cfg.targets == ["fat", "water"]


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "p.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize(
    ("text", "needles"),
    [
        ("preprocess:\n  bin: zero\n", ["preprocess.bin", "'zero'", "integer"]),
        ("preprocess:\n  binn: 2\n", ["preprocess.binn", "unknown key"]),
        ("synth:\n  instrument: swir\n", ["synth.instrument", "'swir'", "vnir"]),
        ("preprocess:\n  savgol: {window: 6}\n", ["preprocess.savgol", "odd", "6"]),
        ("data:\n  source: folder\n", ["data.root", "required"]),
        ("targets: []\n", ["targets"]),
        ("model:\n  depht: 3\n", ["model.depht", "unknown key"]),
        ("model:\n  encoder: vgg\n", ["model.encoder", "'vgg'", "resnet"]),
        ("cluster:\n  dask_workers: 0\n", ["cluster.dask_workers", "0"]),
        ("train:\n  loss:\n    pixel: 1\n", ["train.loss.pixel", "unknown key"]),
        ("train:\n  loss:\n    residual: 0.5\n", ["train.loss.residual", "model.spectral_path"]),
        ("train:\n  loss:\n    blindspot: 1\n", ["train.loss.blindspot", "model.spectral_path"]),
        ("model:\n  denoiser: 3\n", ["denoiser", "spectral_path and pad: true"]),
        ("train:\n  spectral_init: ridge\n", ["train.spectral_init", "model.spectral_path"]),
        (
            "model:\n  spectral_path: true\ntrain:\n  spectral_freeze: true\n",
            ["train.spectral_freeze", "train.spectral_init: ridge, pls or pixel"],
        ),
        ("model:\n  spectral_hidden: 8\n", ["spectral_hidden", "spectral_path: true"]),
        (
            "model:\n  spectral_path: true\n  spectral_hidden: 8\ntrain:\n  spectral_init: pls\n",
            ["train.spectral_init: pls", "model.spectral_hidden: 0", "spectral_init: pixel"],
        ),
        ("train:\n  path_fit:\n    pixels: 4\n", ["train.path_fit.pixels", "16"]),
        ("train:\n  loss:\n    grid: output\n", ["train.loss.grid: output", "model.front_end"]),
        (
            "model:\n  front_end: true\ntrain:\n  mode: patches\n  loss:\n    grid: output\n",
            ["train.loss.grid: output", "whole", "'patches'"],
        ),
        ("train:\n  schedule: linear\n", ["train.schedule", "'linear'", "cosine"]),
        ("model:\n  denoiser_input: features\n", ["model.denoiser_input", "'features'", "path"]),
        (
            "model:\n  spectral_path: true\ntrain:\n  mode: patches\n  loss:\n    spectral: 1\n",
            ["train.loss.spectral", "whole", "'patches'"],
        ),
    ],
)
def test_errors_name_file_key_value_and_expectation(tmp_path, text, needles):
    p = _write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(p)
    msg = str(info.value)
    assert str(p) in msg
    for n in needles:
        assert n in msg, msg
    assert "\n" not in msg


def test_bad_yaml_missing_file_and_base_cycle(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    p = _write(tmp_path, "a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="include each other"):
        load_config(tmp_path / "a.yaml")
    with pytest.raises(ConfigError, match=r"key\.path=value"):
        load_config(None, ["preprocess.bin"])


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(ROOT / "configs" / "ci.yaml")
    p = _write(tmp_path, dump_config(cfg))
    again = load_config(p)
    assert again.model_dump() == cfg.model_dump()


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("preprocess.scheduler=tcp://h:8786", "cluster.dask_scheduler"),
        ("preprocess.num_workers=2", "cluster.dask_workers"),
        ("train.ray_address=auto", "cluster.ray_address"),
        ("train.storage_path=/s", "cluster.storage_path"),
        ("train.resources_per_worker={CPU: 1}", "cluster.resources_per_worker"),
        ("mlflow.tracking_uri=http://m:5000", "cluster.tracking_uri"),
    ],
)
def test_settings_that_moved_to_the_cluster_section_say_where(old, new):
    with pytest.raises(ConfigError) as info:
        load_config(ROOT / "configs" / "ci.yaml", [old])
    msg = str(info.value)
    assert f"{old.split('=')[0]} moved to {new}" in msg and "\n" not in msg


def test_the_cluster_section_holds_where_things_run():
    cfg = load_config(
        ROOT / "configs" / "ci.yaml",
        ["cluster.tracking_uri=http://mlflow:5000", "cluster.ray_address=ray://head:10001"],
    )
    assert cfg.tracking_uri == "http://mlflow:5000" and cfg.cluster.ray_address == "ray://head:10001"
    assert load_config(ROOT / "configs" / "ci.yaml").tracking_uri.endswith("/runs/ci/mlflow.db")
