"""One driver per run folder: a live lease refuses a second driver; a dead or silent one is taken over."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from selfsup.train.lease import LEASE, RunLease, RunLeaseError


def test_a_second_driver_is_refused_naming_the_holder(tmp_path):
    with RunLease(tmp_path / "run"):
        held = json.loads((tmp_path / "run" / LEASE).read_text())
        with pytest.raises(RunLeaseError, match=f"pid {held['pid']} on {held['host']}"):
            RunLease(tmp_path / "run").acquire()
    assert not (tmp_path / "run" / LEASE).exists()  # released on exit
    with RunLease(tmp_path / "run"):  # free again
        pass


def test_the_lease_of_a_dead_process_is_taken_over(tmp_path, caplog):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    (tmp_path / LEASE).write_text(json.dumps({"host": RunLease(tmp_path).record["host"], "pid": pid,
                                              "started": time.time(), "heartbeat": time.time(), "token": "old"}))
    with RunLease(tmp_path) as lease:
        assert json.loads((tmp_path / LEASE).read_text())["token"] == lease.record["token"]
    assert "taking over the stale lease" in caplog.text


def test_a_silent_heartbeat_from_another_host_goes_stale(tmp_path):
    stale = {"host": "elsewhere", "pid": 1, "started": 0, "heartbeat": time.time() - 120, "token": "old"}
    (tmp_path / LEASE).write_text(json.dumps(stale))
    with pytest.raises(RunLeaseError, match="elsewhere"):
        RunLease(tmp_path, stale_after=300).acquire()
    with RunLease(tmp_path, stale_after=60):
        pass


def test_the_heartbeat_keeps_a_long_run_live(tmp_path):
    with RunLease(tmp_path, heartbeat_every=0.05):
        first = json.loads((tmp_path / LEASE).read_text())["heartbeat"]
        time.sleep(0.3)
        assert json.loads((tmp_path / LEASE).read_text())["heartbeat"] > first
