"""Pretraining throughput of every vision method: the real path against a plain torchvision baseline.

    python -m benchmarks.throughput                       # CPU: Fashion-MNIST shards, ~3 min on 2 cores
    python -m benchmarks.throughput --methods simclr --steps 5
    python -m benchmarks.throughput --device cuda         # ResNet-18 @ 32 px and ResNet-50 @ 224 px, synthetic

Real path: the training loop's own ``Trainer.step()`` (views on the training device, bf16 autocast where the
device supports it (CUDA; CPUs with AVX-512 BF16), channels_last on CUDA, the NaN/inf skip, the optimiser
and momentum updates), fed uint8 batches (CPU: the Trainer's shard loader; CUDA: synthetic images in
pinned host memory, copied to the GPU every step; they are also written as shards, which the Trainer reads
to plan its epoch).
Baseline: the same model, loss and optimiser fed by a ``DataLoader`` that applies torchvision's
per-image PIL transforms (RandomResizedCrop, RandomHorizontalFlip, GaussianBlur, ToTensor,
Normalize) to the same uint8 images, in fp32 and the default memory format.

Both paths use the same number of loader processes. Achieved GFLOP/s counts the matmul/conv FLOPs
of one training step (torch's FlopCounterMode: forward + backward, target/key passes included),
and is set against a large GEMM measured in the same run (CPU) or the H100's dense bf16 peak (CUDA:
989 TFLOP/s for SXM, 756 for PCIe, 835 for NVL, read off the device name).
"""

from __future__ import annotations

import argparse
import itertools
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torch.utils.flop_counter import FlopCounterMode
from torchvision import transforms as T

from selfsup.cluster.in_process import build_trainer
from selfsup.config import ExperimentConfig, ViewRecipe, load_config
from selfsup.core.device import autocast_dtype
from selfsup.core.objective import Progress
from selfsup.data.decode import decode_image
from selfsup.data.reader import read_manifest, read_shard
from selfsup.data.shards import write_shards
from selfsup.data.sources import encode_png
from selfsup.tasks.vision import VisionTask
from selfsup.train.optim import build_optimizer, scaled_lr

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["simclr", "moco_v2", "moco_v3", "byol", "simsiam"]
H100_BF16_DENSE = {"PCIe": 756e12, "NVL": 835e12, "SXM": 989e12}


def h100_peak(name: str) -> tuple[float, str]:
    """(dense bf16 FLOP/s, variant) of the H100 named ``name``; SXM unless the name says otherwise."""
    variant = next((v for v in ("PCIe", "NVL") if v.lower() in name.lower()), "SXM")
    return H100_BF16_DENSE[variant], variant


@dataclass
class Setting:
    """One benchmark row group: a backbone at an image size, and where its images come from."""

    label: str
    overrides: list[str]
    synthetic: bool  # CUDA: random uint8 images instead of shards


def method_config(method: str, device: str, setting: Setting, extra: list[str] = ()) -> ExperimentConfig:
    """The method's own recipe (heads, loss, optimiser) with the setting's backbone, data and batch."""
    recipe = (
        "resnet50-imagenet" if "resnet50" in setting.label else "resnet18-fmnist" + ("-cpu" if device == "cpu" else "")
    )
    # the same augmentations as the baseline's (crop, flip, blur), whatever the recipe's preset
    return load_config(
        ROOT / "configs" / f"{method}-{recipe}.yaml",
        ["augment.preset=grey", "augment.views=null", *setting.overrides, *extra],
    )


def trainer_overrides(device: str, workers: int, threads: int | None, compile: bool, run_root: str) -> list[str]:
    """The real path's training settings: this device and its memory format, these loader processes
    and threads, no online monitor, nothing tracked."""
    return [
        f"scaling.use_gpu={device == 'cuda'}",
        f"train.channels_last={device == 'cuda'}",
        f"train.compile={compile}",
        f"data.loader_workers={workers}",
        f"train.threads={threads or 'null'}",
        "train.monitor_every_epochs=0",
        "tracking.mode=disabled",
        f"run_root={run_root}",
    ]


