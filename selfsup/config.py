"""The experiment config: one YAML file, validated before any process starts.

Unknown keys and bad values are errors that name the key. Any value can be overridden on the
command line as ``key.sub=value`` (the value is parsed as YAML).

This module is the schema only: every config class, including each method's hyper-parameters
(registered by name in ``METHOD_CONFIGS``) and the augmentation presets, as plain data. It imports
nothing from selfsup and no torch, so a config validates anywhere (``selfsup submit`` on a laptop).
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from selfsup.errors import OneLineError

PositiveFloat = Annotated[float, Field(gt=0)]
Fraction = Annotated[float, Field(gt=0, le=1)]  # of an image's area, a probability's range
Unit = Annotated[float, Field(ge=0, lt=1)]  # Adam's betas, a momentum
PositiveInt = Annotated[int, Field(gt=0)]


def _ordered(pair: tuple[float, float]) -> tuple[float, float]:
    if pair[0] > pair[1]:
        raise ValueError(f"({pair[0]}, {pair[1]}) is not a range: give (low, high) with low <= high")
    return pair


class Strict(BaseModel):
    """Every config section: an unknown key is an error, and so is a bad value set after validation."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ViewRecipe(Strict):
    """Augmentations for one view; every probability is per sample.

    ``size`` is the crop's side in pixels: None (a global crop) is ``data.image_size``, a smaller one a
    local crop (multi-crop, DINO's 96 px beside 224); ``copies`` repeats the recipe as that many views,
    each drawn independently (DINO's 8 local crops).
    """

    size: int | None = Field(None, gt=0, le=4096)
    copies: int = Field(1, ge=1, le=64)
    crop_scale: tuple[Fraction, Fraction] = (0.2, 1.0)
    crop_ratio: tuple[PositiveFloat, PositiveFloat] = (3 / 4, 4 / 3)
    flip_p: float = Field(0.5, ge=0, le=1)
    jitter_p: float = Field(0.0, ge=0, le=1)
    brightness: float = Field(0.4, ge=0)
    contrast: float = Field(0.4, ge=0)
    saturation: float = Field(0.2, ge=0)
    hue: float = Field(0.1, ge=0, le=0.5)
    grayscale_p: float = Field(0.0, ge=0, le=1)
    blur_p: float = Field(0.0, ge=0, le=1)
    blur_sigma: tuple[PositiveFloat, PositiveFloat] = (0.1, 2.0)
    solarize_p: float = Field(0.0, ge=0, le=1)

    _ranges = field_validator("crop_scale", "crop_ratio", "blur_sigma")(_ordered)


_SIMCLR = dict(jitter_p=0.8, brightness=0.8, contrast=0.8, saturation=0.8, hue=0.2, grayscale_p=0.2, blur_p=0.5)
_MOCO_V2 = dict(
    crop_scale=(0.2, 1.0),
    jitter_p=0.8,
    brightness=0.4,
    contrast=0.4,
    saturation=0.4,
    hue=0.1,
    grayscale_p=0.2,
    blur_p=0.5,
)
_GREY_JITTER = dict(jitter_p=0.8, brightness=0.4, contrast=0.4, saturation=0.0, hue=0.0)
_BYOL = dict(
    crop_scale=(0.08, 1.0), jitter_p=0.8, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1, grayscale_p=0.2
)

_DINO = dict(jitter_p=0.8, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1, grayscale_p=0.2)

PRESETS: dict[str, list[dict]] = {
    # grey images (Fashion-MNIST): crop, flip, the papers' colour jitter where it applies to one channel
    # (brightness and contrast, as MoCo v2 / BYOL: 0.4 each, p 0.8), blur
    "grey": [dict(_GREY_JITTER, blur_p=0.5), dict(_GREY_JITTER, blur_p=0.5)],
    "grey-byol": [dict(blur_p=1.0), dict(blur_p=0.1, solarize_p=0.2)],
    "simclr": [_SIMCLR, _SIMCLR],
    "moco-v2": [_MOCO_V2, _MOCO_V2],
    # BYOL's asymmetric pair: view 1 always blurred, view 2 rarely blurred and sometimes solarized
    "byol": [dict(_BYOL, blur_p=1.0), dict(_BYOL, blur_p=0.1, solarize_p=0.2)],
    # DINO's multi-crop (main_dino.py DataAugmentationDINO): two global crops from (0.4, 1), BYOL's pair of
    # blur/solarize, and 8 local crops of 96 px from (0.05, 0.4), blurred at 0.5
    "dino": [
        dict(_DINO, crop_scale=(0.4, 1.0), blur_p=1.0),
        dict(_DINO, crop_scale=(0.4, 1.0), blur_p=0.1, solarize_p=0.2),
        dict(_DINO, size=96, copies=8, crop_scale=(0.05, 0.4), blur_p=0.5),
    ],
}


def preset_views(name: str) -> list[ViewRecipe]:
    """The recipes of the preset ``name`` (a key of ``PRESETS``; ``AugmentConfig`` checks it)."""
    return [ViewRecipe(**v) for v in PRESETS[name]]


