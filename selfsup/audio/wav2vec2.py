"""wav2vec 2.0 pretraining (Baevski et al., 2020): config, encoder for probes, and the objective."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

from selfsup.audio.context import ContextNetwork
from selfsup.audio.feature_encoder import GradMultiply, build_feature_extractor
from selfsup.audio.loss import contrastive_logits, sample_negatives
from selfsup.audio.masking import compute_span_mask
from selfsup.audio.quantizer import GumbelVectorQuantizer, QuantizerOutput, gumbel_temperature
from selfsup.objective import Progress


class Wav2Vec2Config(BaseModel):
    """Model and objective hyper-parameters; defaults are the paper's BASE (95M parameters)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Feature encoder (raw 16 kHz waveform -> 50 Hz frames)
    conv_channels: int = Field(512, gt=0)
    conv_kernels: tuple[int, ...] = (10, 3, 3, 3, 3, 2, 2)
    conv_strides: tuple[int, ...] = (5, 2, 2, 2, 2, 2, 2)
    conv_norm: Literal["group_norm", "layer_norm"] = "group_norm"
    conv_bias: bool = False
    feature_grad_mult: float = Field(0.1, ge=0.0)  # gradient scale into the conv stack
    normalize_waveform: bool = False  # zero-mean unit-variance per utterance (LARGE)
    # Context network (transformer)
    embed_dim: int = Field(768, gt=0)
    num_layers: int = Field(12, gt=0)
    num_heads: int = Field(12, gt=0)
    ffn_dim: int = Field(3072, gt=0)
    pos_conv_kernel: int = Field(128, gt=0)
    pos_conv_groups: int = Field(16, gt=0)
    layer_norm_first: bool = False  # False: post-LN (BASE); True: pre-LN (LARGE)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    attention_dropout: float = Field(0.1, ge=0.0, lt=1.0)
    activation_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    dropout_input: float = Field(0.1, ge=0.0, lt=1.0)  # on the projected features
    dropout_features: float = Field(0.1, ge=0.0, lt=1.0)  # on the quantiser input
    layer_drop: float = Field(0.05, ge=0.0, lt=1.0)
    # Masking
    mask_prob: float = Field(0.65, ge=0.0, le=1.0)
    mask_length: int = Field(10, gt=0)
    min_mask_spans: int = Field(2, ge=1)
    # Quantiser
    codebook_groups: int = Field(2, gt=0)
    codebook_entries: int = Field(320, gt=1)
    codevector_dim: int = Field(256, gt=0)
    final_dim: int = Field(256, gt=0)  # projection of context outputs and targets
    gumbel_temperature_start: float = Field(2.0, gt=0.0)
    gumbel_temperature_end: float = Field(0.5, gt=0.0)
    gumbel_temperature_decay: float = Field(0.999995, gt=0.0, le=1.0)
    gumbel_reference_updates: int = Field(400_000, gt=0)  # the schedule is rescaled to the planned updates
    # Loss
    num_negatives: int = Field(100, gt=0)
    logit_temperature: float = Field(0.1, gt=0.0)  # kappa
    diversity_weight: float = Field(0.1, ge=0.0)  # alpha
    feature_penalty_weight: float = Field(10.0, ge=0.0)

    @model_validator(mode="after")
    def _check(self) -> Wav2Vec2Config:
        if len(self.conv_kernels) != len(self.conv_strides):
            raise ValueError("conv_kernels and conv_strides must have the same length")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.embed_dim % self.pos_conv_groups:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by pos_conv_groups {self.pos_conv_groups}")
        if self.codevector_dim % self.codebook_groups:
            raise ValueError(f"codevector_dim {self.codevector_dim} is not divisible by codebook_groups")
        if self.gumbel_temperature_end > self.gumbel_temperature_start:
            raise ValueError("gumbel_temperature_end must not exceed gumbel_temperature_start")
        return self

    @classmethod
    def base(cls) -> Wav2Vec2Config:
        """Paper BASE: 12 layers of 768, group-norm conv stack, 95M parameters."""
        return cls()

    @classmethod
    def large(cls) -> Wav2Vec2Config:
        """Paper LARGE: 24 pre-LN layers of 1024, layer-norm conv stack, 317M parameters."""
        return cls(
            conv_norm="layer_norm",
            conv_bias=True,
            normalize_waveform=True,
            embed_dim=1024,
            num_layers=24,
            num_heads=16,
            ffn_dim=4096,
            layer_norm_first=True,
            layer_drop=0.2,
            codevector_dim=768,
            final_dim=768,
            gumbel_temperature_end=0.1,
            gumbel_reference_updates=250_000,
        )

    @classmethod
    def tiny(cls) -> Wav2Vec2Config:
        """A few-hundred-thousand-parameter model that trains on a 2-core CPU in minutes.

        Besides the sizes, the objective is eased for ~2 s crops and a few thousand small updates
        (with BASE's objective the contrastive loss stays at chance and the features degrade):
        full gradient into the conv stack, a feature penalty of 0.1 instead of 10, no dropout,
        p=0.5 spans of 5, 64 entries per codebook and 20 distractors."""
        return cls(
            conv_channels=64,
            feature_grad_mult=1.0,
            embed_dim=128,
            num_layers=2,
            num_heads=2,
            ffn_dim=256,
            pos_conv_kernel=32,
            dropout=0.0,
            attention_dropout=0.0,
            dropout_input=0.0,
            dropout_features=0.0,
            layer_drop=0.0,
            mask_prob=0.5,
            mask_length=5,
            codebook_entries=64,
            codevector_dim=64,
            final_dim=64,
            gumbel_reference_updates=400_000,
            num_negatives=20,
            feature_penalty_weight=0.1,
        )

    @classmethod
    def from_yaml(cls, path: str | Path) -> Wav2Vec2Config:
        """The model fields of the ``method:`` section of a ``configs/wav2vec2-*.yaml`` experiment."""
        from selfsup.config import Wav2Vec2MethodConfig

        with open(path) as f:
            method = Wav2Vec2MethodConfig(**yaml.safe_load(f)["method"])
        return cls(**method.model_dump(exclude={"name", "preset"}))