def settings_for(device: str, batch: int | None, data: str) -> list[Setting]:
    """CPU: the Fashion-MNIST recipe's backbone on the shards at ``data``; CUDA: ResNet-18 @ 32 px and
    ResNet-50 @ 224 px on synthetic RGB images."""
    if device == "cpu":
        return [
            Setting("fmnist-cpu recipe @ 28 px grey", [f"data.train={data}", f"data.batch_size={batch or 256}"], False)
        ]
    rgb = ["data.channels=3", "data.mean=[0.485,0.456,0.406]", "data.std=[0.229,0.224,0.225]"]
    return [
        Setting(
            "resnet18 @ 32 px",
            [*rgb, "model.width=64", "model.small_stem=true", "data.image_size=32", f"data.batch_size={batch or 256}"],
            True,
        ),
        Setting("resnet50 @ 224 px", [*rgb, "data.image_size=224", f"data.batch_size={batch or 128}"], True),
    ]


def build(cfg: ExperimentConfig, device: torch.device):
    """The baseline's (method, optimiser) on ``device``, seeded as the Trainer seeds its own, so both
    paths start from the same weights."""
    torch.manual_seed(cfg.seed)
    model = VisionTask().build_objective(cfg).to(device)
    lr = scaled_lr(cfg.optim.lr, cfg.data.batch_size, cfg.optim.reference_batch, cfg.optim.lr_scaling)
    return model, build_optimizer(model.param_groups(), cfg.optim, lr)


def write_synthetic_shards(images: torch.Tensor, out: Path) -> str:
    """``images`` uint8 (N, C, S, S) as a shard folder ``out`` (what the Trainer plans its epoch on)."""
    samples = (
        {"__key__": f"s{i:06d}", "png": encode_png(img.permute(1, 2, 0).squeeze(-1).numpy()), "cls": 0}
        for i, img in enumerate(images)
    )
    write_shards(samples, out, split="train", classes=["synthetic"])
    return str(out)


def first_images(location: str, n: int, channels: int, size: int) -> torch.Tensor:
    """The first ``n`` images of a shard folder: uint8 (n, C, size, size)."""
    _, urls = read_manifest(location)
    samples = itertools.islice((s for url in urls for s in read_shard(url, [])), n)
    return torch.stack([decode_image(s, channels, size)[0] for s in samples])