def expand_copies(recipes: list[ViewRecipe]) -> list[ViewRecipe]:
    """One recipe per view: each recipe ``copies`` times (as ``copies=1``), in order."""
    return [r.model_copy(update={"copies": 1}) for r in recipes for _ in range(r.copies)]


class ImageMethodConfig(Strict):
    """Base of the image methods' hyper-parameters; ``data_kind`` is the ``data.kind`` a method trains on.

    ``global_views`` and ``local_views``: how many views at ``data.image_size`` the method needs, and
    whether its loss takes any number of smaller (local) views besides them (multi-crop)."""

    data_kind: ClassVar[str] = "image"
    global_views: ClassVar[int] = 2
    local_views: ClassVar[bool] = False
    name: str  # each method's own Literal, the key of METHOD_CONFIGS


class SimCLRConfig(ImageMethodConfig):
    """SimCLR's hyper-parameters."""

    local_views: ClassVar[bool] = True  # multi-crop: every view of a sample a positive of the others
    name: Literal["simclr"] = "simclr"
    temperature: float = Field(0.2, gt=0, le=10)
    proj_hidden_dim: int = Field(2048, gt=0, le=65536)
    proj_dim: int = Field(128, gt=0, le=65536)
    proj_layers: int = Field(2, ge=1, le=8)
    sync_bn: bool = True  # the paper's "Global BN": BatchNorm over the batch of every rank


class MoCoV2Config(ImageMethodConfig):
    """MoCo v2's hyper-parameters (the paper's ImageNet values).

    ``proj_hidden_dim=None`` sizes the head's hidden layer to the backbone's feature dimension
    (2048 for ResNet-50). ``symmetric`` adds the swapped query/key loss (sum of both) and enqueues
    both views' keys; the paper's v2 is asymmetric.
    """

    name: Literal["moco_v2"] = "moco_v2"
    temperature: float = Field(0.2, gt=0)
    momentum: float = Field(0.999, ge=0, le=1)
    queue_size: int = Field(65536, gt=0)
    proj_hidden_dim: int | None = Field(None, gt=0)
    proj_dim: int = Field(128, gt=0)
    symmetric: bool = False
    shuffle_bn: bool = True  # the paper's Shuffle-BN for the key encoder (MoCo v1 §3.3)
    sync_bn: bool = False  # SyncBN instead: BatchNorm over the batch of every rank

    @model_validator(mode="after")
    def _one_bn_mode(self) -> MoCoV2Config:
        if self.shuffle_bn and self.sync_bn:
            raise ValueError("method.shuffle_bn and method.sync_bn are both true: choose one (set the other to false)")
        return self


class MoCoV3Config(ImageMethodConfig):
    """MoCo v3's hyper-parameters (the paper's ResNet-50 values; for ViT use ``temperature=0.2``).

    ``None`` hidden sizes scale with the backbone: projector and predictor hidden layers are
    2 x feature_dim (4096 for ResNet-50). The momentum follows a cosine schedule from
    ``momentum_base`` to 1.
    """

    name: Literal["moco_v3"] = "moco_v3"
    temperature: float = Field(1.0, gt=0)
    momentum_base: float = Field(0.99, ge=0, le=1)
    proj_hidden_dim: int | None = Field(None, gt=0)
    proj_dim: int = Field(256, gt=0)
    pred_hidden_dim: int | None = Field(None, gt=0)
    sync_bn: bool = True


class BYOLConfig(ImageMethodConfig):
    """BYOL's hyper-parameters (the paper's ResNet-50 values).

    ``tau_base`` is the target EMA rate at the start, raised to 1 on a cosine schedule: 0.99 for
    runs up to ~300 epochs, 0.996 as the paper uses for 1000 epochs. ``None`` hidden sizes scale with
    the backbone: 2 x feature_dim (4096 for ResNet-50), for the projector and the predictor.
    """

    local_views: ClassVar[bool] = True  # multi-crop: each view predicts the targets of the global views
    name: Literal["byol"] = "byol"
    tau_base: float = Field(0.99, ge=0, le=1)
    proj_hidden_dim: int | None = Field(None, gt=0)
    proj_dim: int = Field(256, gt=0)
    pred_hidden_dim: int | None = Field(None, gt=0)
    sync_bn: bool = True


class SimSiamConfig(ImageMethodConfig):
    """SimSiam's hyper-parameters. ``None`` sizes scale with the backbone as in the paper.

    ``proj_dim`` and ``proj_hidden_dim`` default to the feature dimension (2048 for ResNet-50);
    ``pred_hidden_dim`` to ``proj_dim // 4`` (the 512-wide bottleneck). The predictor's learning
    rate is fixed (not decayed), as the paper recommends.
    """

    name: Literal["simsiam"] = "simsiam"
    proj_dim: int | None = Field(None, gt=0)
    proj_hidden_dim: int | None = Field(None, gt=0)
    pred_hidden_dim: int | None = Field(None, gt=0)
    sync_bn: bool = True