class Wav2Vec2Encoder(nn.Module):
    """Feature encoder + context network: the part that is evaluated and exported."""

    def __init__(self, cfg: Wav2Vec2Config):
        super().__init__()
        self.normalize_waveform = cfg.normalize_waveform
        self.feature_extractor = build_feature_extractor(
            cfg.conv_channels, cfg.conv_kernels, cfg.conv_strides, cfg.conv_norm, cfg.conv_bias
        )
        self.layer_norm = nn.LayerNorm(cfg.conv_channels)
        self.post_extract_proj = nn.Linear(cfg.conv_channels, cfg.embed_dim)
        self.dropout_input = nn.Dropout(cfg.dropout_input)
        self.context = ContextNetwork(
            cfg.embed_dim,
            cfg.num_layers,
            cfg.num_heads,
            cfg.ffn_dim,
            cfg.pos_conv_kernel,
            cfg.pos_conv_groups,
            cfg.layer_norm_first,
            cfg.dropout,
            cfg.attention_dropout,
            cfg.activation_dropout,
            cfg.layer_drop,
        )

    def extract_features(self, waveforms: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """waveforms: (B, S) float, lengths: (B,) samples -> conv features (B, T, C), frame lengths (B,)."""
        if self.normalize_waveform:
            valid = (torch.arange(waveforms.shape[1], device=waveforms.device)[None, :] < lengths[:, None]).float()
            n = valid.sum(dim=1, keepdim=True).clamp(min=1.0)
            mean = (waveforms * valid).sum(dim=1, keepdim=True) / n
            var = (((waveforms - mean) * valid) ** 2).sum(dim=1, keepdim=True) / n
            waveforms = (waveforms - mean) / torch.sqrt(var + 1e-5) * valid
        features, frame_lengths = self.feature_extractor(waveforms, lengths)
        assert frame_lengths is not None
        return features, frame_lengths

    def forward(self, waveforms: Tensor, lengths: Tensor) -> tuple[list[Tensor], Tensor]:
        """waveforms: (B, S), lengths: (B,) -> ([projected features, layer 1, ..., layer N], each
        (B, T, D)), frame lengths (B,). Frames at or beyond the frame length are padding."""
        features, frame_lengths = self.extract_features(waveforms, lengths)
        x = self.dropout_input(self.post_extract_proj(self.layer_norm(features)))
        return [x, *self.context(x, frame_lengths)], frame_lengths


@dataclass
class Wav2Vec2Step:
    """Everything one forward pass computed (shapes: B rows, T frames, K distractors, F final_dim).

    features: (B, T, C) conv features; frame_lengths: (B,); mask: (B, T) bool masked frames;
    negatives: (B, T, K) distractor frame indices; context: (B, T, F) projected context outputs;
    targets: (B, T, F) projected quantised targets; quantizer: the quantiser's output;
    logits: (B, T, 1 + K) float32; duplicates: (B, T, K) bool; metrics: ``forward``'s dict.
    """

    features: Tensor
    frame_lengths: Tensor
    mask: Tensor
    negatives: Tensor
    context: Tensor
    targets: Tensor
    quantizer: QuantizerOutput
    logits: Tensor
    duplicates: Tensor
    metrics: dict[str, Tensor]


class Wav2Vec2Pretraining(nn.Module):
    """The wav2vec 2.0 objective (``selfsup.objective.Objective``).

    ``forward((waveforms (B, S) float32 16 kHz, lengths (B,) int64), progress)`` returns ``loss`` =
    contrastive + alpha * diversity + feature_penalty_weight * feature_penalty, plus detached metrics.
    """

    def __init__(self, cfg: Wav2Vec2Config | None = None):
        super().__init__()
        self.cfg = cfg = cfg or Wav2Vec2Config()
        self.encoder = Wav2Vec2Encoder(cfg)
        self.mask_embedding = nn.Parameter(torch.empty(cfg.embed_dim).uniform_())
        self.dropout_features = nn.Dropout(cfg.dropout_features)
        self.quantizer = GumbelVectorQuantizer(
            cfg.conv_channels,
            cfg.codebook_groups,
            cfg.codebook_entries,
            cfg.codevector_dim,
            cfg.gumbel_temperature_start,
        )
        self.project_q = nn.Linear(cfg.codevector_dim, cfg.final_dim)
        self.final_proj = nn.Linear(cfg.embed_dim, cfg.final_dim)

    def temperature_at(self, progress: Progress) -> float:
        """The Gumbel temperature the schedule gives at ``progress``."""
        cfg = self.cfg
        return gumbel_temperature(
            progress,
            cfg.gumbel_temperature_start,
            cfg.gumbel_temperature_end,
            cfg.gumbel_temperature_decay,
            cfg.gumbel_reference_updates,
        )

    def on_after_step(self, progress: Progress) -> None:
        """Anneal the Gumbel temperature."""
        self.quantizer.temperature.fill_(self.temperature_at(progress))

    def param_groups(self) -> list[dict[str, Any]]:
        """Weights with decay; biases, norms, the mask embedding (all 1-D) without."""
        decay, no_decay = [], []
        for p in self.parameters():
            if p.requires_grad:
                (no_decay if p.ndim <= 1 else decay).append(p)
        return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]

    def forward(self, batch: tuple[Tensor, Tensor], progress: Progress) -> dict[str, Tensor]:
        """batch: (waveforms (B, S), lengths (B,)). Returns ``loss`` and detached scalar metrics."""
        waveforms, lengths = batch
        return self.step(waveforms, lengths).metrics

    def step(
        self,
        waveforms: Tensor,
        lengths: Tensor,
        mask: Tensor | None = None,
        negatives: Tensor | None = None,
    ) -> Wav2Vec2Step:
        """The full computation with its intermediates; ``mask`` (B, T) and ``negatives`` (B, T, K)
        replace the random ones when given (for tests and analysis)."""
        cfg = self.cfg
        features, frame_lengths = self.encoder.extract_features(waveforms, lengths)
        if cfg.feature_grad_mult != 1.0:
            features = GradMultiply.apply(features, cfg.feature_grad_mult)
        batch, frames, _ = features.shape
        valid = torch.arange(frames, device=features.device)[None, :] < frame_lengths[:, None]
        valid_f = valid[..., None].to(features.dtype)
        feature_penalty = (features.float().pow(2) * valid_f).sum() / (
            valid_f.sum().clamp(min=1.0) * features.shape[-1]
        )

        normed = self.encoder.layer_norm(features)
        x = self.encoder.dropout_input(self.encoder.post_extract_proj(normed))
        if mask is None:
            mask = compute_span_mask(frame_lengths, frames, cfg.mask_prob, cfg.mask_length, cfg.min_mask_spans)
        x = torch.where(mask[..., None], self.mask_embedding.to(x.dtype), x)
        context = self.final_proj(self.encoder.context(x, frame_lengths)[-1])

        q = self.quantizer(self.dropout_features(normed), weights=mask)
        targets = self.project_q(q.quantized)
        if negatives is None:
            negatives = sample_negatives(mask, cfg.num_negatives)
        logits, duplicates = contrastive_logits(context, targets, q.codes, negatives, cfg.logit_temperature)

        m = mask.float()
        n_masked = m.sum().clamp(min=1.0)
        contrastive = (-logits.log_softmax(dim=-1)[..., 0] * m).sum() / n_masked
        num_codes = self.quantizer.num_codes
        diversity = (num_codes - q.perplexity_soft) / num_codes
        loss = contrastive + cfg.diversity_weight * diversity + cfg.feature_penalty_weight * feature_penalty
        correct = (logits[..., 0] > logits[..., 1:].amax(dim=-1)).float()
        metrics = {
            "loss": loss,
            "contrastive_loss": contrastive.detach(),
            "diversity_loss": diversity.detach(),
            "feature_penalty": feature_penalty.detach(),
            "accuracy": ((correct * m).sum() / n_masked).detach(),
            "perplexity_hard": q.perplexity_hard.detach(),
            "perplexity_soft": q.perplexity_soft.detach(),
            "gumbel_temperature": self.quantizer.temperature.detach().clone(),
            "duplicate_distractor_fraction": (
                (duplicates.float() * m[..., None]).sum() / (n_masked * duplicates.shape[-1])
            ).detach(),
            "masked_fraction": (m.sum() / valid.float().sum().clamp(min=1.0)).detach(),
        }
        return Wav2Vec2Step(
            features=features,
            frame_lengths=frame_lengths,
            mask=mask,
            negatives=negatives,
            context=context,
            targets=targets,
            quantizer=q,
            logits=logits,
            duplicates=duplicates,
            metrics=metrics,
        )
