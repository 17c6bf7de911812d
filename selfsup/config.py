"""The experiment config: one YAML file, validated before any process starts.

Unknown keys and bad values are errors that name the key. Any value can be overridden on the
command line as ``key.sub=value`` (the value is parsed as YAML).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .audio.wav2vec2 import Wav2Vec2Config
from .ssl import METHODS
from .vision.augment import PRESETS, ViewRecipe


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


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
    std: list[float] = [0.3530]
    max_seconds: float = Field(15.625, gt=0, description="audio: random crop length; batches are cut to their shortest clip")
    min_seconds: float = Field(2.0, ge=0, description="audio: shorter clips are skipped (and counted)")

    @model_validator(mode="after")
    def _stats_match_channels(self):
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(f"data.mean and data.std need {self.channels} values (data.channels)")
        return self


class AugmentConfig(Strict):
    """A named preset, or explicit per-view recipes (which win)."""

    preset: str = "grey"
    views: list[ViewRecipe] | None = None

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, v):
        if v not in PRESETS:
            raise ValueError(f"unknown preset {v!r}; choose one of {sorted(PRESETS)}")
        return v


class ModelConfig(Strict):
    backbone: Literal["resnet18", "resnet34", "resnet50", "vit_b_16"] = "resnet18"
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
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon")
    weight_decay: float = Field(1e-4, ge=0)
    warmup_epochs: float = Field(1.0, ge=0)
    epochs: float = Field(10, gt=0)
    minutes: float | None = Field(None, gt=0, description="fit training into this wall time: after a few "
                                  "steps the schedule is cut to the steps that fit (never beyond `epochs`)")
    grad_clip: float | None = Field(None, gt=0)
    max_bad_steps: int = Field(10, ge=1, description="consecutive NaN/inf losses (each skipped) that stop the run at the next logging step")


class TrainConfig(Strict):
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    channels_last: bool = True
    compile: bool = False
    threads: int | None = Field(None, ge=1, description="torch intra-op threads per rank (default: all cores)")
    log_every_steps: int = Field(20, ge=1)
    checkpoint_every_steps: int = Field(500, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    monitor_every_epochs: int = Field(0, ge=0, description="online kNN on held-out data every N epochs; 0 = off")


class ScalingConfig(Strict):
    num_workers: int | tuple[int, int] = Field(
        1, description="training processes (one per GPU); [min, max] for elastic training (Ray picks the count)")
    use_gpu: bool = False
    cpus_per_worker: int = Field(1, ge=1)
    max_failures: int = Field(0, ge=-1)

    @field_validator("num_workers")
    @classmethod
    def _workers_range(cls, v):
        low, high = v if isinstance(v, tuple) else (v, v)
        if low < 1 or high < low:
            raise ValueError("needs a count >= 1, or [min, max] with 1 <= min <= max")
        return v


class TrackingConfig(Strict):
    mode: Literal["offline", "online", "disabled"] = "offline"
    project: str = "selfsup"
    entity: str | None = None


class EvalConfig(Strict):
    knn: list[tuple[int, float]] = [(20, 0.07), (200, 0.1)]
    baselines: bool = True
    probe_views: int = Field(4, ge=1, description="linear probe train rows per image: the un-augmented features "
                             "plus probe_views - 1 passes of the paper probe's crops and flips")


class Wav2Vec2MethodConfig(Wav2Vec2Config):
    """wav2vec 2.0 under ``method:``: the fields of ``Wav2Vec2Config``, defaulting to ``preset``'s when given."""

    name: Literal["wav2vec2"] = "wav2vec2"
    preset: Literal["tiny", "base", "large"] | None = None

    @model_validator(mode="before")
    @classmethod
    def _preset_defaults(cls, data):
        if isinstance(data, dict) and data.get("preset") in ("tiny", "base", "large"):
            return {**getattr(Wav2Vec2Config, data["preset"])().model_dump(), **data}
        return data


METHOD_NAMES = {*METHODS, "wav2vec2"}
MethodConfig = Annotated[Union[(*(cfg for _, cfg in METHODS.values()), Wav2Vec2MethodConfig)],
                         Field(discriminator="name")]


class ExperimentConfig(Strict):
    """One pretraining experiment."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="run name: runs/<name>/ is resumed when it exists")
    run_root: str = "runs"
    seed: int = 0
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

    @model_validator(mode="after")
    def _data_kind_matches_method(self):
        wanted = "audio" if self.method.name == "wav2vec2" else "image"
        if self.data.kind != wanted:
            raise ValueError(f"data.kind must be {wanted!r} for method {self.method.name!r}, not {self.data.kind!r}")
        return self

    @property
    def run_dir(self) -> Path:
        """The run's local directory (for an s3:// or gs:// ``run_root``, its local mirror)."""
        if self.run_url:
            from .pipelines.storage import mirror_dir

            return mirror_dir(self.run_root, self.name)
        return Path(self.run_root) / self.name

    @property
    def run_url(self) -> str | None:
        """``<run_root>/<name>`` when ``run_root`` is an s3:// or gs:// URL, else None."""
        if self.run_root.startswith(("s3://", "gs://")):
            return f"{self.run_root.rstrip('/')}/{self.name}"
        return None

    def view_recipes(self) -> list[ViewRecipe]:
        from .vision.augment import preset_views

        return self.augment.views or preset_views(self.augment.preset)


class ConfigError(ValueError):
    """A config that cannot be used; the message names the key."""


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        if not isinstance(node.get(k, {}), dict):
            raise ConfigError(f"override {dotted}: {k} is not a section")
        node = node.setdefault(k, {})
    node[keys[-1]] = value


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid config {source}:"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"] if not (isinstance(p, str) and p in METHOD_NAMES))
        msg = "unknown key (check the spelling)" if e["type"] == "extra_forbidden" else e["msg"]
        lines.append(f"  {key or '(top level)'}: {msg}")
    return "\n".join(lines)


def parse_config(tree: dict, overrides: list[str] = (), source: str = "<dict>") -> ExperimentConfig:
    """Validate a config tree after applying ``key.sub=value`` overrides."""
    tree = yaml.safe_load(yaml.safe_dump(tree))  # deep copy of plain data
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as err:
            raise ConfigError(f"override {key}: value {raw!r} is not plain YAML data ({err.problem})") from None
        _set_dotted(tree, key, value)
    try:
        return ExperimentConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None


def load_config(path: str | Path, overrides: list[str] = ()) -> ExperimentConfig:
    """Read and validate a YAML experiment file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path} must hold a mapping of sections (name, data, method, ...)")
    return parse_config(tree, overrides, str(path))


def dump_config(cfg: ExperimentConfig) -> str:
    """The config as YAML, the form written beside checkpoints."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
