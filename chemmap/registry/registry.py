"""chemmap models in the MLflow model registry: logged from code, promoted on evidence, fetched safely.

- :func:`log_model` logs a bundle (:mod:`chemmap.inference.bundle`) into the training's run
  as a pyfunc model *from code*: MLflow stores :mod:`chemmap.registry.pyfunc_model` as a file
  and the bundle folder as the artifact ``chemmap``; nothing is pickled.
- :func:`register` makes it a version of a registered model and gives it an alias:
  ``champion`` when it beats the current champion on the same test samples (a paired
  bootstrap of the RMSE difference whose 95 % interval lies below 0), else ``challenger``;
  a dethroned champion becomes ``previous``. :func:`promote` moves an alias by hand.
- :func:`resolve` turns ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` into a version and
  :func:`fetch_bundle` downloads it and checks, without running any of it, that it is
  chemmap's: the code file is byte for byte chemmap's own, no pickle, a bundle that reads.

The champion's test predictions come from the registry (its bundle's ``provenance``, see
:func:`evaluation_provenance`), never from local files.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from chemmap import tracking
from chemmap.errors import InputError
from chemmap.evaluate.metrics import paired_bootstrap
from chemmap.inference.bundle import MANIFEST, ModelBundle, read_bundle

__all__ = [
    "CODE_FILE",
    "Registration",
    "evaluation_provenance",
    "fetch_bundle",
    "log_model",
    "promote",
    "register",
    "resolve",
]

CODE_FILE = Path(__file__).with_name("pyfunc_model.py")  # the models-from-code file MLflow stores
ARTIFACT = "chemmap"  # the bundle's name among the model's artifacts (as in pyfunc_model.py)
LOGGED_NAME = "model"  # the logged model's name in the training run
# pyfunc loaders that take the model from its code file when MLmodel names one: MLflow 3 writes
# the first for models from code; the second (pickled models' loader) also reads model_code_path
# first. Either way fetch_bundle also refuses any python_model entry and any pickle file.
CODE_LOADERS = ("mlflow.pyfunc.loaders.code_model", "mlflow.pyfunc.model")
CHAMPION, CHALLENGER, PREVIOUS = "champion", "challenger", "previous"
N_BOOT, SEED = 10000, 0  # the paired bootstrap that decides a promotion
_PICKLE_SUFFIXES = (".pkl", ".pickle", ".cloudpickle", ".joblib")
_MAX_MLMODEL_BYTES = 1 << 20
_NOT_FOUND = ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND")


@dataclass(frozen=True)
class Registration:
    """A registered model version and the alias it was given.

    Attributes:
        name: the registered model.
        version: its version number, as MLflow spells it (``"3"``).
        alias: ``"champion"`` or ``"challenger"``.
        reason: one sentence saying why.
    """

    name: str
    version: str
    alias: str
    reason: str


# ----------------------------------------------------------------------------- test predictions


@dataclass(frozen=True)
class _TestScores:
    """A model's predictions of the test samples, from ``metrics.json`` or a bundle's provenance."""

    dataset_key: str
    sample_ids: list[str]
    reference: np.ndarray  # (n,) lab values of the first target
    unet: np.ndarray  # (n,) the model's predictions

    @property
    def rmse(self) -> float:
        return float(np.sqrt(np.mean((self.unet - self.reference) ** 2)))

    @classmethod
    def parse(cls, data: Mapping[str, Any], source: str) -> _TestScores:
        """From a dict with ``dataset_key`` and ``test_predictions`` (``sample_id``, ``reference``,
        ``unet``); one line naming ``source`` and the key when something is missing."""
        preds = data.get("test_predictions")
        if not data.get("dataset_key") or not isinstance(preds, Mapping):
            missing = "dataset_key" if not data.get("dataset_key") else "test_predictions"
            raise InputError(f"{source}: no {missing}")
        try:
            ids = [str(s) for s in preds["sample_id"]]
            ref = np.asarray(preds["reference"], dtype=np.float64)
            unet = np.asarray(preds["unet"], dtype=np.float64)
        except (KeyError, TypeError, ValueError) as err:
            raise InputError(
                f"{source}: test_predictions needs sample_id, reference and unet ({err})"
            ) from None
        if not (len(ids) == ref.shape[0] == unet.shape[0]) or ref.ndim != 1 or unet.ndim != 1 or not ids:
            raise InputError(
                f"{source}: test_predictions: {len(ids)} sample ids, {ref.shape} references, "
                f"{unet.shape} predictions; expected as many of each"
            )
        if len(set(ids)) != len(ids) or not (np.isfinite(ref).all() and np.isfinite(unet).all()):
            raise InputError(f"{source}: test_predictions holds repeated sample ids or non-finite values")
        return cls(str(data["dataset_key"]), ids, ref, unet)

    def aligned_to(self, ids: list[str]) -> _TestScores:
        """The same scores in the order of ``ids`` (the same set of samples)."""
        where = {s: i for i, s in enumerate(self.sample_ids)}
        order = np.array([where[s] for s in ids])
        return _TestScores(self.dataset_key, list(ids), self.reference[order], self.unet[order])


def evaluation_provenance(evaluation: Mapping[str, Any]) -> dict[str, Any]:
    """What a bundle's ``provenance`` must hold for :func:`register` to compare it later.

    Args:
        evaluation: the evaluate stage's ``metrics.json``.

    Returns:
        JSON-able ``dataset_key``, ``training_key``, ``test_sample_ids``, ``test_rmse_unet`` and
        ``test_predictions`` (``sample_id``, ``reference``, ``unet``, in that order of samples),
        to pass (with ``raw_saturation``) as ``provenance`` to
        :func:`chemmap.inference.bundle.write_bundle`.
    """
    s = _TestScores.parse(evaluation, "evaluation")
    return {
        "dataset_key": s.dataset_key,
        "training_key": str(evaluation.get("training_key", "")),
        "test_sample_ids": s.sample_ids,
        "test_rmse_unet": s.rmse,
        "test_predictions": {
            "sample_id": s.sample_ids,
            "reference": s.reference.tolist(),
            "unet": s.unet.tolist(),
        },
    }


def _decide(new: _TestScores, champion: _TestScores | None, champion_version: str | None) -> tuple[str, str]:
    """``(alias, reason)`` for a new version against the current champion (None: there is none)."""
    if champion_version is None:
        return CHAMPION, "no champion yet: the first version to be registered becomes champion"
    v = f"champion version {champion_version}"
    if champion is None:
        return CHALLENGER, f"{v}'s bundle records no test predictions to compare with"
    if new.dataset_key != champion.dataset_key:
        return CHALLENGER, (
            f"different dataset key: evaluated on dataset {new.dataset_key}, {v} on {champion.dataset_key}"
        )
    if sorted(new.sample_ids) != sorted(champion.sample_ids):
        common = len(set(new.sample_ids) & set(champion.sample_ids))
        return CHALLENGER, (
            f"different test samples: {len(new.sample_ids)} here, {len(champion.sample_ids)} for {v}, "
            f"{common} in common"
        )
    old = champion.aligned_to(new.sample_ids)
    if not np.allclose(old.reference, new.reference, rtol=1e-6, atol=1e-9):
        return CHALLENGER, f"the reference values of the test samples differ from those {v} was scored on"
    boot = paired_bootstrap(new.reference, new.unet, old.unet, n_boot=N_BOOT, seed=SEED)
    lo, hi, est = boot["ci_low"], boot["ci_high"], boot["estimate"]
    if hi < 0:
        return CHAMPION, (
            f"RMSE {new.rmse:.4g} against {old.rmse:.4g} of {v}: the difference {est:+.4g}, "
            f"95 % CI [{lo:+.4g}, {hi:+.4g}], lies below 0"
        )
    return CHALLENGER, (
        f"RMSE {new.rmse:.4g} against {old.rmse:.4g} of {v}: the difference {est:+.4g}, "
        f"95 % CI [{lo:+.4g}, {hi:+.4g}], does not lie below 0"
    )


# ----------------------------------------------------------------------------- logging


@contextlib.contextmanager
def _global_tracking_uri(uri: str) -> Iterator[None]:
    """MLflow's fluent API (which ``log_model`` needs) pointed at ``uri``; as it was afterwards.

    ``mlflow.set_tracking_uri`` also sets ``MLFLOW_TRACKING_URI`` in the environment, so both the
    module's setting and the variable are put back.
    """
    import mlflow
    from mlflow.tracking._tracking_service import utils as tracking_utils

    saved_uri = tracking_utils._tracking_uri
    saved_env = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved_uri)
        if saved_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved_env


def _signature(bands: int, n_targets: int):
    """Named float32 tensors raw/white/dark ``(-1, -1, bands)`` -> ``(n_targets, -1, -1)``."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ParamSchema, ParamSpec, Schema, TensorSpec

    f32 = np.dtype(np.float32)
    return ModelSignature(
        inputs=Schema([TensorSpec(f32, (-1, -1, bands), name) for name in ("raw", "white", "dark")]),
        outputs=Schema([TensorSpec(f32, (n_targets, -1, -1))]),
        params=ParamSchema([ParamSpec("saturation", "double", None)]),
    )


