"""Untrusted files: nothing chemmap reads runs code, and no id becomes a path outside its folder.

Every payload here would create a file if it ran; each test first shows that it does when run
the unsafe way (the payload is live), then that chemmap refuses it and the file never appears.
The registry is a real MLflow SQLite store; ``chemmap score`` runs as a subprocess.
"""

from __future__ import annotations

import json
import os
import runpy
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from chemmap import tracking
from chemmap.config import load_config
from chemmap.errors import InputError
from chemmap.inference.bundle import _sha256
from chemmap.inference.ensemble import load_ensemble
from chemmap.registry.registry import CODE_FILE
from tests.registry import helpers
from tests.reliability.relkit import (
    Payload,
    chemmap,
    folder_config,
    no_complete_stage,
    one_error_line,
    random_bundle,
    scanner_folder,
)

MARKER_ENV = "CHEMMAP_REL_MARKER"  # where the loader-code payload writes, when it runs


def _poison(weights: Path, marker: Path) -> None:
    """Replace a state dict by the same tensors plus an object whose unpickling creates ``marker``."""
    state = torch.load(weights, weights_only=True)
    torch.save({**state, "payload": Payload(marker)}, weights)


def _live(weights: Path, marker: Path) -> None:
    """The payload runs when the file is unpickled the unsafe way (so a refusal means something)."""
    torch.load(weights, weights_only=False)
    assert marker.exists()
    marker.unlink()


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """A SQLite registry holding ``evil-code@champion``: a model that passes for chemmap's, its
    models-from-code file chemmap's own plus a line creating ``$CHEMMAP_REL_MARKER``."""
    tmp = tmp_path_factory.mktemp("untrusted")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    client = tracking.client(uri)
    run = helpers.new_run(client, "untrusted", tmp / "artifacts")
    code = tmp / "lookalike" / CODE_FILE.name
    code.parent.mkdir()
    payload = f"import os as _o\n_p = _o.environ.get({MARKER_ENV!r})\nif _p:\n    open(_p, 'w').close()\n"
    code.write_text(CODE_FILE.read_text() + payload)
    info = helpers.log_pyfunc(
        uri, run, python_model=str(code), artifacts={"chemmap": str(random_bundle(tmp / "bundle"))}
    )
    client.set_registered_model_alias(
        "evil-code", "champion", helpers.register_logged(client, "evil-code", info.model_uri, run)
    )
    return SimpleNamespace(tmp=tmp, uri=uri, code=code, scans=scanner_folder(tmp / "scans", n=2))


def _score(scans: Path, model: str | Path, out: Path, marker: Path, *extra: str):
    """``chemmap score`` with HOME (where registered models are cached) in a fresh folder."""
    home = out.parent / "home"
    home.mkdir(exist_ok=True)
    env = {MARKER_ENV: str(marker), "HOME": str(home)}
    return chemmap("score", scans, "--model", model, "--output", out, "-q", *extra, env=env), home


@pytest.mark.slow
def test_a_registered_model_whose_loader_code_would_create_a_file_is_refused_unrun(
    registry, tmp_path, monkeypatch
):
    marker = tmp_path / "code_ran"
    monkeypatch.setenv(MARKER_ENV, str(marker))
    runpy.run_path(str(registry.code))  # what MLflow's loader does with it: the payload is live
    assert marker.exists()
    marker.unlink()
    proc, home = _score(
        registry.scans,
        "models:/evil-code@champion",
        tmp_path / "maps",
        marker,
        "--tracking-uri",
        registry.uri,
    )
    one_error_line(
        proc,
        "models:/evil-code@champion (version 1): its model code pyfunc_model.py is not chemmap's",
    )
    assert not marker.exists()
    assert not any(home.rglob("MLmodel")), "a refused model must not land in the cache"
    assert not (tmp_path / "maps").exists()


@pytest.mark.slow
def test_a_model_artifact_carrying_a_pickle_payload_is_refused(tmp_path):
    """A model's fold1.pt with a payload and its hash in the manifest (so the hash check lets it
    through), scored from its folder: what ``models:/`` scoring reads once downloaded."""
    bundle = random_bundle(tmp_path / "model")
    marker = tmp_path / "unpickled"
    _poison(bundle / "fold1.pt", marker)
    _live(bundle / "fold1.pt", marker)
    manifest = json.loads((bundle / "chemmap.json").read_text())
    manifest["sha256"]["fold1.pt"] = _sha256(bundle / "fold1.pt")
    (bundle / "chemmap.json").write_text(json.dumps(manifest))
    proc, _ = _score(scanner_folder(tmp_path / "scans", n=2), bundle, tmp_path / "maps", marker)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1 and "Traceback" not in out, out[-3000:]
    failed = [
        line for line in out.splitlines() if line.startswith(("score: S00 failed: ", "score: S01 failed: "))
    ]
    assert len(failed) == 2, out[-3000:]  # each scan's row says why; nothing is scored with it
    needle = f"{bundle / 'fold1.pt'}: not a plain state dict (it holds a pickled object (tests.reliability."
    assert all(needle in line for line in failed), failed
    assert not marker.exists() and not list((tmp_path / "maps").glob("*.zarr"))


