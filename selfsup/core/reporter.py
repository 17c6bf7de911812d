"""Where the training loop's metrics, checkpoints and summary go.

The loop talks to one :class:`Reporter`: a :class:`Reporters` fan-out over sinks. A sink implements
any of ``start``, ``log``, ``checkpoint`` and ``finish`` that it acts on (the run's files here; W&B in
``selfsup.tracking``; Ray and the run's bucket in ``selfsup.cluster``), and only those: the fan-out
calls each sink that has the method, in the order given.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

from selfsup.core.distributed import rank


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

    def _call(self, name: str, *args) -> None:
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
    (rank 0 only)."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / "metrics.jsonl"

    def log(self, step: int, metrics: dict) -> None:
        if rank() == 0:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": step, **metrics}, default=float) + "\n")

    def finish(self, summary: dict) -> None:
        if rank() == 0:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            (self.path.parent / "summary.json").write_text(json.dumps(summary, indent=1, default=float))


def read_records(path: Path) -> list[dict]:
    """The records of a ``metrics.jsonl``, in the order written ([] when there is none)."""
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_records(path: Path, samples_seen: int) -> None:
    """Drop the records of ``metrics.jsonl`` past ``samples_seen`` (those of steps a resume redoes), so
    the file reads as one run in the order of training progress."""
    path = Path(path)
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line).get("samples", 0) <= samples_seen]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(f"{line}\n" for line in kept))
    tmp.replace(path)