class VICRegConfig(ImageMethodConfig):
    """VICReg's hyper-parameters (Bardes, Ponce, LeCun 2022, the paper's ImageNet values).

    The expander has ``proj_layers`` linear layers, ``proj_hidden_dim`` wide, to ``proj_dim``
    (8192-8192-8192 for ResNet-50); the loss weighs invariance, variance and covariance by
    ``sim_coeff``, ``std_coeff`` and ``cov_coeff`` (λ, μ, ν = 25, 25, 1).
    """

    name: Literal["vicreg"] = "vicreg"
    sim_coeff: float = Field(25.0, ge=0, le=1e4)
    std_coeff: float = Field(25.0, ge=0, le=1e4)
    cov_coeff: float = Field(1.0, ge=0, le=1e4)
    proj_hidden_dim: int = Field(8192, gt=0, le=65536)
    proj_dim: int = Field(8192, gt=0, le=65536)
    proj_layers: int = Field(3, ge=2, le=8)
    sync_bn: bool = True  # the official code converts every BatchNorm to SyncBatchNorm


class BarlowTwinsConfig(ImageMethodConfig):
    """Barlow Twins' hyper-parameters (Zbontar et al. 2021).

    ``lambd`` weighs the off-diagonal (redundancy) terms of the cross-correlation matrix (the
    paper's λ = 5e-3); ``scale_loss`` multiplies the whole loss, as the first release of the official
    code did (0.024 in its best ImageNet run; 1 is the paper's loss). The projector has ``proj_layers``
    linear layers, ``proj_hidden_dim`` wide, to ``proj_dim`` (8192-8192-8192 for ResNet-50).
    """

    name: Literal["barlow_twins"] = "barlow_twins"
    lambd: float = Field(5e-3, gt=0, le=1)
    scale_loss: float = Field(1.0, gt=0, le=100)
    proj_hidden_dim: int = Field(8192, gt=0, le=65536)
    proj_dim: int = Field(8192, gt=0, le=65536)
    proj_layers: int = Field(3, ge=2, le=8)
    sync_bn: bool = True  # the cross-correlation is normalised over the global batch (SyncBatchNorm)


class DINOConfig(ImageMethodConfig):
    """DINO's hyper-parameters (Caron et al. 2021; defaults: the official main_dino.py's, ViT-S/16).

    The student sees every view, the EMA teacher (momentum ``momentum_teacher`` -> 1 on a cosine) the
    global ones. The head: ``head_layers`` linears ``hidden_dim`` wide to ``bottleneck_dim``, then a
    weight-normalised layer to ``out_dim`` (its norm frozen with ``norm_last_layer``; the whole layer
    frozen for the first ``freeze_last_layer_epochs``). The teacher's temperature rises linearly from
    ``warmup_teacher_temp`` to ``teacher_temp`` over ``warmup_teacher_temp_epochs`` (by whole epochs);
    its outputs are centred by a running mean of momentum ``center_momentum`` over every rank's batch.
    ``clip_grad`` clips each parameter's gradient norm on its own (the official ``clip_gradients``);
    None: no clipping.
    """

    local_views: ClassVar[bool] = True
    name: Literal["dino"] = "dino"
    out_dim: int = Field(65536, gt=0, le=262144)
    hidden_dim: int = Field(2048, gt=0, le=65536)
    bottleneck_dim: int = Field(256, gt=0, le=65536)
    head_layers: int = Field(3, ge=1, le=8)
    use_bn_in_head: bool = False
    norm_last_layer: bool = True
    momentum_teacher: float = Field(0.996, ge=0, le=1)
    student_temp: float = Field(0.1, gt=0, le=10)
    warmup_teacher_temp: float = Field(0.04, gt=0, le=10)
    teacher_temp: float = Field(0.04, gt=0, le=10)
    warmup_teacher_temp_epochs: int = Field(0, ge=0, le=10000)
    center_momentum: float = Field(0.9, ge=0, le=1)
    freeze_last_layer_epochs: float = Field(1.0, ge=0, le=10000)
    clip_grad: float | None = Field(3.0, gt=0, le=1e4)
    sync_bn: bool = True  # the official code converts a backbone's (and head's) BatchNorm to SyncBatchNorm


