"""`selfsup export` writes a backbone that loads strictly into torchvision's ResNet-18 and computes the
same features; `selfsup.load_encoder` gives the training encoder back; any geometry round-trips
(wav2vec 2.0's export: test_hf_export.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

import selfsup
from selfsup.cli import main
from selfsup.config import parse_config
from selfsup.core.objective import Progress
from selfsup.methods import build_method
from selfsup.vision.backbones import build_backbone, torchvision_model
from tests.helpers import save_at

IMAGENET = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


def torchvision_resnet18(small_stem: bool) -> nn.Module:
    """torchvision's ResNet-18 with the classifier dropped (and the 3x3/1 stem without max-pool)."""
    net = torchvision.models.resnet18(num_classes=10)
    if small_stem:
        net.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        net.maxpool = nn.Identity()
    net.fc = nn.Identity()
    return net


def trained_checkpoint(tmp_path: Path, method: str, size: int, model: dict, data: dict | None = None):
    """(the method's model with weights and BN statistics unlike any fresh initialisation, its checkpoint)."""
    data = {"train": "x", "channels": 3, "image_size": size, **IMAGENET, **(data or {})}
    cfg = parse_config(
        {
            "name": "x",
            "run_root": str(tmp_path / "runs"),
            "data": data,
            "model": {"backbone": "resnet18", **model},
            "method": {"name": method, "proj_dim": 8, "proj_hidden_dim": 16},
        }
    )
    torch.manual_seed(0)
    m = cfg.model
    backbone, dim = build_backbone(m.backbone, m.width, cfg.data.channels, m.small_stem, size, m.stem_stride)
    objective = build_method(cfg.method, backbone, dim)
    c = cfg.data.channels
    with torch.no_grad():  # a train-mode forward (BN statistics), then noise on every weight
        objective([torch.rand(4, c, size, size), torch.rand(4, c, size, size)], Progress(0, 1))
        for p in objective.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ckpt = save_at(cfg.run_dir, cfg, 1, objective.state_dict(), keep=1)
    return objective, ckpt


@pytest.mark.parametrize("method, small_stem, size", [("simclr", True, 16), ("simsiam", False, 32)])
def test_exported_backbone_loads_strictly_into_torchvision(tmp_path, capsys, method, small_stem, size):
    model, ckpt = trained_checkpoint(tmp_path, method, size, {"width": 64, "small_stem": small_stem})
    out = tmp_path / "resnet18.pt"
    assert main(["export", str(ckpt), str(out)]) == 0
    printed = capsys.readouterr().out  # says what loads the file, as the checks below do
    assert (
        "selfsup.vision.backbones.torchvision_model(file) builds it"
        if small_stem
        else "torchvision.models.resnet18() with .fc = nn.Identity() loads its state_dict strictly"
    ) in printed
    exported = torch.load(out, weights_only=True)
    assert {k: exported[k] for k in ("arch", "width", "channels", "small_stem", "image_size", "feature_dim")} == {
        "arch": "resnet18",
        "width": 64,
        "channels": 3,
        "small_stem": small_stem,
        "image_size": size,
        "feature_dim": 512,
    }
    assert (exported["mean"], exported["std"]) == (IMAGENET["mean"], IMAGENET["std"])
    assert exported["torchvision"] == (None if small_stem else "resnet18")  # standard geometry: loads as it is
    state_dict = exported["state_dict"]
    assert not any(k.startswith(("fc.", "encoder.")) for k in state_dict)
    net = torchvision_resnet18(small_stem)
    net.load_state_dict(state_dict, strict=True)

    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        want = model.encoder.eval()(x)
        got = net.eval()(x)
        built = torchvision_model(out)(x)
        fresh = torchvision_resnet18(small_stem).eval()(x)
    assert got.shape == (2, 512)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(built, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(fresh, want, atol=1e-3)


def test_load_encoder_is_the_training_encoder(tmp_path):
    model, ckpt = trained_checkpoint(tmp_path, "simclr", 16, {"width": 16, "small_stem": True})
    encoder = selfsup.load_encoder(ckpt.parents[1])  # the run directory: its latest checkpoint
    assert isinstance(encoder, nn.Module) and not encoder.training
    assert (encoder.mean, encoder.std, encoder.image_size, encoder.channels) == (
        IMAGENET["mean"],
        IMAGENET["std"],
        16,
        3,
    )
    assert next(encoder.parameters()).device == torch.device("cpu")
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        want = model.encoder.eval()(x)
        got = encoder(x)
    assert got.shape == (4, 128)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(selfsup.load_encoder(ckpt)(x), want, rtol=1e-5, atol=1e-5)


def test_library_api_is_the_pipeline():
    from selfsup.cluster.driver import pretrain
    from selfsup.eval.features import load_encoder
    from selfsup.eval.run import evaluate

    assert (selfsup.pretrain, selfsup.evaluate, selfsup.load_encoder) == (pretrain, evaluate, load_encoder)
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        selfsup.nothing  # noqa: B018


def test_non_standard_geometry_round_trips_through_torchvision_model(tmp_path):
    model, ckpt = trained_checkpoint(
        tmp_path,
        "simclr",
        12,
        {"width": 8, "small_stem": True, "stem_stride": 2},
        {"channels": 1, "mean": [0.3], "std": [0.4]},
    )
    out = tmp_path / "small.pt"
    assert main(["export", str(ckpt.parents[1]), str(out)]) == 0
    exported = torch.load(out, weights_only=True)
    assert exported["torchvision"] is None and exported["feature_dim"] == 64
    assert (exported["width"], exported["channels"], exported["stem_stride"], exported["mean"]) == (8, 1, 2, [0.3])
    net = torchvision_model(exported)
    assert isinstance(net, torchvision.models.ResNet) and isinstance(net.fc, nn.Identity) and not net.training
    assert net.conv1.weight.shape == (8, 1, 3, 3) and net.conv1.stride == (2, 2)
    x = torch.randn(3, 1, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(net(x), model.encoder.eval()(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="not a selfsup backbone export"):
        torchvision_model({"state_dict": exported["state_dict"]})


def test_moco_v3_vit_recipe_keeps_the_patch_projection_random_and_out_of_the_optimiser():
    from selfsup.config import load_config
    from selfsup.tasks.vision import VisionTask
    from selfsup.train.optim import build_optimizer

    cfg = load_config(Path(__file__).resolve().parents[2] / "configs/moco_v3-vit_b_16-imagenet.yaml")
    assert cfg.model.freeze_patch_embed
    model = VisionTask().build_objective(cfg)
    patch = list(model.encoder.vit.conv_proj.parameters())
    assert patch and not any(p.requires_grad for p in patch)
    optimised = {
        id(p) for g in build_optimizer(model.param_groups(), cfg.optim, 1e-3).param_groups for p in g["params"]
    }
    assert not optimised & {id(p) for p in patch}
    assert {id(p) for p in model.encoder.parameters() if p.requires_grad} <= optimised
    with pytest.raises(ValueError, match="freeze_patch_embed is for ViT"):
        build_backbone("resnet18", freeze_patch_embed=True)
