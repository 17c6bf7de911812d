"""Speech: wav2vec 2.0 on cropped 16 kHz clips."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from selfsup.audio.decode import SAMPLE_RATE
from selfsup.audio.feature_encoder import receptive_field
from selfsup.audio.hf_export import HF_FILES, write_hf_folder
from selfsup.audio.wav2vec2 import Wav2Vec2Pretraining
from selfsup.config import ExperimentConfig, Wav2Vec2MethodConfig
from selfsup.core.distributed import rank, world_size
from selfsup.core.objective import Objective
from selfsup.core.progress import progress
from selfsup.data.buckets import TokenBatching
from selfsup.data.decode import collate_audio, decode_audio_sample, decode_sample
from selfsup.data.reader import read_manifest, read_split, split_identity
from selfsup.data.stream import DataHealth, ShardStream
from selfsup.tasks import EvalSpec, LabelledSplit


def model_config(cfg: ExperimentConfig) -> Wav2Vec2MethodConfig:
    """``cfg.method``, wav2vec 2.0's: the config refuses another method with audio data."""
    if not isinstance(cfg.method, Wav2Vec2MethodConfig):
        raise TypeError(f"the audio task trains wav2vec2, not method {cfg.method.name!r}")
    return cfg.method


def clip_limits(cfg: ExperimentConfig) -> tuple[int, int]:
    """(shortest, longest) clip in samples: at least one mask span of frames beyond the receptive field,
    so masking and distractors work; ``data.max_tokens`` must hold the shortest."""
    method = model_config(cfg)
    field, hop = receptive_field(method.conv_kernels, method.conv_strides)
    min_samples = max(int(cfg.data.min_seconds * SAMPLE_RATE), field + method.mask_length * hop)
    max_samples = int(cfg.data.max_seconds * SAMPLE_RATE)
    if max_samples < min_samples:
        raise ValueError(
            f"data.max_seconds {cfg.data.max_seconds} is below the shortest usable clip "
            f"({min_samples / SAMPLE_RATE:g} s: data.min_seconds or the receptive field)"
        )
    if cfg.data.max_tokens is not None and cfg.data.max_tokens < min_samples:
        raise ValueError(
            f"data.max_tokens {cfg.data.max_tokens} is below the shortest usable clip, {min_samples} "
            f"samples ({min_samples / SAMPLE_RATE:g} s: data.min_seconds or the receptive field)"
        )
    return min_samples, max_samples


def labelled_clip(sample: dict, max_seconds: float) -> tuple[np.ndarray, int, str]:
    """A raw labelled clip -> (float32 (T,) 16 kHz wave, label, its ``voice`` or ``speaker`` or "");
    raises ValueError naming the key when it is bad, over ``max_seconds`` or has no label."""
    (wave, _), info = decode_sample(sample, "audio", max_seconds=max_seconds)
    if info.get("label", "") in ("", None):
        raise ValueError(f"sample {sample.get('__key__')}: no label in its .json")
    return wave, int(info["label"]), str(info.get("voice", info.get("speaker", "")))


@torch.no_grad()
def audio_layer_features(
    encoder: nn.Module, waves: list[np.ndarray], min_samples: int, desc: str | None = "features"
) -> list[np.ndarray]:
    """Mean over frames of every encoder layer's output, one clip at a time (no padding effects) on
    the encoder's device: [(N, D)] for the projected features and each transformer layer. Clips
    under ``min_samples`` (the receptive field) are zero-padded to it."""
    encoder.eval()
    device = next(encoder.parameters()).device
    per_layer: list[list[torch.Tensor]] = []
    for wave in progress(waves, desc=desc, unit="clip", mininterval=1.0, disable=desc is None, leave=False):
        x = torch.from_numpy(np.pad(wave, (0, max(0, min_samples - len(wave)))))[None].to(device)
        layers, _ = encoder(x, torch.tensor([x.shape[1]], device=device))
        if not per_layer:
            per_layer = [[] for _ in layers]
        for i, h in enumerate(layers):
            per_layer[i].append(h[0].float().mean(dim=0).cpu())
    return [torch.stack(f).numpy() for f in per_layer]


def log_mel_features(waves: list[np.ndarray], n_mels: int = 80) -> np.ndarray:
    """The log-mel baseline: 25 ms windows, 10 ms hop, ``n_mels`` bands; mean and std over time -> (N, 2 * n_mels)."""
    import torchaudio

    mel = torchaudio.transforms.MelSpectrogram(sample_rate=SAMPLE_RATE, n_fft=400, hop_length=160, n_mels=n_mels)
    out = []
    for wave in waves:
        spec = torch.log(mel(torch.from_numpy(wave)) + 1e-6)  # (n_mels, frames)
        out.append(torch.cat([spec.mean(dim=1), spec.std(dim=1, correction=0)]))
    return torch.stack(out).numpy()