class Wav2Vec2Config(Strict):
    """Model and objective hyper-parameters; defaults are the paper's BASE (95M parameters)."""

    model_config = ConfigDict(frozen=True)

    # Feature encoder (raw 16 kHz waveform -> 50 Hz frames): channels of each conv layer, their kernel widths
    # and strides (these: 320x downsampling, 49 frames per second); group_norm: one per-channel norm after
    # conv 1 (BASE), layer_norm: after every conv (LARGE)
    conv_channels: int = Field(512, gt=0)
    conv_kernels: tuple[PositiveInt, ...] = Field((10, 3, 3, 3, 3, 2, 2), min_length=1)
    conv_strides: tuple[PositiveInt, ...] = Field((5, 2, 2, 2, 2, 2, 2), min_length=1)
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
    # Span masking: ~49% of frames at p=0.65, spans of 10; the same masked count in every row
    mask_prob: float = Field(0.65, ge=0.0, le=1.0)
    mask_length: int = Field(10, gt=0)
    min_mask_spans: int = Field(2, ge=1)
    # Gumbel product quantiser: G groups x V entries, codevectors of codevector_dim. Its temperature is
    # max(end, start * decay^s), s the step rescaled so that it reaches `end` at the same fraction of training
    # as the paper's run of gumbel_reference_updates updates
    codebook_groups: int = Field(2, gt=0)
    codebook_entries: int = Field(320, gt=1)
    codevector_dim: int = Field(256, gt=0)
    final_dim: int = Field(256, gt=0)  # projection of context outputs and targets
    gumbel_temperature_start: float = Field(2.0, gt=0.0)
    gumbel_temperature_end: float = Field(0.5, gt=0.0)
    gumbel_temperature_decay: float = Field(0.999995, gt=0.0, le=1.0)
    gumbel_reference_updates: int = Field(400_000, gt=0)  # the schedule is rescaled to the planned updates
    # Loss: K distractors, kappa, diversity alpha, feature L2 penalty weight
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
            feature_grad_mult=1.0,  # BASE 0.1: the tiny stack learns too slowly with it
            embed_dim=128,
            num_layers=2,
            num_heads=2,
            ffn_dim=256,
            pos_conv_kernel=32,
            dropout=0.0,  # no dropout: the tiny model under-fits in a CPU-minutes budget
            attention_dropout=0.0,
            dropout_input=0.0,
            dropout_features=0.0,
            layer_drop=0.0,
            mask_prob=0.5,  # ~37% of frames (BASE: p=0.65, span 10, for 15 s crops)
            mask_length=5,
            codebook_entries=64,
            codevector_dim=64,
            final_dim=64,
            gumbel_reference_updates=400_000,
            num_negatives=20,  # BASE 100; a 2 s crop has ~37 masked frames
            feature_penalty_weight=0.1,  # BASE 10, which shrinks the tiny conv features to ~0
        )


class Wav2Vec2MethodConfig(Wav2Vec2Config):
    """wav2vec 2.0 under ``method:``: the fields of ``Wav2Vec2Config``, defaulting to ``preset``'s when given."""

    data_kind: ClassVar[str] = "audio"
    name: Literal["wav2vec2"] = "wav2vec2"
    preset: Literal["tiny", "base", "large"] | None = None

    @model_validator(mode="before")
    @classmethod
    def _preset_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("preset") in ("tiny", "base", "large"):
            return {**getattr(Wav2Vec2Config, data["preset"])().model_dump(), **data}
        return data


# Every method's config, the union that `method:` validates against (by its `name`); a new method is one
# class more here.
MethodConfig = Annotated[
    SimCLRConfig
    | MoCoV2Config
    | MoCoV3Config
    | BYOLConfig
    | SimSiamConfig
    | VICRegConfig
    | BarlowTwinsConfig
    | DINOConfig
    | Wav2Vec2MethodConfig,
    Field(discriminator="name"),
]
METHOD_CONFIGS: dict[str, type[BaseModel]] = {
    cls.model_fields["name"].default: cls for cls in get_args(get_args(MethodConfig)[0])
}


def cache_root() -> Path:
    """This machine's cache: ``$SELFSUP_CACHE``, default ``~/.cache/selfsup``."""
    return Path(os.environ.get("SELFSUP_CACHE", "~/.cache/selfsup")).expanduser()


def mirror_dir(run_root: str, name: str) -> Path:
    """The local working copy (under :func:`cache_root`) of the run ``<run_root>/<name>``, ``run_root``
    an s3:// or gs:// URL."""
    scheme, rest = run_root.split("://", 1)
    return cache_root() / "runs" / scheme / rest.strip("/") / name


MAX_AUDIO_SECONDS = 600.0  # data.max_audio_seconds: a clip decodes to at most 38 MB at 16 kHz (more at its own rate)
MAX_IMAGE_PIXELS = 64_000_000  # data.max_image_pixels: an 8000x8000 photo fits, and decodes to 192 MB as RGB


class DataConfig(Strict):
    """Where the shards are and how they become batches."""

    train: str = Field(description="shard directory, brace pattern or URL of the training shards")
    kind: Literal["image", "audio"] = Field("image", description="what the shards hold (audio: wav2vec2)")
    test: str | None = Field(None, description="shards scored by `selfsup eval` and online monitoring")
    batch_size: int = Field(256, gt=0, description="per rank")
    loader_workers: int = Field(1, ge=0, description="DataLoader worker processes per rank")
    shuffle_buffer: int = Field(2000, ge=0)
    image_size: int = Field(28, gt=0)
    channels: int = Field(1, ge=1)
    mean: list[float] = [0.2860]
    std: list[PositiveFloat] = [0.3530]
    max_seconds: float = Field(
        15.625, gt=0, description="audio: random crop length; batches are cut to their shortest clip"
    )
    min_seconds: float = Field(2.0, ge=0, description="audio: shorter clips are skipped (and counted)")
    max_tokens: int | None = Field(
        None,
        gt=0,
        description="audio: samples per rank per batch, filled from clips of "
        "similar length (fairseq's max_tokens); None: data.batch_size clips per batch",
    )
    bucket_size: int = Field(
        1000,
        gt=1,
        description="audio with max_tokens: consecutive clips of a shard sorted by "
        "length together and cut into batches (more: closer lengths, more loader memory)",
    )
    verify_checksums: bool = Field(False, description="check each shard's sha256 while streaming")
    decode: Literal["auto", "cpu", "gpu"] = Field(
        "auto",
        description="images of many sizes: where JPEGs are "
        "decoded and views cut (gpu: nvJPEG; auto: gpu when training on CUDA)",
    )
    max_image_pixels: int = Field(
        MAX_IMAGE_PIXELS,
        gt=0,
        description="images: one of more pixels (width x "
        "height, from its header) is skipped and counted, never decoded",
    )
    max_audio_seconds: float = Field(
        MAX_AUDIO_SECONDS,
        gt=0,
        description="audio: a clip longer than this (from its header, or "
        "read no further) is skipped and counted, never decoded whole",
    )

    @model_validator(mode="after")
    def _stats_match_channels(self) -> DataConfig:
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(f"data.mean and data.std need {self.channels} values (data.channels)")
        return self


