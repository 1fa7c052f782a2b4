"""What a person sees on the console while the pipeline runs.

By default: chemmap's own lines (a progress bar or a line per stage, one line per epoch per
fold, the closing summary) and nothing else. Ray's workers and services, and MLflow, keep
their output in their own logs (Ray's: ``<ray temp dir>/session_latest/logs``, e.g.
``/tmp/ray/session_latest/logs``), and the libraries' Python warnings are dropped; with
``-v`` all of it is shown on the console as well.

The epoch lines do not depend on Ray forwarding worker output: rank 0 sends them to the
driver (:mod:`chemmap.train.feed`), which prints them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any

_verbosity = 0


def set_verbosity(level: int) -> None:
    """0: chemmap's lines only; 1 or more (``-v``): also Ray's, MLflow's and Python's warnings.

    Call it before the libraries start (MLflow reads its level once, on import; Ray when
    ``ray.init`` runs). ``MLFLOW_LOGGING_LEVEL`` set by the user is left alone.
    """
    global _verbosity
    _verbosity = max(0, int(level))
    level_name = "INFO" if _verbosity else "WARNING"
    # Python warnings of the libraries (e.g. MLflow's advice to a pyfunc's author, on every
    # model logged, which MLflow shows "once" past any filter) go to the ``py.warnings``
    # logger, which drops them unless -v; chemmap itself says what matters in its lines.
    logging.captureWarnings(not _verbosity)
    py_warnings = logging.getLogger("py.warnings")
    py_warnings.propagate = bool(_verbosity)
    if not _verbosity and not py_warnings.handlers:
        py_warnings.addHandler(logging.NullHandler())
    if "MLFLOW_LOGGING_LEVEL" not in os.environ:
        os.environ["MLFLOW_LOGGING_LEVEL"] = level_name
        if "mlflow" in sys.modules:
            logging.getLogger("mlflow").setLevel(level_name)


def verbosity() -> int:
    """The level set by :func:`set_verbosity` (0 unless a command asked for more)."""
    return _verbosity


def ray_init_options() -> dict[str, Any]:
    """``ray.init`` arguments for the console: workers' output and Ray's INFO lines only with ``-v``.

    ``log_to_driver=False`` keeps every actor's output (Ray Train's controller and workers,
    the placement group cleaner) out of the driver's console; it stays in Ray's log files.
    """
    return {
        "log_to_driver": _verbosity > 0,
        "logging_level": logging.INFO if _verbosity else logging.ERROR,
    }


@contextlib.contextmanager
def keep_sigterm_handler() -> Iterator[None]:
    """Around ``ray.init``: SIGTERM's handler is put back as it was before.

    ``ray.init`` replaces it twice over (a Python handler that calls ``sys.exit``, then Ray's
    C++ one, which prints a stack dump and aborts the process), so a driver that systemd or
    Kubernetes tells to stop would die without its cleanup; ``chemmap``'s commands stop
    cleanly instead (:func:`chemmap.cli.graceful_stop`). Python allows handlers in the main
    thread only; elsewhere this does nothing.
    """
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if main else None
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def stage_bar(description: str, total: int, enabled: bool = True) -> Iterator[Any]:
    """One progress bar for a stage whose work comes in parts: yields ``tick()``, one step each.

    A stage shows one bar however many loops it runs (e.g. evaluate's out-of-fold maps, then
    its test scans); with ``enabled`` false the ticks do nothing.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        disable=not enabled,
    )
    with bar:
        task = bar.add_task(description, total=total)
        yield lambda: bar.advance(task)
