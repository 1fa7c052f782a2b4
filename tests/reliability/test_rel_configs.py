"""Bad configs are caught when the config is loaded (or, for the files it names, before the first
stage): ``chemmap run`` exits 2 with one line naming the file and the key, and leaves no trace
in its workdir (no stage folder, no MLflow store, no run).
"""

from __future__ import annotations

import typing
from pathlib import Path

import pytest

from chemmap.config import ChemmapConfig, ConfigError, _Section, load_config
from tests.reliability.relkit import CI_CONFIG, chemmap, one_error_line


def _sections(model: type[_Section] = ChemmapConfig, prefix: tuple[str, ...] = ()):
    """Every section of the config as a key path, the top level first (found, not listed)."""
    yield prefix
    for name, field in model.model_fields.items():
        for t in (field.annotation, *typing.get_args(field.annotation)):
            if isinstance(t, type) and issubclass(t, _Section):
                yield from _sections(t, (*prefix, name))


SECTIONS = list(_sections())


def _yaml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _nested(keys: tuple[str, ...], leaf: dict) -> dict:
    for k in reversed(keys):
        leaf = {k: leaf}
    return leaf


def _run_refused(cfg: Path, *needles: str) -> str:
    """``chemmap run CFG`` refused before any stage: one line, and nothing in the workdir."""
    line = one_error_line(chemmap("run", cfg, "-q"), *needles)
    assert not (cfg.parent / "runs").exists(), sorted(p.name for p in (cfg.parent / "runs").iterdir())
    return line


def test_every_section_is_covered():
    names = {".".join(s) for s in SECTIONS}
    assert {"", "model", "data", "train.loss", "preprocess.mask", "preprocess.savgol", "cluster"} <= names


@pytest.mark.parametrize("section", SECTIONS, ids=lambda s: ".".join(s) or "top")
def test_unknown_keys_in_every_section(tmp_path, section):
    import yaml

    cfg = _yaml(tmp_path / "p.yaml", yaml.safe_dump(_nested(section, {"colour": "red"})))
    with pytest.raises(ConfigError) as err:
        load_config(cfg)
    key = ".".join((*section, "colour"))
    assert str(err.value) == f"{cfg}: {key}: unknown key (got 'red')"


@pytest.mark.slow
def test_an_unknown_key_in_model_stops_chemmap_run_before_any_stage(tmp_path):
    cfg = _yaml(tmp_path / "p.yaml", f"base: {CI_CONFIG}\nworkdir: runs\nmodel:\n  depth: 3\n  widht: 8\n")
    _run_refused(cfg, f"{cfg}: model.widht: unknown key (got 8)")


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("train: {epochs: many}", "train.epochs: Input should be a valid integer"),
        ("model: {pad: sometimes}", "model.pad: Input should be a valid boolean"),
        ("targets: fat", "targets: Input should be a valid list (got 'fat')"),
        ("preprocess: [1, 2]", "preprocess: Input should be a valid dictionary"),
        ("synth: {wavelength_range: [900]}", "synth.wavelength_range.1: Field required"),
        ("cluster: {resources_per_worker: {GPU: lots}}", "cluster.resources_per_worker.GPU"),
    ],
)
def test_wrong_types(tmp_path, text, needle):
    cfg = _yaml(tmp_path / "p.yaml", text + "\n")
    with pytest.raises(ConfigError) as err:
        load_config(cfg)
    assert str(err.value).startswith(f"{cfg}: ") and needle in str(err.value), str(err.value)


@pytest.mark.slow
def test_a_wrong_type_stops_chemmap_run_before_any_stage(tmp_path):
    cfg = _yaml(tmp_path / "p.yaml", f"base: {CI_CONFIG}\nworkdir: runs\ntrain:\n  epochs: many\n")
    _run_refused(cfg, f"{cfg}: train.epochs: Input should be a valid integer", "(got 'many')")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("data: {source: folder, root: no_such_folder}", "data.root: folder not found: "),
        ("data: {source: folder, root: .}", "data.references: file not found: "),
        ("score: {input: no_such_folder}", "score.input: folder not found: "),
        ("base: no_such_base.yaml", "base: config file not found: "),
    ],
    ids=["data.root", "data.references", "score.input", "base"],
)
def test_missing_files_stop_chemmap_run_before_any_stage(tmp_path, text, needle):
    """A typo in a path fails at once: before the synthetic scans, the MLflow run, or hours of training."""
    base = "" if text.startswith("base") else f"base: {CI_CONFIG}\n"
    cfg = _yaml(tmp_path / "p.yaml", f"{base}workdir: runs\n{text}\n")
    _run_refused(cfg, str(cfg), needle)


@pytest.mark.slow
def test_a_missing_config_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    one_error_line(chemmap("run", missing, "-q"), f"config file not found: {missing}")


@pytest.mark.slow
def test_a_base_cycle(tmp_path):
    a = _yaml(tmp_path / "a.yaml", "base: b.yaml\nworkdir: runs\n")
    _yaml(tmp_path / "b.yaml", "base: c.yaml\n")
    _yaml(tmp_path / "c.yaml", "base: a.yaml\n")
    line = _run_refused(a, f"{a}: 'base' files include each other: {a} -> {tmp_path / 'b.yaml'}")
    assert str(tmp_path / "c.yaml") in line


# A billion laughs: h is a list of 9**8 (43 million) items built from 8 aliased lines.
BOMB = "a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1]\n" + "".join(
    f"{k}: &{k} [{', '.join([f'*{p}'] * 9)}]\n" for p, k in zip("abcdefg", "bcdefgh", strict=True)
)


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ("[" * 5000 + "]" * 5000, "not a config chemmap can read (RecursionError"),
        ("seed: 1" + "0" * 5000 + "\n", "not a config chemmap can read (ValueError: Exceeds the limit"),
        ("name: x\n".encode("utf-16"), "cannot read as UTF-8 text"),
        ('workdir: "a\\0b"\n', "workdir: Value error, must not contain a NUL character (got 'a\\x00b')"),
        (BOMB, "h: unknown key (got [[[...], [...], [...], [...], [...], [...], ...], "),
        ('"a\\nb": 1\n', "'a\\nb': unknown key (got 1)"),
    ],
    ids=["deep-nesting", "5000-digit-int", "utf-16", "nul", "alias-bomb", "key-with-line-break"],
)
def test_inputs_found_by_probing(tmp_path, content, needle):
    """Each was a traceback, a two-line error or a 157 MB one (docs/reliability.md, Fuzzing)."""
    cfg = tmp_path / "p.yaml"
    cfg.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ConfigError) as err:
        load_config(cfg)
    msg = str(err.value)
    assert msg.startswith(f"{cfg}: ") and needle in msg and "\n" not in msg and len(msg) < 5000, msg[:3000]
