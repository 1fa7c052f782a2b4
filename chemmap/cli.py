"""The ``chemmap`` command line: parses, then calls one library function per command.

Heavy libraries (Dask, Zarr, torch, Ray, MLflow) are imported inside the commands, so
``chemmap --help`` answers at once.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

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


def _load(config: Path | None, overrides: list[str] | None):
    from chemmap.config import load_config

    return load_config(config, overrides or [])


@app.command()
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
def preprocess(config: ConfigArg, set_: SetOpt = None, quiet: QuietOpt = False) -> None:
    """Ingest and preprocess the scans into dataset.zarr (Dask, chunk-parallel)."""
    from chemmap.pipeline import preprocess_stage

    stage = preprocess_stage(_load(config, set_), progress=not quiet)
    typer.echo(str(stage.path / "dataset.zarr"))


@app.command()
def train(config: ConfigArg, set_: SetOpt = None, quiet: QuietOpt = False) -> None:
    """Train the U-Net fold ensemble with Ray Train (DDP), tracked in MLflow."""
    from chemmap.pipeline import train_stage

    stage = train_stage(_load(config, set_), progress=not quiet)
    typer.echo(str(stage.path))


@app.command()
def evaluate(config: ConfigArg, set_: SetOpt = None, quiet: QuietOpt = False) -> None:
    """Compare the trained ensemble with the PLS baseline on the test split; write the report."""
    from chemmap.pipeline import evaluate_stage

    stage = evaluate_stage(_load(config, set_), progress=not quiet)
    typer.echo(str(stage.path / "summary.html"))


@app.command()
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
    ray_address: Annotated[
        str | None, typer.Option(help="Score on Ray actors at this address (or auto).")
    ] = None,
    actors: Annotated[int | None, typer.Option(help="Ray actors (default: one per CPU, or GPU).")] = None,
    gpu: Annotated[bool, typer.Option(help="One GPU per Ray actor.")] = False,
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
        options=ScoreOptions(watch, poll, settle, ray_address, actors, gpu),
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


@app.command()
def run(
    config: ConfigArg,
    set_: SetOpt = None,
    until: Annotated[str | None, typer.Option(help="Stop after this stage.")] = None,
    quiet: QuietOpt = False,
) -> None:
    """Run the whole pipeline; finished stages are skipped, interrupted ones resume."""
    from chemmap.pipeline import STAGES
    from chemmap.pipeline import run as run_pipeline

    out = run_pipeline(_load(config, set_), until=until or STAGES[-1], progress=not quiet)
    for name, path in out.items():
        typer.echo(f"{name}: {path}")


def main() -> None:
    """Entry point: user errors become one line on stderr and exit status 2."""
    try:
        app()
    except ChemmapError as err:
        typer.secho(f"error: {err}", err=True, fg="red")
        sys.exit(2)


if __name__ == "__main__":
    main()
