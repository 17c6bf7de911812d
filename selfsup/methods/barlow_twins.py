"""Barlow Twins (Zbontar et al. 2021): the cross-correlation of two views' projections driven to the identity."""

from __future__ import annotations

import torch
from torch import nn

from selfsup.config import BarlowTwinsConfig
from selfsup.core.objective import Progress
from selfsup.methods.base import Method
from selfsup.methods.heads import MLPHead
from selfsup.methods.losses import barlow_twins_loss, fp32


class BarlowTwins(Method):
    """Backbone + projector (Linear-BN-ReLU blocks, last linear without bias) + an affine-free BatchNorm
    that standardises each projection dimension over the batch, as the official code.

    ``forward([v1, v2], progress)`` -> {"loss", "on_diagonal", "off_diagonal", "embedding" (B, proj_dim)}.
    With ``sync_bn`` (the official SyncBatchNorm, the default) the standardisation is over the global
    batch when there are several ranks, and the cross-correlation is summed over ranks (``barlow_twins_loss``).
    """

    def __init__(self, backbone: nn.Module, feature_dim: int, cfg: BarlowTwinsConfig):
        super().__init__(cfg, sync_batchnorm=cfg.sync_bn)
        self.encoder = backbone
        self.projector = MLPHead(feature_dim, cfg.proj_hidden_dim, cfg.proj_dim, cfg.proj_layers, last_bias=False)
        # batch statistics only: the official layer's running statistics are never read
        self.standardize = nn.BatchNorm1d(cfg.proj_dim, affine=False, track_running_stats=False)

    def forward(self, views: list[torch.Tensor], progress: Progress) -> dict[str, torch.Tensor]:
        z1 = self.projector(self.encoder(views[0]))
        z2 = self.projector(self.encoder(views[1]))
        with torch.autocast(z1.device.type, enabled=False):
            n1, n2 = self.standardize(fp32(z1)), self.standardize(fp32(z2))
        out = barlow_twins_loss(n1, n2, self.cfg.lambd, self.cfg.scale_loss)
        return {**out, "embedding": z1.detach()}
