"""A wall-time budget (``optim.minutes``): the run's length is cut to the steps that fit."""

from __future__ import annotations

import torch
import torch.distributed as dist

from selfsup.core.distributed import world_size

SIZING_STEPS = 20  # steps timed, after the first one, before a time-budgeted run fixes its length


class TimeBudget:
    """Sizes a run that must end ``minutes`` after ``started`` (a ``time.perf_counter()`` value), at
    ``start_step``, and that never goes beyond ``planned`` steps.

    ``update(step, now)`` is called after every step; it returns the new total steps when the run is
    (re)sized, else None. The pace is timed from the end of the first step (its start-up left out),
    and the run is sized once ``sizing_steps`` more steps are timed. ``next_sizing`` (steps since the
    start at which the next sizing is due) is then None: setting it again re-sizes at the pace since
    the first step.
    """

    def __init__(self, minutes: float, planned: int, start_step: int, started: float,
                 sizing_steps: int = SIZING_STEPS):
        self.minutes, self.planned, self.start_step, self.started = minutes, planned, start_step, started
        self.next_sizing: int | None = sizing_steps + 1
        self.paced_from: tuple[int, float] | None = None  # (step, time) the pace is measured from

    def update(self, step: int, now: float) -> int | None:
        done = step - self.start_step
        if done == 1:
            self.paced_from = (step, now)
        if done != self.next_sizing or self.paced_from is None:
            return None
        self.next_sizing = None
        paced_step, paced_time = self.paced_from
        return self.fit(step, now, (now - paced_time) / (step - paced_step))

    def fit(self, step: int, now: float, seconds_per_step: float) -> int:
        """Total steps of the run if the rest goes at ``seconds_per_step``: at least one more, at most
        ``planned``; every rank gets the smallest answer so that all take the same steps."""
        left = max(0.0, self.minutes * 60 - (now - self.started))
        total = torch.tensor(max(step + 1, min(self.planned, step + int(left / max(seconds_per_step, 1e-9)))))
        if world_size() > 1:
            dist.all_reduce(total, op=dist.ReduceOp.MIN)
        return int(total)
