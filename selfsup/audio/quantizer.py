"""Gumbel-softmax product quantiser (wav2vec 2.0 section 3.2) and its temperature schedule."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfsup.core.objective import Progress


def gumbel_temperature(
    progress: Progress,
    start: float = 2.0,
    end: float = 0.5,
    decay: float = 0.999995,
    reference_updates: int = 400_000,
) -> float:
    """Annealed Gumbel temperature: ``max(end, start * decay ** s)``.

    ``s`` is the step rescaled so that the schedule reaches ``end`` at the same FRACTION of
    ``progress.total_steps`` as the paper's schedule does within ``reference_updates`` updates
    (BASE: 2 -> 0.5 at step ~277k of 400k, i.e. 69% of training).
    """
    scaled_step = progress.step * reference_updates / max(1, progress.total_steps)
    return max(end, start * decay**scaled_step)


def _perplexity(probs: Tensor) -> Tensor:
    """Sum over groups of exp(entropy): probs (G, V) -> scalar in [G, G*V]."""
    return torch.exp(torch.special.entr(probs).sum(dim=-1)).sum()


@dataclass
class QuantizerOutput:
    """quantized: (B, T, codevector_dim); codes: (B, T, G) int64 entries used (with Gumbel noise in
    training); perplexity_hard / perplexity_soft: scalars in [G, G*V]."""

    quantized: Tensor
    codes: Tensor
    perplexity_hard: Tensor
    perplexity_soft: Tensor


class GumbelVectorQuantizer(nn.Module):
    """G codebooks of V entries; one entry per group is picked and the picks are concatenated.

    Training: straight-through hard Gumbel-softmax at temperature ``self.temperature`` (forward value
    is exactly a codebook row, gradient flows through the soft probabilities). Eval: argmax.
    """

    temperature: Tensor

    def __init__(self, input_dim: int, groups: int, entries: int, codevector_dim: int, temperature: float):
        super().__init__()
        if codevector_dim % groups:
            raise ValueError(f"codevector_dim {codevector_dim} is not divisible by groups {groups}")
        self.groups = groups
        self.entries = entries
        self.weight_proj = nn.Linear(input_dim, groups * entries)
        nn.init.normal_(self.weight_proj.weight, mean=0.0, std=1.0)
        nn.init.zeros_(self.weight_proj.bias)
        self.codebook = nn.Parameter(torch.empty(groups, entries, codevector_dim // groups).uniform_())
        self.register_buffer("temperature", torch.tensor(float(temperature)))

    @property
    def num_codes(self) -> int:
        """G * V, the upper bound of the perplexities."""
        return self.groups * self.entries

    def forward(self, x: Tensor, weights: Tensor) -> QuantizerOutput:
        """x: (B, T, input_dim); weights: (B, T) float, which frames count in the perplexities."""
        batch, frames, _ = x.shape
        logits = self.weight_proj(x).float().view(batch, frames, self.groups, self.entries)
        w = (weights.float() / weights.float().sum().clamp(min=1.0))[..., None, None]
        argmax = logits.argmax(dim=-1)
        hard_probs = (F.one_hot(argmax, self.entries).float() * w).sum(dim=(0, 1))
        soft_probs = (logits.softmax(dim=-1) * w).sum(dim=(0, 1))
        if self.training:
            gumbels = -torch.empty_like(logits).exponential_().log()
            noisy = (logits + gumbels) / self.temperature
            codes = noisy.argmax(dim=-1)
            soft = noisy.softmax(dim=-1)
            onehot = F.one_hot(codes, self.entries).float() + (soft - soft.detach())
        else:
            codes = argmax
            onehot = F.one_hot(codes, self.entries).float()
        # (B, T, G, V) x (G, V, d) -> (B, T, G, d)
        quantized = torch.einsum("btgv,gvd->btgd", onehot.to(self.codebook.dtype), self.codebook)
        return QuantizerOutput(
            quantized=quantized.reshape(batch, frames, -1),
            codes=codes,
            perplexity_hard=_perplexity(hard_probs),
            perplexity_soft=_perplexity(soft_probs),
        )
