"""BYOL (Grill et al. 2020): an online network predicts an EMA target network's projection of the other view."""

from __future__ import annotations

import torch
from torch import nn

from selfsup.config import BYOLConfig
from selfsup.core.objective import Progress
from selfsup.methods.base import Method, by_size
from selfsup.methods.heads import MLPHead
from selfsup.methods.losses import normalized_mse
from selfsup.methods.momentum import cosine_momentum


class BYOL(Method):
    """Online backbone + projector + predictor; EMA target backbone + projector.

    ``forward(views, progress)`` -> {"loss", "embedding" (B, proj_dim)}; the loss is the symmetric
    ``(2 − 2·cos(p1, t2)) + (2 − 2·cos(p2, t1))``, batch means, with the target t under no_grad. With
    multi-crop (2 global views, then local views by size; each local size through the network as one
    batch) every view's prediction regresses the target of each global view but its own, summed, as
    solo-learn's multi-crop BYOL; the target sees only the global views.
    ``sync_bn`` (the paper's synchronised BN, the default) normalises over the global batch when
    there are several ranks.
    """

    momentum_pairs = (("target_encoder", "encoder"), ("target_projector", "projector"))
    target_encoder: nn.Module
    target_projector: nn.Module

    def __init__(self, backbone: nn.Module, feature_dim: int, cfg: BYOLConfig):
        super().__init__(cfg, sync_batchnorm=cfg.sync_bn)
        self.encoder = backbone
        proj_hidden = cfg.proj_hidden_dim or 2 * feature_dim
        self.projector = MLPHead(feature_dim, proj_hidden, cfg.proj_dim, num_layers=2)
        self.predictor = MLPHead(cfg.proj_dim, cfg.pred_hidden_dim or proj_hidden, cfg.proj_dim, num_layers=2)
        self.make_momentum_copies()

    def forward(self, views: list[torch.Tensor], progress: Progress) -> dict[str, torch.Tensor]:
        b = views[0].shape[0]
        z = [self.projector(self.encoder(x)) for x in views[:2]]  # each global view with its own BN statistics
        z += [part for x in by_size(views[2:]) for part in self.projector(self.encoder(x)).split(b)]
        with torch.no_grad():
            targets = [self.target_projector(self.target_encoder(x)) for x in views[:2]]
        p = [self.predictor(zv) for zv in z]
        loss = sum(normalized_mse(p[v], t) for g, t in enumerate(targets) for v in range(len(p)) if v != g)
        return {"loss": loss, "embedding": z[0].detach()}

    def momentum(self, progress: Progress) -> float:
        """τ: cosine from ``tau_base`` to 1."""
        return cosine_momentum(self.cfg.tau_base, progress)
