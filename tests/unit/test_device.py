"""The memory layout: channels_last where it is safe, contiguous on CPUs whose oneDNN runs AVX2 kernels."""

from __future__ import annotations

import torch

from selfsup.core.device import memory_format


def test_channels_last_only_where_safe(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert memory_format(cpu) is torch.channels_last
    assert memory_format(cpu, channels_last=False) is torch.contiguous_format
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert memory_format(cpu) is torch.contiguous_format  # its backward of small strided 1x1 convs corrupts the heap
    assert memory_format(torch.device("cuda", 0)) is torch.channels_last
