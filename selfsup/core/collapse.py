"""Collapse symptoms computed from a batch of embeddings, and the alarm they raise."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F

log = logging.getLogger("selfsup.collapse")


@torch.no_grad()
def rankme(z: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Effective rank of (N, D) embeddings (RankMe, Garrido et al. 2023), a 0-d float64 tensor in
    [1, min(N, D)]: exp(entropy of p_k = s_k / sum(s) + eps), s the singular values; computed in
    float64 on ``z``'s device. ``z`` may be any array ``torch.as_tensor`` takes."""
    s = torch.linalg.svdvals(torch.as_tensor(z).detach().to(torch.float64))
    p = s / s.sum().clamp(min=1e-12) + eps
    return torch.exp(-(p * p.log()).sum())


@torch.no_grad()
def embedding_stats(z: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-dimension std of L2-normalised embeddings and their effective rank (:func:`rankme`).

    z: (B, D). ``embed_std`` is about 1/sqrt(D) for well-spread embeddings and falls towards 0 on
    collapse; ``rankme`` is in [1, min(B, D)].
    """
    return {"embed_std": F.normalize(z.float(), dim=1).std(dim=0).mean(), "rankme": rankme(z)}


class CollapseMonitor:
    """A health monitor (``selfsup.core.objective.HealthMonitor``, logged as ``collapse_alarms``) that
    raises an alarm when logged collapse statistics of D-wide embeddings cross a threshold.

    ``update(step, record)`` takes one logged record (with ``embed_std`` and ``rankme``, when the
    step's embeddings were finite); it logs a WARNING starting "representation collapse:" and returns
    the messages. Alarms: ``embed_std < std_fraction / sqrt(D)`` (the well-spread value is about
    1/sqrt(D)), and ``rankme < rank_fraction x`` the highest RankMe logged so far (the peak, not the
    first value: a random network's RankMe is often low and grows during training). Each alarm fires
    once and again only after its statistic has recovered, so a collapsed run is not flooded.
    """

    name = "collapse"

    def __init__(self, dim: int, std_fraction: float = 0.1, rank_fraction: float = 0.05):
        self.dim, self.std_fraction, self.rank_fraction = dim, std_fraction, rank_fraction
        self.peak_rankme = 0.0
        self.active: set[str] = set()

    def update(self, step: int, metrics: Mapping[str, float]) -> list[str]:
        checks = {}
        if "embed_std" in metrics:
            floor = self.std_fraction / math.sqrt(self.dim)
            std = float(metrics["embed_std"])
            checks["embed_std"] = (
                std < floor,
                f"embed_std {std:.3g} < {floor:.3g} (= {self.std_fraction:g}/sqrt({self.dim})): "
                "the embeddings are (nearly) constant across the batch",
            )
        if "rankme" in metrics:
            rank = float(metrics["rankme"])
            self.peak_rankme = max(self.peak_rankme, rank)
            floor = self.rank_fraction * self.peak_rankme
            checks["rankme"] = (
                rank < floor,
                f"rankme {rank:.3g} < {floor:.3g} ({self.rank_fraction:.0%} of its peak "
                f"{self.peak_rankme:.3g}): the embeddings span very few directions",
            )
        messages = []
        for name, (bad, text) in checks.items():
            if bad and name not in self.active:
                messages.append(
                    f"representation collapse: {text} at step {step}; check the lr, the augmentations, "
                    "the predictor/momentum settings, or the batch size"
                )
                log.warning(messages[-1])
            if bad:
                self.active.add(name)
            else:
                self.active.discard(name)
        return messages
