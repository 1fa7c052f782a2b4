"""MLflow tracking: a run per ``chemmap run``, a nested run per stage, resumed after a restart.

The training's run (with a nested run per fold) keeps its ids in a small JSON file in the
stage folder, so that a training restarted after a failure logs into the same runs instead
of starting new ones.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chemmap.errors import InputError
from chemmap.files import write_json_atomic


def check_tracking_uri(uri: str, timeout: float = 5.0) -> None:
    """Fail early, with one line, when an MLflow server cannot be reached."""
    if uri.startswith(("http://", "https://")):
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as r:
                if r.status != 200:
                    raise InputError(f"mlflow.tracking_uri: {uri} answered HTTP {r.status} on /health")
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise InputError(f"mlflow.tracking_uri: cannot reach MLflow server at {uri} ({reason})") from None
    elif uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
    elif uri.startswith(("file:", "/")) or "://" not in uri:
        raise InputError(
            f"mlflow.tracking_uri: {uri!r}: MLflow 3 refuses the file store; use sqlite:///path/mlflow.db "
            "or an http(s):// server"
        )


def reachable(uri: str, timeout: float = 2.0) -> bool:
    """Whether the tracking store answers now (a quick look; a SQLite store always does).

    For best-effort writes on the way out of a failed or stopped stage: MLflow's client
    retries an unreachable server for minutes, and the error being reported matters more.
    """
    try:
        check_tracking_uri(uri, timeout=timeout)
    except InputError:
        return False
    return True


def client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def artifact_location(uri: str, experiment: str) -> str | None:
    """Where a new experiment keeps its artifacts: beside a SQLite store's file.

    MLflow's default for a SQLite store is ``./mlruns`` in whatever folder the process runs
    in; chemmap keeps a run's artifacts next to its database (``<db folder>/mlartifacts``).
    A server (``http://``) decides for itself: None.
    """
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///") :]).resolve().parent / "mlartifacts" / experiment).as_uri()
    return None


def experiment_id(c, name: str) -> str:
    exp = c.get_experiment_by_name(name)
    if exp is None:
        return c.create_experiment(name, artifact_location=artifact_location(c.tracking_uri, name))
    if exp.lifecycle_stage == "deleted":
        c.restore_experiment(exp.experiment_id)
    return exp.experiment_id


class RunBook:
    """Run ids of a stage, persisted in ``<stage>/mlflow_runs.json``."""

    def __init__(self, path: Path, uri: str, experiment: str) -> None:
        self.path = Path(path)
        self.uri = uri
        self.client = client(uri)
        self.experiment_id = experiment_id(self.client, experiment)
        self.runs: dict[str, str] = json.loads(self.path.read_text()) if self.path.is_file() else {}

    def run(
        self, key: str, name: str, *, parent: str | None = None, tags: dict[str, Any] | None = None
    ) -> str:
        """The run id for ``key``: the one recorded earlier if it still exists, else a new run."""
        from mlflow.exceptions import MlflowException

        rid = self.runs.get(key)
        if rid:
            try:
                r = self.client.get_run(rid)
                if r.info.lifecycle_stage == "active":
                    if r.info.status != "RUNNING":
                        self.client.update_run(rid, status="RUNNING")
                    return rid
            except MlflowException:
                pass
        all_tags = {"mlflow.runName": name, **{k: str(v) for k, v in (tags or {}).items()}}
        if parent:
            all_tags["mlflow.parentRunId"] = parent
        rid = self.client.create_run(self.experiment_id, tags=all_tags, run_name=name).info.run_id
        self.runs[key] = rid
        write_json_atomic(self.path, self.runs)
        return rid

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int) -> None:
        log_metrics(self.client, run_id, metrics, step)

    def end_running(self, status: str) -> None:
        """Mark this book's runs still RUNNING as ``status`` (KILLED, FAILED); :meth:`run`
        makes them RUNNING again when a rerun resumes them. Best effort: the server may be
        what failed, and the error that stopped the stage is the one to report."""
        if not reachable(self.uri):
            return
        for rid in self.runs.values():
            try:
                if self.client.get_run(rid).info.status == "RUNNING":
                    self.client.set_terminated(rid, status=status)
            except Exception:
                pass


def log_metrics(c, run_id: str, metrics: dict[str, float], step: int) -> None:
    import time

    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    items = [Metric(k, float(v), ts, step) for k, v in metrics.items() if v is not None]
    if items:
        c.log_batch(run_id, metrics=items)


def log_params(c, run_id: str, params: dict[str, Any]) -> None:
    """Flattened params; values already logged (a resumed run) are left as they are."""
    from mlflow.entities import Param

    flat: dict[str, str] = {}

    def walk(prefix: str, v: Any) -> None:
        if isinstance(v, dict):
            for k, x in v.items():
                walk(f"{prefix}.{k}" if prefix else str(k), x)
        else:
            flat[prefix] = str(v)[:6000]

    walk("", params)
    have = c.get_run(run_id).data.params
    todo = [Param(k, v) for k, v in flat.items() if k not in have]
    for i in range(0, len(todo), 100):
        c.log_batch(run_id, params=todo[i : i + 100])


STAGE_TAG = "chemmap.stage"


@dataclass(frozen=True)
class PipelineRuns:
    """The MLflow runs of one ``chemmap run``: one pipeline run, a nested run per stage that works.

    A stage that was cached did its work in an earlier invocation, under that invocation's
    pipeline run; a run has one parent and is never re-parented, so the pipeline run only
    links it with a tag, ``chemmap.cached.<stage>`` = its run id.

    Attributes:
        uri: the tracking URI.
        experiment: the experiment's name.
        parent: the pipeline run's id.
    """

    uri: str
    experiment: str
    parent: str

    @classmethod
    def start(cls, uri: str, experiment: str, name: str, config_text: str) -> PipelineRuns:
        """A new pipeline run with the resolved config as ``config.yaml``."""
        c = client(uri)
        tags = {"mlflow.runName": f"{name}-pipeline", STAGE_TAG: "pipeline"}
        rid = c.create_run(experiment_id(c, experiment), tags=tags, run_name=f"{name}-pipeline").info.run_id
        c.log_text(rid, config_text, "config.yaml")
        return cls(uri, experiment, rid)

    def stage(self, stage: str, key: str, tags: dict[str, Any] | None = None) -> str:
        """A new run nested under the pipeline run for a stage that does work now."""
        return stage_run(self.uri, self.experiment, stage, key, parent=self.parent, tags=tags)

    def cached(self, stage: str, run_id: str | None) -> None:
        """Link a cached stage's run (made by an earlier invocation) to this pipeline run."""
        if run_id:
            client(self.uri).set_tag(self.parent, f"chemmap.cached.{stage}", run_id)

    def finish(self, status: str = "FINISHED") -> None:
        client(self.uri).set_terminated(self.parent, status=status)

    def end_after_error(self, status: str) -> None:
        """:meth:`finish` as KILLED or FAILED, best effort (see :func:`reachable`)."""
        if reachable(self.uri):
            try:
                self.finish(status)
            except Exception:
                pass


def stage_run(
    uri: str,
    experiment: str,
    stage: str,
    key: str,
    *,
    parent: str | None = None,
    tags: dict[str, Any] | None = None,
) -> str:
    """A new run for one stage's work (nested under ``parent`` when given)."""
    c = client(uri)
    name = f"{stage}-{key[:8]}"
    all_tags = {"mlflow.runName": name, STAGE_TAG: stage, "chemmap.stage_key": key}
    all_tags |= {k: str(v) for k, v in (tags or {}).items()}
    if parent:
        all_tags["mlflow.parentRunId"] = parent
    return c.create_run(experiment_id(c, experiment), tags=all_tags, run_name=name).info.run_id
