"""Projection and prediction heads shared by the methods."""

from __future__ import annotations

from torch import nn


class MLPHead(nn.Module):
    """Linear-BN-ReLU blocks then a final linear: (B, in_dim) -> (B, out_dim).

    ``num_layers`` counts the linear layers. ``last_bn`` adds an affine-free BatchNorm after the
    last linear (MoCo v3, SimSiam's projector). ``hidden_bn=False`` gives Linear(bias)-ReLU hidden
    blocks without BatchNorm (MoCo v2's head). ``last_bias=False`` drops the last linear's bias
    (the expanders of VICReg and Barlow Twins).
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int = 2, last_bn: bool = False,
                 hidden_bn: bool = True, last_bias: bool = True):
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
