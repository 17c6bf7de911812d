"""Torchvision backbones sized by depth, width, input channels and stem.

Every backbone keeps torchvision's module names, so ``state_dict()`` of a width-64, 3-channel
ResNet loads into ``torchvision.models.resnetNN`` (after the same stem change for the small stem).
:func:`export_state_dict` stores the weights with the geometry and input that go with them, and
:func:`torchvision_model` builds the matching torchvision model from that.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import ResNet, VisionTransformer
from torchvision.models.resnet import BasicBlock, Bottleneck

EXPORT_FORMAT = "selfsup.backbone.v1"  # the "format" of export_state_dict's dict

RESNET_SPECS: dict[str, tuple[type[BasicBlock | Bottleneck], list[int]]] = {
    "resnet18": (BasicBlock, [2, 2, 2, 2]),
    "resnet34": (BasicBlock, [3, 4, 6, 3]),
    "resnet50": (Bottleneck, [3, 4, 6, 3]),
}


def resnet_stage(
    block: type[BasicBlock | Bottleneck], in_planes: int, planes: int, blocks: int, stride: int
) -> tuple[nn.Sequential, int]:
    """One ResNet stage of ``blocks`` blocks, as torchvision builds it: (B, in_planes, H, W) ->
    (B, planes * expansion, H / stride, W / stride), a 1x1 conv + BN shortcut on the first block when
    the shape changes. Returns (the stage, its output channels)."""
    out_planes = planes * block.expansion
    downsample = None
    if stride != 1 or in_planes != out_planes:
        downsample = nn.Sequential(
            nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(out_planes)
        )
    layers = [block(in_planes, planes, stride, downsample)]
    layers += [block(out_planes, planes) for _ in range(1, blocks)]
    return nn.Sequential(*layers), out_planes


def build_resnet(
    name: str, width: int = 64, in_channels: int = 3, small_stem: bool = True, stem_stride: int = 1
) -> tuple[ResNet, int]:
    """A torchvision ResNet without its classifier: (B, in_channels, H, W) -> (B, feature_dim).

    ``width`` is the channel count of the first stage (64 in the paper). ``small_stem`` swaps the
    7x7/2 conv and max-pool for a 3x3 conv of stride ``stem_stride``, as used for 28-32 px images
    (stride 2 quarters the compute of every stage).
    """
    if name not in RESNET_SPECS:
        raise ValueError(f"unknown backbone {name!r}; choose one of {sorted(RESNET_SPECS) + ['vit_b_16']}")
    block, layers = RESNET_SPECS[name]
    net = ResNet(block, layers)
    if small_stem:
        net.conv1 = nn.Conv2d(in_channels, width, kernel_size=3, stride=stem_stride, padding=1, bias=False)
        net.maxpool = nn.Identity()
    else:
        net.conv1 = nn.Conv2d(in_channels, width, kernel_size=7, stride=2, padding=3, bias=False)
    net.bn1 = nn.BatchNorm2d(width)
    channels = width
    for i, blocks in enumerate(layers):
        stage, channels = resnet_stage(block, channels, width * 2**i, blocks, stride=1 if i == 0 else 2)
        setattr(net, f"layer{i + 1}", stage)
    net.fc = nn.Identity()
    for m in net.modules():  # torchvision's own initialisation, re-applied to the rebuilt layers
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return net, channels


# patch size, layers, heads, width, MLP width: ViT-B/16 (Dosovitskiy et al. 2021), ViT-S/16 (DeiT-S, as DINO)
VIT_SPECS = {"vit_b_16": (16, 12, 12, 768, 3072), "vit_s_16": (16, 12, 6, 384, 1536)}


class ViTBackbone(nn.Module):
    """A torchvision ``VisionTransformer`` without its head: (B, C, H, W) -> (B, width) class-token features.

    Any H, W divisible by the patch size (DINO's 96-px local crops beside 224-px global ones): the
    position embeddings of the ``image_size`` grid are interpolated bicubically to the input's grid, as
    DINO's ``interpolate_pos_encoding`` does; at ``image_size`` the model is torchvision's exactly.
    ``freeze_patch_embed`` keeps the patch projection at its random initialisation, the trick the
    MoCo v3 paper (Chen, Xie, He 2021, sec. 4.2) uses against the training instability of ViTs.
    """

    vit: VisionTransformer

    def __init__(
        self, arch: str = "vit_b_16", image_size: int = 224, in_channels: int = 3, freeze_patch_embed: bool = False
    ):
        super().__init__()
        patch, layers, heads, width, mlp = VIT_SPECS[arch]
        self.vit = VisionTransformer(
            image_size=image_size, patch_size=patch, num_layers=layers, num_heads=heads, hidden_dim=width, mlp_dim=mlp
        )
        if in_channels != 3:
            self.vit.conv_proj = nn.Conv2d(in_channels, width, kernel_size=patch, stride=patch)
        self.vit.conv_proj.requires_grad_(not freeze_patch_embed)
        self.vit.heads = nn.Identity()

    def forward(self, x):
        vit, p = self.vit, self.vit.patch_size
        n, _, h, w = x.shape
        tokens = vit.conv_proj(x).flatten(2).transpose(1, 2)  # (B, h/p · w/p, width)
        tokens = torch.cat([vit.class_token.expand(n, -1, -1), tokens], 1)
        pos = vit.encoder.pos_embedding  # (1, 1 + grid², width)
        if (h, w) != (vit.image_size, vit.image_size):
            grid = vit.image_size // p
            patches = pos[:, 1:].reshape(1, grid, grid, -1).permute(0, 3, 1, 2)
            patches = F.interpolate(patches, size=(h // p, w // p), mode="bicubic", align_corners=False)
            pos = torch.cat([pos[:, :1], patches.flatten(2).transpose(1, 2)], 1)
        encoder = vit.encoder
        return encoder.ln(encoder.layers(encoder.dropout(tokens + pos)))[:, 0]


def build_backbone(
    name: str,
    width: int = 64,
    in_channels: int = 3,
    small_stem: bool = True,
    image_size: int = 224,
    stem_stride: int = 1,
    freeze_patch_embed: bool = False,
) -> tuple[nn.Module, int]:
    """Backbone by name -> (module mapping (B, C, H, W) to (B, D), D)."""
    if name in VIT_SPECS:
        return ViTBackbone(name, image_size, in_channels, freeze_patch_embed), VIT_SPECS[name][3]
    if freeze_patch_embed:
        raise ValueError(f"model.freeze_patch_embed is for ViT backbones; {name} has no patch projection")
    return build_resnet(name, width, in_channels, small_stem, stem_stride)


def export_state_dict(
    backbone: nn.Module,
    arch: str,
    *,
    width: int,
    channels: int,
    small_stem: bool,
    stem_stride: int,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
) -> dict:
    """The backbone as an export: ``state_dict``, its weights under torchvision's own key names (no
    ``fc`` / ``heads``, no wrapper prefix), with what builds the model (``arch``, ``width``,
    ``channels``, ``small_stem``, ``stem_stride``), its input (``image_size``, per-channel ``mean`` and
    ``std`` for images in [0, 1]), ``feature_dim`` and ``torchvision``: the name of the torchvision
    builder whose model (classifier replaced by ``nn.Identity()``) loads ``state_dict`` strictly, or
    None for another geometry (:func:`torchvision_model` builds any). Tensors and plain data only."""
    vit = backbone.vit if isinstance(backbone, ViTBackbone) else None
    if vit is not None:
        weights = {k: v for k, v in vit.state_dict().items() if not k.startswith("heads")}
    else:
        weights = {k: v for k, v in backbone.state_dict().items() if not k.startswith("fc.")}
    # torchvision builds vit_b_16 (not ViT-S/16) at 224 px
    standard = channels == 3 and (
        arch == "vit_b_16" and image_size == 224 if vit is not None else width == 64 and not small_stem
    )
    feature_dim = vit.hidden_dim if vit is not None else width * 8 * RESNET_SPECS[arch][0].expansion
    return {
        "format": EXPORT_FORMAT,
        "arch": arch,
        "width": width,
        "channels": channels,
        "small_stem": small_stem,
        "stem_stride": stem_stride,
        "image_size": image_size,
        "mean": [float(m) for m in mean],
        "std": [float(s) for s in std],
        "feature_dim": feature_dim,
        "torchvision": arch if standard else None,
        "state_dict": weights,
    }


def torchvision_model(export: dict | str | Path) -> nn.Module:
    """The torchvision model of an export (:func:`export_state_dict`, or the file ``selfsup export``
    wrote): a ``ResNet`` with ``fc = nn.Identity()`` or a ``VisionTransformer`` with ``heads =
    nn.Identity()``, the export's weights loaded strictly, in eval mode: normalised (B, C, H, W) -> (B, D)."""
    if not isinstance(export, dict):
        return torchvision_model(torch.load(export, map_location="cpu", weights_only=True))
    if export.get("format") != EXPORT_FORMAT:
        raise ValueError(f"not a selfsup backbone export (format {export.get('format')!r}, expected {EXPORT_FORMAT!r})")
    backbone, _ = build_backbone(
        export["arch"],
        export["width"],
        export["channels"],
        export["small_stem"],
        export["image_size"],
        export["stem_stride"],
    )
    net = backbone.vit if isinstance(backbone, ViTBackbone) else backbone
    net.load_state_dict(export["state_dict"], strict=True)
    return net.eval()
