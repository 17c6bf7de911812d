"""Projection and prediction heads shared by the methods."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm


class MLPHead(nn.Module):
    """Linear-BN-ReLU blocks then a final linear: (B, in_dim) -> (B, out_dim).

    ``num_layers`` counts the linear layers. ``last_bn`` adds an affine-free BatchNorm after the
    last linear (MoCo v3, SimSiam's projector). ``hidden_bn=False`` gives Linear(bias)-ReLU hidden
    blocks without BatchNorm (MoCo v2's head). ``last_bias=False`` drops the last linear's bias
    (the expanders of VICReg and Barlow Twins).
    """

    def __init__(
        self,
        in_dim: int,
        hidden_dim: int,
        out_dim: int,
        num_layers: int = 2,
        last_bn: bool = False,
        hidden_bn: bool = True,
        last_bias: bool = True,
    ):
        super().__init__()
        self.out_dim = out_dim
        layers: list[nn.Module] = []
        dim = in_dim
        for _ in range(num_layers - 1):
            if hidden_bn:
                layers += [nn.Linear(dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim)]
            else:
                layers.append(nn.Linear(dim, hidden_dim))
            layers.append(nn.ReLU(inplace=True))
            dim = hidden_dim
        layers.append(nn.Linear(dim, out_dim, bias=last_bias and not last_bn))
        if last_bn:
            layers.append(nn.BatchNorm1d(out_dim, affine=False))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


class DINOHead(nn.Module):
    """DINO's projection head (Caron et al. 2021, the official ``DINOHead``): an MLP of ``num_layers``
    linears (GELU between, BatchNorm with ``use_bn``) down to ``bottleneck_dim``, L2-normalised, then a
    weight-normalised linear without bias to ``out_dim`` whose norm g is 1 and, with ``norm_last_layer``,
    frozen. (B, in_dim) -> (B, out_dim). Linear weights start from a truncated normal of std 0.02.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        num_layers: int = 3,
        use_bn: bool = False,
        norm_last_layer: bool = True,
    ):
        super().__init__()
        self.out_dim, self.bottleneck_dim = out_dim, bottleneck_dim
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(dims, dims[1:])):
            layers.append(nn.Linear(a, b))
            if i < num_layers - 1:
                layers += [nn.BatchNorm1d(b)] if use_bn else []
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        g = self.last_layer.parametrizations.weight.original0
        with torch.no_grad():
            g.fill_(1)
        g.requires_grad_(not norm_last_layer)

    def forward(self, x):
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))
