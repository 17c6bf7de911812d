"""The device, as functions of its properties: channels_last where it is safe (on CPUs whose oneDNN runs
AVX2 kernels, only for models without a strided 1x1 convolution of few channels), each rank's GPU made
current, bf16 only where it is native."""

from __future__ import annotations

import logging
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from selfsup.core.device import amp_dtype, autocast_dtype, choose_device, memory_format, native_bf16, pick_device
from selfsup.vision.backbones import build_backbone

ROOT = Path(__file__).resolve().parents[2]


def _resnet18(width: int) -> torch.nn.Module:
    return build_backbone("resnet18", width, 1, True, 28, 1)[0]


def test_channels_last_only_where_safe(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert memory_format(cpu) is torch.channels_last
    assert memory_format(cpu, channels_last=False) is torch.contiguous_format
    assert memory_format(cpu, True, _resnet18(4)) is torch.channels_last
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert memory_format(cpu) is torch.contiguous_format  # no model to judge
    assert memory_format(cpu, True, _resnet18(8)) is torch.channels_last
    assert memory_format(cpu, False, _resnet18(8)) is torch.contiguous_format
    for width in (4, 7):  # layer2's downsample: a 1x1 stride-2 conv of `width` input channels
        assert memory_format(cpu, True, _resnet18(width)) is torch.contiguous_format
    assert memory_format(cpu, True, torch.nn.Conv2d(4, 8, 1, stride=1)) is torch.channels_last
    assert memory_format(cpu, True, torch.nn.Conv2d(16, 4, 1, stride=2)) is torch.channels_last
    assert memory_format(torch.device("cuda", 0)) is torch.channels_last


AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MALLOC_CHECK_": "3"}
LAYOUT_STEPS = """
import sys, torch
from selfsup.core.device import memory_format
from selfsup.vision.backbones import build_backbone
torch.set_num_threads(1)
net = build_backbone("resnet18", int(sys.argv[1]), 1, True, 28, 1)[0]
layout = memory_format(torch.device("cpu"), True, net) if sys.argv[2] == "chosen" else torch.channels_last
net = net.to(memory_format=layout)
x = torch.randn(64, 1, 28, 28).contiguous(memory_format=layout)
for _ in range(3):
    net(x).square().mean().backward()
print(torch.backends.cpu.get_cpu_capability(), layout)
"""


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="oneDNN's AVX2 kernels are x86's")
def test_the_layout_chosen_on_avx2_trains_where_channels_last_would_corrupt_the_heap():
    def steps(width: int, layout: str) -> subprocess.CompletedProcess:
        env = {**os.environ, **AVX2, "PYTHONPATH": str(ROOT)}
        code = [sys.executable, "-c", LAYOUT_STEPS, str(width), layout]
        return subprocess.run(code, env=env, capture_output=True, text=True, timeout=300)

    forced = steps(4, "channels_last")
    assert forced.returncode != 0, "channels_last at width 4 ran clean on AVX2: the rule may be lifted"
    for width, layout in ((4, "torch.contiguous_format"), (8, "torch.channels_last")):
        chosen = steps(width, "chosen")
        assert chosen.returncode == 0, chosen.stderr[-2000:]
        assert chosen.stdout.split() == ["AVX2", layout]


def test_each_rank_takes_its_local_gpu_and_makes_it_current(monkeypatch):
    assert choose_device(True, 4, 6) == torch.device("cuda", 2)
    assert choose_device(True, 0, 0) == torch.device("cpu")  # asked for, none there
    assert choose_device(False, 8, 3) == torch.device("cpu")
    made_current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", made_current.append)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert pick_device(True) == torch.device("cuda", 1) and made_current == [torch.device("cuda", 1)]
    assert pick_device(False) == torch.device("cpu") and len(made_current) == 1


def test_bf16_only_where_the_device_computes_it_natively(caplog):
    with caplog.at_level(logging.WARNING, logger="selfsup.device"):
        assert amp_dtype("auto", "cuda", native=True) is torch.bfloat16  # A100, H100
        assert amp_dtype("bf16", "cuda", native=True) is torch.bfloat16
        assert caplog.records == []
        assert amp_dtype("auto", "cuda", native=False) is None  # V100, T4: fp32, said once
        assert [r.getMessage() for r in caplog.records] == [
            "train.precision=auto: this GPU has no native bf16 (compute capability below 8.0), training in fp32"
        ]
        assert amp_dtype("bf16", "cuda", native=False) is None
        assert amp_dtype("fp32", "cuda", native=True) is None
        assert amp_dtype("auto", "cpu", native=True) is torch.bfloat16  # AVX-512 BF16 / AMX
        assert amp_dtype("auto", "cpu", native=False) is None
        assert amp_dtype("bf16", "cpu", native=False) is torch.bfloat16  # asked for: emulated, but exact bf16
        assert len(caplog.records) == 2


def test_native_bf16_reads_the_compute_capability(monkeypatch):
    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (7, 5))
    assert not native_bf16(gpu) and autocast_dtype("auto", gpu) is None
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (9, 0))
    assert native_bf16(gpu) and autocast_dtype("auto", gpu) is torch.bfloat16


STEPS = """
import json, resource, sys, torch
from selfsup.core.device import reuse_freed_memory
torch.manual_seed(0)
torch.set_num_threads(1)

def rss_mb():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 >> 20

model = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU())
x = torch.randn(1024, 1, 32, 32)  # activations of 32 MiB each: above glibc's largest mmap threshold

def step():  # (page faults, resident MB after it)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    model(x).square().mean().backward()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, rss_mb()

applied = reuse_freed_memory(True) if sys.argv[1] == "reuse" else None
out = {"applied": applied, "steps": [step() for _ in range(16)]}
if applied:
    out["released"] = reuse_freed_memory(False)
    out["after"] = step()
print(json.dumps(out))
"""


def test_freed_memory_is_reused_until_released():
    """A training step's 32 MiB activations: by default glibc maps each afresh, and every step faults their
    pages in again; told to keep freed memory, the heap grows to the step's size over the first steps (how
    many varies from run to run: 3 to 7 seen) and then most steps fault no page in; released, the memory
    goes back to the kernel (own processes: the setting is process-wide)."""
    import json
    import subprocess
    import sys

    def run(mode: str) -> dict:
        out = subprocess.run([sys.executable, "-c", STEPS, mode], capture_output=True, text=True, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    reused, default = run("reuse"), run("default")
    assert reused["applied"] is True and reused["released"] is True
    kept = [f for f, _ in reused["steps"][8:]]  # page faults per step once the heap has grown to the step's size
    mapped = [f for f, _ in default["steps"][8:]]
    assert min(mapped) > 8192  # every step maps its activations afresh (8,192 pages each)
    assert sum(kept) * 10 < sum(mapped)
    assert (
        sum(f < 1000 for f in kept) >= len(kept) * 3 // 4
    )  # most steps fault no page in (the heap grows now and then)
    assert reused["after"][0] > 8192  # released: mapped afresh again
    assert reused["after"][1] < reused["steps"][-1][1]  # and the kept heap given back
