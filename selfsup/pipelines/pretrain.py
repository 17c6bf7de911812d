"""The per-rank training loop: plain PyTorch, the same with or without Ray.

``pretrain(cfg, reporter)`` reads shards, builds the objective named by the config, and trains it
with AMP, the LR schedule, momentum/EMA updates and atomic checkpoints, resuming from the run's
latest checkpoint (weights, optimiser, step, epoch, position in the epoch, RNG). Metrics and
checkpoints go to a :class:`Reporter`; which one (a file, Ray, W&B) is the caller's choice.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import random
import time
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from ..config import ExperimentConfig
from ..objective import Progress
from ..ssl import build_method
from ..ssl.distributed import rank as current_rank, world_size
from ..ssl.monitor import CollapseMonitor, embedding_stats
from ..vision.augment import BatchViews
from ..vision.backbones import build_backbone
from .checkpoint import latest_checkpoint, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .loader import DataHealth, ShardStream, collate_audio, collate_images, decode_audio_sample, decode_image, make_loader
from .monitor import OnlineMonitor
from .optim import build_optimizer, scaled_lr, set_lr

log = logging.getLogger("selfsup.pretrain")


class Reporter(Protocol):
    """Where the loop sends metrics (every rank calls it; implementations act on rank 0)."""

    def log(self, step: int, metrics: dict) -> None: ...

    def checkpoint(self, step: int, path: Path) -> None: ...

    def finish(self, summary: dict) -> None: ...


class FileReporter:
    """Appends metrics as JSON lines to ``<run>/metrics.jsonl`` (rank 0 only)."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / "metrics.jsonl"

    def log(self, step: int, metrics: dict) -> None:
        if current_rank() == 0:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": step, **metrics}, default=float) + "\n")

    def checkpoint(self, step: int, path: Path) -> None:
        pass

    def finish(self, summary: dict) -> None:
        if current_rank() == 0:
            (self.path.parent / "summary.json").write_text(json.dumps(summary, indent=1, default=float))


SIZING_STEPS = 20  # steps timed, after the first one, before a time-budgeted run fixes its length


def steps_in_budget(minutes: float, seconds_so_far: float, seconds_per_step: float, step: int, planned: int) -> int:
    """Total steps of a run that must end ``minutes`` after it started, at ``seconds_per_step``; every
    rank gets the smallest answer so that all take the same steps."""
    fit = step + int(max(0.0, minutes * 60 - seconds_so_far) / max(seconds_per_step, 1e-9))
    total = torch.tensor(max(step + 1, min(planned, fit)))
    if world_size() > 1:
        dist.all_reduce(total, op=dist.ReduceOp.MIN)
    return int(total)


class TooManyBadSteps(RuntimeError):
    """The loss was NaN or inf for too many steps in a row."""


def pick_device(cfg: ExperimentConfig) -> torch.device:
    if cfg.scaling.use_gpu and torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", 0))
        return torch.device("cuda", local % torch.cuda.device_count())
    return torch.device("cpu")


