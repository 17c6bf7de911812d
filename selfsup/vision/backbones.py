"""Torchvision backbones sized by depth, width, input channels and stem.

Every backbone keeps torchvision's module names, so ``state_dict()`` of a width-64, 3-channel
ResNet loads into ``torchvision.models.resnetNN`` (after the same stem change for the small stem).
"""

from __future__ import annotations

from torch import nn
from torchvision.models import ResNet, VisionTransformer
from torchvision.models.resnet import BasicBlock, Bottleneck

RESNET_SPECS: dict[str, tuple[type[nn.Module], list[int]]] = {
    "resnet18": (BasicBlock, [2, 2, 2, 2]),
    "resnet34": (BasicBlock, [3, 4, 6, 3]),
    "resnet50": (Bottleneck, [3, 4, 6, 3]),
}


def build_resnet(name: str, width: int = 64, in_channels: int = 3, small_stem: bool = True,
                 stem_stride: int = 1) -> tuple[ResNet, int]:
    """A torchvision ResNet without its classifier: (B, in_channels, H, W) -> (B, feature_dim).

    ``width`` is the channel count of the first stage (64 in the paper). ``small_stem`` swaps the
    7x7/2 conv and max-pool for a 3x3 conv of stride ``stem_stride``, as used for 28-32 px images
    (stride 2 quarters the compute of every stage).
    """
    if name not in RESNET_SPECS:
        raise ValueError(f"unknown backbone {name!r}; choose one of {sorted(RESNET_SPECS) + ['vit_b_16']}")
    block, layers = RESNET_SPECS[name]
    net = ResNet(block, layers)
    net.inplanes = width
    if small_stem:
        net.conv1 = nn.Conv2d(in_channels, width, kernel_size=3, stride=stem_stride, padding=1, bias=False)
        net.maxpool = nn.Identity()
    else:
        net.conv1 = nn.Conv2d(in_channels, width, kernel_size=7, stride=2, padding=3, bias=False)
    net.bn1 = nn.BatchNorm2d(width)
    net.layer1 = net._make_layer(block, width, layers[0])
    net.layer2 = net._make_layer(block, width * 2, layers[1], stride=2)
    net.layer3 = net._make_layer(block, width * 4, layers[2], stride=2)
    net.layer4 = net._make_layer(block, width * 8, layers[3], stride=2)
    net.fc = nn.Identity()
    for m in net.modules():  # torchvision's own initialisation, re-applied to the rebuilt layers
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return net, width * 8 * block.expansion


class ViTBackbone(nn.Module):
    """torchvision ViT-B/16 without its head: (B, C, H, W) -> (B, 768) class-token features.

    ``freeze_patch_embed`` keeps the patch projection at its random initialisation, the trick the
    MoCo v3 paper (Chen, Xie, He 2021, sec. 4.2) uses against the training instability of ViTs.
    """

    def __init__(self, image_size: int = 224, in_channels: int = 3, freeze_patch_embed: bool = False):
        super().__init__()
        self.vit = VisionTransformer(image_size=image_size, patch_size=16, num_layers=12, num_heads=12,
                                     hidden_dim=768, mlp_dim=3072)
        if in_channels != 3:
            self.vit.conv_proj = nn.Conv2d(in_channels, 768, kernel_size=16, stride=16)
        self.vit.conv_proj.requires_grad_(not freeze_patch_embed)
        self.vit.heads = nn.Identity()

    def forward(self, x):
        return self.vit(x)


def build_backbone(name: str, width: int = 64, in_channels: int = 3, small_stem: bool = True,
                   image_size: int = 224, stem_stride: int = 1, freeze_patch_embed: bool = False) -> tuple[nn.Module, int]:
    """Backbone by name -> (module mapping (B, C, H, W) to (B, D), D)."""
    if name == "vit_b_16":
        return ViTBackbone(image_size, in_channels, freeze_patch_embed), 768
    if freeze_patch_embed:
        raise ValueError(f"model.freeze_patch_embed is for ViT backbones; {name} has no patch projection")
    return build_resnet(name, width, in_channels, small_stem, stem_stride)


def export_state_dict(backbone: nn.Module) -> dict:
    """The backbone's weights under torchvision's own key names (no ``fc``, no wrapper prefix)."""
    if isinstance(backbone, ViTBackbone):
        return {k: v for k, v in backbone.vit.state_dict().items() if not k.startswith("heads")}
    return {k: v for k, v in backbone.state_dict().items() if not k.startswith("fc.")}
