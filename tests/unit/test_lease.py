"""One driver per run folder: a live lease refuses a second driver; a dead or silent one is taken over,
judged by its process or its beat counter, never by a clock; the fence refuses every write of a driver
whose lease was taken."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import pytest

from selfsup.train import lease as lease_mod
from selfsup.train.lease import LEASE, Fence, LeaseLost, RunLease, RunLeaseError


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
    (tmp_path / LEASE).write_text(
        json.dumps(
            {"host": RunLease(tmp_path).record["host"], "pid": pid, "started": time.time(), "beat": 7, "token": "old"}
        )
    )
    with RunLease(tmp_path, stale_after=3600) as lease:  # at once: no watching a dead pid
        assert json.loads((tmp_path / LEASE).read_text())["token"] == lease.record["token"]
    assert "taking over the stale lease" in caplog.text


def test_a_reused_pid_on_this_host_does_not_keep_a_dead_drivers_lease(tmp_path):
    here = RunLease(tmp_path).record
    (tmp_path / LEASE).write_text(
        json.dumps(
            {
                "host": here["host"],
                "pid": here["pid"],
                "process": "another-boot:1",
                "started": 0,
                "beat": 3,
                "token": "old",
            }
        )
    )
    with RunLease(tmp_path, stale_after=3600) as lease:  # this pid runs, but not the process that took the lease
        assert json.loads((tmp_path / LEASE).read_text())["token"] == lease.record["token"]


def _beating(path, stop: threading.Event, skew: float) -> None:
    """Another host's driver: raises its beat counter every 20 ms, stamping a clock ``skew`` s off."""
    beat = 0
    while not stop.wait(0.02):
        beat += 1
        path.write_text(
            json.dumps(
                {
                    "host": "elsewhere",
                    "pid": 1,
                    "started": time.time() + skew,
                    "heartbeat": time.time() + skew,
                    "beat": beat,
                    "token": "theirs",
                }
            )
        )


@pytest.mark.parametrize("skew", [-90.0, 0.0, 90.0])
def test_another_hosts_lease_is_judged_by_its_counter_never_its_clock(tmp_path, skew):
    stop = threading.Event()
    (tmp_path / LEASE).write_text(
        json.dumps({"host": "elsewhere", "pid": 1, "heartbeat": time.time() + skew, "beat": 0, "token": "theirs"})
    )
    beater = threading.Thread(target=_beating, args=(tmp_path / LEASE, stop, skew))
    beater.start()
    try:  # beating: live, whatever its clock says
        with pytest.raises(RunLeaseError, match="pid 1 on elsewhere"):
            RunLease(tmp_path, stale_after=0.5, heartbeat_every=0.1).acquire()
    finally:
        stop.set()
        beater.join()
    # silent now (its last heartbeat stamp is fresh on its clock): taken over once the counter stands still
    with RunLease(tmp_path, stale_after=0.3, heartbeat_every=0.1) as lease:
        assert json.loads((tmp_path / LEASE).read_text())["token"] == lease.record["token"]


def test_a_live_process_on_this_host_is_never_taken_over_whatever_the_clocks(tmp_path, monkeypatch):
    holder = RunLease(tmp_path, heartbeat_every=3600)  # never beats during the test
    holder.acquire()
    try:
        record = json.loads((tmp_path / LEASE).read_text())
        record["heartbeat"] = record["started"] = time.time() - 10_000  # an NTP step, or a long pause
        (tmp_path / LEASE).write_text(json.dumps(record))
        monkeypatch.setattr(lease_mod, "wall_clock", lambda: time.time() + 90)
        with pytest.raises(RunLeaseError, match=f"pid {record['pid']} on {record['host']}"):
            RunLease(tmp_path, stale_after=0.01).acquire()
        assert json.loads((tmp_path / LEASE).read_text())["token"] == holder.record["token"]
    finally:
        holder.release()


def test_a_taken_lease_fences_every_later_write_of_its_old_holder(tmp_path):
    old = RunLease(tmp_path, host="host-a", heartbeat_every=0.05)
    old.acquire()
    wrote = []
    with old.fence.hold():
        wrote.append("before")
    old._stop.set()  # its process pauses: no more beats
    old._thread.join()
    with RunLease(tmp_path, host="host-b", stale_after=0.2, heartbeat_every=0.05) as new:
        with pytest.raises(LeaseLost, match="taken over by pid .* on host-b; this driver stopped"), old.fence.hold():
            wrote.append("after")  # never runs
        with pytest.raises(LeaseLost):
            old.fence.check()
        stale = Fence(tmp_path, old.record["token"])  # a Ray worker of the old driver: the same token
        with pytest.raises(LeaseLost):
            stale.check()
        old.release()  # the old holder's exit leaves the new lease in place
        assert json.loads((tmp_path / LEASE).read_text())["token"] == new.record["token"]
        new.fence.check()
        with new.fence.hold():
            wrote.append("new")
    assert wrote == ["before", "new"]


def test_the_old_holders_heartbeat_stops_without_overwriting_the_new_lease(tmp_path):
    old = RunLease(tmp_path, host="host-a", heartbeat_every=0.05)
    old.acquire()
    record = json.loads((tmp_path / LEASE).read_text())
    (tmp_path / LEASE).write_text(json.dumps({**record, "host": "host-b", "pid": 2, "token": "new"}))
    old._thread.join(timeout=60)  # its next beat finds the new token and stops
    assert not old._thread.is_alive()
    with pytest.raises(LeaseLost, match="was taken over by pid 2 on host-b"):  # the loop's next check, at once
        old.fence.check()
    assert json.loads((tmp_path / LEASE).read_text())["token"] == "new"
    old.release()
    assert json.loads((tmp_path / LEASE).read_text())["token"] == "new"


def test_a_writer_paused_inside_its_fence_blocks_the_takeover(tmp_path, monkeypatch):
    old = RunLease(tmp_path, host="host-a", heartbeat_every=3600)
    old.acquire()
    monkeypatch.setattr(lease_mod, "LOCK_WAIT_S", 0.2)
    inside, leave = threading.Event(), threading.Event()

    def paused_writer():
        with old.fence.hold():
            inside.set()
            leave.wait()

    writer = threading.Thread(target=paused_writer)
    writer.start()
    inside.wait()
    try:
        with pytest.raises(RunLeaseError, match="stays locked by a driver that is writing"):
            RunLease(tmp_path, host="host-b", stale_after=0.1, heartbeat_every=0.05).acquire()
        assert json.loads((tmp_path / LEASE).read_text())["token"] == old.record["token"]
    finally:
        leave.set()
        writer.join()
        old.release()


def test_the_heartbeat_raises_the_counter(tmp_path):
    with RunLease(tmp_path, heartbeat_every=0.05):
        first = json.loads((tmp_path / LEASE).read_text())["beat"]
        deadline = time.monotonic() + 60
        while json.loads((tmp_path / LEASE).read_text())["beat"] < first + 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert json.loads((tmp_path / LEASE).read_text())["beat"] >= first + 2
