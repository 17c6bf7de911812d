"""Memory formats: the online monitor leaves the live encoder's layout as training set it, and a
resume in another layout gives the optimiser state the parameters' strides (torch's fused CUDA
kernels refuse params, grads and state of different strides)."""

from __future__ import annotations

import pytest
import torch

from selfsup.cluster.in_process import build_trainer
from selfsup.core.checkpoint import latest_checkpoint
from selfsup.core.device import module_memory_format
from selfsup.core.reporter import Reporters
from selfsup.eval.features import encoder_from_checkpoint
from selfsup.tasks.vision import extract_features, views_for
from selfsup.train.trainer import Trainer
from tests.unit.test_bad_steps import tiny_config


def layouts(module: torch.nn.Module) -> list[tuple]:
    return [p.stride() for p in module.parameters()]


@pytest.mark.parametrize("layout", [torch.channels_last, torch.contiguous_format])
def test_features_leave_the_encoders_memory_format_as_it_was(tmp_path, layout):
    cfg = tiny_config(tmp_path, "model.width=8")
    encoder = encoder_from_checkpoint(cfg, None).to(memory_format=layout)
    before = layouts(encoder)
    assert module_memory_format(encoder) == layout
    images = torch.randint(0, 256, (6, 1, 28, 28), dtype=torch.uint8)
    features = extract_features(encoder, images, views_for(cfg), batch_size=4, desc=None)
    assert features.shape == (6, 64) and layouts(encoder) == before
    contiguous = encoder_from_checkpoint(cfg, None).to(memory_format=torch.contiguous_format)
    contiguous.load_state_dict(encoder.state_dict())
    reference = extract_features(contiguous, images, views_for(cfg), batch_size=4, desc=None)
    assert features == pytest.approx(reference, abs=1e-4)  # the same features whichever the layout


def force_layout(monkeypatch):
    """Honour train.channels_last on any CPU (memory_format keeps AVX2 CPUs contiguous for some models)."""
    monkeypatch.setattr(
        "selfsup.train.trainer.memory_format",
        lambda device, channels_last=True, module=None: (
            torch.channels_last if channels_last else torch.contiguous_format
        ),
    )


@pytest.mark.parametrize("optimiser", ["sgd", "lars"])
def test_a_resume_in_another_layout_gives_the_optimiser_state_the_params_strides(tmp_path, monkeypatch, optimiser):
    force_layout(monkeypatch)
    cfg = tiny_config(tmp_path, "model.width=8", f"optim.name={optimiser}", "train.channels_last=false")
    build_trainer(cfg).fit()
    resumed_cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"channels_last": True})})
    trainer = Trainer(resumed_cfg, Reporters(), resume_from=latest_checkpoint(cfg.run_dir))
    convs = [p for p in trainer.objective.parameters() if p.dim() == 4]
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    assert sum(not p.is_contiguous() for p in convs) > 10  # all but the first conv and the 1x1 ones
    for p in trainer.optimizer.state:
        assert trainer.optimizer.state[p]["momentum_buffer"].stride() == p.stride()
