"""Two drivers of one run: one paused past its lease (simulated in-process: the second driver runs
inside the first one's step or checkpoint write) while the other takes the lease and trains. Exactly
one finishes; the other stops at its next step with one line and writes nothing more; the folder holds
one run's history."""

from __future__ import annotations

import json
import time

import pytest

from selfsup.cluster.in_process import train_here
from selfsup.config import parse_config
from selfsup.core import checkpoint as ck
from selfsup.core.checkpoint import file_digest, list_checkpoints
from selfsup.train import lease as lease_mod
from selfsup.train.lease import LeaseLost, RunLease, RunLeaseError
from selfsup.train.trainer import Trainer
from tests.helpers import tiny_config, write_tiny_shards


def _config(tmp_path):
    shards = write_tiny_shards(tmp_path / "shards", [64])  # 8 steps of batch 8 an epoch
    return parse_config(
        tiny_config(
            "race",
            shards,
            tmp_path / "runs",
            model={"width": 2},
            method={"name": "simclr", "proj_hidden_dim": 8, "proj_dim": 4},
            optim={"epochs": 2},
        )
    )


def _snapshot(run):
    """Every byte the run folder's history holds: metrics and each checkpoint's files."""
    files = {"metrics.jsonl": (run / "metrics.jsonl").read_bytes()}
    for c in list_checkpoints(run):
        files.update({f"{c.name}/{f.name}": file_digest(f) for f in c.iterdir()})
    return files


@pytest.mark.parametrize("pause", ["after step 6", "before the rename of step 8"])
@pytest.mark.parametrize("skew", [0.0, 90.0])
def test_a_paused_driver_whose_lease_was_taken_stops_and_writes_nothing(tmp_path, monkeypatch, pause, skew):
    cfg = _config(tmp_path)
    a = RunLease(cfg.run_dir, host="host-a", heartbeat_every=3600)  # paused: its counter stands still
    a.acquire()
    seen = {"a_steps": []}
    b = RunLease(cfg.run_dir, host="host-b", stale_after=0.2, heartbeat_every=0.05)

    def second_driver():  # B, its clock `skew` s ahead, takes the silent lease and trains the whole plan
        seen["b"] = None
        monkeypatch.setattr(lease_mod, "wall_clock", lambda: time.time() + skew)
        b.acquire()
        seen["b"] = train_here(cfg, fence=b.fence)
        seen["after_b"] = _snapshot(cfg.run_dir)

    after_step, write = Trainer._after_step, ck.write_checkpoint

    def paused_after_step(self, out, epoch, in_epoch):
        if self.fence is a.fence:
            seen["a_steps"].append(self.steps_done)
        after_step(self, out, epoch, in_epoch)
        if self.fence is a.fence and pause == "after step 6" and self.steps_done == 6:
            second_driver()

    def paused_write(dest, *args):
        path = write(dest, *args)
        if pause.startswith("before the rename") and "b" not in seen and args[1].step == 8:
            second_driver()
        return path

    monkeypatch.setattr(Trainer, "_after_step", paused_after_step)
    monkeypatch.setattr(ck, "write_checkpoint", paused_write)
    try:
        with pytest.raises(LeaseLost) as lost:
            train_here(cfg, fence=a.fence)
    finally:
        a.release()
        b.release()
    assert str(lost.value).startswith(f"the lease of {cfg.run_dir} was taken over by pid ")
    assert "on host-b; this driver stopped and wrote nothing more" in str(lost.value)
    assert "\n" not in str(lost.value)
    assert seen["a_steps"][-1] == (7 if pause == "after step 6" else 8)  # A stopped at its next step
    assert seen["b"]["steps"] == 16 and seen["b"]["checkpoint"].endswith("samples-000000000128")
    assert _snapshot(cfg.run_dir) == seen["after_b"]  # A wrote nothing after B took over
    records = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 17))  # each step once, B's resume dropped A's extra
    assert [r["samples"] for r in records] == [8 * s for s in range(1, 17)]
    assert [c.name for c in list_checkpoints(cfg.run_dir)] == ["samples-000000000096", "samples-000000000128"]
    assert not list((cfg.run_dir / "checkpoints").glob(".tmp-*"))


def test_a_second_driver_on_the_same_host_never_takes_over_a_live_one(tmp_path, monkeypatch):
    cfg = _config(tmp_path)
    after_step, refused = Trainer._after_step, []

    def paused_after_step(self, out, epoch, in_epoch):  # A's heartbeat is silent and B's clock 90 s ahead
        after_step(self, out, epoch, in_epoch)
        if self.steps_done == 6 and not refused:
            monkeypatch.setattr(lease_mod, "wall_clock", lambda: time.time() + 90)
            with pytest.raises(RunLeaseError, match="is in use by another driver") as err:
                RunLease(cfg.run_dir, stale_after=0.01).acquire()
            refused.append(str(err.value))

    monkeypatch.setattr(Trainer, "_after_step", paused_after_step)
    with RunLease(cfg.run_dir, heartbeat_every=3600) as a:
        summary = train_here(cfg, fence=a.fence)
    assert len(refused) == 1 and summary["steps"] == 16
    records = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 17))
