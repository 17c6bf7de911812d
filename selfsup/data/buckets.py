"""Audio batches planned from the manifest: clips of similar length, filled to ``max_tokens`` samples.

As fairseq batches wav2vec 2.0: clips are sorted by length (capped at the crop length), each batch
takes the longest clips left, and collate crops every clip of a batch to its shortest. fairseq counts
``max_tokens`` at a batch's longest clip (its padded size); since pre-training crops instead of
padding, a batch here takes as many clips as fill ``max_tokens`` at its crop length (the prefix of
the longest clips left, before the first that overflows, whose clips x crop is largest): the batch
tensor stays within ``max_tokens`` (B x S), and closer to it (see benchmarks/wav2vec2_batching.py).
The sort runs within buckets of ``bucket_size`` consecutive clips of a shard, so that a loader
worker holds one bucket's raw bytes at a time, not the data set, and the number of batches of each
bucket (so of the epoch) depends on the manifest only. Each epoch shuffles the shard order, the
order of clips of equal capped length and the order of each bucket's batches, seeded by (seed,
epoch): the same plan on every rank.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass


@dataclass(frozen=True)
class TokenBatching:
    """How clips become batches: at most ``max_tokens`` samples per batch (clips x crop, the crop being
    its shortest clip capped at ``max_length``); clips under ``min_length`` samples are left out;
    ``bucket_size`` clips are sorted together; ``rate``: samples per second of the manifest's durations."""

    max_tokens: int
    min_length: int
    max_length: int
    bucket_size: int
    rate: int

    @property
    def cap(self) -> int:
        """The longest a clip counts (and is cropped to): the crop length, and never over one batch."""
        return min(self.max_length, self.max_tokens)


@dataclass(frozen=True)
class Batch:
    """A planned batch: samples ``positions`` of shard ``shard``, all from its bucket ``bucket``."""

    shard: int
    bucket: int
    positions: tuple[int, ...]


@dataclass
class TokenPlan:
    """An epoch of planned batches: ``flat`` in epoch order, cut into ``batches[rank][worker]``
    (``quotas[rank][worker]`` of them) from its start; the last ``len(flat) % ranks`` are not used."""

    steps: int
    order: list[int]
    flat: list[Batch]
    batches: list[list[list[Batch]]]
    quotas: list[list[int]]


def manifest_lengths(manifest: dict, rate: int) -> list[list[int]] | None:
    """Each shard's clip lengths in samples, from the manifest's per-shard ``durations`` (seconds; 0 for a
    null one, a clip the reader skips, so that no batch plans it); None when a shard lacks them (a
    manifest written before they were recorded) or they miscount."""
    out = []
    for shard in manifest["shards"]:
        durations = shard.get("durations")
        if durations is None or len(durations) != shard["count"]:
            return None
        out.append([round(d * rate) if d is not None else 0 for d in durations])
    return out


def buckets(count: int, size: int) -> list[tuple[int, int]]:
    """[start, stop) of the ``ceil(count / size)`` near-equal buckets of a shard of ``count`` clips."""
    n = max(1, math.ceil(count / size))
    bounds = [round(k * count / n) for k in range(n + 1)]
    return [(bounds[k], bounds[k + 1]) for k in range(n)]


def _take(crops: list[int], i: int, max_tokens: int) -> int:
    """How many of ``crops`` (descending) from ``i`` make the next batch: of the prefixes that fit
    ``max_tokens`` at their shortest, up to the first that does not, the one of most samples."""
    best, n, k = 0, 1, 1
    while i + k <= len(crops) and k * crops[i + k - 1] <= max_tokens:
        if k * crops[i + k - 1] >= best:
            best, n = k * crops[i + k - 1], k
        k += 1
    return n


def bucket_batches(
    lengths: list[int], shard: int, bucket: int, span: tuple[int, int], spec: TokenBatching, rng: random.Random
) -> list[Batch]:
    """The batches of clips ``span`` of a shard: longest (capped) first, ties in random order, each
    batch filled to ``max_tokens`` at its crop (its shortest clip); see the module docstring."""
    clips = sorted(
        ((min(lengths[i], spec.cap), rng.random(), i) for i in range(*span) if lengths[i] >= spec.min_length),
        reverse=True,
    )
    crops = [c[0] for c in clips]
    out, i = [], 0
    while i < len(clips):
        n = _take(crops, i, spec.max_tokens)
        out.append(Batch(shard, bucket, tuple(sorted(c[2] for c in clips[i : i + n]))))
        i += n
    return out


def count_batches(lengths: list[list[int]], spec: TokenBatching) -> int:
    """Batches per epoch (the same every epoch: a bucket's count depends on its lengths only)."""
    rng = random.Random(0)
    return sum(
        len(bucket_batches(ls, s, b, span, spec, rng))
        for s, ls in enumerate(lengths)
        for b, span in enumerate(buckets(len(ls), spec.bucket_size))
    )


def plan_token_epoch(
    lengths: list[list[int]], ranks: int, workers: int, spec: TokenBatching, seed: int, epoch: int, shuffle: bool = True
) -> TokenPlan:
    """Every bucket's batches in (shuffled) shard order, cut into equal whole runs per rank, each
    split into contiguous runs per worker (as ``stream.plan_epoch`` does with samples)."""
    order = list(range(len(lengths)))
    if shuffle:
        random.Random(seed * 100_003 + epoch).shuffle(order)
    rng = random.Random((seed * 100_003 + epoch) * 7 + 1)
    flat: list[Batch] = []
    for s in order:
        for b, span in enumerate(buckets(len(lengths[s]), spec.bucket_size)):
            bucket = bucket_batches(lengths[s], s, b, span, spec, rng)
            if shuffle:
                rng.shuffle(bucket)
            flat += bucket
    steps = len(flat) // ranks
    quotas = [[steps // workers + (1 if w < steps % workers else 0) for w in range(workers)] for _ in range(ranks)]
    batches: list[list[list[Batch]]] = []
    pos = 0
    for r in range(ranks):
        row: list[list[Batch]] = []
        for q in quotas[r]:
            row.append(flat[pos : pos + q])
            pos += q
        batches.append(row)
    return TokenPlan(steps, order, flat, batches, quotas)
