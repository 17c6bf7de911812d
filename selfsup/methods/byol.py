"""BYOL (Grill et al. 2020): an online network predicts an EMA target network's projection of the other view."""

from __future__ import annotations

import torch
from torch import nn

from selfsup.config import BYOLConfig
from selfsup.core.objective import Progress
from selfsup.methods.base import Method
from selfsup.methods.heads import MLPHead
from selfsup.methods.losses import normalized_mse
from selfsup.methods.momentum import cosine_momentum


class BYOL(Method):
    """Online backbone + projector + predictor; EMA target backbone + projector.

    ``forward([v1, v2], progress)`` -> {"loss", "embedding" (B, proj_dim)}; the loss is the symmetric
    ``(2 − 2·cos(p1, t2)) + (2 − 2·cos(p2, t1))``, batch means, with the target t under no_grad.
    ``sync_bn`` (the paper's synchronised BN, the default) normalises over the global batch when
    there are several ranks.
    """

    momentum_pairs = (("target_encoder", "encoder"), ("target_projector", "projector"))

    def __init__(self, backbone: nn.Module, feature_dim: int, cfg: BYOLConfig):
        super().__init__(cfg, sync_batchnorm=cfg.sync_bn)
        self.encoder = backbone
        proj_hidden = cfg.proj_hidden_dim or 2 * feature_dim
        self.projector = MLPHead(feature_dim, proj_hidden, cfg.proj_dim, num_layers=2)
        self.predictor = MLPHead(cfg.proj_dim, cfg.pred_hidden_dim or proj_hidden, cfg.proj_dim, num_layers=2)
        self.make_momentum_copies()

    def forward(self, views: list[torch.Tensor], progress: Progress) -> dict[str, torch.Tensor]:
        x1, x2 = views[0], views[1]
        z1 = self.projector(self.encoder(x1))
        z2 = self.projector(self.encoder(x2))
        with torch.no_grad():
            t1 = self.target_projector(self.target_encoder(x1))
            t2 = self.target_projector(self.target_encoder(x2))
        loss = normalized_mse(self.predictor(z1), t2) + normalized_mse(self.predictor(z2), t1)
        return {"loss": loss, "embedding": z1.detach()}

    def momentum(self, progress: Progress) -> float:
        """τ: cosine from ``tau_base`` to 1."""
        return cosine_momentum(self.cfg.tau_base, progress)
