"""selfsup's training step against lightly's own SimCLR and BYOL loops, side by side in one run.

    python -m benchmarks.vs_lightly                                   # width 32, 3x3 stride-1 stem, batch 256
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python -m benchmarks.vs_lightly   # AVX2 kernels on AVX-512
    python -m benchmarks.vs_lightly --width 8 --stem-stride 2         # the demo's backbone

Same backbone (the nn.Module selfsup builds: a ResNet-18 of ``--width`` with a 3x3 stem of ``--stem-stride``,
one instance per contender, identically initialised), batch, torch threads, loader processes and data
(the first ``--images`` Fashion-MNIST training images, augmented with the same crop/flip/blur recipe):
- **lightly**: lightly 1.6's loop as its examples write it: its heads, ``NTXentLoss`` or
  ``NegativeCosineSimilarity``, its LARS, ``MultiViewTransform`` over torchvision's PIL transforms in a
  DataLoader, one forward per view, ``update_momentum`` on a ``cosine_schedule`` (BYOL);
- **selfsup**: ``Trainer.step`` on the Trainer's own shard loader (the shards written from the same images);
- **ceiling**: the bare backbone, forward and backward of two views of a fixed batch, plain SGD, in selfsup's
  memory format for this CPU (lightly's loop keeps torch's default, as its users do): the model's speed;
  with BYOL also **ceiling + target**, which adds a second backbone's forward of both views without gradients
  (BYOL's target network: four backbone forwards a step, which the bare ceiling does not count).
The three alternate in blocks of ``--steps`` steps (``--blocks`` rounds, the order rotated each round), so a
change of load on the machine reaches all of them alike. img/s counts images (a batch of B is B images,
both views included) over a block's steps, waiting for the loader included; each loop's figure is the
median of its blocks' (a load spike on a shared machine moves one block, not the figure).

Then a step breakdown (``torch.profiler`` regions over ``--profile-steps`` more steps of each loop):
waiting for the loader, views, forward (the loss's own time apart), loss, backward, optimiser and the
step's end (momentum networks, BatchNorm statistics). Writes ``--out`` (JSON).
Needs lightly (``pip install -c constraints.txt lightly lightning-utilities --no-deps``: the ``reference`` extra).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.profiler import ProfilerActivity, profile, record_function
from torch.utils.data import DataLoader, Dataset

from benchmarks.throughput import view_pipelines
from selfsup.cluster.in_process import build_trainer
from selfsup.config import ExperimentConfig, load_config
from selfsup.core.device import describe_machine, memory_format
from selfsup.data.shards import write_shards
from selfsup.data.sources import encode_png, find_fashion_mnist, read_idx
from selfsup.vision.backbones import build_backbone

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["simclr", "byol"]
REGIONS = ["loader", "views", "forward", "loss", "backward", "optimiser", "on_after_step"]


def config(method: str, args: argparse.Namespace, shards: str, run_root: str) -> ExperimentConfig:
    """The method's CPU recipe (heads, loss, LARS) with this run's backbone, batch, data and threads; the
    grey preset's views (crop, flip, blur), which lightly's loop gets too."""
    return load_config(
        ROOT / "configs" / f"{method}-resnet18-fmnist-cpu.yaml",
        [
            f"data.train={shards}",
            f"data.batch_size={args.batch}",
            f"data.loader_workers={args.workers}",
            f"model.width={args.width}",
            f"model.stem_stride={args.stem_stride}",
            "augment.preset=grey",
            "augment.views=null",
            f"train.precision={args.precision}",
            f"train.threads={args.threads}",
            "train.adapt_threads=false",
            "train.monitor_every_epochs=0",
            "tracking.mode=disabled",
            f"run_root={run_root}",
            f"seed={args.seed}",
            *args.set,
        ],
    )


def backbone(cfg: ExperimentConfig) -> tuple[nn.Module, int]:
    """The backbone selfsup builds for ``cfg``, seeded: every contender starts from the same weights."""
    torch.manual_seed(cfg.seed)
    m = cfg.model
    return build_backbone(m.backbone, m.width, cfg.data.channels, m.small_stem, cfg.data.image_size, m.stem_stride)


def fmnist_images(n: int) -> np.ndarray:
    """The first ``n`` Fashion-MNIST training images, uint8 (n, 28, 28)."""
    return read_idx(find_fashion_mnist() / "train-images-idx3-ubyte.gz")[:n]


def write_fmnist_shards(images: np.ndarray, out: Path) -> str:
    """``images`` as a shard folder (what the Trainer reads)."""
    samples = ({"__key__": f"fmnist-{i:07d}", "png": encode_png(img), "cls": 0} for i, img in enumerate(images))
    write_shards(samples, out, split="train", classes=["fashion-mnist"], total=len(images))
    return str(out)


class PILImages(Dataset):
    """uint8 (N, H, W) images as PIL images through ``transform``, each with label 0, as lightly's examples
    wrap a torchvision dataset."""

    def __init__(self, images: np.ndarray, transform: Callable):
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.transform(Image.fromarray(self.images[i])), 0


def cycle_loader(make: Callable[[int], Iterator]) -> Iterator:
    """Batches of ``make(epoch)``, epoch after epoch."""
    for epoch in itertools.count():
        yield from make(epoch)


def timed_next(batches: Iterator):
    """The next batch, its wait a profiler region."""
    with record_function("loader"):
        return next(batches)


class LightlyLoop:
    """lightly's own SimCLR or BYOL training loop over ``images`` (uint8 (N, H, W)) on ``encoder``."""

    def __init__(
        self, method: str, cfg: ExperimentConfig, encoder: nn.Module, dim: int, images: np.ndarray, total_steps: int
    ):
        from lightly.loss import NegativeCosineSimilarity, NTXentLoss
        from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead, SimCLRProjectionHead
        from lightly.models.utils import deactivate_requires_grad
        from lightly.transforms.multi_view_transform import MultiViewTransform
        from lightly.utils.lars import LARS

        self.method, self.cfg, self.total_steps, self.steps = method, cfg, total_steps, 0
        m = cfg.method
        self.encoder = encoder
        if method == "simclr":
            self.projector = SimCLRProjectionHead(dim, m.proj_hidden_dim, m.proj_dim)
            self.criterion = NTXentLoss(temperature=m.temperature)
            modules = [self.encoder, self.projector]
        else:
            import copy

            self.projector = BYOLProjectionHead(dim, m.proj_hidden_dim, m.proj_dim)
            self.predictor = BYOLPredictionHead(m.proj_dim, m.pred_hidden_dim, m.proj_dim)
            self.target_encoder, self.target_projector = copy.deepcopy(encoder), copy.deepcopy(self.projector)
            deactivate_requires_grad(self.target_encoder)
            deactivate_requires_grad(self.target_projector)
            self.criterion = NegativeCosineSimilarity()
            modules = [self.encoder, self.projector, self.predictor]
        self.modules = nn.ModuleList(modules)
        lr = cfg.optim.lr * cfg.data.batch_size / cfg.optim.reference_batch  # selfsup's linear scaling
        self.optimizer = LARS(
            self.modules.parameters(),
            lr=lr,
            momentum=cfg.optim.momentum,
            weight_decay=cfg.optim.weight_decay,
            trust_coefficient=cfg.optim.lars_eta,
        )
        d = cfg.data
        transform = MultiViewTransform(view_pipelines(cfg.view_recipes()[:2], d.image_size, d.mean, d.std))
        loader = DataLoader(
            PILImages(images, transform),
            batch_size=d.batch_size,
            shuffle=True,
            drop_last=True,
            num_workers=d.loader_workers,
            persistent_workers=d.loader_workers > 0,
        )
        self.batches = cycle_loader(lambda epoch: iter(loader))

    def step(self) -> int:
        """One training step of lightly's example loop; returns the images in its batch."""
        from lightly.models.utils import update_momentum
        from lightly.utils.scheduler import cosine_schedule

        views, _ = timed_next(self.batches)
        x0, x1 = views
        with record_function("forward"):
            if self.method == "simclr":
                z0, z1 = self.projector(self.encoder(x0)), self.projector(self.encoder(x1))
                with record_function("loss"):
                    loss = self.criterion(z0, z1)
            else:
                p0, p1 = (self.predictor(self.projector(self.encoder(x))) for x in (x0, x1))
                with torch.no_grad():
                    t0, t1 = (self.target_projector(self.target_encoder(x)).detach() for x in (x0, x1))
                with record_function("loss"):
                    loss = 0.5 * (self.criterion(p0, t1) + self.criterion(p1, t0))
        with record_function("backward"):
            loss.backward()
        with record_function("optimiser"):
            self.optimizer.step()
            self.optimizer.zero_grad()
        if self.method == "byol":
            with record_function("on_after_step"):
                m = cosine_schedule(self.steps, self.total_steps, self.cfg.method.tau_base, 1.0)
                update_momentum(self.encoder, self.target_encoder, m=m)
                update_momentum(self.projector, self.target_projector, m=m)
        self.steps += 1
        return len(x0)


