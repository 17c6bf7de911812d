"""Online monitoring during pretraining: kNN@20 and RankMe of the encoder on a small labelled subset.

Every ``train.monitor_every_epochs`` epochs rank 0 embeds ``bank_size`` train-shard samples (the
kNN bank) and ``query_size`` samples of ``data.test`` (the queries), both read once by the task and
kept in memory, without augmentation (the task's last candidate feature set: the encoder's
output), and reports ``monitor/knn@20`` (weighted kNN, T=0.07),
``monitor/rankme`` (of the query embeddings), ``monitor/seconds`` (this call) and
``monitor/fraction`` (all monitoring time so far over the wall time since the monitor was made).
"""

from __future__ import annotations

import time

import torch
from torch import nn

from selfsup.config import ExperimentConfig
from selfsup.core.collapse import rankme
from selfsup.eval.features import split_features
from selfsup.eval.knn import weighted_knn
from selfsup.tasks import task_for


class OnlineMonitor:
    """Cheap representation-quality probe for the training loop (call it on rank 0 only)."""

    def __init__(self, cfg: ExperimentConfig, bank_size: int = 5000, query_size: int = 1000, k: int = 20,
                 temperature: float = 0.07):
        if cfg.data.test is None:
            raise ValueError("train.monitor_every_epochs needs labelled held-out shards in data.test")
        self.cfg, self.bank_size, self.query_size, self.k, self.temperature = cfg, bank_size, query_size, k, temperature
        self.task = task_for(cfg)
        self.data = None  # (bank, queries): the two LabelledSplits
        self.started, self.spent = time.perf_counter(), 0.0

    def due(self, epochs_done: int) -> bool:
        """Whether the monitor runs after ``epochs_done`` complete epochs."""
        every = self.cfg.train.monitor_every_epochs
        return every > 0 and epochs_done % every == 0

    def __call__(self, encoder: nn.Module) -> dict[str, float]:
        """Score ``encoder`` (left in the train/eval mode it had) -> the ``monitor/*`` metrics."""
        start = time.perf_counter()
        cfg = self.cfg
        if self.data is None:
            self.data = (self.task.read_labelled(cfg.data.train, cfg, limit=self.bank_size),
                         self.task.read_labelled(cfg.data.test, cfg, limit=self.query_size))
        bank_split, query_split = self.data
        was_training = encoder.training
        try:
            bank = split_features(self.task, encoder, bank_split, cfg, "monitor (bank)")[-1]
            queries = split_features(self.task, encoder, query_split, cfg, "monitor (queries)")[-1]
        finally:
            encoder.train(was_training)
        bank_y, query_y = bank_split.labels, query_split.labels
        knn = weighted_knn(bank, bank_y, queries, query_y, settings=[(self.k, self.temperature)],
                           num_classes=int(max(bank_y.max(), query_y.max())) + 1)
        seconds = time.perf_counter() - start
        self.spent += seconds
        return {f"monitor/knn@{self.k}": knn.top1[f"knn@{self.k}"], "monitor/rankme": float(rankme(torch.from_numpy(queries))),
                "monitor/seconds": seconds, "monitor/fraction": self.spent / (time.perf_counter() - self.started)}
