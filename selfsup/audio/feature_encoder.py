"""wav2vec 2.0 feature encoder: a 1-D conv stack turning 16 kHz waveforms into ~50 Hz frames.

Built from torchaudio's ``ConvLayerBlock``/``FeatureExtractor``; adds the gradient scaling into the
encoder (``GradMultiply``) and the frame-count arithmetic.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torchaudio.models.wav2vec2.components import ConvLayerBlock, FeatureExtractor, LayerNorm


class GradMultiply(torch.autograd.Function):
    """Identity in the forward pass; multiplies the gradient by ``scale`` in the backward pass."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x.clone()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.scale, None


def build_feature_extractor(
    channels: int,
    kernels: Sequence[int],
    strides: Sequence[int],
    norm: str,
    bias: bool,
) -> FeatureExtractor:
    """The conv stack: ``(B, T)`` waveforms -> ``(B, frames, channels)`` features (+ frame lengths).

    ``norm="group_norm"`` (BASE): one per-channel group norm after the first conv only.
    ``norm="layer_norm"`` (LARGE): a layer norm over channels after every conv.
    """
    if norm not in ("group_norm", "layer_norm"):
        raise ValueError(f"conv norm must be 'group_norm' or 'layer_norm', got {norm!r}")
    blocks = []
    in_channels = 1
    for i, (kernel, stride) in enumerate(zip(kernels, strides, strict=True)):
        if norm == "layer_norm":
            normalization: nn.Module | None = LayerNorm(channels, elementwise_affine=True)
        elif i == 0:
            normalization = nn.GroupNorm(channels, channels, affine=True)
        else:
            normalization = None
        blocks.append(ConvLayerBlock(in_channels, channels, kernel, stride, bias, normalization))
        in_channels = channels
    extractor = FeatureExtractor(nn.ModuleList(blocks))
    for block in extractor.conv_layers:
        nn.init.kaiming_normal_(block.conv.weight)
    return extractor


def num_frames(num_samples: int, kernels: Sequence[int], strides: Sequence[int]) -> int:
    """Frames the conv stack emits for ``num_samples`` samples (49 for 16000 with the paper's stack)."""
    n = num_samples
    for kernel, stride in zip(kernels, strides, strict=True):
        n = max(0, (n - kernel) // stride + 1)
    return n


def receptive_field(kernels: Sequence[int], strides: Sequence[int]) -> tuple[int, int]:
    """(samples one frame sees, samples between frames): (400, 320) with the paper's stack."""
    field, hop = 1, 1
    for kernel, stride in zip(kernels, strides, strict=True):
        field, hop = field + (kernel - 1) * hop, hop * stride
    return field, hop
