"""The ``chemmap`` command line: parses, then calls one library function per command.

Heavy libraries (Dask, Zarr, torch, Ray, MLflow) are imported inside the commands, so
``chemmap --help`` answers at once.
"""

from __future__ import annotations

import contextlib
import functools
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

from chemmap.errors import ChemmapError

app = typer.Typer(
    name="chemmap",
    help="Hyperspectral scans -> chemical maps (Dask/Zarr preprocessing, U-Net, MLflow).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ConfigArg = Annotated[Path, typer.Argument(help="Pipeline YAML, e.g. pipelines/pork_belly.yaml.")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a config key: --set preprocess.bin=2 (repeatable)."),
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]


class Stopped(KeyboardInterrupt):
    """SIGTERM arrived: raised where the command is, so that every ``finally`` runs."""


@contextlib.contextmanager
def graceful_stop() -> Iterator[None]:
    """SIGTERM (what systemd and Kubernetes send) stops a command as Ctrl-C does, cleanly.

    The command stops where it is, through its cleanup: the unfinished stage stays
    unfinished (no completion marker), a half-written file or map is removed, the pipeline's
    MLflow run is marked KILLED, Ray is shut down with the process. What was finished stays:
    finished stages, the folds' checkpoints (the epoch in progress is lost), scored maps. One
    line says so; the exit status is 128 + the signal's number (143, 130 for Ctrl-C).
    """
    caught: list[int] = []

    def handler(signum: int, frame: Any) -> None:
        caught.append(signum)
        raise Stopped(signal.Signals(signum).name)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    except KeyboardInterrupt:  # Stopped, or Ctrl-C; Ray turns either into a plain KeyboardInterrupt
        signum = caught[0] if caught else signal.SIGINT
        typer.secho(
            f"stopped by {signal.Signals(signum).name}: what was finished is kept (finished stages, "
            "fold checkpoints, scored maps); run the same command again to resume",
            err=True,
            fg="yellow",
        )
        raise typer.Exit(128 + signum) from None
    finally:
        signal.signal(signal.SIGTERM, previous)


def stoppable(command: Callable[..., Any]) -> Callable[..., Any]:
    """A command that stops cleanly on SIGTERM (:func:`graceful_stop`)."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with graceful_stop():
            return command(*args, **kwargs)

    return wrapper


def _load(config: Path | None, overrides: list[str] | None):
    from chemmap.config import load_config

    return load_config(config, overrides or [])


@app.command()
@stoppable
def synth(
    out: Annotated[Path, typer.Argument(help="Folder to write the scanner's output into.")],
    config: Annotated[Path | None, typer.Option(help="Take the synth: section of this pipeline.")] = None,
    set_: SetOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Write a synthetic line-scan scanner's output (ENVI scans, references, truth maps)."""
    from chemmap.synth import SynthSpec, synthesize

    cfg = _load(config, set_)
    root = synthesize(out, SynthSpec.from_config(cfg.synth), progress=not quiet)
    typer.echo(f"wrote {root}")


@app.command()
@stoppable
def preprocess(config: ConfigArg, set_: SetOpt = None, quiet: QuietOpt = False) -> None:
    """Ingest and preprocess the scans into dataset.zarr (Dask, chunk-parallel)."""
    from chemmap.pipeline import preprocess_stage

    stage = preprocess_stage(_load(config, set_), progress=not quiet)
    typer.echo(str(stage.path / "dataset.zarr"))


@app.command()
@stoppable
def train(config: ConfigArg, set_: SetOpt = None, quiet: QuietOpt = False) -> None:
    """Train the U-Net fold ensemble with Ray Train (DDP), tracked in MLflow."""
    from chemmap.pipeline import train_stage

    stage = train_stage(_load(config, set_), progress=not quiet)
    typer.echo(str(stage.path))


@app.command()
@stoppable
def evaluate(config: ConfigArg, set_: SetOpt = None, quiet: QuietOpt = False) -> None:
    """Compare the trained ensemble with the PLS baseline on the test split; write the report."""
    from chemmap.pipeline import evaluate_stage

    stage = evaluate_stage(_load(config, set_), progress=not quiet)
    typer.echo(str(stage.path / "summary.html"))


@app.command()
@stoppable
def register(config: ConfigArg, set_: SetOpt = None) -> None:
    """Log the evaluated ensemble to MLflow and register it (champion / challenger)."""
    from chemmap.pipeline import register_stage

    stage = register_stage(_load(config, set_))
    s = stage.summary()
    typer.echo(f"models:/{s['name']}/{s['version']} ({s['alias']})")