class AugmentConfig(Strict):
    """A named preset, or explicit per-view recipes (which win)."""

    preset: str = "grey"
    views: list[ViewRecipe] | None = None

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, v: str) -> str:
        if v not in PRESETS:
            raise ValueError(f"unknown preset {v!r}; choose one of {sorted(PRESETS)}")
        return v


# the ViT backbones' patch sizes (their specs: selfsup.vision.backbones.VIT_SPECS)
VIT_PATCH = {"vit_b_16": 16, "vit_s_16": 16}


class ModelConfig(Strict):
    backbone: Literal["resnet18", "resnet34", "resnet50", "vit_b_16", "vit_s_16"] = "resnet18"
    width: int = Field(64, gt=0, description="channels of the first ResNet stage (64 = standard)")
    small_stem: bool = Field(True, description="3x3 stem without max-pool, for 28-32 px images")
    stem_stride: int = Field(1, ge=1, le=2, description="stride of the small stem (2 quarters the compute)")
    freeze_patch_embed: bool = Field(False, description="ViT: keep the patch projection random and frozen (MoCo v3)")


class OptimConfig(Strict):
    name: Literal["sgd", "lars", "adamw"] = "sgd"
    lr: float = Field(0.3, gt=0, description="learning rate at the reference batch (see lr_scaling)")
    lr_scaling: Literal["linear", "sqrt", "none"] = "linear"
    reference_batch: int = Field(256, gt=0, description="global batch at which `lr` applies")
    momentum: float = Field(0.9, ge=0, lt=1)
    lars_eta: float = Field(0.001, gt=0, description="LARS trust coefficient (SimCLR 0.001; solo-learn CIFAR 0.02)")
    betas: tuple[Unit, Unit] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon")
    weight_decay: float = Field(1e-4, ge=0)
    weight_decay_end: float | None = Field(
        None,
        ge=0,
        le=10,
        description="weight decay at the end of the "
        "run, on a cosine from weight_decay (DINO: 0.04 -> 0.4); None: constant",
    )
    warmup_epochs: float | None = Field(1.0, ge=0, description="linear warm-up, in epochs (None with `updates`)")
    decay: Literal["cosine", "linear"] = Field(
        "cosine", description="after the warm-up: cosine to 0, or linear to 0 (fairseq's polynomial_decay, power 1)"
    )
    epochs: float | None = Field(10, gt=0, description="the schedule's length in epochs (None with `updates`)")
    updates: int | None = Field(
        None,
        gt=0,
        description="the schedule's length in optimiser updates, for a recipe "
        "stated in updates (fairseq's max_update), in place of `epochs`",
    )
    warmup_updates: int | None = Field(
        None,
        ge=0,
        description="with `updates`: the linear warm-up in updates "
        "(fairseq's warmup_updates), in place of `warmup_epochs`; None: 0",
    )
    minutes: float | None = Field(
        None,
        gt=0,
        description="fit training into this wall time: after a few "
        "steps the schedule is cut to the steps that fit (never beyond `epochs`)",
    )
    reserve_steps: int = Field(
        0,
        ge=0,
        description="with `minutes`: leave the time of this many more steps, at "
        "the measured pace, free at the end (for work that follows and slows with the "
        "machine, as the demo's evaluation)",
    )
    grad_clip: float | None = Field(None, gt=0)
    max_bad_steps: int = Field(
        10, ge=1, description="consecutive NaN/inf losses (each skipped) that stop the run at the next logging step"
    )

    @model_validator(mode="before")
    @classmethod
    def _updates_replace_epochs(cls, data: Any) -> Any:
        """With ``updates`` given, ``epochs`` and ``warmup_epochs`` default to None (their defaults are in epochs)."""
        if isinstance(data, dict) and data.get("updates") is not None:
            return {"epochs": None, "warmup_epochs": None, **data}
        return data

    @model_validator(mode="after")
    def _one_unit_for_the_schedule(self) -> OptimConfig:
        if self.updates is None:
            if self.epochs is None or self.warmup_epochs is None:
                raise ValueError(
                    "optim.epochs and optim.warmup_epochs are needed without optim.updates: give the "
                    "schedule in epochs, or its length as optim.updates"
                )
            if self.warmup_updates is not None:
                raise ValueError(
                    "optim.warmup_updates needs optim.updates: give the schedule's length in updates "
                    "too, or the warm-up as optim.warmup_epochs"
                )
            return self
        for key in ("epochs", "warmup_epochs"):
            if getattr(self, key) is not None:
                raise ValueError(
                    f"optim.{key} and optim.updates both give the schedule in a unit: keep one (with "
                    f"optim.updates, the warm-up is optim.warmup_updates; optim.updates=null for epochs)"
                )
        if (self.warmup_updates or 0) > self.updates:
            raise ValueError(f"optim.warmup_updates {self.warmup_updates} is longer than optim.updates {self.updates}")
        return self

    def schedule_steps(self, steps_per_epoch: int) -> tuple[int, int]:
        """The schedule's (total, warm-up) optimiser steps: ``updates`` and ``warmup_updates`` when the recipe
        gives updates, else ``epochs`` and ``warmup_epochs`` at ``steps_per_epoch`` steps an epoch."""
        if self.updates is not None:
            return self.updates, self.warmup_updates or 0
        assert self.epochs is not None and self.warmup_epochs is not None  # _one_unit_for_the_schedule
        return max(1, math.ceil(self.epochs * steps_per_epoch)), int(self.warmup_epochs * steps_per_epoch)


