"""wav2vec 2.0 batching: audio per update and audio used per epoch, fixed-size batches against max_tokens.

For a shard folder, runs the training stream's own plan over one epoch, the old way (``data.batch_size``
clips drawn through the shuffle buffer, cropped to the shortest) and fairseq's (``data.max_tokens``
samples from clips of similar length, ``selfsup.data.buckets``), and prints for each: the seconds of
audio per update on one GPU (mean, min, max, and how many updates lie within 10% of the max_tokens
target) and the fraction of the ingested audio that reaches the model per epoch. The streams run
over the durations in the manifest instead of the audio (nothing is read or decoded), so it takes
seconds even for LibriSpeech. Settings come from a config (default wav2vec2-base: max_tokens 1.4M
samples = 87.5 s, crops of at most 250k samples, clips of at least 32k).

Speech shards to run it on (any audio folder works):

    selfsup shards build speech-corpus /tmp/speech    # ~7 h of real speech from Debian packages, about a minute
    selfsup shards write audio-folder /tmp/speech /tmp/speech-shards --labels /tmp/speech/metadata.csv --per-shard 1000
    python -m benchmarks.wav2vec2_batching /tmp/speech-shards [--config wav2vec2-base] [--ranks 64] [key=value ...]
"""

from __future__ import annotations

import argparse
import itertools
import statistics

from selfsup.audio.decode import SAMPLE_RATE
from selfsup.config import ExperimentConfig, load_config
from selfsup.data.buckets import Batch, TokenBatching, manifest_lengths
from selfsup.data.stream import Piece, ShardStream
from selfsup.tasks.audio import clip_limits


class ManifestOnly(ShardStream):
    """The stream's plan, shuffle buffer, skips and top-ups, over the manifest's clip lengths: a raw
    sample is ``{"__key__", "length"}`` and nothing is read from the shards."""

    def _sample(self, shard: int, i: int) -> dict:
        return {"__key__": f"{shard}/{i}", "length": self.clip_lengths[shard][i]}

    def _raw(self, pieces: list[Piece], verify: bool = False):
        for p in pieces:
            yield from (self._sample(p.shard, i) for i in range(p.start, p.stop))

    def _read_buckets(self, run: list[Batch], tally):
        for _, group in itertools.groupby(run, key=lambda b: b.bucket):
            bucket = list(group)
            yield bucket, {i: self._sample(b.shard, i) for b in bucket for i in b.positions}


def stream(location: str, cfg: ExperimentConfig, rank: int, ranks: int, planned: bool) -> ManifestOnly:
    """Rank ``rank``'s stream of ``cfg``'s batching (``planned``: max_tokens, else batch_size); a batch
    is ``{"clips", "samples" (crop x clips), "repeated"}``."""
    min_len, max_len = clip_limits(cfg)
    tokens = (
        TokenBatching(cfg.data.max_tokens, min_len, max_len, cfg.data.bucket_size, SAMPLE_RATE) if planned else None
    )
    cap = tokens.cap if tokens else max_len

    def decode(sample: dict) -> int:
        if sample["length"] < min_len:
            raise ValueError(f"sample {sample['__key__']}: shorter than the minimum {min_len}")
        return sample["length"]

    def collate(lengths: list[int]) -> dict:
        return {"clips": len(lengths), "samples": len(lengths) * min(min(lengths), cap)}

    s = ManifestOnly(
        location,
        cfg.data.batch_size,
        decode,
        collate,
        rank=rank,
        ranks=ranks,
        seed=cfg.seed,
        shuffle_buffer=cfg.data.shuffle_buffer,
        tokens=tokens,
    )
    s.clip_lengths = manifest_lengths(s.manifest, SAMPLE_RATE)
    return s


def figures(location: str, cfg: ExperimentConfig, ranks: int, planned: bool, epoch: int) -> dict:
    """One epoch over every rank: per-GPU batches' audio seconds, clips, steps, and audio used."""
    batches = []
    for r in range(ranks):
        s = stream(location, cfg, r, ranks, planned)
        s.set_epoch(epoch)
        batches += list(s)
    total = sum(sum(ls) for ls in s.clip_lengths)
    fresh = sum(b["samples"] // b["clips"] * (b["clips"] - b["repeated"]) for b in batches)
    target = cfg.data.max_tokens
    seconds = [b["samples"] / SAMPLE_RATE for b in batches]
    return {
        "steps": len(batches) // ranks,
        "seconds": seconds,
        "clips": [b["clips"] for b in batches],
        "within": sum(abs(b["samples"] - target) <= 0.1 * target for b in batches) / len(batches),
        "used": fresh / total,
        "repeated": sum(b["repeated"] for b in batches),
        "total_h": total / SAMPLE_RATE / 3600,
    }


def show(name: str, f: dict, target_s: float) -> None:
    sec = f["seconds"]
    print(
        f"{name:<22} {f['steps']:>6} {statistics.mean(f['clips']):>6.1f} {statistics.mean(sec):>7.1f} "
        f"{min(sec):>6.1f} {max(sec):>6.1f} {100 * statistics.mean(sec) / target_s:>7.1f}% "
        f"{100 * f['within']:>7.1f}% {100 * f['used']:>7.1f}% {f['repeated']:>8}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shards", help="a shard folder written by `selfsup shards write audio-folder`")
    parser.add_argument("--config", default="wav2vec2-base", help="config for the batching settings (data.*)")
    parser.add_argument("--ranks", type=int, default=1, help="GPUs (the plan is per rank)")
    parser.add_argument("--epoch", type=int, default=0)
    parser.add_argument("overrides", nargs="*", help="config overrides key.sub=value (data.bucket_size=500)")
    args = parser.parse_args()
    cfg = load_config(args.config, [f"data.train={args.shards}", *args.overrides])
    if cfg.data.max_tokens is None:
        raise SystemExit(f"{args.config} sets no data.max_tokens; pass data.max_tokens=N")
    min_len, max_len = clip_limits(cfg)
    target_s = cfg.data.max_tokens / SAMPLE_RATE
    old = figures(args.shards, cfg, args.ranks, planned=False, epoch=args.epoch)
    new = figures(args.shards, cfg, args.ranks, planned=True, epoch=args.epoch)
    print(
        f"{args.shards}: {old['total_h']:.2f} h ingested; {args.config}: clips of {min_len / SAMPLE_RATE:g} s "
        f"and more, crops of at most {max_len / SAMPLE_RATE:g} s; {args.ranks} rank(s)"
    )
    print(f"target: data.max_tokens {cfg.data.max_tokens} samples = {target_s:g} s per GPU per update\n")
    print(
        f"{'plan':<22} {'steps':>6} {'clips':>6} {'mean s':>7} {'min s':>6} {'max s':>6} {'of tgt':>8} "
        f"{'+-10%':>8} {'used':>8} {'repeated':>8}"
    )
    show(f"batch_size {cfg.data.batch_size}", old, target_s)
    show(f"max_tokens {cfg.data.max_tokens}", new, target_s)
    ratio = statistics.mean(new["seconds"]) / statistics.mean(old["seconds"])
    print(
        f"\nmax_tokens / batch_size: {ratio:.2f}x the audio per update, {new['used'] / old['used']:.2f}x the "
        f"audio used per epoch"
    )
    print(
        "steps: per rank per epoch; clips, mean/min/max s: per GPU per update; of tgt: mean against the target; "
        "+-10%: updates within 10% of it; used: audio that reaches the model, of all ingested (repeats not "
        "counted); repeated: clips read twice to top up a rank's planned steps"
    )


if __name__ == "__main__":
    main()
