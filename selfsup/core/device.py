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


def module_memory_format(module: torch.nn.Module) -> torch.memory_format:
    """The layout ``module``'s 4-D weights are in: ``torch.channels_last`` or ``torch.contiguous_format``
    (a module with none that tells them apart, as an audio encoder: contiguous). A weight with one
    input channel or a 1x1 kernel is both, so the first that is only one of them decides."""
    weight = next((p for p in module.parameters() if p.dim() == 4
                   and p.is_contiguous() != p.is_contiguous(memory_format=torch.channels_last)), None)
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
    return (f"{model}, {threads} thread{'s' if threads != 1 else ''}, {torch.backends.cpu.get_cpu_capability()}, "
            f"torch {torch.__version__}")
