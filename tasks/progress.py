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