class SelfsupLoop:
    """``Trainer.step`` on the Trainer's own loader, with ``encoder`` as its backbone's weights."""

    def __init__(self, cfg: ExperimentConfig, encoder: nn.Module):
        self.trainer = build_trainer(cfg)
        self.trainer.objective.encoder.load_state_dict(encoder.state_dict())
        for target, online in self.trainer.objective.momentum_pairs:  # the target starts as the online network
            objective = self.trainer.objective
            getattr(objective, target).load_state_dict(getattr(objective, online).state_dict())
        self.trainer.objective.train()

        def epoch(e: int) -> Iterator:
            self.trainer.stream.set_epoch(e)
            return iter(self.trainer.loader)

        self.batches = cycle_loader(epoch)

    def step(self) -> int:
        batch = timed_next(self.batches)
        self.trainer.step(batch)
        return len(batch["images"])


class Ceiling:
    """The bare backbone's forward and backward of two (B, C, S, S) views, one pass each, plain SGD, in the
    memory format selfsup trains this backbone in on this CPU (``memory_format``: channels_last where safe). With
    ``target`` (a copy of the backbone) also its forward of both views without gradients: the least that
    a method with a momentum target (BYOL) computes."""

    def __init__(self, cfg: ExperimentConfig, encoder: nn.Module, target: nn.Module | None = None):
        d = cfg.data
        layout = memory_format(torch.device("cpu"), cfg.train.channels_last, encoder)  # selfsup's, where safe
        self.encoder, self.target = encoder.to(memory_format=layout), target
        if target is not None:
            target.to(memory_format=layout)
        self.optimizer = torch.optim.SGD(encoder.parameters(), lr=1e-3)
        g = torch.Generator().manual_seed(0)
        self.views = [
            torch.randn(d.batch_size, d.channels, d.image_size, d.image_size, generator=g).contiguous(
                memory_format=layout
            )
            for _ in range(2)
        ]

    def step(self) -> int:
        self.optimizer.zero_grad(set_to_none=True)
        with record_function("forward"):
            features = [self.encoder(v) for v in self.views]
            if self.target is not None:
                with torch.no_grad():
                    features += [0 * self.target(v) for v in self.views]
        with record_function("backward"):
            sum(f.square().mean() for f in features).backward()
        with record_function("optimiser"):
            self.optimizer.step()
        return len(self.views[0])


