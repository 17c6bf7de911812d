"""SimCLR (Chen et al. 2020): two views, a projection head and the NT-Xent loss across ranks."""

from __future__ import annotations

import torch
from torch import nn

from selfsup.config import SimCLRConfig
from selfsup.core.collapse import CollapseMonitor
from selfsup.core.objective import Progress
from selfsup.methods.heads import MLPHead
from selfsup.methods.losses import nt_xent


class SimCLR(nn.Module):
    """Backbone + projection head; ``forward([v1, v2], progress)`` -> {"loss", "embedding" (B, proj_dim)}."""

    sync_batchnorm = False  # BatchNorm statistics stay per rank
    find_unused_parameters = False

    def __init__(self, backbone: nn.Module, feature_dim: int, cfg: SimCLRConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = backbone
        self.projector = MLPHead(feature_dim, cfg.proj_hidden_dim, cfg.proj_dim, cfg.proj_layers)

    def forward(self, views: list[torch.Tensor], progress: Progress) -> dict[str, torch.Tensor]:
        b = views[0].shape[0]
        z = self.projector(self.encoder(torch.cat(views[:2], 0)))  # one pass keeps BN statistics shared
        z1, z2 = z[:b], z[b:]
        return {"loss": nt_xent(z1, z2, self.cfg.temperature), "embedding": z1.detach()}

    def health_monitors(self) -> list[CollapseMonitor]:
        """The collapse alarm on the (B, D) embeddings ``forward`` returns."""
        return [CollapseMonitor(self.projector.out_dim)]

    def on_after_step(self, progress: Progress) -> None:
        pass

    def param_groups(self) -> list[dict]:
        return [{"params": list(self.parameters())}]
