"""Checkpoint -> features -> kNN and linear probe -> report, beside the task's baselines (raw pixels
for images, log-mel for audio) and the same model at random initialisation."""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from selfsup._version import __version__
from selfsup.config import ConfigError, ExperimentConfig, load_config
from selfsup.core.cache import digest, load_cached, store_cached
from selfsup.core.checkpoint import CheckpointProgress, load_checkpoint, resolve_checkpoint
from selfsup.core.reporter import read_records
from selfsup.data.preflight import conversion_notes
from selfsup.data.reader import read_manifest, split_identity
from selfsup.eval.features import (
    EncoderFeatures,
    baseline_features,
    encoder_from_checkpoint,
    eval_device,
    model_features,
    num_classes,
    split_features,
)
from selfsup.eval.knn import weighted_knn
from selfsup.eval.linear import linear_probe
from selfsup.eval.metrics import confusion, per_class_report, project_2d, roc_auc_ovr
from selfsup.eval.overlap import held_out_warnings
from selfsup.eval.report import format_table, write_report
from selfsup.eval.retrieval import retrieval_metrics, save_neighbour_grid
from selfsup.tasks import EvalSpec, LabelledSplit, task_for

log = logging.getLogger("selfsup.evaluate")
notes = logging.getLogger("selfsup.note")  # the console says these as `selfsup: note: ...`

_ARRAYS = ("predictions", "probabilities", "neighbours")  # per-query details kept out of report.json
_TSNE_POINTS = 2000  # test samples in the t-SNE map (t-SNE is quadratic)
_RETRIEVAL_QUERIES = 2000  # test queries that rank the whole bank (about 20 s against 60,000 on one core)
_GRID_QUERIES, _GRID_NEIGHBOURS = 10, 8  # neighbours.png: one query per class (at most 10), 8 neighbours each


THREAD_TRIAL = 512  # train samples whose features time each thread count


def fastest_threads(task, cfg: ExperimentConfig, train: LabelledSplit) -> int:
    """All of this process's CPUs, or one when that computes features faster (another program holds
    a core: every parallel region then waits for the thread that shares it). Each count is timed
    twice on the first ``THREAD_TRIAL`` train samples with the encoder at random initialisation."""
    most = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if most <= 1 or eval_device().type != "cpu":
        return most
    sample = replace(
        train,
        inputs=train.inputs[:THREAD_TRIAL],
        labels=train.labels[:THREAD_TRIAL],
        groups=train.groups[:THREAD_TRIAL],
        thumbnails=None,
    )
    encoder, seconds = encoder_from_checkpoint(cfg, None).eval(), dict[int, float]()
    for count in (most, 1, most, 1):
        torch.set_num_threads(count)
        started = time.perf_counter()
        split_features(task, encoder, sample, cfg, "thread trial", progress=False)
        seconds[count] = min(seconds.get(count, float("inf")), time.perf_counter() - started)
    best = min(seconds, key=lambda count: seconds[count])
    if best != most:
        log.warning(
            "evaluating with %d of %d CPU threads: %s (another program is using the CPU)",
            best,
            most,
            ", ".join(f"{count} took {s:.2f} s for {len(sample.labels)} samples" for count, s in seconds.items()),
        )
    return best


def score(
    name: str,
    bank: np.ndarray,
    bank_y: np.ndarray,
    queries: np.ndarray,
    query_y: np.ndarray,
    num_classes: int,
    knn_settings,
    probe_train: np.ndarray | None = None,
) -> tuple[dict, dict]:
    """kNN of ``queries`` (M, D) against ``bank`` (N, D) at each (k, T), and the linear probe, trained on
    ``probe_train`` ((V·N, D), V views of the bank's samples) or else on ``bank``: ({metric: top-1}, details)."""
    log.info("scoring %s (%d-d features)", name, bank.shape[1])
    knn = weighted_knn(bank, bank_y, queries, query_y, settings=knn_settings, num_classes=num_classes)
    views = 1 if probe_train is None else len(probe_train) // len(bank)
    probe = linear_probe(
        bank if probe_train is None else probe_train,
        np.tile(bank_y, views),
        queries,
        query_y,
        num_classes=num_classes,
        train_views=views,
    )
    scores = {**knn.top1, "linear": probe.top1}
    details = {
        "knn_top5": knn.top5,
        "linear_top5": probe.top5,
        "linear_hparams": {"lr": probe.lr, "weight_decay": probe.weight_decay, "val_top1": probe.val_top1},
        "predictions": probe.predictions,
        "probabilities": probe.probabilities,
        "neighbours": knn.neighbours,
    }
    return scores, details


