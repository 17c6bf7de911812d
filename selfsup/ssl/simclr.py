"""SimCLR (Chen et al. 2020): two views, a projection head and the NT-Xent loss across ranks."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from ..objective import Progress
from .heads import MLPHead
from .losses import nt_xent


class SimCLRConfig(BaseModel):
    """SimCLR's hyper-parameters."""

    model_config = ConfigDict(extra="forbid")
    name: Literal["simclr"] = "simclr"
    temperature: float = 0.2
    proj_hidden_dim: int = 2048
    proj_dim: int = 128
    proj_layers: int = 2


class SimCLR(nn.Module):
    """Backbone + projection head; ``forward([v1, v2], progress)`` -> {"loss", "embedding" (B, proj_dim)}."""

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

    def on_after_step(self, progress: Progress) -> None:
        pass

    def param_groups(self) -> list[dict]:
        return [{"params": list(self.parameters())}]
