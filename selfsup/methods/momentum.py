"""Momentum (EMA) encoders: the in-place update and the cosine momentum schedule."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from selfsup.core.objective import Progress


def momentum_copy(online: nn.Module) -> nn.Module:
    """A frozen copy of ``online`` to be the momentum (target/key) network: same weights, no gradient."""
    target = copy.deepcopy(online)
    target.requires_grad_(False)
    return target


@torch.no_grad()
def update_momentum(target: nn.Module, online: nn.Module, m: float, accepted: torch.Tensor | None = None) -> None:
    """``target ← m·target + (1−m)·online`` for every parameter, in place, when ``accepted``.

    ``accepted``: 0-d bool tensor (None: True). On a rejected step the weight of ``online`` is 0 and
    ``target`` stays exactly as it was, decided on the device. Parameters only: the target's
    BatchNorm statistics come from its own forward passes, as in MoCo and BYOL. ``target`` must be a
    copy of ``online`` (same parameters, same order).
    """
    target_params: list[torch.Tensor] = list(target.parameters())
    online_params: list[torch.Tensor] = list(online.parameters())
    if len(target_params) != len(online_params):
        raise ValueError(f"target has {len(target_params)} parameters, online has {len(online_params)}")
    step = torch._foreach_sub(online_params, target_params)
    if accepted is not None:  # a tensor factor: _foreach_lerp_ would read a 0-d weight on the host
        torch._foreach_mul_(step, accepted.to(step[0].dtype))
    torch._foreach_add_(target_params, step, alpha=1.0 - m)


def cosine_momentum(base: float, progress: Progress) -> float:
    """BYOL's schedule: ``1 − (1 − base)·(cos(π·fraction) + 1)/2``, from ``base`` at the start to 1 at the end."""
    return 1.0 - (1.0 - base) * (math.cos(math.pi * progress.fraction) + 1.0) / 2.0
