"""Versions and aliases on a real SQLite registry: champion only on evidence, by hand with promote.

The registry of ``conftest.py`` holds five versions of ``fat`` whose fabricated evaluations
make the decision known in advance (see there); the paired bootstrap is recomputed here from
the same predictions, so a reason can only match if the registry compared the right numbers.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from chemmap.errors import InputError
from chemmap.evaluate.metrics import paired_bootstrap
from chemmap.registry.registry import (
    CODE_FILE,
    Registration,
    log_model,
    promote,
    register,
    resolve,
)
from tests.registry import helpers

NAME = helpers.NAME
UNREACHABLE = "http://127.0.0.1:9"  # conftest's trap for MLflow's global URI

pytestmark = pytest.mark.slow  # the tiny dataset and five logged models: about 15 s on 2 cores


def _one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text and text, text
    return text


def _aliases(client, name: str) -> dict[str, str]:
    """Alias -> version as strings (MLflow's SQL store gives ints, its REST store strings)."""
    return {a: str(v) for a, v in client.get_registered_model(name).aliases.items()}


def _bootstrap(new: dict, old: dict) -> dict:
    p, q = new["test_predictions"], old["test_predictions"]
    return paired_bootstrap(np.array(p["reference"]), np.array(p["unet"]), np.array(q["unet"]), 10000, 0)


def test_the_first_version_is_champion_and_a_clearly_better_one_takes_over(registered):
    regs = registered.registrations
    assert regs["first"] == Registration(NAME, "1", "champion", regs["first"].reason)
    assert "no champion yet" in regs["first"].reason
    assert (regs["better"].version, regs["better"].alias) == ("2", "champion")
    boot = _bootstrap(registered.evaluations["better"], registered.evaluations["first"])
    assert boot["ci_high"] < 0
    assert f"[{boot['ci_low']:+.4g}, {boot['ci_high']:+.4g}], lies below 0" in regs["better"].reason
    assert "champion version 1" in regs["better"].reason
    aliases = _aliases(registered.client, NAME)
    assert aliases["champion"] == "2" and aliases["previous"] == "1"


def test_a_worse_version_is_challenger_and_says_why(registered):
    reg = registered.registrations["worse"]
    assert (reg.version, reg.alias) == ("3", "challenger")
    boot = _bootstrap(registered.evaluations["worse"], registered.evaluations["better"])
    assert boot["ci_low"] > 0  # clearly worse than the champion (version 2)
    assert f"CI [{boot['ci_low']:+.4g}, {boot['ci_high']:+.4g}], does not lie below 0" in reg.reason
    assert "champion version 2" in reg.reason and "\n" not in reg.reason


def test_other_data_never_dethrones_the_champion_however_good(registered):
    regs = registered.registrations
    assert (regs["other_dataset"].version, regs["other_dataset"].alias) == ("4", "challenger")
    assert regs["other_dataset"].reason.startswith(
        "different dataset key: evaluated on dataset another-dataset-key"
    )
    assert registered.key in regs["other_dataset"].reason
    assert (regs["other_samples"].version, regs["other_samples"].alias) == ("5", "challenger")
    assert regs["other_samples"].reason.startswith(
        "different test samples: 30 here, 30 for champion version 2, 0"
    )
    aliases = _aliases(registered.client, NAME)
    assert aliases == {"champion": "2", "previous": "1", "challenger": "5"}


def test_versions_carry_their_tags_run_and_reason(registered):
    mv = registered.client.get_model_version(NAME, "3")
    assert mv.run_id == registered.run and mv.source == registered.models["worse"]
    assert mv.tags["chemmap.training_key"] == "train-worse" and mv.tags["seed"] == "2"
    assert mv.tags["chemmap.training_run_id"] == registered.run
    assert mv.tags["chemmap.registration"] == registered.registrations["worse"].reason
    assert mv.tags["chemmap.dataset_key"] == registered.key
    rmse = registered.evaluations["worse"]["models"]["unet"]["rmse"]
    assert float(mv.tags["chemmap.test_rmse_unet"]) == pytest.approx(rmse, rel=1e-5)


def test_log_model_leaves_the_run_and_mlflow_global_state_as_they_were(registered):
    assert registered.run_status == "RUNNING"
    assert registered.global_uri == (UNREACHABLE, UNREACHABLE, UNREACHABLE)
    assert registered.models["first"].startswith("models:/m-")


def test_log_model_refuses_bad_bundles_bands_and_runs(registered, tmp_path):
    bundle = registered.root / "bundle-first"
    bands = len(registered.data.recipe.raw_wavelengths)
    with pytest.raises(InputError) as err:
        log_model(registered.uri, registered.run, bundle, bands=bands + 1)
    assert f"bands={bands + 1}" in _one_line(err)
    with pytest.raises(InputError) as err:
        log_model(registered.uri, "0" * 32, bundle)
    assert "not found" in _one_line(err)
    evil = shutil.copytree(bundle, tmp_path / "evil")
    (evil / "evil.txt").write_text("not a weight file")
    with pytest.raises(InputError) as err:
        log_model(registered.uri, registered.run, evil)
    assert "'evil.txt' is not a chemmap model file" in _one_line(err)


def test_register_refuses_an_evaluation_of_another_model_or_without_predictions(registered):
    versions_before = len(registered.client.search_model_versions(f"name='{NAME}'"))
    other = registered.evaluations["other_dataset"]
    with pytest.raises(InputError) as err:
        register(registered.uri, NAME, registered.models["first"], evaluation=other, tags={})
    assert "dataset_key another-dataset-key is not that of models:/m-" in _one_line(err)
    with pytest.raises(InputError) as err:
        register(registered.uri, NAME, registered.models["first"], evaluation={"dataset_key": "k"}, tags={})
    assert _one_line(err) == "evaluation: no test_predictions"
    with pytest.raises(InputError) as err:
        register(registered.uri, NAME, "runs:/abc/model", evaluation=registered.evaluations["first"])
    assert "models:/<model id>" in _one_line(err)
    with pytest.raises(InputError) as err:
        register(
            registered.uri, NAME, "models:/m-0123456789abcdef", evaluation=registered.evaluations["first"]
        )
    assert _one_line(err) == "models:/m-0123456789abcdef: no such logged model"
    assert len(registered.client.search_model_versions(f"name='{NAME}'")) == versions_before


def test_promote_moves_an_alias_by_hand(registered):
    client, name = registered.client, "fat-by-hand"
    for label in ("first", "better", "worse"):
        helpers.register_logged(client, name, registered.models[label], registered.run)
    promote(registered.uri, name, 1)
    assert _aliases(client, name) == {"champion": "1"}
    promote(registered.uri, name, "3", alias="challenger")
    promote(registered.uri, name, 2)
    assert _aliases(client, name) == {"champion": "2", "previous": "1", "challenger": "3"}
    promote(registered.uri, name, 3)  # the challenger wins by hand: no longer a challenger
    assert _aliases(client, name) == {"champion": "3", "previous": "2"}
    with pytest.raises(InputError) as err:
        promote(registered.uri, name, 1, alias="latest")  # MLflow reserves it
    assert _one_line(err).startswith(f"promote {name} 1: alias 'latest': ")
    with pytest.raises(InputError) as err:
        promote(registered.uri, name, 9)
    assert _one_line(err) == f"promote {name}: registered model {name!r} has no version '9'"
    with pytest.raises(InputError) as err:
        promote(registered.uri, "no-such-model", 1)
    assert _one_line(err) == "promote no-such-model: no registered model 'no-such-model'"


def test_resolve_names_the_version_or_says_in_one_line_what_is_unknown(registered):
    assert resolve(registered.uri, f"models:/{NAME}@champion") == (NAME, "2")
    assert resolve(registered.uri, f"models:/{NAME}@previous") == (NAME, "1")
    assert resolve(registered.uri, f"models:/{NAME}/4") == (NAME, "4")
    cases = {
        f"models:/{NAME}@nope": "has no alias 'nope' (aliases: challenger, champion, previous)",
        "models:/nope@champion": "no registered model 'nope'",
        f"models:/{NAME}/99": f"registered model {NAME!r} has no version '99'",
        f"models:/{NAME}": "not a registered model version",
        registered.models["first"]: "not a registered model version",
        "runs:/abc/model": "not a registered model URI",
        str(CODE_FILE): "not a registered model URI",
    }
    for uri, expected in cases.items():
        with pytest.raises(InputError) as err:
            resolve(registered.uri, uri)
        assert uri in _one_line(err) and expected in str(err.value), (uri, str(err.value))


def test_an_unreachable_server_is_one_line():
    with pytest.raises(InputError) as err:
        resolve("http://127.0.0.1:9", f"models:/{NAME}@champion")
    assert "cannot reach MLflow server at http://127.0.0.1:9" in _one_line(err)
