"""One command for a GPU machine: everything the CPU cannot prove, measured in one run, written to one JSON.

    make device-carry        # here: .device/ (the wheels the device image lacks, Fashion-MNIST's idx files)
    # there, in the repository root with .device/ carried (see the README, "Checking a GPU machine"):
    pip install --no-index --no-deps .device/wheels/*.whl
    python -m benchmarks.device_check --out device-check.json          # at most 8 minutes on one H100/H200
    python -m benchmarks.device_check --dry --fmnist DIR --out x.json  # the CPU dry mode CI runs (a minute)

Stages, each timed, each recorded even when it fails (its error in one line), in this order:

1. ``cuda_tests``: ``pytest -m cuda`` on the test files that carry the mark: passed, failed, skipped.
2. ``throughput``: SimCLR with a ResNet-50 at 224 px, bf16, channels_last, from ImageNet-like JPEG
   shards made here (``selfsup.data.synthetic``), decoded on the GPU (``data.decode=gpu``), with
   ``torch.compile`` off and on: pairs of views per second, the fraction of wall time the loop waits
   for the loader, and MFU (matmul/conv FLOPs of a step, forward + backward, by torch's
   FlopCounterMode, over 989 TFLOP/s, the H100 SXM's dense bf16 peak).
3. ``fmnist``: SimCLR, MoCo v2, MoCo v3, BYOL and SimSiam, each a few hundred steps of its GPU recipe
   (``configs/<method>-resnet18-fmnist.yaml``) on Fashion-MNIST shards written from the carried idx
   files: images/s, data wait, bad steps, and the online monitor's kNN@20 beside raw
   pixels and random init on the same subset.
4. ``wav2vec2``: training steps of wav2vec 2.0 BASE on random audio (15 s clips): steps/s and the loss.

``--dry`` runs every stage on the CPU at toy sizes (a width-8 ResNet-18 at 32 px, a few steps, a tiny
wav2vec 2.0; the compiled run uses torch.compile's aot_eager backend: inductor would build C++ for
minutes), so that CI runs the same code and it cannot rot; it prints what it would measure.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

from benchmarks.jpeg_views import config as jpeg_config
from benchmarks.jpeg_views import loader_batches, make_data, timed_steps
from benchmarks.throughput import step_flops
from selfsup.cluster.in_process import build_trainer
from selfsup.config import Wav2Vec2Config, load_config
from selfsup.core.device import describe_machine
from selfsup.core.objective import Progress
from selfsup.data.shards import write_shards
from selfsup.data.sources import FASHION_MNIST_CLASSES, fashion_mnist_samples
from selfsup.eval.online import OnlineMonitor

ROOT = Path(__file__).resolve().parents[1]
PEAK = 989e12  # FLOP/s: dense bf16 of an H100 SXM (an H200's is the same)
METHODS = ["simclr", "moco_v2", "moco_v3", "byol", "simsiam"]
CARRIED_FMNIST = ROOT / ".device" / "fashion-mnist"


def sizes(dry: bool) -> dict:
    """What each stage runs at: the device's sizes, or the dry mode's toy ones."""
    if dry:
        return dict(
            jpegs=24,
            jpeg_overrides=[
                "model.backbone=resnet18",
                "model.width=8",
                "data.image_size=32",
                "data.batch_size=4",
                "data.loader_workers=0",
            ],
            steps=2,
            warmup=1,
            fmnist_steps=2,
            fmnist_overrides=["model.width=8", "data.batch_size=16", "data.loader_workers=0"],
            monitor=(32, 16),
            wav2vec2=dict(preset=Wav2Vec2Config.tiny(), batch=2, seconds=1.0, steps=2),
        )
    return dict(
        jpegs=3000,
        jpeg_overrides=["data.image_size=224", "data.batch_size=128", "data.loader_workers=12"],
        steps=30,
        warmup=5,
        fmnist_steps=300,
        fmnist_overrides=["data.loader_workers=4"],
        monitor=(5000, 1000),
        wav2vec2=dict(preset=Wav2Vec2Config.base(), batch=8, seconds=15.0, steps=10),
    )


@contextlib.contextmanager
def compile_backend(dry: bool):
    """torch.compile as the Trainer calls it: inductor on the device, aot_eager in the dry mode."""
    real = torch.compile
    if dry:
        torch.compile = functools.partial(real, backend="aot_eager")
    try:
        yield
    finally:
        torch.compile = real


def cuda_tests(args, scratch: Path) -> dict:
    """``pytest -m cuda`` over the test files that carry the mark."""
    files = sorted(
        str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("test_*.py") if "mark.cuda" in p.read_text()
    )
    report = scratch / "cuda-tests.xml"
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-m",
        "cuda",
        "-q",
        "-p",
        "no:cacheprovider",
        f"--junitxml={report}",
        *files,
    ]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    suite = ET.parse(report).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    failed = [
        f"{case.get('classname')}.{case.get('name')}"
        for case in suite.iter("testcase")
        if case.find("failure") is not None or case.find("error") is not None
    ]
    return {
        "files": files,
        "passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
        "failed": counts["failures"] + counts["errors"],
        "skipped": counts["skipped"],
        "failures": failed,
        "exit_code": done.returncode,
        "tail": done.stdout.strip().splitlines()[-1:],
    }


def throughput(args, scratch: Path) -> dict:
    """SimCLR from JPEG shards, decoded on the GPU, compile off and on."""
    s, cuda = sizes(args.dry), torch.cuda.is_available() and not args.dry
    _, shards = make_data(scratch, s["jpegs"], processes=16 if cuda else 1)
    base = [
        *s["jpeg_overrides"],
        f"data.decode={'gpu' if cuda else 'cpu'}",
        f"scaling.use_gpu={cuda}",
        f"train.channels_last={cuda}",
        f"train.precision={'bf16' if cuda else 'fp32'}",
    ]
    device = torch.device("cuda" if cuda else "cpu")
    cfg = jpeg_config(shards, scratch, base)
    flops = step_flops(cfg, device) / cfg.data.batch_size
    out = {
        "model": f"{cfg.model.backbone} @ {cfg.data.image_size} px",
        "batch": cfg.data.batch_size,
        "decode": cfg.data.decode,
        "gflop_per_pair": flops / 1e9,
        "peak_tflops": PEAK / 1e12,
        "runs": {},
    }
    for compiled in (False, True):
        with compile_backend(args.dry):
            trainer = build_trainer(jpeg_config(shards, scratch, [*base, f"train.compile={compiled}"]))
            pairs, wait = timed_steps(trainer, loader_batches(trainer), s["steps"], s["warmup"] + 3 * compiled)
        out["runs"]["compile on" if compiled else "compile off"] = {
            "pairs_per_s": pairs,
            "data_wait": wait,
            "mfu": flops * pairs / PEAK,
            "decode_fallbacks": trainer.health.decode_fallbacks,
            "bad_steps": int(trainer.bad.total),
        }
    return out


def fmnist_shards(folder: Path, scratch: Path) -> Path:
    out = scratch / "fmnist"
    for split in ("train", "test"):
        samples, n = fashion_mnist_samples(split, folder)
        write_shards(
            samples,
            out / split,
            split=split,
            classes=FASHION_MNIST_CLASSES,
            total=n,
            samples_per_shard=10000,
            source=f"fashion-mnist {folder}",
        )
    return out


def fmnist(args, scratch: Path) -> dict:
    """Each method's GPU recipe for a few hundred steps, then the online monitor's kNN@20."""
    s, cuda = sizes(args.dry), torch.cuda.is_available() and not args.dry
    data = fmnist_shards(Path(args.fmnist), scratch)
    out = {}
    for method in METHODS:
        cfg = load_config(
            f"{method}-resnet18-fmnist",
            [
                f"data.train={data / 'train'}",
                f"data.test={data / 'test'}",
                f"run_root={scratch / 'runs'}",
                f"name=device-{method}",
                f"scaling.use_gpu={cuda}",
                "tracking.mode=disabled",
                "train.monitor_every_epochs=0",
                *s["fmnist_overrides"],
            ],
        )
        trainer = build_trainer(cfg)
        images, wait = timed_steps(trainer, loader_batches(trainer), s["fmnist_steps"], s["warmup"])
        bank, queries = s["monitor"]
        monitor = OnlineMonitor(cfg, bank_size=bank, query_size=queries)(trainer.objective.encoder)
        out[method] = {
            "steps": trainer.steps_done,
            "images_per_s": images,
            "data_wait": wait,
            "bad_steps": int(trainer.bad.total),
            **{k.removeprefix("monitor/"): v for k, v in monitor.items() if "knn" in k},
        }
    return {"methods": out}


def wav2vec2(args, scratch: Path) -> dict:
    """wav2vec 2.0 training steps (AdamW, bf16 on the GPU) on random audio."""
    from selfsup.audio.wav2vec2 import Wav2Vec2Pretraining

    s, cuda = sizes(args.dry)["wav2vec2"], torch.cuda.is_available() and not args.dry
    device = torch.device("cuda" if cuda else "cpu")
    torch.manual_seed(0)
    model = Wav2Vec2Pretraining(s["preset"]).to(device).train()
    optimiser = torch.optim.AdamW(model.param_groups(), lr=5e-4, fused=True)
    samples = int(16000 * s["seconds"])
    waves = 0.1 * torch.randn(s["batch"], samples, device=device)
    lengths = torch.full((s["batch"],), samples, device=device)
    losses, start = [], None
    for i in range(s["steps"] + 1):  # the first is untimed
        if i == 1:
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss = model((waves, lengths), Progress(i, 100_000))["loss"]
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        losses.append(loss.detach())
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {
        "preset": "tiny" if args.dry else "base",
        "batch": s["batch"],
        "clip_seconds": s["seconds"],
        "steps_per_s": s["steps"] / seconds,
        "losses": [float(x) for x in losses],
    }


STAGES = {"cuda_tests": cuda_tests, "throughput": throughput, "fmnist": fmnist, "wav2vec2": wav2vec2}


def commit() -> str:
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return done.stdout.strip() or "unknown (not a git checkout)"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="device-check.json", help="the JSON written at the end (and after each stage)")
    p.add_argument("--dry", action="store_true", help="every stage on the CPU at toy sizes (what CI runs)")
    p.add_argument("--fmnist", default=str(CARRIED_FMNIST), help="the folder of Fashion-MNIST's four idx files")
    p.add_argument("--stages", nargs="+", choices=list(STAGES), default=list(STAGES))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if not args.dry and not torch.cuda.is_available():
        raise SystemExit("device_check: no CUDA device here; run it on the GPU machine, or with --dry on a CPU")
    device = torch.device("cuda" if not args.dry else "cpu")
    result = {
        "commit": commit(),
        "dry": args.dry,
        "machine": describe_machine(device),
        "torch": torch.__version__,
        "stages": {},
    }
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="selfsup-device-check-") as tmp:
        for name in args.stages:
            stage_start, scratch = time.perf_counter(), Path(tmp) / name
            scratch.mkdir()
            try:
                entry = {"ok": True, **STAGES[name](args, scratch)}
            except Exception as err:  # noqa: BLE001 - one stage's failure is recorded; the others still run
                entry = {
                    "ok": False,
                    "error": f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}",
                    "where": traceback.format_exc().strip().splitlines()[-3:],
                }
            entry["seconds"] = time.perf_counter() - stage_start
            result["stages"][name] = entry
            result["seconds"] = time.perf_counter() - started
            Path(args.out).write_text(json.dumps(result, indent=2))
            print(
                f"{name}: {'ok' if entry['ok'] else entry['error']} ({entry['seconds']:.0f} s)"
                f"{' [dry: what the device run measures]' if args.dry else ''}",
                flush=True,
            )
            print(
                "  " + json.dumps({k: v for k, v in entry.items() if k not in ("ok", "seconds", "where")}), flush=True
            )
    print(f"wrote {args.out} ({result['seconds']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
