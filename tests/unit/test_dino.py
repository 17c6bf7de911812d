"""DINO against lightly's ``DINOLoss`` (the ``reference`` extra) and the official code's schedules,
computed by hand: loss, gradients and center on identical tensors, the teacher temperature by epoch,
the teacher seeing only the global views, the head's weight-normalised last layer frozen in the first
epoch, per-parameter gradient clipping; then the ViT-S/16 backbone at several crop sizes and the
config refusals."""

from __future__ import annotations

import pytest
import torch
from lightly.loss import DINOLoss
from torch import nn

from selfsup.config import ConfigError, DINOConfig, parse_config
from selfsup.core.objective import Progress
from selfsup.methods import build_method
from selfsup.methods.base import by_size
from selfsup.methods.losses import dino_loss
from selfsup.vision.backbones import build_backbone, export_state_dict, torchvision_model

B, K = 6, 10


def logits(seed: int, views: int) -> torch.Tensor:
    return torch.randn(views * B, K, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("n_views", [2, 5])
def test_dino_loss_gradients_and_center_equal_lightly(n_views):
    student = logits(0, n_views).requires_grad_()
    teacher = logits(1, 2)
    center = 0.3 * logits(2, 1)[:1]
    temp = 0.0625  # lightly makes it a float32 tensor: a value float32 holds exactly
    reference = DINOLoss(K, teacher_temp=temp, student_temp=0.1, center_momentum=0.9).double()
    reference.center.copy_(center.view(1, 1, K))
    expected = reference(list(teacher.chunk(2)), list(student.chunk(n_views)), teacher_temp=temp)
    ours = dino_loss(student, teacher, center, 2, teacher_temp=temp, student_temp=0.1)
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-12)
    (grad_ours,) = torch.autograd.grad(ours, student)
    (grad_ref,) = torch.autograd.grad(expected, student)
    torch.testing.assert_close(grad_ours, grad_ref, rtol=1e-12, atol=1e-12)
    assert grad_ours.abs().sum() > 0


def small_dino(**overrides) -> nn.Module:
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(16, 8))  # any crop size
    cfg = DINOConfig(out_dim=K, hidden_dim=12, bottleneck_dim=5, **overrides)
    return build_method(cfg, backbone, 8).double()


