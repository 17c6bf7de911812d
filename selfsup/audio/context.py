"""Context network: transformer with a convolutional relative position embedding and LayerDrop.

Built from torchaudio's ``ConvolutionalPositionalEmbedding``, ``SelfAttention``, ``FeedForward`` and
``EncoderLayer``; this module adds padding handling, LayerDrop and per-layer outputs for probes.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torchaudio.models.wav2vec2.components import (
    ConvolutionalPositionalEmbedding,
    EncoderLayer,
    FeedForward,
    SelfAttention,
)


def _init_bert(module: nn.Module) -> None:
    """BERT init used by fairseq for transformer linears: N(0, 0.02) weights, zero biases."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class ContextNetwork(nn.Module):
    """(B, T, D) frames + (B,) frame lengths -> list of per-layer outputs, each (B, T, D).

    ``layer_norm_first=False`` (BASE, post-LN): layer norm after the position embedding.
    ``layer_norm_first=True`` (LARGE, pre-LN): layer norm on the final output.
    """

    def __init__(
        self,
        embed_dim: int,
        num_layers: int,
        num_heads: int,
        ffn_dim: int,
        pos_conv_kernel: int,
        pos_conv_groups: int,
        layer_norm_first: bool,
        dropout: float,
        attention_dropout: float,
        activation_dropout: float,
        layer_drop: float,
    ):
        super().__init__()
        self.layer_norm_first = layer_norm_first
        self.layer_drop = layer_drop
        self.pos_conv = ConvolutionalPositionalEmbedding(embed_dim, pos_conv_kernel, pos_conv_groups)
        self.layer_norm = nn.LayerNorm(embed_dim)
        self.dropout = nn.Dropout(dropout)
        self.layers = nn.ModuleList(
            EncoderLayer(
                attention=SelfAttention(embed_dim, num_heads, attention_dropout),
                dropout=dropout,
                layer_norm_first=layer_norm_first,
                feed_forward=FeedForward(embed_dim, ffn_dim, activation_dropout, dropout),
            )
            for _ in range(num_layers)
        )
        self.layers.apply(_init_bert)
        # fairseq's position-conv init, set through the weight-norm parametrisation.
        std = math.sqrt(4 * (1.0 - dropout) / (pos_conv_kernel * embed_dim))
        with torch.no_grad():
            self.pos_conv.conv.weight = torch.randn_like(self.pos_conv.conv.weight) * std
            nn.init.zeros_(self.pos_conv.conv.bias)

    def forward(self, x: Tensor, frame_lengths: Tensor) -> list[Tensor]:
        """x: (B, T, D); frame_lengths: (B,). Returns the outputs of the layers that ran (LayerDrop
        skips layers in training), the last one final. Padded frames are zeroed and never attended."""
        batch, frames, _ = x.shape
        valid = torch.arange(frames, device=x.device)[None, :] < frame_lengths[:, None]
        x = x * valid[..., None].to(x.dtype)
        attention_mask = valid[:, None, None, :].expand(batch, 1, frames, frames)
        x = x + self.pos_conv(x)
        if not self.layer_norm_first:
            x = self.layer_norm(x)
        x = self.dropout(x)
        outputs = []
        for layer in self.layers:
            if self.training and self.layer_drop > 0 and float(torch.rand(())) < self.layer_drop:
                continue
            x, _ = layer(x, attention_mask)
            outputs.append(x)
        if not outputs:
            outputs.append(x)
        if self.layer_norm_first:
            outputs[-1] = self.layer_norm(outputs[-1])
        return outputs
