"""A trained model as chemmap ships it: one folder of plain files, nothing to unpickle.

::

    chemmap.json     the manifest: format, U-Net config, targets, folds, the preprocessing
                     recipe (with the raw wavelengths it expects and the mask settings), the
                     tiling settings, where the model came from and how it scored, the
                     training data's spectral model (outlier limits for scoring), and
                     the range its map is clamped to ("bound", absent: none)
    fold<k>.pt       each fold model's state dict (tensors only), with its SHA-256 in the manifest

This is what the register stage logs to MLflow (beside the pyfunc wrapper) and what
``chemmap score`` reads. :func:`read_bundle` trusts nothing it did not write: every file
in the folder must be the manifest or a listed weight file with the listed hash, JSON is
parsed as data, and weights load with ``weights_only=True``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from chemmap.errors import InputError
from chemmap.files import atomic_path, write_json_atomic
from chemmap.inference.ensemble import TILE_ABOVE_PIXELS, TILE_CORE, MapEnsemble, check_bound, load_weights
from chemmap.inference.flags import SpectralModel
from chemmap.models.unet import UNet, UNetConfig
from chemmap.preprocess.recipe import Recipe

__all__ = ["BUNDLE_FORMAT", "BUNDLE_KIND", "MANIFEST", "ModelBundle", "read_bundle", "write_bundle"]

BUNDLE_FORMAT = 1
BUNDLE_KIND = "chemmap-map-ensemble"
MANIFEST = "chemmap.json"
_MAX_MANIFEST_BYTES = 64 << 20


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class ModelBundle:
    """A read, checked bundle.

    Attributes:
        path: the bundle folder.
        manifest: ``chemmap.json`` as read.
        recipe: the preprocessing recipe (raw wavelengths, band selection, mask settings,
            normalisation statistics): what turns a raw scan into this model's input.
        config: the U-Net configuration of every fold model.
        targets: the model's outputs, in order (e.g. ``["fat"]``).
    """

    path: Path
    manifest: dict[str, Any]
    recipe: Recipe
    config: UNetConfig
    targets: list[str]

    @property
    def folds(self) -> list[int]:
        return [int(k) for k in self.manifest["folds"]]

    @property
    def tiling(self) -> dict[str, int]:
        """``tile_above_pixels`` and ``tile_core`` the model was evaluated with."""
        return dict(self.manifest["tiling"])

    @property
    def provenance(self) -> dict[str, Any]:
        """Stage keys, training run, test sample ids and test metrics."""
        return dict(self.manifest.get("provenance", {}))

    @property
    def spectral_model(self) -> SpectralModel | None:
        """The training data's spectral model (outlier limits), if the bundle has one."""
        d = self.manifest.get("spectral_model")
        return None if d is None else SpectralModel.from_dict(d)

    @property
    def bound(self) -> tuple[float, float] | None:
        """The range the ensemble's map is clamped to (``model.bounded``), or None."""
        b = self.manifest.get("bound")
        return None if b is None else (float(b[0]), float(b[1]))

    def ensemble(self) -> MapEnsemble:
        """The fold ensemble, every member's weights loaded with ``weights_only=True``."""
        members = []
        for rel in self.manifest["weights"]:
            net = UNet(self.config)
            net.load_state_dict(load_weights(self.path / rel))
            members.append(net.eval())
        return MapEnsemble(members, self.bound).eval()


