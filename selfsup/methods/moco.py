"""MoCo v2 (He et al. 2019; Chen et al. 2020) and MoCo v3 (Chen, Xie, He 2021), from the papers.

Both keep a momentum key encoder (a frozen copy of backbone + projector) updated after every
accepted optimiser step. v2 contrasts each query with its key and a queue of past keys; v3 has no
queue and contrasts each query with the keys of the whole global batch.

BatchNorm across ranks, as in the papers: v3 uses SyncBN (``sync_bn``, converted by the training
loop when world size > 1). v2 uses Shuffle-BN (``shuffle_bn``, MoCo v1 §3.3): the key images of all
ranks are gathered, shuffled by a permutation that rank 0 draws, the key encoder runs on this rank's
share, and the keys are put back in order; a query and its key are then normalised over different
sub-batches, so BN statistics cannot tell the positive apart. On one rank the shuffled key batch is
split into two halves normalised separately (a single-device stand-in for two ranks, as lightly's
split BatchNorm is), so a key is never normalised over the same images as its query. ``sync_bn``
instead of ``shuffle_bn`` gives v2 SyncBN.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from selfsup.config import MoCoV2Config, MoCoV3Config
from selfsup.core.distributed import broadcast_from_first, gather_no_grad, rank, world_size
from selfsup.core.objective import Progress
from selfsup.methods.base import Method
from selfsup.methods.heads import MLPHead
from selfsup.methods.losses import fp32, info_nce_cross_rank, info_nce_queue
from selfsup.methods.momentum import cosine_momentum


def local_share(everyone: torch.Tensor) -> torch.Tensor:
    """This rank's rows of (W·B, ...) rows gathered in rank order: (B, ...)."""
    return everyone.chunk(world_size())[rank()]


