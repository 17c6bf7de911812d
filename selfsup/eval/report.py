"""Evaluation report: report.json, report.md and PNG plots (matplotlib Agg) in one directory.

report.json holds a top-level "encoders" object: encoder name -> metric -> value, accuracies as
FRACTIONS in [0, 1] ("knn@20", "knn@200", "linear", ...); report.md shows them as percentages.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

_FRACTION_PREFIXES = ("knn", "linear", "recall@", "precision@", "map", "top1", "top5")


def is_fraction(metric: str) -> bool:
    """Whether ``metric`` is an accuracy-like fraction (shown as a percentage)."""
    return metric.startswith(_FRACTION_PREFIXES)


def format_table(encoders: dict[str, dict[str, float]]) -> str:
    """Markdown table: one row per encoder, one column per metric (first-seen order); fractions as %."""
    metrics = list(dict.fromkeys(m for values in encoders.values() for m in values))
    header = ["encoder", *[f"{m} (%)" if is_fraction(m) else m for m in metrics]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" + "---:|" * len(metrics)]
    for name, values in encoders.items():
        cells = [_cell(m, values[m]) if m in values else "–" for m in metrics]
        lines.append("| " + " | ".join([name, *cells]) + " |")
    return "\n".join(lines)


def _cell(metric: str, value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{100 * value:.2f}" if is_fraction(metric) else f"{value:.4g}"


def write_report(
    out_dir: Path,
    *,
    title: str,
    encoders: dict[str, dict[str, float]],
    details: dict | None = None,
    class_names: list[str] | None = None,
    confusion_matrix: np.ndarray | None = None,
    roc: dict | None = None,
    embedding_2d: tuple[np.ndarray, np.ndarray] | dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
    figures: dict[str, str] | None = None,
    notes: list[str] | None = None,
) -> dict:
    """Write report.json, report.md and the plots that the arguments allow; return the report dict.

    ``confusion_matrix``: (C, C) counts, rows = true class. ``roc``: the dict of
    :func:`selfsup.eval.metrics.roc_auc_ovr`. ``embedding_2d``: ((N, 2) points, (N,) labels) for
    embedding.png, or file stem -> such a pair (one PNG each). ``figures``: PNGs the caller already
    wrote in ``out_dir``, key -> file name, listed with the others.
    ``details["per_class"]``: rows of :func:`selfsup.eval.metrics.per_class_report`, or
    encoder name -> such rows; written to per_class.md and shown in report.md.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, values in encoders.items():
        for metric, value in values.items():
            if is_fraction(metric) and value is not None and not 0.0 <= value <= 1.0:
                raise ValueError(f"encoders[{name!r}][{metric!r}] = {value}: accuracies must be fractions in [0, 1]")
    details = dict(details or {})
    notes = list(notes or [])

    def label(c: int) -> str:
        return str(class_names[c]) if class_names is not None and c < len(class_names) else str(c)

    files = _write_plots(out_dir, label, details, notes, confusion_matrix, roc, embedding_2d)
    for key, name in (figures or {}).items():
        if not (out_dir / name).is_file():
            raise FileNotFoundError(f"figure {key!r}: {out_dir / name} does not exist")
        files[key] = name
    if "per_class" in details:
        files["per_class"] = _write_per_class(out_dir / "per_class.md", details["per_class"])

    files = {"json": "report.json", "markdown": "report.md", **files}
    report = {"title": title, "encoders": encoders, "details": details, "notes": notes, "files": files}
    (out_dir / "report.json").write_text(json.dumps(_jsonable(report), indent=2, allow_nan=False) + "\n")
    _write_markdown(out_dir, title, encoders, notes, files)
    return report