def write_bundle(
    dest: Path,
    training_dir: Path,
    recipe: Recipe,
    *,
    provenance: Mapping[str, Any] | None = None,
    spectral_model: SpectralModel | None = None,
    bound: tuple[float, float] | None = None,
) -> Path:
    """Copy a finished training's fold weights into a bundle folder with its manifest.

    Args:
        dest: the bundle folder (created; must not hold another bundle's files).
        training_dir: the training stage folder (``model.json``, ``fold<k>/best.pt``).
        recipe: the dataset's recipe, with its normalisation statistics.
        provenance: JSON-able facts about the model (stage keys, the training run, test
            sample ids and metrics), stored as they are.
        spectral_model: the PCA of the training data's mean spectra and its limits, which
            flag scans unlike the training data (:mod:`chemmap.inference.flags`).
        bound: the range the ensemble's map is clamped to, or None (then not in the manifest,
            as in bundles written before bounds existed).

    Returns:
        ``dest``.
    """
    card = json.loads((Path(training_dir) / "model.json").read_text())
    dest.mkdir(parents=True, exist_ok=True)
    weights, hashes = [], {}
    for fold, rel in zip(card["folds"], card["weights"], strict=True):
        name = f"fold{int(fold)}.pt"
        state = load_weights(Path(training_dir) / rel)  # refuse anything that is not a plain state dict
        with atomic_path(dest / name) as tmp:
            torch.save(state, tmp)
        weights.append(name)
        hashes[name] = _sha256(dest / name)
    manifest = {
        "format": BUNDLE_FORMAT,
        "kind": BUNDLE_KIND,
        "unet": card["unet"],
        "targets": list(card["targets"]),
        "folds": [int(k) for k in card["folds"]],
        "weights": weights,
        "sha256": hashes,
        "recipe": recipe.to_dict(),
        "tiling": {"tile_above_pixels": TILE_ABOVE_PIXELS, "tile_core": TILE_CORE},
        "provenance": dict(provenance or {}),
        "spectral_model": None if spectral_model is None else spectral_model.to_dict(),
    }
    if bound is not None:
        manifest["bound"] = list(check_bound(bound))
    write_json_atomic(dest / MANIFEST, manifest)
    return dest


def _manifest(path: Path) -> dict[str, Any]:
    file = path / MANIFEST
    if not file.is_file():
        raise InputError(f"{path}: not a chemmap model ({MANIFEST} missing)")
    if file.stat().st_size > _MAX_MANIFEST_BYTES:
        raise InputError(f"{file}: {file.stat().st_size} bytes is too large for a chemmap manifest")
    try:
        manifest = json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"{file}: not a chemmap manifest ({err})") from None
    if not isinstance(manifest, dict) or manifest.get("kind") != BUNDLE_KIND:
        raise InputError(f"{file}: not a chemmap manifest (kind must be {BUNDLE_KIND!r})")
    if manifest.get("format") != BUNDLE_FORMAT:
        raise InputError(
            f"{file}: bundle format {manifest.get('format')!r}; this chemmap reads {BUNDLE_FORMAT}"
        )
    missing = [
        k for k in ("unet", "targets", "folds", "weights", "sha256", "recipe", "tiling") if k not in manifest
    ]
    if missing:
        raise InputError(f"{file}: no {', '.join(missing)}")
    return manifest


def _check_files(path: Path, manifest: dict[str, Any]) -> None:
    """Only the manifest and the listed weights, each with its recorded hash."""
    weights = [str(w) for w in manifest["weights"]]
    bad_names = [w for w in weights if Path(w).name != w or not w.endswith(".pt")]
    if bad_names:
        raise InputError(
            f"{path / MANIFEST}: weight file names must be plain *.pt names, got {bad_names[0]!r}"
        )
    expected = {MANIFEST, *weights}
    present = {p.name for p in path.iterdir()}
    foreign = sorted(present - expected)
    if foreign:
        raise InputError(f"{path}: {foreign[0]!r} is not a chemmap model file; refusing the model")
    for w in weights:
        if w not in present:
            raise InputError(f"{path}: weight file {w} is missing")
        if _sha256(path / w) != manifest["sha256"].get(w):
            raise InputError(f"{path / w}: its SHA-256 differs from the manifest's; the file was changed")


def read_bundle(path: str | Path) -> ModelBundle:
    """Read and check a bundle folder (see the module's docstring); nothing is unpickled.

    Raises:
        InputError: one line naming the file: no manifest, a foreign file, a changed weight
            file, or a manifest chemmap does not understand.
    """
    path = Path(path)
    if not path.is_dir():
        raise InputError(f"model folder not found: {path}")
    manifest = _manifest(path)
    _check_files(path, manifest)
    try:
        config = UNetConfig(**manifest["unet"])
        recipe = Recipe.from_dict(manifest["recipe"])
        check_bound(manifest.get("bound"))
    except (TypeError, ValueError, KeyError) as err:
        raise InputError(f"{path / MANIFEST}: {err}") from None
    if len(manifest["weights"]) != len(manifest["folds"]):
        raise InputError(
            f"{path / MANIFEST}: {len(manifest['weights'])} weight files for folds {manifest['folds']}"
        )
    return ModelBundle(path, manifest, recipe, config, [str(t) for t in manifest["targets"]])