class MoCoV2(Method):
    """Query encoder + MLP head, momentum key encoder, and a (queue_size, proj_dim) queue of keys.

    ``forward([v1, v2], progress)`` -> {"loss", "embedding" (B, proj_dim)}; it keeps this step's keys
    of every rank pending, and ``on_after_step`` enqueues them only if the step was accepted.
    ``queue`` and ``queue_ptr`` are buffers, so they are checkpointed.
    """

    momentum_pairs = (("key_encoder", "encoder"), ("key_projector", "projector"))
    key_encoder: nn.Module
    key_projector: nn.Module
    queue: torch.Tensor  # buffers
    queue_ptr: torch.Tensor

    def __init__(self, backbone: nn.Module, feature_dim: int, cfg: MoCoV2Config):
        super().__init__(cfg, sync_batchnorm=cfg.sync_bn)
        self.encoder = backbone
        hidden = cfg.proj_hidden_dim or feature_dim
        self.projector = MLPHead(feature_dim, hidden, cfg.proj_dim, num_layers=2, hidden_bn=False)
        self.make_momentum_copies()
        self.register_buffer("queue", F.normalize(torch.randn(cfg.queue_size, cfg.proj_dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
        self.pending: torch.Tensor | None = None  # (n, proj_dim) keys to enqueue after an accepted step

    @torch.no_grad()
    def keys(self, x: torch.Tensor) -> torch.Tensor:
        """L2-normalised fp32 keys of the momentum encoder: (B, C, H, W) -> (B, proj_dim)."""
        return F.normalize(fp32(self.key_projector(self.key_encoder(x))), dim=1)

    @torch.no_grad()
    def all_keys(self, x: torch.Tensor) -> torch.Tensor:
        """The keys of every rank's images (B, C, H, W), in rank order: (W·B, proj_dim); with
        ``shuffle_bn`` each computed in a shuffled sub-batch (see the module docstring)."""
        if not self.cfg.shuffle_bn:
            return gather_no_grad(self.keys(x))
        images = gather_no_grad(x)
        # a random permutation as the order of uniform draws: inductor (torch 2.11) fails to compile
        # indexing with torch.randperm's output ("Not all inputs to pattern found in match.kwargs")
        order = broadcast_from_first(torch.rand(len(images), device=x.device).argsort())
        if world_size() > 1:
            shuffled = gather_no_grad(self.keys(images[local_share(order)]))
        else:
            shuffled = torch.cat([self.keys(half) for half in images[order].chunk(2)])
        return shuffled[torch.argsort(order)]

    def check_queue(self, batch: int) -> None:
        keys_per_step = batch * world_size() * (2 if self.cfg.symmetric else 1)
        if self.cfg.queue_size % keys_per_step:
            raise ValueError(
                f"moco_v2 queue_size={self.cfg.queue_size} must be divisible by the keys enqueued per step: "
                f"batch {batch} x world size {world_size()}"
                + (" x 2 views" if self.cfg.symmetric else "")
                + f" = {keys_per_step}"
            )

    def forward(self, views: list[torch.Tensor], progress: Progress) -> dict[str, torch.Tensor]:
        x1, x2 = views[0], views[1]
        self.check_queue(x1.shape[0])
        z1 = self.projector(self.encoder(x1))
        k2 = self.all_keys(x2)
        loss = info_nce_queue(z1, local_share(k2), self.queue, self.cfg.temperature)
        self.pending = k2
        if self.cfg.symmetric:
            z2 = self.projector(self.encoder(x2))
            k1 = self.all_keys(x1)
            loss = loss + info_nce_queue(z2, local_share(k1), self.queue, self.cfg.temperature)
            self.pending = torch.cat([k2, k1])
        return {"loss": loss, "embedding": z1.detach()}

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor, accepted: torch.Tensor | None) -> None:
        """Write ``keys`` (n, proj_dim) at ``queue_ptr``, oldest first out, if ``accepted``; no host sync."""
        n = keys.shape[0]
        slots = (self.queue_ptr + torch.arange(n, device=keys.device)) % self.cfg.queue_size
        keys = keys.to(self.queue.dtype)
        if accepted is not None:
            keys = torch.where(accepted, keys, self.queue[slots])
        self.queue.index_copy_(0, slots, keys)
        self.queue_ptr.add_(n if accepted is None else n * accepted).remainder_(self.cfg.queue_size)

    def momentum(self, progress: Progress) -> float:
        """The paper's constant m."""
        return self.cfg.momentum

    def on_after_step(self, progress: Progress, accepted: torch.Tensor | None = None) -> None:
        """Enqueue the step's keys and update the key encoder, both only if ``accepted`` (0-d bool; None: accepted)."""
        super().on_after_step(progress, accepted)
        if self.pending is not None:
            self.enqueue(self.pending, accepted)
            self.pending = None


class MoCoV3(Method):
    """Backbone + 3-layer projector (last BN) + 2-layer predictor; momentum backbone + projector.

    ``forward([v1, v2], progress)`` -> {"loss", "embedding" (B, proj_dim)} with the symmetric loss
    ``ctr(q1, k2) + ctr(q2, k1)``, each ``2τ·InfoNCE`` over the keys of all ranks.
    """

    momentum_pairs = (("key_encoder", "encoder"), ("key_projector", "projector"))
    key_encoder: nn.Module
    key_projector: nn.Module

    def __init__(self, backbone: nn.Module, feature_dim: int, cfg: MoCoV3Config):
        super().__init__(cfg, sync_batchnorm=cfg.sync_bn)
        self.encoder = backbone
        proj_hidden = cfg.proj_hidden_dim or 2 * feature_dim
        self.projector = MLPHead(feature_dim, proj_hidden, cfg.proj_dim, num_layers=3, last_bn=True)
        self.predictor = MLPHead(cfg.proj_dim, cfg.pred_hidden_dim or proj_hidden, cfg.proj_dim, num_layers=2)
        self.make_momentum_copies()

    def forward(self, views: list[torch.Tensor], progress: Progress) -> dict[str, torch.Tensor]:
        x1, x2 = views[0], views[1]
        z1 = self.projector(self.encoder(x1))
        z2 = self.projector(self.encoder(x2))
        q1, q2 = self.predictor(z1), self.predictor(z2)
        with torch.no_grad():
            k1 = self.key_projector(self.key_encoder(x1))
            k2 = self.key_projector(self.key_encoder(x2))
        loss = info_nce_cross_rank(q1, k2, self.cfg.temperature) + info_nce_cross_rank(q2, k1, self.cfg.temperature)
        return {"loss": loss, "embedding": z1.detach()}

    def momentum(self, progress: Progress) -> float:
        """m: cosine from ``momentum_base`` to 1."""
        return cosine_momentum(self.cfg.momentum_base, progress)