@dataclass
class _Eval:
    """One evaluation: the checkpoint, its config, how its task's report reads, the two splits."""

    ckpt: Path
    cfg: ExperimentConfig
    spec: EvalSpec
    train: LabelledSplit
    test: LabelledSplit

    @property
    def num_classes(self) -> int:
        return num_classes(self.train, self.test)

    @property
    def subject(self) -> str:
        """Which encoder on which data, for the plots' titles."""
        m = self.cfg.model
        return (
            f"{self.cfg.method.name} {m.backbone} (width {m.width}) of run {self.cfg.name}, "
            f"{self.ckpt.name}, on {Path(self.test.location.rstrip('/')).parent.name}/"
            f"{Path(self.test.location.rstrip('/')).name}"
        )

    @property
    def classes(self) -> list[str]:
        """The manifest's class names, then the label numbers beyond them."""
        return list(self.train.classes) + [str(c) for c in range(len(self.train.classes), self.num_classes)]


def eval_splits(checkpoint: str | Path, train: str | None, test: str | None) -> tuple[str, str]:
    """(train, test) shard folders of an evaluation: those given, else the checkpoint's ``data.train``
    and ``data.test``; a ConfigError saying what to pass when the config names none."""
    cfg = load_config(resolve_checkpoint(checkpoint) / "config.yaml")
    train, test = train or cfg.data.train, test or cfg.data.test
    if test is None:
        raise ConfigError(f"the run {cfg.name} was trained without data.test: pass --test DIR (labelled shards)")
    return train, test


def report_dir(checkpoint: str | Path, test: str, out: str | Path | None = None) -> Path:
    """Where :func:`evaluate` writes: ``out``, else ``<run>/eval-<test folder name>-<8 hex digits of the test
    data>``, with ``-2``, ``-3`` … added rather than overwrite an earlier report."""
    if out:
        return Path(out)
    run = resolve_checkpoint(checkpoint).parent.parent
    name = f"eval-{Path(test.rstrip('/')).name}-{digest(split_identity(test, read_manifest(test)))[:8]}"
    found, n = run / name, 1
    while (found / "report.json").exists():
        n += 1
        found = run / f"{name}-{n}"
    return found


def conversion_lines(cfg: ExperimentConfig, train: str, test: str) -> list[str]:
    """What reading ``train`` and ``test`` converts for the checkpoint's encoder (its ``data.channels``)."""
    if cfg.data.kind != "image":
        return []
    return [
        line
        for key, location in (("--train", train), ("--test", test))
        for line in conversion_notes(key, location, read_manifest(location), cfg.data.channels, None)
    ]


def evaluate(
    checkpoint: str | Path,
    train: str,
    test: str,
    out: str | Path | None = None,
    baselines: bool = True,
    threads: int | None = None,
    tsne: bool = False,
    context: list[str] | None = None,
) -> dict:
    """Score a checkpoint's encoder (and the baselines) on ``test`` against ``train``; writes the report
    to :func:`report_dir` and returns it (``selfsup.tracking.wandb_run.log_eval_report`` logs it to W&B).
    What reading the splits converts (RGB for a grey encoder …) is said once, as notes.

    For every encoder: kNN at each ``eval.knn`` setting and the linear probe. When the task gives
    several candidate layers, each encoder's best layer is chosen by kNN on held-out train samples.
    Baselines: the task's (raw pixels, log-mel) and the model at random initialisation. With the
    task's diagnostics, for the checkpoint: retrieval metrics, per-class scores, ROC, a PCA map of
    the test features (``tsne``: a t-SNE map too); with thumbnails, a query/neighbour grid. From the
    run folder: the training that produced the checkpoint and its curves (:func:`training_history`).
    ``context``: sentences the report adds to its paragraph on what the numbers mean. ``threads``: the
    CPU threads to use (None: the faster of all and one, timed by :func:`fastest_threads`).
    """
    ckpt = resolve_checkpoint(checkpoint)
    cfg, model_state, _ = load_checkpoint(ckpt)
    out = report_dir(ckpt, test, out)
    for line in conversion_lines(cfg, train, test):
        notes.info(line)
    task = task_for(cfg)
    ev = _Eval(ckpt, cfg, task.eval_spec(cfg), task.read_labelled(train, cfg), task.read_labelled(test, cfg))
    torch.set_num_threads(threads or fastest_threads(task, cfg, ev.train))
    features = model_features(task, cfg, model_state, ev.train, ev.test, "checkpoint", cfg.eval.probe_views)
    encoders, details = {}, {}
    encoders["checkpoint"], details["checkpoint"] = _scored(ev, "checkpoint", features)
    if baselines:
        for name, (scores, extra) in _baselines(task, ev).items():
            encoders[name], details[name] = scores, extra
    diagnostics = _diagnostics(ev, features, encoders, details["checkpoint"], tsne)
    out.mkdir(parents=True, exist_ok=True)
    predictions = details["checkpoint"]["predictions"]
    report = write_report(
        out,
        title=ev.spec.title,
        encoders=encoders,
        details={k: {kk: vv for kk, vv in v.items() if kk not in _ARRAYS} for k, v in details.items()}
        | {"checkpoint_path": str(ckpt), "skipped": ev.train.problems + ev.test.problems}
        | diagnostics["details"],
        class_names=ev.classes,
        confusion_matrix=confusion(ev.test.labels, predictions, ev.num_classes),
        roc=diagnostics["roc"],
        embedding_2d=diagnostics["maps"],
        figures=_neighbour_grid(out, ev, details["checkpoint"]),
        notes=_notes(ev, features, details["checkpoint"], diagnostics["notes"]),
        subject=ev.subject,
        training=training_history(ckpt),
        context=context,
    )
    print(format_table(encoders))
    print(f"report: {out / 'report.md'}")
    return report


