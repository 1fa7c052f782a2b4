"""Rank 0's epoch lines on the driver's console, without Ray's worker output.

The driver starts Ray with ``log_to_driver=False`` by default (:mod:`chemmap.console`): what
workers print stays in Ray's log files. The one line per epoch a person wants to see travels
instead through a Ray queue: rank 0 puts it there (:func:`send`), and the driver, while
``trainer.fit()`` blocks, takes the lines out in a thread and prints them with the stage's
``log``. :meth:`EpochFeed.flush` prints what is left before the driver writes its own next
line, so the order on the console is the order of events.
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

    def __init__(self, log: Log) -> None:
        from ray.util.queue import Queue

        self.log = log
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
            for line in self.queue.get_nowait_batch(n) if n else []:
                self.log(str(line))

    def _run(self) -> None:
        while not self._stop.wait(_POLL_SECONDS):
            try:
                self.flush()
            except Exception:  # the feed must never break training; the lines stay queued
                _logger.debug("epoch feed: could not read the queue", exc_info=True)


def send(queue: Any, line: str) -> None:
    """On a worker: ``line`` to the driver's console (through ``queue``) and to Ray's worker log.

    Without a queue (the loop run outside chemmap's trainer) the line is printed, as before.
    """
    if queue is None:
        print(line, flush=True)
        return
    _logger.info(line)  # Ray Train's worker log file (and the console with -v)
    try:
        queue.put(line)
    except Exception:  # a lost console line must not fail the fold
        _logger.warning("epoch feed: could not send a line to the driver", exc_info=True)
