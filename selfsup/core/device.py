"""Where, in which memory layout and at which precision a model runs. The choices are pure functions of
the device's properties (``choose_device``, ``amp_dtype``), tested without the device."""

from __future__ import annotations

import ctypes
import logging
import os

import torch

log = logging.getLogger("selfsup.device")


def choose_device(use_gpu: bool, gpus: int, local_rank: int) -> torch.device:
    """``cuda:(local_rank mod gpus)`` when a GPU is asked for and there are ``gpus``, else the CPU."""
    return torch.device("cuda", local_rank % gpus) if use_gpu and gpus else torch.device("cpu")


def pick_device(use_gpu: bool) -> torch.device:
    """This process's training device (its ``LOCAL_RANK``'s GPU), made torch's current CUDA device: NCCL's
    object collectives and every bare "cuda" tensor then use the GPU that DDP uses."""
    device = choose_device(
        use_gpu, torch.cuda.device_count() if torch.cuda.is_available() else 0, int(os.environ.get("LOCAL_RANK", 0))
    )
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes in bf16 natively: a GPU of compute capability 8.0 or more (Ampere on),
    a CPU with AVX-512 BF16 or AMX. Older GPUs emulate it, slower than fp32."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 0)
    return torch.cpu._is_avx512_bf16_supported()


def amp_dtype(precision: str, device_type: str, native: bool) -> torch.dtype | None:
    """The autocast dtype for ``train.precision`` on a ``device_type`` device with or without ``native``
    bf16: None (fp32) when asked for; on CUDA bf16 only where native, else fp32 with one warning; on
    a CPU bf16 when asked for or native ("auto")."""
    if precision == "fp32":
        return None
    if device_type == "cuda":
        if native:
            return torch.bfloat16
        log.warning(
            "train.precision=%s: this GPU has no native bf16 (compute capability below 8.0), training in fp32",
            precision,
        )
        return None
    return torch.bfloat16 if precision == "bf16" or native else None


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """``amp_dtype`` of this ``device``."""
    return amp_dtype(precision, device.type, native_bf16(device))


AVX2_MIN_STRIDED_POINTWISE_CHANNELS = 8  # one AVX2 register of fp32


def memory_format(
    device: torch.device, channels_last: bool = True, module: torch.nn.Module | None = None
) -> torch.memory_format:
    """``torch.channels_last`` when asked for and safe on ``device`` for ``module``, else
    ``torch.contiguous_format``.

    channels_last is safe on CUDA and on CPUs where oneDNN runs its AVX-512 kernels. Its AVX2 kernels
    (torch 2.11, CPUs without AVX-512) corrupt the heap in the backward pass of a strided 1x1
    convolution of few input channels (2 to 7 seen; a ResNet's downsample below width 8): there
    channels_last needs ``module``, and none of its strided 1x1 convolutions under 8 input channels.
    """
    if not channels_last:
        return torch.contiguous_format
    if device.type == "cpu" and not torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
        safe = module is not None and not any(
            isinstance(m, torch.nn.Conv2d)
            and m.kernel_size == (1, 1)
            and m.stride != (1, 1)
            and m.in_channels < AVX2_MIN_STRIDED_POINTWISE_CHANNELS
            for m in module.modules()
        )
        if not safe:
            return torch.contiguous_format
    return torch.channels_last


M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)
GLIBC_DEFAULTS = {M_TRIM_THRESHOLD: 128 * 1024, M_MMAP_MAX: 65536}


def reuse_freed_memory(on: bool) -> bool:
    """``on``: have glibc's malloc keep the memory a CPU training step frees, for the next step to reuse;
    off: glibc's defaults again, and the kept memory given back to the kernel (``malloc_trim``).

    Each step frees and allocates again the same activations. glibc gives a block above its mmap threshold
    (at most 32 MB: a width-32 ResNet-18's activations of both views in one pass are larger) a mapping of
    its own and unmaps it when freed, so its pages fault in and are zeroed by the kernel again every step,
    and it trims the heap's free top back to the kernel. With no mmap (M_MMAP_MAX 0) and no trimming, the
    heap keeps the step's high-water mark and serves the next step from it. Process-wide; returns whether
    it applied (False off glibc)."""
    try:
        libc = ctypes.CDLL(None)
        mallopt, trim = libc.mallopt, libc.malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl)
        return False
    if on:
        return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
    applied = all(mallopt(param, value) for param, value in GLIBC_DEFAULTS.items())
    trim(0)
    return applied


def module_memory_format(module: torch.nn.Module) -> torch.memory_format:
    """The layout ``module``'s 4-D weights are in: ``torch.channels_last`` or ``torch.contiguous_format``
    (a module with none that tells them apart, as an audio encoder: contiguous). A weight with one
    input channel or a 1x1 kernel is both, so the first that is only one of them decides."""
    weight = next(
        (
            p
            for p in module.parameters()
            if p.dim() == 4 and p.is_contiguous() != p.is_contiguous(memory_format=torch.channels_last)
        ),
        None,
    )
    channels_last = weight is not None and weight.is_contiguous(memory_format=torch.channels_last)
    return torch.channels_last if channels_last else torch.contiguous_format


def describe_machine(device: torch.device) -> str:
    """The machine a run trains on, for its report: the GPU's name, or the CPU's model, the threads
    torch uses and its vector capability (``AMD EPYC, 2 threads, AVX2``)."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    model = "CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:  # not Linux
        import platform

        model = platform.processor() or model
    threads = torch.get_num_threads()
    return (
        f"{model}, {threads} thread{'s' if threads != 1 else ''}, {torch.backends.cpu.get_cpu_capability()}, "
        f"torch {torch.__version__}"
    )
