"""Codebook health monitor: catches quantiser collapse during wav2vec 2.0 pretraining.

Feed it the objective's metrics every N steps (``update(step, metrics)``). It warns when
- the codebook perplexity falls towards G, the value of a collapsed codebook (one entry per group):
  below ``collapse_factor * G``; or
- within the last ``window`` records, the contrastive accuracy climbs while the perplexity falls:
  the model is winning the task by using fewer codes, the usual prelude to collapse.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass

_LOG = logging.getLogger(__name__)


class CodebookCollapse(RuntimeError):
    """Raised by :class:`CodebookHealthMonitor` with ``raise_on_alarm=True``."""


@dataclass(frozen=True)
class HealthRecord:
    step: int
    accuracy: float
    perplexity: float


class CodebookHealthMonitor:
    """Keeps a history of (step, accuracy, perplexity) and raises alarms; a health monitor
    (``selfsup.core.objective.HealthMonitor``) that the loop logs as ``codebook_alarms``.

    groups: G; perplexity_key: which metric to watch (``perplexity_hard`` or ``perplexity_soft``);
    collapse_factor: alarm when perplexity < collapse_factor * G; window: records compared by the
    trend alarm; accuracy_rise: absolute accuracy increase and perplexity_drop: relative perplexity
    decrease (first vs last record of the window) that together trigger it.
    """

    name = "codebook"

    def __init__(
        self,
        groups: int = 2,
        perplexity_key: str = "perplexity_hard",
        collapse_factor: float = 2.0,
        window: int = 5,
        accuracy_rise: float = 0.05,
        perplexity_drop: float = 0.3,
        raise_on_alarm: bool = False,
    ):
        if window < 2:
            raise ValueError("window must be at least 2 records")
        self.groups = groups
        self.perplexity_key = perplexity_key
        self.collapse_factor = collapse_factor
        self.accuracy_rise = accuracy_rise
        self.perplexity_drop = perplexity_drop
        self.raise_on_alarm = raise_on_alarm
        self.history: list[HealthRecord] = []
        self._window: deque[HealthRecord] = deque(maxlen=window)

    def update(self, step: int, metrics: Mapping[str, float]) -> list[str]:
        """Record ``metrics`` (floats or 0-d tensors with ``accuracy`` and the perplexity key) at
        ``step``; return the alarms raised now (also logged as warnings), or raise CodebookCollapse."""
        record = HealthRecord(step, float(metrics["accuracy"]), float(metrics[self.perplexity_key]))
        self.history.append(record)
        self._window.append(record)
        alarms = []
        floor = self.collapse_factor * self.groups
        if record.perplexity < floor:
            alarms.append(
                f"step {step}: codebook collapse: {self.perplexity_key} {record.perplexity:.2f} < "
                f"{floor:.2f} ({self.collapse_factor} x G={self.groups}); the quantiser uses almost "
                "one entry per group. Raise diversity_weight or the Gumbel temperature, or lower the LR."
            )
        if len(self._window) == self._window.maxlen:
            first, last = self._window[0], self._window[-1]
            rise = last.accuracy - first.accuracy
            drop = 1.0 - last.perplexity / max(first.perplexity, 1e-12)
            if rise >= self.accuracy_rise and drop >= self.perplexity_drop:
                alarms.append(
                    f"step {step}: accuracy rose {first.accuracy:.3f} -> {last.accuracy:.3f} while "
                    f"{self.perplexity_key} fell {first.perplexity:.1f} -> {last.perplexity:.1f} since "
                    f"step {first.step}: the contrastive task is being solved by shrinking the codebook."
                )
        for alarm in alarms:
            _LOG.warning(alarm)
        if alarms and self.raise_on_alarm:
            raise CodebookCollapse("; ".join(alarms))
        return alarms
