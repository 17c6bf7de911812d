"""VICReg's and Barlow Twins' losses and gradients against an independent implementation on identical
tensors: lightly's ``VICRegLoss`` and ``BarlowTwinsLoss`` (the ``reference`` extra, which ``make test``
installs), in float64 so that only round-off may differ. Then the methods: their expanders as the
official code builds them, and their forward's loss equal to lightly's on the same projections.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from lightly.loss import BarlowTwinsLoss, VICRegLoss
from torch import nn

from selfsup.config import BarlowTwinsConfig, VICRegConfig
from selfsup.core.objective import Progress
from selfsup.methods import build_method
from selfsup.methods.losses import barlow_twins_loss, vicreg_loss

MID = Progress(5, 10)


def embeddings(seed: int, batch: int = 16, dim: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    """Two (batch, dim) float64 leaves; z2 partly follows z1 so that every term is away from zero."""
    g = torch.Generator().manual_seed(seed)
    z1 = 0.7 * torch.randn(batch, dim, generator=g, dtype=torch.float64)
    z2 = z1 + 0.5 * torch.randn(batch, dim, generator=g, dtype=torch.float64)
    return z1.requires_grad_(), z2.detach().clone().requires_grad_()


def loss_and_grads(loss: torch.Tensor, *leaves: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return (loss.detach(), *torch.autograd.grad(loss, leaves))


def assert_same(ours: tuple[torch.Tensor, ...], reference: tuple[torch.Tensor, ...]) -> None:
    for a, b in zip(ours, reference, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("coeffs", [(25.0, 25.0, 1.0), (1.0, 3.0, 0.5)])
def test_vicreg_loss_and_gradients_equal_lightly(coeffs):
    z1, z2 = embeddings(0)
    out = vicreg_loss(z1, z2, *coeffs)
    reference = VICRegLoss(*coeffs)(z1, z2)
    assert_same(loss_and_grads(out["loss"], z1, z2), loss_and_grads(reference, z1, z2))
    assert out["variance"] > 0 and out["covariance"] > 0 and out["invariance"] > 0  # each term is compared
    with torch.no_grad():
        terms = coeffs[0] * out["invariance"] + coeffs[1] * out["variance"] + coeffs[2] * out["covariance"]
    torch.testing.assert_close(terms, out["loss"].detach(), rtol=1e-12, atol=0)


@pytest.mark.parametrize("lambd", [5e-3, 0.3])
def test_barlow_twins_loss_and_gradients_equal_lightly(lambd):
    z1, z2 = embeddings(1)
    ours = barlow_twins_loss(
        F.batch_norm(z1, None, None, training=True), F.batch_norm(z2, None, None, training=True), lambd
    )
    reference = BarlowTwinsLoss(lambda_param=lambd)(z1, z2)
    assert_same(loss_and_grads(ours["loss"], z1, z2), loss_and_grads(reference, z1, z2))
    assert ours["off_diagonal"] > 0 and ours["on_diagonal"] > 0


def test_barlow_twins_scale_multiplies_loss_and_gradients():
    z1, z2 = embeddings(2)
    n1, n2 = (F.batch_norm(z, None, None, training=True) for z in (z1, z2))
    scaled = loss_and_grads(barlow_twins_loss(n1, n2, 5e-3, scale=0.024)["loss"], z1, z2)
    reference = loss_and_grads(BarlowTwinsLoss()(z1, z2), z1, z2)
    assert_same(scaled, tuple(0.024 * r for r in reference))


def small_method(cfg):
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(64, 8))
    return build_method(cfg, backbone, 8).double()


@pytest.mark.parametrize(
    "cfg",
    [VICRegConfig(proj_hidden_dim=24, proj_dim=16), BarlowTwinsConfig(proj_hidden_dim=24, proj_dim=16)],
    ids=["vicreg", "barlow"],
)
def test_expander_is_the_official_one(cfg):
    linears = [m for m in small_method(cfg).projector.modules() if isinstance(m, nn.Linear)]
    norms = [m for m in small_method(cfg).projector.modules() if isinstance(m, nn.BatchNorm1d)]
    assert [(m.in_features, m.out_features) for m in linears] == [(8, 24), (24, 24), (24, 16)]
    assert linears[-1].bias is None and len(norms) == 2  # Linear-BN-ReLU, Linear-BN-ReLU, Linear


@pytest.mark.parametrize("name", ["vicreg", "barlow_twins"])
def test_method_loss_equals_lightly_on_its_projections(name):
    cfg = (VICRegConfig if name == "vicreg" else BarlowTwinsConfig)(proj_hidden_dim=24, proj_dim=16)
    method = small_method(cfg)
    g = torch.Generator().manual_seed(3)
    x1, x2 = (torch.randn(16, 1, 8, 8, generator=g, dtype=torch.float64) for _ in range(2))
    z1, z2 = method.projector(method.encoder(x1)), method.projector(method.encoder(x2))
    reference = (VICRegLoss() if name == "vicreg" else BarlowTwinsLoss())(z1, z2)
    weight = method.encoder[1].weight
    expected = loss_and_grads(reference, weight)
    out = method([x1, x2], MID)
    assert_same(loss_and_grads(out["loss"], weight), expected)
    assert out["embedding"].shape == (16, 16) and not out["embedding"].requires_grad
    assert all(v.ndim == 0 and not v.requires_grad for k, v in out.items() if k not in ("loss", "embedding"))
