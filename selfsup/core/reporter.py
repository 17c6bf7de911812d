"""Where the training loop's metrics, checkpoints and summary go.

The loop talks to one :class:`Reporter`: a :class:`Reporters` fan-out over sinks. A sink implements
any of ``start``, ``log``, ``checkpoint`` and ``finish`` that it acts on (the run's files here; W&B in
``selfsup.tracking``; Ray and the run's bucket in ``selfsup.cluster``), and only those: the fan-out
calls each sink that has the method, in the order given.
"""

from __future__ import annotations

import errno
import json
import logging
import os
from pathlib import Path
from typing import Protocol

from selfsup.core.distributed import rank, world_size
from selfsup.core.fence import Fence, LeaseLost, fenced

log = logging.getLogger("selfsup.reporter")


class Reporter(Protocol):
    """What the loop calls, on every rank (sinks decide which ranks act).

    ``start()``: once, when the Trainer is set up (its config, data and checkpoint checked), before
    the first step. ``log(step, metrics)``: a record of floats. ``checkpoint(step, path, metrics)``:
    rank 0 passes the checkpoint directory it wrote, the other ranks None, with the last logged record.
    ``finish(summary)``: the run's summary, once at the end.
    """

    def start(self) -> None: ...

    def log(self, step: int, metrics: dict) -> None: ...

    def checkpoint(self, step: int, path: Path | None, metrics: dict) -> None: ...

    def finish(self, summary: dict) -> None: ...


class Reporters:
    """The one fan-out: each call goes to every sink that implements it, in order."""

    def __init__(self, *sinks: object):
        self.sinks = sinks

    def _call(self, name: str, *args: object) -> None:
        for sink in self.sinks:
            if (method := getattr(sink, name, None)) is not None:
                method(*args)

    def start(self) -> None:
        self._call("start")

    def log(self, step: int, metrics: dict) -> None:
        self._call("log", step, metrics)

    def checkpoint(self, step: int, path: Path | None, metrics: dict) -> None:
        self._call("checkpoint", step, path, metrics)

    def finish(self, summary: dict) -> None:
        self._call("finish", summary)


class FileReporter:
    """Sink: appends records as JSON lines to ``<run>/metrics.jsonl`` and writes ``<run>/summary.json``
    (rank 0 only), each write under ``fence`` (the run lease's, or None without one). A record is
    appended whole or not at all: a write cut short (a full disk) is undone and stops the run in one line.
    A record refused for a lost lease stops a one-rank run; with several ranks, their next lease check
    does."""

    def __init__(self, run_dir: Path, fence: Fence | None = None):
        self.path, self.fence = Path(run_dir) / "metrics.jsonl", fence

    def log(self, step: int, metrics: dict) -> None:
        if rank() == 0:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                with fenced(self.fence):
                    append_whole(self.path, (json.dumps({"step": step, **metrics}, default=float) + "\n").encode())
            except LeaseLost:
                if world_size() == 1:
                    raise
                # refused; the ranks stop together at their next lease check (rank 0 alone would hang them)

    def finish(self, summary: dict) -> None:
        if rank() == 0:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            path = self.path.parent / "summary.json"
            tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
            tmp.write_text(json.dumps(summary, indent=1, default=float))
            with fenced(self.fence):
                os.replace(tmp, path)


def append_whole(path: Path, data: bytes) -> None:
    """Append ``data`` to ``path`` entirely, or leave the file as it was and raise (one line when the
    disk is full: :class:`~selfsup.core.checkpoint.CheckpointSpaceError`)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        except OSError as err:
            os.ftruncate(fd, size)
            if err.errno != errno.ENOSPC:
                raise
            from selfsup.core.checkpoint import CheckpointSpaceError

            raise CheckpointSpaceError(
                f"no space left to append to {path} (the record was not written); free "
                "some space or set run_root elsewhere, then run the same command"
            ) from None
    finally:
        os.close(fd)


def _parse(path: Path) -> list[tuple[str, dict]]:
    """(line, record) of each readable line; a line that does not parse (a write cut short) is dropped
    with a warning naming it."""
    kept = []
    lines = path.read_text(errors="replace").splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            kept.append((line, json.loads(line)))
        except ValueError:
            where = "its last line" if n == len(lines) else f"line {n}"
            log.warning("%s: dropped %s, a record cut short by an interrupted write (%d bytes)", path, where, len(line))
    return kept


def read_records(path: Path) -> list[dict]:
    """The records of a ``metrics.jsonl``, in the order written ([] when there is none)."""
    path = Path(path)
    if not path.is_file():
        return []
    return [record for _, record in _parse(path)]


def truncate_records(path: Path, samples_seen: int, fence: Fence | None = None) -> None:
    """Drop the records of ``metrics.jsonl`` past ``samples_seen`` (those of steps a resume redoes) and
    any torn line, so the file reads as one run in the order of training progress (under ``fence``)."""
    path = Path(path)
    if not path.is_file():
        return
    kept = [line for line, record in _parse(path) if record.get("samples", 0) <= samples_seen]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(f"{line}\n" for line in kept))
    with fenced(fence):
        tmp.replace(path)
