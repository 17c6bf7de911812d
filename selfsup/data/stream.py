"""Shards -> batches, with exactly the same number of steps on every rank.

The plan: the shards (in an order shuffled per epoch, the same on every rank) are read as one
concatenated stream of samples. Each rank takes ``steps = (N // batch) // ranks`` batches; its
share is cut into one contiguous range of whole batches per DataLoader worker. So every sample is
read at most once per epoch and fewer than ``(ranks + 1) * batch`` are left out, whatever the shard
sizes. A bad sample (corrupt bytes) is skipped and counted, and so is every sample a shard lacks
(a truncated tar or a corrupt header ends it early: ``read_shard`` compares it with the manifest);
a worker that runs short tops up from the samples after its range, counted as ``repeated``, so the
step count never changes and DDP never waits on a rank that ran dry.

Audio with ``tokens`` (``data.max_tokens``) is planned in whole batches instead (``selfsup.data.buckets``):
batches of clips of similar length, filled to ``max_tokens`` samples from the durations the manifest
records, cut into equal runs of batches per rank and contiguous runs per worker. A worker reads one
bucket of a shard at a time and decodes only its batches' clips; a batch left empty by bad data is
made up from the batches after its range (``repeated``). A manifest without durations falls back to
``batch_size`` clips per batch, with a warning.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from selfsup.data.buckets import Batch, TokenBatching, TokenPlan, count_batches, manifest_lengths, plan_token_epoch
from selfsup.data.reader import CHECKSUM, DUPLICATE, SHORT, UNKNOWN, ShardProblem, read_manifest, read_shard

log = logging.getLogger("selfsup.data")


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


def plan_epoch(
    counts: list[int], ranks: int, workers: int, batch_size: int, seed: int, epoch: int, shuffle: bool = True
) -> EpochPlan:
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


@dataclass
class DataHealth:
    """Bad data met so far. ``skipped``: samples lost (undecodable, a repeated key, or in a shard that
    stopped before its manifest's count); ``duplicates``: those of them skipped for a key an earlier
    sample of their tar has; ``repeated``: samples read twice to top up a worker that ran short (so that
    every rank takes the same steps); ``mismatched``: shards whose sha256 differs from the manifest
    (``data.verify_checksums``); ``unknown``: tar members of no sample (no extension), not read;
    ``decode_fallbacks``: JPEGs the device decoder rejected, decoded on the CPU instead; ``decode_failed``:
    JPEGs nothing decoded, trained as grey images (``selfsup.data.views.DeviceCrops``); ``where``: a line
    per problem (the first 50)."""

    skipped: int = 0
    repeated: int = 0
    where: list[str] = field(default_factory=list)
    mismatched: int = 0
    duplicates: int = 0
    unknown: int = 0
    decode_fallbacks: int = 0
    decode_failed: int = 0

    COUNTS = ("skipped", "repeated", "mismatched", "duplicates", "unknown")  # the workers', carried by the batches
    DEVICE_COUNTS = ("decode_fallbacks", "decode_failed")  # counted in the training process

    def add(self, batch: dict) -> None:
        """Take (and remove) a batch's counts since the previous batch of its worker."""
        for name in self.COUNTS:
            setattr(self, name, getattr(self, name) + int(batch.pop(name, 0)))
        for w in batch.pop("bad", []):
            if len(self.where) < 50:
                self.where.append(w)

    @classmethod
    def merge(cls, parts: list[DataHealth]) -> DataHealth:
        """The health of all ranks together."""
        return cls(
            where=[w for h in parts for w in h.where],
            **{name: sum(getattr(h, name) for h in parts) for name in cls.COUNTS + cls.DEVICE_COUNTS},
        )

    def as_dict(self) -> dict:
        return {**{name: getattr(self, name) for name in self.COUNTS + self.DEVICE_COUNTS}, "where": self.where}

    def summary(self) -> str:
        """One line for the end-of-epoch warning, "" when nothing went wrong."""
        if not any(getattr(self, name) for name in self.COUNTS + self.DEVICE_COUNTS):
            return ""
        parts = []  # what happened only: a checksum alone is not "0 bad samples skipped, 0 repeated"
        if self.skipped:
            parts.append(
                f"{self.skipped} bad samples skipped"
                + (f" ({self.duplicates} of them repeated keys)" if self.duplicates else "")
            )
        if self.repeated:
            parts.append(f"{self.repeated} samples repeated to top up batches")
        if self.unknown:
            parts.append(f"{self.unknown} tar members of no sample (no extension) not read")
        if self.mismatched:
            parts.append(f"{self.mismatched} shards with a wrong sha256 (run `selfsup shards verify`)")
        if self.decode_fallbacks or self.decode_failed:
            parts.append(
                f"{self.decode_fallbacks} JPEGs the GPU rejected decoded on the CPU, "
                f"{self.decode_failed} undecodable trained as grey"
            )
        return ", ".join(parts) + (f"; first: {'; '.join(self.where[:3])}" if self.where else "")


class _Tally:
    """A worker's counts since its previous batch, as the batch dict carries them."""

    def __init__(self):
        self._reset()

    def _reset(self) -> None:
        self.skipped = self.repeated = self.mismatched = self.duplicates = self.unknown = 0
        self.bad: list[str] = []

    def problem(self, p: ShardProblem) -> None:
        self.skipped += p.lost
        self.mismatched += int(p.kind == CHECKSUM)
        self.unknown += int(p.kind == UNKNOWN)
        hint = f"; run `selfsup shards verify {p.url.rsplit('/', 1)[0]}`" if p.kind == CHECKSUM else ""
        self.bad.append(f"{p}{hint}")

    def bad_sample(self, sample: dict, err: ValueError) -> None:
        """A sample the decoder refused."""
        self.skipped += 1
        self.duplicates += int(DUPLICATE in sample)
        self.bad.append(f"{sample.get('__url__', '?')}: {err}")

    def take(self) -> dict:
        out = {name: getattr(self, name) for name in DataHealth.COUNTS} | {"bad": self.bad}
        self._reset()
        return out


class ShardStream(IterableDataset):
    """Yields this rank's batches of one epoch; see the module docstring for the plan.

    ``decode(raw_sample) -> item`` raises ValueError for a bad sample; ``collate(items) -> dict``.
    Every batch dict also carries the counts of ``DataHealth.COUNTS`` and ``bad`` (where-strings) since
    the previous batch of the same worker, so counts reach the training process without extra IPC
    (``DataHealth.add``). ``verify_checksums``: hash each shard this worker reads whole, from its first
    sample, and count a sha256 that differs from the manifest's. ``tokens``: batches planned by clip
    length (see the module docstring); ``batch_size`` is then used only for a manifest without durations.
    """

    def __init__(
        self,
        location: str,
        batch_size: int,
        decode: Callable,
        collate: Callable,
        *,
        rank: int = 0,
        ranks: int = 1,
        workers: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        shuffle_buffer: int = 1000,
        verify_checksums: bool = False,
        tokens: TokenBatching | None = None,
    ):
        self.manifest, self.urls = read_manifest(location)
        self.counts = [s["count"] for s in self.manifest["shards"]]
        self.tokens, self.lengths, self.token_steps = self._token_plan(location, tokens, ranks)
        if not self.tokens and sum(self.counts) < batch_size * ranks:
            raise ValueError(
                f"{location} holds {sum(self.counts)} samples, fewer than one batch of "
                f"{batch_size} per rank for {ranks} ranks; lower data.batch_size"
            )
        self.batch_size, self.decode, self.collate = batch_size, decode, collate
        self.rank, self.ranks, self.workers = rank, ranks, max(1, workers)
        self.seed, self.shuffle, self.shuffle_buffer = seed, shuffle, shuffle_buffer
        self.verify_checksums = verify_checksums
        self.epoch, self.start_step = 0, 0
        # seeds the DataLoader's workers; kept apart from the global RNG, which a resumed run restores
        self.generator = torch.Generator().manual_seed(seed)

    def _token_plan(self, location: str, tokens: TokenBatching | None, ranks: int):
        """(tokens, clip lengths, steps per epoch) for batches planned by length; Nones without ``tokens``
        or when the manifest records no durations (then batches of ``batch_size`` clips, with a warning)."""
        if tokens is None:
            return None, None, None
        lengths = manifest_lengths(self.manifest, tokens.rate)
        if lengths is None:
            log.warning(
                "%s: the manifest records no clip durations (shards written by an older selfsup): "
                "batches of data.batch_size clips, not data.max_tokens samples; re-write the shards",
                location,
            )
            return None, None, None
        if unreadable := sum(d is None for s in self.manifest["shards"] for d in s["durations"]):
            log.warning(
                "%s: %d clips are unreadable by the manifest (null duration) and left out; "
                "`selfsup shards verify %s` names them",
                location,
                unreadable,
                location,
            )
        steps = count_batches(lengths, tokens) // ranks
        if steps == 0:
            usable = sum(n >= tokens.min_length for ls in lengths for n in ls)
            raise ValueError(
                f"{location} holds {usable} clips of at least {tokens.min_length} samples, fewer than "
                f"one batch of data.max_tokens {tokens.max_tokens} per rank for {ranks} ranks"
            )
        return tokens, lengths, steps

    def plan(self) -> EpochPlan | TokenPlan:
        if self.tokens:
            return plan_token_epoch(
                self.lengths, self.ranks, self.workers, self.tokens, self.seed, self.epoch, self.shuffle
            )
        return plan_epoch(self.counts, self.ranks, self.workers, self.batch_size, self.seed, self.epoch, self.shuffle)

    def steps_per_epoch(self) -> int:
        if self.tokens:
            return self.token_steps
        return (sum(self.counts) // self.batch_size) // self.ranks

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Read epoch ``epoch``, beginning after its first ``start_step`` batches (for resuming)."""
        self.epoch, self.start_step = epoch, start_step
        self.generator.manual_seed(seed_for(self.seed, epoch))

    def _raw(self, pieces: list[Piece], verify: bool = False) -> Iterator[dict]:
        """The raw samples of ``pieces``; after each piece, a ``{"__problem__": ShardProblem}`` per problem."""
        for p in pieces:
            count = self.counts[p.shard]
            whole = verify and self.verify_checksums and p.start == 0 and p.stop == count
            problems: list[ShardProblem] = []
            yield from read_shard(
                self.urls[p.shard],
                problems,
                count,
                start=p.start,
                stop=p.stop,
                sha256=self.manifest["shards"][p.shard]["sha256"] if whole else None,
            )
            for problem in problems:
                yield {"__problem__": problem}

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

    def _position(self, plan: EpochPlan | TokenPlan, info) -> tuple[int, int, int]:
        """(the worker this one plays, the batches it already yielded (resuming), the batch slots of
        the plan up to the end of its range)."""
        done, next_worker = batches_before(plan.quotas[self.rank], self.start_step)
        # a resumed DataLoader starts its round-robin at worker 0: rotate so that worker 0 plays the
        # worker that was due next, and the batch order continues exactly where it stopped
        worker = ((info.id if info else 0) + next_worker) % self.workers
        slots = sum(sum(q) for q in plan.quotas[: self.rank]) + sum(plan.quotas[self.rank][: worker + 1])
        return worker, done[worker], slots

    def _share(self, info) -> tuple[int, int, list[Piece], list[Piece], int]:
        """This worker's quota of batches, the batches to skip (resuming), its pieces, the top-up pieces
        (everything after its range, once round) and the worker it plays."""
        plan = self.plan()
        assert isinstance(plan, EpochPlan)  # without data.max_tokens
        worker, skip, slots = self._position(plan, info)
        end = slots * self.batch_size  # ranges are laid out back to back, quota x batch each
        spare = _pieces(self.counts, plan.order, end, sum(self.counts)) + _pieces(self.counts, plan.order, 0, end)
        return plan.quotas[self.rank][worker], skip, plan.ranges[self.rank][worker], spare, worker

    def __iter__(self):
        info = get_worker_info()
        if info and info.num_workers != self.workers:
            raise RuntimeError(f"ShardStream planned for {self.workers} workers, DataLoader has {info.num_workers}")
        if self.tokens:
            plan = self.plan()
            assert isinstance(plan, TokenPlan)
            worker, skip, slots = self._position(plan, info)
            batches = plan.batches[self.rank][worker]
            yield from self._planned(batches[skip:], plan.flat[slots:] + plan.flat[:slots])  # then the rest, once round
            return
        quota, skip, mine, spare, worker = self._share(info)
        rng = random.Random(hash((self.seed, self.epoch, self.rank, worker)))
        yield from self._batches(quota, skip, self._shuffled(self._raw(mine, verify=True), rng), self._raw(spare))

    def _batches(self, quota: int, skip: int, mine: Iterator[dict], spare: Iterator[dict]) -> Iterator[dict]:
        """``quota`` batches from ``mine``, topped up from ``spare``; the first ``skip`` are not yielded.
        Problems are counted in ``mine`` only (``spare`` is other workers' share, counted there); the
        last batch waits for the end of ``mine``, whose problems are reported after its last sample."""
        tally, items, made, last = _Tally(), [], 0, None
        for stream, is_spare in ((mine, False), (spare, True)):
            if made >= quota:
                break
            for sample in stream:
                if "__problem__" in sample:
                    if not is_spare:
                        tally.problem(sample["__problem__"])
                    continue
                if made >= quota:
                    continue  # past the quota in ``mine``: only its problems are left
                try:
                    items.append(self.decode(sample))
                except ValueError as err:
                    if not is_spare:
                        tally.bad_sample(sample, err)
                    continue
                tally.repeated += int(is_spare)
                if len(items) < self.batch_size:
                    continue
                made, batch, items = made + 1, items, []
                if made == quota and not is_spare:
                    last = batch
                elif made > skip:
                    yield {**self.collate(batch), **tally.take()}
                else:
                    tally.take()
                if made == quota and is_spare:
                    return
        if last is not None and made > skip:
            yield {**self.collate(last), **tally.take()}
        if made < quota:
            raise RuntimeError(
                f"{self.urls[0].rsplit('/', 1)[0]}: too few decodable samples to fill "
                f"{quota} batches of {self.batch_size}; run `selfsup shards verify`"
            )

    def _planned(self, mine: list[Batch], spare: list[Batch]) -> Iterator[dict]:
        """The batches ``mine``, read one pass per shard and held one bucket at a time; a batch that bad
        data leaves empty is made up from ``spare`` (counted as repeated; its problems are counted by
        the worker it belongs to)."""
        tally, quota, made = _Tally(), len(mine), 0
        for batches, is_spare in ((mine, False), (spare, True)):
            for run in _shard_runs(batches):
                if made >= quota:
                    break
                for bucket, raw in self._read_buckets(run, tally if not is_spare else _Tally()):
                    for b in bucket:
                        if made >= quota:
                            break
                        items = self._decode_batch(b, raw, tally, count_bad=not is_spare)
                        if not items:
                            continue
                        tally.repeated += len(items) if is_spare else 0
                        made += 1
                        yield {**self.collate(items), **tally.take()}
                    if made >= quota:
                        break
        if made < quota:
            raise RuntimeError(
                f"{self.urls[0].rsplit('/', 1)[0]}: too few decodable clips to fill {quota} "
                "batches; run `selfsup shards verify`"
            )

    def _read_buckets(self, run: list[Batch], tally: _Tally) -> Iterator[tuple[list[Batch], dict[int, dict]]]:
        """(a bucket's batches, their raw samples by position) for each bucket of ``run`` (one shard, buckets
        in order), reading the shard once. Problems go to ``tally`` before the bucket they end is
        yielded (the last bucket waits for the end of the read); a SHORT one counts the lost clips.
        ``verify_checksums``: a run of every usable clip of its shard reads and hashes all of it."""
        shard, wanted = run[0].shard, {p for b in run for p in b.positions}
        count = self.counts[shard]
        whole = self.verify_checksums and len(wanted) == sum(n >= self.tokens.min_length for n in self.lengths[shard])
        lo, hi = (0, count) if whole else (min(wanted), max(wanted) + 1)
        problems: list[ShardProblem] = []
        sha256 = self.manifest["shards"][shard]["sha256"] if whole else None
        samples = enumerate(read_shard(self.urls[shard], problems, count, start=lo, stop=hi, sha256=sha256), start=lo)
        buckets = [list(g) for _, g in itertools.groupby(run, key=lambda b: b.bucket)]
        seen = 0
        for k, bucket in enumerate(buckets):
            mine = {p for b in bucket for p in b.positions}
            raw, last = {}, max(mine)
            for i, sample in samples:
                seen += i in wanted
                if i in mine:
                    raw[i] = sample
                if i >= last:
                    break
            if k == len(buckets) - 1:
                for _ in samples:  # to the end of the read: its checksum
                    pass
            for p in problems:
                tally.problem(dataclasses.replace(p, lost=len(wanted) - seen) if p.kind == SHORT else p)
            problems.clear()
            yield bucket, raw

    def _decode_batch(self, batch: Batch, raw: dict[int, dict], tally: _Tally, count_bad: bool) -> list:
        """The decoded clips of ``batch`` that were read and decode (undecodable ones counted when ``count_bad``)."""
        items = []
        for p in batch.positions:
            if p not in raw:
                continue  # lost with its shard's tail: counted with the problem
            sample = raw.pop(p)
            try:
                items.append(self.decode(sample))
            except ValueError as err:
                if count_bad:
                    tally.bad_sample(sample, err)
        return items


def _shard_runs(batches: list[Batch]) -> Iterator[list[Batch]]:
    """``batches`` cut into runs of one shard with buckets in order: each run is one read of its shard."""
    run: list[Batch] = []
    for b in batches:
        if run and (b.shard != run[-1].shard or b.bucket < run[-1].bucket):
            yield run
            run = []
        run.append(b)
    if run:
        yield run


def make_loader(stream: ShardStream, processes: int) -> DataLoader:
    """A DataLoader over ``stream``; ``processes`` worker processes (0 reads in this process).

    Batches are made inside the workers; they are pinned when CUDA is present.
    """
    if max(1, processes) != stream.workers:
        raise ValueError(f"the stream is planned for {stream.workers} workers, not {processes}")
    return DataLoader(
        stream,
        batch_size=None,
        num_workers=processes,
        pin_memory=torch.cuda.is_available(),
        generator=stream.generator,
        prefetch_factor=4 if processes else None,
        persistent_workers=False,
    )
