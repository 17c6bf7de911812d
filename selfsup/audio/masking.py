"""Span masking of feature frames (wav2vec 2.0 section 3.1), computed on the frames' device.

Same distribution as fairseq's ``compute_mask_indices(..., require_same_masks=True)``: each row draws
``floor(p * valid_frames / span + u)`` span starts (u ~ U[0, 1), at least ``min_spans``) without
replacement, every start masks ``span`` frames, and rows are then randomly thinned to the smallest
masked count in the batch so that every row has the SAME number of masked frames. Padded frames are
never masked. No host synchronisation: everything is tensor ops.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _random_ranks(valid: Tensor) -> Tensor:
    """Random rank of every position among its row's ``valid`` positions; invalid ones rank last.

    valid: (B, T) bool -> (B, T) int64 ranks; the valid positions of a row get a random permutation
    of ``0..valid_count-1``.
    """
    scores = torch.rand(valid.shape, device=valid.device).masked_fill(~valid, 2.0)
    return scores.argsort(dim=1).argsort(dim=1)


def compute_span_mask(
    frame_lengths: Tensor,
    num_frames: int,
    mask_prob: float,
    span: int,
    min_spans: int = 2,
) -> Tensor:
    """Span mask with an equal masked count per row.

    frame_lengths: (B,) int64 valid frames per row; num_frames: T, the padded length.
    Returns (B, T) bool, True where a frame is masked; ``mask.sum(1)`` is the same for every row.
    """
    device = frame_lengths.device
    batch = frame_lengths.shape[0]
    positions = torch.arange(num_frames, device=device).expand(batch, num_frames)
    # Starts are drawn from [0, sz - span) like fairseq (at least one position).
    start_range = (frame_lengths - span).clamp(min=1)
    spans = torch.floor(mask_prob * frame_lengths / span + torch.rand(batch, device=device)).long()
    spans = torch.minimum(spans.clamp(min=min_spans), start_range)
    starts = _random_ranks(positions < start_range[:, None]) < spans[:, None]
    # Frame t is masked if a start lies in (t - span, t].
    started = F.pad(starts.long().cumsum(dim=1), (span, 0))
    covered = (started[:, span:] - started[:, :num_frames]) > 0
    covered &= positions < frame_lengths[:, None]
    same_count = covered.sum(dim=1).amin()
    return _random_ranks(covered) < same_count
