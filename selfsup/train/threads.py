"""Torch's CPU threads chosen by the pace they give (``train.adapt_threads``).

With another program on some of the cores, fewer threads than cores train faster: every parallel
region waits for its slowest thread, and the one that shares a core with the other program is slow
(on 2 cores with one kept busy, 2 threads ran a width-8 ResNet-18 at 90 img/s, 1 thread at 340).
"""

from __future__ import annotations

import logging
import statistics

import torch

log = logging.getLogger("selfsup.pretrain")

TRIAL_STEPS = 5  # steps timed at each thread count in a trial
RETRY_EVERY = 250  # steps between trials (the other program may come or go)


class ThreadTuner:
    """Times ``trial_steps`` steps at ``most`` threads, then as many at one thread, keeps the faster
    (the median step time of each), and tries again every ``retry_every`` steps. ``update(now)`` is
    called after every step with ``time.perf_counter()``; ``chosen`` is the count in use."""

    def __init__(self, most: int, trial_steps: int = TRIAL_STEPS, retry_every: int = RETRY_EVERY):
        self.most, self.trial_steps, self.retry_every = most, trial_steps, retry_every
        self.chosen, self.steps = most, 0
        self.last: float | None = None
        self.trial_step = False  # the last step was timed for a trial (its pace is not the chosen count's)
        self.trial: list[int] = []  # the counts still to time, the one being timed first
        self.times: dict[int, list[float]] = {}
        self.next_trial = 1  # steps after which the next trial starts

    def update(self, now: float) -> None:
        self.steps, previous, self.last = self.steps + 1, self.last, now
        self.trial_step = False
        if self.most <= 1:
            return
        if not self.trial and self.steps >= self.next_trial:
            self.trial, self.times = [self.most, 1], {}
            torch.set_num_threads(self.most)
            return  # this step's time still belongs to the previous count
        if not self.trial or previous is None:
            return
        times = self.times.setdefault(self.trial[0], [])
        times.append(now - previous)
        self.trial_step = True
        if len(times) < self.trial_steps:
            return
        self.trial.pop(0)
        if self.trial:
            torch.set_num_threads(self.trial[0])
            return
        self._choose()

    def _choose(self) -> None:
        pace = {count: statistics.median(times) for count, times in self.times.items()}
        best = min(pace, key=lambda count: pace[count])
        if best != self.chosen or best != self.most:
            log.warning(
                "training with %d of %d CPU threads: %s (the data loader or another program is using a core)",
                best,
                self.most,
                ", ".join(f"{count} ran {seconds:.2f} s a step" for count, seconds in sorted(pace.items())),
            )
        self.chosen, self.next_trial = best, self.steps + self.retry_every
        torch.set_num_threads(best)
