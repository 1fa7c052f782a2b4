"""MLflow tracking: one run per training (a nested run per fold), resumed after a restart.

Run ids are kept in a small JSON file in the stage folder, so that a training restarted
after a failure logs into the same runs instead of starting new ones.
"""

from __future__ import annotations

import json
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


def client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def experiment_id(c, name: str) -> str:
    exp = c.get_experiment_by_name(name)
    if exp is None:
        return c.create_experiment(name)
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
