"""Optimisers and the learning-rate schedule: SGD, LARS or AdamW; linear warm-up then cosine or linear decay."""

from __future__ import annotations

import math

import torch
from torch.optim import Optimizer


class LARS(Optimizer):
    """SGD with momentum and layer-wise trust ratios (You et al. 2017), as SimCLR and BYOL use it.

    Parameters with ``lars_exclude=True`` in their group (biases, norms) get plain SGD. Like torch's
    fused optimisers, a ``found_inf`` attribute (0-d tensor, non-zero = skip) set before ``step``
    leaves parameters and momentum untouched, decided on the device without a host sync.
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0, eta: float = 0.001):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, lars_exclude=False))

    @torch.no_grad()
    def step(self, closure=None):
        found_inf = getattr(self, "found_inf", None)
        keep = None if found_inf is None else found_inf == 0
        for group in self.param_groups:
            momentum, neg_lr = group["momentum"], -group["lr"]
            if keep is not None:  # a skipped step: zero update, momentum kept as it is
                momentum, neg_lr = torch.where(keep, momentum, 1.0), torch.where(keep, neg_lr, 0.0)
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad.add(p, alpha=group["weight_decay"]) if group["weight_decay"] else p.grad.clone()
                if keep is not None:
                    d = torch.where(keep, d, 0.0)
                if not group["lars_exclude"]:
                    pn, dn = torch.linalg.vector_norm(p), torch.linalg.vector_norm(d)
                    trust = torch.where((pn > 0) & (dn > 0), group["eta"] * pn / dn, torch.ones_like(pn))
                    d.mul_(trust)
                buf = self.state[p]["momentum_buffer"]  # primed (prime_state)
                buf.mul_(momentum).add_(d)
                if keep is None:
                    p.add_(buf, alpha=neg_lr)
                else:
                    p.addcmul_(buf, neg_lr)


def scaled_lr(base_lr: float, global_batch: int, reference_batch: int, rule: str) -> float:
    """The learning rate for ``global_batch``: linear (lr·B/ref), sqrt (lr·sqrt(B/ref)) or unchanged."""
    ratio = global_batch / reference_batch
    return base_lr * {"linear": ratio, "sqrt": math.sqrt(ratio), "none": 1.0}[rule]


def split_decay(groups: list[dict]) -> list[dict]:
    """Split each group into weight-decayed params (ndim > 1) and exempt ones (biases, norms)."""
    out = []
    for g in groups:
        params = [p for p in g["params"] if p.requires_grad]
        decay = [p for p in params if p.ndim > 1]
        exempt = [p for p in params if p.ndim <= 1]
        rest = {k: v for k, v in g.items() if k != "params"}
        if decay:
            out.append({**rest, "params": decay})
        if exempt:
            out.append({**rest, "params": exempt, "weight_decay": 0.0, "lars_exclude": True})
    return out


def build_optimizer(groups: list[dict], cfg, lr: float) -> Optimizer:
    """The optimiser named by ``cfg.name`` over ``groups`` (from ``Objective.param_groups``), its state
    primed (``prime_state``). SGD and AdamW are torch's fused kernels (CPU and CUDA); all three honour
    ``found_inf`` (see LARS)."""
    groups = split_decay(groups)
    for g in groups:
        g.setdefault("weight_decay", cfg.weight_decay)
        g["base_lr"], g["base_weight_decay"] = lr, g["weight_decay"]
    clean = [{k: v for k, v in g.items() if k != "lars_exclude"} for g in groups]
    optimizer: torch.optim.Optimizer
    if cfg.name == "sgd":
        optimizer = torch.optim.SGD(clean, lr=lr, momentum=cfg.momentum, fused=True)
    elif cfg.name == "adamw":
        optimizer = torch.optim.AdamW(clean, lr=lr, betas=cfg.betas, eps=cfg.eps, fused=True)
    else:
        optimizer = LARS(groups, lr=lr, momentum=cfg.momentum, eta=cfg.lars_eta)
    prime_state(optimizer)
    return optimizer


def prime_state(optimizer: Optimizer) -> None:
    """Give every parameter its momentum buffer before the first step, zero, and every state tensor of a
    parameter's shape that parameter's strides; call it again after ``load_state_dict``.

    torch's fused SGD makes its buffers with ``empty_like`` on its first step and returns early when
    ``found_inf`` is set: a rejected first step would leave them uninitialised for the next. A zero
    buffer gives the first step's update exactly (``0·momentum + grad``). The fused kernels also need
    params, grads and state to share strides, which a checkpoint written in another memory format
    (CPU contiguous, resumed on CUDA channels_last) does not give.
    """
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state[p]
            if group.get("momentum") and "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p)
            for key, value in state.items():
                if torch.is_tensor(value) and value.shape == p.shape and value.stride() != p.stride():
                    state[key] = torch.empty_like(p, dtype=value.dtype).copy_(value)


def lr_at(
    step: int, total_steps: int, warmup_steps: int, base_lr: float, final_fraction: float = 0.0, decay: str = "cosine"
) -> float:
    """Linear warm-up from 0 over ``warmup_steps``, then ``decay`` to ``final_fraction·base_lr`` at
    ``total_steps``: "cosine", or "linear" (fairseq's ``polynomial_decay`` with power 1, as wav2vec 2.0)."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    t = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    left = 1 - t if decay == "linear" else 0.5 * (1 + math.cos(math.pi * t))
    return base_lr * (final_fraction + (1 - final_fraction) * left)


def set_lr(
    optimizer: Optimizer,
    step: int,
    total_steps: int,
    warmup_steps: int,
    decay: str = "cosine",
    weight_decay_end: float | None = None,
) -> float:
    """Apply the schedule (``decay``: "cosine" or "linear", ``OptimConfig.decay``) to every group (groups
    marked ``fixed_lr`` keep their base LR); returns the LR. With ``weight_decay_end``, each decayed
    group's weight decay follows a cosine from its base value to it over the run (DINO's schedule)."""
    lr = 0.0
    for g in optimizer.param_groups:
        if weight_decay_end is not None and g.get("base_weight_decay"):
            left = (1 + math.cos(math.pi * min(1.0, step / max(1, total_steps)))) / 2
            g["weight_decay"] = weight_decay_end + (g["base_weight_decay"] - weight_decay_end) * left
        if g.get("fixed_lr"):
            g["lr"] = g["base_lr"]
        else:
            g["lr"] = lr = lr_at(step, total_steps, warmup_steps, g["base_lr"], decay=decay)
    return lr
