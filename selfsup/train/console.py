"""What a person watching a run sees: one live progress bar for the run, and a line for each online check.

:class:`ProgressConsole` is a reporter sink. Without Ray it runs in the training process; under Ray
the driver feeds it the records the workers append to ``metrics.jsonl`` (:func:`follow_records`),
so the bar is drawn where the user is; rank 0's selfsup log lines reach the driver the same way
(:func:`follow_worker_log`), and nothing else of the workers does unless asked (-v).
"""

from __future__ import annotations

import json
import logging
import math
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

from tqdm import tqdm

from selfsup.core.distributed import rank

PLAIN_LINES = 10  # without a terminal (a log file, CI), one progress line per tenth of the run
POLL_SECONDS = 0.5  # how often the driver reads new records under Ray


class ProgressConsole:
    """Sink (rank 0): the run's progress on ``stream`` (stderr). On a terminal a live bar: steps of
    the current plan (a time budget re-fits it), epoch of the planned epochs, loss and ``unit``/s;
    elsewhere a line every tenth of the run. Each online check prints one line with the levels it
    has to beat (random init, the task's baselines) on the same subset."""

    def __init__(self, unit: str, stream: TextIO | None = None, live: bool | None = None):
        self.unit, self.stream = unit, stream or sys.stderr
        self.live = self.stream.isatty() if live is None else live
        self.bar: tqdm | None = None
        self.next_line = 0  # plain mode: the tenth of the run whose line is due next
        self.levels_shown = False

    def log(self, step: int, metrics: dict) -> None:
        if rank() != 0:
            return
        if "total_steps" in metrics and "loss" in metrics:
            self._progress(step, metrics)
        if "monitor/knn@20" in metrics:
            self._monitor(metrics)

    def skip(self, step: int, metrics: dict) -> None:
        """A record an earlier attempt already showed: the bar moves to it, no line is printed."""
        if "total_steps" in metrics and "loss" in metrics:
            if self.live:
                self._progress(step, metrics)
            else:
                self.next_line = math.floor(PLAIN_LINES * step / int(metrics["total_steps"])) + 1

    def finish(self, summary: dict) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def _progress(self, step: int, m: dict) -> None:
        total = int(m["total_steps"])
        status = (
            f"epoch {m['epoch']:.2f}/{m['epochs']:.2f}, loss {m['loss']:.3f}, "
            f"{m.get('samples_per_s', 0):.0f} {self.unit}/s"
        )
        if self.live:
            if self.bar is None:
                self.bar = tqdm(
                    total=total,
                    desc="pretraining",
                    unit="step",
                    file=self.stream,
                    dynamic_ncols=True,
                    bar_format="{desc} {percentage:3.0f}%|{bar}| {n}/{total} steps [{elapsed}<{remaining}] {postfix}",
                )
            self.bar.total, self.bar.n = total, step
            self.bar.set_postfix_str(status)  # refreshes the bar
            return
        tenth = math.floor(PLAIN_LINES * step / total)
        if tenth >= self.next_line or step == total:
            self.next_line = tenth + 1
            self._write(f"pretraining {step}/{total} steps ({step / total:.0%}): {status}")

    def _monitor(self, m: dict) -> None:
        levels = {
            k.removeprefix("monitor/").removesuffix("_knn@20").replace("_", " "): v
            for k, v in m.items()
            if k.startswith("monitor/") and k.endswith("_knn@20")
        }
        if levels and not self.levels_shown:
            self.levels_shown = True
            self._write(
                "online kNN@20 on a held-out subset must beat: "
                + ", ".join(f"{name} {100 * v:.1f}%" for name, v in levels.items())
            )
        margin = (
            f" ({100 * (m['monitor/knn@20'] - levels['random init']):+.1f} over random init)"
            if "random init" in levels
            else ""
        )
        self._write(
            f"epoch {m.get('epoch', 0):.2f}: online kNN@20 {100 * m['monitor/knn@20']:.1f}%{margin}, "
            f"RankMe {m['monitor/rankme']:.1f}"
        )

    def _write(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)


@contextmanager
def follow_records(path: Path, console: ProgressConsole) -> Iterator[None]:
    """While the body runs, feed ``console`` each record appended to the ``metrics.jsonl`` at ``path``
    (by another process). The records already there when it starts, and those a resume rewrites up
    to the furthest shown, only move the bar (:meth:`ProgressConsole.skip`): a resumed run's console
    goes on from where it resumed, printing none of an earlier attempt's lines again."""
    before = max((json.loads(line).get("samples", 0) for line in _lines(path)), default=0)
    shown = {False: before, True: before}  # the furthest samples shown: of progress, of online checks
    done = 0

    def poll() -> None:
        nonlocal done
        lines = _lines(path)
        offset = 0 if len(lines) < done else done  # a resume rewrote the file: read it again
        for line in lines[offset:]:
            record = json.loads(line)
            check = "monitor/knn@20" in record
            if "samples" in record and record["samples"] <= shown[check]:
                console.skip(int(record.get("step", 0)), record)
                continue
            shown[check] = max(shown[check], record.get("samples", 0))
            console.log(int(record.get("step", 0)), record)
        done = len(lines)

    try:
        with _polling(poll, "selfsup-progress"):
            yield
    finally:
        console.finish({})


@contextmanager
def _polling(poll: Callable[[], None], name: str) -> Iterator[None]:
    """While the body runs, call ``poll`` every ``POLL_SECONDS`` in a thread, and once more after it."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(POLL_SECONDS):
            poll()
        poll()

    thread = threading.Thread(target=loop, name=name, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _lines(path: Path) -> list[str]:
    """The complete lines of ``path`` (none when it does not exist yet; a half-written last line waits)."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return []
    return [line for line in text.split("\n")[:-1] if line.strip()]


class _JsonLine(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps({"level": record.levelno, "name": record.name, "message": record.getMessage()})


def worker_log_handler(path: Path) -> logging.Handler:
    """A handler (for a worker's ``selfsup`` logger) appending each record to ``path`` as a JSON line,
    for :func:`follow_worker_log` in the driver."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(_JsonLine())
    return handler


@contextmanager
def follow_worker_log(path: Path) -> Iterator[None]:
    """While the body runs, log here each record another process appends to ``path``
    (:func:`worker_log_handler`), under its own logger and level: a worker's selfsup lines reach the
    driver's console as selfsup's, and nothing else of the worker does. Earlier attempts' records are
    not repeated."""
    offset = Path(path).stat().st_size if Path(path).exists() else 0

    def poll() -> None:
        nonlocal offset
        try:
            with open(path, "rb") as f:
                f.seek(offset)
                chunk = f.read()
        except FileNotFoundError:
            chunk = b""
        complete = chunk[: chunk.rfind(b"\n") + 1]  # a half-written last line waits
        offset += len(complete)
        for line in complete.decode("utf-8", "replace").splitlines():
            record = json.loads(line)
            logging.getLogger(record["name"]).log(record["level"], "%s", record["message"])

    with _polling(poll, "selfsup-worker-log"):
        yield
