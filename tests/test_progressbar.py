"""Progress bars on a terminal (flows.progressbar): what the console shows, what the logs keep, the cleanup."""

from __future__ import annotations

import io
import logging
import sys
import threading

import pytest
from rich.console import Console

from flows import console as cli_console
from flows.progressbar import TerminalConsole
from tasks import progress
from tasks.progress import LogProgress


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def logger():
    """A private logger with a capturing handler (what the log file and Prefect's API handler see)."""
    log = logging.getLogger("lafite.test_progressbar")
    log.setLevel(logging.INFO)
    log.propagate = False
    records = Records()
    log.addHandler(records)
    yield log, records
    log.handlers.clear()
    log.propagate = True


@pytest.fixture
def terminal(monkeypatch, tmp_path):
    """Puts a terminal-like buffer in place of stderr (call it in the test: pytest sets sys.stderr again
    between a fixture and the test); the log file in tmp_path, bars not switched off."""
    monkeypatch.setenv("LAFITE_LOG_DIR", str(tmp_path))
    monkeypatch.delenv("LAFITE_NO_PROGRESS", raising=False)
    monkeypatch.delenv("TTY_COMPATIBLE", raising=False)
    monkeypatch.setenv("TERM", "xterm-256color")
    monkeypatch.setenv("COLUMNS", "120")

    def install(stream: io.StringIO | None = None) -> io.StringIO:
        stream = stream or FakeTerminal()
        monkeypatch.setattr("sys.stderr", stream)
        return stream

    return install


def unconfigure(handlers: list[logging.Handler]) -> None:
    """What ``flows.cli.main`` does in its finally."""
    for h in handlers:
        logging.getLogger().removeHandler(h)
        h.close()


def test_bars_replace_the_periodic_lines_on_the_console_only(logger):
    log, records = logger
    out = io.StringIO()
    bars = TerminalConsole(Console(file=out, force_terminal=True, width=120))
    bars.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    log.addHandler(bars)
    progress.set_sink(bars.update)
    try:
        step = LogProgress(log, every_s=0)  # a log line for every call
        for i in range(1, 4):
            step("extract features", i, 10)
        step("load", 2, 0)
        log.info("an ordinary line")
        bars.bar.refresh()
        shown = out.getvalue()
        assert "extract features" in shown and "3/10" in shown and "30%" in shown
        assert "load" in shown and "2/?" in shown
        assert "an ordinary line" in shown
        # the log file and Prefect get every line; the console shows the bar instead
        assert [r.split(" (")[0] for r in records.lines if r.startswith("extract features")] == [
            "extract features: 1/10", "extract features: 2/10", "extract features: 3/10"]
        assert "load: 2 done" in records.lines[-2]
        assert "extract features: 3/10" not in shown and "load: 2 done" not in shown

        for i in range(4, 11):
            step("extract features", i, 10)
        assert set(bars.stages) == {"load"}  # a finished stage loses its bar
        assert out.getvalue().count("extract features: 10/10 (100%)") == 1  # and prints its last line once
        assert "extract features: 10/10 (100%)" in records.lines[-1]
    finally:
        log.removeHandler(bars)
        bars.close()
    assert bars.bar is None and progress._sink is None
    step("load", 3, 0)  # after close: nothing starts again
    assert bars.bar is None


def test_the_bar_stops_when_no_stage_is_left_and_restarts_a_stage_seen_again():
    bars = TerminalConsole(Console(file=io.StringIO(), force_terminal=True, width=120))
    try:
        bars.update("train", 5, 8)
        first = bars.stages["train"][0]
        bars.update("train", 1, 8)  # the same stage again from the start (e.g. the next category)
        assert bars.stages["train"][0] != first and len(bars.bar.tasks) == 1
        bars.update("train", 8, 8)
        assert bars.bar is None and not bars.stages
    finally:
        bars.close()


def test_a_stage_done_in_one_call_draws_nothing():
    out = io.StringIO()
    bars = TerminalConsole(Console(file=out, force_terminal=True, width=120))
    try:
        bars.update("score bottle", 3, 3)
        assert bars.bar is None and out.getvalue() == ""
    finally:
        bars.close()