def crops(global_size: int = 16, local_size: int = 8, n_local: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [torch.randn(B, 1, global_size, global_size, generator=g, dtype=torch.float64) for _ in range(2)] + [
        torch.randn(B, 1, local_size, local_size, generator=g, dtype=torch.float64) for _ in range(n_local)
    ]


def test_the_teacher_sees_the_global_views_and_the_student_each_size_as_one_batch():
    method = small_dino()
    seen = {"student": [], "teacher": []}
    method.encoder.register_forward_hook(lambda m, args, out: seen["student"].append(tuple(args[0].shape)))
    method.teacher_encoder.register_forward_hook(lambda m, args, out: seen["teacher"].append(tuple(args[0].shape)))
    views = crops()
    out = method(views, Progress(0, 10, 5))
    assert seen == {"student": [(2 * B, 1, 16, 16), (3 * B, 1, 8, 8)], "teacher": [(2 * B, 1, 16, 16)]}
    with torch.no_grad():
        student = [method.head(method.encoder(v)) for v in views]
        teacher = [method.teacher_head(method.teacher_encoder(v)) for v in views[:2]]
    expected = DINOLoss(K).double()(teacher, student, teacher_temp=0.04)  # lightly's 0.04 is float32's
    torch.testing.assert_close(out["loss"].detach(), expected, rtol=1e-6, atol=0)
    assert [tuple(v.shape) for v in by_size(views)] == [(2 * B, 1, 16, 16), (3 * B, 1, 8, 8)]


def test_the_center_moves_only_after_an_accepted_step_by_the_global_batch_mean():
    method = small_dino()
    views = crops()
    method(views, Progress(0, 10, 5))
    with torch.no_grad():
        teacher = method.teacher_head(method.teacher_encoder(torch.cat(views[:2])))
    method.on_after_step(Progress(1, 10, 5), torch.tensor(False))
    assert torch.equal(method.center, torch.zeros(1, K, dtype=torch.float64))
    method(views, Progress(1, 10, 5))
    method.on_after_step(Progress(2, 10, 5), torch.tensor(True))
    torch.testing.assert_close(method.center, 0.1 * teacher.mean(0, keepdim=True), rtol=1e-6, atol=1e-9)


def test_teacher_temperature_warms_up_by_whole_epochs_as_the_official_schedule():
    method = small_dino(warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=30)
    temp = [method.teacher_temp(Progress(step, 10_000, 100)) for step in (0, 99, 100, 1500, 2900, 2999, 3000, 9000)]
    # np.linspace(0.04, 0.07, 30)[epoch], then 0.07
    assert temp == pytest.approx([0.04, 0.04, 0.04 + 0.03 / 29, 0.04 + 0.03 * 15 / 29, 0.07, 0.07, 0.07, 0.07])
    assert small_dino().teacher_temp(Progress(0, 10, 5)) == 0.04  # no warm-up: teacher_temp from the start


def test_the_last_layer_is_weight_normalised_and_frozen_in_the_first_epoch():
    method = small_dino(clip_grad=None)
    g = method.head.last_layer.parametrizations.weight.original0
    assert torch.equal(g, torch.ones_like(g)) and not g.requires_grad
    trained = {id(p) for group in method.param_groups() for p in group["params"]}
    assert id(g) not in trained and id(method.head.last_layer.parametrizations.weight.original1) in trained
    for step, frozen in ((4, True), (5, False)):  # 5 steps an epoch: step 4 is in epoch 0, step 5 in epoch 1
        method.zero_grad()
        method(crops(), Progress(step, 10, 5))["loss"].backward()
        method.on_gradients(Progress(step, 10, 5))
        v = method.head.last_layer.parametrizations.weight.original1
        assert (v.grad is None) == frozen and method.head.mlp[0].weight.grad is not None


def test_each_parameters_gradient_is_clipped_on_its_own():
    method = small_dino(freeze_last_layer_epochs=0)
    method(crops(), Progress(0, 10, 5))["loss"].backward()
    before = {n: p.grad.clone() for n, p in method.named_parameters() if p.grad is not None}
    clip = method.cfg.clip_grad = torch.stack([g.norm() for g in before.values()]).median().item()
    method.on_gradients(Progress(0, 10, 5))
    clipped = 0
    for n, p in method.named_parameters():
        if n in before:
            norm = before[n].norm()
            want = before[n] * (clip / (norm + 1e-6)) if clip / (norm + 1e-6) < 1 else before[n]
            torch.testing.assert_close(p.grad, want, rtol=1e-12, atol=1e-15)
            assert p.grad.norm() <= clip * (1 + 1e-9)
            clipped += bool(norm > clip)
    assert 0 < clipped < len(before)  # some clipped, some left as they were


def test_vit_s_16_takes_any_crop_size_its_patches_divide():
    torch.manual_seed(0)
    backbone, dim = build_backbone("vit_s_16", in_channels=1, image_size=32)
    assert dim == 384 and sum(p.numel() for p in backbone.parameters()) > 21_000_000  # ViT-S: ~21.7M
    x = torch.randn(2, 1, 32, 32)
    backbone.eval()
    torch.testing.assert_close(backbone(x), backbone.vit(x))  # at its own size: torchvision's model exactly
    assert backbone(torch.randn(2, 1, 16, 16)).shape == (2, 384)
    assert backbone(torch.randn(2, 1, 48, 48)).shape == (2, 384)
    export = export_state_dict(
        backbone,
        "vit_s_16",
        width=64,
        channels=1,
        small_stem=False,
        stem_stride=1,
        image_size=32,
        mean=[0.5],
        std=[0.2],
    )
    assert export["torchvision"] is None and export["feature_dim"] == 384  # torchvision has no ViT-S/16 builder
    torch.testing.assert_close(torchvision_model(export)(x), backbone(x))


BASE = {
    "name": "t",
    "data": {"train": "x", "image_size": 224, "channels": 3, "mean": [0.5] * 3, "std": [0.2] * 3},
    "method": {"name": "dino"},
    "augment": {"preset": "dino"},
}


def test_dino_config_takes_multi_crop_and_refuses_what_cannot_run():
    cfg = parse_config(BASE, ["model.backbone=vit_s_16"])
    assert cfg.view_sizes() == [224, 224] + [96] * 8
    with pytest.raises(ConfigError, match="view 2 has size 96, larger than data.image_size 64"):
        parse_config(BASE, ["data.image_size=64"])
    with pytest.raises(ConfigError) as err:
        parse_config(BASE, ["model.backbone=vit_s_16", "data.image_size=200"])
    assert "vit_s_16 has 16-px patches, which do not divide the 200-px views" in str(err.value)
    with pytest.raises(ConfigError, match="method moco_v3 does not use local crops \\(8 views"):
        parse_config(BASE, ["method.name=moco_v3"])
    assert parse_config(BASE, ["method.name=simclr"]).view_sizes()[2:] == [96] * 8  # SimCLR takes them too
