"""The contract between a pretraining objective and the training loop.

Vision methods (``selfsup.methods``) and wav2vec 2.0 (``selfsup.audio``) implement :class:`Objective`;
``selfsup.train.trainer`` drives any of them without knowing which it is.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn


@dataclass(frozen=True)
class Progress:
    """Where training stands: ``step`` optimiser steps done out of ``total_steps`` planned, at
    ``steps_per_epoch`` steps an epoch (the loop always gives it; schedules by epoch need it)."""

    step: int
    total_steps: int
    steps_per_epoch: int | None = None

    @property
    def fraction(self) -> float:
        """Share of training done, in [0, 1]."""
        return min(1.0, self.step / max(1, self.total_steps))

    @property
    def epoch(self) -> float:
        """Epochs done (fractional): ``step / steps_per_epoch``."""
        if not self.steps_per_epoch:
            raise ValueError("this Progress has no steps_per_epoch: an epoch schedule cannot follow it")
        return self.step / self.steps_per_epoch


class HealthMonitor(Protocol):
    """Turns logged records into alarms; the loop runs it on rank 0 at logging steps and records the
    number of alarms raised as ``<name>_alarms``.

    ``update(step, record)`` takes one logged record (floats) and returns the alarms raised now,
    each also logged as a warning.
    """

    name: str

    def update(self, step: int, record: Mapping[str, float]) -> list[str]: ...


@runtime_checkable
class Objective(Protocol):
    """A self-supervised objective: an ``nn.Module`` with these methods and capabilities.

    - ``forward(batch, progress)`` returns a dict with a scalar ``"loss"`` that carries gradient,
      plus any number of scalar metrics (detached tensors; the loop calls ``.item()`` only when it logs),
      and optionally ``"embedding"``: a detached (B, D) batch of embeddings whose collapse statistics
      (std, RankMe) the loop computes at logging steps only.
    - ``on_after_step(progress, accepted)`` runs after every optimiser step; ``accepted`` is a 0-d
      bool device tensor, False when the loop skipped the step (NaN/inf loss). Every side effect of
      the step (queue pushes, momentum/EMA updates, statistics changed in ``forward``) is applied
      here and only where ``accepted``, with tensor arithmetic (no host sync); None means accepted.
      Schedules that follow ``progress`` (annealing) need not look at it.
    - ``on_gradients(progress)`` runs after ``backward`` (and the loop's ``optim.grad_clip``), before the
      optimiser step: the objective's own in-place changes to its gradients (DINO's per-parameter
      clipping, its last layer frozen in the first epoch), without a host sync.
    - ``param_groups()`` returns optimiser parameter groups; a group with ``"fixed_lr": True`` keeps
      its base learning rate (SimSiam's predictor), ``"weight_decay": 0.0`` exempts a group.
    - ``encoder`` is the module that is evaluated and exported (backbone only, no heads).
    - ``sync_batchnorm``: the loop converts BatchNorm to BatchNorm over the global batch when there is
      more than one rank (``selfsup.core.distributed.convert_sync_batchnorm``).
    - ``find_unused_parameters``: some parameters may get no gradient in a step (DDP must look for them).
    - ``health_monitors()``: fresh monitors of this objective's logged records (see :class:`HealthMonitor`).
    """

    # read-only to the loop: an objective's own encoder type (a subclass of nn.Module) satisfies it
    @property
    def encoder(self) -> nn.Module: ...

    @property
    def sync_batchnorm(self) -> bool: ...

    @property
    def find_unused_parameters(self) -> bool: ...

    def forward(self, batch: Any, progress: Progress) -> dict[str, torch.Tensor]: ...

    def on_gradients(self, progress: Progress) -> None: ...

    def on_after_step(self, progress: Progress, accepted: torch.Tensor | None = None) -> None: ...

    def param_groups(self) -> list[dict[str, Any]]: ...

    def health_monitors(self) -> Sequence[HealthMonitor]: ...

    # an nn.Module's, which the loop, the checkpoints and the evaluation use
    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]: ...

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any: ...

    def train(self, mode: bool = True) -> Any: ...
