"""fetch_bundle: chemmap's own models download once and read; anything else is refused unrun.

Each refused model carries a payload that would create a marker file if any of it ran: a
pickled python model whose unpickling (``__reduce__``) or ``load_context`` writes the marker,
a look-alike code file that writes it on import, a pickle hidden in the bundle folder. The
markers must not exist after the refusal.
"""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import mlflow
import pytest

from chemmap import tracking
from chemmap.errors import InputError
from chemmap.inference.bundle import read_bundle
from chemmap.registry.registry import CODE_FILE, _cache_name, fetch_bundle, log_model, register
from tests.registry import helpers

pytestmark = pytest.mark.slow  # shares the registry of conftest.py; three more models logged


class _Payload:
    """Unpickling it opens (creates) the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


class _PickledModel(mlflow.pyfunc.PythonModel):
    """A python model MLflow can only store pickled; running any of it creates the marker."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def load_context(self, context) -> None:
        Path(self.marker).touch()

    def predict(self, context, model_input, params=None):
        Path(self.marker).touch()
        return model_input

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text and text, text
    return text


def _refused(registered, name: str, cache: Path, marker: Path) -> str:
    """fetch_bundle's one-line refusal of ``models:/name/1``; nothing ran, nothing was cached."""
    assert not marker.exists()
    with pytest.raises(InputError) as err:
        fetch_bundle(registered.uri, f"models:/{name}/1", cache)
    assert not marker.exists(), "fetch_bundle ran something from the model"
    assert not (cache / name).exists() or os.listdir(cache / name) == []  # no model, no temp folder
    return _one_line(err)


def test_the_champion_downloads_once_reads_and_is_reused(registered, tmp_path):
    bundle, name, version = fetch_bundle(registered.uri, f"models:/{helpers.NAME}@champion", tmp_path)
    assert (name, version) == (helpers.NAME, "2")
    folder = bundle.path.parent.parent  # <cache>/<name>/<version>-<identity>
    assert folder.parent == tmp_path / helpers.NAME and folder.name.startswith("2-")
    assert bundle.manifest == read_bundle(registered.root / "bundle-better").manifest
    assert (folder / CODE_FILE.name).read_bytes() == CODE_FILE.read_bytes()
    stamp = folder.stat()
    again, _, _ = fetch_bundle(registered.uri, f"models:/{helpers.NAME}/2", tmp_path)
    assert again.path == bundle.path and folder.stat().st_ino == stamp.st_ino
    assert os.listdir(tmp_path / helpers.NAME) == [folder.name]  # no temporary folder left behind


def test_version_1_of_another_registry_is_not_taken_from_the_cache(registered, tmp_path):
    """Two registries (or one made again) both have a version 1 of the name: the cache keeps them apart."""
    uri = f"sqlite:///{tmp_path / 'other.db'}"
    client = tracking.client(uri)
    run = helpers.new_run(client, "other-registry", tmp_path / "artifacts")
    other = log_model(
        uri, run, registered.root / "bundle-better", bands=len(registered.data.recipe.raw_wavelengths)
    )
    register(uri, helpers.NAME, other, evaluation=registered.evaluations["better"], tags={})
    cache = tmp_path / "cache"
    first, _, v1 = fetch_bundle(registered.uri, f"models:/{helpers.NAME}/1", cache)
    second, _, v2 = fetch_bundle(uri, f"models:/{helpers.NAME}/1", cache)
    assert v1 == v2 == "1" and first.path != second.path
    assert first.manifest == read_bundle(registered.root / "bundle-first").manifest
    assert second.manifest == read_bundle(registered.root / "bundle-better").manifest


def test_a_changed_cached_copy_is_downloaded_again(registered, tmp_path):
    bundle, _, _ = fetch_bundle(registered.uri, f"models:/{helpers.NAME}/1", tmp_path)
    (bundle.path / "extra.txt").write_text("changed by hand")
    again, _, version = fetch_bundle(registered.uri, f"models:/{helpers.NAME}/1", tmp_path)
    assert version == "1" and not (again.path / "extra.txt").exists()
    assert again.manifest == read_bundle(registered.root / "bundle-first").manifest


