"""Learning curves and final quality of the vision methods on Fashion-MNIST at the same backbone and budget.

    python -m benchmarks.methods_fmnist                         # 20 min of pretraining per method, monitor every epoch
    python -m benchmarks.methods_fmnist --minutes 45 --max-epochs 100 --methods simclr   # the budget ends it
    python -m benchmarks.methods_fmnist --methods byol --variant lr0.2 --set optim.lr=0.2   # beside byol, as byol-lr0.2
    python -m benchmarks.methods_fmnist --recipe gpu --minutes 10 --concurrent   # all of them at once on one GPU
    python -m benchmarks.methods_fmnist --restart               # train these methods again from scratch

Each method trains its recipe (``configs/<method>-resnet18-fmnist-cpu.yaml``, half-width ResNet-18,
batch 256; ``--recipe gpu``: ``configs/<method>-resnet18-fmnist.yaml``) inside ``--minutes`` (0: ``--max-epochs``
only) with the online monitor every ``--monitor-every`` epochs: its kNN@20 on a small test subset, against
epochs and minutes, is the learning curve, with the first minute/epoch it rose above raw pixels and the
random-init backbone on that subset. The final checkpoint is scored by ``selfsup.eval.run.evaluate``
(kNN@20, kNN@200, linear on the full test set) beside the same baselines (scored once: the evaluation
caches them). OUT/results.json (merged by ``<method>[-<variant>]``) and OUT/curves.png are rewritten
after each method; a result of the same settings is reused, an interrupted run of them resumed from
its checkpoint (``--restart``: start over).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

from selfsup.cluster.driver import pretrain
from selfsup.config import ConfigError, ExperimentConfig, load_config
from selfsup.core.checkpoint import checkpoint_step, latest_checkpoint
from selfsup.core.device import describe_machine
from selfsup.core.reporter import read_records
from selfsup.data.reader import ManifestError, read_manifest
from selfsup.eval.run import evaluate

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["simclr", "moco_v2", "moco_v3", "byol", "simsiam", "vicreg", "barlow_twins", "dino"]
METRICS = ["knn@20", "knn@200", "linear"]
BASELINES = {"pixels": "pixels", "random_init": "random init"}  # name -> as printed
MONITOR_LEVEL = re.compile(r"monitor/(.+)_knn@20")  # a baseline's level on the monitor subset
RUN_SETTINGS = "benchmark.json"  # beside a run folder, <run>.benchmark.json: the settings it was started with
CURVES = "curves.png"  # beside the results file


def settings(args) -> dict:
    """What a result depends on: a stored result or run folder is reused only for the same settings."""
    return {
        "minutes": args.minutes,
        "recipe": args.recipe,
        "overrides": list(args.set),
        "variant": args.variant,
        "max_epochs": args.max_epochs,
        "seed": args.seed,
        "monitor_every": args.monitor_every,
    }


def baseline_key(args) -> str:
    """Where results.json files the baselines: the recipe and the overrides that change the random-init network
    or the data."""
    return " ".join([args.recipe, *sorted(o for o in args.set if o.startswith(("model.", "data.")))])


def result_key(method: str, variant: str) -> str:
    return f"{method}-{variant}" if variant else method


def method_config(method: str, args) -> ExperimentConfig:
    """The recipe of ``method`` with the benchmark's data, budget, monitor and ``--set`` overrides."""
    path = ROOT / "configs" / f"{method}-resnet18-fmnist{'-cpu' if args.recipe == 'cpu' else ''}.yaml"
    data = Path(args.data)
    overrides = [
        f"data.train={data / 'train'}",
        f"data.test={data / 'test'}",
        f"run_root={args.out}",
        f"name={result_key(method, args.variant)}",
        "train.checkpoint_every_steps=1000000",
        f"seed={args.seed}",
        f"optim.minutes={args.minutes or 'null'}",
        f"optim.epochs={args.max_epochs}",
        "tracking.mode=disabled",
        f"train.monitor_every_epochs={args.monitor_every}",
        *args.set,
    ]
    return load_config(path, overrides)


def read_curve(path: Path) -> tuple[list[dict], dict[str, float]]:
    """The monitor's curve in ``metrics.jsonl``: points {epoch, minutes, knn@20, rankme} in step order
    (the last record of a step a resume logged twice), and the baselines' levels on the monitor subset."""
    by_step = {r["step"]: r for r in read_records(path) if "monitor/knn@20" in r}
    monitored = [r for _, r in sorted(by_step.items())]
    points = [
        {
            "epoch": r["epoch"],
            "minutes": r["train_seconds"] / 60,
            "knn@20": r["monitor/knn@20"],
            "rankme": r["monitor/rankme"],
        }
        for r in monitored
    ]
    levels = {}
    for record in monitored:
        for key, value in record.items():
            if (match := MONITOR_LEVEL.fullmatch(key)) and match[1] not in levels:
                levels[match[1]] = value
    return points, levels


