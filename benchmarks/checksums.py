"""What ``data.verify_checksums: true`` costs: one shard folder streamed with and without sha256 checks;
and what a checkpoint's digests cost beside writing it.

    python -m benchmarks.checksums                  # 20,000 Fashion-MNIST images (synthetic if absent)
    python -m benchmarks.checksums --size 96        # synthetic 96x96 RGB images: more bytes per sample
    python -m benchmarks.checksums --checkpoint     # a ResNet-50 checkpoint (weights + SGD momentum)

``--checkpoint`` writes torchvision's ResNet-50 with one momentum buffer a parameter through
``write_checkpoint`` (torch.save and fsync of every file, each file hashed while the next is
serialised) into a temporary folder under the current directory, with its digests and with the hash
skipped, alternating; and times the digests of the written files alone (``file_digest``, xxh3-128,
as ``load_checkpoint`` runs it on a resume, eval or export), and sha256 for scale; the best of
``--repeats``.

The shards are written inside the run (from Fashion-MNIST's idx files when ``find_fashion_mnist``
finds them, else from random images; nothing is downloaded) into a temporary folder, so both modes
read them from the page cache. Each mode streams the whole folder through ``ShardStream`` (1 rank,
read in this process) twice: with the training decode (PNG -> uint8 tensor) and with a decode that
only takes the key (the I/O-bound worst case for the checksum's relative cost). Modes alternate,
and the best of ``--repeats`` passes (after one warm-up) is kept. hashlib's sha256 rate over the
same bytes is printed for scale.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import tempfile
import time
from pathlib import Path

import numpy as np

from selfsup.data.decode import collate_images, decode_image
from selfsup.data.shards import write_shards
from selfsup.data.sources import DatasetNotFound, encode_png, fashion_mnist_samples, find_fashion_mnist
from selfsup.data.stream import DataHealth, ShardStream


def write_folder(out: Path, n: int, size: int, per_shard: int) -> str:
    """``n`` samples as shards in ``out``; returns where they came from."""
    if size == 28:
        try:
            samples, total = fashion_mnist_samples("train", find_fashion_mnist())
            write_shards((s for _, s in zip(range(n), samples)), out, total=min(n, total), samples_per_shard=per_shard)
            return f"Fashion-MNIST train, first {min(n, total)} images"
        except DatasetNotFound:
            pass
    rng = np.random.default_rng(0)
    shape = (size, size) if size == 28 else (size, size, 3)

    def gen():
        for i in range(n):
            yield {
                "__key__": f"synth-{i:07d}",
                "png": encode_png(rng.integers(0, 256, shape, dtype=np.uint8)),
                "cls": int(rng.integers(10)),
            }

    write_shards(gen(), out, total=n, samples_per_shard=per_shard)
    return f"synthetic {'x'.join(map(str, shape))} random images ({n})"


def stream_once(location: str, decode, collate, verify: bool, batch: int) -> tuple[float, int, DataHealth]:
    """(seconds, samples, health) of one epoch of ``location`` through ShardStream."""
    stream = ShardStream(location, batch, decode, collate, shuffle=False, verify_checksums=verify)
    health, samples = DataHealth(), 0
    start = time.perf_counter()
    for b in stream:
        health.add(b)
        samples += batch
    return time.perf_counter() - start, samples, health


def _key(sample: dict) -> str:
    return sample["__key__"]


def _keys(items: list[str]) -> dict:
    return {"keys": items}


def compare(location: str, decode, collate, repeats: int, batch: int) -> dict:
    """{"off"/"on": best samples/s} for ``decode``, the modes alternating; checks the checks passed."""
    best = {"off": 0.0, "on": 0.0}
    stream_once(location, decode, collate, False, batch)  # warm-up: imports, page cache
    for _ in range(repeats):
        for mode in ("off", "on"):
            seconds, samples, health = stream_once(location, decode, collate, mode == "on", batch)
            if health.summary():
                raise RuntimeError(f"the benchmark's own shards failed a check: {health.summary()}")
            best[mode] = max(best[mode], samples / seconds)
    return best


def sha256_rate(location: str) -> float:
    """MB/s of hashlib's sha256 alone over the folder's shards, already in memory."""
    data = [f.read_bytes() for f in sorted(Path(location).glob("*.tar"))]
    start = time.perf_counter()
    for d in data:
        hashlib.sha256(d).hexdigest()
    return sum(map(len, data)) / 1e6 / (time.perf_counter() - start)


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def checkpoint_cost(repeats: int) -> dict:
    """Best seconds of writing a ResNet-50 checkpoint with its digests and without (the hash skipped),
    alternating; and of hashing the written files alone, with ``file_digest`` and with sha256."""
    import torch
    import torchvision

    from selfsup.config import parse_config
    from selfsup.core import checkpoint as ck

    model = torchvision.models.resnet50()
    optimizer = {
        "state": {i: {"momentum_buffer": torch.randn_like(p)} for i, p in enumerate(model.parameters())},
        "param_groups": [],
    }
    cfg = parse_config({"name": "bench", "data": {"train": "x"}, "method": {"name": "simclr"}})
    best = {"with": float("inf"), "without": float("inf"), "digest": float("inf"), "sha256": float("inf")}
    digest = ck.file_digest
    with tempfile.TemporaryDirectory(dir=".") as tmp:  # the disk a run folder would be on, not a tmpfs
        for i in range(repeats):
            for mode in ("with", "without"):
                ck.file_digest = digest if mode == "with" else (lambda path: "")
                dest = Path(tmp) / f"samples-{i}-{mode}"
                start = time.perf_counter()
                state = ck.TrainState(
                    optimizer,
                    step=i,
                    epoch=0,
                    step_in_epoch=i,
                    samples_seen=i,
                    checkpoints_written=i,
                    rng=[ck.rng_state()],
                )
                ck.write_checkpoint(dest, model.state_dict(), state, cfg, {})
                best[mode] = min(best[mode], time.perf_counter() - start)
            ck.file_digest = digest
            files = [f for f in dest.iterdir() if f.name != ck.PROGRESS]
            for name, hash_file in (("digest", digest), ("sha256", _sha256)):
                start = time.perf_counter()
                for f in files:
                    hash_file(f)
                best[name] = min(best[name], time.perf_counter() - start)
            best["bytes"] = sum(f.stat().st_size for f in files)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=20_000)
    p.add_argument("--size", type=int, default=28, help="image side; 28 uses Fashion-MNIST when present")
    p.add_argument("--per-shard", type=int, default=5000)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--checkpoint", action="store_true", help="time a ResNet-50 checkpoint's digests instead")
    args = p.parse_args()
    if args.checkpoint:
        r = checkpoint_cost(args.repeats)
        mb = r["bytes"] / 1e6
        print(
            f"ResNet-50 checkpoint, {mb:.0f} MB (weights + SGD momentum), best of {args.repeats}: written with "
            f"digests in {r['with']:.3f} s, without in {r['without']:.3f} s (with/without = "
            f"{r['with'] / r['without']:.2f}); its files hashed alone: xxh3-128 {r['digest']:.3f} s "
            f"({mb / r['digest']:,.0f} MB/s, {r['digest'] / r['without']:.3f} of the write), sha256 "
            f"{r['sha256']:.3f} s ({mb / r['sha256']:,.0f} MB/s, {r['sha256'] / r['without']:.2f} of the write)"
        )
        return
    with tempfile.TemporaryDirectory() as tmp:
        source = write_folder(Path(tmp) / "shards", args.samples, args.size, args.per_shard)
        location = str(Path(tmp) / "shards")
        mb = sum(f.stat().st_size for f in Path(location).glob("*.tar")) / 1e6
        print(
            f"{source}: {mb:.1f} MB in {len(list(Path(location).glob('*.tar')))} shards, "
            f"{mb * 1e6 / args.samples:.0f} bytes/sample; best of {args.repeats}; "
            f"sha256 alone: {sha256_rate(location):,.0f} MB/s"
        )
        channels = 1 if args.size == 28 else 3
        decoders = {
            "training decode (PNG -> tensor)": (
                functools.partial(decode_image, channels=channels, size=args.size),
                collate_images,
            ),
            "key only (read + tar parse)": (_key, _keys),
        }
        for name, (decode, collate) in decoders.items():
            r = compare(location, decode, collate, args.repeats, args.batch)
            print(
                f"{name}: without checksums {r['off']:,.0f} samples/s, with {r['on']:,.0f} samples/s "
                f"({r['on'] * mb * 1e6 / args.samples / 1e6:,.0f} MB/s hashed); "
                f"with/without = {r['on'] / r['off']:.3f}"
            )


if __name__ == "__main__":
    main()
