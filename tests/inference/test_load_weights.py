"""Loading a trained model reads plain state dicts only: anything else is one clear line, no code runs."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from chemmap.errors import InputError
from chemmap.inference.ensemble import load_ensemble, load_weights
from chemmap.models.unet import UNet, UNetConfig

CONFIG = UNetConfig(in_channels=8, out_channels=1, depth=2, features=4)


def _touch(path: str) -> None:
    Path(path).touch()


class Payload:
    """Unpickling this object calls ``_touch(path)``: code a weights-only loader must never run."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (_touch, (self.path,))


def _one_line_error(path: Path) -> str:
    with pytest.raises(InputError) as caught:
        load_weights(path)
    message = str(caught.value)
    assert "\n" not in message and str(path) in message, message
    return message


def test_a_pickled_object_is_refused_and_never_run(tmp_path):
    state = UNet(CONFIG).state_dict()
    path = tmp_path / "best.pt"
    ran = tmp_path / "code_ran"
    torch.save({**state, "payload": Payload(ran)}, path)
    message = _one_line_error(path)
    assert "holds a pickled object (test_load_weights._touch)" in message, message
    assert not ran.exists()


def test_a_state_that_is_not_all_tensors_is_refused(tmp_path):
    state = UNet(CONFIG).state_dict()
    path = tmp_path / "best.pt"
    torch.save({**state, "epoch": 7}, path)
    message = _one_line_error(path)
    assert message.endswith("expected a state dict of tensors, but 'epoch' is of type int"), message
    torch.save({"model": state, "optimizer": {}}, path)  # a training checkpoint, not a state dict
    assert "'model' is of type OrderedDict (and 1 more entries are not tensors)" in _one_line_error(path)
    torch.save(list(state.values()), path)
    assert _one_line_error(path).endswith("expected a state dict of tensors, got an object of type list")


def test_other_files_are_refused_in_one_line(tmp_path):
    junk = tmp_path / "best.pt"
    junk.write_bytes(b"not a torch file")
    assert "not a plain state dict" in _one_line_error(junk)
    with pytest.raises(InputError, match="model weights not found"):
        load_weights(tmp_path / "missing.pt")


def _model_dir(tmp_path: Path, states: list[dict], config: UNetConfig = CONFIG) -> Path:
    tmp_path.mkdir()
    weights = []
    for k, state in enumerate(states, start=1):
        (tmp_path / f"fold{k}").mkdir()
        torch.save(state, tmp_path / f"fold{k}" / "best.pt")
        weights.append(f"fold{k}/best.pt")
    card = {"unet": asdict(config), "targets": ["fat"], "folds": list(range(1, len(states) + 1))}
    (tmp_path / "model.json").write_text(json.dumps({**card, "weights": weights}))
    return tmp_path


def test_the_ensemble_refuses_a_pickled_fold_and_weights_of_another_model(tmp_path):
    good = UNet(CONFIG).state_dict()
    ran = tmp_path / "code_ran"
    model_dir = _model_dir(tmp_path / "pickled", [good, {**good, "payload": Payload(ran)}])
    with pytest.raises(
        InputError, match=r"fold2/best.pt: not a plain state dict \(it holds a pickled object"
    ):
        load_ensemble(model_dir)
    assert not ran.exists()
    wider = UNet(UNetConfig(in_channels=8, out_channels=1, depth=2, features=6)).state_dict()
    with pytest.raises(
        InputError, match=r"do not fit the U-Net of model\.json: .* of another shape"
    ) as caught:
        load_ensemble(_model_dir(tmp_path / "wider", [wider]))
    assert "\n" not in str(caught.value)
    with pytest.raises(InputError, match=r"model.json missing"):
        load_ensemble(tmp_path / "nowhere")
