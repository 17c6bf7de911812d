"""Shards -> batches, with exactly the same number of steps on every rank.

The plan: the shards (in an order shuffled per epoch, the same on every rank) are read as one
concatenated stream of samples. Each rank takes ``steps = (N // batch) // ranks`` batches; its
share is cut into one contiguous range of whole batches per DataLoader worker. So every sample is
read at most once per epoch and fewer than ``(ranks + 1) * batch`` are left out, whatever the shard
sizes. A bad sample (corrupt bytes, truncated tar) is skipped and counted; a worker that runs short
tops up from the samples after its range, counted as ``repeated``, so the step count never changes
and DDP never waits on a rank that ran dry.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .shards import decode_sample, iter_shard, read_manifest


@dataclass(frozen=True)
class Piece:
    """Samples ``start`` to ``stop`` (exclusive) of shard ``shard``."""

    shard: int
    start: int
    stop: int


@dataclass
class EpochPlan:
    """Which pieces each (rank, worker) reads, and how many batches it yields."""

    steps: int
    order: list[int]
    ranges: list[list[list[Piece]]]  # [rank][worker] -> pieces
    quotas: list[list[int]]  # [rank][worker] -> batches


def _pieces(counts: list[int], order: list[int], begin: int, end: int) -> list[Piece]:
    """The pieces covering positions [begin, end) of the shards concatenated in ``order``."""
    out, pos = [], 0
    for s in order:
        lo, hi = max(begin, pos), min(end, pos + counts[s])
        if lo < hi:
            out.append(Piece(s, lo - pos, hi - pos))
        pos += counts[s]
    return out


def plan_epoch(counts: list[int], ranks: int, workers: int, batch_size: int, seed: int, epoch: int,
               shuffle: bool = True) -> EpochPlan:
    """Split shards of ``counts`` samples into equal whole-batch ranges per (rank, worker)."""
    order = list(range(len(counts)))
    if shuffle:
        random.Random(seed * 100_003 + epoch).shuffle(order)
    steps = (sum(counts) // batch_size) // ranks
    quotas = [[steps // workers + (1 if w < steps % workers else 0) for w in range(workers)] for _ in range(ranks)]
    ranges, pos = [], 0
    for r in range(ranks):
        row = []
        for w in range(workers):
            n = quotas[r][w] * batch_size
            row.append(_pieces(counts, order, pos, pos + n))
            pos += n
        ranges.append(row)
    return EpochPlan(steps, order, ranges, quotas)


def seed_for(seed: int, epoch: int) -> int:
    """A 63-bit seed for (run seed, epoch)."""
    return (seed * 100_003 + epoch) % (2**63 - 1)


def batches_before(quotas: list[int], step: int) -> tuple[list[int], int]:
    """After ``step`` DataLoader steps: how many batches each worker has yielded, and which worker
    serves next (torch's DataLoader serves an IterableDataset round-robin over the workers that
    still have batches)."""
    done, served, nxt = [0] * len(quotas), 0, 0
    while served < step and any(d < q for d, q in zip(done, quotas)):
        if done[nxt] < quotas[nxt]:
            done[nxt] += 1
            served += 1
        nxt = (nxt + 1) % len(quotas)
    return done, nxt


def decode_image(sample: dict, channels: int, size: int) -> tuple[torch.Tensor, int]:
    """A raw image sample -> (uint8 (C, size, size), label); raises ValueError naming the key."""
    import numpy as np
    from torchvision.transforms.v2 import functional as TF

    img, label = decode_sample(sample, "image")
    t = torch.from_numpy(np.array(img))
    t = t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1)
    if t.shape[0] != channels:
        if channels == 1:
            t = t[:3].float().mean(0, keepdim=True).round().to(torch.uint8) if t.shape[0] >= 3 else t[:1]
        elif t.shape[0] == 1:
            t = t.expand(channels, -1, -1)
        else:
            t = t[:channels]
    if t.shape[1] != size or t.shape[2] != size:
        t = TF.center_crop(TF.resize(t, size, antialias=True), [size, size])
    return t.contiguous(), label


def collate_images(items: list[tuple[torch.Tensor, int]]) -> dict:
    """[(uint8 (C, H, W), label)] -> {"images": uint8 (B, C, H, W), "labels": int64 (B,)}."""
    return {"images": torch.stack([i[0] for i in items]), "labels": torch.tensor([i[1] for i in items])}


def decode_audio_sample(sample: dict, min_samples: int) -> tuple[torch.Tensor, int]:
    """A raw audio sample -> (float32 (T,) 16 kHz waveform, label or -1); raises ValueError naming the
    key for a bad clip or one shorter than ``min_samples`` (so the stream skips and counts it)."""
    (wave, _), info = decode_sample(sample, "audio")
    if len(wave) < min_samples:
        raise ValueError(f"sample {sample.get('__key__', '?')}: {len(wave)} samples, shorter than the "
                         f"minimum {min_samples} (data.min_seconds or the receptive field)")
    label = info.get("label", -1)
    return torch.from_numpy(wave), int(label) if label not in ("", None) else -1


def collate_audio(items: list[tuple[torch.Tensor, int]], max_samples: int, min_samples: int,
                  rng: random.Random | None = None) -> dict:
    """[(float32 (T_i,), label)] -> {"waves": float32 (B, S), "lengths": int64 (B,), "labels": int64 (B,)}.

    As fairseq batches without padding: every clip is randomly cropped to S = min(shortest T_i,
    ``max_samples``). ``rng`` picks the crop offsets (default: Python's ``random``, which torch seeds
    per DataLoader worker).
    """
    rng = rng or random
    size = min(min(len(w) for w, _ in items), max_samples)
    if size < min_samples:
        raise ValueError(f"a clip of {size} samples reached collate_audio; decode must drop clips under {min_samples}")
    crops = []
    for wave, _ in items:
        start = rng.randrange(len(wave) - size + 1)
        crops.append(wave[start:start + size])
    return {"waves": torch.stack(crops), "lengths": torch.full((len(items),), size, dtype=torch.int64),
            "labels": torch.tensor([label for _, label in items], dtype=torch.int64)}


@dataclass
class DataHealth:
    """Bad samples met so far: skipped ones, top-up repeats, and where the first few were."""

    skipped: int = 0
    repeated: int = 0
    where: list[str] = field(default_factory=list)

    def add(self, batch: dict) -> None:
        self.skipped += int(batch.pop("skipped", 0))
        self.repeated += int(batch.pop("repeated", 0))
        for w in batch.pop("bad", []):
            if len(self.where) < 50:
                self.where.append(w)


class ShardStream(IterableDataset):
    """Yields this rank's batches of one epoch; see the module docstring for the plan.

    ``decode(raw_sample) -> item`` raises ValueError for a bad sample; ``collate(items) -> dict``.
    Every batch dict also carries ``skipped``, ``repeated`` and ``bad`` (where-strings) since the
    previous batch of the same worker, so counts reach the training process without extra IPC.
    """

    def __init__(self, location: str, batch_size: int, decode: Callable, collate: Callable, *, rank: int = 0,
                 ranks: int = 1, workers: int = 1, seed: int = 0, shuffle: bool = True, shuffle_buffer: int = 1000):
        self.manifest, self.urls = read_manifest(location)
        self.counts = [s["count"] for s in self.manifest["shards"]]
        if sum(self.counts) < batch_size * ranks:
            raise ValueError(f"{location} holds {sum(self.counts)} samples, fewer than one batch of "
                             f"{batch_size} per rank for {ranks} ranks; lower data.batch_size")
        self.batch_size, self.decode, self.collate = batch_size, decode, collate
        self.rank, self.ranks, self.workers = rank, ranks, max(1, workers)
        self.seed, self.shuffle, self.shuffle_buffer = seed, shuffle, shuffle_buffer
        self.epoch, self.start_step = 0, 0
        # seeds the DataLoader's workers; kept apart from the global RNG, which a resumed run restores
        self.generator = torch.Generator().manual_seed(seed)

    def plan(self) -> EpochPlan:
        return plan_epoch(self.counts, self.ranks, self.workers, self.batch_size, self.seed, self.epoch, self.shuffle)

    def steps_per_epoch(self) -> int:
        return (sum(self.counts) // self.batch_size) // self.ranks

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Read epoch ``epoch``, beginning after its first ``start_step`` batches (for resuming)."""
        self.epoch, self.start_step = epoch, start_step
        self.generator.manual_seed(seed_for(self.seed, epoch))

    def _raw(self, pieces: list[Piece], bad: list[str]) -> Iterator[dict]:
        for p in pieces:
            url, i = self.urls[p.shard], 0
            try:
                for sample in iter_shard(url):
                    if i >= p.stop:
                        break
                    if i >= p.start:
                        yield sample
                    i += 1
            except Exception as err:  # truncated or unreadable tar: the rest of this piece is lost
                lost = p.stop - max(i, p.start)
                bad.append(f"{url}: unreadable after sample {i} ({type(err).__name__}); {lost} samples skipped")
                yield {"__lost__": lost}

    def _shuffled(self, stream: Iterator[dict], rng: random.Random) -> Iterator[dict]:
        if not self.shuffle or self.shuffle_buffer <= 1:
            yield from stream
            return
        buf: list[dict] = []
        for s in stream:
            buf.append(s)
            if len(buf) >= self.shuffle_buffer:
                j = rng.randrange(len(buf))
                buf[j], buf[-1] = buf[-1], buf[j]
                yield buf.pop()
        rng.shuffle(buf)
        yield from buf

    def __iter__(self):
        info = get_worker_info()
        if info and info.num_workers != self.workers:
            raise RuntimeError(f"ShardStream planned for {self.workers} workers, DataLoader has {info.num_workers}")
        plan = self.plan()
        done, next_worker = batches_before(plan.quotas[self.rank], self.start_step)
        # a resumed DataLoader starts its round-robin at worker 0: rotate so that worker 0 plays the
        # worker that was due next, and the batch order continues exactly where it stopped
        worker = ((info.id if info else 0) + next_worker) % self.workers
        quota, skip = plan.quotas[self.rank][worker], done[worker]
        rng = random.Random(hash((self.seed, self.epoch, self.rank, worker)))
        bad: list[str] = []
        mine = plan.ranges[self.rank][worker]
        # top-up source: everything after this worker's range, once round
        total = sum(self.counts)
        slots_before = sum(sum(q) for q in plan.quotas[: self.rank]) + sum(plan.quotas[self.rank][: worker + 1])
        end = slots_before * self.batch_size  # ranges are laid out back to back, quota x batch each
        spare = _pieces(self.counts, plan.order, end, total) + _pieces(self.counts, plan.order, 0, end)
        counters = {"skipped": 0, "repeated": 0}
        items, made = [], 0
        streams = [(self._shuffled(self._raw(mine, bad), rng), False), (self._raw(spare, bad), True)]
        for stream, is_spare in streams:
            for sample in stream:
                if made >= quota:
                    return
                if "__lost__" in sample:
                    counters["skipped"] += 0 if is_spare else sample["__lost__"]
                    continue
                try:
                    item = self.decode(sample)
                except ValueError as err:
                    if not is_spare:
                        counters["skipped"] += 1
                        bad.append(f"{sample.get('__url__', '?')}: {err}")
                    continue
                counters["repeated"] += int(is_spare)
                items.append(item)
                if len(items) == self.batch_size:
                    made += 1
                    if made > skip:
                        yield {**self.collate(items), **counters, "bad": bad[:]}
                    counters = {"skipped": 0, "repeated": 0}
                    bad.clear()
                    items = []
        if made < quota:
            raise RuntimeError(f"{self.urls[0].rsplit('/', 1)[0]}: too few decodable samples to fill "
                               f"{quota} batches of {self.batch_size}; run `selfsup shards verify`")


def make_loader(stream: ShardStream, processes: int) -> DataLoader:
    """A DataLoader over ``stream``; ``processes`` worker processes (0 reads in this process).

    Batches are made inside the workers; they are pinned when CUDA is present.
    """
    if max(1, processes) != stream.workers:
        raise ValueError(f"the stream is planned for {stream.workers} workers, not {processes}")
    return DataLoader(stream, batch_size=None, num_workers=processes, pin_memory=torch.cuda.is_available(),
                      generator=stream.generator,
                      prefetch_factor=4 if processes else None, persistent_workers=False)
