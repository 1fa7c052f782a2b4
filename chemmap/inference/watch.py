"""Scoring scans as they arrive: a scanner's folder watched, each scan scored once it is whole.

:func:`watch_folder` looks at the folder every ``poll_seconds`` and scores, with the same
scorer as :func:`chemmap.inference.score.score_folder` (same maps, pictures and rows, same
locks, so it can run beside other scorers), every scan that is *ready*:

- its files (raw, white and dark headers and data files, and the mask image when the recipe
  reads one) have kept their sizes and modification times for ``settle_seconds``: seen
  unchanged for that long, or, when first seen, last modified that long ago;
- its raw header parses and its data file has the size the header implies
  (:func:`chemmap.io.open_scan`);
- with ``calibration: white_dark``, its white and dark references exist, parse and have
  their full size too.

A scan still being written is never scored half; one that settled but is not ready (a
truncated file, a header that does not parse, a missing reference) gets one ``waiting`` line
in the log and is looked at again at every poll. Once its files have stayed as they are for
``give_up_seconds`` (measured like ``settle_seconds``) and it is still not ready, the watcher
gives up on it: an error row in ``summary.csv`` names the file and why, as
:func:`chemmap.inference.score.score_folder` records a bad scan. A scan is handled once for the
files it has: scored (``ok``), skipped (its map is up to date), failed or given up on (an
error row); it is looked at again only when one of its files changes (a scan given up on and
then completed is scored, and its row replaces the error). A scan another scorer holds
(``busy``) is tried again at the next poll.

The loop ends when ``stop`` says so, or on SIGINT or SIGTERM (handlers are installed only
when it runs in the main thread, and the old ones are put back when it ends): the scan
being scored is finished, the tables are written, and :func:`watch_folder` returns. A
second signal interrupts at once (``KeyboardInterrupt``; a staged map is then removed).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType

from chemmap.errors import InputError
from chemmap.inference.bundle import ModelBundle
from chemmap.inference.score import (
    Engine,
    ScanScorer,
    ScoreSummary,
    SummaryTable,
    check_score_inputs,
    finish_run,
    input_files_key,
    prepare_output,
)
from chemmap.inference.score_output import DEFAULT_STALE_SECONDS
from chemmap.io import ScanFiles, discover_scans, open_scan
from chemmap.io.envi import find_data_file
from chemmap.io.layout import SCAN_ID, SPECIM_RAW_PATTERN

__all__ = ["DEFAULT_GIVE_UP_SECONDS", "Stop", "StopFlag", "check_ready", "stop_on_signals", "watch_folder"]

Log = Callable[[str], None]
Stop = threading.Event | Callable[[], bool]
Key = dict[str, list[int]]

DEFAULT_GIVE_UP_SECONDS = 300.0  # a scan unchanged and unreadable this long gets an error row


class StopFlag:
    """Set by a signal or by the caller's ``stop`` (an event, or a callable that returns True).

    Args:
        stop: the caller's stop, None for signals only.
    """

    def __init__(self, stop: Stop | None = None) -> None:
        if stop is not None and not (isinstance(stop, threading.Event) or callable(stop)):
            raise InputError(f"stop must be a threading.Event or a callable, got {type(stop).__name__}")
        self._stop = stop
        self._event = threading.Event()
        self.signal: str | None = None  # the name of the signal that set it

    def set(self, signal_name: str | None = None) -> None:
        self.signal = signal_name
        self._event.set()

    def is_set(self) -> bool:
        if self._event.is_set():
            return True
        if isinstance(self._stop, threading.Event):
            return self._stop.is_set()
        return bool(self._stop()) if self._stop is not None else False

    def wait(self, seconds: float) -> bool:
        """Sleep up to ``seconds``, waking within 0.05 s of being set; returns :meth:`is_set`."""
        deadline = time.monotonic() + seconds
        while not self.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self._event.wait(min(left, 0.05))
        return True


@contextlib.contextmanager
def stop_on_signals(flag: StopFlag) -> Iterator[None]:
    """SIGINT and SIGTERM set ``flag`` (a second one raises ``KeyboardInterrupt``).

    The handlers are installed only in the main thread (Python allows no other), and the
    previous ones are restored on the way out.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        if flag.is_set():
            raise KeyboardInterrupt
        flag.set(signal.Signals(signum).name)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def check_ready(files: ScanFiles, input_dir: Path, *, calibrated: bool, mask_file: Path | None = None) -> Key:
    """Whether a scan's files are whole: headers parse, data files have their full size.

    Args:
        files: the scan's headers (:func:`chemmap.io.discover_scans`).
        input_dir: the folder the scan was found in.
        calibrated: the recipe needs white and dark references.
        mask_file: the scan's mask image, if the recipe reads one (not required here:
            without it the scan fails with an error row that names it).

    Returns:
        The scan's input files ``{path: [bytes, mtime ns]}`` (:func:`input_files_key`).

    Raises:
        InputError: why the scan is not ready (a data file missing, or of another size than
            its header implies; a header that does not parse; a missing reference).
    """
    key = input_files_key(files, input_dir, mask_file)
    open_scan(files.raw)
    for kind, header, searched in (
        ("white", files.white, files.white_searched),
        ("dark", files.dark, files.dark_searched),
    ):
        if header is not None:
            open_scan(header)
        elif calibrated:
            raise InputError(f"{files.raw}: no {kind} reference yet (looked for {searched or kind})")
    return key


