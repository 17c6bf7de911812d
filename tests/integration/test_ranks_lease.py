"""Two ranks (gloo, two processes) of a driver whose lease is taken over after step 3: both stop together at
the next logging step (4; the next checkpoint would be at 6) with one line, writing nothing after it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from selfsup.config import parse_config
from selfsup.core.checkpoint import list_checkpoints
from selfsup.train.lease import LEASE, Fence, LeaseLost, RunLease
from tests.clusterkit import free_port
from tests.helpers import tiny_config, write_tiny_shards

pytestmark = pytest.mark.integration
WORLD = 2


def worker(rank: int, port: int, tree: dict, token: str, out: str) -> None:
    from selfsup.cluster.in_process import train_here
    from selfsup.train.trainer import Trainer

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    cfg = parse_config(tree)
    after_step, steps = Trainer._after_step, []

    def taken_after_step_3(self, out_, epoch, in_epoch):
        steps.append(self.steps_done)
        after_step(self, out_, epoch, in_epoch)
        if self.steps_done == 3 and rank == 1:  # another driver takes the lease; rank 1 sees it first
            held = json.loads((cfg.run_dir / LEASE).read_text())
            (cfg.run_dir / LEASE).write_text(json.dumps({**held, "host": "host-b", "pid": 2, "token": "theirs"}))
        dist.barrier()

    Trainer._after_step = taken_after_step_3
    result = {"rank": rank}
    try:
        train_here(cfg, fence=Fence(cfg.run_dir, token))
    except LeaseLost as err:
        result["error"], result["last_step"] = str(err), steps[-1]
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def test_every_rank_stops_at_the_next_logging_step_once_the_lease_is_taken(tmp_path):
    shards = write_tiny_shards(tmp_path / "shards", [64, 64])  # 8 steps of batch 8 an epoch on each of 2 ranks
    tree = tiny_config(
        "ranks",
        shards,
        tmp_path / "runs",
        model={"width": 2},
        method={"name": "simclr", "proj_hidden_dim": 8, "proj_dim": 4},
        train={"log_every_steps": 2, "checkpoint_every_steps": 3},
    )
    run = parse_config(tree).run_dir
    lease = RunLease(run, host="host-a", heartbeat_every=3600)
    lease.acquire()
    try:
        mp.spawn(worker, args=(free_port(), tree, lease.record["token"], str(tmp_path)), nprocs=WORLD, join=True)
    finally:
        lease.release()
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    for r in results:  # both, at step 4 (the logging step after the takeover; the next checkpoint is at 6)
        assert r["error"].startswith(f"the lease of {run} was taken over") and r["last_step"] == 4, r
    assert "by pid 2 on host-b" in results[1]["error"]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2]  # step 4's record never written
    assert [c.name for c in list_checkpoints(run)] == ["samples-000000000048"]  # step 3's, the last before
    assert json.loads((run / LEASE).read_text())["token"] == "theirs"  # the new driver's lease left alone
