"""SimSiam (Chen & He 2021): a predictor on one branch, stop-gradient on the other, no negatives."""

from __future__ import annotations

import torch
from torch import nn

from selfsup.config import SimSiamConfig
from selfsup.core.objective import Progress
from selfsup.methods.base import Method
from selfsup.methods.heads import MLPHead
from selfsup.methods.losses import negative_cosine


class SimSiam(Method):
    """Backbone + 3-layer projector (BN on every layer) + 2-layer bottleneck predictor.

    ``forward([v1, v2], progress)`` -> {"loss", "embedding" (B, proj_dim)} with
    ``loss = D(p1, sg(z2))/2 + D(p2, sg(z1))/2``, D the negative cosine similarity. ``sync_bn``
    (the paper's SyncBN, the default) normalises over the global batch when there are several ranks.
    """

    def __init__(self, backbone: nn.Module, feature_dim: int, cfg: SimSiamConfig):
        super().__init__(cfg, sync_batchnorm=cfg.sync_bn)
        self.encoder = backbone
        proj_dim = cfg.proj_dim or feature_dim
        self.projector = MLPHead(feature_dim, cfg.proj_hidden_dim or proj_dim, proj_dim, num_layers=3, last_bn=True)
        self.predictor = MLPHead(proj_dim, cfg.pred_hidden_dim or max(1, proj_dim // 4), proj_dim, num_layers=2)

    def forward(self, views: list[torch.Tensor], progress: Progress) -> dict[str, torch.Tensor]:
        x1, x2 = views[0], views[1]
        z1 = self.projector(self.encoder(x1))
        z2 = self.projector(self.encoder(x2))
        p1, p2 = self.predictor(z1), self.predictor(z2)
        loss = negative_cosine(p1, z2.detach()) / 2 + negative_cosine(p2, z1.detach()) / 2
        return {"loss": loss, "embedding": z1.detach()}

    def param_groups(self) -> list[dict]:
        return [
            {"params": [*self.encoder.parameters(), *self.projector.parameters()]},
            {"params": list(self.predictor.parameters()), "fixed_lr": True},
        ]