TrackingOpt = Annotated[
    str | None,
    typer.Option("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, or --config's)."),
]
PipelineOpt = Annotated[
    Path | None, typer.Option("--config", help="A pipeline YAML: its tracking URI and scanner layout.")
]


@app.command()
@stoppable
def score(
    input_dir: Annotated[Path, typer.Argument(help="A scanner's output folder (ENVI scans and references).")],
    model: Annotated[
        str, typer.Option("--model", "-m", help="models:/NAME@champion, models:/NAME/3, or a model folder.")
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="Where the maps and summary.csv go.")],
    tracking_uri: TrackingOpt = None,
    config: PipelineOpt = None,
    set_: SetOpt = None,
    samples: Annotated[
        Path | None, typer.Option(help="CSV scan_id,sample_id: also write samples.csv.")
    ] = None,
    wavelength_tolerance: Annotated[
        float, typer.Option(help="nm a scan's bands may drift (resampled).")
    ] = 1.0,
    watch: Annotated[
        bool, typer.Option(help="Keep scoring new scans as they arrive (stop: Ctrl-C).")
    ] = False,
    poll: Annotated[float, typer.Option(help="With --watch: seconds between looks at the folder.")] = 2.0,
    settle: Annotated[
        float, typer.Option(help="With --watch: seconds a scan's files must stay unchanged.")
    ] = 5.0,
    give_up: Annotated[
        float, typer.Option(help="With --watch: seconds unchanged and unreadable before an error row.")
    ] = 300.0,
    ray_address: Annotated[
        str | None, typer.Option(help="Score on Ray actors at this address (or auto).")
    ] = None,
    actors: Annotated[int | None, typer.Option(help="Ray actors (default: one per CPU, or GPU).")] = None,
    gpu: Annotated[bool, typer.Option(help="Run the model on a GPU (one per Ray actor).")] = False,
    mode: Annotated[
        str, typer.Option(help="exact (the whole-image map), gaussian or constant (blended windows).")
    ] = "exact",
    amp: Annotated[bool, typer.Option(help="With --gpu: bf16 autocast (output heads in fp32).")] = False,
    quiet: QuietOpt = False,
) -> None:
    """Score every scan in a folder with a registered model: maps, PNGs, summary.csv."""
    from chemmap.pipeline import ScoreOptions, score_scans

    cfg = _load(config, set_) if config is not None else None
    result = score_scans(
        model,
        input_dir,
        output,
        tracking_uri=tracking_uri,
        cfg=cfg,
        samples=samples,
        wavelength_tolerance_nm=wavelength_tolerance,
        options=ScoreOptions(
            watch, poll, settle, ray_address, actors, gpu, give_up_seconds=give_up, mode=mode, amp=amp
        ),
        progress=not quiet,
    )
    if result.errors:
        raise typer.Exit(1)


@app.command()
def promote(
    name: Annotated[str, typer.Argument(help="Registered model name.")],
    version: Annotated[str, typer.Argument(help="Model version to move the alias to.")],
    alias: Annotated[str, typer.Option(help="The alias to move.")] = "champion",
    tracking_uri: TrackingOpt = None,
    config: PipelineOpt = None,
) -> None:
    """Move an alias (champion by default) to a model version by hand."""
    from chemmap.pipeline import promote_version

    promote_version(
        name, version, alias, tracking_uri=tracking_uri, cfg=_load(config, None) if config else None
    )
    typer.echo(f"models:/{name}@{alias} -> version {version}")


def _run_config_and_force(config: Path, extra: list[str], force: bool) -> tuple[Path, str | None]:
    """``chemmap run``'s config path and ``--force``'s optional stage (in either order; "" alone)."""
    from chemmap.errors import InputError
    from chemmap.pipeline import STAGES

    words = [str(config), *extra]
    stages = [w for w in words if w in STAGES]
    paths = [w for w in words if w not in STAGES]
    if len(paths) != 1 or len(stages) > 1 or (stages and not force):
        raise InputError(
            f"run: expected one config file and, after --force, at most one stage ({', '.join(STAGES)}); "
            f"got {' '.join(words)}"
        )
    return Path(paths[0]), (stages[0] if stages else "") if force else None


