"""train.adapt_threads: the thread count whose steps are faster is kept, and tried again later."""

from __future__ import annotations

import torch

from selfsup.train.threads import ThreadTuner


def run(tuner: ThreadTuner, seconds_at: dict[int, float], steps: int, now: float = 0.0) -> float:
    for _ in range(steps):
        now += seconds_at[torch.get_num_threads()]
        tuner.update(now)
    return now


def test_one_thread_is_kept_when_it_is_faster_and_the_choice_is_tried_again(caplog):
    before = torch.get_num_threads()
    try:
        tuner = ThreadTuner(2, trial_steps=3, retry_every=20)
        with caplog.at_level("WARNING", logger="selfsup.pretrain"):
            now = run(tuner, {2: 1.0, 1: 0.25}, steps=1 + 3 + 3)  # the first step, then 3 timed at each count
        assert tuner.chosen == 1 and torch.get_num_threads() == 1
        assert "training with 1 of 2 CPU threads: 1 ran 0.25 s a step, 2 ran 1.00 s a step" in caplog.text
        now = run(tuner, {2: 1.0, 1: 0.25}, steps=19, now=now)
        assert torch.get_num_threads() == 1  # no trial before retry_every steps
        run(tuner, {2: 0.2, 1: 0.25}, steps=1 + 3 + 3, now=now)  # the other program has gone
        assert tuner.chosen == 2 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_a_single_thread_is_left_alone():
    tuner = ThreadTuner(1)
    run(tuner, {torch.get_num_threads(): 0.1}, steps=30)
    assert tuner.chosen == 1


def test_the_steps_timed_for_a_trial_are_flagged_and_no_other():
    before = torch.get_num_threads()
    try:
        tuner, flags, now = ThreadTuner(2, trial_steps=3, retry_every=20), [], 0.0
        for _ in range(10):
            now += {2: 1.0, 1: 0.25}[torch.get_num_threads()]
            tuner.update(now)
            flags.append(tuner.trial_step)
        # step 1 starts the trial (its time belongs to the count before); 2-4 time 2 threads, 5-7 one
        assert flags == [False, True, True, True, True, True, True, False, False, False]
    finally:
        torch.set_num_threads(before)