def _files_now(files: ScanFiles, input_dir: Path, mask_file: Path | None) -> Key:
    """The scan's files that exist now, as :func:`input_files_key` writes them (which it equals
    once every data file is there): a scan whose data file is missing still has a state that
    can stay unchanged, and be given up on."""
    headers = [p for p in (files.raw, files.white, files.dark) if p is not None]
    paths = list(headers)
    for header in headers:
        with contextlib.suppress(InputError):  # not written yet: check_ready says so
            paths.append(find_data_file(header))
    if mask_file is not None and mask_file.is_file():
        paths.append(mask_file)
    key = {}
    for path in paths:
        st = path.stat()
        key[Path(os.path.relpath(path, input_dir)).as_posix()] = [int(st.st_size), int(st.st_mtime_ns)]
    return key


def _newest_mtime_ns(key: Key) -> int:
    return max(mtime for _, mtime in key.values())


class _Arrivals:
    """What the folder holds at each poll: the scans that are ready, and those given up on.

    A scan's files are *unchanged for* the seconds since this watcher first saw them as they
    are, or, when it first sees a scan whose newest file is older than ``settle_s``, since that
    file's modification (a scan left from before the watcher started counts from its files'
    age, so a broken one is given up on at once when that age exceeds ``give_up_s``).
    """

    def __init__(
        self,
        scorer: ScanScorer,
        patterns: tuple[str | None, ...],
        settle_s: float,
        give_up_s: float,
        log: Log,
    ) -> None:
        self.scorer, self.patterns, self.log = scorer, patterns, log
        self.settle_s, self.give_up_s = settle_s, give_up_s
        self.calibrated = scorer.recipe.config.calibration == "white_dark"
        self.seen: dict[str, tuple[Key, float]] = {}  # scan -> (its files, unchanged since, monotonic s)
        self.handled: dict[str, Key] = {}  # scan -> its files when it was scored, skipped or failed
        self._said: dict[str, object] = {}  # what was last logged about a scan (or the folder)

    def _say_once(self, what: str, about: object, line: str) -> None:
        if self._said.get(what) != about:
            self._said[what] = about
            self.log(line)

    def _discover(self) -> list[ScanFiles]:
        try:
            scans = discover_scans(self.scorer.input_dir, *self.patterns)
        except InputError as err:  # none yet, or a layout problem someone may fix
            self._say_once("", str(err), f"score: waiting: {err}")
            return []
        self._said.pop("", None)
        return scans

    def _unchanged_for(self, sid: str, key: Key, now: float) -> float:
        """Seconds the scan's files have stayed as ``key`` says (see the class's docstring)."""
        before = self.seen.get(sid)
        if before is not None and before[0] == key:
            return now - before[1]
        age = (time.time_ns() - _newest_mtime_ns(key)) / 1e9
        since = now - age if before is None and age >= self.settle_s else now
        self.seen[sid] = (key, since)
        return now - since

    def _give_up(self, files: ScanFiles, unchanged_s: float, reason: str) -> str:
        """The error of a scan given up on: why it is not readable, naming the file."""
        if not any(str(p) in reason for p in (files.raw, files.white, files.dark) if p is not None):
            reason = f"{files.raw}: {reason}"
        return (
            f"gave up waiting for the scan to become readable: its files stayed unchanged for "
            f"{unchanged_s:.0f} s (give-up time {self.give_up_s:g} s) and {reason}"
        )

    def poll(self) -> tuple[list[tuple[ScanFiles, Key]], list[tuple[ScanFiles, Key, str]]]:
        """The scans not yet handled with the files they have now: those ready, and those
        given up on (with the error for their row)."""
        ready, given_up = [], []
        now = time.monotonic()
        for files in self._discover():
            sid = files.scan_id
            mask_file = self.scorer.mask_file(sid)
            try:
                key = _files_now(files, self.scorer.input_dir, mask_file)
            except OSError:  # a file removed or replaced between the listing and now
                continue
            if self.handled.get(sid) == key:
                continue
            unchanged_s = self._unchanged_for(sid, key, now)
            if unchanged_s < self.settle_s:
                continue
            try:
                key = check_ready(
                    files, self.scorer.input_dir, calibrated=self.calibrated, mask_file=mask_file
                )
            except (InputError, OSError) as err:
                reason = " ".join(str(err).split()) or type(err).__name__
                if unchanged_s >= self.give_up_s:
                    given_up.append((files, key, self._give_up(files, unchanged_s, reason)))
                else:
                    self._say_once(sid, key, f"score: waiting for {sid}: {reason}")
                continue
            ready.append((files, key))
        return ready, given_up