def autocast_dtype(cfg: ExperimentConfig, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on CUDA, and on CPUs with native bf16 (AVX-512 BF16 or AMX) unless fp32 is asked for."""
    if cfg.train.precision == "fp32":
        return None
    if cfg.train.precision == "bf16" or device.type == "cuda" or torch.cpu._is_avx512_bf16_supported():
        return torch.bfloat16
    return None


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def build_vision_method(cfg: ExperimentConfig) -> nn.Module:
    """The image method of ``cfg`` around its backbone, at random initialisation."""
    m = cfg.model
    backbone, dim = build_backbone(m.backbone, m.width, cfg.data.channels, m.small_stem, cfg.data.image_size,
                                   m.stem_stride, m.freeze_patch_embed)
    return build_method(cfg.method, backbone, dim)


def build_vision(cfg: ExperimentConfig, device: torch.device):
    """(objective, train stream, batch -> objective input) for an image method."""
    objective = build_vision_method(cfg)
    views = BatchViews(cfg.view_recipes(), cfg.data.image_size, cfg.data.mean, cfg.data.std)
    decode = functools.partial(decode_image, channels=cfg.data.channels, size=cfg.data.image_size)
    stream = ShardStream(cfg.data.train, cfg.data.batch_size, decode, collate_images, rank=current_rank(),
                         ranks=world_size(), workers=max(1, cfg.data.loader_workers), seed=cfg.seed,
                         shuffle_buffer=cfg.data.shuffle_buffer)
    memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format

    def to_input(batch: dict) -> list[torch.Tensor]:
        images = batch["images"].to(device, non_blocking=True)
        return [v.contiguous(memory_format=memory_format) for v in views(images)]

    return objective, stream, to_input


def build_audio(cfg: ExperimentConfig, device: torch.device):
    """(wav2vec 2.0 objective, train stream of cropped 16 kHz clips, batch -> (waves (B, S), lengths (B,)))."""
    from ..audio.decode import SAMPLE_RATE
    from ..audio.feature_encoder import receptive_field
    from ..audio.wav2vec2 import Wav2Vec2Pretraining

    objective = Wav2Vec2Pretraining(cfg.method)
    field, hop = receptive_field(cfg.method.conv_kernels, cfg.method.conv_strides)
    # at least one mask span of frames beyond the receptive field, so masking and distractors work
    min_samples = max(int(cfg.data.min_seconds * SAMPLE_RATE), field + cfg.method.mask_length * hop)
    max_samples = int(cfg.data.max_seconds * SAMPLE_RATE)
    if max_samples < min_samples:
        raise ValueError(f"data.max_seconds {cfg.data.max_seconds} is below the shortest usable clip "
                         f"({min_samples / SAMPLE_RATE:g} s: data.min_seconds or the receptive field)")
    stream = ShardStream(cfg.data.train, cfg.data.batch_size, functools.partial(decode_audio_sample, min_samples=min_samples),
                         functools.partial(collate_audio, max_samples=max_samples, min_samples=min_samples),
                         rank=current_rank(), ranks=world_size(), workers=max(1, cfg.data.loader_workers),
                         seed=cfg.seed, shuffle_buffer=cfg.data.shuffle_buffer)

    def to_input(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        return batch["waves"].to(device, non_blocking=True), batch["lengths"].to(device, non_blocking=True)

    return objective, stream, to_input


class CodebookHealthReporter:
    """A Reporter that passes every logged record through a ``CodebookHealthMonitor`` first (rank 0):
    alarms are logged as warnings and counted in the record as ``codebook_alarms``."""

    def __init__(self, inner: Reporter, groups: int):
        from ..audio.health import CodebookHealthMonitor

        self.inner, self.monitor = inner, CodebookHealthMonitor(groups=groups)

    def log(self, step: int, metrics: dict) -> None:
        if current_rank() == 0:
            metrics = {**metrics, "codebook_alarms": len(self.monitor.update(step, metrics))}
        self.inner.log(step, metrics)

    def checkpoint(self, step: int, path: Path) -> None:
        self.inner.checkpoint(step, path)

    def finish(self, summary: dict) -> None:
        self.inner.finish(summary)


def pretrain(cfg: ExperimentConfig, reporter: Reporter) -> dict:
    """Train until ``cfg.optim.epochs`` are done; returns a summary (steps, last metrics, data health)."""
    seed_everything(cfg.seed + current_rank(), cfg.deterministic)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    device = pick_device(cfg)
    run_dir = cfg.run_dir
    if cfg.method.name == "wav2vec2":
        objective, stream, to_input = build_audio(cfg, device)
        reporter = CodebookHealthReporter(reporter, cfg.method.codebook_groups)
    else:
        objective, stream, to_input = build_vision(cfg, device)
    if world_size() > 1 and getattr(cfg.method, "sync_bn", False):
        objective = nn.SyncBatchNorm.convert_sync_batchnorm(objective)
    objective.to(device)
    if cfg.train.channels_last:  # faster convolutions with oneDNN (CPU) and cuDNN (GPU) alike
        objective.to(memory_format=torch.channels_last)

    global_batch = cfg.data.batch_size * world_size()
    lr = scaled_lr(cfg.optim.lr, global_batch, cfg.optim.reference_batch, cfg.optim.lr_scaling)
    optimizer = build_optimizer(objective.param_groups(), cfg.optim, lr)
    steps_per_epoch = stream.steps_per_epoch()
    total_steps = max(1, math.ceil(cfg.optim.epochs * steps_per_epoch))
    warmup_steps = int(cfg.optim.warmup_epochs * steps_per_epoch)

    step, start_epoch, start_in_epoch = 0, 0, 0
    sized = cfg.optim.minutes is None  # a time-budgeted run fixes total_steps after SIZING_STEPS steps
    found = latest_checkpoint(run_dir, remote=cfg.run_url)
    if found is not None:
        _, model_state, state = load_checkpoint(found, with_state=True)
        objective.load_state_dict(model_state)
        optimizer.load_state_dict(state["optimizer"])
        for group in optimizer.param_groups:  # this world size's LR, not the saved one (elastic runs resize)
            group["base_lr"] = lr
        step, start_epoch, start_in_epoch = state["step"], state["epoch"], state["step_in_epoch"]
        if state.get("sized_total_steps"):
            total_steps, sized = state["sized_total_steps"], True
        if len(state["rng"]) != world_size():  # saved by another number of ranks: same samples, this size's steps
            start_in_epoch = start_in_epoch * len(state["rng"]) // world_size()
            step = start_epoch * steps_per_epoch + start_in_epoch
        set_rng_state(state["rng"][current_rank()] if current_rank() < len(state["rng"]) else state["rng"][0])
        log.info("resumed %s from %s (step %d)", cfg.name, found, step)

    model = objective
    if world_size() > 1:
        # LayerDrop skips whole layers, leaving their parameters without gradients in that step
        model = nn.parallel.DistributedDataParallel(objective, device_ids=[device.index] if device.type == "cuda" else None,
                                                    find_unused_parameters=getattr(cfg.method, "layer_drop", 0) > 0,
                                                    broadcast_buffers=False)
    step_fn = torch.compile(model) if cfg.train.compile else model
    amp = autocast_dtype(cfg, device)
    loader = make_loader(stream, cfg.data.loader_workers)
    health = DataHealth()
    # NaN/inf steps: all of them, the current run and the longest run, counted on the device and read
    # at logging steps (a check every step would make the host wait for the GPU each step)
    bad_total, bad_run, worst_run = (torch.zeros((), dtype=torch.long, device=device) for _ in range(3))
    collapse = CollapseMonitor()
    last: dict = {}
    epochs = math.ceil(total_steps / steps_per_epoch)
    timer, images_since = time.perf_counter(), 0
    started, first_step = time.perf_counter(), step
    paced_from = started  # reset after the first step: the budget's pace leaves its start-up out

    def write_checkpoint(epoch: int, in_epoch: int) -> None:
        rngs = [None] * world_size()
        if world_size() > 1:
            dist.all_gather_object(rngs, rng_state())
        else:
            rngs = [rng_state()]
        if current_rank() == 0:
            state = {"optimizer": optimizer.state_dict(), "step": step, "epoch": epoch, "step_in_epoch": in_epoch,
                     "sized_total_steps": total_steps if cfg.optim.minutes and sized else 0, "rng": rngs, "data_health": {"skipped": health.skipped, "repeated": health.repeated}}
            path = save_checkpoint(run_dir, step, objective.state_dict(), state, cfg, last, cfg.train.keep_checkpoints)
            reporter.checkpoint(step, path)
        if world_size() > 1:
            dist.barrier()

    show = current_rank() == 0
    monitor = OnlineMonitor(cfg) if cfg.train.monitor_every_epochs else None
    epoch = start_epoch - 1
    while (epoch := epoch + 1) * steps_per_epoch < total_steps:
        in_epoch = start_in_epoch if epoch == start_epoch else 0
        epoch_steps = min(steps_per_epoch, total_steps - epoch * steps_per_epoch)
        if in_epoch >= epoch_steps:
            continue
        stream.set_epoch(epoch, in_epoch)
        objective.train()
        bar = tqdm(total=epoch_steps, initial=in_epoch, desc=f"epoch {epoch + 1}/{epochs}", disable=not show,
                   unit="step", mininterval=2.0)
        for batch in loader:
            if in_epoch >= epoch_steps:
                break
            health.add(batch)
            progress = Progress(step, total_steps)
            current_lr = set_lr(optimizer, step, total_steps, warmup_steps)
            inputs = to_input(batch)
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                out = step_fn(inputs, progress)
            loss = out["loss"]
            bad = ~torch.isfinite(loss.detach())
            if world_size() > 1:  # one rank's NaN reaches every rank's gradients through the all-reduce
                bad = bad.to(torch.int32)
                dist.all_reduce(bad, op=dist.ReduceOp.MAX)
                bad = bad.bool()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.optim.grad_clip:
                nn.utils.clip_grad_norm_(objective.parameters(), cfg.optim.grad_clip)
            optimizer.found_inf = bad.float()  # the optimiser skips a bad step on the device: no host sync
            optimizer.step()
            bad_total += bad
            bad_run = (bad_run + 1) * bad
            worst_run = torch.maximum(worst_run, bad_run)
            step, in_epoch = step + 1, in_epoch + 1
            objective.on_after_step(Progress(step, total_steps))
            images_since += len(batch["labels"]) if "labels" in batch else cfg.data.batch_size
            bar.update(1)
            if not sized and step - first_step == 1:  # the pace is timed without the first step's start-up
                paced_from = time.perf_counter()
            if not sized and step - first_step == SIZING_STEPS + 1:
                now = time.perf_counter()
                total_steps = steps_in_budget(cfg.optim.minutes, now - started, (now - paced_from) / SIZING_STEPS,
                                              step, total_steps)
                sized, epochs = True, math.ceil(total_steps / steps_per_epoch)
                epoch_steps = min(steps_per_epoch, total_steps - epoch * steps_per_epoch)
                bar.total, bar.desc = epoch_steps, f"epoch {epoch + 1}/{epochs}"
                if show:
                    log.info("time budget %.1f min: training for %d steps (%.2f epochs)", cfg.optim.minutes,
                             total_steps, total_steps / steps_per_epoch)
            if step % cfg.train.log_every_steps == 0 or in_epoch == epoch_steps:
                elapsed = time.perf_counter() - timer
                embedding = out.pop("embedding", None)
                last = {k: float(v.detach().float()) for k, v in out.items()}
                if embedding is not None and bool(torch.isfinite(embedding).all()):  # not on a skipped NaN step
                    last.update({k: float(v) for k, v in embedding_stats(embedding).items()})
                    if show:
                        last["collapse_alarms"] = len(collapse.update(step, last, embedding.shape[1]))
                last.update(lr=current_lr, epoch=epoch + in_epoch / epoch_steps,
                            images_per_s=images_since * world_size() / max(elapsed, 1e-9),
                            skipped_samples=health.skipped, bad_steps=int(bad_total))
                reporter.log(step, last)
                if (worst := int(worst_run)) >= cfg.optim.max_bad_steps:
                    raise TooManyBadSteps(f"loss was NaN/inf for {worst} steps in a row by step {step} (limit "
                                          f"optim.max_bad_steps={cfg.optim.max_bad_steps}), each skipped; "
                                          "lower optim.lr, set optim.grad_clip, or check the data")
                bar.set_postfix(loss=f"{last['loss']:.3f}", img_s=f"{last['images_per_s']:.0f}")
                timer, images_since = time.perf_counter(), 0
            if step % cfg.train.checkpoint_every_steps == 0 and in_epoch < epoch_steps:
                write_checkpoint(epoch, in_epoch)
        bar.close()
        if in_epoch < epoch_steps:
            raise RuntimeError(f"epoch {epoch} ended after {in_epoch} of {epoch_steps} steps: the loader ran dry")
        if health.skipped and show:
            log.warning("epoch %d: %d bad samples skipped so far, %d batches topped up; first: %s",
                        epoch + 1, health.skipped, health.repeated, health.where[:3])
        if monitor is not None and monitor.due(epoch + 1):  # every rank logs (Ray's report); rank 0 measures
            reporter.log(step, monitor(objective.encoder) if show else {})
        write_checkpoint(epoch + 1, 0)
    if world_size() > 1:  # the bad samples of every rank, not only rank 0's
        ranks_health = [None] * world_size()
        dist.all_gather_object(ranks_health, health)
        health = DataHealth(sum(h.skipped for h in ranks_health), sum(h.repeated for h in ranks_health),
                            [w for h in ranks_health for w in h.where])
    summary = {"steps": step, "total_steps": total_steps, "epochs": total_steps / steps_per_epoch, "last": last,
               "data": {"skipped": health.skipped, "repeated": health.repeated, "where": health.where},
               "bad_steps": int(bad_total), "checkpoint": str(latest_checkpoint(run_dir))}
    reporter.finish(summary)
    return summary
