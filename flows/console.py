"""What a CLI run shows and how it stops.

Console: the project's own loggers (``lafite``, ``flows``, ``tasks``, ``lafite_core``) and Prefect's
run loggers at INFO, every other library at WARNING, so loader chatter (faiss's fallback from its
AVX2 build, Ray's and Prefect's start-up lines) stays off the screen; real warnings (no GPU, random
weights, skipped images) stay visible. Everything, DEBUG included, also goes to a debug log file
(``LAFITE_LOG_DIR``, default ``~/.cache/lafite/logs``). On a terminal, long steps show progress bars
below the log lines (:mod:`flows.progressbar`) instead of their periodic progress lines, which still go
to the log file and to Prefect. ``LAFITE_NO_PROGRESS=1`` or ``-v`` turns the bars off, and so does
output that is not a terminal (a pipe, CI, tests): the lines are printed then.

Stopping: Ctrl-C (SIGINT) and SIGTERM raise :class:`tasks.runtime.Interrupted` in the main thread
(also while it waits on Ray, see :func:`tasks.runtime.ray_init`), the run unwinds
(what is finished was committed as it went: features, checkpoints, scored shards), and every process
the run started (Ray's head and workers, Prefect's temporary server) is stopped before the exit
status 128 + signal. A second signal while stopping exits at once.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import signal
import sys
import time
from pathlib import Path

from flows import progressbar
from tasks import progress, runtime

log = logging.getLogger("lafite")

OWN_LOGGERS = ("lafite", "flows", "tasks", "lafite_core", "bench", "prefect.flow_runs", "prefect.task_runs")
# chatty third-party loggers: kept at INFO (their DEBUG floods the log file); the console filter
# below shows them only from WARNING up
CHATTY = ("faiss", "faiss.loader", "httpx", "httpcore", "ray", "urllib3", "botocore", "s3fs", "aiobotocore",
          "numba", "matplotlib", "PIL", "uvicorn", "prefect.server", "prefect._internal")


class _ConsoleFilter(logging.Filter):
    """INFO and above from the project's loggers, WARNING and above from everyone else."""

    def __init__(self, verbose: bool) -> None:
        super().__init__()
        self.verbose = verbose

    def filter(self, record: logging.LogRecord) -> bool:
        if self.verbose:
            return True
        own = any(record.name == n or record.name.startswith(n + ".") for n in OWN_LOGGERS)
        return record.levelno >= (logging.INFO if own else logging.WARNING)


def log_file(command: str) -> Path:
    folder = Path(os.environ.get("LAFITE_LOG_DIR") or Path.home() / ".cache" / "lafite" / "logs")
    return folder / f"lafite-{command}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"


def configure(command: str, verbose: bool = False) -> tuple[Path | None, list[logging.Handler]]:
    """Console at INFO for the project (DEBUG for everything with ``verbose``), a DEBUG log file beside;
    returns the file and the handlers added (to remove and close when ``main`` runs in-process; closing
    the console handler also stops its progress bars)."""
    root = logging.getLogger()
    root.setLevel(logging.DEBUG)
    bars = None if verbose else progressbar.for_terminal(sys.stderr)
    if bars is not None:
        progress.set_sink(bars.update)
    console: logging.Handler = bars if bars is not None else logging.StreamHandler(sys.stderr)
    console.setLevel(logging.DEBUG if verbose else logging.INFO)
    console.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    console.addFilter(_ConsoleFilter(verbose))
    root.addHandler(console)
    for name in CHATTY:
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.INFO)
    path = log_file(command)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        file = logging.FileHandler(path, encoding="utf-8")
    except OSError as exc:
        log.warning("no debug log file (%s): %s", path, exc)
        return None, [console]
    file.setLevel(logging.DEBUG)
    file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(process)d %(name)s: %(message)s"))
    root.addHandler(file)
    return path, [console, file]


def _exit_now(signum: int, frame) -> None:
    stop_children(grace_s=0.5)
    os._exit(128 + signum)


def install_signal_handlers() -> dict[int, object]:
    """SIGINT and SIGTERM raise :class:`tasks.runtime.Interrupted`; a second one exits at once.
    Returns the handlers replaced (``main`` puts them back when it runs in-process)."""
    runtime.on_second_signal(_exit_now)
    return {s: signal.signal(s, runtime.raise_interrupted) for s in (signal.SIGINT, signal.SIGTERM)}


def signal_of(exc: KeyboardInterrupt) -> int:
    """The signal behind an interruption (libraries may re-raise it as a plain KeyboardInterrupt)."""
    return getattr(exc, "signum", None) or (runtime.received[0] if runtime.received else int(signal.SIGINT))


def children() -> set[int]:
    """The pids of every process below this one."""
    import psutil

    return {c.pid for c in psutil.Process().children(recursive=True)}


def stop_ray() -> None:
    """Shut down a Ray this process started (its head and workers) or disconnect from a cluster."""
    if "ray" in sys.modules:
        import ray

        try:
            if ray.is_initialized():
                ray.shutdown()
        except Exception as exc:  # stopping anyway: stop_children ends what is left
            log.debug("ray.shutdown failed: %s", exc)


def sweep_at_exit(keep: set[int]) -> None:
    """At interpreter exit, after Prefect's and Ray's own exit hooks (registered later, so run earlier:
    Prefect flushes its logs to its temporary server, then stops it), stop whatever is still running."""
    import atexit

    atexit.register(lambda: stop_children(grace_s=3.0, keep=keep))


def stop_children(grace_s: float = 5.0, keep: set[int] = frozenset()) -> list[str]:
    """Stop every process below this one, except ``keep`` (what was there before the command: a
    test's Prefect server, when ``main`` runs in-process): SIGTERM, then SIGKILL after ``grace_s``."""
    import psutil

    stop_ray()
    children = [c for c in psutil.Process().children(recursive=True) if c.pid not in keep]
    for c in children:
        try:
            c.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(children, timeout=grace_s)
    for c in alive:
        try:
            c.kill()
        except psutil.NoSuchProcess:
            pass
    return [f"{c.pid}" for c in alive]