def _check_watch_args(
    raw_pattern: str | None, poll_seconds: float, settle_seconds: float, give_up_seconds: float
) -> None:
    if not poll_seconds > 0:
        raise InputError(f"poll_seconds must be > 0 s, got {poll_seconds}")
    if not settle_seconds >= 0:
        raise InputError(f"settle_seconds must be >= 0 s, got {settle_seconds}")
    if not give_up_seconds >= settle_seconds:  # also refuses NaN
        raise InputError(
            f"give_up_seconds must be >= settle_seconds ({settle_seconds:g} s): a scan is given up on "
            f"only once its files have settled; got {give_up_seconds}"
        )
    pattern = SPECIM_RAW_PATTERN if raw_pattern is None else raw_pattern
    if SCAN_ID not in pattern:
        raise InputError(f"raw_pattern {pattern!r} must contain {SCAN_ID}")


def _watch(
    scorer: ScanScorer, table: SummaryTable, arrivals: _Arrivals, flag: StopFlag, poll_s: float
) -> None:
    """Poll, score what is ready, record what was given up on, write the tables; until ``flag`` is set."""
    while not flag.is_set():
        ready, given_up = arrivals.poll()
        for files, key, error in given_up:
            table.add(scorer.error_outcome(files.scan_id, error), write=False)  # logs a "failed" line
            arrivals.handled[files.scan_id] = key
        for files, key in ready:
            if flag.is_set():
                break
            outcome = scorer.score(files)
            table.add(outcome)
            if outcome.status != "busy":
                arrivals.handled[files.scan_id] = key
            if outcome.status == "ok":
                table.log(f"score: {files.scan_id} scored in {outcome.row['seconds']} s")
        table.flush()
        flag.wait(poll_s)
    table.log(f"score: stopping ({flag.signal or 'asked to'}), no scan left half done")


def watch_folder(
    bundle: ModelBundle,
    input_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    model_name: str,
    model_version: str,
    raw_pattern: str | None = None,
    white_pattern: str | None = None,
    dark_pattern: str | None = None,
    samples_csv: str | os.PathLike | None = None,
    wavelength_tolerance_nm: float = 1.0,
    poll_seconds: float = 2.0,
    settle_seconds: float = 5.0,
    give_up_seconds: float = DEFAULT_GIVE_UP_SECONDS,
    stale_seconds: float = DEFAULT_STALE_SECONDS,
    engine: Engine = Engine(),
    stop: Stop | None = None,
    log: Log = print,
) -> ScoreSummary:
    """Keep scoring the scans of a scanner's folder as they arrive (see the module's docstring).

    Args:
        bundle, input_dir, output_dir, model_name, model_version, raw_pattern, white_pattern,
            dark_pattern, samples_csv, wavelength_tolerance_nm, stale_seconds, engine: as for
            :func:`chemmap.inference.score.score_folder`. The input folder may be empty at
            the start.
        poll_seconds: how often the folder is looked at (s, > 0).
        settle_seconds: how long a scan's files must stay unchanged before it is scored (s, >= 0).
        give_up_seconds: how long a scan's files may stay unchanged while it is still not
            readable (a header that does not parse, a data file shorter or longer than its
            header implies, a missing reference) before it gets an error row saying why
            (s, >= ``settle_seconds``; ``math.inf``: wait for ever). Default 300.
        stop: a ``threading.Event`` or a callable returning True to end the loop (checked
            between scans and every 0.05 s while waiting); SIGINT and SIGTERM end it too.
        log: where a line per scored, failed (or given up on), busy or waiting scan and the
            closing line go.

    Returns:
        What this watch did, over all its polls (a scan counted once, by its last outcome).

    Raises:
        InputError: a bad argument, no input folder, or an unreadable scan -> sample table.
    """
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    sample_of = check_score_inputs(
        input_dir,
        samples_csv=samples_csv,
        wavelength_tolerance_nm=wavelength_tolerance_nm,
        stale_seconds=stale_seconds,
    )
    _check_watch_args(raw_pattern, poll_seconds, settle_seconds, give_up_seconds)
    flag = StopFlag(stop)
    prepare_output(output_dir, stale_seconds, log)
    scorer = ScanScorer(
        bundle,
        input_dir,
        output_dir,
        str(model_name),
        str(model_version),
        wavelength_tolerance_nm,
        stale_seconds=stale_seconds,
        engine=engine,
    )
    table = SummaryTable(scorer, sample_of, log)
    patterns = (raw_pattern, white_pattern, dark_pattern)
    arrivals = _Arrivals(scorer, patterns, settle_seconds, give_up_seconds, log)
    log(
        f"score: watching {input_dir} every {poll_seconds:g} s (a scan is scored once its files are "
        f"unchanged for {settle_seconds:g} s, given up on when still unreadable after "
        f"{give_up_seconds:g} s); SIGINT or SIGTERM stops after the current scan"
    )
    t0 = time.perf_counter()
    with stop_on_signals(flag):
        _watch(scorer, table, arrivals, flag, poll_seconds)
    return finish_run(table, time.perf_counter() - t0, log)
