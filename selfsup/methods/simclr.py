"""SimCLR (Chen et al. 2020): two views (or multi-crop), a projection head and the NT-Xent loss across ranks."""

from __future__ import annotations

import torch
from torch import nn

from selfsup.config import SimCLRConfig
from selfsup.core.objective import Progress
from selfsup.methods.base import Method, by_size
from selfsup.methods.heads import MLPHead
from selfsup.methods.losses import nt_xent


class SimCLR(Method):
    """Backbone + projection head; ``forward(views, progress)`` -> {"loss", "embedding" (B, proj_dim)}.

    ``views``: the 2 views, or with multi-crop the 2 global views then local views by size (every view
    of a sample a positive of the others: ``nt_xent``). Each size runs through the backbone as one batch
    (the two global views share BatchNorm statistics), the projector once over all. ``sync_bn`` (the
    paper's "Global BN", the default) normalises over the global batch when there are several ranks:
    with per-rank statistics both views of an image share a device and its statistics, which leak which
    samples are positives.
    """

    def __init__(self, backbone: nn.Module, feature_dim: int, cfg: SimCLRConfig):
        super().__init__(cfg, sync_batchnorm=cfg.sync_bn)
        self.encoder = backbone
        self.projector = MLPHead(feature_dim, cfg.proj_hidden_dim, cfg.proj_dim, cfg.proj_layers)

    def forward(self, views: list[torch.Tensor], progress: Progress) -> dict[str, torch.Tensor]:
        b = views[0].shape[0]
        z = self.projector(torch.cat([self.encoder(x) for x in by_size(views)])).split(b)  # [(B, proj_dim)] * V
        return {"loss": nt_xent(list(z), self.cfg.temperature), "embedding": z[0].detach()}
