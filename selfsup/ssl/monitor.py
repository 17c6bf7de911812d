"""Collapse symptoms computed from a batch of embeddings."""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