class TrainConfig(Strict):
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    channels_last: bool = True
    compile: bool = False
    threads: int | None = Field(None, ge=1, description="torch intra-op threads per rank (default: all cores)")
    adapt_threads: bool = Field(
        False,
        description="on a CPU, time the steps at `threads` and at one thread and keep "
        "the faster, again every 250 steps (another program on the cores makes fewer faster)",
    )
    log_every_steps: int = Field(20, ge=1)
    checkpoint_every_steps: int = Field(500, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    monitor_every_epochs: int = Field(0, ge=0, description="online kNN on held-out data every N epochs; 0 = off")


class ScalingConfig(Strict):
    num_workers: int | tuple[int, int] = Field(
        1, description="training processes (one per GPU); [min, max] for elastic training (Ray picks the count)"
    )
    use_gpu: bool = False
    cpus_per_worker: int = Field(1, ge=1)
    max_failures: int = Field(0, ge=-1)

    @field_validator("num_workers")
    @classmethod
    def _workers_range(cls, v: int | tuple[int, int]) -> int | tuple[int, int]:
        low, high = v if isinstance(v, tuple) else (v, v)
        if low < 1 or high < low:
            raise ValueError("needs a count >= 1, or [min, max] with 1 <= min <= max")
        return v


class TrackingConfig(Strict):
    """Weights & Biases: one run per pretraining run, one per ``selfsup eval``, both in ``group``."""

    mode: Literal["offline", "online", "disabled"] = Field(
        "offline",
        description="offline: under <run>/wandb, uploaded later with `wandb sync`; online: needs "
        "WANDB_API_KEY or `wandb login`",
    )
    project: str = "selfsup"
    entity: str | None = None
    group: str | None = Field(
        None, min_length=1, description="W&B group of the run and its evals (default: the run's name)"
    )
    tags: list[Annotated[str, Field(min_length=1, max_length=64)]] = []
    log_checkpoints: bool = Field(
        False,
        description="upload each checkpoint as a W&B 'model' artifact named "
        "after the run, aliases latest and samples-N",
    )


class EvalConfig(Strict):
    knn: list[tuple[PositiveInt, PositiveFloat]] = Field(
        [(20, 0.07), (200, 0.1)], description="kNN classifiers to score: (k, temperature) each"
    )
    baselines: bool = True
    probe_views: int = Field(
        4,
        ge=1,
        description="linear probe train rows per image: the un-augmented features "
        "plus probe_views - 1 passes of the paper probe's crops and flips",
    )


class ExperimentConfig(Strict):
    """One pretraining experiment."""

    name: str = Field(description="run name: runs/<name>/ is resumed when it exists")
    run_root: str = "runs"
    seed: int = Field(0, ge=0)
    deterministic: bool = False
    data: DataConfig
    augment: AugmentConfig = AugmentConfig()
    model: ModelConfig = ModelConfig()
    method: MethodConfig
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    scaling: ScalingConfig = ScalingConfig()
    tracking: TrackingConfig = TrackingConfig()
    eval: EvalConfig = EvalConfig()

    @field_validator("name")
    @classmethod
    def _one_safe_folder_name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", v) or set(v) == {"."}:
            raise ValueError(
                f"{v!r} is not a run name: use one folder name of letters, digits, '_', '-' and '.' "
                "(not '.' or '..', no '/')"
            )
        return v

    @model_validator(mode="after")
    def _data_kind_matches_method(self) -> ExperimentConfig:
        wanted = self.method.data_kind
        if self.data.kind != wanted:
            raise ValueError(f"data.kind must be {wanted!r} for method {self.method.name!r}, not {self.data.kind!r}")
        return self

    @model_validator(mode="after")
    def _monitor_has_held_out_data(self) -> ExperimentConfig:
        if self.train.monitor_every_epochs and self.data.test is None:
            raise ValueError(
                "train.monitor_every_epochs needs labelled held-out shards: set data.test, "
                "or train.monitor_every_epochs=0"
            )
        return self

    @property
    def run_dir(self) -> Path:
        """The run's local directory (for an s3:// or gs:// ``run_root``, its local mirror)."""
        if self.run_url:
            return mirror_dir(self.run_root, self.name)
        return Path(self.run_root) / self.name

    @property
    def run_url(self) -> str | None:
        """``<run_root>/<name>`` when ``run_root`` is an s3:// or gs:// URL, else None."""
        if self.run_root.startswith(("s3://", "gs://")):
            return f"{self.run_root.rstrip('/')}/{self.name}"
        return None

    def view_recipes(self) -> list[ViewRecipe]:
        """The augmentation of each view, copies expanded: ``augment.views`` when given, else the preset's."""
        return expand_copies(self.augment.views or preset_views(self.augment.preset))

    def view_sizes(self) -> list[int]:
        """Each view's side in pixels: the global views' ``data.image_size``, then the local views' sizes."""
        return [r.size or self.data.image_size for r in self.view_recipes()]

    @model_validator(mode="after")
    def _views_fit_the_method(self) -> ExperimentConfig:
        if not isinstance(self.method, ImageMethodConfig):
            return self
        key = "augment.views" if self.augment.views else f"augment.preset={self.augment.preset}"
        sizes, size = self.view_sizes(), self.data.image_size
        for i, s in enumerate(sizes):
            if s > size:
                raise ValueError(
                    f"{key}: view {i} has size {s}, larger than data.image_size {size}: a local crop "
                    "must be smaller than the global crops (or leave size unset for a global crop)"
                )
        if sizes != sorted(sizes, reverse=True):
            raise ValueError(
                f"{key}: views of sizes {sizes}: list the global views first, then the local views "
                "from the largest size to the smallest (each size runs through the backbone as a batch)"
            )
        patch = VIT_PATCH.get(self.model.backbone)
        for s in sorted(set(sizes), reverse=True):
            if patch and s % patch:
                raise ValueError(
                    f"model.backbone {self.model.backbone} has {patch}-px patches, which do not divide "
                    f"the {s}-px views ({key}, data.image_size {size}): use view sizes that are "
                    f"multiples of {patch}"
                )
        n_global, n_local = sizes.count(size), len(sizes) - sizes.count(size)
        name, wanted = self.method.name, self.method.global_views
        if n_global < wanted:
            raise ValueError(f"{key}: method {name} needs {wanted} views at data.image_size {size}, got {n_global}")
        if n_local and not self.method.local_views:
            raise ValueError(
                f"{key}: method {name} does not use local crops ({n_local} views smaller than "
                f"data.image_size {size}); remove them, or choose a method that takes multi-crop"
            )
        return self


class ConfigError(OneLineError, ValueError):
    """A config that cannot be used; the message names the key."""


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        if not isinstance(node.get(k, {}), dict):
            raise ConfigError(f"override {dotted}: {k} is not a section")
        node = node.setdefault(k, {})
    node[keys[-1]] = value


def _close_key(loc: tuple) -> str:
    """The known key nearest an unknown one at ``loc`` (a validation error's location), or ""."""
    model: type[BaseModel] | None = ExperimentConfig
    for part in loc[:-1]:
        if isinstance(part, str) and part in METHOD_CONFIGS:  # the method's tag: its own section's keys
            model = METHOD_CONFIGS[part]
            continue
        field = model.model_fields.get(part) if model is not None else None
        annotation = field.annotation if field is not None else None
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    if model is None:
        return ""
    close = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1)
    return close[0] if close else ""


