"""Seeded, deterministic CPU runs: 2N steps straight == N steps, a crash, a resume, N more (within 1e-6)."""

from __future__ import annotations

import pytest
import torch

from selfsup.config import parse_config
from selfsup.core.checkpoint import latest_checkpoint
from tests.helpers import fit, tiny_config, write_tiny_shards

pytestmark = pytest.mark.integration


class Crash(RuntimeError):
    pass


class CrashAfterCheckpoint:
    """Reporter sink that raises right after the checkpoint of step ``at`` is written (as a killed
    process would stop)."""

    def __init__(self, at: int):
        self.at = at

    def checkpoint(self, step, path, metrics):
        if step == self.at:
            raise Crash(f"injected at step {step}")


def train(cfg, *sinks):
    """Train ``cfg`` from its latest checkpoint, reporting to its files and ``sinks``."""
    return fit(cfg, latest_checkpoint(cfg.run_dir), *sinks)


def _weights(run_dir):
    return torch.load(latest_checkpoint(run_dir) / "model.pt", weights_only=True)


@pytest.mark.parametrize("crash_at", [5, 8])  # mid-epoch, and exactly at the epoch boundary
def test_crash_and_resume_gives_the_same_weights(tmp_path, crash_at):
    shards = write_tiny_shards(tmp_path / "shards", [20, 30, 14])  # 8 steps an epoch
    tree = tiny_config(
        "det",
        shards,
        tmp_path / "straight",
        seed=11,
        deterministic=True,
        optim={"epochs": 2, "name": "sgd", "warmup_epochs": 0.5},
        train={"checkpoint_every_steps": 1, "keep_checkpoints": 1},
        data={"loader_workers": 1, "shuffle_buffer": 8},
    )
    straight = parse_config(tree)
    assert train(straight)["steps"] == 16

    resumed = parse_config(tree, [f"run_root={tmp_path / 'resumed'}"])
    with pytest.raises(Crash):
        train(resumed, CrashAfterCheckpoint(crash_at))
    assert latest_checkpoint(resumed.run_dir).name == f"samples-{8 * crash_at:012d}"  # batch 8, one rank
    summary = train(resumed)
    assert summary["steps"] == 16
    assert (
        summary["checkpoint"]
        == str(latest_checkpoint(resumed.run_dir))
        == str(resumed.run_dir / "checkpoints" / f"samples-{8 * 16:012d}")
    )  # the one written last

    a, b = _weights(straight.run_dir), _weights(resumed.run_dir)
    assert a.keys() == b.keys()
    worst = max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point())
    assert worst <= 1e-6
