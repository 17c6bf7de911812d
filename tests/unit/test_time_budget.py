import json

import pytest

from selfsup.config import parse_config
from selfsup.pipelines.checkpoint import latest_checkpoint, load_checkpoint
from selfsup.pipelines.pretrain import SIZING_STEPS, FileReporter, pretrain, steps_in_budget


def config(tmp_path, shards, minutes):
    return parse_config({
        "name": "budget", "run_root": str(tmp_path / "runs"),
        "data": {"train": str(shards), "batch_size": 8, "loader_workers": 0},
        "model": {"width": 2}, "method": {"name": "simclr", "proj_hidden_dim": 8, "proj_dim": 4},
        "optim": {"epochs": 2, "minutes": minutes, "warmup_epochs": 0.1},
        "train": {"threads": 1, "log_every_steps": 5, "checkpoint_every_steps": 1000},
        "tracking": {"mode": "disabled"},
    })


def test_steps_in_budget_fits_the_remaining_time_and_never_exceeds_the_plan():
    assert steps_in_budget(1.0, seconds_so_far=10, seconds_per_step=0.5, step=20, planned=10_000) == 20 + 100
    assert steps_in_budget(100.0, 10, 0.5, 20, planned=300) == 300
    assert steps_in_budget(0.1, 60, 0.5, 20, planned=300) == 21  # already over time: one more step


@pytest.mark.parametrize("minutes, expected", [(1e-5, SIZING_STEPS + 2), (600, 62)])
def test_a_time_budget_cuts_the_run_and_is_kept_on_resume(tmp_path, tiny_shards, minutes, expected):
    cfg = config(tmp_path, tiny_shards, minutes)  # 250 samples / 8 = 31 steps an epoch, 62 planned
    summary = pretrain(cfg, FileReporter(cfg.run_dir))
    assert summary["steps"] == summary["total_steps"] == expected
    _, _, state = load_checkpoint(latest_checkpoint(cfg.run_dir), with_state=True)
    assert state["sized_total_steps"] == expected
    again = pretrain(cfg, FileReporter(cfg.run_dir))  # resuming a finished run trains no further
    assert again["steps"] == expected
    logged = [json.loads(l)["step"] for l in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert max(logged) == expected