def _format_errors(err: ValidationError, source: str) -> str:
    """One line for one error (``invalid config SOURCE: key: what``), else a line per error."""
    lines = []
    for e in err.errors():
        path = [str(p) for p in e["loc"] if not (isinstance(p, str) and p in METHOD_CONFIGS)]
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            close = _close_key(e["loc"])
            msg = (
                f"unknown key; did you mean {'.'.join([*path[:-1], close])}?"
                if close
                else "unknown key (check the spelling)"
            )
        lines.append(f"{'.'.join(path) or '(top level)'}: {msg}")
    if len(lines) == 1:
        return f"invalid config {source}: {lines[0]}"
    return "\n  ".join([f"invalid config {source}:", *lines])


def _parse_override(item: str) -> tuple[str, Any]:
    """``key.sub=value`` as its key and its value parsed as YAML."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key.sub=value")
    key, raw = item.split("=", 1)
    try:
        return key, yaml.safe_load(raw)
    except yaml.YAMLError as err:
        raise ConfigError(f"override {key}: value {raw!r} is not plain YAML data ({err.problem})") from None


def parse_config(tree: dict, overrides: Sequence[str] = (), source: str = "<dict>") -> ExperimentConfig:
    """Validate a config tree after applying ``key.sub=value`` overrides.

    ``method.name=OTHER`` switches the method: the old method's keys are dropped, so the new one
    starts from its own defaults (later ``method.*`` overrides still apply)."""
    tree = yaml.safe_load(yaml.safe_dump(tree))  # deep copy of plain data
    for item in overrides:
        key, value = _parse_override(item)
        method = tree.get("method")
        if key == "method.name" and isinstance(method, dict) and method.get("name") != value:
            tree["method"] = {}
        _set_dotted(tree, key, value)
    try:
        return ExperimentConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None


CONFIG_DIR = Path(__file__).with_name("configs")  # the shipped configs (package data)


def shipped_configs() -> dict[str, Path]:
    """The configs that ship inside the package (``selfsup/configs/``), by name: the file's stem."""
    return {p.stem: p for p in sorted(CONFIG_DIR.glob("*.yaml"))}


