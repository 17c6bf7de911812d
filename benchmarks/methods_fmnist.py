"""Quality of the five vision methods on Fashion-MNIST at the same backbone and wall-clock budget.

    python -m benchmarks.methods_fmnist                         # 20 min of pretraining per method
    python -m benchmarks.methods_fmnist --minutes 3 --methods simclr byol
    python -m benchmarks.methods_fmnist --recipe gpu --minutes 10 --set optim.warmup_epochs=2   # on a GPU

Each method trains from its CPU recipe (``configs/<method>-resnet18-fmnist-cpu.yaml``: the demo's
half-width ResNet-18 with a stride-2 3x3 stem, batch 256, bf16 + channels_last on CPUs with native
bf16) through ``selfsup.train.trainer`` with ``optim.minutes`` set to ``--minutes``: the loop
times its first steps and sizes the whole cosine schedule to end inside the budget. Every checkpoint is then scored with
``selfsup.eval.run.evaluate`` (weighted kNN at k=20 and k=200, linear probe) on the 10k
test images against the 60k training images; raw pixels and the randomly initialised backbone are
the baselines (scored once: they do not depend on the method; ``--no-baselines`` skips them).
``--recipe gpu`` trains the GPU recipes (``configs/<method>-resnet18-fmnist.yaml``: full-width
ResNet-18, batch 512) instead; ``--set KEY=VALUE`` overrides any config key. Prints a table, writes a JSON.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from selfsup.config import load_config
from selfsup.core.reporter import FileReporter, Reporters
from selfsup.eval.run import evaluate
from selfsup.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["simclr", "moco_v2", "moco_v3", "byol", "simsiam"]
METRICS = ["knn@20", "knn@200", "linear"]


def run_method(method: str, args, evaluate_baselines: bool) -> dict:
    """Pretrain ``method`` for ``args.minutes`` and evaluate it: {"train": {...}, "encoders": {...}}."""
    path = ROOT / "configs" / f"{method}-resnet18-fmnist{'-cpu' if args.recipe == 'cpu' else ''}.yaml"
    data = Path(args.data)
    overrides = [f"data.train={data / 'train'}", f"data.test={data / 'test'}", f"run_root={args.out}",
                 f"name={method}", "train.checkpoint_every_steps=1000000", f"seed={args.seed}",
                 f"optim.minutes={args.minutes}", f"optim.epochs={args.max_epochs}", "tracking.mode=disabled",
                 *args.set]
    cfg = load_config(path, overrides)
    shutil.rmtree(cfg.run_dir, ignore_errors=True)
    started = time.perf_counter()
    summary = Trainer(cfg, Reporters(FileReporter(cfg.run_dir)), resume_from=None).fit()  # a fresh run
    train_minutes = (time.perf_counter() - started) / 60
    report = evaluate(cfg.run_dir, str(data / "train"), str(data / "test"), cfg.run_dir / "report",
                      baselines=evaluate_baselines)
    last = summary["last"]
    return {"train": {"minutes": round(train_minutes, 2), "epochs": round(summary["epochs"], 3),
                      "steps": summary["steps"], "samples_per_s": last.get("samples_per_s"),
                      "final_loss": last.get("loss"), "embed_std": last.get("embed_std"),
                      "rankme": last.get("rankme"), "bad_steps": summary["bad_steps"]},
            "encoders": report["encoders"]}


def table(results: dict, baselines: dict) -> str:
    """Rows: methods, then the baselines; columns: kNN@20, kNN@200, linear (top-1 %), training budget."""
    head = f"{'encoder':<14} {'kNN@20':>7} {'kNN@200':>8} {'linear':>7} {'epochs':>7} {'steps':>6} {'train min':>9}"
    lines = [head, "-" * len(head)]
    for name, r in results.items():
        s, t = r["encoders"]["checkpoint"], r["train"]
        lines.append(f"{name:<14} " + " ".join(f"{100 * s[m]:>{w}.2f}" for m, w in zip(METRICS, (7, 8, 7)))
                     + f" {t['epochs']:>7.3f} {t['steps']:>6d} {t['minutes']:>9.1f}")
    for name, s in baselines.items():
        lines.append(f"{name:<14} " + " ".join(f"{100 * s[m]:>{w}.2f}" for m, w in zip(METRICS, (7, 8, 7)))
                     + f" {'–':>7} {'–':>6} {'–':>9}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=20.0, help="pretraining wall-clock budget per method")
    p.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    p.add_argument("--data", default=str(ROOT / "data/fashion-mnist"), help="folder with train/ and test/ shards")
    p.add_argument("--out", default=str(ROOT / "runs/methods_fmnist"))
    p.add_argument("--json", help="results file (default: OUT/results.json)")
    p.add_argument("--max-epochs", type=float, default=12.0, help="the schedule's length when --minutes is not reached")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--recipe", choices=["cpu", "gpu"], default="cpu",
                   help="configs/<method>-resnet18-fmnist-cpu.yaml (cpu) or configs/<method>-resnet18-fmnist.yaml (gpu)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides for every method")
    p.add_argument("--no-baselines", action="store_true", help="skip the raw-pixel and random-init rows")
    args = p.parse_args(argv)
    results, baselines = {}, {}
    for i, method in enumerate(args.methods):
        results[method] = run_method(method, args, evaluate_baselines=i == 0 and not args.no_baselines)
        if i == 0:
            baselines = {k: v for k, v in results[method]["encoders"].items() if k != "checkpoint"}
    text = table(results, baselines)
    backbone = ("half-width ResNet-18 (3x3 stem, stride 2), batch 256" if args.recipe == "cpu"
                else "ResNet-18 (3x3 stem), batch 512")
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"{torch.get_num_threads()} CPU threads"
    print(f"\nFashion-MNIST, {backbone}, {args.minutes:g} min of pretraining per method on {device}"
          f"{' (overrides: ' + ' '.join(args.set) + ')' if args.set else ''}; top-1 % on the 10k test set\n{text}")
    out = Path(args.json or Path(args.out) / "results.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"minutes": args.minutes, "recipe": args.recipe, "overrides": args.set, "device": device,
                               "methods": results, "baselines": baselines}, indent=1,
                              default=float))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
