import json

import pytest

from selfsup.core.checkpoint import latest_checkpoint, load_checkpoint
from selfsup.train.budget import SIZING_STEPS, TimeBudget
from tests.helpers import fit, tiny_experiment


def config(tmp_path, shards, minutes):
    return tiny_experiment(
        "budget",
        shards,
        tmp_path / "runs",
        model={"width": 2},
        method={"proj_hidden_dim": 8, "proj_dim": 4},
        optim={"epochs": 2, "minutes": minutes, "warmup_epochs": 0.1},
        train={"log_every_steps": 5, "checkpoint_every_steps": 1000},
    )


def test_the_budget_fits_the_remaining_time_and_never_exceeds_the_plan():
    assert TimeBudget(1.0, planned=10_000, start_step=0, started=0.0).fit(20, now=10, seconds_per_step=0.5) == 20 + 100
    assert TimeBudget(100.0, planned=300, start_step=0, started=0.0).fit(20, 10, 0.5) == 300
    assert TimeBudget(0.1, planned=300, start_step=0, started=0.0).fit(20, 60, 0.5) == 21  # over time: one more step


def test_the_reserve_is_the_time_of_its_steps_at_the_current_pace():
    budget = TimeBudget(1.0, planned=10_000, start_step=0, started=0.0, reserve_steps=30)
    assert budget.fit(20, now=10, seconds_per_step=0.5) == 20 + (50 - 15) * 2  # 50 s left, 15 s reserved
    assert budget.fit(20, now=10, seconds_per_step=1.0) == 20 + (50 - 24)  # slower: 30 s, at most 40% of 60 s
    assert budget.fit(20, now=10, seconds_per_step=0.2) == 20 + int((50 - 6) / 0.2)  # faster: 6 s


def test_the_budget_sizes_after_the_sizing_steps_then_refits_as_the_pace_changes():
    budget = TimeBudget(1.0, planned=10_000, start_step=100, started=0.0, resize_every=10)
    assert budget.update(101, now=5.0) is None  # a slow first step (start-up): left out of the pace
    assert [budget.update(101 + i, now=5.0 + 0.5 * i) for i in range(1, SIZING_STEPS)] == [None] * (SIZING_STEPS - 1)
    now, step = 5.0 + 0.5 * SIZING_STEPS, 101 + SIZING_STEPS
    assert budget.update(step, now) == step + int((60 - now) / 0.5)  # 0.5 s a step
    assert [budget.update(step + i, now + 0.5 * i) for i in range(1, 10)] == [None] * 9
    # the next 10 steps took 1.5 s each (another program took a core): the pace is the mean of 0.5 and 1.5
    now, step = now + 15.0, step + 10
    assert budget.update(step, now) == step + int((60 - now) / 1.0)
    # a later window back at 0.5 s moves the pace halfway back: 0.75 s
    now, step = now + 5.0, step + 10
    assert budget.update(step, now) == step + int((60 - now) / 0.75)


def test_steps_left_out_of_the_pace_still_spend_their_time():
    budget = TimeBudget(1.0, planned=10_000, start_step=0, started=0.0, sizing_steps=10)
    now, sized = 1.0, []
    budget.update(1, now)
    for step in range(2, 12):  # steps 2-6: a thread trial at 3 s a step, left out; 7-11 at 0.5 s
        now += 3.0 if step <= 6 else 0.5
        sized.append(budget.update(step, now, timed=step > 6))
    assert sized[:-1] == [None] * 9 and now == 18.5
    assert budget.pace == 0.5  # (18.5 - 1 - 15 s) / (11 - 1 - 5 steps); with the trial it would be 1.75
    assert sized[-1] == 11 + int((60 - 18.5) / 0.5)  # the 15 s the trial took are spent all the same


@pytest.mark.parametrize("minutes, expected", [(1e-5, SIZING_STEPS + 2), (600, 62)])
def test_a_time_budget_cuts_the_run_and_is_kept_on_resume(tmp_path, tiny_shards, minutes, expected):
    cfg = config(tmp_path, tiny_shards, minutes)  # 250 samples / 8 = 31 steps an epoch, 62 planned
    summary = fit(cfg)
    assert summary["steps"] == summary["total_steps"] == expected
    _, _, state = load_checkpoint(latest_checkpoint(cfg.run_dir), with_state=True)
    assert state.sized_total_steps == expected
    # resuming a finished run trains no further
    again = fit(cfg, latest_checkpoint(cfg.run_dir))
    assert again["steps"] == expected
    logged = [json.loads(line)["step"] for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert max(logged) == expected