class AudioTask:
    unit = "clip"

    def build_objective(self, cfg: ExperimentConfig) -> Objective:
        return Wav2Vec2Pretraining(model_config(cfg))

    def train_stream(self, cfg: ExperimentConfig) -> ShardStream:
        """Batches of {"waves": (B, S), "lengths": (B,), "labels": (B,)} clips for this rank, cropped to the
        batch's shortest: with ``data.max_tokens``, B clips of similar length with B·S <= max_tokens
        (planned from the manifest's durations, as fairseq), else ``data.batch_size`` clips."""
        min_samples, max_samples = clip_limits(cfg)
        tokens = None
        if cfg.data.max_tokens is not None:
            tokens = TokenBatching(cfg.data.max_tokens, min_samples, max_samples, cfg.data.bucket_size, SAMPLE_RATE)
            max_samples = tokens.cap
        return ShardStream(
            cfg.data.train,
            cfg.data.batch_size,
            functools.partial(decode_audio_sample, min_samples=min_samples, max_seconds=cfg.data.max_audio_seconds),
            functools.partial(collate_audio, max_samples=max_samples, min_samples=min_samples),
            rank=rank(),
            ranks=world_size(),
            workers=max(1, cfg.data.loader_workers),
            seed=cfg.seed,
            shuffle_buffer=cfg.data.shuffle_buffer,
            tokens=tokens,
            verify_checksums=cfg.data.verify_checksums,
        )

    def input_fn(
        self, cfg: ExperimentConfig, device: torch.device, health: DataHealth | None = None
    ) -> Callable[[dict], tuple[torch.Tensor, torch.Tensor]]:
        """batch -> (waves (B, S), lengths (B,)) on ``device`` (the clips were decoded by the workers:
        nothing here for ``health``)."""

        def to_input(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
            return batch["waves"].to(device, non_blocking=True), batch["lengths"].to(device, non_blocking=True)

        return to_input

    def read_labelled(self, location: str, cfg: ExperimentConfig, limit: int | None = None) -> LabelledSplit:
        """float32 (T_i,) 16 kHz waves, grouped by voice or speaker when the clips say."""
        listing = read_manifest(location)
        clip = functools.partial(labelled_clip, max_seconds=cfg.data.max_audio_seconds)
        items, manifest, problems = read_split(location, clip, limit, listing)
        waves, labels, groups = zip(*items)
        return LabelledSplit(
            location,
            list(waves),
            np.asarray(labels),
            manifest.get("classes", []),
            problems,
            list(groups),
            split_identity(location, listing),
        )

    def eval_features(
        self, encoder: nn.Module, split: LabelledSplit, cfg: ExperimentConfig, desc: str | None, probe_views: int = 1
    ) -> list[np.ndarray]:
        """[(N, D)] per layer (0: the projected conv features), mean over frames; no augmented views."""
        method = model_config(cfg)
        min_samples, _ = receptive_field(method.conv_kernels, method.conv_strides)
        return audio_layer_features(encoder, split.inputs, min_samples, desc)

    def baselines(self, train: LabelledSplit, test: LabelledSplit) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Log-mel, mean + std pooled."""
        return {"log_mel": (log_mel_features(train.inputs), log_mel_features(test.inputs))}

    def eval_spec(self, cfg: ExperimentConfig) -> EvalSpec:
        method = model_config(cfg)
        return EvalSpec(
            title=f"selfsup evaluation: {cfg.name} ({method.name}, {method.num_layers} layers of {method.embed_dim})",
            unit="clips",
            zscore=True,
            notes=(
                "features: mean over frames of one encoder layer (0 = projected conv features), "
                "z-scored with train statistics; log-mel: 80 bands, mean + std over time",
            ),
        )

    def input_spec(self, cfg: ExperimentConfig) -> dict:
        """float (B, T) waves at ``sample_rate`` Hz with their (B,) lengths (the encoder normalises them itself)."""
        return {"sample_rate": SAMPLE_RATE}

    def export(self, objective: Objective, cfg: ExperimentConfig, out: Path) -> str:
        """The encoder and the mask embedding as a Hugging Face ``transformers`` Wav2Vec2Model folder."""
        assert isinstance(objective, Wav2Vec2Pretraining)  # build_objective's
        write_hf_folder(out, objective.encoder, objective.mask_embedding, model_config(cfg))
        return (
            f"wrote the wav2vec2 encoder as a Hugging Face folder {out} ({', '.join(HF_FILES)}): "
            f"transformers.Wav2Vec2Model.from_pretrained({str(out)!r}), its feature extractor with "
            "AutoFeatureExtractor.from_pretrained"
        )
