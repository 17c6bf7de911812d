"""JPEG shards -> views -> training steps, measured end to end on ImageNet-like JPEGs (issue 13).

    python -m benchmarks.jpeg_views                        # CPU suite, 5-7 min on 2 shared cores
    python -m benchmarks.jpeg_views --device cuda          # GPU suite (one H200 + 16 cores), meant for < 8 min

The data is made here: ``selfsup.data.synthetic`` writes ImageNet-like JPEGs (sizes mostly 500x375 and
375x500, 0.1-1 megapixel, quality 90) as a class folder, which ``selfsup shards write image-folder``'s
own code turns into shards (the JPEG bytes unchanged, each image's size in the manifest). Nothing is
downloaded.

CPU suite:
1. Views per second per core: the training path (``VisionTask.train_stream``: the shard stream decoding
   and cutting each view from the whole image, ``data.decode=cpu``; then ``input_fn``: flip, jitter,
   grey, blur, solarize batched) against torchvision's ``ImageFolder`` + per-image transforms + a
   ``DataLoader`` on the same files in the same run, two views per image: first RandomResizedCrop and
   flip only (decoding and cropping), then the SimCLR ImageNet recipe (``ColorJitter``,
   ``RandomGrayscale``, ``GaussianBlur`` too). Both run in this one process on one thread
   (``--view-workers 0``), so their rates are per core.
2. The whole training step, ``Trainer.step`` (as ``benchmarks/throughput.py`` times it), of SimCLR with
   a ResNet-18 at 96 px on all cores, from the JPEG shards with 2 loader processes, and from one
   in-memory uint8 batch (the same model and batch).

GPU suite (``--device cuda``): ResNet-50 at 224 px, bf16, channels_last, SimCLR, from the JPEG shards
on local disk with ``data.decode=gpu`` (loader workers read bytes; nvJPEG decodes; the crops are cut on
the GPU), with ``torch.compile`` off and on. For the same model and batch it also times in-memory uint8
batches (pinned, copied every step, views cut on the GPU) and the view pipeline alone (no model). It
prints images (pairs of views) per second, the fraction of wall time the loop waits for the loader,
and the model FLOP utilisation against the H200's dense bf16 peak (989 TFLOP/s; FLOPs counted by
torch's FlopCounterMode, forward + backward).
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from torchvision import datasets
from torchvision import transforms as T

from benchmarks.throughput import step_flops
from selfsup.cluster.in_process import build_trainer
from selfsup.config import ExperimentConfig, ViewRecipe, load_config
from selfsup.data.decode import decode_image
from selfsup.data.reader import read_manifest, read_shard
from selfsup.data.shards import write_shards
from selfsup.data.sources import image_folder_samples
from selfsup.data.stream import make_loader
from selfsup.data.synthetic import write_imagenet_like
from selfsup.tasks.vision import VisionTask
from selfsup.train.trainer import Trainer

H200_BF16_DENSE = 989e12  # FLOP/s, dense bf16 (the H100 SXM's; NVIDIA's H200 datasheet)
RECIPE = "simclr-resnet50-imagenet"


def make_data(scratch: Path, n: int, processes: int) -> tuple[Path, str]:
    """(an ImageNet-like JPEG class folder of ``n`` images, its shard folder)."""
    folder, shards = scratch / "jpegs", scratch / "shards"
    start = time.perf_counter()
    write_imagenet_like(folder, n, classes=10, seed=0, processes=processes)
    samples, total, classes = image_folder_samples(folder, processes=processes)
    manifest = write_shards(
        samples, shards, classes=classes, total=total, samples_per_shard=1000, source="benchmarks.jpeg_views"
    )
    mb = sum(s["bytes"] for s in manifest["shards"]) / 1e6
    print(
        f"data: {manifest['num_samples']} JPEGs, {mb:.0f} MB in {len(manifest['shards'])} shards, "
        f"{len({tuple(s) for sh in manifest['shards'] for s in sh['sizes']})} sizes, "
        f"written in {time.perf_counter() - start:.0f} s",
        flush=True,
    )
    return folder, str(shards)


def config(shards: str, scratch: Path, overrides: list[str]) -> ExperimentConfig:
    """The SimCLR ImageNet recipe on ``shards``, untracked, without the online monitor."""
    return load_config(
        RECIPE,
        [
            f"data.train={shards}",
            "tracking.mode=disabled",
            "train.monitor_every_epochs=0",
            "scaling.num_workers=1",
            f"run_root={scratch / 'runs'}",
            *overrides,
        ],
    )


def torchvision_pipeline(recipe: ViewRecipe, size: int, mean: list[float], std: list[float]) -> T.Compose:
    """One view of ``recipe`` as the papers' per-image torchvision transforms."""
    kernel = max(3, int(0.1 * size) // 2 * 2 + 1)
    return T.Compose(
        [
            T.RandomResizedCrop(size, scale=recipe.crop_scale, ratio=recipe.crop_ratio),
            T.RandomHorizontalFlip(recipe.flip_p),
            T.RandomApply(
                [T.ColorJitter(recipe.brightness, recipe.contrast, recipe.saturation, recipe.hue)], p=recipe.jitter_p
            ),
            T.RandomGrayscale(recipe.grayscale_p),
            T.RandomApply([T.GaussianBlur(kernel, recipe.blur_sigma)], p=recipe.blur_p),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )


class TwoViews:
    """PIL image -> [float (3, S, S)] * V, one per recipe."""

    def __init__(self, pipelines: list[T.Compose]):
        self.pipelines = pipelines

    def __call__(self, img):
        return [p(img) for p in self.pipelines]


def rate(batches, count, warmup: int, batches_timed: int) -> float:
    """Images/s of ``batches_timed`` batches of ``batches`` after ``warmup`` untimed ones; ``count(batch)``
    consumes a batch and returns its image count."""
    seen, start = 0, time.perf_counter()
    for i, batch in enumerate(itertools.islice(batches, warmup + batches_timed)):
        if i == warmup:
            seen, start = 0, time.perf_counter()
        seen += count(batch)
    return seen / (time.perf_counter() - start)


def selfsup_views_rate(cfg: ExperimentConfig, warmup: int, timed: int) -> float:
    """Views/s of the training path: shard stream (decode + cut per image) -> ``input_fn`` on the CPU."""
    task = VisionTask()
    stream = task.train_stream(cfg)
    stream.set_epoch(0)
    to_input = task.input_fn(cfg, torch.device("cpu"))
    return rate(iter(make_loader(stream, cfg.data.loader_workers)), lambda b: len(to_input(b)[0]), warmup, timed)


def torchvision_views_rate(folder: Path, cfg: ExperimentConfig, workers: int, warmup: int, timed: int) -> float:
    """Views/s of ImageFolder + per-image transforms + DataLoader on the same JPEGs."""
    d = cfg.data
    views = TwoViews([torchvision_pipeline(r, d.image_size, d.mean, d.std) for r in cfg.view_recipes()])
    loader = DataLoader(
        datasets.ImageFolder(str(folder), transform=views),
        batch_size=d.batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=workers,
        persistent_workers=False,
    )
    return rate(iter(loader), lambda b: len(b[0][0]), warmup, timed)


def timed_steps(trainer: Trainer, batches, steps: int, warmup: int) -> tuple[float, float]:
    """(images/s, fraction of wall time spent waiting for the next batch) of ``steps`` ``Trainer.step``
    calls after ``warmup`` untimed ones."""
    cuda = trainer.device.type == "cuda"
    seen, waited, start = 0, 0.0, time.perf_counter()
    for i in range(warmup + steps):
        if i == warmup:
            if cuda:
                torch.cuda.synchronize()
            seen, waited, start = 0, 0.0, time.perf_counter()
        t0 = time.perf_counter()
        batch = next(batches)
        waited += time.perf_counter() - t0
        trainer.step(batch)
        seen += len(batch["labels"])
    if cuda:
        torch.cuda.synchronize()
    wall = time.perf_counter() - start
    return seen / wall, waited / wall


def loader_batches(trainer: Trainer):
    trainer.stream.set_epoch(0)
    return iter(trainer.loader)


CROP_AND_FLIP = "augment.views=[{crop_scale: [0.08, 1.0]}, {crop_scale: [0.08, 1.0]}]"  # RandomResizedCrop + flip


def cpu_views(args: argparse.Namespace, folder: Path, shards: str, scratch: Path) -> None:
    """Views/s of both paths with RandomResizedCrop + flip only (the decode-and-crop comparison), then with
    the SimCLR recipe's colour distortion and blur too."""
    torch.set_num_threads(1)
    per = "per core" if args.view_workers == 0 else f"with {args.view_workers} loader processes"
    runs = [
        (size, label, extra)
        for size in args.view_sizes
        for label, extra in (("RandomResizedCrop + flip", [CROP_AND_FLIP]), ("SimCLR recipe", []))
    ]
    for size, label, extra in runs:
        cfg = config(
            shards,
            scratch,
            [
                f"data.image_size={size}",
                f"data.batch_size={args.batch}",
                f"data.loader_workers={args.view_workers}",
                "data.decode=cpu",
                "scaling.use_gpu=false",
                *extra,
            ],
        )
        timed = args.images // args.batch - 1
        ours = selfsup_views_rate(cfg, 1, timed)
        theirs = torchvision_views_rate(folder, cfg, args.view_workers, 1, timed)
        print(
            f"views @ {size} px, 2 per image, {label}, {per}: selfsup {ours:.1f} img/s, torchvision "
            f"ImageFolder + per-image transforms + DataLoader {theirs:.1f} img/s, ratio {ours / theirs:.2f}x",
            flush=True,
        )


def cpu_step(args: argparse.Namespace, shards: str, scratch: Path) -> None:
    """Images/s of Trainer.step for SimCLR ResNet-18 @ 96 px on all cores, from the JPEG shards and from
    one in-memory uint8 batch."""
    threads = args.threads or os.cpu_count()
    torch.set_num_threads(threads)
    cfg = config(
        shards,
        scratch,
        [
            "model.backbone=resnet18",
            "data.image_size=96",
            f"data.batch_size={args.step_batch}",
            "data.loader_workers=2",
            "data.decode=cpu",
            "scaling.use_gpu=false",
            "train.channels_last=false",
            f"train.threads={threads}",
        ],
    )
    trainer = build_trainer(cfg)
    steps = min(args.steps, args.images // args.step_batch - 1)
    images_s, wait = timed_steps(trainer, loader_batches(trainer), steps, 1)
    memory, _ = timed_steps(trainer, itertools.repeat(memory_batch(shards, cfg)), steps, 1)
    print(
        f"whole step (Trainer.step), SimCLR ResNet-18 @ 96 px, batch {args.step_batch}, {threads} threads + 2 "
        f"loader processes: from JPEG shards {images_s:.1f} img/s (waiting for data {wait:.0%} of the time), "
        f"from in-memory uint8 {memory:.1f} img/s"
    )


def memory_batch(shards: str, cfg: ExperimentConfig) -> dict:
    """The first ``data.batch_size`` images of the shards at ``data.image_size`` (short side resized,
    centre crop), pinned where CUDA is: the in-memory uint8 baseline's batch."""
    _, urls = read_manifest(shards)
    samples = itertools.islice((s for url in urls for s in read_shard(url, [])), cfg.data.batch_size)
    images = torch.stack([decode_image(s, 3, cfg.data.image_size)[0] for s in samples])
    labels = torch.zeros(len(images), dtype=torch.int64)
    return (
        {"images": images.pin_memory(), "labels": labels}
        if torch.cuda.is_available()
        else {"images": images, "labels": labels}
    )


def views_only_rate(trainer: Trainer, steps: int, warmup: int) -> float:
    """Images/s of the loader + ``to_input`` (decode, cut, augment on the device) without the model."""
    batches = loader_batches(trainer)
    sync = torch.cuda.synchronize if trainer.device.type == "cuda" else (lambda: None)

    def count(batch):
        n = len(trainer.to_input(batch)[0])
        sync()
        return n

    return rate(batches, count, warmup, steps)


def gpu_suite(args: argparse.Namespace, shards: str, scratch: Path) -> None:
    cuda = args.device == "cuda"
    base = [
        f"data.image_size={args.size}",
        f"data.batch_size={args.batch}",
        f"data.loader_workers={args.workers}",
        f"data.decode={'gpu' if cuda else 'cpu'}",
        f"scaling.use_gpu={cuda}",
        f"train.channels_last={cuda}",
        f"train.precision={'bf16' if cuda else 'fp32'}",
    ]
    device = torch.device(args.device)
    flops = step_flops(config(shards, scratch, base), device) / args.batch
    print(
        f"ResNet-50 @ {args.size} px, SimCLR, batch {args.batch} pairs, {flops / 1e9:.1f} GFLOP per pair "
        f"(forward + backward), {args.workers} loader workers, data.decode={'gpu' if cuda else 'cpu'}",
        flush=True,
    )
    rows = []
    for compiled in {"off": [False], "on": [True], "both": [False, True]}[args.compile]:
        cfg = config(shards, scratch, [*base, f"train.compile={compiled}"])
        trainer = build_trainer(cfg)
        warmup = args.warmup + (3 if compiled else 0)
        jpeg, wait = timed_steps(trainer, loader_batches(trainer), args.steps, warmup)
        memory, _ = timed_steps(trainer, itertools.repeat(memory_batch(shards, cfg)), args.steps, warmup)
        views = views_only_rate(trainer, args.steps, args.warmup)
        rows.append((compiled, jpeg, memory, wait, views))
        print(
            f"  compile {'on' if compiled else 'off'}: JPEG shards {jpeg:.0f} pairs/s, in-memory uint8 {memory:.0f} "
            f"pairs/s, views alone {views:.0f} img/s",
            flush=True,
        )
    print(
        f"\n{'compile':<8} {'JPEG pairs/s':>12} {'memory pairs/s':>14} {'JPEG/memory':>11} {'data wait':>9} "
        f"{'MFU JPEG':>8} {'MFU memory':>10}"
    )
    for compiled, jpeg, memory, wait, _ in rows:
        print(
            f"{'on' if compiled else 'off':<8} {jpeg:>12.0f} {memory:>14.0f} {jpeg / memory:>11.2f} {wait:>9.1%} "
            f"{flops * jpeg / H200_BF16_DENSE:>8.1%} {flops * memory / H200_BF16_DENSE:>10.1%}"
        )
    print(
        f"MFU: achieved FLOP/s / the H200's dense bf16 peak ({H200_BF16_DENSE / 1e12:.0f} TFLOP/s); aims: JPEG "
        "within 5% of memory, >= 2,500 pairs/s, >= 12% MFU"
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cpu: the CPU suite; cuda: the GPU suite")
    p.add_argument(
        "--suite",
        choices=["auto", "cpu", "gpu"],
        default="auto",
        help="auto: the device's suite (gpu on a CPU device: a smoke run of the GPU suite's code)",
    )
    p.add_argument("--images", type=int, help="JPEGs to make (default: 512 CPU, 12000 GPU)")
    p.add_argument("--size", type=int, default=224, help="GPU: view size (default: 224)")
    p.add_argument("--view-sizes", type=int, nargs="+", default=[96, 224], help="CPU views: sizes (default: 96 224)")
    p.add_argument("--batch", type=int, help="images per batch (default: 32 CPU views, 256 GPU)")
    p.add_argument("--view-workers", type=int, default=0, help="CPU views: loader processes (0: one core)")
    p.add_argument("--step-batch", type=int, default=32, help="CPU whole step: batch")
    p.add_argument("--steps", type=int, help="timed steps (default: 4 CPU, 30 GPU)")
    p.add_argument("--warmup", type=int, default=3, help="GPU: untimed steps (+3 with compile)")
    p.add_argument("--workers", type=int, default=12, help="GPU: loader workers")
    p.add_argument("--threads", type=int, help="torch threads for the CPU whole step (default: all cores)")
    p.add_argument("--compile", choices=["off", "on", "both"], default="both", help="GPU: torch.compile")
    p.add_argument("--processes", type=int, default=os.cpu_count(), help="processes making the data")
    p.add_argument("--keep", help="make the data here and keep it (default: a temporary folder)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    gpu = args.suite == "gpu" or (args.suite == "auto" and args.device == "cuda")
    args.images = args.images or (12000 if gpu else 512)
    args.batch = args.batch or (256 if gpu else 32)
    args.steps = args.steps or (30 if gpu else 4)
    scratch = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="selfsup-jpeg-views-"))
    scratch.mkdir(parents=True, exist_ok=True)
    try:
        folder, shards = make_data(scratch, args.images, args.processes)
        if gpu:
            gpu_suite(args, shards, scratch)
        else:
            cpu_views(args, folder, shards, scratch)
            cpu_step(args, shards, scratch)
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