def _scored(ev: _Eval, name: str, features: EncoderFeatures) -> tuple[dict, dict]:
    """:func:`score` of one encoder's features on the evaluation's splits, with the features' extras."""
    scores, details = score(
        name,
        features.bank,
        ev.train.labels,
        features.queries,
        ev.test.labels,
        ev.num_classes,
        [tuple(s) for s in ev.cfg.eval.knn],
        features.probe_train,
    )
    return scores, details | features.extra


def _baselines(task, ev: _Eval) -> dict[str, tuple[dict, dict]]:
    """{name: (scores, details without per-query arrays)} of the task's baselines and the model at
    random initialisation. They depend only on the splits and the configuration, so they are computed
    once and cached under the digest of both (the shards' manifests and files; everything in the
    configuration but the run's name, schedule, training and cluster settings)."""
    setup = ev.cfg.model_dump(mode="json", exclude={"name", "run_root", "optim", "train", "scaling", "tracking"})
    setup["data"] = {k: v for k, v in setup["data"].items() if k not in ("train", "test")}
    key = digest("baselines", ev.train.identity, ev.test.identity, setup, torch.__version__, __version__)
    cached = load_cached("baselines", key)
    if cached is not None:
        log.info("baselines %s from the cache", ", ".join(cached))
        return cached
    sets = baseline_features(task, ev.cfg, ev.train, ev.test)
    sets["random_init"] = model_features(task, ev.cfg, None, ev.train, ev.test, "random init", ev.cfg.eval.probe_views)
    scored = {}
    for name, features in sets.items():
        scores, details = _scored(ev, name, features)
        scored[name] = (scores, {k: v for k, v in details.items() if k not in _ARRAYS})
    scored = json.loads(json.dumps(scored, default=lambda v: v.item()))  # plain numbers, as the cache holds them
    store_cached("baselines", key, scored)
    return scored


def _diagnostics(ev: _Eval, features: EncoderFeatures, encoders: dict, best: dict, tsne: bool) -> dict:
    """For the checkpoint (its scores and ``best`` details), when the task has diagnostics: retrieval
    metrics (added to its scores), per-class scores, ROC, the 2-D maps, classes only in test, and
    their notes. {"details", "roc", "maps", "notes"}."""
    if not ev.spec.diagnostics:
        return {"details": {}, "roc": None, "maps": None, "notes": []}
    train_y, test_y, queries = ev.train.labels, ev.test.labels, features.queries
    ranked = np.sort(np.random.default_rng(0).permutation(len(queries))[:_RETRIEVAL_QUERIES])
    encoders["checkpoint"].update(retrieval_metrics(features.bank, train_y, queries[ranked], test_y[ranked]))
    maps = {"embedding": (project_2d(queries, "pca"), test_y)}
    if tsne:
        rows = np.random.default_rng(0).permutation(len(queries))[:_TSNE_POINTS]
        maps["embedding-tsne"] = (project_2d(queries[rows], "tsne"), test_y[rows])
    notes = []
    if len(ranked) < len(test_y):
        notes.append(
            f"retrieval metrics: {len(ranked)} random test queries, each ranking all {len(train_y)} train samples"
        )
    only_test = sorted(set(test_y.tolist()) - set(train_y.tolist()))
    if only_test:
        notes.append(f"classes present only in test (never predictable): {[ev.classes[c] for c in only_test]}")
    details = {
        "classes_only_in_test": only_test,
        "per_class": per_class_report(test_y, best["predictions"], ev.classes),
    }
    return {"details": details, "roc": roc_auc_ovr(test_y, best["probabilities"]), "maps": maps, "notes": notes}


