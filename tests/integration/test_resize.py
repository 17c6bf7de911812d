"""Elastic runs: a checkpoint written by 2 ranks resumes on 1 at the same point of the schedule, with this size's LR."""

from __future__ import annotations

import json

import pytest
import torch

from selfsup.config import parse_config
from selfsup.core.checkpoint import DIGEST, file_digest, latest_checkpoint
from selfsup.train.optim import lr_at, scaled_lr
from tests.helpers import tiny_config, write_tiny_shards
from tests.integration.test_determinism import Crash, CrashAfterCheckpoint, train

pytestmark = pytest.mark.integration


def test_resume_after_resize_keeps_the_schedule_and_rescales_the_lr(tmp_path):
    shards = write_tiny_shards(tmp_path / "shards", [20, 30, 14])  # 8 steps an epoch on 1 rank, 4 on 2
    cfg = parse_config(tiny_config("resize", shards, tmp_path / "runs", train={"checkpoint_every_steps": 4}))
    with pytest.raises(Crash):
        train(cfg, CrashAfterCheckpoint(4))
    # make the checkpoint look as if 2 ranks wrote it after 2 of their 4 steps, with their (doubled) LR
    ckpt = latest_checkpoint(cfg.run_dir)
    assert ckpt.name == "samples-000000000032"  # 4 steps x batch 8: the same name whatever the world size
    state = torch.load(ckpt / "state.pt", weights_only=True)
    state.update(step=2, step_in_epoch=2, rng=state["rng"] * 2)
    for group in state["optimizer"]["param_groups"]:
        group["base_lr"] *= 2
    torch.save(state, ckpt / "state.pt")
    progress = json.loads((ckpt / "progress.json").read_text())
    progress.update(
        step=2,
        step_in_epoch=2,
        world_size=2,  # and the new state.pt's record, as its writer's
        files={**progress["files"], "state.pt": (ckpt / "state.pt").stat().st_size},
        **{DIGEST: {**progress[DIGEST], "state.pt": file_digest(ckpt / "state.pt")}},
    )
    (ckpt / "progress.json").write_text(json.dumps(progress))
    assert latest_checkpoint(cfg.run_dir) == ckpt
    (cfg.run_dir / "metrics.jsonl").unlink()

    summary = train(cfg)
    assert summary["steps"] == 8 and summary["samples_seen"] == 64
    assert summary["checkpoint"] == str(latest_checkpoint(cfg.run_dir)) == str(ckpt.with_name("samples-000000000064"))
    records = [json.loads(x) for x in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [5, 6, 7, 8]  # 2 steps of 2 ranks = 4 steps of 1: the same 32 samples
    base = scaled_lr(0.1, 8, 256, "linear")  # batch 8 x world size 1
    assert records[0]["lr"] == pytest.approx(lr_at(4, 8, 1, base))
