"""Modalities. Each task module knows, for one kind of data, how to build the objective, its train
stream and its input, and how to read and featurise labelled data for evaluation.

The training loop and the evaluator ask :func:`task_for` for the task of a config's ``data.kind``;
neither knows any method or modality by name. A new modality is one module here and a config class.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from selfsup.config import ExperimentConfig
from selfsup.core.objective import Objective
from selfsup.data.stream import DataHealth, ShardStream


@dataclass
class LabelledSplit:
    """A labelled evaluation split as a task reads it: ``inputs`` in the task's own form (images:
    uint8 (N, C, H, W); audio: a list of float32 (T_i,) waves), ``labels`` (N,) ints, the manifest's
    class names, one line per skipped sample or damaged shard, ``groups`` (N,) (voice or speaker,
    "" when unknown), ``identity``: what the folder's content depends on
    (``selfsup.data.reader.split_identity``; caches are keyed on it) and ``thumbnails``: uint8
    (N, C, H, W) pictures for the neighbour grid, or None."""

    location: str
    inputs: Any
    labels: np.ndarray
    classes: list[str]
    problems: list[str]
    groups: list[str]
    identity: dict
    thumbnails: torch.Tensor | None = None


@dataclass(frozen=True)
class EvalSpec:
    """How a task's report reads: its ``title``, what one sample is called in the notes (``unit``),
    ``notes`` on how features are made, ``probe_note``: a note on the checkpoint's linear probe,
    formatted with its chosen ``lr``, ``weight_decay`` and held-out ``top1`` (%) (None: no note),
    ``zscore`` (standardise every feature set with its train rows' statistics before scoring) and
    ``diagnostics`` (retrieval metrics, per-class scores, ROC, 2-D maps, classes only in test)."""

    title: str
    unit: str
    notes: tuple[str, ...] = ()
    probe_note: str | None = None
    zscore: bool = False
    diagnostics: bool = False


class Task(Protocol):
    """What the loop and the evaluator need from a modality."""

    unit: str  # what one training sample is called on the progress bar ("img", "clip")

    def build_objective(self, cfg: ExperimentConfig) -> Objective:
        """The objective of ``cfg`` at random initialisation (seeded by the caller)."""

    def train_stream(self, cfg: ExperimentConfig) -> ShardStream:
        """This rank's stream of training batches (equal steps on every rank)."""

    def input_fn(
        self, cfg: ExperimentConfig, device: torch.device, health: DataHealth | None = None
    ) -> Callable[[dict], Any]:
        """batch dict (CPU tensors) -> the objective's input on ``device``; what it finds wrong with the
        data on the way (images the device cannot decode) is counted in ``health``."""

    def read_labelled(self, location: str, cfg: ExperimentConfig, limit: int | None = None) -> LabelledSplit:
        """Every decodable labelled sample of a shard folder (``limit``: at most that many, spread over the shards)."""

    def eval_features(
        self, encoder: nn.Module, split: LabelledSplit, cfg: ExperimentConfig, desc: str | None, probe_views: int = 1
    ) -> list[np.ndarray]:
        """Candidate feature sets of ``split`` on the encoder's device (one, or one per layer), each
        (V·N, D): the un-augmented rows, then up to ``probe_views`` - 1 augmented blocks for the probe;
        a progress bar named ``desc`` (None: none)."""

    def baselines(self, train: LabelledSplit, test: LabelledSplit) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """name -> (train (N, D), test (M, D)) features that need no model (raw pixels, log-mel)."""

    def eval_spec(self, cfg: ExperimentConfig) -> EvalSpec:
        """How the report of ``cfg``'s checkpoint reads."""

    def input_spec(self, cfg: ExperimentConfig) -> dict:
        """What the encoder's input must be, as plain values (images: ``mean``, ``std``, ``image_size``,
        ``channels``; audio: ``sample_rate``); ``selfsup.load_encoder`` attaches them to the encoder."""

    def export(self, objective: Objective, cfg: ExperimentConfig, out: Path) -> str:
        """Write ``objective``'s encoder to ``out`` with what builds the model that loads it (images: a
        ``torch.load(weights_only=True)`` file; audio: a Hugging Face folder); returns one line saying
        what was written and what loads it."""


def task_for(cfg: ExperimentConfig) -> Task:
    """The task for ``cfg.data.kind`` ("image" or "audio")."""
    from selfsup.tasks.audio import AudioTask
    from selfsup.tasks.vision import VisionTask

    tasks: dict[str, type[Task]] = {"image": VisionTask, "audio": AudioTask}
    return tasks[cfg.data.kind]()
