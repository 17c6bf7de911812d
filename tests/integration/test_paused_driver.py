"""Two real `selfsup pretrain --no-ray` drivers of one run, posing as two hosts: the first is SIGSTOPped
past its lease, the second takes the lease and trains, then the first is continued. Exactly one
finishes; the other stops with one line; the run folder holds one run's history."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from selfsup.core.checkpoint import list_checkpoints
from tests.helpers import tiny_config, write_config, write_tiny_shards

pytestmark = pytest.mark.integration
ERROR = "selfsup: error: "
# a driver posing as `host`, whose lease goes stale after 3 s of a standing counter (60 s by default)
DRIVER = """
import socket, sys
from selfsup import cli
from selfsup.train import lease
socket.gethostname = lambda: sys.argv[1]
lease.run_lease = lambda cfg: lease.RunLease(cfg.run_dir.resolve(), stale_after=3.0, heartbeat_every=0.5)
sys.exit(cli.main(["pretrain", sys.argv[2], "--no-ray"]))
"""


def _driver(host: str, config: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    return subprocess.Popen(
        [sys.executable, "-c", DRIVER, host, str(config)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait(what, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_a_sigstopped_driver_taken_over_stops_with_one_line_and_writes_nothing(tmp_path):
    shards = write_tiny_shards(tmp_path / "shards", [64])  # 8 steps an epoch
    config = write_config(
        tmp_path / "x.yaml", tiny_config("paused", shards, tmp_path / "runs", model={"width": 2}, optim={"epochs": 12})
    )
    run = tmp_path / "runs" / "paused"
    a = b = _driver("host-a", config)
    try:
        _wait(lambda: list_checkpoints(run) or a.poll() is not None)
        a.send_signal(signal.SIGSTOP)  # a frozen VM: no step, no heartbeat
        b = _driver("host-b", config)
        _wait(lambda: b.poll() is not None or json.loads((run / "lease.json").read_text())["host"] == "host-b")
        a.send_signal(signal.SIGCONT)
        outs = {name: p.communicate(timeout=400) for name, p in (("a", a), ("b", b))}
    finally:
        for p in (a, b):
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)
                p.kill()
    codes = {"a": a.returncode, "b": b.returncode}
    assert sorted(codes.values()) == [0, 2], (codes, outs["a"][1][-2000:], outs["b"][1][-2000:])
    loser = "a" if codes["a"] == 2 else "b"
    lines = [line for line in outs[loser][1].splitlines() if line.startswith(ERROR)]
    assert len(lines) == 1 and "Traceback" not in outs[loser][1], outs[loser][1][-2000:]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 97))  # each step once
    assert [r["samples"] for r in records] == [8 * s for s in range(1, 97)]
    summary = json.loads((run / "summary.json").read_text())
    winner = "b" if loser == "a" else "a"
    assert f"final weights in {run / 'checkpoints' / 'samples-000000000768'}" in outs[winner][0]
    assert summary["steps"] == 96 and [c.name for c in list_checkpoints(run)][-1] == "samples-000000000768"
    assert not (run / "lease.json").exists()
