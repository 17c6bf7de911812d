"""What the vision methods share: the objective's capabilities, the collapse monitor on forward's
embedding, all trainable parameters in one group, and the step-end work that must wait for the loop
to accept the step (momentum updates, BatchNorm running statistics)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from selfsup.core.collapse import CollapseMonitor
from selfsup.core.objective import Progress
from selfsup.methods.heads import MLPHead
from selfsup.methods.momentum import momentum_copy, update_momentum


class RunningStats:
    """The BatchNorm running statistics of a module as they were before its last training forward.

    ``save(module)`` flattens them (one copy per dtype); ``keep_if(accepted)`` puts them back unless
    the step was accepted (0-d bool tensor), in a few kernels and without a host sync. A non-finite
    batch would otherwise leave NaN running statistics, and NaN features at evaluation, for good.
    """

    def __init__(self):
        self.saved: list[tuple[list[torch.Tensor], torch.Tensor]] = []

    def save(self, module: nn.Module) -> None:
        groups: dict[torch.dtype, list[torch.Tensor]] = {}
        for m in module.modules():
            if isinstance(m, _BatchNorm) and m.track_running_stats:
                for buf in (m.running_mean, m.running_var, m.num_batches_tracked):
                    if buf is not None:  # all three, with track_running_stats
                        groups.setdefault(buf.dtype, []).append(buf)
        self.saved = [(bufs, torch.cat([b.reshape(-1) for b in bufs])) for bufs in groups.values()]

    @torch.no_grad()
    def keep_if(self, accepted: torch.Tensor | None) -> None:
        if accepted is not None:
            for bufs, before in self.saved:
                kept = torch.where(accepted, torch.cat([b.reshape(-1) for b in bufs]), before)
                torch._foreach_copy_(bufs, [k.view_as(b) for k, b in zip(kept.split([b.numel() for b in bufs]), bufs)])
        self.saved = []


def by_size(views: list[torch.Tensor]) -> list[torch.Tensor]:
    """Consecutive views of one size as one batch: [(B, C, S, S)] * V -> [(n·B, C, S, S)] per size."""
    groups: list[list[torch.Tensor]] = []
    for v in views:
        if groups and groups[-1][0].shape[-2:] == v.shape[-2:]:
            groups[-1].append(v)
        else:
            groups.append([v])
    return [torch.cat(g) if len(g) > 1 else g[0] for g in groups]


class Method(nn.Module):
    """Base of the vision methods (``selfsup.core.objective.Objective``).

    Subclasses set ``encoder`` and ``projector`` (an ``MLPHead``: the collapse monitor watches its
    (B, out_dim) output, forward's ``"embedding"``), and name their momentum networks in
    ``momentum_pairs`` as (target attribute, online attribute), made by ``make_momentum_copies()``,
    with ``momentum(progress)`` giving m.
    ``on_after_step`` applies every side effect of the step only if the step was accepted.
    """

    encoder: nn.Module
    projector: MLPHead
    sync_batchnorm: bool
    find_unused_parameters: bool = False
    momentum_pairs: tuple[tuple[str, str], ...] = ()

    def __init__(self, cfg, sync_batchnorm: bool):
        super().__init__()
        self.cfg = cfg
        self.sync_batchnorm = sync_batchnorm
        self.running_stats = RunningStats()
        self.register_forward_pre_hook(_save_running_stats)

    def make_momentum_copies(self) -> None:
        """The frozen target networks named in ``momentum_pairs``, copied from their online networks."""
        for target, online in self.momentum_pairs:
            setattr(self, target, momentum_copy(getattr(self, online)))

    def momentum(self, progress: Progress) -> float:
        """The momentum m of the target networks at ``progress``."""
        raise NotImplementedError(f"{type(self).__name__} has momentum networks but no momentum schedule")

    def health_monitors(self) -> list[CollapseMonitor]:
        """The collapse alarm on the (B, D) embeddings ``forward`` returns."""
        return [CollapseMonitor(self.projector.out_dim)]

    def param_groups(self) -> list[dict]:
        return [{"params": [p for p in self.parameters() if p.requires_grad]}]

    def on_gradients(self, progress: Progress) -> None:
        """Before the optimiser step: the gradients as ``backward`` left them (a method may change them)."""

    def on_after_step(self, progress: Progress, accepted: torch.Tensor | None = None) -> None:
        """After the optimiser step: BatchNorm statistics put back unless ``accepted`` (0-d bool
        tensor; None: accepted), then the momentum networks updated towards the online ones if it was."""
        self.running_stats.keep_if(accepted)
        if self.momentum_pairs:
            m = self.momentum(progress)
            for target, online in self.momentum_pairs:
                update_momentum(getattr(self, target), getattr(self, online), m, accepted)


def _save_running_stats(method: Method, args) -> None:
    """Forward pre-hook: remember the BatchNorm statistics that a training forward is about to change."""
    if method.training:
        method.running_stats.save(method)
