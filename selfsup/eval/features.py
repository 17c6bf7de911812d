"""An encoder's features for evaluation, for any task: the checkpoint's encoder (also as the library's
``selfsup.load_encoder`` and as ``selfsup export`` writes it), the task's candidate
feature sets (one, or one per layer) checked for NaN, the candidate that classifies held-out train
rows best, and z-scoring with the train rows' statistics where the task asks for it."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from selfsup.config import ExperimentConfig
from selfsup.core.checkpoint import load_checkpoint
from selfsup.core.device import memory_format
from selfsup.core.objective import Objective
from selfsup.eval.knn import weighted_knn
from selfsup.tasks import LabelledSplit, Task, task_for

log = logging.getLogger("selfsup.evaluate")

HOLDOUT = 0.2  # share of the train split held out to choose among candidate feature sets


def eval_device() -> torch.device:
    """Where evaluation runs the encoders: the GPU when there is one."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def objective_from_checkpoint(cfg: ExperimentConfig, model_state: dict | None) -> Objective:
    """``cfg``'s objective on the CPU with the checkpoint's weights (None: at random initialisation)."""
    objective = task_for(cfg).build_objective(cfg)
    if model_state is not None:
        objective.load_state_dict(model_state)
    return objective


def encoder_from_checkpoint(
    cfg: ExperimentConfig, model_state: dict | None, device: torch.device | str = "cpu"
) -> nn.Module:
    """The objective's encoder on ``device``, in the memory format training used there, with the
    checkpoint's weights (None: at random initialisation)."""
    encoder = objective_from_checkpoint(cfg, model_state).encoder.to(device)
    layout = memory_format(torch.device(device), cfg.train.channels_last, encoder)
    return encoder.to(memory_format=layout)  # type: ignore[call-overload]  # accepted, though torch's stubs lack it


def load_encoder(run_or_checkpoint: str | Path, device: torch.device | str = "cpu") -> nn.Module:
    """The trained encoder of a run (its latest checkpoint) or of a checkpoint directory, on ``device``
    in eval mode, with its task's ``input_spec`` attached as attributes. Images: ``mean``, ``std`` (C,)
    lists, ``image_size``, ``channels``; it maps (B, channels, image_size, image_size) floats in
    [0, 1] normalised by ``mean`` / ``std`` to (B, D) features. Audio: ``sample_rate``."""
    cfg, model_state, _ = load_checkpoint(run_or_checkpoint)
    encoder = encoder_from_checkpoint(cfg, model_state, device).eval()
    for name, value in task_for(cfg).input_spec(cfg).items():
        setattr(encoder, name, value)
    return encoder


def export_encoder(run_or_checkpoint: str | Path, out: str | Path) -> str:
    """Write the encoder of a run or checkpoint to ``out`` as its task exports it (images: a file
    with torchvision's key names and the geometry; wav2vec 2.0: a Hugging Face ``transformers``
    folder); returns the task's line saying what was written and what loads it."""
    cfg, model_state, _ = load_checkpoint(run_or_checkpoint)
    return task_for(cfg).export(objective_from_checkpoint(cfg, model_state), cfg, Path(out))


def num_classes(train: LabelledSplit, test: LabelledSplit) -> int:
    """The manifest's class count, or more when the labels go beyond it."""
    return max(len(train.classes), int(max(train.labels.max(), test.labels.max())) + 1)


@dataclass
class EncoderFeatures:
    """One encoder's features for scoring: ``bank`` (N, D) the un-augmented train rows, ``probe_train``
    (V·N, D) the linear probe's train rows (None: the bank), ``queries`` (M, D) the test rows,
    ``extra`` details for the report (the chosen layer) and ``held_out``, the train rows held out to
    choose it (0: there was one candidate)."""

    bank: np.ndarray
    probe_train: np.ndarray | None
    queries: np.ndarray
    extra: dict = field(default_factory=dict)
    held_out: int = 0

    def standardised(self) -> EncoderFeatures:
        """Every row z-scored with the bank's mean and std (features of different encoders and layers
        differ wildly in offset and scale, which cosine kNN would otherwise see)."""
        mean, std = self.bank.mean(axis=0), self.bank.std(axis=0) + 1e-6
        probe_train = None if self.probe_train is None else (self.probe_train - mean) / std
        return replace(
            self, bank=(self.bank - mean) / std, probe_train=probe_train, queries=(self.queries - mean) / std
        )


