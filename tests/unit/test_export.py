"""`selfsup export` writes a backbone that loads strictly into torchvision's ResNet-18 and computes the same features."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from selfsup.cli import main
from selfsup.config import parse_config
from selfsup.core.objective import Progress
from selfsup.core.checkpoint import save_checkpoint
from selfsup.methods import build_method
from selfsup.vision.backbones import build_backbone

IMAGENET = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


def torchvision_resnet18(small_stem: bool) -> nn.Module:
    """torchvision's ResNet-18 with the classifier dropped (and the 3x3/1 stem without max-pool)."""
    net = torchvision.models.resnet18()
    if small_stem:
        net.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        net.maxpool = nn.Identity()
    net.fc = nn.Identity()
    return net


@pytest.mark.parametrize("method, small_stem, size", [("simclr", True, 16), ("simsiam", False, 32)])
def test_exported_backbone_loads_strictly_into_torchvision(tmp_path, method, small_stem, size):
    cfg = parse_config({"name": "x", "run_root": str(tmp_path / "runs"),
                        "data": {"train": "x", "channels": 3, "image_size": size, **IMAGENET},
                        "model": {"backbone": "resnet18", "width": 64, "small_stem": small_stem},
                        "method": {"name": method, "proj_dim": 8, "proj_hidden_dim": 16}})
    torch.manual_seed(0)
    backbone, dim = build_backbone("resnet18", 64, 3, small_stem, size)
    model = build_method(cfg.method, backbone, dim)
    # weights and BN running statistics unlike any fresh initialisation: a train-mode forward, then noise
    with torch.no_grad():
        model([torch.rand(4, 3, size, size), torch.rand(4, 3, size, size)], Progress(0, 1))
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ckpt = save_checkpoint(cfg.run_dir, 1, model.state_dict(), {"step": 1}, cfg, {}, keep=1)

    out = tmp_path / "resnet18.pt"
    assert main(["export", str(ckpt), str(out)]) == 0
    exported = torch.load(out, weights_only=True)
    assert not any(k.startswith(("fc.", "encoder.")) for k in exported)
    net = torchvision_resnet18(small_stem)
    net.load_state_dict(exported, strict=True)

    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        want = model.encoder.eval()(x)
        got = net.eval()(x)
        fresh = torchvision_resnet18(small_stem).eval()(x)
    assert got.shape == (2, 512)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(fresh, want, atol=1e-3)


def test_moco_v3_vit_recipe_keeps_the_patch_projection_random_and_out_of_the_optimiser():
    from selfsup.config import load_config
    from selfsup.train.optim import build_optimizer
    from selfsup.tasks.vision import VisionTask

    cfg = load_config(Path(__file__).resolve().parents[2] / "configs/moco_v3-vit_b_16-imagenet.yaml")
    assert cfg.model.freeze_patch_embed
    model = VisionTask().build_objective(cfg)
    patch = list(model.encoder.vit.conv_proj.parameters())
    assert patch and not any(p.requires_grad for p in patch)
    optimised = {id(p) for g in build_optimizer(model.param_groups(), cfg.optim, 1e-3).param_groups for p in g["params"]}
    assert not optimised & {id(p) for p in patch}
    assert {id(p) for p in model.encoder.parameters() if p.requires_grad} <= optimised
    with pytest.raises(ValueError, match="freeze_patch_embed is for ViT"):
        build_backbone("resnet18", freeze_patch_embed=True)
