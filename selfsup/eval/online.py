"""Online monitoring during pretraining: kNN@20 and RankMe of the encoder on a small labelled subset,
beside the levels the encoder has to beat on that same subset.

Every ``train.monitor_every_epochs`` epochs rank 0 embeds ``bank_size`` train-shard samples (the
kNN bank) and ``query_size`` samples of ``data.test`` (the queries), both read once by the task and
kept in memory, without augmentation (the task's last candidate feature set: the encoder's
output), and reports ``monitor/knn@20`` (weighted kNN, T=0.07), ``monitor/rankme`` (of the query
embeddings), ``monitor/seconds`` (this call), ``monitor/fraction`` (all monitoring time so far over
the wall time since the monitor was made) and, computed once on the same subset, the levels of the
model at random initialisation (``monitor/random_init_knn@20``, the loop's own starting weights
for ``cfg.seed``) and of the task's baselines (``monitor/pixels_knn@20``, ``monitor/log-mel_knn@20``).

Collapse: when kNN@20 has fallen for ``COLLAPSE_FALLS`` checks in a row while RankMe is below
``COLLAPSE_RANK_SHARE`` of its peak, a warning names both figures (``monitor/collapse`` is 1).
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch
from torch import nn

from selfsup.config import ExperimentConfig
from selfsup.core.collapse import rankme
from selfsup.eval.features import EncoderFeatures, encoder_from_checkpoint, split_features
from selfsup.eval.knn import weighted_knn
from selfsup.tasks import LabelledSplit, task_for

log = logging.getLogger("selfsup.monitor")

COLLAPSE_FALLS = 3  # checks in a row with a lower kNN@20 ...
COLLAPSE_RANK_SHARE = 0.05  # ... while RankMe is below this share of its peak


class OnlineMonitor:
    """Cheap representation-quality probe for the training loop (call it on rank 0 only); the config
    has ``data.test`` (``ExperimentConfig`` refuses the monitor without it)."""

    def __init__(
        self,
        cfg: ExperimentConfig,
        bank_size: int = 5000,
        query_size: int = 1000,
        k: int = 20,
        temperature: float = 0.07,
    ):
        self.cfg, self.bank_size, self.query_size, self.k, self.temperature = cfg, bank_size, query_size, k, temperature
        self.task = task_for(cfg)
        self.data: tuple[LabelledSplit, LabelledSplit] | None = None  # (bank, queries)
        self.levels: dict[str, float] = {}  # monitor/<baseline>_knn@k on the same subset
        self.history: list[tuple[float, float]] = []  # (kNN, RankMe) of every check
        self.started, self.spent = time.perf_counter(), 0.0

    def due(self, epochs_done: int) -> bool:
        """Whether the monitor runs after ``epochs_done`` complete epochs."""
        every = self.cfg.train.monitor_every_epochs
        return every > 0 and epochs_done % every == 0

    def __call__(self, encoder: nn.Module) -> dict[str, float]:
        """Score ``encoder`` (left in the train/eval mode it had) -> the ``monitor/*`` metrics."""
        start = time.perf_counter()
        if self.data is None:
            self._read()
        was_training = encoder.training
        try:
            features = self._features(encoder, "monitor")
        finally:
            encoder.train(was_training)
        score = self._knn(features)
        record = {f"monitor/knn@{self.k}": score, "monitor/rankme": float(rankme(torch.from_numpy(features.queries)))}
        self.history.append((score, record["monitor/rankme"]))
        record["monitor/collapse"] = float(self._collapsing())
        seconds = time.perf_counter() - start
        self.spent += seconds
        return {
            **record,
            **self.levels,
            "monitor/seconds": seconds,
            "monitor/fraction": self.spent / (time.perf_counter() - self.started),
        }

    def _read(self) -> None:
        """The subset, and the levels of random init and the task's baselines on it."""
        cfg = self.cfg
        assert cfg.data.test is not None  # the config refuses monitoring without held-out data
        self.data = (
            self.task.read_labelled(cfg.data.train, cfg, limit=self.bank_size),
            self.task.read_labelled(cfg.data.test, cfg, limit=self.query_size),
        )
        with torch.random.fork_rng():  # the loop's RNG stream is left as it was
            torch.manual_seed(cfg.seed)  # the weights the loop started from (rank 0 is seeded with cfg.seed)
            start = encoder_from_checkpoint(cfg, None)
        self.levels[f"monitor/random_init_knn@{self.k}"] = self._knn(self._features(start, "monitor (random init)"))
        for name, (bank, queries) in self.task.baselines(*self.data).items():
            self.levels[f"monitor/{name}_knn@{self.k}"] = self._knn(self._scaled(EncoderFeatures(bank, None, queries)))

    def _features(self, encoder: nn.Module, desc: str) -> EncoderFeatures:
        assert self.data is not None  # read by _read first
        bank_split, query_split = self.data
        bank = split_features(self.task, encoder, bank_split, self.cfg, f"{desc} (bank)", progress=False)[-1]
        queries = split_features(self.task, encoder, query_split, self.cfg, f"{desc} (queries)", progress=False)[-1]
        return self._scaled(EncoderFeatures(bank, None, queries))

    def _scaled(self, features: EncoderFeatures) -> EncoderFeatures:
        return features.standardised() if self.task.eval_spec(self.cfg).zscore else features

    def _knn(self, features: EncoderFeatures) -> float:
        """Weighted kNN top-1 of the queries (M, D) against the bank (N, D)."""
        assert self.data is not None
        bank_y, query_y = self.data[0].labels, self.data[1].labels
        knn = weighted_knn(
            features.bank,
            bank_y,
            features.queries,
            query_y,
            settings=[(self.k, self.temperature)],
            num_classes=int(max(bank_y.max(), query_y.max())) + 1,
        )
        return knn.top1[f"knn@{self.k}"]

    def _collapsing(self) -> bool:
        """kNN fell ``COLLAPSE_FALLS`` checks in a row and RankMe is under its share of the peak; warns."""
        if len(self.history) <= COLLAPSE_FALLS:
            return False
        knn, ranks = np.array(self.history).T
        recent = knn[-COLLAPSE_FALLS - 1 :]
        if not (np.diff(recent) < 0).all() or ranks[-1] >= COLLAPSE_RANK_SHARE * ranks.max():
            return False
        log.warning(
            "collapse: online kNN@%d fell %d checks in a row (%s) and RankMe is %.1f, %.1f%% of its peak "
            "%.1f: the embeddings are collapsing; lower optim.lr, or check the method's predictor/EMA settings",
            self.k,
            COLLAPSE_FALLS,
            " -> ".join(f"{100 * v:.1f}%" for v in recent),
            ranks[-1],
            100 * ranks[-1] / ranks.max(),
            ranks.max(),
        )
        return True