def split_features(
    task: Task,
    encoder: nn.Module,
    split: LabelledSplit,
    cfg: ExperimentConfig,
    desc: str,
    probe_views: int = 1,
    progress: bool = True,
) -> list[np.ndarray]:
    """The task's candidate feature sets of ``split``, each (V·N, D), with a progress bar named ``desc``
    unless ``progress`` is False; NaN or inf features (diverged weights) are an error naming ``desc``."""
    sets = task.eval_features(encoder, split, cfg, desc if progress else None, probe_views)
    for features in sets:
        bad = int((~np.isfinite(features).all(axis=1)).sum())
        if bad:
            raise ValueError(
                f"{desc}: {bad} of {len(features)} feature rows are NaN or inf; "
                "the weights have probably diverged (see the run's metrics.jsonl)"
            )
    return sets


def holdout_split(labels: np.ndarray, groups: list[str], fraction: float, seed: int) -> np.ndarray:
    """Boolean (N,) mask of held-out train rows: whole groups (voices/speakers) when the samples have
    them, as a test split holds unseen voices; else a random ``fraction`` of rows."""
    rng = np.random.default_rng(seed)
    names = sorted(set(groups))
    if len(names) >= 5:
        held = set(rng.permutation(names)[: max(1, round(fraction * len(names)))].tolist())
        mask = np.array([g in held for g in groups])
        if len(np.unique(labels[~mask])) == len(np.unique(labels)):
            return mask
    mask = np.zeros(len(labels), dtype=bool)
    mask[rng.permutation(len(labels))[: max(1, round(fraction * len(labels)))]] = True
    return mask


def best_candidate(
    candidates: list[np.ndarray], labels: np.ndarray, held: np.ndarray, classes: int
) -> tuple[int, list[float]]:
    """The candidate (N, D) whose z-scored features classify the held-out rows best by weighted
    kNN@20 (T=0.07) against the rest: (its index, held-out top-1 of every candidate)."""
    k, scores = min(20, int((~held).sum())), []
    for x in candidates:
        fit = EncoderFeatures(x[~held], None, x[held]).standardised()
        result = weighted_knn(
            fit.bank, labels[~held], fit.queries, labels[held], settings=[(k, 0.07)], num_classes=classes
        )
        scores.append(result.top1[f"knn@{k}"])
    return int(np.argmax(scores)), scores


def model_features(
    task: Task,
    cfg: ExperimentConfig,
    model_state: dict | None,
    train: LabelledSplit,
    test: LabelledSplit,
    name: str,
    probe_views: int = 1,
) -> EncoderFeatures:
    """The features of ``cfg``'s encoder with ``model_state`` (None: at random initialisation from
    ``cfg.seed``) on :func:`eval_device`. With several candidates (layers), the one that is best on
    a held-out part of ``train`` (by voice/speaker when known); z-scored when the task asks."""
    torch.manual_seed(cfg.seed)
    encoder = encoder_from_checkpoint(cfg, model_state, eval_device())
    train_sets = split_features(task, encoder, train, cfg, f"features ({name}, train)", probe_views)
    n, pick, extra, held_out = len(train.labels), 0, {}, 0
    if len(train_sets) > 1:
        held = holdout_split(train.labels, train.groups, HOLDOUT, cfg.seed)
        pick, scores = best_candidate([x[:n] for x in train_sets], train.labels, held, num_classes(train, test))
        log.info(
            "%s: layer %d is best on held-out train (kNN@20 per layer %s)", name, pick, [round(v, 3) for v in scores]
        )
        extra, held_out = {"layer": pick, "heldout_knn20_per_layer": scores}, int(held.sum())
    rows = train_sets[pick]
    queries = split_features(task, encoder, test, cfg, f"features ({name}, test)")[pick]
    features = EncoderFeatures(rows[:n], rows if len(rows) > n else None, queries, extra, held_out)
    return features.standardised() if task.eval_spec(cfg).zscore else features


def baseline_features(
    task: Task, cfg: ExperimentConfig, train: LabelledSplit, test: LabelledSplit
) -> dict[str, EncoderFeatures]:
    """The task's model-free baselines (raw pixels, log-mel), z-scored when the task asks."""
    zscore = task.eval_spec(cfg).zscore
    out = {}
    for name, (bank, queries) in task.baselines(train, test).items():
        features = EncoderFeatures(bank, None, queries)
        out[name] = features.standardised() if zscore else features
    return out
