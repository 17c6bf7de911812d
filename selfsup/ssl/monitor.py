"""Collapse symptoms computed from a batch of embeddings."""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F

log = logging.getLogger("selfsup.collapse")


@torch.no_grad()
def embedding_stats(z: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-dimension std of L2-normalised embeddings and their effective rank (RankMe).

    z: (B, D). ``embed_std`` is about 1/sqrt(D) for well-spread embeddings and falls towards 0 on
    collapse; ``rankme`` is exp(entropy of the normalised singular values), in [1, min(B, D)].
    """
    z = z.float()
    std = F.normalize(z, dim=1).std(dim=0).mean()
    s = torch.linalg.svdvals(z)
    p = s / s.sum().clamp(min=1e-12) + 1e-12
    return {"embed_std": std, "rankme": torch.exp(-(p * p.log()).sum())}


class CollapseMonitor:
    """Raises an alarm when logged collapse statistics cross a threshold.

    ``update(step, metrics, dim)`` takes one logged record (with ``embed_std`` and ``rankme``) and
    the embedding width D; it logs a WARNING starting "representation collapse:" and returns the
    messages. Alarms: ``embed_std < std_fraction / sqrt(D)`` (the well-spread value is about
    1/sqrt(D)), and ``rankme < rank_fraction x`` the highest RankMe logged so far (the peak, not the
    first value: a random network's RankMe is often low and grows during training). Each alarm fires
    once and again only after its statistic has recovered, so a collapsed run is not flooded.
    """

    def __init__(self, std_fraction: float = 0.1, rank_fraction: float = 0.05):
        self.std_fraction, self.rank_fraction = std_fraction, rank_fraction
        self.peak_rankme = 0.0
        self.active: set[str] = set()

    def update(self, step: int, metrics: dict, dim: int) -> list[str]:
        checks = {}
        if "embed_std" in metrics:
            floor = self.std_fraction / math.sqrt(dim)
            std = float(metrics["embed_std"])
            checks["embed_std"] = (std < floor, f"embed_std {std:.3g} < {floor:.3g} (= {self.std_fraction:g}/sqrt({dim})): "
                                                "the embeddings are (nearly) constant across the batch")
        if "rankme" in metrics:
            rank = float(metrics["rankme"])
            self.peak_rankme = max(self.peak_rankme, rank)
            floor = self.rank_fraction * self.peak_rankme
            checks["rankme"] = (rank < floor, f"rankme {rank:.3g} < {floor:.3g} ({self.rank_fraction:.0%} of its peak "
                                              f"{self.peak_rankme:.3g}): the embeddings span very few directions")
        messages = []
        for name, (bad, text) in checks.items():
            if bad and name not in self.active:
                messages.append(f"representation collapse: {text} at step {step}; check the lr, the augmentations, "
                                "the predictor/momentum settings, or the batch size")
                log.warning(messages[-1])
            if bad:
                self.active.add(name)
            else:
                self.active.discard(name)
        return messages
