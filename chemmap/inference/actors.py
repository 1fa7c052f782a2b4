"""Scoring a scanner's folder on a Ray cluster: one actor per worker, each holding the model.

:func:`score_on_ray` starts ``num_actors`` actors (one CPU each, or one GPU each with
``use_gpu``). Each reads the bundle itself with :func:`chemmap.inference.bundle.read_bundle`
(hashes checked, weights loaded with ``weights_only=True``) and builds the ensemble once:
only the bundle's *path* travels to the workers, never a model. The driver hands each actor
one scan at a time and gives the next scan to whichever actor finishes first, so a slow scan
holds up one actor, not the others.

An actor scores a scan with :class:`chemmap.inference.score.ScanScorer`, the scorer of local
scoring: same reading, same map, same ``<scan_id>.zarr``, ``<scan_id>.png`` and row, under
the same per-scan lock (so Ray scoring can run beside local scorers on one output folder).
The driver collects the rows and writes ``summary.csv`` (and ``samples.csv``) as local
scoring does.

Every worker must see the same paths as the driver (a shared file system: NFS, a
cluster's shared disk): the bundle folder, the input folder and the output folder, under
the names the driver uses (they are made absolute on the driver). A bundle in S3 or the
MLflow registry must first be downloaded to such a path (e.g. the registry's download
cache set to a shared folder); the actors do not download anything. chemmap itself must
be installed on every worker.

A worker that dies while scoring a scan (killed, out of memory) gives that scan an error
row; Ray restarts the actor (up to :data:`ACTOR_RESTARTS` times), and its lock is taken
over by the next scorer of the scan (its process is gone).
"""

from __future__ import annotations

import os
import socket
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from chemmap.console import keep_sigterm_handler
from chemmap.errors import InputError
from chemmap.inference.bundle import ModelBundle, read_bundle
from chemmap.inference.score import (
    Engine,
    ScanOutcome,
    ScanScorer,
    ScoreSummary,
    SummaryTable,
    check_score_inputs,
    finish_run,
    prepare_output,
    progress_bar,
)
from chemmap.inference.score_output import DEFAULT_STALE_SECONDS
from chemmap.io import ScanFiles, discover_scans

__all__ = ["ACTOR_RESTARTS", "ScanActor", "score_on_ray"]

Log = Callable[[str], None]

ACTOR_RESTARTS = 2  # times Ray restarts an actor whose process died
ACTOR_START_TIMEOUT_S = 600.0  # the actors must have loaded the model within this


class ScanActor:
    """A Ray actor's state: one scorer, its model loaded from the bundle's path at the start.

    Args:
        bundle_path: the bundle folder, as every worker sees it.
        input_dir, output_dir: the scanner's folder and the output folder (absolute).
        model_name, model_version, tolerance_nm, stale_seconds: as for :class:`ScanScorer`.
        device: ``"cpu"`` or ``"cuda"`` (the GPU Ray gave the actor).
    """

    def __init__(
        self,
        bundle_path: str,
        input_dir: str,
        output_dir: str,
        model_name: str,
        model_version: str,
        tolerance_nm: float,
        stale_seconds: float,
        engine: Engine,
    ) -> None:
        bundle = read_bundle(Path(bundle_path))
        self.scorer = ScanScorer(
            bundle,
            Path(input_dir),
            Path(output_dir),
            model_name,
            model_version,
            tolerance_nm,
            stale_seconds=stale_seconds,
            engine=engine,
        )
        _ = self.scorer.model  # loaded once, now: a bundle a worker cannot read fails here

    def where(self) -> str:
        """Which host and process this actor is."""
        return f"{socket.gethostname()} pid {os.getpid()}"

    def score(self, files: ScanFiles) -> ScanOutcome:
        """Score one scan (:meth:`ScanScorer.score`)."""
        return self.scorer.score(files)


def _connect(ray: Any, address: str | None) -> bool:
    """Connect to Ray (``address``, or a new local instance); False when already connected."""
    if ray.is_initialized():
        return False
    with keep_sigterm_handler():
        ray.init(address=address, configure_logging=False)
    return True


def _actor_count(ray: Any, num_actors: int | None, use_gpu: bool, scans: int) -> int:
    """Actors to start: ``num_actors``, or one per CPU (GPU) of the cluster; never more than scans."""
    kind = "GPU" if use_gpu else "CPU"
    have = int(ray.cluster_resources().get(kind, 0))
    if use_gpu and have < 1:
        raise InputError("use_gpu: the Ray cluster has no GPU (its resources list none)")
    if num_actors is not None and not (isinstance(num_actors, int) and num_actors >= 1):
        raise InputError(f"num_actors must be an integer >= 1, got {num_actors!r}")
    return max(1, min(num_actors if num_actors is not None else have, scans))


def _start_actors(ray: Any, n: int, use_gpu: bool, args: tuple[Any, ...]) -> list[Any]:
    """``n`` actors, each with the model loaded; a model the workers cannot load is an InputError."""
    remote = ray.remote(ScanActor).options(
        num_cpus=1, num_gpus=1 if use_gpu else 0, max_restarts=ACTOR_RESTARTS, max_task_retries=0
    )
    actors = [remote.remote(*args) for _ in range(n)]
    try:
        ray.get([a.where.remote() for a in actors], timeout=ACTOR_START_TIMEOUT_S)
    except ray.exceptions.GetTimeoutError:
        _stop_actors(ray, actors)
        raise InputError(
            f"{n} Ray actors did not start in {ACTOR_START_TIMEOUT_S:g} s: the cluster lacks "
            f"{n} free {'GPUs' if use_gpu else 'CPUs'}? (num_actors sets fewer)"
        ) from None
    except ray.exceptions.RayActorError as err:
        _stop_actors(ray, actors)
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        why = next((line for line in reversed(lines) if "Error" in line), lines[-1] if lines else "")
        raise InputError(
            f"a Ray actor could not load the model from {args[0]} (a path every worker must see): {why}"
        ) from None
    return actors