def config_description(path: str | Path) -> str:
    """A config file's one-line description: its first line, when that is a comment."""
    first = Path(path).read_text(encoding="utf-8").split("\n", 1)[0]
    return first.lstrip("#").strip() if first.startswith("#") else ""


def find_config(path_or_name: str | Path) -> Path:
    """The config file a command names: a path to a YAML file, or the name of a shipped config
    (``quickstart``, ``simclr-resnet50-imagenet``; ``selfsup configs`` lists them)."""
    path = Path(path_or_name)
    if path.is_file():
        return path
    bare = path.parent == Path(".")
    shipped = shipped_configs().get(path.name.removesuffix(".yaml")) if bare else None
    if shipped:
        return shipped
    also = ", nor is it the name of a shipped config" if bare else ""
    raise ConfigError(
        f"config file {path} does not exist{also}: give a YAML file, or one of the names `selfsup configs` lists"
    )


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Read and validate a YAML experiment file, given by path or by a shipped config's name."""
    path = find_config(path)
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path} must hold a mapping of sections (name, data, method, ...)")
    return parse_config(tree, overrides, str(path))


# Keys that mean something for one kind of data only (``data.kind``); :func:`dump_config` leaves out
# the other kind's where they hold their defaults.
KIND_KEYS = {
    "image": ("data.image_size", "data.channels", "data.mean", "data.std", "data.decode", "augment", "model"),
    "audio": ("data.max_seconds", "data.min_seconds", "data.max_tokens", "data.bucket_size"),
}


def dump_config(cfg: ExperimentConfig) -> str:
    """The config as YAML, the form written beside checkpoints and shown by `config show`: without the
    keys of the other kind of data (an audio run's image keys) that hold their defaults, so that loading
    it gives the same config."""
    tree = cfg.model_dump(mode="json")
    for kind, keys in KIND_KEYS.items():
        if kind == cfg.data.kind:
            continue
        for key in keys:
            section, _, leaf = key.partition(".")
            if not leaf:
                if tree[section] == ExperimentConfig.model_fields[section].get_default().model_dump(mode="json"):
                    del tree[section]
            elif tree[section][leaf] == DataConfig.model_fields[leaf].get_default():
                del tree[section][leaf]
    return yaml.safe_dump(tree, sort_keys=False)


# The keys (a dotted key, or a whole section) that may differ between a run's checkpoints and the config that
# resumes it: where and on what it runs (elastic resizes), how long (extend a run), what it logs, keeps and
# evaluates. Any other change (model, method, augmentation, optimiser, batch, seed) would train another
# experiment under the same name, so resuming refuses it (``selfsup pretrain --restart`` starts afresh).
RESUMABLE_KEYS = (
    "name",
    "run_root",
    "data.train",
    "data.test",  # the same run and shards at another path (absolute under Ray)
    "data.loader_workers",
    "data.verify_checksums",
    "data.decode",
    "optim.epochs",
    "optim.updates",
    "optim.minutes",
    "optim.reserve_steps",
    "optim.max_bad_steps",
    "train.precision",
    "train.channels_last",
    "train.compile",
    "train.threads",
    "train.adapt_threads",
    "train.log_every_steps",
    "train.checkpoint_every_steps",
    "train.keep_checkpoints",
    "train.monitor_every_epochs",
    "scaling",
    "tracking",
    "eval",
)


def _leaves(tree: dict, prefix: str = "") -> dict[str, Any]:
    """A nested dict as dotted key -> value (lists and other non-dict values are leaves)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_leaves(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_differences(old: dict, new: dict, allowed: tuple[str, ...] = RESUMABLE_KEYS) -> dict[str, tuple[Any, Any]]:
    """The dotted keys whose values differ between two config trees (``model_dump(mode="json")``), as
    key -> (old value, new value): the keys both have first, in ``new``'s order, then those one side
    lacks (another method's), None there. Keys in ``allowed``, or under a section it names, are left out."""
    before, after = _leaves(old), _leaves(new)
    keys = [
        *(k for k in after if k in before),
        *(k for k in after if k not in before),
        *(k for k in before if k not in after),
    ]
    return {
        k: (before.get(k), after.get(k))
        for k in keys
        if before.get(k) != after.get(k) and not any(k == a or k.startswith(f"{a}.") for a in allowed)
    }


def override_text(value: Any) -> str:
    """A config value as an override writes it (``16``, ``true``, ``[1, 4]``, ``simclr``)."""
    return value if isinstance(value, str) else json.dumps(value)