def _requirements() -> list[str]:
    """The installed chemmap, mlflow, torch and numpy, pinned (local labels such as +cpu dropped)."""
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for pkg in ("chemmap", "mlflow", "torch", "numpy"):
        try:
            out.append(f"{pkg}=={version(pkg).split('+')[0]}")
        except PackageNotFoundError:
            out.append(pkg)
    return out


def _existing_run(client, run_id: str, tracking_uri: str):
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise InputError(f"MLflow run {run_id!r} not found at {tracking_uri}") from None
    if run.info.lifecycle_stage != "active":
        raise InputError(f"MLflow run {run_id} at {tracking_uri} is deleted")
    return run


def log_model(tracking_uri: str, run_id: str, bundle_dir: str | Path, *, bands: int | None = None) -> str:
    """Log a bundle as a pyfunc model from code into an existing run.

    Args:
        tracking_uri: the MLflow tracking (and registry) URI.
        run_id: the run the model belongs to (the training's run); its status is left as it was.
        bundle_dir: a bundle folder (:func:`chemmap.inference.bundle.write_bundle`), read and
            checked first.
        bands: the raw scans' band count the signature declares; must be the recipe's
            (default: the recipe's).

    Returns:
        The logged model's URI (MLflow 3: ``models:/m-<model id>``), for :func:`register`.

    Raises:
        InputError: unreachable server, unknown run, a bundle that does not read, or ``bands``
            that are not the recipe's.
    """
    import mlflow

    tracking.check_tracking_uri(tracking_uri)
    bundle = read_bundle(bundle_dir)
    raw_bands = len(bundle.recipe.raw_wavelengths)
    if bands is not None and bands != raw_bands:
        raise InputError(f"bands={bands}, but the bundle's recipe is made for {raw_bands} raw bands")
    client = tracking.client(tracking_uri)
    status = _existing_run(client, run_id, tracking_uri).info.status
    with _global_tracking_uri(tracking_uri), warnings.catch_warnings():
        # The signature is explicit: no input example needed. (MLflow's own request for type hints
        # on predict escapes any filter; our predict takes MLflow's dict of arrays, unhinted.)
        warnings.filterwarnings("ignore", message=r".*input example.*")
        active = mlflow.active_run()
        if active is not None and active.info.run_id == run_id:
            run = contextlib.nullcontext()  # the caller's own active run: theirs to end
        else:
            run = mlflow.start_run(run_id=run_id, nested=active is not None)
        with run:
            info = mlflow.pyfunc.log_model(
                name=LOGGED_NAME,
                python_model=str(CODE_FILE),
                artifacts={ARTIFACT: str(bundle.path)},
                signature=_signature(raw_bands, len(bundle.targets)),
                pip_requirements=_requirements(),
            )
    if client.get_run(run_id).info.status != status:
        client.update_run(run_id, status=status)  # start_run resumed it and end_run finished it
    return info.model_uri


