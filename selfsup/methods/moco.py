"""MoCo v2 (He et al. 2019; Chen et al. 2020) and MoCo v3 (Chen, Xie, He 2021), from the papers.

Both keep a momentum key encoder (a frozen copy of backbone + projector) updated after every
optimiser step. v2 contrasts each query with its key and a queue of past keys; v3 has no queue and
contrasts each query with the keys of the whole global batch.

Across ranks both use SyncBN (``sync_bn``, converted by the training loop when world size > 1)
instead of v1/v2's Shuffle-BN: with statistics over the global batch a query and its own key never
share a per-device batch statistic, which is the leak Shuffle-BN breaks, without all-gathering the
key images twice per step. On one rank nothing special is needed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from selfsup.config import MoCoV2Config, MoCoV3Config
from selfsup.core.collapse import CollapseMonitor
from selfsup.core.objective import Progress
from selfsup.core.distributed import gather_no_grad, world_size
from selfsup.methods.heads import MLPHead
from selfsup.methods.losses import info_nce_cross_rank, info_nce_queue
from selfsup.methods.momentum import cosine_momentum, momentum_copy, update_momentum


class MoCoV2(nn.Module):
    """Query encoder + MLP head, momentum key encoder, and a (queue_size, proj_dim) queue of keys.

    ``forward([v1, v2], progress)`` -> {"loss", "embedding" (B, proj_dim)}; it enqueues this step's keys
    from every rank. ``queue`` and ``queue_ptr`` are buffers, so they are checkpointed.
    """

    find_unused_parameters = False

    def __init__(self, backbone: nn.Module, feature_dim: int, cfg: MoCoV2Config):
        super().__init__()
        self.cfg = cfg
        self.encoder = backbone
        self.sync_batchnorm = cfg.sync_bn
        hidden = cfg.proj_hidden_dim or feature_dim
        self.projector = MLPHead(feature_dim, hidden, cfg.proj_dim, num_layers=2, hidden_bn=False)
        self.key_encoder = momentum_copy(self.encoder)
        self.key_projector = momentum_copy(self.projector)
        self.register_buffer("queue", F.normalize(torch.randn(cfg.queue_size, cfg.proj_dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    @torch.no_grad()
    def keys(self, x: torch.Tensor) -> torch.Tensor:
        """L2-normalised fp32 keys of the momentum encoder: (B, C, H, W) -> (B, proj_dim)."""
        return F.normalize(self.key_projector(self.key_encoder(x)).float(), dim=1)

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Write the keys (B, proj_dim) of every rank at ``queue_ptr``, oldest first out; no host sync."""
        keys = gather_no_grad(keys)
        n = keys.shape[0]
        slots = (self.queue_ptr + torch.arange(n, device=keys.device)) % self.cfg.queue_size
        self.queue.index_copy_(0, slots, keys.to(self.queue.dtype))
        self.queue_ptr.add_(n).remainder_(self.cfg.queue_size)

    def forward(self, views: list[torch.Tensor], progress: Progress) -> dict[str, torch.Tensor]:
        x1, x2 = views[0], views[1]
        keys_per_step = x1.shape[0] * world_size() * (2 if self.cfg.symmetric else 1)
        if self.cfg.queue_size % keys_per_step:
            raise ValueError(
                f"moco_v2 queue_size={self.cfg.queue_size} must be divisible by the keys enqueued per step: "
                f"batch {x1.shape[0]} x world size {world_size()}" + (" x 2 views" if self.cfg.symmetric else "")
                + f" = {keys_per_step}")
        queue = self.queue.clone()  # the loss keeps it for backward, and enqueue() changes the buffer in place
        z1 = self.projector(self.encoder(x1))
        k2 = self.keys(x2)
        loss = info_nce_queue(z1, k2, queue, self.cfg.temperature)
        if self.cfg.symmetric:
            z2 = self.projector(self.encoder(x2))
            k1 = self.keys(x1)
            loss = loss + info_nce_queue(z2, k1, queue, self.cfg.temperature)
            self.enqueue(torch.cat([k2, k1]))
        else:
            self.enqueue(k2)
        return {"loss": loss, "embedding": z1.detach()}

    def health_monitors(self) -> list[CollapseMonitor]:
        """The collapse alarm on the (B, D) embeddings ``forward`` returns."""
        return [CollapseMonitor(self.projector.out_dim)]

    def on_after_step(self, progress: Progress) -> None:
        update_momentum(self.key_encoder, self.encoder, self.cfg.momentum)
        update_momentum(self.key_projector, self.projector, self.cfg.momentum)

    def param_groups(self) -> list[dict]:
        return [{"params": [p for p in self.parameters() if p.requires_grad]}]


class MoCoV3(nn.Module):
    """Backbone + 3-layer projector (last BN) + 2-layer predictor; momentum backbone + projector.

    ``forward([v1, v2], progress)`` -> {"loss", "embedding" (B, proj_dim)} with the symmetric loss
    ``ctr(q1, k2) + ctr(q2, k1)``, each ``2τ·InfoNCE`` over the keys of all ranks.
    """

    find_unused_parameters = False

    def __init__(self, backbone: nn.Module, feature_dim: int, cfg: MoCoV3Config):
        super().__init__()
        self.cfg = cfg
        self.encoder = backbone
        self.sync_batchnorm = cfg.sync_bn
        proj_hidden = cfg.proj_hidden_dim or 2 * feature_dim
        self.projector = MLPHead(feature_dim, proj_hidden, cfg.proj_dim, num_layers=3, last_bn=True)
        self.predictor = MLPHead(cfg.proj_dim, cfg.pred_hidden_dim or proj_hidden, cfg.proj_dim, num_layers=2)
        self.key_encoder = momentum_copy(self.encoder)
        self.key_projector = momentum_copy(self.projector)

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

    def health_monitors(self) -> list[CollapseMonitor]:
        """The collapse alarm on the (B, D) embeddings ``forward`` returns."""
        return [CollapseMonitor(self.projector.out_dim)]

    def on_after_step(self, progress: Progress) -> None:
        m = cosine_momentum(self.cfg.momentum_base, progress)
        update_momentum(self.key_encoder, self.encoder, m)
        update_momentum(self.key_projector, self.projector, m)

    def param_groups(self) -> list[dict]:
        return [{"params": [p for p in self.parameters() if p.requires_grad]}]
