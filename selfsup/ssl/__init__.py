"""Vision self-supervised methods, registered by name.

Each method is an ``nn.Module`` implementing ``selfsup.objective.Objective``, built from a backbone,
its feature dimension and its own pydantic config (whose ``name`` field selects it).
"""

from __future__ import annotations

from torch import nn

from .byol import BYOL, BYOLConfig
from .moco import MoCoV2, MoCoV2Config, MoCoV3, MoCoV3Config
from .simclr import SimCLR, SimCLRConfig
from .simsiam import SimSiam, SimSiamConfig

METHODS: dict[str, tuple[type[nn.Module], type]] = {
    "simclr": (SimCLR, SimCLRConfig),
    "moco_v2": (MoCoV2, MoCoV2Config),
    "moco_v3": (MoCoV3, MoCoV3Config),
    "byol": (BYOL, BYOLConfig),
    "simsiam": (SimSiam, SimSiamConfig),
}


def build_method(cfg, backbone: nn.Module, feature_dim: int) -> nn.Module:
    """The method named by ``cfg.name``, wrapped around ``backbone`` (B, C, H, W) -> (B, feature_dim)."""
    method_cls, _ = METHODS[cfg.name]
    return method_cls(backbone, feature_dim, cfg)
