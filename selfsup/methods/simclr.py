"""SimCLR (Chen et al. 2020): two views, a projection head and the NT-Xent loss across ranks."""

from __future__ import annotations

import torch
from torch import nn

from selfsup.config import SimCLRConfig
from selfsup.core.objective import Progress
from selfsup.methods.base import Method
from selfsup.methods.heads import MLPHead
from selfsup.methods.losses import nt_xent


class SimCLR(Method):
    """Backbone + projection head; ``forward([v1, v2], progress)`` -> {"loss", "embedding" (B, proj_dim)}.

    ``sync_bn`` (the paper's "Global BN", the default) normalises over the global batch when
    there are several ranks: with per-rank statistics both views of an image share a device and its
    statistics, which leak which samples are positives.
    """

    def __init__(self, backbone: nn.Module, feature_dim: int, cfg: SimCLRConfig):
        super().__init__(cfg, sync_batchnorm=cfg.sync_bn)
        self.encoder = backbone
        self.projector = MLPHead(feature_dim, cfg.proj_hidden_dim, cfg.proj_dim, cfg.proj_layers)

    def forward(self, views: list[torch.Tensor], progress: Progress) -> dict[str, torch.Tensor]:
        b = views[0].shape[0]
        z = self.projector(self.encoder(torch.cat(views[:2], 0)))  # one pass: both views share BN statistics
        z1, z2 = z[:b], z[b:]
        return {"loss": nt_xent(z1, z2, self.cfg.temperature), "embedding": z1.detach()}
