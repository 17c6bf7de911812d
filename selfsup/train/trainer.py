"""The per-rank training loop: plain PyTorch, the same with or without Ray.

``Trainer(cfg, reporter, resume_from).fit()`` builds the objective of ``cfg``'s task (``data.kind``),
reads its shards and trains it with AMP, the LR schedule, momentum/EMA updates and atomic
checkpoints, resuming from the checkpoint ``resume_from`` (weights, optimiser, step, epoch, position
in the epoch, RNG) when one is given. ``step(batch)`` is one optimiser step, the one that
``benchmarks/throughput.py`` times. Records, checkpoints and the summary go to a
``selfsup.core.reporter.Reporter``; which sinks (files, Ray, W&B) is the caller's choice.
"""

from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.profiler import record_function

from selfsup.config import ExperimentConfig
from selfsup.core.checkpoint import (
    CheckpointSpaceError,
    CheckpointWriter,
    TrainState,
    checkpoint_name,
    load_checkpoint,
    rng_state,
    set_rng_state,
    tidy_checkpoints,
)
from selfsup.core.collapse import embedding_stats
from selfsup.core.device import autocast_dtype, describe_machine, memory_format, pick_device, reuse_freed_memory
from selfsup.core.distributed import convert_sync_batchnorm, rank, world_size
from selfsup.core.fence import LeaseLost, fenced
from selfsup.core.objective import Objective, Progress
from selfsup.core.reporter import Reporter
from selfsup.data.stream import DataHealth, make_loader
from selfsup.eval.online import OnlineMonitor
from selfsup.tasks import task_for
from selfsup.train.budget import TimeBudget
from selfsup.train.optim import build_optimizer, prime_state, scaled_lr, set_lr
from selfsup.train.threads import ThreadTuner

log = logging.getLogger("selfsup.pretrain")


class TooManyBadSteps(RuntimeError):
    """The loss was NaN or inf for too many steps in a row."""


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


class BadSteps:
    """NaN/inf steps, counted on the device: all of them, the current run and the longest run. They are
    read at logging steps only (a check every step would make the host wait for the GPU each step)."""

    def __init__(self, device: torch.device):
        self.total, self.run, self.worst = (torch.zeros((), dtype=torch.long, device=device) for _ in range(3))

    def add(self, bad: torch.Tensor) -> None:
        """``bad``: 0-d bool, True when this step was skipped."""
        self.total += bad
        self.run = (self.run + 1) * bad
        self.worst = torch.maximum(self.worst, self.run)

    def check(self, step: int, limit: int) -> None:
        if (worst := int(self.worst)) >= limit:
            raise TooManyBadSteps(
                f"loss was NaN/inf for {worst} steps in a row by step {step} (limit "
                f"optim.max_bad_steps={limit}), each skipped; "
                "lower optim.lr, set optim.grad_clip, or check the data"
            )


class Throughput:
    """Samples (images, clips) per second, over all ranks, since the last ``restart()``."""

    def __init__(self):
        self.restart()

    def restart(self) -> None:
        self.since, self.samples = time.perf_counter(), 0

    def add(self, samples: int) -> None:
        self.samples += samples

    def rate(self) -> float:
        return self.samples * world_size() / max(time.perf_counter() - self.since, 1e-9)


