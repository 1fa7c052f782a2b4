"""``chemmap run`` as a Ray job: submitted through the cluster's dashboard, listed, followed, stopped.

``chemmap submit CONFIG --address http://HOST:8265`` is ``ray job submit --working-dir . --
chemmap run CONFIG``, with the checks a job needs before anything is uploaded:

- A job runs in an uploaded copy of ``working_dir`` that vanishes with it, so ``workdir``
  must be an absolute path on storage every node shares, and the paths that outlive the
  job (``cluster.storage_path``, ``data.root``, a SQLite tracking file) may not be relative
  either. The config and its ``base:`` files must lie inside ``working_dir``.
- On a cluster of more than one node (counted through the dashboard's state API; a head
  without CPUs counts as many, its workers come later) the tracking URI must be an MLflow
  server: SQLite on shared storage is unsafe.
- Credentials never come from the config (a URL with a password in it is refused): the
  object-store and MLflow-server variables of the submitting shell (:data:`PASSED_ENV`,
  every ``AWS_*``) go into the job's ``runtime_env``. The dashboard shows a job's
  ``runtime_env`` to whoever may reach it.

Token authentication (Ray >= 2.52; docs.ray.io "Ray token authentication", and
``ray/_private/authentication`` in Ray 2.60). A cluster started with ``RAY_AUTH_MODE=token``
(or, in Ray 2.60, by ``ray start`` on a machine that has a token) refuses every dashboard
request without ``Authorization: Bearer <token>``. The job client adds that header only when
``RAY_AUTH_MODE=token`` is set where it runs; the token is taken from ``RAY_AUTH_TOKEN``,
else the file named by ``RAY_AUTH_TOKEN_PATH``, else ``~/.ray/auth_token``. chemmap sends no
token of its own accord and never puts one into a job: the job's driver inherits the
cluster's mode and token from its node. A refusal is one line saying which variables to set.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import yaml

from chemmap.config import ChemmapConfig, load_config
from chemmap.errors import ConfigError, InputError

# Never uploaded (gitignore patterns, relative to the working directory): environments,
# outputs, data, caches. Ray also honours the working directory's .gitignore.
UPLOAD_EXCLUDES = [
    "/.git",
    "/.venv",
    "/venv",
    "/.whl",
    "/runs",
    "/mlruns",
    "/data",
    "/bench/out",
    "mlflow.db",
    "__pycache__",
    "*.egg-info",
    ".pytest_cache",
    ".ruff_cache",
]
# Object-store endpoint and credentials, MLflow server credentials: passed from the
# submitting environment into the job, besides every variable that starts with AWS_ ...
PASSED_ENV = (
    "MLFLOW_S3_ENDPOINT_URL",
    "MLFLOW_S3_IGNORE_TLS",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_TRACKING_INSECURE_TLS",
)
# ... except those that name a file or a profile on the submitting machine: on a node they
# would point at nothing (a missing AWS_CA_BUNDLE breaks every S3 call).
NOT_PASSED = {
    "AWS_CA_BUNDLE",
    "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
}
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
TOKEN_HELP = (
    "set RAY_AUTH_MODE=token and give the cluster's token in RAY_AUTH_TOKEN, in a file named by "
    "RAY_AUTH_TOKEN_PATH, or in ~/.ray/auth_token"
)


@dataclass(frozen=True)
class JobRow:
    """One Ray job as ``chemmap jobs list`` shows it."""

    job_id: str  # the submission id (raysubmit_...)
    status: str  # PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED
    start_time: float | None  # s since the epoch
    entrypoint: str
    message: str


# ----------------------------------------------------------------------------- checks, no Ray


def api_address(address: str | None, environ: Mapping[str, str] | None = None) -> str:
    """The dashboard address: ``address``, else ``RAY_API_SERVER_ADDRESS``, else ``RAY_ADDRESS``."""
    env = os.environ if environ is None else environ
    found = address or env.get("RAY_API_SERVER_ADDRESS") or env.get("RAY_ADDRESS")
    if not found:
        raise ConfigError(
            "--address: no Ray cluster given: pass --address http://HOST:8265 (its dashboard) "
            "or set RAY_API_SERVER_ADDRESS"
        )
    return found.rstrip("/")


def _relative(p: str) -> bool:
    return "://" not in p and not PurePosixPath(p).is_absolute()


def _strings(node: Any, key: str = "") -> Iterator[tuple[str, str]]:
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _strings(v, f"{key}.{k}" if key else str(k))
    elif isinstance(node, list | tuple):
        for i, v in enumerate(node):
            yield from _strings(v, f"{key}[{i}]")
    elif isinstance(node, str):
        yield key, node


def _refuse_secrets(cfg: ChemmapConfig) -> None:
    """A URL with a password: refused, the config and entrypoint are readable on the dashboard."""
    for key, value in _strings(cfg.model_dump(mode="json")):
        password = urlsplit(value).password if "://" in value else None
        if password:
            shown = value.replace(f":{password}@", ":***@")
            raise ConfigError(
                f"{cfg.source}: {key}={shown!r} carries a password; a Ray job's config is readable on "
                "the dashboard: give credentials in the environment (e.g. MLFLOW_TRACKING_USERNAME and "
                "MLFLOW_TRACKING_PASSWORD), which chemmap submit passes into the job"
            )


def check_job_config(cfg: ChemmapConfig) -> None:
    """What a job needs of its config before anything is uploaded; one line naming the key if not.

    Raises:
        ConfigError: a relative ``workdir`` (or storage path, data root, SQLite file), or a
            value that carries a password.
    """
    src = cfg.source
    if _relative(cfg.workdir) or "://" in cfg.workdir:
        raise ConfigError(
            f"{src}: workdir={cfg.workdir!r}: a Ray job's own folder vanishes with it, so workdir must "
            "be an absolute path on storage every node shares, e.g. --set workdir=/mnt/shared/chemmap"
        )
    paths = {"cluster.storage_path": cfg.cluster.storage_path}
    if cfg.data.source == "folder":
        paths["data.root"] = cfg.data.root
    for key, value in paths.items():
        if value and _relative(value):
            raise ConfigError(
                f"{src}: {key}={value!r} is relative, and a Ray job's own folder vanishes with it: "
                "give an absolute path on shared storage or a URL (s3://...)"
            )
    uri = cfg.cluster.tracking_uri
    if uri and uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        raise ConfigError(
            f"{src}: cluster.tracking_uri={uri!r} is a relative SQLite file, and a Ray job's own folder "
            "vanishes with it: give sqlite:////absolute/path or an MLflow server (http://HOST:5000)"
        )
    _refuse_secrets(cfg)


def is_multi_node(nodes: list[tuple[str, float]]) -> bool:
    """More than one alive node, or a head without CPUs (an autoscaler adds the workers later)."""
    return len(nodes) > 1 or (len(nodes) == 1 and nodes[0][1] == 0)


def check_tracking_for_nodes(cfg: ChemmapConfig, nodes: list[tuple[str, float]]) -> None:
    """On a multi-node cluster the tracking URI must be an MLflow server (``http(s)://``)."""
    uri = cfg.tracking_uri
    if is_multi_node(nodes) and not uri.startswith(("http://", "https://")):
        given = cfg.cluster.tracking_uri or f"unset, so {uri}"
        raise ConfigError(
            f"{cfg.source}: cluster.tracking_uri={given!r}: the Ray cluster has {len(nodes)} node(s) "
            f"({', '.join(f'{ip} {cpus:g} CPU' for ip, cpus in nodes)}) and SQLite on shared storage is "
            "unsafe: track to an MLflow server, e.g. --set cluster.tracking_uri=http://mlflow:5000"
        )


def _config_files(config: Path) -> list[Path]:
    """The config and the ``base:`` files it extends (already validated by :func:`load_config`)."""
    files: list[Path] = []
    path = config.resolve()
    while path not in files:
        files.append(path)
        data = yaml.safe_load(path.read_text()) or {}
        base = data.get("base")
        if not isinstance(base, str):
            break
        path = (path.parent / base).resolve()
    return files


def config_in_working_dir(config: Path, working_dir: Path) -> str:
    """``config`` relative to ``working_dir`` (POSIX), after checking its ``base:`` files lie there too."""
    for f in _config_files(config):
        if not f.is_relative_to(working_dir):
            raise ConfigError(
                f"{f}: outside the working directory {working_dir}: a Ray job sees only that uploaded "
                "folder; put the config and its base: files inside it (or pass --working-dir)"
            )
    return config.resolve().relative_to(working_dir).as_posix()


def passed_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The submitting environment's object-store and MLflow-server variables (:data:`PASSED_ENV`)."""
    return {
        k: v for k, v in environ.items() if (k.startswith("AWS_") and k not in NOT_PASSED) or k in PASSED_ENV
    }


def runtime_env(cfg: ChemmapConfig, working_dir: Path, environ: Mapping[str, str]) -> dict[str, Any]:
    """The job's ``runtime_env``: the working directory without outputs and data, the passed variables."""
    excludes = list(UPLOAD_EXCLUDES)
    inside = [cfg.workdir, cfg.cluster.storage_path, cfg.data.root if cfg.data.source == "folder" else None]
    for p in inside:
        if p and "://" not in p and Path(p).resolve().is_relative_to(working_dir):
            excludes.append("/" + Path(p).resolve().relative_to(working_dir).as_posix())
    return {"working_dir": str(working_dir), "excludes": excludes, "env_vars": passed_env(environ)}


def entrypoint(config_rel: str, overrides: list[str]) -> str:
    """The job's shell command: ``chemmap run CONFIG --set ...``, quoted."""
    args = ["chemmap", "run", config_rel]
    for item in overrides:
        args += ["--set", item]
    return shlex.join(args)


# ----------------------------------------------------------------------------- the cluster


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


@contextmanager
def _ray_errors(address: str) -> Iterator[None]:
    """Ray's refusals (token, connection, the job server's answer) as one line each."""
    from ray.exceptions import AuthenticationError
    from ray.util.state.exception import RayStateApiException

    try:
        yield
    except AuthenticationError as err:
        if "Forbidden" in str(err):
            raise InputError(
                f"Ray at {address} refused this token: it is not the cluster's ({TOKEN_HELP})"
            ) from None
        mode = os.environ.get("RAY_AUTH_MODE", "unset")
        raise InputError(
            f"Ray at {address} requires token authentication: {TOKEN_HELP} (RAY_AUTH_MODE is {mode} here)"
        ) from None
    except ConnectionError as err:
        raise InputError(
            f"--address: cannot reach the Ray dashboard at {address} ({_first_line(err)})"
        ) from None
    except (RuntimeError, RayStateApiException) as err:
        raise InputError(f"Ray at {address}: {_first_line(err)}") from None


class _UploadNoise(logging.Filter):
    """Ray's per-file packaging notes, and its notice about .git/.venv that we exclude anyway."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING and "ignored by default" not in record.getMessage()


@contextmanager
def _quiet_upload() -> Iterator[None]:
    # A logger's filter sees only its own records: name the modules that log the upload.
    names = ("packaging", "working_dir")
    loggers = [logging.getLogger(f"ray._private.runtime_env.{n}") for n in names]
    loggers.append(logging.getLogger("ray.dashboard.modules.dashboard_sdk"))
    quiet = _UploadNoise()
    for lg in loggers:
        lg.addFilter(quiet)
    try:
        yield
    finally:
        for lg in loggers:
            lg.removeFilter(quiet)


def _client(address: str):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address)


def cluster_nodes(address: str | None) -> list[tuple[str, float]]:
    """``(ip, CPUs)`` of every alive node, from the dashboard's state API."""
    from ray.util.state import list_nodes

    url = api_address(address)
    with _ray_errors(url):
        api = _client(url).get_address()
        nodes = list_nodes(address=api, filters=[("state", "=", "ALIVE")], raise_on_missing_output=False)
    return [(n.node_ip, float((n.resources_total or {}).get("CPU", 0))) for n in nodes]


def submit(
    config: Path,
    address: str | None,
    overrides: list[str] | None = None,
    working_dir: Path | None = None,
    log: Callable[[str], None] = lambda s: None,
) -> str:
    """Submit ``chemmap run CONFIG --set ...`` as a Ray job; returns its submission id.

    Args:
        config: the pipeline YAML, inside ``working_dir`` (so are its ``base:`` files).
        address: the dashboard, ``http://HOST:8265``; None: ``RAY_API_SERVER_ADDRESS`` or
            ``RAY_ADDRESS``.
        overrides: ``key.path=value`` items, checked here and passed to the job as ``--set``.
        working_dir: the folder uploaded as the job's working directory (default: the
            current one), without :data:`UPLOAD_EXCLUDES`.
        log: receives one line naming the environment variables passed into the job.

    Raises:
        ConfigError: the config cannot run as a job (:func:`check_job_config`,
            :func:`check_tracking_for_nodes`).
        InputError: the cluster cannot be reached, or refuses the token.
    """
    overrides = list(overrides or [])
    wd = (working_dir or Path.cwd()).resolve()
    cfg = load_config(config, overrides)
    rel = config_in_working_dir(config, wd)
    check_job_config(cfg)
    url = api_address(address)
    check_tracking_for_nodes(cfg, cluster_nodes(url))
    env = runtime_env(cfg, wd, os.environ)
    if env["env_vars"]:
        log(f"passing {', '.join(sorted(env['env_vars']))} from this environment into the job")
    with _ray_errors(url), _quiet_upload():
        return _client(url).submit_job(
            entrypoint=entrypoint(rel, overrides),
            runtime_env=env,
            metadata={"chemmap.config": rel, "chemmap.workdir": cfg.workdir},
        )


def list_jobs(address: str | None) -> list[JobRow]:
    """Every job the cluster knows, oldest first."""
    url = api_address(address)
    with _ray_errors(url):
        jobs = _client(url).list_jobs()
    rows = [
        JobRow(
            j.submission_id or j.job_id or "?",
            j.status.value,
            j.start_time / 1000 if j.start_time else None,
            j.entrypoint,
            (j.message or "").strip().splitlines()[0] if j.message else "",
        )
        for j in jobs
    ]
    return sorted(rows, key=lambda r: r.start_time or 0.0)


def job_status(address: str | None, job_id: str) -> JobRow:
    """One job's status and Ray's message about it."""
    url = api_address(address)
    with _ray_errors(url):
        j = _client(url).get_job_info(job_id)
    message = (j.message or "").strip().splitlines()
    return JobRow(
        job_id,
        j.status.value,
        j.start_time / 1000 if j.start_time else None,
        j.entrypoint,
        message[0] if message else "",
    )


def job_logs(address: str | None, job_id: str, write: Callable[[str], None], follow: bool = False) -> str:
    """Write a job's logs (``follow``: as they come, until it ends); returns its status then."""
    url = api_address(address)
    with _ray_errors(url):
        client = _client(url)
        if follow:

            async def tail() -> None:
                async for chunk in client.tail_job_logs(job_id):
                    write(chunk)

            asyncio.run(tail())
        else:
            write(client.get_job_logs(job_id))
        return str(client.get_job_status(job_id).value)


def stop_job(address: str | None, job_id: str) -> bool:
    """Ask Ray to stop a job; False when it had already ended."""
    url = api_address(address)
    with _ray_errors(url):
        return bool(_client(url).stop_job(job_id))
