"""Where and in which memory layout a model runs."""

from __future__ import annotations

import torch


def memory_format(device: torch.device, channels_last: bool = True) -> torch.memory_format:
    """``torch.channels_last`` when asked for and safe on ``device``, else ``torch.contiguous_format``.

    channels_last is used on CUDA and on CPUs where oneDNN runs its AVX-512 kernels. Its AVX2 kernels
    (torch 2.11, CPUs without AVX-512) corrupt the heap in the backward pass of strided 1x1
    convolutions with few channels (a ResNet's downsample at width 4), so those CPUs stay contiguous.
    """
    safe = device.type != "cpu" or torch.backends.cpu.get_cpu_capability().startswith("AVX512")
    return torch.channels_last if channels_last and safe else torch.contiguous_format
