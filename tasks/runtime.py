"""Process-wide settings for Prefect and Ray, applied before either is imported.

Ray servers bind to 127.0.0.1 (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``) unless an existing cluster is
named; usage statistics and analytics are off.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future

log = logging.getLogger(__name__)

_DEFAULTS = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    # Ray starts workers at nice 15 by default; training and scoring are the job, not background work
    "RAY_worker_niceness": "0",
    # Ray's C++ crash handler takes over SIGTERM in the driver and aborts it (exit -6) before Python can
    # stop the run cleanly (flows.console); the driver's own handler shuts Ray down instead
    "RAY_DISABLE_FAILURE_SIGNAL_HANDLER": "1",
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    # glibc malloc settings that made CPU inference 1.6x faster on the build machines
    "MALLOC_MMAP_THRESHOLD_": "33554432",
    "MALLOC_TRIM_THRESHOLD_": "17179869184",
    "MALLOC_TOP_PAD_": "1073741824",
}


def apply_environment() -> None:
    for key, value in _DEFAULTS.items():
        os.environ.setdefault(key, value)
    if not (getattr(sys.stderr, "isatty", None) and sys.stderr.isatty()):
        # Ray colours the "(task pid=N)" prefix of forwarded worker lines even into a file or pipe
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")


apply_environment()


class Interrupted(KeyboardInterrupt):
    """A stop signal (SIGINT or SIGTERM), raised in the main thread."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


received: list[int] = []
_second: list[Callable] = []


def on_second_signal(handler: Callable) -> None:
    """What a second stop signal does while the first one unwinds (e.g. exit at once)."""
    _second[:] = [handler]


def raise_interrupted(signum: int, frame) -> None:
    """Signal handler: raise :class:`Interrupted` (a KeyboardInterrupt: the one exception ``ray.get``
    answers while it waits; Prefect's own SIGTERM exception is swallowed there)."""
    received.append(signum)
    if _second:
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, _second[0])
    raise Interrupted(signum)


def ray_init(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to ``address`` (or LAFITE_RAY_ADDRESS), else start a local Ray on loopback."""
    import ray

    if ray.is_initialized():
        return
    # Ray's notice on every start that token authentication is on (it stays on; the local head binds to
    # loopback): start-up chatter on a user's console, not a warning about the run
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    address = address or os.environ.get("LAFITE_RAY_ADDRESS")
    forwarded = [k for k in _DEFAULTS if not k.startswith(("MALLOC", "RAY_worker"))]
    forwarded += ["LAFITE_S3_ENDPOINT", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "LAFITE_STORE"]
    # credentials are not forwarded: workers inherit them from their node's environment
    env = {"env_vars": {k: os.environ[k] for k in forwarded if k in os.environ}}
    if address:
        log.info("connecting to Ray cluster at %s", address)
        ray.init(address=address, runtime_env=env, logging_level=logging.WARNING)
    else:
        cpus = num_cpus or int(os.environ.get("LAFITE_RAY_CPUS", os.cpu_count() or 1))

        def start() -> None:
            if ray.is_initialized():  # another thread started it meanwhile
                return
            ray.init(address="local", include_dashboard=False, num_cpus=cpus, runtime_env=env,
                     logging_level=logging.WARNING, _node_ip_address="127.0.0.1")

        if threading.current_thread() is threading.main_thread():
            managed = callable(signal.getsignal(signal.SIGTERM))
            start()
            if managed:
                # Ray replaced SIGTERM with sys.exit(1), which leaves its head for the atexit hooks and the
                # run without a clean stop; SIGTERM now interrupts like Ctrl-C, also inside ray.get
                signal.signal(signal.SIGTERM, raise_interrupted)
        else:
            _in_head_thread(start)
        log.info("started local Ray with %d CPUs on 127.0.0.1", cpus)


_head_lock = threading.Lock()
_head_queue: queue.SimpleQueue | None = None


def _in_head_thread(fn: Callable[[], None]) -> None:
    """Run ``fn`` in a daemon thread that lives as long as the process.

    Ray starts a local head's processes (GCS, raylet) with ``PR_SET_PDEATHSIG``, which Linux fires when
    the *thread* that started them exits, not the process: a local Ray started from a Prefect task's
    worker thread (or any short-lived thread) is killed under the driver when that thread ends, and
    the driver then exits at its next Ray call. Starting it from a thread that never ends avoids that.
    (Not a ThreadPoolExecutor: its threads are joined at exit before Ray's own atexit shutdown runs.)
    """
    global _head_queue
    with _head_lock:
        if _head_queue is None:
            _head_queue = queue.SimpleQueue()
            threading.Thread(target=_head_loop, args=(_head_queue,), name="lafite-ray-head", daemon=True).start()
    done: Future = Future()
    _head_queue.put((fn, done))
    done.result()


def _head_loop(jobs: queue.SimpleQueue) -> None:
    while True:
        fn, done = jobs.get()
        try:
            fn()
        except BaseException as exc:  # handed to the caller, re-raised there
            done.set_exception(exc)
        else:
            done.set_result(None)


def use_assigned_cpus() -> int:
    """Inside a Ray task: size torch's and faiss's thread pools to the CPUs Ray assigned to it.

    Ray reuses worker processes across tasks with different ``num_cpus``; without this a 1-CPU
    scoring task can keep the thread count of an earlier all-CPU training task (oversubscription).
    """
    import ray
    import torch

    try:
        assigned = ray.get_runtime_context().get_assigned_resources()
    except (AssertionError, RuntimeError):  # not inside a Ray worker: leave the process as it is
        return torch.get_num_threads()
    cpus = max(1, int(round(assigned.get("CPU", 1))))
    torch.set_num_threads(cpus)
    try:
        import faiss

        faiss.omp_set_num_threads(cpus)
    except ImportError:
        pass
    return cpus


def ray_gpus() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0))
