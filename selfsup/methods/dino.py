"""DINO (Caron et al. 2021): a student matches an EMA teacher's centred, sharpened outputs across views.

Following the official code (facebookresearch/dino, Apache-2.0, ``main_dino.py``): the student runs
every view (global and local crops, each size as one batch through the backbone, the head once over
all), the teacher only the global views; the teacher's outputs are centred by a running mean over the
global batch of every rank; the teacher's temperature warms up by epoch; the last head layer gets no
update in the first epoch; each parameter's gradient is clipped on its own.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from selfsup.config import DINOConfig
from selfsup.core.collapse import CollapseMonitor
from selfsup.core.distributed import world_size
from selfsup.core.objective import Progress
from selfsup.methods.base import Method, by_size
from selfsup.methods.heads import DINOHead
from selfsup.methods.losses import dino_loss
from selfsup.methods.momentum import cosine_momentum

N_GLOBAL = 2


class DINO(Method):
    """Student backbone + ``DINOHead``; EMA teacher backbone + head; a (1, out_dim) ``center`` buffer.

    ``forward(views, progress)`` -> {"loss", "embedding" (B, feature_dim): the student's backbone
    features of the first global view}; views: the 2 global views, then the local views by size.
    ``on_gradients`` clips and freezes, ``on_after_step`` moves the teacher and the center only if the
    step was accepted.
    """

    momentum_pairs = (("teacher_encoder", "encoder"), ("teacher_head", "head"))
    teacher_encoder: nn.Module
    teacher_head: nn.Module
    center: torch.Tensor  # a buffer

    def __init__(self, backbone: nn.Module, feature_dim: int, cfg: DINOConfig):
        super().__init__(cfg, sync_batchnorm=cfg.sync_bn)
        self.encoder, self.feature_dim = backbone, feature_dim
        self.head = DINOHead(
            feature_dim,
            cfg.out_dim,
            cfg.hidden_dim,
            cfg.bottleneck_dim,
            cfg.head_layers,
            cfg.use_bn_in_head,
            cfg.norm_last_layer,
        )
        self.make_momentum_copies()
        self.register_buffer("center", torch.zeros(1, cfg.out_dim))
        self.pending_center: torch.Tensor | None = None  # (1, out_dim) this step's batch mean, all ranks

    def forward(self, views: list[torch.Tensor], progress: Progress) -> dict[str, torch.Tensor]:
        if len(views) < N_GLOBAL:
            raise ValueError(f"dino needs {N_GLOBAL} global views, got {len(views)}")
        features = torch.cat([self.encoder(x) for x in by_size(views)])  # (V·B, feature_dim), view after view
        student = self.head(features)
        with torch.no_grad():
            teacher = self.teacher_head(self.teacher_encoder(torch.cat(views[:N_GLOBAL])))  # (G·B, out_dim)
            self.pending_center = self.batch_center(teacher)
        loss = dino_loss(student, teacher, self.center, N_GLOBAL, self.teacher_temp(progress), self.cfg.student_temp)
        return {"loss": loss, "embedding": features[: len(views[0])].detach()}

    @torch.no_grad()
    def batch_center(self, teacher: torch.Tensor) -> torch.Tensor:
        """The mean teacher output over the global batch of every rank: (n, out_dim) -> (1, out_dim)."""
        total = teacher.float().sum(0, keepdim=True)
        if world_size() > 1:
            torch.distributed.all_reduce(total)
        return total / (len(teacher) * world_size())

    def teacher_temp(self, progress: Progress) -> float:
        """The official schedule: linear from ``warmup_teacher_temp`` over the first epochs, by whole epoch."""
        c, epoch = self.cfg, math.floor(progress.epoch)
        if epoch < c.warmup_teacher_temp_epochs:
            return c.warmup_teacher_temp + (c.teacher_temp - c.warmup_teacher_temp) * epoch / max(
                1, c.warmup_teacher_temp_epochs - 1
            )
        return c.teacher_temp

    def momentum(self, progress: Progress) -> float:
        """The teacher's momentum: cosine from ``momentum_teacher`` to 1."""
        return cosine_momentum(self.cfg.momentum_teacher, progress)

    def health_monitors(self) -> list[CollapseMonitor]:
        """The collapse alarm on the (B, feature_dim) backbone features ``forward`` returns."""
        return [CollapseMonitor(self.feature_dim)]

    @torch.no_grad()
    def on_gradients(self, progress: Progress) -> None:
        """Each gradient's norm clipped to ``clip_grad`` (``clip / (norm + 1e-6)`` when below 1), then the
        last layer's gradients dropped while ``progress.epoch < freeze_last_layer_epochs``."""
        if self.cfg.clip_grad:
            grads = [p.grad for p in self.parameters() if p.grad is not None]
            norms = torch._foreach_norm(grads)
            torch._foreach_mul_(grads, [(self.cfg.clip_grad / (n + 1e-6)).clamp(max=1.0) for n in norms])
        if progress.epoch < self.cfg.freeze_last_layer_epochs:
            for p in self.head.last_layer.parameters():
                p.grad = None

    def on_after_step(self, progress: Progress, accepted: torch.Tensor | None = None) -> None:
        """BatchNorm statistics, the teacher and the center: moved only if ``accepted`` (0-d bool; None: accepted)."""
        super().on_after_step(progress, accepted)
        if self.pending_center is not None:
            m = self.cfg.center_momentum
            moved = self.center * m + self.pending_center.to(self.center.dtype) * (1 - m)
            self.center.copy_(moved if accepted is None else torch.where(accepted, moved, self.center))
            self.pending_center = None