def crossings(points: list[dict], levels: dict[str, float]) -> dict[str, dict | None]:
    """Per baseline: the first point {minute, epoch} whose kNN@20 is above its level, None if none is."""
    return {
        name: next(({"minute": p["minutes"], "epoch": p["epoch"]} for p in points if p["knn@20"] > level), None)
        for name, level in levels.items()
    }


def beats(scores: dict, baselines: dict) -> dict[str, dict[str, bool]]:
    """Per full-test baseline and final metric: whether the checkpoint scored above it."""
    return {name: {m: scores[m] > base[m] for m in METRICS} for name, base in baselines.items()}


def plan(entry: dict | None, wanted: dict, run_dir: Path, restart: bool) -> tuple[str, Path | None]:
    """What to do for one method: ("reuse", None) when ``entry`` is a result of the ``wanted`` settings,
    ("resume", checkpoint) when ``run_dir`` was started with them and holds a checkpoint, else ("fresh", None)."""
    if restart:
        return "fresh", None
    if entry is not None and entry.get("settings") == wanted:
        return "reuse", None
    started = settings_file(run_dir)
    checkpoint = latest_checkpoint(Path(run_dir))
    if checkpoint is not None and started.is_file() and json.loads(started.read_text()) == wanted:
        return "resume", checkpoint
    return "fresh", None


def this_machine() -> str:
    """The GPU, or the CPU with the threads torch uses at this moment (``describe_machine``)."""
    return describe_machine(torch.device("cuda" if torch.cuda.is_available() else "cpu"))


def settings_file(run_dir: Path) -> Path:
    """Where the settings a run folder was started with are kept: beside it, so that a restart (which
    sets the run folder's contents aside) leaves them."""
    return Path(run_dir).with_name(f"{Path(run_dir).name}.{RUN_SETTINGS}")


def run_method(cfg: ExperimentConfig, args, fresh: bool, with_baselines: bool) -> tuple[dict, dict]:
    """Pretrain ``cfg`` through the one driver (``fresh``: the old run set aside, else resumed where the
    driver decides) and evaluate it -> (its entry, full-test baselines)."""
    if fresh:
        settings_file(cfg.run_dir).parent.mkdir(parents=True, exist_ok=True)
        settings_file(cfg.run_dir).write_text(json.dumps(settings(args), indent=1))
    summary = pretrain(cfg, use_ray=False, restart=fresh)
    machine = this_machine()  # now: with the threads it trained with
    data = Path(args.data)
    report = evaluate(
        cfg.run_dir, str(data / "train"), str(data / "test"), cfg.run_dir / "report", baselines=with_baselines
    )
    metrics = cfg.run_dir / "metrics.jsonl"
    last = next((r for r in reversed(read_records(metrics)) if "loss" in r), {})  # the last training record
    curve, levels = read_curve(metrics)
    entry = {
        "train": {
            "minutes": round(summary["train_seconds"] / 60, 2),
            "epochs": round(summary["epochs"], 3),
            "steps": summary["steps"],
            "samples_per_s": last.get("samples_per_s"),
            "final_loss": last.get("loss"),
            "embed_std": last.get("embed_std"),
            "rankme": last.get("rankme"),
            "bad_steps": summary["bad_steps"],
        },
        "curve": curve,
        "monitor_levels": levels,
        "crossings": crossings(curve, levels),
        "encoders": {"checkpoint": report["encoders"]["checkpoint"]},
        "device": machine,
    }
    return entry, {k: v for k, v in report["encoders"].items() if k != "checkpoint"}


def read_results(path: Path) -> dict:
    """results.json: {"methods": {key: entry}, "baselines": {baseline_key: {name: scores}}}, empty when absent."""
    results = json.loads(Path(path).read_text()) if Path(path).is_file() else {}
    return {"methods": results.get("methods", {}), "baselines": results.get("baselines", {})}