@app.command(context_settings={"allow_extra_args": True})
@stoppable
def run(
    ctx: typer.Context,
    config: ConfigArg,
    set_: SetOpt = None,
    start: Annotated[
        str | None, typer.Option("--from", help="Start at this stage; the ones before must have finished.")
    ] = None,
    until: Annotated[
        str | None, typer.Option("--to", "--until", help="Stop after this stage (default: score).")
    ] = None,
    force: Annotated[
        bool,
        typer.Option(
            "--force", help="--force STAGE: make STAGE and the ones after it again; --force alone: all."
        ),
    ] = False,
    verbose: Annotated[
        int, typer.Option("--verbose", "-v", count=True, help="Also show Ray's and MLflow's output.")
    ] = 0,
    quiet: QuietOpt = False,
) -> None:
    """Run the pipeline: synth, preprocess, train, evaluate, register, score; then a summary.

    Finished stages are skipped, interrupted ones resume; Ray's and MLflow's output only with -v.
    """
    from chemmap.console import set_verbosity
    from chemmap.pipeline import STAGES, run_summary
    from chemmap.pipeline import run as run_pipeline

    set_verbosity(verbose)
    config, force_from = _run_config_and_force(config, list(ctx.args), force)
    cfg = _load(config, set_)
    start = start or STAGES[0]
    force_stage = None if force_from is None else force_from or start  # --force alone: all that run
    out = run_pipeline(cfg, start=start, until=until or STAGES[-1], force=force_stage, progress=not quiet)
    typer.echo("\n".join(run_summary(out)))


AddressOpt = Annotated[
    str | None,
    typer.Option(
        "--address",
        help="The Ray cluster's dashboard, http://HOST:8265 (default: RAY_API_SERVER_ADDRESS, else "
        "RAY_ADDRESS). A cluster with token authentication needs RAY_AUTH_MODE=token and its token here.",
    ),
]
JobArg = Annotated[str, typer.Argument(help="The job's submission id (raysubmit_...), as submit printed it.")]


@app.command()
def submit(
    config: ConfigArg,
    address: AddressOpt = None,
    set_: SetOpt = None,
    working_dir: Annotated[
        Path, typer.Option(help="Uploaded as the job's working directory (without .venv, runs, data...).")
    ] = Path("."),
) -> None:
    """Submit `chemmap run CONFIG` to a Ray cluster as a job; prints the job id.

    workdir: an absolute path on storage every node shares. Several nodes: an MLflow server.

    AWS_*, MLFLOW_S3_ENDPOINT_URL and MLflow server credentials go from this environment into the job.
    """
    from chemmap.cluster.jobs import submit as submit_job

    job_id = submit_job(config, address, set_, working_dir, log=lambda s: typer.echo(s, err=True))
    typer.echo(job_id)
    typer.echo(f"follow it: chemmap jobs logs {job_id} --follow", err=True)


jobs_app = typer.Typer(help="Ray jobs on a cluster: list, status, logs, stop.", no_args_is_help=True)
app.add_typer(jobs_app, name="jobs")


@jobs_app.command("list")
def jobs_list(address: AddressOpt = None) -> None:
    """Every job the cluster knows, oldest first: id, status, start, entrypoint."""
    import time

    from chemmap.cluster.jobs import list_jobs

    for j in list_jobs(address):
        start = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(j.start_time)) if j.start_time else "-"
        typer.echo(f"{j.job_id}  {j.status:<9}  {start}  {j.entrypoint}")


@jobs_app.command("status")
def jobs_status(job_id: JobArg, address: AddressOpt = None) -> None:
    """One job's status (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED) and Ray's message."""
    from chemmap.cluster.jobs import job_status

    j = job_status(address, job_id)
    typer.echo(f"{j.job_id} {j.status}" + (f": {j.message}" if j.message else ""))


@jobs_app.command("logs")
def jobs_logs(
    job_id: JobArg,
    address: AddressOpt = None,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Tail the logs until the job ends.")] = False,
) -> None:
    """A job's output; with --follow, as it comes, ending with the job's final status."""
    from chemmap.cluster.jobs import job_logs

    status = job_logs(address, job_id, lambda s: typer.echo(s, nl=False), follow=follow)
    if follow:
        typer.echo(f"{job_id} {status}", err=True)


@jobs_app.command("stop")
def jobs_stop(job_id: JobArg, address: AddressOpt = None) -> None:
    """Ask Ray to stop a job."""
    from chemmap.cluster.jobs import stop_job

    stopped = stop_job(address, job_id)
    typer.echo(f"{job_id}: {'stopping' if stopped else 'had already ended'}")


def main() -> None:
    """Entry point: user errors and a full disk become one line on stderr and exit status 2."""
    from chemmap.stages import OUT_OF_SPACE

    try:
        app()
    except ChemmapError as err:
        typer.secho(f"error: {err}", err=True, fg="red")
        sys.exit(2)
    except OSError as err:
        if err.errno not in OUT_OF_SPACE:
            raise
        typer.secho(f"error: {err.filename or 'a write'}: {err.strerror}", err=True, fg="red")
        sys.exit(2)


if __name__ == "__main__":
    main()