class Trainer:
    """Trains ``cfg``'s objective on this rank (one Trainer per rank; DDP when there are several).

    ``resume_from``: a checkpoint directory to continue from, or None to start afresh. ``staging``:
    where rank 0 writes each checkpoint for the reporter to persist (Ray's checkpoint storage), or
    None to write them into the run folder itself (atomically, pruned to ``train.keep_checkpoints``).
    ``fence``: the run lease's (``selfsup.train.lease.Fence``), which every write into the run passes
    and which stops the loop once the lease is another driver's; None without a lease.
    """

    def __init__(
        self,
        cfg: ExperimentConfig,
        reporter: Reporter,
        resume_from: Path | None,
        staging: Path | None = None,
        fence=None,
    ):
        self.cfg, self.reporter, self.fence = cfg, reporter, fence
        self.writer = CheckpointWriter.for_run(cfg, fence, staging)
        seed_everything(cfg.seed + rank(), cfg.deterministic)
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        self.device = pick_device(cfg.scaling.use_gpu)
        if self.device.type == "cpu":  # until fit() ends
            reuse_freed_memory(True)
        task = task_for(cfg)
        self.objective = self._place(task.build_objective(cfg))
        self.health = DataHealth()
        self.stream, self.to_input = task.train_stream(cfg), task.input_fn(cfg, self.device, self.health)
        self.monitors = self.objective.health_monitors() if rank() == 0 else []
        self.base_lr = scaled_lr(
            cfg.optim.lr, cfg.data.batch_size * world_size(), cfg.optim.reference_batch, cfg.optim.lr_scaling
        )
        self.optimizer = build_optimizer(self.objective.param_groups(), cfg.optim, self.base_lr)
        self.steps_per_epoch = self.stream.steps_per_epoch()
        self.total_steps, self.warmup_steps = cfg.optim.schedule_steps(self.steps_per_epoch)
        self.steps_done, self.start_epoch, self.start_in_epoch = 0, 0, 0
        self.samples_seen, self.checkpoints_written = 0, 0
        self.checkpoint: str | None = None  # the name of the checkpoint written (or resumed from) last
        self.last: dict[str, float] = {}  # the record logged last
        self.sized_total = 0  # the total steps a time budget fixed (0: not sized)
        self.seconds_before, self.fit_started = (
            0.0,
            time.perf_counter(),
        )  # wall time of earlier attempts; this one's start
        if rank() == 0:
            with fenced(fence):  # what interrupted writes and prunes left
                tidy_checkpoints(cfg.run_dir)
        if resume_from is not None:
            self._resume(resume_from)
        self.model = self._wrap(self.objective)
        self.amp = autocast_dtype(cfg.train.precision, self.device)
        self.loader = make_loader(self.stream, cfg.data.loader_workers)
        self.bad = BadSteps(self.device)
        self.current_lr = self.base_lr
        self.online = OnlineMonitor(cfg) if cfg.train.monitor_every_epochs else None
        self.threads = (
            ThreadTuner(torch.get_num_threads()) if cfg.train.adapt_threads and self.device.type == "cpu" else None
        )

    def _place(self, objective: Objective) -> Objective:
        """``objective`` on this rank's device; SyncBN if it asks for it and there are several ranks."""
        module = cast(nn.Module, objective)  # every objective is an nn.Module
        if world_size() > 1 and objective.sync_batchnorm:
            module = convert_sync_batchnorm(module, self.device)
        module.to(self.device)
        layout = memory_format(self.device, self.cfg.train.channels_last, module)
        module.to(memory_format=layout)  # type: ignore[call-overload]  # accepted, though torch's stubs lack it
        return cast(Objective, module)

    def _wrap(self, objective: Objective) -> nn.Module:
        """DDP across ranks (searching for parameters without gradients if the objective says some may
        have none), then ``torch.compile`` if configured."""
        model = cast(nn.Module, objective)
        if world_size() > 1:
            model = nn.parallel.DistributedDataParallel(
                model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=objective.find_unused_parameters,
                broadcast_buffers=False,
            )
        return cast(nn.Module, torch.compile(model)) if self.cfg.train.compile else model

    def _resume(self, path: Path) -> None:
        """Weights, optimiser, position and RNG from the checkpoint at ``path``. One written by another
        number of ranks resumes at the same sample of its epoch, with this world size's steps and LR."""
        _, model_state, state = load_checkpoint(path, with_state=True)
        assert state is not None  # with_state
        self.objective.load_state_dict(model_state)
        self.optimizer.load_state_dict(state.optimizer)
        prime_state(self.optimizer)  # this run's memory format, as the fused kernels need
        for group in self.optimizer.param_groups:  # this world size's LR, not the saved one (elastic runs resize)
            group["base_lr"] = self.base_lr
        self.steps_done, self.start_epoch, self.start_in_epoch = state.step, state.epoch, state.step_in_epoch
        self.samples_seen, self.checkpoints_written = state.samples_seen, state.checkpoints_written
        self.seconds_before = state.train_seconds
        self.checkpoint = path.name  # the final weights and last record, should no step remain
        self.last = json.loads((path / "metrics.json").read_text())
        if state.sized_total_steps:
            self.total_steps = self.sized_total = state.sized_total_steps
        saved_ranks = len(state.rng)
        if saved_ranks != world_size():  # the same place in the epoch, in this size's steps; the batches of
            batches = self.start_in_epoch * saved_ranks  # a part step it cannot express are trained again
            self.start_in_epoch = batches // world_size()
            self.samples_seen -= (batches - self.start_in_epoch * world_size()) * self.cfg.data.batch_size
            self.steps_done = self.start_epoch * self.steps_per_epoch + self.start_in_epoch
        set_rng_state(state.rng[rank()] if rank() < saved_ranks else state.rng[0])
        log.info("resumed %s from %s (step %d)", self.cfg.name, path, self.steps_done)

    def step(self, batch: dict) -> dict[str, torch.Tensor]:
        """One optimiser step on ``batch`` (a dict of CPU tensors from the stream); returns the
        objective's outputs (``"loss"``, detached metrics, maybe ``"embedding"``), unread.

        A NaN/inf loss on any rank skips the step on every rank, decided on the device through the
        optimiser's ``found_inf``: nothing here waits for the GPU. Its phases are profiler regions ("views",
        "forward" with "loss" inside it, "backward", "optimiser", "on_after_step"), which cost nothing
        unless a profiler runs (``benchmarks/vs_lightly.py`` prints them).
        """
        self.current_lr = set_lr(
            self.optimizer,
            self.steps_done,
            self.total_steps,
            self.warmup_steps,
            self.cfg.optim.decay,
            self.cfg.optim.weight_decay_end,
        )
        with record_function("views"):
            inputs = self.to_input(batch)
        with record_function("forward"), torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
            out = self.model(inputs, Progress(self.steps_done, self.total_steps, self.steps_per_epoch))
        loss = out["loss"]
        bad = ~torch.isfinite(loss.detach())
        if world_size() > 1:  # one rank's NaN reaches every rank's gradients through the all-reduce
            bad = bad.to(torch.int32)
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
            bad = bad.bool()
        with record_function("backward"):
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
        with record_function("optimiser"):
            if self.cfg.optim.grad_clip:
                nn.utils.clip_grad_norm_(self.objective.parameters(), self.cfg.optim.grad_clip)
            self.objective.on_gradients(Progress(self.steps_done, self.total_steps, self.steps_per_epoch))
            # the fused optimiser skips a bad step on the device, no host sync (an attribute torch's stubs lack)
            self.optimizer.found_inf = bad.float()  # type: ignore[attr-defined]
            self.optimizer.step()
        self.bad.add(bad)
        self.steps_done += 1
        with record_function("on_after_step"):
            self.objective.on_after_step(Progress(self.steps_done, self.total_steps, self.steps_per_epoch), ~bad)
        return out

    def fit(self) -> dict:
        """Train to the end of the plan (or of the time budget); returns the summary given to the reporter."""
        minutes = self.cfg.optim.minutes
        self.budget = (
            None
            if not minutes or self.sized_total
            else TimeBudget(
                minutes, self.total_steps, self.steps_done, time.perf_counter(), self.cfg.optim.reserve_steps
            )
        )
        self.throughput, self.fit_started = Throughput(), time.perf_counter()
        epoch = self.start_epoch
        try:
            while epoch * self.steps_per_epoch < self.total_steps:
                self._run_epoch(epoch)
                epoch += 1
        finally:  # evaluation after training (the demo's) gets glibc's own malloc back
            if self.device.type == "cpu":
                reuse_freed_memory(False)
        return self._finish()

    def _epoch_steps(self, epoch: int) -> int:
        return min(self.steps_per_epoch, self.total_steps - epoch * self.steps_per_epoch)

    def _run_epoch(self, epoch: int) -> None:
        """The steps of ``epoch`` from the resumed position (or its start), then its end."""
        in_epoch = self.start_in_epoch if epoch == self.start_epoch else 0
        if in_epoch >= self._epoch_steps(epoch):
            return
        self.stream.set_epoch(epoch, in_epoch)
        self.objective.train()
        for batch in self.loader:
            if in_epoch >= self._epoch_steps(epoch):
                break
            self.health.add(batch)
            out = self.step(batch)
            in_epoch += 1
            images = len(batch["labels"]) if "labels" in batch else self.cfg.data.batch_size
            self.samples_seen += images * world_size()
            self.throughput.add(images)
            self._after_step(out, epoch, in_epoch)
        self._end_epoch(epoch, in_epoch)

    def _after_step(self, out: dict, epoch: int, in_epoch: int) -> None:
        """The lease, the thread count, the time budget, the logging step and the checkpoint interval,
        after step ``in_epoch`` of ``epoch``."""
        self._check_lease()
        if self.threads is not None:
            self.threads.update(time.perf_counter())
        trial = self.threads is not None and self.threads.trial_step
        if self.budget is not None and (total := self.budget.update(self.steps_done, time.perf_counter(), not trial)):
            if rank() == 0 and not self.sized_total:
                log.info(
                    "time budget %.1f min: about %d steps (%.2f epochs) at this pace, re-fitted as it changes",
                    self.cfg.optim.minutes,
                    total,
                    total / self.steps_per_epoch,
                )
            self.total_steps = self.sized_total = total
        epoch_steps = self._epoch_steps(epoch)
        if self.steps_done % self.cfg.train.log_every_steps == 0 or in_epoch == epoch_steps:
            self._log(out, epoch + in_epoch / self.steps_per_epoch)
        if self.steps_done % self.cfg.train.checkpoint_every_steps == 0 and in_epoch < epoch_steps:
            self._checkpoint(epoch, in_epoch)

    def _check_lease(self) -> None:
        """Raise LeaseLost once the run's lease is another driver's. One rank checks every step (a
        stat). Several agree every ``train.log_every_steps`` steps, where logging reads the device
        anyway, so that they stop together: one rank stopping alone would leave the others waiting."""
        if self.fence is None:
            return
        if world_size() == 1:
            self.fence.check()
            return
        if self.steps_done % self.cfg.train.log_every_steps:
            return
        try:
            self.fence.check()
            lost = torch.zeros((), dtype=torch.int32, device=self.device)
        except LeaseLost:
            lost = torch.ones((), dtype=torch.int32, device=self.device)
        dist.all_reduce(lost, op=dist.ReduceOp.MAX)
        if int(lost):
            raise LeaseLost(
                self.fence.lost
                or f"the lease of {self.fence.location} was taken over; this "
                "driver stopped and wrote nothing more (the run goes on under its new driver)"
            )

    def _log(self, out: dict, epoch: float) -> None:
        """Report this step's record: the objective's metrics, the collapse statistics of its embedding
        (when finite), LR, epoch, throughput, data and bad steps, and on rank 0 the alarm count of each
        health monitor. Raises TooManyBadSteps when the limit of bad steps in a row is reached."""
        samples_per_s = self.throughput.rate()
        embedding = out.pop("embedding", None)
        record = {k: float(v.detach().float()) for k, v in out.items()}
        if embedding is not None and bool(torch.isfinite(embedding).all()):  # not on a skipped NaN step
            record.update({k: float(v) for k, v in embedding_stats(embedding).items()})
        record.update(
            samples=self.samples_seen,
            lr=self.current_lr,
            epoch=epoch,
            samples_per_s=samples_per_s,
            total_steps=self.total_steps,
            epochs=self.total_steps / self.steps_per_epoch,
            train_seconds=self.train_seconds(),
            skipped_samples=self.health.skipped,
            duplicate_samples=self.health.duplicates,
            unknown_members=self.health.unknown,
            decode_fallbacks=self.health.decode_fallbacks,
            decode_failed=self.health.decode_failed,
            bad_steps=int(self.bad.total),
        )
        for monitor in self.monitors:
            record[f"{monitor.name}_alarms"] = len(monitor.update(self.steps_done, record))
        self.last = record
        self.reporter.log(self.steps_done, record)
        self.bad.check(self.steps_done, self.cfg.optim.max_bad_steps)
        self.throughput.restart()

    def train_seconds(self) -> float:
        """Wall time spent training this run, over all its attempts."""
        return self.seconds_before + time.perf_counter() - self.fit_started

    def _end_epoch(self, epoch: int, in_epoch: int) -> None:
        """Check the epoch ran to its end; warn of bad samples; the online monitor; the epoch's checkpoint."""
        if in_epoch < (epoch_steps := self._epoch_steps(epoch)):
            raise RuntimeError(f"epoch {epoch} ended after {in_epoch} of {epoch_steps} steps: the loader ran dry")
        if (health := self.health.summary()) and rank() == 0:
            log.warning("epoch %d, so far: %s", epoch + 1, health)
        if self.online is not None and (self.online.due(epoch + 1) or self.steps_done >= self.total_steps):
            record: list[dict | None] = [
                {
                    "samples": self.samples_seen,
                    "epoch": epoch + in_epoch / self.steps_per_epoch,
                    "train_seconds": self.train_seconds(),
                    **self.online(self.objective.encoder),
                }
                if rank() == 0
                else None
            ]
            if world_size() > 1:  # every rank reports the same record
                dist.broadcast_object_list(record)
            assert record[0] is not None  # rank 0's, broadcast
            self.reporter.log(self.steps_done, record[0])
        self._checkpoint(epoch + 1, 0)

    def _checkpoint(self, epoch: int, in_epoch: int) -> None:
        """Rank 0 writes the checkpoint of this position, with every rank's RNG; every rank reports it
        (the other ranks with path None). Not enough space, or a lost lease, stops every rank with one line."""
        rngs: list[Any] = [None] * world_size()
        if world_size() > 1:
            dist.all_gather_object(rngs, rng_state())
        else:
            rngs = [rng_state()]
        path = None
        error: list[BaseException | None] = [None]
        if rank() == 0:
            try:
                if self.fence is not None:
                    self.fence.check()
                path = self._write_checkpoint(epoch, in_epoch, rngs)
            except (CheckpointSpaceError, LeaseLost) as err:
                error = [err]
        if world_size() > 1:
            dist.broadcast_object_list(error)
        if error[0] is not None:
            raise error[0]
        self.checkpoints_written += 1
        self.checkpoint = checkpoint_name(self.samples_seen)
        self.reporter.checkpoint(self.steps_done, path, self.last)
        if world_size() > 1:
            dist.barrier()

    def _write_checkpoint(self, epoch: int, in_epoch: int, rngs: list) -> Path:
        """The checkpoint of this position, written by the run's :class:`CheckpointWriter`."""
        state = TrainState(
            optimizer=self.optimizer.state_dict(),
            step=self.steps_done,
            epoch=epoch,
            step_in_epoch=in_epoch,
            samples_seen=self.samples_seen,
            checkpoints_written=self.checkpoints_written + 1,
            rng=rngs,
            sized_total_steps=self.sized_total,
            train_seconds=self.train_seconds(),
        )
        return self.writer.write(
            self.objective.state_dict(), state, self.cfg, self.last, self.checkpoint_bytes_estimate()
        )

    def checkpoint_bytes_estimate(self) -> int:
        """About the size of a checkpoint: the parameters, buffers and optimiser state in memory."""
        tensors = [*self.objective.state_dict().values()]
        tensors += [v for s in self.optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
        return sum(v.numel() * v.element_size() for v in tensors if torch.is_tensor(v))

    def checkpoint_location(self) -> str | None:
        """Where the checkpoint written last lives: under the run folder, or the run's bucket."""
        if self.checkpoint is None:
            return None
        return (
            f"{self.cfg.run_url}/checkpoints/{self.checkpoint}"
            if self.cfg.run_url
            else str(self.cfg.run_dir / "checkpoints" / self.checkpoint)
        )

    def _finish(self) -> dict:
        """The run's summary, with the bad samples of every rank; sent to the reporter's ``finish``."""
        health = self.health
        if world_size() > 1:
            ranks_health: list[Any] = [None] * world_size()
            dist.all_gather_object(ranks_health, health)
            health = DataHealth.merge(ranks_health)
        summary = {
            "steps": self.steps_done,
            "total_steps": self.total_steps,
            "epochs": self.total_steps / self.steps_per_epoch,
            "last": self.last,
            "data": health.as_dict(),
            "samples_seen": self.samples_seen,
            "bad_steps": int(self.bad.total),
            "train_seconds": self.train_seconds(),
            "precision": "bf16" if self.amp == torch.bfloat16 else "fp32",
            "machine": describe_machine(self.device),
            "world_size": world_size(),
            "threads": torch.get_num_threads(),
            "checkpoint": self.checkpoint_location(),
        }
        self.reporter.finish(summary)
        return summary
