"""Progress lines for long steps (extraction, training, scoring), at most one per stage every few seconds.

Every call also goes, not rate-limited, to the process's progress sink when one is set (the CLI's
terminal progress bar, :mod:`flows.progressbar`); none is set by default, nor in Ray workers.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

Sink = Callable[[str, int, int], None]
# the attribute LogProgress sets on its periodic (not final) lines: a live progress bar shows them instead
STEP = "lafite_progress_step"

_sink: Sink | None = None


def set_sink(sink: Sink | None) -> None:
    """Send every ``progress(stage, done, total)`` call of :class:`LogProgress` also to ``sink``."""
    global _sink
    _sink = sink


def clear_sink(sink: Sink) -> None:
    """Stop sending to ``sink`` if it is the current one."""
    global _sink
    if _sink == sink:
        _sink = None


def to_sink(stage: str, done: int, total: int) -> None:
    """Send one progress call to the sink only (no log line): for progress relayed from a Ray worker,
    whose own lines are already forwarded to the driver's output."""
    sink = _sink
    if sink is not None:
        sink(stage, done, total)


class QueuedProgress:
    """A worker-side ``progress(stage, done, total)`` that puts each call on a Ray queue (dropped when
    the queue is full), for :func:`wait_relaying` in the driver."""

    def __init__(self, queue) -> None:
        self.queue = queue

    def __call__(self, stage: str, done: int, total: int) -> None:
        from ray.util.queue import Full

        try:
            self.queue.put_nowait((stage, done, total))
        except Full:
            pass


def both(*callbacks) -> Callable[[str, int, int], None]:
    """One progress callback calling each of ``callbacks`` (None entries skipped)."""
    live = [c for c in callbacks if c is not None]

    def call(stage: str, done: int, total: int) -> None:
        for c in live:
            c(stage, done, total)

    return call


def relay_queue():
    """A Ray queue for a worker's progress when this process shows progress bars, else None."""
    if _sink is None:
        return None
    from ray.util.queue import Queue

    return Queue(maxsize=10_000, actor_options={"num_cpus": 0})


def wait_relaying(ref, queue, poll_s: float = 0.5):
    """``ray.get(ref)``, passing what the worker put on ``queue`` to the progress sink meanwhile."""
    import ray

    try:
        while True:
            ready, _ = ray.wait([ref], timeout=poll_s)
            if queue is not None and queue.qsize():
                for item in queue.get_nowait_batch(queue.qsize()):
                    to_sink(*item)
            if ready:
                return ray.get(ref)
    finally:
        if queue is not None:
            queue.shutdown()


class LogProgress:
    """A ``progress(stage, done, total)`` callback that logs rate-limited progress lines."""

    def __init__(self, logger: logging.Logger | logging.LoggerAdapter | None = None, every_s: float = 5.0) -> None:
        self.log = logger or logging.getLogger("lafite.progress")
        self.every_s = every_s
        self.started: dict[str, float] = {}
        self.last: dict[str, float] = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        sink = _sink
        if sink is not None:
            sink(stage, done, total)
        now = time.monotonic()
        start = self.started.setdefault(stage, now)
        final = total > 0 and done >= total
        if not final and now - self.last.get(stage, 0.0) < self.every_s:
            return
        self.last[stage] = now
        elapsed = now - start
        mark = {STEP: not final}
        if total > 0:
            eta = elapsed / max(done, 1) * (total - done)
            self.log.info("%s: %d/%d (%.0f%%) %.0fs elapsed, ~%.0fs left", stage, done, total,
                          100 * done / total, elapsed, eta, extra=mark)
        else:
            self.log.info("%s: %d done, %.0fs elapsed", stage, done, elapsed, extra=mark)


def run_logger() -> logging.Logger | logging.LoggerAdapter:
    """Prefect's run logger inside a flow or task run, else the module logger."""
    try:
        from prefect import get_run_logger

        return get_run_logger()
    except Exception:  # outside a run context (e.g. inside a Ray worker)
        return logging.getLogger("lafite")


def worker_logger(name: str) -> logging.Logger:
    """A logger that prints INFO lines from a Ray worker (Ray forwards them to the driver's output)."""
    logger = logging.getLogger(name)
    logger.setLevel(logging.INFO)
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.propagate = False
    return logger
