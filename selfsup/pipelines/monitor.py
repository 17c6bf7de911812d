"""Online monitoring during pretraining: kNN@20 and RankMe of the encoder on a small labelled subset.

Every ``train.monitor_every_epochs`` epochs rank 0 embeds ``bank_size`` train-shard images (the
kNN bank) and ``query_size`` images of ``data.test`` (the queries), both read once and kept in
memory, without augmentation, and reports ``monitor/knn@20`` (weighted kNN, T=0.07),
``monitor/rankme`` (of the query embeddings), ``monitor/seconds`` (this call) and
``monitor/fraction`` (all monitoring time so far over the wall time since the monitor was made).
"""

from __future__ import annotations

import time

import torch
from torch import nn

from ..config import ExperimentConfig
from ..eval.knn import weighted_knn
from ..eval.metrics import rankme
from ..vision.augment import BatchViews


class OnlineMonitor:
    """Cheap representation-quality probe for the training loop (call it on rank 0 only)."""

    def __init__(self, cfg: ExperimentConfig, bank_size: int = 5000, query_size: int = 1000, k: int = 20,
                 temperature: float = 0.07):
        if cfg.data.test is None:
            raise ValueError("train.monitor_every_epochs needs labelled held-out shards in data.test")
        if cfg.method.name == "wav2vec2":
            raise ValueError("train.monitor_every_epochs applies to image methods only")
        self.cfg, self.bank_size, self.query_size, self.k, self.temperature = cfg, bank_size, query_size, k, temperature
        self.views = BatchViews(cfg.view_recipes(), cfg.data.image_size, cfg.data.mean, cfg.data.std)
        self.data = None  # (bank uint8 (N, C, H, W), bank labels (N,), queries uint8 (M, C, H, W), query labels (M,))
        self.started, self.spent = time.perf_counter(), 0.0

    def due(self, epochs_done: int) -> bool:
        """Whether the monitor runs after ``epochs_done`` complete epochs."""
        every = self.cfg.train.monitor_every_epochs
        return every > 0 and epochs_done % every == 0

    def __call__(self, encoder: nn.Module) -> dict[str, float]:
        """Score ``encoder`` (left in the train/eval mode it had) -> the ``monitor/*`` metrics."""
        from .evaluate import extract_features, read_images

        start = time.perf_counter()
        if self.data is None:
            d = self.cfg.data
            bank_x, bank_y, _, _ = read_images(d.train, d.channels, d.image_size, limit=self.bank_size)
            query_x, query_y, _, _ = read_images(d.test, d.channels, d.image_size, limit=self.query_size)
            self.data = bank_x, bank_y, query_x, query_y
        bank_x, bank_y, query_x, query_y = self.data
        was_training = encoder.training
        try:
            bank = extract_features(encoder, bank_x, self.views, desc="monitor (bank)")
            queries = extract_features(encoder, query_x, self.views, desc="monitor (queries)")
        finally:
            encoder.train(was_training)
        knn = weighted_knn(bank, bank_y, queries, query_y, settings=[(self.k, self.temperature)],
                           num_classes=int(max(bank_y.max(), query_y.max())) + 1)
        seconds = time.perf_counter() - start
        self.spent += seconds
        return {f"monitor/knn@{self.k}": knn.top1[f"knn@{self.k}"], "monitor/rankme": rankme(torch.from_numpy(queries)),
                "monitor/seconds": seconds, "monitor/fraction": self.spent / (time.perf_counter() - self.started)}