# ----------------------------------------------------------------------------- the registry


def _mlflow_errors():
    from mlflow.exceptions import MlflowException

    return MlflowException


def _registered_model(client, name: str, what: str):
    """The registered model ``name``; one line naming ``what`` the user asked for if there is none."""
    try:
        return client.get_registered_model(name)
    except _mlflow_errors() as err:
        if err.error_code in _NOT_FOUND:
            raise InputError(f"{what}: no registered model {name!r}") from None
        raise


def _aliases(model) -> dict[str, str]:
    """A registered model's aliases -> versions as strings (the SQL store gives ints, REST strings)."""
    return {str(a): str(v) for a, v in (model.aliases or {}).items()}


def _model_version(client, name: str, version: str, what: str):
    try:
        return client.get_model_version(name, str(version))
    except _mlflow_errors() as err:
        if err.error_code in _NOT_FOUND or err.error_code == "INVALID_PARAMETER_VALUE":
            raise InputError(f"{what}: registered model {name!r} has no version {version!r}") from None
        raise


def _read_mlmodel(path: Path, source: str) -> dict[str, Any]:
    import yaml

    if not path.is_file():
        raise InputError(f"{source}: no MLmodel file; not an MLflow model")
    if path.stat().st_size > _MAX_MLMODEL_BYTES:
        raise InputError(f"{source}: its MLmodel file is {path.stat().st_size} bytes, too large")
    try:
        mlmodel = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise InputError(f"{source}: MLmodel is not YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(mlmodel, dict):
        raise InputError(f"{source}: MLmodel is not a mapping")
    return mlmodel


def _bundle_subpath(mlmodel: dict[str, Any], source: str) -> str:
    """Where the bundle sits in the model folder, as MLmodel records it (a relative path)."""
    pyfunc = (mlmodel.get("flavors") or {}).get("python_function")
    if not isinstance(pyfunc, dict):
        raise InputError(f"{source}: no python_function flavor in MLmodel; not a chemmap model")
    artifacts = pyfunc.get("artifacts") or {}
    entry = artifacts.get(ARTIFACT) if isinstance(artifacts, dict) else None
    rel = entry.get("path") if isinstance(entry, dict) else None
    if not isinstance(rel, str) or not rel:
        raise InputError(f"{source}: the model has no {ARTIFACT!r} artifact; not a chemmap model")
    if Path(rel).is_absolute() or ".." in Path(rel).parts:
        raise InputError(f"{source}: the {ARTIFACT!r} artifact path {rel!r} leaves the model folder")
    if set(artifacts) != {ARTIFACT}:
        raise InputError(f"{source}: artifacts {sorted(artifacts)}; a chemmap model has only {ARTIFACT!r}")
    return rel


def _remote_provenance(tracking_uri: str, root_uri: str, source: str) -> dict[str, Any]:
    """The ``provenance`` of the bundle in a model's artifacts, read as data (MLmodel, manifest)."""
    import mlflow

    with tempfile.TemporaryDirectory(prefix="chemmap-manifest-") as tmp:
        root = root_uri.rstrip("/")
        got = mlflow.artifacts.download_artifacts(f"{root}/MLmodel", dst_path=tmp, tracking_uri=tracking_uri)
        rel = _bundle_subpath(_read_mlmodel(Path(got), source), source)
        got = mlflow.artifacts.download_artifacts(
            f"{root}/{rel}/{MANIFEST}", dst_path=tmp, tracking_uri=tracking_uri
        )
        try:
            manifest = json.loads(Path(got).read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise InputError(f"{source}: its {MANIFEST} is not JSON ({err})") from None
    provenance = manifest.get("provenance") if isinstance(manifest, dict) else None
    return provenance if isinstance(provenance, dict) else {}


def _champion_scores(client, tracking_uri: str, name: str, version: str) -> _TestScores | None:
    """The champion's test predictions from its bundle in the registry; None if it has none."""
    source = f"models:/{name}/{version}"
    try:  # a champion that is not chemmap's, or has no predictions, cannot be compared with
        uri = client.get_model_version_download_uri(name, version)
        return _TestScores.parse(_remote_provenance(tracking_uri, uri, source), f"{source} provenance")
    except InputError:
        return None


def _logged_model(client, model_uri: str):
    """The logged model behind ``models:/m-<id>`` (what :func:`log_model` returns)."""
    model_id = model_uri.removeprefix("models:/")
    if not model_uri.startswith("models:/") or not model_id or "/" in model_id or "@" in model_id:
        raise InputError(f"{model_uri!r}: expected a logged model's URI models:/<model id> (from log_model)")
    try:
        return client.get_logged_model(model_id)
    except _mlflow_errors() as err:
        if err.error_code in _NOT_FOUND:
            raise InputError(f"{model_uri}: no such logged model") from None
        raise


def _check_own_evaluation(tracking_uri: str, logged, model_uri: str, new: _TestScores, evaluation) -> None:
    """The evaluation must be of this model: its dataset and training keys, where its bundle has them."""
    provenance = _remote_provenance(tracking_uri, logged.artifact_location, model_uri)
    for key, value in (("dataset_key", new.dataset_key), ("training_key", evaluation.get("training_key"))):
        recorded = provenance.get(key)
        if recorded and value and str(recorded) != str(value):
            raise InputError(
                f"evaluation: {key} {value} is not that of {model_uri}, whose bundle records {recorded}"
            )


def _set_champion(client, name: str, version: str, old: str | None) -> None:
    """``version`` becomes champion, the old champion ``previous``; a champion is no challenger."""
    if old is not None and old != version:
        client.set_registered_model_alias(name, PREVIOUS, old)
    client.set_registered_model_alias(name, CHAMPION, version)
    if _aliases(client.get_registered_model(name)).get(CHALLENGER) == version:
        client.delete_registered_model_alias(name, CHALLENGER)


def register(
    tracking_uri: str,
    name: str,
    model_uri: str,
    *,
    evaluation: Mapping[str, Any],
    tags: Mapping[str, Any] | None = None,
) -> Registration:
    """Register a logged model as a new version and give it ``champion`` or ``challenger``.

    The first version becomes champion. A later one becomes champion only when it was evaluated
    on the champion's dataset (``dataset_key``) and test samples, and the paired bootstrap
    (``n_boot=10000``, ``seed=0``) 95 % interval of RMSE(new) - RMSE(champion) over those samples
    lies entirely below 0; the old champion then becomes ``previous``. The champion's
    predictions are read from its bundle's ``provenance`` in the registry
    (:func:`evaluation_provenance`).

    Args:
        tracking_uri: the MLflow tracking (and registry) URI.
        name: the registered model (created if missing).
        model_uri: the logged model, as :func:`log_model` returned it.
        evaluation: the evaluate stage's ``metrics.json``; used: ``dataset_key``,
            ``training_key`` (optional) and ``test_predictions`` with ``sample_id``,
            ``reference`` and ``unet`` (one value per test sample, first target).
        tags: version tags (stage keys, the training run), stored as strings; chemmap adds
            ``chemmap.dataset_key``, ``chemmap.test_rmse_unet`` and ``chemmap.registration``
            (the reason).

    Returns:
        The version, its alias and the reason in one sentence.

    Raises:
        InputError: unreachable server, an evaluation without test predictions, an unknown
            logged model, or an evaluation of another model's dataset or training.
    """
    tracking.check_tracking_uri(tracking_uri)
    new = _TestScores.parse(evaluation, "evaluation")
    client = tracking.client(tracking_uri)
    logged = _logged_model(client, model_uri)
    _check_own_evaluation(tracking_uri, logged, model_uri, new, evaluation)
    try:
        client.create_registered_model(name)
    except _mlflow_errors() as err:
        if err.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise
    old = _aliases(client.get_registered_model(name)).get(CHAMPION)
    champion = None if old is None else _champion_scores(client, tracking_uri, name, old)
    alias, reason = _decide(new, champion, old)
    version_tags = {str(k): str(v) for k, v in (tags or {}).items()}
    version_tags.update(
        {
            "chemmap.dataset_key": new.dataset_key,
            "chemmap.test_rmse_unet": f"{new.rmse:.6g}",
            "chemmap.registration": reason,
        }
    )
    with _global_tracking_uri(tracking_uri):  # MLflow's SQL registry resolves models:/ URIs there
        mv = client.create_model_version(
            name, source=model_uri, run_id=logged.source_run_id, tags=version_tags, model_id=logged.model_id
        )
    version = str(mv.version)
    if alias == CHAMPION:
        _set_champion(client, name, version, old)
    else:
        client.set_registered_model_alias(name, CHALLENGER, version)
    return Registration(name, version, alias, reason)


def promote(tracking_uri: str, name: str, version: str | int, alias: str = CHAMPION) -> None:
    """Move ``alias`` to a version by hand; moving ``champion`` makes the old champion ``previous``.

    Raises:
        InputError: one line for an unknown model or version, or an alias MLflow refuses.
    """
    tracking.check_tracking_uri(tracking_uri)
    client = tracking.client(tracking_uri)
    old = _aliases(_registered_model(client, name, f"promote {name}")).get(CHAMPION)
    version = str(_model_version(client, name, str(version), f"promote {name}").version)
    try:
        if alias == CHAMPION:
            _set_champion(client, name, version, old)
        else:
            client.set_registered_model_alias(name, alias, version)
    except _mlflow_errors() as err:
        if err.error_code != "INVALID_PARAMETER_VALUE":
            raise
        raise InputError(
            f"promote {name} {version}: alias {alias!r}: {err.message.splitlines()[0]}"
        ) from None


def _parse_uri(model_uri: str) -> tuple[str, str | None, str | None]:
    """``models:/NAME@ALIAS`` -> (NAME, ALIAS, None); ``models:/NAME/VERSION`` -> (NAME, None, VERSION)."""
    expected = "expected models:/NAME@ALIAS or models:/NAME/VERSION"
    if not isinstance(model_uri, str) or not model_uri.startswith("models:/"):
        raise InputError(f"{model_uri!r}: not a registered model URI ({expected})")
    rest = model_uri.removeprefix("models:/")
    if "@" in rest:
        name, alias = rest.rsplit("@", 1)
        if name and alias and "/" not in alias:
            return name, alias, None
    elif "/" in rest:
        name, version = rest.rsplit("/", 1)
        if name and version.isdigit():
            return name, None, version
    raise InputError(f"{model_uri!r}: not a registered model version ({expected})")


def resolve(tracking_uri: str, model_uri: str) -> tuple[str, str]:
    """``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` -> ``(name, version)``.

    Raises:
        InputError: one line naming the URI: not such a URI, or an unknown model, alias or version.
    """
    name, alias, version = _parse_uri(model_uri)
    tracking.check_tracking_uri(tracking_uri)
    client = tracking.client(tracking_uri)
    model = _registered_model(client, name, model_uri)
    if alias is not None:
        aliases = _aliases(model)
        if alias not in aliases:
            known = ", ".join(sorted(aliases)) or "none"
            raise InputError(f"{model_uri}: model {name!r} has no alias {alias!r} (aliases: {known})")
        return name, aliases[alias]
    return name, str(_model_version(client, name, version, model_uri).version)


# ----------------------------------------------------------------------------- safe download


def _check_model_folder(root: Path, source: str) -> ModelBundle:
    """Refuse, with one line, a downloaded model that is not chemmap's; else its read bundle.

    Nothing in the folder is imported, unpickled or executed: MLmodel is parsed with
    ``yaml.safe_load``, the code file is compared byte for byte with chemmap's own, and the
    bundle is read by :func:`read_bundle` (JSON, hashed weights loaded ``weights_only``).
    """
    pickled = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.suffix in _PICKLE_SUFFIXES)
    if pickled:
        raise InputError(
            f"{source}: it holds a pickled file ({pickled[0]}); chemmap models are logged from code"
        )
    mlmodel = _read_mlmodel(root / "MLmodel", source)
    pyfunc = (mlmodel.get("flavors") or {}).get("python_function")
    if not isinstance(pyfunc, dict):
        raise InputError(f"{source}: no python_function flavor in MLmodel; not a chemmap model")
    if pyfunc.get("python_model") is not None:
        raise InputError(f"{source}: a pickled python_model ({pyfunc['python_model']}); not a chemmap model")
    if pyfunc.get("loader_module") not in CODE_LOADERS:
        raise InputError(f"{source}: loader_module {pyfunc.get('loader_module')!r}; not a chemmap model")
    if pyfunc.get("code"):
        raise InputError(f"{source}: it ships code paths ({pyfunc['code']}); not a chemmap model")
    code = pyfunc.get("model_code_path")
    if not isinstance(code, str) or not code:
        raise InputError(f"{source}: not a model from code (no model_code_path); not a chemmap model")
    code_file = root / os.path.basename(code)  # where MLflow's loader looks for it
    if not code_file.is_file() or code_file.read_bytes() != CODE_FILE.read_bytes():
        raise InputError(
            f"{source}: its model code {code_file.name} is not chemmap's {CODE_FILE.name}; refusing the model"
        )
    return read_bundle(root / _bundle_subpath(mlmodel, source))


def _cache_name(name: str) -> str:
    """A folder name for a registered model: itself when safe, else a cleaned name and a hash."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", name)
    if safe == name and name not in (".", ".."):
        return name
    return f"{safe.strip('.') or 'model'}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"


def _version_identity(tracking_uri: str, name: str, version: str) -> str:
    """A short hash of what makes a registered version this one: its registry, run and source."""
    mv = tracking.client(tracking_uri).get_model_version(name, version)
    who = [tracking_uri, name, str(version), mv.run_id, mv.source, str(mv.creation_timestamp)]
    return hashlib.sha256("\n".join(map(str, who)).encode()).hexdigest()[:12]


def _download(tracking_uri: str, uri: str, dest: Path, source: str) -> None:
    """Download a model version's artifacts into ``dest``, complete and checked or not at all."""
    import mlflow

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        # A folder URI lands in a subfolder named after its last part: use the path MLflow returns.
        root = Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(tmp), tracking_uri=tracking_uri))
        if not root.is_dir() or tmp.resolve() not in (root.resolve(), *root.resolve().parents):
            raise InputError(f"{source}: the download of {uri} is not a folder of model files")
        _check_model_folder(root, source)  # a refused model never lands in the cache
        try:
            os.replace(root, dest)
        except OSError:
            if not dest.is_dir():  # else another process finished the same download first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def fetch_bundle(tracking_uri: str, model_uri: str, cache_dir: str | Path) -> tuple[ModelBundle, str, str]:
    """Resolve a registered model, download it (once) and read its bundle, running none of it.

    Args:
        tracking_uri: the MLflow tracking (and registry) URI.
        model_uri: ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``.
        cache_dir: downloads go to ``cache_dir/<name>/<version>-<identity>/`` (renamed into
            place when complete and checked; a complete earlier download is checked and reused).
            The identity hashes the tracking URI and the version's run and source, so version 1
            of another registry (or of a registry made again) is never taken for this one.

    Returns:
        ``(bundle, name, version)``.

    Raises:
        InputError: one line: an unknown model, alias or version, or a model that is not
            chemmap's (a pickled python model, another code file, code paths, no ``chemmap``
            artifact, or a bundle folder :func:`read_bundle` refuses).
    """
    name, version = resolve(tracking_uri, model_uri)
    source = f"{model_uri} (version {version})"
    dest = Path(cache_dir) / _cache_name(name) / f"{version}-{_version_identity(tracking_uri, name, version)}"
    if dest.is_dir():
        try:
            return _check_model_folder(dest, source), name, version
        except InputError:
            shutil.rmtree(dest)  # a changed cached copy: the registry's is the reference
    uri = tracking.client(tracking_uri).get_model_version_download_uri(name, version)
    _download(tracking_uri, uri, dest, source)
    return _check_model_folder(dest, source), name, version
