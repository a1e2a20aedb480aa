"""Progress lines for long steps (extraction, training, scoring), at most one per stage every few seconds."""

from __future__ import annotations

import logging
import time


class LogProgress:
    """A ``progress(stage, done, total)`` callback that logs rate-limited progress lines."""

    def __init__(self, logger: logging.Logger | logging.LoggerAdapter | None = None, every_s: float = 5.0) -> None:
        self.log = logger or logging.getLogger("lafite.progress")
        self.every_s = every_s
        self.started: dict[str, float] = {}
        self.last: dict[str, float] = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        now = time.monotonic()
        start = self.started.setdefault(stage, now)
        final = total > 0 and done >= total
        if not final and now - self.last.get(stage, 0.0) < self.every_s:
            return
        self.last[stage] = now
        elapsed = now - start
        if total > 0:
            eta = elapsed / max(done, 1) * (total - done)
            self.log.info("%s: %d/%d (%.0f%%) %.0fs elapsed, ~%.0fs left", stage, done, total,
                          100 * done / total, elapsed, eta)
        else:
            self.log.info("%s: %d done, %.0fs elapsed", stage, done, elapsed)


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
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    return logger
