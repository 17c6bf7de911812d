"""wav2vec 2.0 contrastive task (section 3.3): distractor sampling and logits, on device."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def sample_negatives(mask: Tensor, num_negatives: int) -> Tensor:
    """For every frame, ``num_negatives`` distractor frame indices drawn uniformly (with replacement)
    from the OTHER masked frames of the same row, never the frame itself.

    mask: (B, T) bool with the same count n of masked frames in every row.
    Returns (B, T, K) int64 frame indices into the same row; only rows' masked frames are meaningful.
    With n == 1 the only choice is the frame itself (flagged as a duplicate by ``contrastive_logits``).
    """
    batch, frames = mask.shape
    count = mask.sum(dim=1, keepdim=True)  # (B, 1), equal across rows
    masked_positions = (~mask).to(torch.uint8).argsort(dim=1, stable=True)  # masked frames first, in order
    own_rank = mask.long().cumsum(dim=1) - 1  # (B, T): rank of each masked frame among the masked
    draws = torch.rand(batch, frames, num_negatives, device=mask.device)
    ranks = torch.floor(draws * (count - 1).clamp(min=1)[..., None]).long()  # uniform in [0, n-2]
    ranks = ranks + (ranks >= own_rank[..., None]).long()  # skip the positive: [0, n-1] \ {own}
    ranks = torch.minimum(ranks, (count - 1).clamp(min=0)[..., None])
    return masked_positions.gather(1, ranks.view(batch, -1)).view(batch, frames, num_negatives)


def contrastive_logits(
    context: Tensor,
    targets: Tensor,
    codes: Tensor,
    negatives: Tensor,
    logit_temperature: float,
) -> tuple[Tensor, Tensor]:
    """Cosine-similarity logits of each frame's positive and distractors, in float32 even under autocast.

    context: (B, T, F) projected context outputs c_t; targets: (B, T, F) projected quantised q_t;
    codes: (B, T, G) codebook entries behind each target; negatives: (B, T, K) from ``sample_negatives``.
    Returns logits (B, T, 1 + K), the positive first, divided by ``logit_temperature``; and
    duplicates (B, T, K) bool: distractors whose target is identical to the positive (same entry in
    every group, hence the same vector), whose logits are set to -inf as in fairseq.
    """
    with torch.autocast(device_type=context.device.type, enabled=False):
        c = F.normalize(context.float(), dim=-1, eps=1e-8)
        q = F.normalize(targets.float(), dim=-1, eps=1e-8)
        similarity = c @ q.transpose(1, 2)  # (B, T, T): frame t against every target of its row
        positive = similarity.diagonal(dim1=1, dim2=2)[..., None]
        distractor = similarity.gather(2, negatives)
        batch, frames, k = negatives.shape
        negative_codes = codes.gather(1, negatives.view(batch, frames * k, 1).expand(-1, -1, codes.shape[-1]))
        duplicates = (negative_codes.view(batch, frames, k, -1) == codes[:, :, None, :]).all(dim=-1)
        distractor = distractor.masked_fill(duplicates, float("-inf"))
        logits = torch.cat([positive, distractor], dim=-1) / logit_temperature
    return logits, duplicates