def _stop_actors(ray: Any, actors: Sequence[Any]) -> None:
    for actor in actors:
        ray.kill(actor)


def _fan_out(
    ray: Any, actors: Sequence[Any], scans: Sequence[ScanFiles], table: SummaryTable, progress: bool
) -> None:
    """Each actor one scan at a time, the next scan to the first one done; rows into ``table``."""
    pending = deque(scans)
    running: dict[Any, tuple[Any, ScanFiles, float]] = {}  # ref -> (actor, scan, submitted at)

    def submit(actor: Any) -> None:
        if pending:
            files = pending.popleft()
            running[actor.score.remote(files)] = (actor, files, time.perf_counter())

    for actor in actors:
        submit(actor)
    with progress_bar(progress) as bar:
        task = bar.add_task("", total=len(scans))
        while running:
            [ref], _ = ray.wait(list(running), num_returns=1)
            actor, files, t0 = running.pop(ref)
            try:
                outcome = ray.get(ref)
            except ray.exceptions.RayActorError as err:
                why = (str(err).strip().splitlines() or ["no reason given"])[0]
                message = f"the Ray actor scoring it died ({why})"
                outcome = table.scorer.error_outcome(files.scan_id, message, time.perf_counter() - t0)
            table.add(outcome, write=bool(running or pending))
            bar.update(task, advance=1, description=files.scan_id)
            submit(actor)


def score_on_ray(
    bundle: ModelBundle | str | os.PathLike,
    input_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    model_name: str,
    model_version: str,
    ray_address: str | None = None,
    num_actors: int | None = None,
    use_gpu: bool = False,
    raw_pattern: str | None = None,
    white_pattern: str | None = None,
    dark_pattern: str | None = None,
    samples_csv: str | os.PathLike | None = None,
    wavelength_tolerance_nm: float = 1.0,
    stale_seconds: float = DEFAULT_STALE_SECONDS,
    engine: Engine = Engine(),
    progress: bool = True,
    log: Log = print,
) -> ScoreSummary:
    """Score every scan in a scanner's folder on Ray actors (see the module's docstring): the
    outputs of :func:`chemmap.inference.score.score_folder` (``seconds``, ``scored_at`` aside).

    Args:
        bundle: the model folder (a path every worker sees), or a bundle read from one
            (only its ``path`` is sent to the actors).
        input_dir, output_dir: the scanner's folder and where outputs go, on a file system
            every worker sees under the same names.
        model_name, model_version, raw_pattern, white_pattern, dark_pattern, samples_csv,
            wavelength_tolerance_nm, stale_seconds, engine, progress, log: as for ``score_folder``
            (the engine's device is each actor's: ``cuda`` with ``use_gpu``).
        ray_address: the cluster (``"auto"``, ``"ray://head:10001"``...); None: the Ray this
            process is connected to, else a new local one (shut down at the end).
        num_actors: actors to start (default: one per CPU of the cluster, or per GPU with
            ``use_gpu``; never more than there are scans).
        use_gpu: one GPU per actor; the model runs there, maps come back to the CPU.

    Returns:
        Counts, throughput and where the tables are.

    Raises:
        InputError: as ``score_folder``; also no GPU in the cluster with ``use_gpu``, a bad
            ``num_actors``, or actors that cannot load the model.
    """
    import ray

    input_dir, output_dir = Path(input_dir).absolute(), Path(output_dir).absolute()
    sample_of = check_score_inputs(
        input_dir,
        samples_csv=samples_csv,
        wavelength_tolerance_nm=wavelength_tolerance_nm,
        stale_seconds=stale_seconds,
    )
    if not isinstance(bundle, ModelBundle):
        bundle = read_bundle(Path(bundle))
    scans = discover_scans(input_dir, raw_pattern, white_pattern, dark_pattern)
    name, version = str(model_name), str(model_version)
    prepare_output(output_dir, stale_seconds, log)
    scorer = ScanScorer(
        bundle, input_dir, output_dir, name, version, wavelength_tolerance_nm, stale_seconds=stale_seconds
    )
    table = SummaryTable(scorer, sample_of, log)
    started = _connect(ray, ray_address)
    try:
        n = _actor_count(ray, num_actors, use_gpu, len(scans))
        device = "cuda" if use_gpu else "cpu"
        args = (str(bundle.path.absolute()), str(input_dir), str(output_dir), name, version)
        args += (wavelength_tolerance_nm, stale_seconds, replace(engine, device=device))
        t0 = time.perf_counter()
        actors = _start_actors(ray, n, use_gpu, args)
        log(f"score: {len(scans)} scans on {n} Ray actors ({device})")
        try:
            _fan_out(ray, actors, scans, table, progress)
        finally:
            _stop_actors(ray, actors)
    finally:
        if started:
            ray.shutdown()
    return finish_run(table, time.perf_counter() - t0, log)
