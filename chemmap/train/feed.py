"""Rank 0's epoch lines on the driver's console, without Ray's worker output.

The driver starts Ray with ``log_to_driver=False`` by default (:mod:`chemmap.console`): what
workers print stays in Ray's log files. The one line per epoch a person wants to see travels
instead through a Ray queue: rank 0 puts it there (:func:`send`), and the driver, while
``trainer.fit()`` blocks, takes the lines out in a thread and prints them with the stage's
``log``. :meth:`EpochFeed.flush` prints what is left before the driver writes its own next
line, so the order on the console is the order of events. The line that starts a fold also
tells the driver which fold is training (:attr:`EpochFeed.fold`), for its error messages,
and :func:`send_done` tells it which checkpoint a finished fold ended with
(``on_fold_done``), so the driver writes that fold's results while the next one trains.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

Log = Callable[[str], None]

_POLL_SECONDS = 0.5
_logger = logging.getLogger("chemmap.train")


class EpochFeed:
    """A queue from the workers to the driver's ``log``, drained in a thread while folds train.

    Use as a context manager around the folds; pass :attr:`queue` to the workers.
    """

    def __init__(self, log: Log, on_fold_done: Callable[[int, str], None] | None = None) -> None:
        from ray.util.queue import Queue

        self.log = log
        self.on_fold_done = on_fold_done  # (fold, checkpoint name), called in the feed's thread
        self.fold: int | None = None  # the fold whose start line came last
        self.queue = Queue(actor_options={"num_cpus": 0})
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="chemmap-epoch-feed", daemon=True)

    def __enter__(self) -> EpochFeed:
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        try:
            self.flush()
        except Exception:
            if exc_type is None:  # while training fails, its error is the one to see
                raise
        finally:
            self.queue.shutdown(force=True)  # drained: nothing left to wait for

    def flush(self) -> None:
        """Print every line sent so far (call it after ``fit()`` returns)."""
        with self._lock:
            n = self.queue.size()
            for item in self.queue.get_nowait_batch(n) if n else []:
                if isinstance(item, dict):  # a fold ended (send_done)
                    if self.on_fold_done is not None:
                        self._fold_done(item["fold"], item["checkpoint"])
                    continue
                if isinstance(item, tuple):  # (fold, line): a fold starts
                    self.fold, item = item
                self.log(str(item))

    def _fold_done(self, fold: int, checkpoint: str) -> None:
        assert self.on_fold_done is not None
        try:
            self.on_fold_done(fold, checkpoint)
        except Exception:  # the driver writes it again after training: a warning, not a failure
            _logger.warning("could not write fold %s's results yet", fold, exc_info=True)

    def _run(self) -> None:
        while not self._stop.wait(_POLL_SECONDS):
            try:
                self.flush()
            except Exception:  # the feed must never break training; the lines stay queued
                _logger.debug("epoch feed: could not read the queue", exc_info=True)


def send_done(queue: Any, fold: int, checkpoint: str) -> None:
    """On rank 0: ``fold`` has ended with the checkpoint named ``checkpoint`` (its folder in the run)."""
    try:
        queue.put({"fold": fold, "checkpoint": checkpoint})
    except Exception:  # the driver reads the fold from the last checkpoint after training
        _logger.warning("epoch feed: could not tell the driver that fold %s ended", fold, exc_info=True)


def send(queue: Any, line: str, fold: int | None = None) -> None:
    """On a worker: ``line`` to the driver's console (through ``queue``) and to Ray's worker log.

    ``fold``: the line starts that fold (:attr:`EpochFeed.fold`). Without a queue (the loop
    run outside chemmap's trainer) the line is printed, as before.
    """
    if queue is None:
        print(line, flush=True)
        return
    _logger.info(line)  # Ray Train's worker log file (and the console with -v)
    try:
        queue.put(line if fold is None else (fold, line))
    except Exception:  # a lost console line must not fail the fold
        _logger.warning("epoch feed: could not send a line to the driver", exc_info=True)