def view_pipelines(recipes: list[ViewRecipe], size: int, mean, std) -> list[T.Compose]:
    """torchvision's per-image PIL transforms of each view recipe (crop, flip, blur): PIL -> float (C, size, size)."""
    kernel = max(3, int(0.1 * size) // 2 * 2 + 1)
    return [
        T.Compose(
            [
                T.RandomResizedCrop(size, scale=r.crop_scale, ratio=r.crop_ratio),
                T.RandomHorizontalFlip(r.flip_p),
                T.RandomApply([T.GaussianBlur(kernel, r.blur_sigma)], p=r.blur_p),
                T.ToTensor(),
                T.Normalize(mean, std),
            ]
        )
        for r in recipes
    ]


class TorchvisionViews(Dataset):
    """The baseline's data: per-image PIL transforms, one pipeline per view recipe.

    ``[i] -> [float (C, size, size)] * len(recipes)``; each image goes through PIL like a torchvision dataset.
    """

    def __init__(self, images: torch.Tensor, recipes: list[ViewRecipe], size: int, mean, std):
        self.images = (
            images.permute(0, 2, 3, 1).squeeze(-1).numpy()
            if images.shape[1] == 1
            else images.permute(0, 2, 3, 1).numpy()
        )
        self.pipelines = view_pipelines(recipes, size, mean, std)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> list[torch.Tensor]:
        img = Image.fromarray(self.images[i])
        return [p(img) for p in self.pipelines]


def step_flops(cfg: ExperimentConfig, device: torch.device, batch: int = 16) -> float:
    """Matmul/conv FLOPs of one training step at ``cfg.data.batch_size``, counted at ``batch`` and scaled."""
    model, _ = build(cfg, device)
    views = [
        torch.randn(batch, cfg.data.channels, cfg.data.image_size, cfg.data.image_size, device=device) for _ in range(2)
    ]
    counter = FlopCounterMode(display=False)
    with counter:
        model(views, Progress(0, 1))["loss"].backward()
    return counter.get_total_flops() * cfg.data.batch_size / batch


def images_per_s(
    step: Callable[[object], int], batches: Iterable, steps: int, warmup: int, device: torch.device
) -> float:
    """Images/s of ``steps`` calls of ``step(batch) -> images in it`` after ``warmup`` untimed ones."""
    seen = 0
    for i, batch in enumerate(itertools.islice(batches, steps + warmup)):
        if i == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start, seen = time.perf_counter(), 0
        seen += step(batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return seen / (time.perf_counter() - start)


def real_rate(cfg: ExperimentConfig, steps: int, warmup: int, synthetic: torch.Tensor | None) -> float:
    """Images/s of the training loop's own ``Trainer.step()`` on uint8 batches: from the Trainer's
    shard loader, or the pinned ``synthetic`` (B, C, S, S) batch every step."""
    trainer = build_trainer(cfg)
    if synthetic is not None:
        batches = itertools.repeat({"images": synthetic})
    else:
        trainer.stream.set_epoch(0)
        batches = iter(trainer.loader)

    def step(batch: dict) -> int:
        trainer.step(batch)
        return len(batch["images"])

    return images_per_s(step, batches, steps, warmup, trainer.device)


def baseline_rate(
    cfg: ExperimentConfig, images: torch.Tensor, device: torch.device, workers: int, steps: int, warmup: int
) -> float:
    """Images/s of a plain fp32 loop (forward, backward, optimiser and momentum updates) on torchvision's views."""
    model, optimizer = build(cfg, device)
    progress = Progress(0, steps + warmup)

    def step(views: list[torch.Tensor]) -> int:
        loss = model(views, progress)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        model.on_after_step(progress)
        return views[0].shape[0]

    return images_per_s(step, baseline_batches(cfg, images, device, workers), steps, warmup, device)


def baseline_batches(cfg: ExperimentConfig, images: torch.Tensor, device: torch.device, workers: int):
    """The baseline's views: per-image torchvision transforms in ``workers`` DataLoader processes."""
    data = TorchvisionViews(images, cfg.view_recipes(), cfg.data.image_size, cfg.data.mean, cfg.data.std)
    loader = DataLoader(
        data,
        batch_size=cfg.data.batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )
    return ([v.to(device, non_blocking=True) for v in views] for views in itertools.cycle(loader))


def gemm_rate(device: torch.device, dtype: torch.dtype, n: int, repeats: int = 3) -> float:
    """FLOP/s of an n x n @ n x n matmul in ``dtype``, best of ``repeats``."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    p.add_argument("--steps", type=int, default=2, help="timed steps per path (after --warmup untimed ones)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--batch", type=int, help="per-step batch (default: 256 on the CPU, 256 / 128 on CUDA)")
    p.add_argument("--workers", type=int, help="loader processes for both paths (default: 1 on the CPU, 8 on CUDA)")
    p.add_argument("--data", default=str(ROOT / "data/fashion-mnist/train"), help="CPU: shard folder")
    p.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    p.add_argument("--backbones", nargs="+", choices=["resnet18", "resnet50"], help="CUDA: only these settings")
    p.add_argument(
        "--compile", action="store_true", help="torch.compile the real path (the first warm-up step compiles)"
    )
    return p.parse_args(argv)


def peaks(device: torch.device) -> tuple[dict[str, float], str]:
    """({"bf16", "fp32"}: FLOP/s the achieved rates are set against, a note saying where they come from)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name()
        bf16_peak, variant = h100_peak(name)
        return {
            "bf16": bf16_peak,
            "fp32": bf16_peak,
        }, f"{name}: H100 {variant} dense bf16 peak {bf16_peak / 1e12:.0f} TFLOP/s"
    peak = {"bf16": gemm_rate(device, torch.bfloat16, 2048), "fp32": gemm_rate(device, torch.float32, 2048)}
    return peak, f"measured 2048^3 GEMM: bf16 {peak['bf16'] / 1e9:.0f}, fp32 {peak['fp32'] / 1e9:.0f} GFLOP/s"


def measure(
    cfg: ExperimentConfig, device: torch.device, args: argparse.Namespace, workers: int, synthetic: bool, scratch: Path
) -> tuple[float, float, float]:
    """(matmul/conv FLOPs per image, baseline img/s, real img/s) of one method in one setting."""
    b, c, s = cfg.data.batch_size, cfg.data.channels, cfg.data.image_size
    pool = b * (args.steps + args.warmup)
    if synthetic:
        images = torch.randint(0, 256, (pool, c, s, s), dtype=torch.uint8)
        cfg = cfg.model_copy(
            update={
                "data": cfg.data.model_copy(update={"train": write_synthetic_shards(images, scratch / f"shards-{s}px")})
            }
        )
        pinned = images[:b].pin_memory()
    else:
        images, pinned = first_images(cfg.data.train, pool, c, s), None
    flops = step_flops(cfg, device) / b
    real = real_rate(cfg, args.steps, args.warmup, pinned)
    base = baseline_rate(cfg, images, device, workers, args.steps, args.warmup)
    return flops, base, real


def print_table(rows: list[tuple], device: torch.device) -> None:
    unit_name = "TFLOP/s" if device.type == "cuda" else "GFLOP/s"
    head = (
        f"{'backbone':<26} {'method':<8} {'GFLOP/img':>9} {'baseline img/s':>14} {'selfsup img/s':>13} {'ratio':>6} "
        f"{unit_name:>8} {'of peak':>8} {'baseline of peak':>16}"
    )
    print("\n" + head + "\n" + "-" * len(head))
    for label, method, gflop, base, real, ratio, achieved, frac, base_frac in rows:
        print(
            f"{label:<26} {method:<8} {gflop:>9.2f} {base:>14.1f} {real:>13.1f} {ratio:>5.2f}x {achieved:>8.1f} "
            f"{frac:>8.1%} {base_frac:>16.1%}"
        )
    print(
        "\nFLOPs: matmul/conv of forward + backward (+ target/key forwards); 'of peak': achieved / "
        + (
            "the H100's dense bf16 peak (MFU)"
            if device.type == "cuda"
            else "the measured GEMM peak of the path's dtype"
        )
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    settings = [
        s
        for s in settings_for(device.type, args.batch, args.data)
        if not args.backbones or s.label.split()[0] in args.backbones
    ]
    workers = args.workers if args.workers is not None else 8 if device.type == "cuda" else 1
    peak, peak_note = peaks(device)
    scratch = Path(tempfile.mkdtemp(prefix="selfsup-throughput-"))
    extra = trainer_overrides(device.type, workers, args.threads, args.compile, str(scratch / "runs"))
    amp = autocast_dtype(method_config(args.methods[0], device.type, settings[0], extra).train.precision, device)
    real_kind = "bf16" if amp is not None else "fp32"
    print(
        f"device {device}, torch threads {torch.get_num_threads()}, loader processes {workers}, "
        f"real path Trainer.step {real_kind}{' + channels_last' if device.type == 'cuda' else ''}"
        f"{' + torch.compile' if args.compile else ''}, baseline fp32; {peak_note}"
    )
    unit = 1e12 if device.type == "cuda" else 1e9
    rows = []
    for setting in settings:
        for method in args.methods:
            cfg = method_config(method, device.type, setting, extra)
            flops, base, real = measure(cfg, device, args, workers, setting.synthetic, scratch)
            rows.append(
                (
                    setting.label,
                    method,
                    flops / 1e9,
                    base,
                    real,
                    real / base,
                    flops * real / unit,
                    flops * real / peak[real_kind],
                    flops * base / peak["fp32"],
                )
            )
            print(f"  {setting.label} {method}: baseline {base:.1f} img/s, real {real:.1f} img/s", flush=True)
    shutil.rmtree(scratch, ignore_errors=True)
    print_table(rows, device)


if __name__ == "__main__":
    main()
