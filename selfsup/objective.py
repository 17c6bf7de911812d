"""The contract between a pretraining objective and the training loop.

Vision methods (``selfsup.ssl``) and wav2vec 2.0 (``selfsup.audio``) implement :class:`Objective`;
``selfsup.pipelines.pretrain`` drives any of them without knowing which it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn


@dataclass(frozen=True)
class Progress:
    """Where training stands: ``step`` optimiser steps done out of ``total_steps`` planned."""

    step: int
    total_steps: int

    @property
    def fraction(self) -> float:
        """Share of training done, in [0, 1]."""
        return min(1.0, self.step / max(1, self.total_steps))


@runtime_checkable
class Objective(Protocol):
    """A self-supervised objective: an ``nn.Module`` with these methods.

    - ``forward(batch, progress)`` returns a dict with a scalar ``"loss"`` that carries gradient,
      plus any number of scalar metrics (detached tensors; the loop calls ``.item()`` only when it logs),
      and optionally ``"embedding"``: a detached (B, D) batch of embeddings whose collapse statistics
      (std, RankMe) the loop computes at logging steps only.
    - ``on_after_step(progress)`` runs after every optimiser step (momentum/EMA updates, annealing).
    - ``param_groups()`` returns optimiser parameter groups; a group with ``"fixed_lr": True`` keeps
      its base learning rate (SimSiam's predictor), ``"weight_decay": 0.0`` exempts a group.
    - ``encoder`` is the module that is evaluated and exported (backbone only, no heads).
    """

    encoder: nn.Module

    def forward(self, batch: Any, progress: Progress) -> dict[str, torch.Tensor]: ...

    def on_after_step(self, progress: Progress) -> None: ...

    def param_groups(self) -> list[dict[str, Any]]: ...