def save_result(path: Path, key: str, entry: dict, baselines_key: str, baselines: dict) -> dict:
    """Merge ``entry`` (and its baselines, when scored) into the results file as it is now; returns it.
    An exclusive lock on a file beside it keeps invocations that finish at once from losing each other's entries."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        results = read_results(path)
        results["methods"][key] = entry
        if baselines:
            results["baselines"][baselines_key] = baselines
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(results, indent=1, default=float))
        tmp.replace(path)
    return results


def plot_curves(curves: dict[str, list[dict]], levels: dict[str, float], title: str, out: Path) -> None:
    """Two panels, kNN@20 (%) against epochs and against minutes: a line per method, the baselines' levels dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
    for ax, x, label in zip(axes, ("epoch", "minutes"), ("epoch", "wall-clock training minutes")):
        for name, points in curves.items():
            ax.plot([p[x] for p in points], [100 * p["knn@20"] for p in points], marker="o", label=name)
        for (name, level), colour in zip(levels.items(), ("grey", "black")):
            ax.axhline(100 * level, linestyle="--", color=colour, label=f"{BASELINES.get(name, name)} (monitor subset)")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("online kNN@20 top-1 (%)")
    axes[1].legend(loc="lower right", fontsize="small")
    fig.suptitle(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def table(entries: dict, baselines: dict) -> str:
    """Rows: methods, then the baselines; columns: kNN@20, kNN@200, linear (top-1 %), training budget."""
    head = f"{'encoder':<18} {'kNN@20':>7} {'kNN@200':>8} {'linear':>7} {'epochs':>7} {'steps':>6} {'train min':>9}"
    lines = [head, "-" * len(head)]
    for name, r in entries.items():
        s, t = r["encoders"]["checkpoint"], r["train"]
        lines.append(
            f"{name:<18} "
            + " ".join(f"{100 * s[m]:>{w}.2f}" for m, w in zip(METRICS, (7, 8, 7)))
            + f" {t['epochs']:>7.3f} {t['steps']:>6d} {t['minutes']:>9.1f}"
        )
    for name, s in baselines.items():
        lines.append(
            f"{name:<18} "
            + " ".join(f"{100 * s[m]:>{w}.2f}" for m, w in zip(METRICS, (7, 8, 7)))
            + f" {'–':>7} {'–':>6} {'–':>9}"
        )
    return "\n".join(lines)


def crossings_table(entries: dict) -> str:
    """Per method: when its online kNN@20 first rose above each baseline's level on the monitor subset."""
    lines = []
    for name, r in entries.items():
        if not r["curve"]:
            lines.append(f"{name:<18} no monitor records")
            continue
        parts = [
            f"crossed {BASELINES.get(base, base)} at minute {c['minute']:.1f} / epoch {c['epoch']:.2f}"
            if c
            else f"never crossed {BASELINES.get(base, base)} ({100 * r['monitor_levels'][base]:.2f}%)"
            for base, c in r["crossings"].items()
        ]
        best = max(p["knn@20"] for p in r["curve"])
        lines.append(f"{name:<18} {', '.join(parts)}; best online kNN@20 {100 * best:.2f}%")
    return "\n".join(lines)


def beats_lines(entries: dict) -> str:
    """Per method: the final metrics on which it scored above each full-test baseline."""
    lines = []
    for name, r in entries.items():
        parts = []
        for base, above in r["beats"].items():
            metrics = [m for m, beaten in above.items() if beaten]
            which = "all three" if len(metrics) == len(METRICS) else ", ".join(metrics) or "none"
            parts.append(f"above {BASELINES.get(base, base)} on {which}")
        lines.append(f"{name:<18} {'; '.join(parts) or 'no baselines scored'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=20.0, help="pretraining wall-clock budget per method (0: epochs)")
    p.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    p.add_argument("--data", default=str(ROOT / "data/fashion-mnist"), help="folder with train/ and test/ shards")
    p.add_argument("--out", default=str(ROOT / "runs/methods_fmnist"))
    p.add_argument("--json", help="results file (default: OUT/results.json)")
    p.add_argument("--max-epochs", type=float, default=12.0, help="the schedule's length when --minutes is not reached")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--recipe",
        choices=["cpu", "gpu"],
        default="cpu",
        help="configs/<method>-resnet18-fmnist-cpu.yaml (cpu) or configs/<method>-resnet18-fmnist.yaml (gpu)",
    )
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides for every method")
    p.add_argument("--variant", default="", help="a name for these overrides: runs and results as <method>-<variant>")
    p.add_argument("--monitor-every", type=int, default=1, help="online kNN@20 every N epochs (0: no curve)")
    p.add_argument("--restart", action="store_true", help="delete these methods' runs and train afresh")
    p.add_argument("--no-baselines", action="store_true", help="skip the raw-pixel and random-init rows")
    p.add_argument(
        "--concurrent",
        action="store_true",
        help="train the methods at once, each in its own process of this benchmark (all on one GPU); "
        "their output goes to OUT/<method>.log",
    )
    args = p.parse_args(argv)
    check_inputs(args)
    out = Path(args.json or Path(args.out) / "results.json")
    device = this_machine()
    if args.concurrent:
        failed = run_concurrently(sys.argv[1:] if argv is None else argv, args)
    else:
        failed = run_in_turn(args, out)
    results = read_results(out)  # with what other invocations merged meanwhile
    print_tables(results, args, device)
    draw(results, args, device, out.with_name(CURVES))
    print(f"wrote {out} and {out.with_name(CURVES)}")
    if failed:
        raise SystemExit(
            f"{', '.join(failed)} did not finish; see {Path(args.out)}/<method>.log, and run the same "
            "command again to resume"
        )


def check_inputs(args) -> None:
    """Stop with one line, before anything trains, when ``--data`` holds no shards or an override
    does not fit a method's config."""
    for split in ("train", "test"):
        try:
            read_manifest(str(Path(args.data) / split))
        except ManifestError as err:
            raise SystemExit(f"--data {args.data}: {err}") from None
    for method in args.methods:
        try:
            method_config(method, args)
        except ConfigError as err:
            raise SystemExit(f"{method}: {err}".replace("\n", " ")) from None


def run_in_turn(args, out: Path) -> list[str]:
    """Each of ``args.methods`` in this process, one after the other, each result merged into ``out``
    as it is scored -> the methods that failed (none: a failure raises)."""
    wanted = settings(args)
    for method in args.methods:
        key, cfg, results = result_key(method, args.variant), method_config(method, args), read_results(out)
        action, checkpoint = plan(results["methods"].get(key), wanted, cfg.run_dir, args.restart)
        if action == "reuse":
            print(f"{key}: already done, reusing results")
            continue
        if action == "resume":
            print(f"resuming {key} from {checkpoint} (step {checkpoint_step(checkpoint)})")
        elif latest_checkpoint(cfg.run_dir) is not None:
            print(f"{key}: starting over ({'--restart' if args.restart else 'its run folder has other settings'})")
        entry, baselines = run_method(
            cfg, args, action == "fresh", with_baselines=not args.no_baselines
        )  # evaluate caches them
        entry.update(settings=wanted, beats=beats(entry["encoders"]["checkpoint"], baselines))
        draw(save_result(out, key, entry, baseline_key(args), baselines), args, entry["device"], out.with_name(CURVES))
    return []


def run_concurrently(argv: list[str], args) -> list[str]:
    """Each of ``args.methods`` at once, in its own process of this benchmark with the same ``argv``
    (which merges its result into the shared results file itself), its output in OUT/<key>.log ->
    the methods whose process failed."""
    own = [a for a in argv if a != "--concurrent"]
    Path(args.out).mkdir(parents=True, exist_ok=True)
    logs = {method: Path(args.out) / f"{result_key(method, args.variant)}.log" for method in args.methods}
    running = {}
    for method, log in logs.items():
        with open(log, "w") as f:
            running[method] = subprocess.Popen(
                [sys.executable, "-m", "benchmarks.methods_fmnist", *own, "--methods", method],
                cwd=ROOT,
                stdout=f,
                stderr=subprocess.STDOUT,
            )
    print(f"training {', '.join(running)} at once; their output: {Path(args.out)}/<method>.log")
    failed = []
    for method, process in running.items():
        log = logs[method]
        if process.wait() != 0:
            failed.append(method)
            print(f"{method} failed (exit {process.returncode}); its log: {log}")
        else:
            print(f"{method} done; its log: {log}")
    return failed


def comparable(results: dict, args) -> dict:
    """The entries of the results at this invocation's budget and recipe, whatever their method or variant."""
    return {
        k: e
        for k, e in results["methods"].items()
        if e["settings"]["minutes"] == args.minutes and e["settings"]["recipe"] == args.recipe
    }


def title(args, device: str) -> str:
    cfg = method_config(args.methods[0], args)
    backbone = f"ResNet-18 of width {cfg.model.width} (3x3 stem{', stride 2' if cfg.model.stem_stride == 2 else ''})"
    budget = f"{args.minutes:g} min of pretraining" if args.minutes else f"{args.max_epochs:g} epochs"
    return f"Fashion-MNIST, {backbone},\n{budget} per method on {device}"


def trained_on(entries: dict, fallback: str) -> str:
    """Where the entries trained (each distinct machine once), not where this runs; ``fallback`` if none."""
    return " and ".join(dict.fromkeys(e["device"] for e in entries.values())) or fallback


def draw(results: dict, args, device: str, out: Path) -> None:
    """The curves of the comparable entries, with the subset levels of the first that has them."""
    entries = comparable(results, args)
    levels = next((e["monitor_levels"] for e in entries.values() if e["monitor_levels"]), {})
    plot_curves({k: e["curve"] for k, e in entries.items()}, levels, title(args, trained_on(entries, device)), out)


def print_tables(results: dict, args, device: str) -> None:
    """The final table (full test set) and the crossings table (monitor subset) of the comparable entries."""
    entries = comparable(results, args)
    baselines = {} if args.no_baselines else results["baselines"].get(baseline_key(args), {})
    print(f"\n{title(args, trained_on(entries, device))}; top-1 % on the 10k test set\n{table(entries, baselines)}")
    print(beats_lines(entries))
    print(f"\nonline kNN@20 on the monitor subset (every {args.monitor_every} epochs)\n{crossings_table(entries)}")


if __name__ == "__main__":
    main()