def test_progress_from_many_threads():
    bars = TerminalConsole(Console(file=io.StringIO(), force_terminal=True, width=120))
    step = LogProgress(logging.getLogger("lafite.test_progressbar.threads"), every_s=3600)
    progress.set_sink(bars.update)
    errors: list[BaseException] = []

    def work(stage: str) -> None:
        try:
            for i in range(1, 301):
                step(stage, i, 300)
                step("shared", 1, 0)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(f"stage {n}",)) for n in range(4)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        assert set(bars.stages) == {"shared"}  # one bar for the shared stage, the finished ones gone
        assert len(bars.bar.tasks) == 1
    finally:
        bars.close()
    assert bars.bar is None and progress._sink is None


def test_configure_on_a_terminal_draws_bars_and_the_log_file_keeps_the_lines(terminal):
    terminal = terminal()
    path, handlers = cli_console.configure("test")
    try:
        bars = handlers[0]
        assert isinstance(bars, TerminalConsole) and progress._sink == bars.update
        step = LogProgress(logging.getLogger("lafite.test_progressbar"), every_s=0)
        step("score shards", 2, 5)
        logging.getLogger("lafite").info("shard written")
        bars.bar.refresh()
    finally:
        unconfigure(handlers)
    shown = terminal.getvalue()
    assert "score shards" in shown and "2/5" in shown and "40%" in shown
    assert "INFO lafite: shard written" in shown  # the same plain format as without bars
    assert "score shards: 2/5" not in shown
    assert "score shards: 2/5 (40%)" in path.read_text()
    assert progress._sink is None and bars.bar is None
    assert not any(isinstance(h, TerminalConsole) for h in logging.getLogger().handlers)
    assert sys.stderr is terminal  # the bar's redirection of stderr is undone


@pytest.mark.parametrize("case", ["pipe", "LAFITE_NO_PROGRESS=1", "verbose"])
def test_no_bar_off_a_terminal_or_when_turned_off(case, terminal, monkeypatch):
    terminal(io.StringIO() if case == "pipe" else None)
    if case.startswith("LAFITE"):
        monkeypatch.setenv("LAFITE_NO_PROGRESS", "1")
    _, handlers = cli_console.configure("test", verbose=case == "verbose")
    stream = sys.stderr
    try:
        assert type(handlers[0]) is logging.StreamHandler and progress._sink is None
        LogProgress(logging.getLogger("lafite.test_progressbar"), every_s=0)("score shards", 2, 5)
    finally:
        unconfigure(handlers)
    assert "score shards: 2/5 (40%)" in stream.getvalue()


def test_main_stops_the_bars_when_a_command_is_interrupted(terminal, monkeypatch):
    from flows import cli

    terminal = terminal()
    seen = {}

    def command(args) -> int:
        step = LogProgress(logging.getLogger("lafite.test_progressbar"), every_s=0)
        for i in range(1, 4):
            step("extract features", i, 10)
        seen["bars"] = [h for h in logging.getLogger().handlers if isinstance(h, TerminalConsole)]
        seen["stderr"] = sys.stderr
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_versions", command)
    assert cli.main(["versions"]) == 130
    assert len(seen["bars"]) == 1 and seen["stderr"] is not terminal  # the bar was live
    assert sys.stderr is terminal and progress._sink is None
    assert not any(isinstance(h, TerminalConsole) for h in logging.getLogger().handlers)
    shown = terminal.getvalue()
    assert "3/10" in shown and "extract features: 3/10" not in shown and "interrupted (SIGINT)" in shown


def test_progress_on_a_ray_worker_reaches_the_bar_of_the_driver(fresh_ray):
    """Training runs on a Ray worker: its epochs are relayed through a Ray queue to the terminal's bar
    (the sink) while the driver waits; without a sink no queue is made at all."""
    from tasks.runtime import ray_init

    def _epochs_on_a_worker(queue, n: int) -> int:  # local, so Ray ships it by value
        """Reports ``n`` epochs the way ``tasks.training.train_body`` does."""
        from tasks.progress import QueuedProgress, both

        report = both(None, QueuedProgress(queue))
        for e in range(1, n + 1):
            report("train", e, n)
        return n

    assert progress.relay_queue() is None  # no bar, no queue (and no Ray actor)
    seen: list[tuple[str, int, int]] = []
    progress.set_sink(lambda *call: seen.append(call))
    try:
        import ray

        ray_init(num_cpus=1)
        queue = progress.relay_queue()
        ref = ray.remote(num_cpus=0)(_epochs_on_a_worker).remote(queue, 5)
        assert progress.wait_relaying(ref, queue, poll_s=0.05) == 5
    finally:
        progress.clear_sink(seen.append)
        progress.set_sink(None)
    assert seen == [("train", e, 5) for e in range(1, 6)]
