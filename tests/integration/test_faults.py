"""Fault figures run once each (the full figures: `python -m benchmarks.faults`), and W&B resuming its run."""

from __future__ import annotations

import random
import re

import pytest

from benchmarks import faults
from selfsup.cluster.driver import pretrain
from selfsup.config import parse_config
from tests.helpers import tiny_config, write_tiny_shards

pytestmark = pytest.mark.integration


def test_a_sigkilled_worker_is_restarted_and_the_run_finishes(tmp_path):
    r = faults.worker_failure(tmp_path, random.Random(3))
    assert r["rc"] == 0, r["tail"]
    assert r["killed_at_step"] is not None and len(r["restarts"]) == 1
    assert r["resumes_by_rank"] == {0: [r["restarts"][0][1]], 1: [r["restarts"][0][1]]}  # from the same step
    assert r["final_steps"] == r["planned"]
    assert all(0 <= lost <= r["interval"] for lost in r["lost_steps"])
    # metrics.jsonl reads as one run: each step once, samples strictly increasing
    assert r["steps_logged"] == list(range(1, r["planned"] + 1)) and r["samples_increasing"]
    # 2 workers x batch 8: the final checkpoint is the one written last, named by the samples seen
    assert r["checkpoints"][-1] == f"samples-{16 * r['planned']:012d}"
    assert r["final_checkpoint"].endswith(f"/checkpoints/{r['checkpoints'][-1]}")


def test_a_killed_driver_is_resumed_by_the_same_command(tmp_path):
    r = faults.driver_failure(tmp_path, random.Random(4))
    assert r["rc"] == 0, r["tail"]
    assert r["checkpoints_at_kill"] and r["resumed"]
    assert r["lease_taken_over"]  # the killed driver's lease, with a warning
    last = r["checkpoint_steps_at_kill"][-1]
    assert r["checkpoints_at_kill"][-1] == f"samples-{16 * last:012d}"
    # resumed from the run's latest complete checkpoint: the one written last before the kill, or one that the
    # killed driver's worker (outside its session) still completed after it, under its lease
    step = int(re.search(r"\(step (\d+)\)", r["resumed"][0]).group(1))
    assert step >= last and f"checkpoints/samples-{16 * step:012d} (step {step})" in r["resumed"][0]
    assert r["final_steps"] == r["planned"] and r["samples_increasing"]
    assert r["final_checkpoint"].endswith(f"/checkpoints/{r['checkpoints'][-1]}")
    assert r["checkpoints"][-1] == f"samples-{16 * r['planned']:012d}"


def test_a_rank_whose_share_is_unreadable_does_not_hang_ddp(tmp_path):
    r = faults.uneven(tmp_path, timeout=240)
    assert not r["hung"] and r["rc"] == 0, r.get("tail")
    assert r["final_steps"] == r["planned"] and r["skipped"] == 40  # the zero-byte shard, from the other rank


def test_corrupt_samples_are_skipped_counted_and_located(tmp_path):
    r = faults.corrupt(tmp_path)
    assert r["rc"] == 0, r["tail"]
    assert r["final_steps"] == r["planned"]
    assert r["skipped"] == r["corrupted"]["total"] == 10 and r["repeated"] == 10  # no good sample dropped
    where = "\n".join(r["where"])
    for bad in (
        "train-000005.tar: unreadable after sample 0",
        "train-000004.tar: unreadable after sample 33",
        "train-000000.tar: sample s00005: unreadable image header (",  # PNG signature, no header
        "train-000001.tar: sample s00047: unreadable image header (",
        "train-000002.tar: sample s00101: unreadable image header (",
    ):
        assert bad in where
    assert r["printed"] and "10 bad samples skipped" in r["printed"][0]


def test_wandb_resumes_the_same_run_id(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "fake-key-that-must-not-be-logged")
    shards = write_tiny_shards(tmp_path / "shards", [32, 32])
    tree = tiny_config("wb", shards, tmp_path / "runs", tracking={"mode": "offline"})
    first = parse_config(tree)
    pretrain(first, use_ray=False)
    run_id = (first.run_dir / "wandb_id").read_text()
    second = parse_config(tree, ["optim.epochs=2"])
    assert pretrain(second, use_ray=False)["steps"] == 16
    runs = sorted((second.run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(p.name.endswith(f"-{run_id}") for p in runs)
    assert not [
        p
        for p in (second.run_dir / "wandb").rglob("*")
        if p.is_file() and b"fake-key-that-must-not-be-logged" in p.read_bytes()
    ]