def test_a_pickled_python_model_is_refused_without_unpickling(registered, tmp_path):
    marker = tmp_path / "unpickled"
    info = helpers.log_pyfunc(
        registered.uri,
        registered.run,
        python_model=_PickledModel(marker),
        artifacts={"chemmap": str(registered.root / "bundle-first")},
    )
    assert not marker.exists()  # logging only pickled it
    helpers.register_logged(registered.client, "evil-pickle", info.model_uri, registered.run)
    message = _refused(registered, "evil-pickle", tmp_path / "cache", marker)
    assert message.startswith("models:/evil-pickle/1 (version 1): it holds a pickled file (python_model.pkl)")


def test_a_look_alike_code_file_is_refused_without_running_it(registered, tmp_path):
    marker = tmp_path / "imported"
    code = tmp_path / "lookalike" / CODE_FILE.name
    code.parent.mkdir()
    code.write_text(CODE_FILE.read_text() + f"open({str(marker)!r}, 'w').close()\n")
    info = helpers.log_pyfunc(
        registered.uri,
        registered.run,
        python_model=str(code),
        artifacts={"chemmap": str(registered.root / "bundle-first")},
    )
    marker.unlink()  # MLflow runs a code file when it logs it; fetching must not
    helpers.register_logged(registered.client, "evil-code", info.model_uri, registered.run)
    message = _refused(registered, "evil-code", tmp_path / "cache", marker)
    assert message.endswith(
        "its model code pyfunc_model.py is not chemmap's pyfunc_model.py; refusing the model"
    )


def test_a_bundle_with_a_foreign_file_is_refused(registered, tmp_path):
    marker = tmp_path / "unpickled"
    evil = shutil.copytree(registered.root / "bundle-first", tmp_path / "bundle")
    (evil / "evil.pkl").write_bytes(pickle.dumps(_Payload(marker)))
    info = helpers.log_pyfunc(
        registered.uri, registered.run, python_model=str(CODE_FILE), artifacts={"chemmap": str(evil)}
    )
    helpers.register_logged(registered.client, "evil-bundle", info.model_uri, registered.run)
    message = _refused(registered, "evil-bundle", tmp_path / "cache", marker)
    assert (
        message
        == "models:/evil-bundle/1 (version 1): it holds a pickled file (artifacts/bundle/evil.pkl); "
        + ("chemmap models are logged from code")
    )
    (evil / "evil.pkl").rename(evil / "notes.txt")  # not a pickle: the bundle reader refuses it
    info = helpers.log_pyfunc(
        registered.uri, registered.run, python_model=str(CODE_FILE), artifacts={"chemmap": str(evil)}
    )
    helpers.register_logged(registered.client, "evil-bundle-2", info.model_uri, registered.run)
    message = _refused(registered, "evil-bundle-2", tmp_path / "cache", marker)
    assert message.endswith("'notes.txt' is not a chemmap model file; refusing the model")


def test_unknown_versions_and_aliases_are_one_line(registered, tmp_path):
    with pytest.raises(InputError) as err:
        fetch_bundle(registered.uri, f"models:/{helpers.NAME}@gone", tmp_path)
    assert f"models:/{helpers.NAME}@gone: model 'fat' has no alias 'gone'" in _one_line(err)
    with pytest.raises(InputError) as err:
        fetch_bundle(registered.uri, "models:/nothing/1", tmp_path)
    assert _one_line(err) == "models:/nothing/1: no registered model 'nothing'"
    assert not any(tmp_path.iterdir())


def test_cache_folders_of_odd_model_names_stay_inside_the_cache():
    assert _cache_name("fat") == "fat" and _cache_name("fat-v2.1_x") == "fat-v2.1_x"
    for odd in ("..", ".", "a/../../b", "team/fat", "fat model"):
        folder = _cache_name(odd)
        assert "/" not in folder and folder not in (".", "..") and folder.strip("."), (odd, folder)
    assert _cache_name("team/fat") != _cache_name("team_fat")
