"""BYOL (Grill et al. 2020): an online network predicts an EMA target network's projection of the other view."""

from __future__ import annotations

import torch
from torch import nn

from selfsup.config import BYOLConfig
from selfsup.core.collapse import CollapseMonitor
from selfsup.core.objective import Progress
from selfsup.methods.heads import MLPHead
from selfsup.methods.losses import normalized_mse
from selfsup.methods.momentum import cosine_momentum, momentum_copy, update_momentum


class BYOL(nn.Module):
    """Online backbone + projector + predictor; EMA target backbone + projector.

    ``forward([v1, v2], progress)`` -> {"loss", "embedding" (B, proj_dim)}; the loss is the symmetric
    ``(2 − 2·cos(p1, t2)) + (2 − 2·cos(p2, t1))``, batch means, with the target t under no_grad.
    """

    find_unused_parameters = False

    def __init__(self, backbone: nn.Module, feature_dim: int, cfg: BYOLConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = backbone
        self.sync_batchnorm = cfg.sync_bn
        proj_hidden = cfg.proj_hidden_dim or 2 * feature_dim
        self.projector = MLPHead(feature_dim, proj_hidden, cfg.proj_dim, num_layers=2)
        self.predictor = MLPHead(cfg.proj_dim, cfg.pred_hidden_dim or proj_hidden, cfg.proj_dim, num_layers=2)
        self.target_encoder = momentum_copy(self.encoder)
        self.target_projector = momentum_copy(self.projector)

    def forward(self, views: list[torch.Tensor], progress: Progress) -> dict[str, torch.Tensor]:
        x1, x2 = views[0], views[1]
        z1 = self.projector(self.encoder(x1))
        z2 = self.projector(self.encoder(x2))
        with torch.no_grad():
            t1 = self.target_projector(self.target_encoder(x1))
            t2 = self.target_projector(self.target_encoder(x2))
        loss = normalized_mse(self.predictor(z1), t2) + normalized_mse(self.predictor(z2), t1)
        return {"loss": loss, "embedding": z1.detach()}

    def health_monitors(self) -> list[CollapseMonitor]:
        """The collapse alarm on the (B, D) embeddings ``forward`` returns."""
        return [CollapseMonitor(self.projector.out_dim)]

    def on_after_step(self, progress: Progress) -> None:
        tau = cosine_momentum(self.cfg.tau_base, progress)
        update_momentum(self.target_encoder, self.encoder, tau)
        update_momentum(self.target_projector, self.projector, tau)

    def param_groups(self) -> list[dict]:
        return [{"params": [p for p in self.parameters() if p.requires_grad]}]
