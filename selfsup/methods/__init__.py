"""Vision self-supervised methods, registered by name.

Each method is an ``nn.Module`` implementing ``selfsup.core.objective.Objective``, built from a backbone,
its feature dimension and its config (``selfsup.config.METHOD_CONFIGS[name]``, whose ``name`` field selects it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from selfsup.config import ImageMethodConfig
from selfsup.methods.barlow_twins import BarlowTwins
from selfsup.methods.base import Method
from selfsup.methods.byol import BYOL
from selfsup.methods.dino import DINO
from selfsup.methods.moco import MoCoV2, MoCoV3
from selfsup.methods.simclr import SimCLR
from selfsup.methods.simsiam import SimSiam
from selfsup.methods.vicreg import VICReg

# each class takes (backbone, feature_dim, its config)
METHODS: dict[str, Callable[[nn.Module, int, Any], Method]] = {
    "simclr": SimCLR,
    "moco_v2": MoCoV2,
    "moco_v3": MoCoV3,
    "byol": BYOL,
    "simsiam": SimSiam,
    "vicreg": VICReg,
    "barlow_twins": BarlowTwins,
    "dino": DINO,
}


def build_method(cfg: ImageMethodConfig, backbone: nn.Module, feature_dim: int) -> Method:
    """The method named by ``cfg.name``, wrapped around ``backbone`` (B, C, H, W) -> (B, feature_dim)."""
    return METHODS[cfg.name](backbone, feature_dim, cfg)
