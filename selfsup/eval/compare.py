"""Score every checkpoint of one or more runs (kNN + linear probe) and compare them over training steps.

``compare(runs, train, test, out)`` writes ``compare.json`` (a row per checkpoint, the best one),
``compare.md`` (the table) and ``compare.png`` (top-1 against step, one colour per run: linear
solid, kNN@20 dashed). Features of each checkpoint are cached in ``out/features/`` and reused while
the checkpoint's ``model.pt`` and the two splits are unchanged. A checkpoint that its live run prunes
while they are compared, or a damaged one, is skipped with a warning naming it; the rest are kept.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from selfsup.core.checkpoint import CheckpointError, checkpoint_step, list_checkpoints, load_checkpoint  # noqa: E402
from selfsup.eval.features import model_features, num_classes  # noqa: E402
from selfsup.eval.report import format_table  # noqa: E402
from selfsup.eval.run import score  # noqa: E402
from selfsup.tasks import LabelledSplit, task_for  # noqa: E402

log = logging.getLogger("selfsup.compare")


def compare(runs: list[str | Path], train: str, test: str, out: str | Path, rank_by: str = "linear") -> dict:
    """Every checkpoint of every run in ``runs`` scored on ``test`` against ``train``; the checkpoint
    with the highest ``rank_by`` top-1 is "best". Returns the compare.json content."""
    out = Path(out)
    if len({Path(r).name for r in runs}) < len(runs):
        raise ValueError(f"runs need distinct folder names, got {[str(r) for r in runs]}")
    splits: dict[str, tuple] = {}  # data config (JSON) -> the train and test splits read with it
    rows = []
    for run in map(Path, runs):
        checkpoints = list_checkpoints(run)
        if not checkpoints:
            raise CheckpointError(f"{run} has no complete checkpoint (is it a run directory?)")
        for ckpt in checkpoints:
            try:
                step, cache_key = checkpoint_step(ckpt), _cache_key(ckpt, f"{train}|{test}")
                cfg, state, _ = load_checkpoint(ckpt)
            except (CheckpointError, FileNotFoundError) as err:  # a live run pruned it since listing, or damaged
                log.warning("skipped %s: %s", ckpt, err)
                continue
            task, key = task_for(cfg), cfg.data.model_dump_json()
            if key not in splits:
                splits[key] = task.read_labelled(train, cfg), task.read_labelled(test, cfg)
            train_split, test_split = splits[key]
            bank, queries = _features(ckpt, cfg, state, splits[key], out / "features" / run.name, cache_key)
            scores, _ = score(
                f"{run.name} {ckpt.name}",
                bank,
                train_split.labels,
                queries,
                test_split.labels,
                num_classes(train_split, test_split),
                [tuple(s) for s in cfg.eval.knn],
            )
            rows.append({"run": run.name, "step": step, "checkpoint": str(ckpt), **scores})
    if not rows:
        raise CheckpointError(f"no checkpoint of {', '.join(map(str, runs))} could be read (each is named above)")
    best = max(rows, key=lambda r: (r[rank_by], r["step"]))
    result = {"train": train, "test": test, "rank_by": rank_by, "best": best, "checkpoints": rows}
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(json.dumps(result, indent=1) + "\n")
    table = format_table(
        {
            f"{r['run']} @ {r['step']}": {k: v for k, v in r.items() if k not in ("run", "step", "checkpoint")}
            for r in rows
        }
    )
    (out / "compare.md").write_text(
        f"# Checkpoints on {test}\n\n{table}\n\nbest by {rank_by}: {best['run']} at step "
        f"{best['step']} ({100 * best[rank_by]:.2f}%), {best['checkpoint']}\n\n"
        "![top-1 against step](compare.png)\n"
    )
    _plot(out / "compare.png", rows)
    print(table)
    print(f"best by {rank_by}: {best['checkpoint']} ({100 * best[rank_by]:.2f}%); written to {out}")
    return result


def _cache_key(ckpt: Path, locations: str) -> str:
    """What the cached features of ``ckpt`` depend on: its ``model.pt`` (path, size, time) and the splits."""
    stat = (ckpt / "model.pt").stat()
    return hashlib.sha256(f"{ckpt.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{locations}".encode()).hexdigest()


def _features(
    ckpt: Path, cfg, state: dict, splits: tuple[LabelledSplit, LabelledSplit], cache: Path, key: str
) -> tuple[np.ndarray, np.ndarray]:
    """(train (N, D), test (M, D)) un-augmented features of a checkpoint (``model_features``), from
    ``cache`` when its ``key`` (:func:`_cache_key`) still matches."""
    path = cache / f"{ckpt.name}.npz"
    if path.is_file():
        with np.load(path) as cached:
            if str(cached["key"]) == key:
                return cached["train"], cached["test"]
    features = model_features(task_for(cfg), cfg, state, *splits, ckpt.name)
    train, test = features.bank, features.queries
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(path, key=key, train=train, test=test)
    return train, test


def _plot(path: Path, rows: list[dict]) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, run in enumerate(dict.fromkeys(r["run"] for r in rows)):
        mine = sorted((r for r in rows if r["run"] == run), key=lambda r: r["step"])
        steps = [r["step"] for r in mine]
        ax.plot(steps, [100 * r["linear"] for r in mine], "o-", color=f"C{i}", label=f"{run} linear")
        if "knn@20" in mine[0]:
            ax.plot(steps, [100 * r["knn@20"] for r in mine], "s--", color=f"C{i}", label=f"{run} kNN@20")
    ax.set_xlabel("step")
    ax.set_ylabel("test top-1 (%)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