def test_a_fold_weight_file_carrying_a_pickle_payload_is_refused(tmp_path):
    """The training's fold<k>/best.pt, as the evaluate and register stages load them."""
    bundle = random_bundle(tmp_path / "bundle")
    training = bundle.with_name("bundle-training")
    marker = tmp_path / "unpickled"
    _poison(training / "fold2" / "best.pt", marker)
    _live(training / "fold2" / "best.pt", marker)
    with pytest.raises(InputError) as err:
        load_ensemble(training)
    assert str(err.value).startswith(f"{training / 'fold2' / 'best.pt'}: not a plain state dict")
    assert not marker.exists()


def test_a_training_checkpoint_carrying_a_pickle_payload_is_refused(tmp_path, monkeypatch):
    """Ray Train's checkpoint (state.pt), as a resumed fold reads it; only Ray's lookup is stood in for."""
    import ray.train

    from chemmap.models.unet import UNet, UNetConfig
    from chemmap.train import loop

    net = UNet(UNetConfig(in_channels=4, out_channels=1, depth=2, features=2))
    opt = torch.optim.Adam(net.parameters())
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt)
    marker = tmp_path / "unpickled"
    saved = {"model": net.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict()}
    (tmp_path / "ckpt").mkdir()
    torch.save({**saved, "state": Payload(marker)}, tmp_path / "ckpt" / loop.STATE_FILE)
    _live(tmp_path / "ckpt" / loop.STATE_FILE, marker)
    monkeypatch.setattr(
        ray.train, "get_checkpoint", lambda: ray.train.Checkpoint.from_directory(tmp_path / "ckpt")
    )
    with pytest.raises(Exception, match=r"Weights only load failed|Unsupported global"):
        loop._restore(net, opt, sched)
    assert not marker.exists()


@pytest.mark.slow
def test_yaml_with_python_tags_is_refused_with_a_clear_line(tmp_path):
    marker = tmp_path / "yaml_ran"
    cfg = tmp_path / "p.yaml"
    cfg.write_text(f"workdir: runs\nname: !!python/object/apply:os.system ['touch {marker}']\n")
    one_error_line(
        chemmap("run", cfg, "-q"),
        f"{cfg}: not valid YAML: line 2, column 7: could not determine a constructor for the tag",
        "python/object/apply:os.system",
        "Python tags are refused",
    )
    assert not marker.exists() and not (tmp_path / "runs").exists()
    tagged = f"name=!!python/object/apply:os.system ['touch {marker}']"
    assert load_config(None, [tagged]).name == tagged.removeprefix("name=")  # --set: plain text
    assert not marker.exists()


@pytest.mark.slow
def test_scan_ids_that_would_escape_an_output_folder_are_refused(tmp_path):
    """A scan id names a Zarr group of the dataset and the maps of scoring (see test_rel_scoring.py)."""
    folder = "S\\01"  # a separator for Zarr, which would nest the scan's group in another
    root = scanner_folder(tmp_path / "scans", n=3)
    (root / "S01").rename(root / folder)
    (root / folder / "capture" / "S01.hdr").rename(root / folder / "capture" / f"{folder}.hdr")
    (root / folder / "capture" / "S01.raw").rename(root / folder / "capture" / f"{folder}.raw")
    cfg = folder_config(tmp_path, root)
    one_error_line(chemmap("preprocess", cfg, "-q"), f"scan id {folder!r}", "path separator")
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_scan_ids_in_the_references_that_would_escape_match_no_scan(tmp_path):
    scan_id = "../S01"
    root = scanner_folder(tmp_path / "scans", n=3)
    csv = root / "references.csv"
    csv.write_text(csv.read_text().replace("S01,P01", f"{scan_id},P01"))
    cfg = folder_config(tmp_path, root)
    one_error_line(chemmap("preprocess", cfg, "-q"), f"{csv}: scan_id '{scan_id}' has no scan under {root}")
    no_complete_stage(tmp_path / "runs")


@pytest.mark.slow
def test_sample_ids_never_become_paths(tmp_path):
    """Accepted by design: a sample id is a value in tables and attributes, never a file name."""
    import zarr

    root = scanner_folder(tmp_path / "work" / "scans", n=3)
    odd = ["../../escaped", "/tmp/absolute", "a/b\\c"]
    csv = root / "references.csv"
    text = csv.read_text()
    for i, sample in enumerate(odd):
        text = text.replace(f"S{i:02d},P{i:02d}", f"S{i:02d},{sample}")
    csv.write_text(text)
    before = set(tmp_path.parent.iterdir())
    cfg = folder_config(tmp_path / "work", root)
    proc = chemmap("preprocess", cfg, "-q")
    assert proc.returncode == 0, proc.stderr[-3000:]
    store = zarr.open_group(proc.stdout.strip().splitlines()[-1], mode="r")
    assert sorted(s["sample_id"] for s in store.attrs["samples"]) == sorted(odd)
    assert set(tmp_path.parent.iterdir()) == before and not Path("/tmp/absolute").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"]
    assert not any("escaped" in p.name for p in tmp_path.rglob("*"))
    assert os.path.commonpath([str(p) for p in (tmp_path / "work").rglob("*")]) == str(tmp_path / "work")