def training_history(ckpt: Path) -> dict | None:
    """The training behind ``ckpt`` from its run folder: {"facts": steps, epochs, wall time, throughput,
    precision, machine; "records": the ``metrics.jsonl`` records up to the checkpoint}; None when the
    checkpoint is not in a run folder."""
    run, progress = ckpt.parent.parent, CheckpointProgress.read(ckpt)
    if not (run / "metrics.jsonl").is_file() or progress is None:
        return None
    samples = progress.samples_seen
    records = [r for r in read_records(run / "metrics.jsonl") if r.get("samples", 0) <= samples]
    summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").is_file() else {}
    final = summary if str(summary.get("checkpoint", "")).rstrip("/").endswith(ckpt.name) else {}
    last = records[-1] if records else {}
    seconds = final.get("train_seconds") or last.get("train_seconds")
    facts = {
        "steps": progress.step,
        "epochs": f"{progress.step / max(1, _steps_per_epoch(records)):.2f}",
        "samples seen": samples,
    }
    if seconds:
        facts |= {"training wall time": f"{seconds / 60:.1f} min", "throughput": f"{samples / seconds:.0f} samples/s"}
    facts |= {k: final[k] for k in ("precision", "machine", "world_size") if k in final}
    return {"facts": facts, "records": records}


def _steps_per_epoch(records: list[dict]) -> float:
    """Steps an epoch, read off the last step record (its step over its epoch)."""
    steps = [r for r in records if "total_steps" in r and r.get("epochs")]
    return steps[-1]["total_steps"] / steps[-1]["epochs"] if steps else 0.0


def _neighbour_grid(out: Path, ev: _Eval, best: dict) -> dict[str, str]:
    """neighbours.png (the first test sample of each class and its nearest train samples) when the
    splits have thumbnails: {"neighbours": its file name}, else {}."""
    if ev.train.thumbnails is None or ev.test.thumbnails is None:
        return {}
    shown = np.unique(ev.test.labels, return_index=True)[1][:_GRID_QUERIES]
    neighbours = best["neighbours"][shown, :_GRID_NEIGHBOURS]
    save_neighbour_grid(
        out / "neighbours.png",
        ev.test.thumbnails[shown],
        ev.train.thumbnails[neighbours],
        ev.test.labels[shown],
        ev.train.labels[neighbours],
        ev.classes,
        title=f"nearest train samples of test queries (green: same class): {ev.subject}",
    )
    return {"neighbours": "neighbours.png"}


def _notes(ev: _Eval, features: EncoderFeatures, best: dict, diagnostic_notes: list[str]) -> list[str]:
    """The report's notes: what was scored against what (with a warning when test is not held out),
    how the features and the probe were made, the diagnostics' notes and the skipped samples."""
    unit, bad = ev.spec.unit, ev.train.problems + ev.test.problems
    held = f", {features.held_out} held out to pick the layer" if features.held_out else ""
    notes = [
        f"checkpoint: {ev.ckpt}",
        f"train: {ev.train.location} ({len(ev.train.labels)} {unit}{held}), "
        f"test: {ev.test.location} ({len(ev.test.labels)} {unit})",
        *held_out_warnings(ev.train, ev.test),
        *ev.spec.notes,
    ]
    if ev.spec.probe_note:
        hp = best["linear_hparams"]
        notes.append(
            "linear probe (checkpoint): "
            + ev.spec.probe_note.format(lr=hp["lr"], weight_decay=hp["weight_decay"], top1=100 * hp["val_top1"])
        )
    notes += diagnostic_notes
    if bad:
        notes.append(
            f"skipped {len(ev.train.problems)} train and {len(ev.test.problems)} test {unit}: " + "; ".join(bad[:5])
        )
    return notes
