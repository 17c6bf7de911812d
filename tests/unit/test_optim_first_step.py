"""A rejected first step leaves every optimiser as a fresh one: the weights after a rejected step (NaN
gradients, ``found_inf`` set) and an accepted one equal those after the accepted one alone. torch's fused
SGD makes its momentum buffers with ``empty_like`` on its first step and returns early on ``found_inf``,
so without primed state the second step read uninitialised memory."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from selfsup.config import OptimConfig
from selfsup.train.optim import build_optimizer, prime_state


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8 * 4 * 4, 5))


def step(net: nn.Module, optimizer, grads: list[torch.Tensor], rejected: bool) -> None:
    for p, g in zip(net.parameters(), grads):
        p.grad = g.clone()
    optimizer.found_inf = torch.tensor(float(rejected))
    optimizer.step()


def grads(net: nn.Module, seed: int, fill: float | None = None) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [
        torch.full_like(p, fill) if fill is not None else torch.randn(p.shape, generator=g) for p in net.parameters()
    ]


@pytest.mark.parametrize("name", ["sgd", "lars", "adamw"])
@pytest.mark.parametrize("rejected_grad", [float("nan"), float("inf"), 1e30])
def test_a_rejected_first_step_then_an_accepted_one_equals_a_fresh_first_step(name, rejected_grad):
    cfg = OptimConfig(name=name, weight_decay=1e-4)
    fresh, skipped = model(), model()
    fresh_opt = build_optimizer([{"params": list(fresh.parameters())}], cfg, 0.1)
    skipped_opt = build_optimizer([{"params": list(skipped.parameters())}], cfg, 0.1)
    # garbage where fused SGD's empty_like would land, as a GPU's caching allocator may hand back
    litter = [torch.full((4096,), 7e28) for _ in range(64)]
    del litter
    step(skipped, skipped_opt, grads(skipped, 0, rejected_grad), rejected=True)
    for a, b in zip(skipped.parameters(), fresh.parameters()):
        assert torch.equal(a, b), "a rejected step changed the weights"
    for _ in range(2):  # the accepted first step, then one with momentum
        seed = _ + 1
        step(fresh, fresh_opt, grads(fresh, seed), rejected=False)
        step(skipped, skipped_opt, grads(skipped, seed), rejected=False)
        for a, b in zip(skipped.parameters(), fresh.parameters()):
            assert torch.equal(a, b), f"{name}: max difference {(a - b).abs().max():.3g}"
    for a, b in zip(skipped_opt.state.values(), fresh_opt.state.values()):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_primed_state_takes_the_layout_of_its_parameter():
    """A checkpoint's optimiser state written in one memory format, loaded for parameters in another (a
    CPU checkpoint resumed on CUDA with channels_last), is given the parameters' strides: torch's fused
    kernels need params, grads and state to share them."""
    cfg = OptimConfig(name="sgd")
    saved = model()
    opt = build_optimizer([{"params": list(saved.parameters())}], cfg, 0.1)
    step(saved, opt, grads(saved, 1), rejected=False)
    state = opt.state_dict()
    resumed = model()
    resumed.load_state_dict(saved.state_dict())
    resumed.to(memory_format=torch.channels_last)
    conv = resumed[0].weight
    assert not conv.is_contiguous() and conv.is_contiguous(memory_format=torch.channels_last)
    new = build_optimizer([{"params": list(resumed.parameters())}], cfg, 0.1)
    new.load_state_dict(state)
    assert new.state[conv]["momentum_buffer"].stride() != conv.stride()  # what torch's load leaves
    prime_state(new)
    buf = new.state[conv]["momentum_buffer"]
    assert buf.stride() == conv.stride() and torch.equal(buf, opt.state[saved[0].weight]["momentum_buffer"])
    step(
        resumed,
        new,
        [g.to(memory_format=torch.channels_last) if g.ndim == 4 else g for g in grads(resumed, 2)],
        rejected=False,
    )
    step(saved, opt, grads(saved, 2), rejected=False)
    assert torch.equal(resumed[0].weight, saved[0].weight)
