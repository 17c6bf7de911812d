"""VICReg (Bardes, Ponce, LeCun 2022): variance, invariance and covariance terms on an expander's outputs."""

from __future__ import annotations

import torch
from torch import nn

from selfsup.config import VICRegConfig
from selfsup.core.objective import Progress
from selfsup.methods.base import Method
from selfsup.methods.heads import MLPHead
from selfsup.methods.losses import vicreg_loss


class VICReg(Method):
    """Backbone + expander (Linear-BN-ReLU blocks, last linear without bias, as the official code).

    ``forward([v1, v2], progress)`` -> {"loss", "invariance", "variance", "covariance", "embedding"
    (B, proj_dim)}; each view runs through the network on its own, as in the official code, and the
    variance and covariance terms see the embeddings of every rank (``vicreg_loss``). The official
    hidden linears have a bias that the BatchNorm after them cancels; these have none.
    """

    def __init__(self, backbone: nn.Module, feature_dim: int, cfg: VICRegConfig):
        super().__init__(cfg, sync_batchnorm=cfg.sync_bn)
        self.encoder = backbone
        self.projector = MLPHead(feature_dim, cfg.proj_hidden_dim, cfg.proj_dim, cfg.proj_layers, last_bias=False)

    def forward(self, views: list[torch.Tensor], progress: Progress) -> dict[str, torch.Tensor]:
        z1 = self.projector(self.encoder(views[0]))
        z2 = self.projector(self.encoder(views[1]))
        out = vicreg_loss(z1, z2, self.cfg.sim_coeff, self.cfg.std_coeff, self.cfg.cov_coeff)
        return {**out, "embedding": z1.detach()}