def _write_plots(out_dir: Path, label, details: dict, notes: list[str], confusion_matrix, roc,
                 embedding_2d) -> dict[str, str]:
    """The plots of :func:`write_report`'s arguments that are given, key -> PNG name; the ROC's AUCs
    go into ``details`` and its skipped classes into ``notes``."""
    files: dict[str, str] = {}
    if confusion_matrix is not None:
        files["confusion"] = _plot_confusion(out_dir / "confusion.png", np.asarray(confusion_matrix), label)
    if roc is not None:
        files["roc"] = _plot_roc(out_dir / "roc.png", roc, label)
        details["roc_auc"] = {"macro": roc["macro"], "per_class": {label(c): a for c, a in roc["per_class"].items()}}
        if roc.get("skipped"):
            notes.append(f"ROC AUC skipped classes without positives or negatives: {[label(c) for c in roc['skipped']]}")
    if embedding_2d is not None:
        maps = embedding_2d if isinstance(embedding_2d, dict) else {"embedding": embedding_2d}
        for stem, (points, labels) in maps.items():
            files[stem] = _plot_embedding(out_dir / f"{stem}.png", points, labels, label)
    return files


def _write_markdown(out_dir: Path, title: str, encoders: dict[str, dict[str, float]], notes: list[str],
                    files: dict[str, str]) -> None:
    """report.md: the title, the metrics table, the notes, the plots and the per-class tables."""
    md = [f"# {title}", "", format_table(encoders), ""]
    md += [f"- {note}" for note in notes] + ([""] if notes else [])
    md += [f"![{key}]({name})" for key, name in files.items() if name.endswith(".png")]
    if "per_class" in files:
        md += ["", "## Per-class metrics", "", (out_dir / files["per_class"]).read_text()]
    (out_dir / "report.md").write_text("\n".join(md) + "\n")


def _jsonable(x):
    """Numpy values to Python; NaN / inf to None (strict JSON)."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def _plot_confusion(path: Path, cm: np.ndarray, label) -> str:
    c = len(cm)
    fig, ax = plt.subplots(figsize=(max(4, 0.45 * c + 2), max(3.5, 0.45 * c + 1.5)))
    image = ax.imshow(cm, cmap="Blues")
    fig.colorbar(image, ax=ax)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if c <= 30:
        ax.set_xticks(range(c), [label(i) for i in range(c)], rotation=90, fontsize=7)
        ax.set_yticks(range(c), [label(i) for i in range(c)], fontsize=7)
    if c <= 15:
        for i in range(c):
            for j in range(c):
                ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=6,
                        color="white" if cm[i, j] > cm.max() / 2 else "black")
    return _save(fig, path)


def _plot_roc(path: Path, roc: dict, label) -> str:
    fig, ax = plt.subplots(figsize=(5, 4.5))
    for c, (fpr, tpr) in roc["curves"].items():
        ax.plot(fpr, tpr, lw=1, label=f"{label(c)} ({roc['per_class'][c]:.3f})")
    ax.plot([0, 1], [0, 1], "k--", lw=0.7)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(f"one-vs-rest ROC, macro AUC {roc['macro']:.3f}")
    if len(roc["curves"]) <= 12:
        ax.legend(fontsize=7)
    return _save(fig, path)


def _plot_embedding(path: Path, points: np.ndarray, labels: np.ndarray, label) -> str:
    points, labels = np.asarray(points), np.asarray(labels)
    if points.ndim != 2 or points.shape[1] != 2 or len(labels) != len(points):
        raise ValueError(f"embedding_2d needs (N, 2) points and (N,) labels, got {points.shape} and {labels.shape}")
    fig, ax = plt.subplots(figsize=(5.5, 5))
    classes = np.unique(labels)
    cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
    for i, c in enumerate(classes):
        keep = labels == c
        ax.scatter(points[keep, 0], points[keep, 1], s=4, color=cmap(i % cmap.N), label=label(int(c)))
    if len(classes) <= 20:
        ax.legend(fontsize=7, markerscale=3)
    ax.set_xticks([])
    ax.set_yticks([])
    return _save(fig, path)


def _write_per_class(path: Path, per_class) -> str:
    groups = per_class if isinstance(per_class, dict) else {"": per_class}
    lines = []
    for encoder, rows in groups.items():
        if encoder:
            lines += [f"## {encoder}", ""]
        lines += ["| class | precision (%) | recall (%) | f1 (%) | support |", "|---|---:|---:|---:|---:|"]
        lines += [
            f"| {r['class']} | {100 * r['precision']:.2f} | {100 * r['recall']:.2f} | {100 * r['f1']:.2f} | {r['support']} |"
            for r in rows
        ]
        lines.append("")
    path.write_text("\n".join(lines))
    return path.name