def run_block(step: Callable[[], int], steps: int) -> tuple[int, float]:
    """(images, seconds) of ``steps`` calls of ``step``."""
    start, images = time.perf_counter(), 0
    for _ in range(steps):
        images += step()
    return images, time.perf_counter() - start


def breakdown(step: Callable[[], int], steps: int) -> dict[str, float]:
    """Seconds per step in each of ``REGIONS`` (forward without the loss inside it), and the whole step,
    over ``steps`` profiled steps."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        total = time.perf_counter() - start
    seconds = {e.key: e.cpu_time_total / 1e6 for e in prof.key_averages() if e.key in REGIONS}
    per_step = {r: seconds.get(r, 0.0) / steps for r in REGIONS}
    per_step["forward"] -= per_step["loss"]
    per_step["step"] = total / steps
    return per_step


def machine() -> dict:
    """The CPU, its vector ISA as torch's kernels see it (and the variables that cap it), the load on the machine
    (1-minute average), torch's threads and the commit benchmarked."""
    try:
        commit = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:  # not Linux
        flags = []
    return {
        "cpu": describe_machine(torch.device("cpu")),
        "isa": torch.backends.cpu.get_cpu_capability(),
        "cpu_flags": [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if f in flags],
        "isa_caps": {k: os.environ.get(k) for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")},
        "load_average": os.getloadavg()[0],
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "commit": commit,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--stem-stride", type=int, default=1, choices=[1, 2])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--threads", type=int, default=2, help="torch threads of every contender")
    p.add_argument("--workers", type=int, default=1, help="loader processes of lightly's and selfsup's loops")
    p.add_argument(
        "--precision",
        default="fp32",
        choices=["fp32", "auto", "bf16"],
        help="selfsup's train.precision (lightly's loop and the ceiling run fp32)",
    )
    p.add_argument("--blocks", type=int, default=3, help="rounds of blocks")
    p.add_argument("--steps", type=int, default=2, help="timed steps per block")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps of each loop first")
    p.add_argument("--profile-steps", type=int, default=2, help="profiled steps of each loop for the breakdown")
    p.add_argument("--images", type=int, default=4096, help="Fashion-MNIST training images used")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", nargs="*", default=[], help="more config overrides for selfsup (key=value)")
    p.add_argument(
        "--out", type=Path, help="JSON file (default: benchmarks/results/vs-lightly-<isa>-w<width>s<stride>.json)"
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    scratch = Path(tempfile.mkdtemp(prefix="selfsup-vs-lightly-"))
    images = fmnist_images(args.images)
    shards = write_fmnist_shards(images, scratch / "shards")
    total = args.warmup + args.blocks * args.steps + args.profile_steps
    contenders: dict[str, Callable[[], int]] = {}
    for method in args.methods:
        cfg = config(method, args, shards, str(scratch / "runs"))
        encoder, dim = backbone(cfg)
        contenders[f"lightly {method}"] = LightlyLoop(method, cfg, encoder, dim, images, total).step
        contenders[f"selfsup {method}"] = SelfsupLoop(cfg, backbone(cfg)[0]).step
    contenders["ceiling"] = Ceiling(cfg, backbone(cfg)[0]).step
    if "byol" in args.methods:
        contenders["ceiling + target"] = Ceiling(cfg, backbone(cfg)[0], backbone(cfg)[0]).step
    info = machine()
    print(
        f"{info['cpu']}; ResNet-18 width {args.width}, 3x3 stem stride {args.stem_stride}, batch {args.batch}, "
        f"{args.workers} loader process(es), selfsup precision {args.precision}; "
        f"load average {info['load_average']:.1f}",
        flush=True,
    )
    for step in contenders.values():
        run_block(step, args.warmup)
    images_done = dict.fromkeys(contenders, 0)
    block_rates: dict[str, list[float]] = {name: [] for name in contenders}
    seconds = dict.fromkeys(contenders, 0.0)
    names = list(contenders)
    for block in range(args.blocks):
        for name in names[block % len(names) :] + names[: block % len(names)]:
            n, s = run_block(contenders[name], args.steps)
            images_done[name] += n
            seconds[name] += s
            block_rates[name].append(n / s)
        print(
            f"block {block + 1}/{args.blocks}: "
            + ", ".join(f"{name} {images_done[name] / seconds[name]:.1f}" for name in names)
            + " img/s",
            flush=True,
        )
    rate = {name: statistics.median(block_rates[name]) for name in names}  # a load spike moves one block only
    phases = {name: breakdown(step, args.profile_steps) for name, step in contenders.items()}
    info["load_average_end"] = os.getloadavg()[0]
    result = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": info,
        "img_per_s": rate,
        "block_img_per_s": block_rates,
        "seconds": seconds,
        "images": images_done,
        "breakdown_s_per_step": phases,
        "methods": {},
    }
    print(
        f"\n{'method':<8} {'lightly img/s':>13} {'selfsup img/s':>13} {'ratio':>6} {'ceiling img/s':>13} "
        f"{'lightly/ceil':>12} {'selfsup/ceil':>12} {'+target img/s':>13} {'lightly/+t':>10} {'selfsup/+t':>10}"
    )
    for method in args.methods:
        lightly, ours, ceiling = rate[f"lightly {method}"], rate[f"selfsup {method}"], rate["ceiling"]
        row = {
            "lightly": lightly,
            "selfsup": ours,
            "ratio": ours / lightly,
            "ceiling": ceiling,
            "lightly_of_ceiling": lightly / ceiling,
            "selfsup_of_ceiling": ours / ceiling,
        }
        line = (
            f"{method:<8} {lightly:>13.1f} {ours:>13.1f} {ours / lightly:>5.2f}x {ceiling:>13.1f} "
            f"{lightly / ceiling:>12.1%} {ours / ceiling:>12.1%}"
        )
        if method == "byol":  # against the backbone's own work in BYOL: the target's forwards included
            with_target = rate["ceiling + target"]
            row.update(
                ceiling_with_target=with_target,
                lightly_of_ceiling_with_target=lightly / with_target,
                selfsup_of_ceiling_with_target=ours / with_target,
            )
            line += f" {with_target:>13.1f} {lightly / with_target:>10.1%} {ours / with_target:>10.1%}"
        result["methods"][method] = row
        print(line)
    print(f"\nstep breakdown, s per step ({args.profile_steps} profiled steps each; forward without the loss):")
    print(f"{'':<16}" + "".join(f"{r:>14}" for r in [*REGIONS, "step"]))
    for name, p in phases.items():
        print(f"{name:<16}" + "".join(f"{p[r]:>14.3f}" for r in [*REGIONS, "step"]))
    name = f"vs-lightly-{info['isa'].lower()}-w{args.width}s{args.stem_stride}.json"
    out = args.out or ROOT / "benchmarks" / "results" / name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"\nwrote {out}")
    return result


if __name__ == "__main__":
    main()
