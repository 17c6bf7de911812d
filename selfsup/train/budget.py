"""A wall-time budget (``optim.minutes``): the run's length is fitted to the steps that fit, and
re-fitted as the pace changes (another program taking a core, a slower phase of the data)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from selfsup.core.distributed import world_size

SIZING_STEPS = 20  # steps timed, after the first one, before a time-budgeted run first fixes its length
RESIZE_EVERY = 25  # steps between later re-fits, each at the pace of the steps since the one before
MAX_RESERVE_SHARE = 0.4  # of the budget, at most, for ``reserve_steps``: a pace misjudged slow (a spike in the
# first steps) cannot leave training a handful of steps; the re-fits correct the pace, not the lost steps


class TimeBudget:
    """Sizes a run that must end ``minutes`` after ``started`` (a ``time.perf_counter()`` value), at
    ``start_step``, leaving the time of ``reserve_steps`` more steps at the current pace free (work
    that follows and slows with the machine), and that never goes beyond ``planned`` steps.

    ``update(step, now)`` is called after every step; it returns the new total steps when the run is
    (re)sized, else None. The pace is timed from the end of the first step (its start-up left out);
    the run is sized once ``sizing_steps`` more steps are timed, then again every ``resize_every``
    steps at the pace since the previous sizing, averaged with the pace before it (``pace``, seconds
    a step), so that one slow window (a checkpoint, the online monitor) moves the plan only halfway.
    """

    def __init__(
        self,
        minutes: float,
        planned: int,
        start_step: int,
        started: float,
        reserve_steps: int = 0,
        sizing_steps: int = SIZING_STEPS,
        resize_every: int = RESIZE_EVERY,
    ):
        self.minutes, self.planned, self.start_step, self.started = minutes, planned, start_step, started
        self.reserve_steps = reserve_steps
        self.next_sizing, self.resize_every = sizing_steps + 1, resize_every
        self.paced_from: tuple[int, float] | None = None  # (step, time) the current window starts at
        self.untimed = (0, 0.0)  # steps of the window left out of its pace, and their seconds
        self.pace: float | None = None
        self.last: float | None = None

    def update(self, step: int, now: float, timed: bool = True) -> int | None:
        """``timed`` False: this step's time says nothing of the pace to come (a thread-count trial) and
        is left out of it, though the time it took is spent."""
        done, previous, self.last = step - self.start_step, self.last, now
        if done == 1:
            self.paced_from, self.untimed = (step, now), (0, 0.0)
        elif not timed and self.paced_from is not None and previous is not None:  # both set at the first step
            self.untimed = (self.untimed[0] + 1, self.untimed[1] + now - previous)
        if done < self.next_sizing or self.paced_from is None:
            return None
        (paced_step, paced_time), (untimed_steps, untimed_seconds) = self.paced_from, self.untimed
        if step - paced_step <= untimed_steps:  # nothing timed in this window yet
            return None
        window = (now - paced_time - untimed_seconds) / (step - paced_step - untimed_steps)
        self.pace = window if self.pace is None else (self.pace + window) / 2
        self.paced_from, self.untimed, self.next_sizing = (step, now), (0, 0.0), done + self.resize_every
        return self.fit(step, now, self.pace)

    def fit(self, step: int, now: float, seconds_per_step: float) -> int:
        """Total steps of the run if the rest goes at ``seconds_per_step``: at least one more, at most
        ``planned``; every rank gets the smallest answer so that all take the same steps."""
        reserve = min(self.reserve_steps * seconds_per_step, MAX_RESERVE_SHARE * self.minutes * 60)
        left = max(0.0, self.minutes * 60 - (now - self.started) - reserve)
        total = torch.tensor(max(step + 1, min(self.planned, step + int(left / max(seconds_per_step, 1e-9)))))
        if world_size() > 1:
            dist.all_reduce(total, op=dist.ReduceOp.MIN)
        return int(total)
