"""wav2vec 2.0 pretraining (Baevski et al., 2020): the encoder for probes, and the objective.

The hyper-parameters are ``selfsup.config.Wav2Vec2Config``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from selfsup.audio.context import ContextNetwork
from selfsup.audio.feature_encoder import GradMultiply, build_feature_extractor
from selfsup.audio.health import CodebookHealthMonitor
from selfsup.audio.loss import contrastive_logits, sample_negatives
from selfsup.audio.masking import compute_span_mask
from selfsup.audio.quantizer import GumbelVectorQuantizer, QuantizerOutput, gumbel_temperature
from selfsup.config import Wav2Vec2Config
from selfsup.core.distributed import share_of_mean
from selfsup.core.objective import Progress


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
    """The wav2vec 2.0 objective (``selfsup.core.objective.Objective``).

    ``forward((waveforms (B, S) float32 16 kHz, lengths (B,) int64), progress)`` returns ``loss`` =
    contrastive + alpha * diversity + feature_penalty_weight * feature_penalty, plus detached metrics.
    Across ranks the loss is weighted by this rank's masked frames over their mean across ranks, so
    that DDP's gradient average is fairseq's: every masked frame of the global batch counts the same.
    """

    sync_batchnorm = False  # no BatchNorm: GroupNorm and LayerNorm only

    def __init__(self, cfg: Wav2Vec2Config | None = None):
        super().__init__()
        self.cfg = cfg = cfg or Wav2Vec2Config()
        self.find_unused_parameters = cfg.layer_drop > 0  # LayerDrop leaves skipped layers without gradients
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

    def health_monitors(self) -> list[CodebookHealthMonitor]:
        """The codebook collapse alarm on the logged accuracy and perplexity."""
        return [CodebookHealthMonitor(groups=self.cfg.codebook_groups)]

    def on_gradients(self, progress: Progress) -> None:
        """Before the optimiser step: the gradients as ``backward`` left them."""

    def on_after_step(self, progress: Progress, accepted: Tensor | None = None) -> None:
        """Anneal the Gumbel temperature, which follows ``progress`` alone: ``forward`` changes no state
        (codebook usage is measured per batch, not accumulated), so a skipped step has nothing to undo."""
        self.quantizer.temperature.fill_(self.temperature_at(progress))

    def param_groups(self) -> list[dict[str, Any]]:
        """Weights with decay; biases, norms, the mask embedding (all 1-D) without."""
        decay: list[nn.Parameter] = []
        no_decay: list[nn.Parameter] = []
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
        loss = loss * share_of_mean(n_masked)  # 1 on one rank
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
        return Wav2Vec2Step(features, frame_lengths, mask, negatives, context, targets, q, logits, duplicates, metrics)
