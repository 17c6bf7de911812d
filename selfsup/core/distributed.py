"""Cross-rank helpers: all-gathers with and without gradient, a sum with gradient, the world size, and
BatchNorm over the batch of every rank (``convert_sync_batchnorm``) that also works on CPU process groups
(gloo)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def world_size() -> int:
    """Number of ranks in the default process group (1 when not distributed)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank in the default process group (0 when not distributed)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (B, ...) from every rank into (world*B, ...); gradients flow back to each rank."""
    if world_size() == 1:
        return x
    return torch.cat(dist_fn.all_gather(x), dim=0)


def sum_with_grad(x: torch.Tensor) -> torch.Tensor:
    """The sum of ``x`` over every rank (``x`` itself on one rank); its backward sums the gradients of
    every rank, so after DDP's average each rank holds the gradient of the global sum."""
    if world_size() == 1:
        return x
    return dist_fn.all_reduce(x)


@torch.no_grad()
def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (B, ...) from every rank into (world*B, ...), without gradient."""
    if world_size() == 1:
        return x
    out = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out, dim=0)


@torch.no_grad()
def broadcast_from_first(x: torch.Tensor) -> torch.Tensor:
    """Rank 0's ``x`` on every rank (``x`` itself on one rank)."""
    if world_size() > 1:
        dist.broadcast(x, src=0)
    return x


@torch.no_grad()
def share_of_mean(x: torch.Tensor) -> torch.Tensor:
    """This rank's ``x`` (0-d, > 0) over the mean of ``x`` across ranks: exactly 1 on one rank."""
    if world_size() == 1:
        return torch.ones_like(x)
    total = x.clone()
    dist.all_reduce(total)
    return x * world_size() / total


class GlobalBatchNorm(_BatchNorm):
    """BatchNorm whose training statistics are those of the batch of every rank, on any device.

    torch's ``nn.SyncBatchNorm`` has CUDA kernels only; this is its CPU counterpart for gloo groups
    (input (N, C, ...)). One autograd all-reduce of the per-channel sum, sum of squares and count
    gives the global mean and biased variance used to normalise; its backward sums the gradients of
    every rank, as SyncBatchNorm's does. Running statistics follow BatchNorm's update (unbiased
    variance over the global count). Evaluation and single-rank training are plain BatchNorm.
    Same parameters, buffers and state_dict keys as the BatchNorm it replaces.
    """

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected input of at least 2 dimensions (N, C, ...), got {x.dim()}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if world_size() == 1 or (not self.training and self.track_running_stats):
            return super().forward(x)
        xs = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        dims = [0, *range(2, x.dim())]
        count = xs.new_full((1,), xs.numel() / xs.shape[1])
        total = dist_fn.all_reduce(torch.cat([xs.sum(dims), (xs * xs).sum(dims), count]))
        c = self.num_features
        n = total[2 * c]
        mean = total[:c] / n
        var = (total[c : 2 * c] / n - mean * mean).clamp(min=0)  # biased, as BatchNorm normalises
        if self.training and self.track_running_stats:
            self._update_running_stats(mean.detach(), var.detach(), n)
        shape = (1, c) + (1,) * (x.dim() - 2)
        y = (xs - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, n: torch.Tensor) -> None:
        assert self.num_batches_tracked is not None and self.running_mean is not None  # tracking: see forward
        assert self.running_var is not None
        self.num_batches_tracked.add_(1)
        factor = self.momentum if self.momentum is not None else 1.0 / self.num_batches_tracked
        unbiased = var * n / (n - 1).clamp(min=1)
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
        self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)


def _to_global_batchnorm(module: nn.Module) -> nn.Module:
    """``module`` with every BatchNorm replaced by a GlobalBatchNorm sharing its parameters and buffers."""
    if isinstance(module, _BatchNorm) and not isinstance(module, GlobalBatchNorm):
        new = GlobalBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats
        )
        if module.affine:
            new.weight, new.bias = module.weight, module.bias
        if module.track_running_stats:
            new.running_mean, new.running_var = module.running_mean, module.running_var
            new.num_batches_tracked = module.num_batches_tracked
        return new.train(module.training)
    for name, child in module.named_children():
        module.add_module(name, _to_global_batchnorm(child))
    return module


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """``module`` with BatchNorm over the global batch: torch's SyncBatchNorm on CUDA, GlobalBatchNorm
    elsewhere (SyncBatchNorm refuses CPU tensors). Parameters, buffers and state_dict keys are kept."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return _to_global_batchnorm(module)
