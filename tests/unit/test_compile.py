"""``train.compile`` on the CPU, for every objective: compiled steps agree with eager ones (loss, weights,
MoCo's queue and pointer, EMA targets, BatchNorm statistics, optimiser state), a rejected step among
them; nothing recompiles after the first two steps; the graph breaks are counted and named.

Backend ``aot_eager``: dynamo's capture and AOTAutograd's functionalised joint graph (where the
in-place writes to buffers, BatchNorm's statistics, become graph outputs), run with eager kernels.
Inductor would also generate and build C++ for each graph: about 30 s for one conv layer on these 2
cores, minutes an objective, too slow for CI; its kernels are left to the device check
(``benchmarks/device_check.py`` trains compiled on the GPU). The backbone is a small conv net, the same
for every method, so the minutes go to what differs between them; one test compiles the real
ResNet-18 under MoCo v2, the method with the most state.

Tolerance: aot_eager runs the same kernels in the same order, and on torch 2.11 the results are bit
for bit the same. ``rtol=1e-5, atol=1e-6`` leaves room for a decomposition that sums in another order
(a few float32 ULPs a step, over 6 steps), while a missed queue write, a stale BatchNorm statistic or
a skipped EMA update moves a value by 1e-3 or more. Integer state (queue pointer, batch counts) and
the rejected step's NaN loss must be exactly the same.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from selfsup.cluster.in_process import build_trainer
from tests.unit.test_bad_steps import HEADS, audio_config, small_backbone, tiny_config

BREAKS: dict[str, dict[str, int]] = {}  # objective -> the graph breaks it is known to have, by reason (none)
WARM_UP = 2  # steps that may compile: the first, and the second, where the step count becomes dynamic


def inputs(name: str, n: int, bad: int) -> list:
    """``n`` inputs of the objective, the ``bad``-th (0-based) with an inf: a rejected step."""
    g = torch.Generator().manual_seed(0)
    if name == "wav2vec2":
        out = [(0.1 * torch.randn(2, 8000, generator=g), torch.tensor([8000, 6000])) for _ in range(n)]
        out[bad][0][1, 100] = float("inf")
    else:
        out = [[torch.randn(8, 1, 16, 16, generator=g) for _ in range(2)] for _ in range(n)]
        out[bad][1][3, 0, 5, 5] = float("inf")
    return out


def run(cfg, batches: list, backend: str | None, monkeypatch) -> tuple[list, list, list]:
    """Trainer.step on each batch, compiled with ``backend`` (None: eager). Returns each step's loss,
    state (objective and optimiser) and the count of compiled graphs after it."""
    compile_with = functools.partial(torch.compile, backend=backend)
    with monkeypatch.context() as patch:
        patch.setattr(torch, "compile", compile_with)
        train = cfg.train.model_copy(update={"compile": backend is not None})
        trainer = build_trainer(cfg.model_copy(update={"train": train}))
    trainer.to_input = lambda batch: batch
    losses, states, graphs = [], [], []
    for i, batch in enumerate(batches):
        torch.manual_seed(100 + i)  # the same masks and noise in both runs
        losses.append(trainer.step(batch)["loss"].detach().clone())
        optimiser = {
            f"{i}.{k}": v.clone()
            for i, s in trainer.optimizer.state_dict()["state"].items()
            for k, v in s.items()
            if torch.is_tensor(v)
        }
        states.append({**{k: v.clone() for k, v in trainer.objective.state_dict().items()}, **optimiser})
        graphs.append(counters["stats"]["unique_graphs"])
    assert int(trainer.bad.total) == 1
    return losses, states, graphs


def assert_compiled_matches_eager(
    cfg, name: str, monkeypatch, backend: str = "aot_eager", rtol: float = 1e-5, atol: float = 1e-6
) -> None:
    batches = inputs(name, 6, bad=2)
    eager_losses, eager_states, _ = run(cfg, batches, None, monkeypatch)
    torch._dynamo.reset()
    counters.clear()
    losses, states, graphs = run(cfg, batches, backend, monkeypatch)
    assert dict(counters["graph_break"]) == BREAKS.get(name, {})
    assert graphs[0] >= 1 and graphs[WARM_UP - 1 :] == [graphs[WARM_UP - 1]] * (len(graphs) - WARM_UP + 1), (
        f"recompiled after the warm-up: {graphs} graphs after each step"
    )
    for step, (a, b) in enumerate(zip(losses, eager_losses)):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, equal_nan=True, msg=f"loss of step {step}")
    assert not torch.isfinite(losses[2]) and all(torch.isfinite(loss) for i, loss in enumerate(losses) if i != 2)
    for step, (state, eager) in enumerate(zip(states, eager_states)):
        assert state.keys() == eager.keys()
        for key in state:
            if state[key].is_floating_point():
                torch.testing.assert_close(state[key], eager[key], rtol=rtol, atol=atol, msg=f"{key} after step {step}")
            else:
                assert torch.equal(state[key], eager[key]), f"{key} after step {step}"
    moved = [k for k in states[0] if k.endswith("running_mean") and not torch.equal(states[0][k], states[-1][k])]
    assert moved or name == "wav2vec2", "no BatchNorm statistic moved: the comparison saw no training"


@pytest.mark.parametrize("name", [*HEADS, "wav2vec2"])
def test_compiled_steps_agree_with_eager_ones(tmp_path, monkeypatch, name):
    if name == "wav2vec2":
        cfg = audio_config(tmp_path)
    else:
        monkeypatch.setattr("selfsup.tasks.vision.build_backbone", small_backbone)
        cfg = tiny_config(tmp_path, f"method.name={name}", *HEADS[name], "optim.max_bad_steps=5")
    assert_compiled_matches_eager(cfg, name, monkeypatch)


def test_the_resnet_compiles_under_moco_v2_without_a_break(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path, "method.name=moco_v2", *HEADS["moco_v2"], "model.width=4", "optim.max_bad_steps=5")
    assert_compiled_matches_eager(cfg, "moco_v2", monkeypatch)
