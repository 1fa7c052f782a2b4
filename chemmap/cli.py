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
