"""Evaluation report: report.json, report.md, a self-contained report.html (the plots embedded) and
PNG plots (matplotlib Agg) in one directory.

report.json holds a top-level "encoders" object: encoder name -> metric -> value, accuracies as
FRACTIONS in [0, 1] ("knn@20", "knn@200", "linear", ...); report.md shows them as percentages, with
each encoder's margin over the model at random initialisation (``REFERENCE``).
"""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

_FRACTION_PREFIXES = ("knn", "linear", "recall@", "precision@", "map", "top1", "top5")
REFERENCE = "random_init"  # the encoder every other one's margin is measured against
MARGINS = ("knn@20", "linear")  # the metrics whose margin over REFERENCE the table shows
MEANING = (
    "kNN@k labels each test sample by its k nearest train samples in the encoder's feature space "
    "(weighted by similarity); linear trains one linear layer on the frozen features. "
    "`random_init` is the same network before any training, so the margin over it is what "
    "pretraining added; the task's baseline (raw pixels, log-mel) needs no network at all."
)


def is_fraction(metric: str) -> bool:
    """Whether ``metric`` is an accuracy-like fraction (shown as a percentage)."""
    return metric.startswith(_FRACTION_PREFIXES)


def table_rows(encoders: dict[str, dict[str, float]]) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the metrics table: one row per encoder, one column per metric (first-seen
    order), fractions as %, then the margin over ``REFERENCE`` of each of ``MARGINS`` (in points)."""
    metrics = list(dict.fromkeys(m for values in encoders.values() for m in values))
    reference = encoders.get(REFERENCE, {})
    margins = [m for m in MARGINS if m in reference and m in metrics]
    header = [
        "encoder",
        *[f"{m} (%)" if is_fraction(m) else m for m in metrics],
        *[f"{m} vs random init" for m in margins],
    ]
    rows = []
    for name, values in encoders.items():
        cells = [_cell(m, values[m]) if m in values else "–" for m in metrics]
        cells += [
            "–" if name == REFERENCE or values.get(m) is None else f"{100 * (values[m] - reference[m]):+.2f}"
            for m in margins
        ]
        rows.append([name, *cells])
    return header, rows


def format_table(encoders: dict[str, dict[str, float]]) -> str:
    """The metrics table of :func:`table_rows` in markdown."""
    header, rows = table_rows(encoders)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" + "---:|" * (len(header) - 1)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


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
    subject: str = "",
    training: dict | None = None,
    context: list[str] | None = None,
) -> dict:
    """Write report.json, report.md and the plots that the arguments allow; return the report dict.

    ``confusion_matrix``: (C, C) counts, rows = true class. ``roc``: the dict of
    :func:`selfsup.eval.metrics.roc_auc_ovr`. ``embedding_2d``: ((N, 2) points, (N,) labels) for
    embedding.png, or file stem -> such a pair (one PNG each). ``figures``: PNGs the caller already
    wrote in ``out_dir``, key -> file name, listed with the others. ``subject``: which encoder on
    which data, for the plots' titles. ``training``: the run behind the checkpoint, ``{"facts": {name:
    value}, "records": metrics.jsonl records}`` (training.png: loss and the online kNN@20 against
    epoch, with the levels it must beat). ``context``: sentences after the paragraph on what the numbers mean.
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

    files = _write_plots(out_dir, label, details, notes, confusion_matrix, roc, embedding_2d, subject)
    if training and any("monitor/knn@20" in r or "loss" in r for r in training["records"]):
        files = {"training": _plot_training(out_dir / "training.png", training["records"], subject), **files}
    for key, name in (figures or {}).items():
        if not (out_dir / name).is_file():
            raise FileNotFoundError(f"figure {key!r}: {out_dir / name} does not exist")
        files[key] = name
    if "per_class" in details:
        files["per_class"] = _write_per_class(out_dir / "per_class.md", details["per_class"])

    files = {"json": "report.json", "markdown": "report.md", **files}
    files["html"] = "report.html"
    facts = (training or {}).get("facts", {})
    report = {
        "title": title,
        "encoders": encoders,
        "details": details,
        "notes": notes,
        "files": files,
        "training": facts,
        "meaning": [MEANING, *(context or [])],
    }
    (out_dir / "report.json").write_text(json.dumps(_jsonable(report), indent=2, allow_nan=False) + "\n")
    _write_markdown(out_dir, report)
    _write_html(out_dir, report)
    return report


def _write_plots(
    out_dir: Path, label, details: dict, notes: list[str], confusion_matrix, roc, embedding_2d, subject: str
) -> dict[str, str]:
    """The plots of :func:`write_report`'s arguments that are given, key -> PNG name; the ROC's AUCs
    go into ``details`` and its skipped classes into ``notes``."""
    files: dict[str, str] = {}
    if confusion_matrix is not None:
        files["confusion"] = _plot_confusion(
            out_dir / "confusion.png", np.asarray(confusion_matrix), label, f"linear probe confusion: {subject}"
        )
    if roc is not None:
        files["roc"] = _plot_roc(out_dir / "roc.png", roc, label, subject)
        details["roc_auc"] = {"macro": roc["macro"], "per_class": {label(c): a for c, a in roc["per_class"].items()}}
        if roc.get("skipped"):
            skipped = [label(c) for c in roc["skipped"]]
            notes.append(f"ROC AUC skipped classes without positives or negatives: {skipped}")
    if embedding_2d is not None:
        maps = embedding_2d if isinstance(embedding_2d, dict) else {"embedding": embedding_2d}
        for stem, (points, labels) in maps.items():
            method = "t-SNE" if "tsne" in stem else "PCA"
            files[stem] = _plot_embedding(
                out_dir / f"{stem}.png", points, labels, label, f"{method} of the test features: {subject}", method
            )
    return files


def _write_markdown(out_dir: Path, report: dict) -> None:
    """report.md: the title, the metrics table, what the numbers mean, the training, the notes, the
    plots and the per-class tables."""
    files = report["files"]
    md = [f"# {report['title']}", "", format_table(report["encoders"]), "", " ".join(report["meaning"]), ""]
    if report["training"]:
        md += ["## Training", ""] + [f"- {k}: {v}" for k, v in report["training"].items()] + [""]
    md += [f"- {note}" for note in report["notes"]] + ([""] if report["notes"] else [])
    md += [f"![{key}]({name})" for key, name in files.items() if name.endswith(".png")]
    if "per_class" in files:
        md += ["", "## Per-class metrics", "", (out_dir / files["per_class"]).read_text()]
    (out_dir / "report.md").write_text("\n".join(md) + "\n")


def _write_html(out_dir: Path, report: dict) -> None:
    """report.html: report.md's content in one file, every plot embedded (base64 PNG), to send as it is."""
    e = html.escape
    header, rows = table_rows(report["encoders"])
    table = (
        "<table><tr>"
        + "".join(f"<th>{e(h)}</th>" for h in header)
        + "</tr>"
        + "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in rows)
        + "</table>"
    )
    parts = [f"<h1>{e(report['title'])}</h1>", table, f"<p>{e(' '.join(report['meaning']))}</p>"]
    if report["training"]:
        parts += ["<h2>Training</h2><ul>"] + [f"<li>{e(k)}: {e(str(v))}</li>" for k, v in report["training"].items()]
        parts.append("</ul>")
    parts += ["<h2>Notes</h2><ul>"] + [f"<li>{e(n)}</li>" for n in report["notes"]] + ["</ul>"]
    for key, name in report["files"].items():
        if name.endswith(".png"):
            data = base64.b64encode((out_dir / name).read_bytes()).decode("ascii")
            parts.append(f'<figure><img alt="{e(key)}" src="data:image/png;base64,{data}"></figure>')
    style = (
        "body{font-family:sans-serif;max-width:70em;margin:2em auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:.3em .6em;text-align:right}td:first-child{text-align:left}"
        "img{max-width:100%}"
    )
    (out_dir / "report.html").write_text(
        f"<!doctype html><html><head><meta charset='utf-8'><title>{e(report['title'])}"
        f"</title><style>{style}</style></head><body>{''.join(parts)}</body></html>\n"
    )


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


def _plot_confusion(path: Path, cm: np.ndarray, label, title: str) -> str:
    c = len(cm)
    fig, ax = plt.subplots(figsize=(max(5, 0.45 * c + 2.5), max(4.5, 0.45 * c + 2)))
    image = ax.imshow(cm, cmap="Blues")
    fig.colorbar(image, ax=ax, label="test samples")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if c <= 30:
        ax.set_xticks(range(c), [label(i) for i in range(c)], rotation=90, fontsize=7)
        ax.set_yticks(range(c), [label(i) for i in range(c)], fontsize=7)
    if c <= 15:
        for i in range(c):
            for j in range(c):
                ax.text(
                    j,
                    i,
                    str(int(cm[i, j])),
                    ha="center",
                    va="center",
                    fontsize=6,
                    color="white" if cm[i, j] > cm.max() / 2 else "black",
                )
    return _save(fig, path)


def _plot_roc(path: Path, roc: dict, label, subject: str) -> str:
    fig, ax = plt.subplots(figsize=(5, 4.5))
    for c, (fpr, tpr) in roc["curves"].items():
        ax.plot(fpr, tpr, lw=1, label=f"{label(c)} ({roc['per_class'][c]:.3f})")
    ax.plot([0, 1], [0, 1], "k--", lw=0.7)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(f"one-vs-rest ROC of the linear probe, macro AUC {roc['macro']:.3f}\n{subject}", fontsize=9)
    ax.legend(fontsize=6, ncol=1 if len(roc["curves"]) <= 12 else 3, title="class (AUC)", title_fontsize=7)
    return _save(fig, path)


def _plot_embedding(path: Path, points: np.ndarray, labels: np.ndarray, label, title: str, method: str) -> str:
    points, labels = np.asarray(points), np.asarray(labels)
    if points.ndim != 2 or points.shape[1] != 2 or len(labels) != len(points):
        raise ValueError(f"embedding_2d needs (N, 2) points and (N,) labels, got {points.shape} and {labels.shape}")
    fig, ax = plt.subplots(figsize=(5.5, 5))
    classes = np.unique(labels)
    cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
    for i, c in enumerate(classes):
        keep = labels == c
        ax.scatter(points[keep, 0], points[keep, 1], s=4, color=cmap(i % cmap.N), label=label(int(c)))
    ax.legend(fontsize=6, markerscale=3, ncol=1 if len(classes) <= 20 else 3, title="class", title_fontsize=7)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(f"{method} 1")
    ax.set_ylabel(f"{method} 2")
    ax.set_xticks([])
    ax.set_yticks([])
    return _save(fig, path)


def _plot_training(path: Path, records: list[dict], subject: str) -> str:
    """training.png: the loss (left) and the online kNN@20 (right, with the levels it must beat on the
    same subset as dashed lines) against epoch."""
    fig, (loss_ax, knn_ax) = plt.subplots(1, 2, figsize=(10, 4))
    steps = [r for r in records if "loss" in r and "epoch" in r and math.isfinite(r["loss"])]
    loss_ax.plot([r["epoch"] for r in steps], [r["loss"] for r in steps], lw=1, color="tab:blue")
    loss_ax.set(xlabel="epoch", ylabel="training loss", title="loss")
    checks = [r for r in records if "monitor/knn@20" in r]
    knn_ax.plot(
        [r["epoch"] for r in checks],
        [100 * r["monitor/knn@20"] for r in checks],
        "o-",
        color="tab:green",
        label="this encoder",
    )
    levels = {
        k: v for k, v in (checks[-1] if checks else {}).items() if k.endswith("_knn@20") and k != "monitor/knn@20"
    }
    for (key, value), colour in zip(levels.items(), ("tab:red", "tab:gray", "tab:purple", "tab:orange")):
        name = key.removeprefix("monitor/").removesuffix("_knn@20").replace("_", " ")
        knn_ax.axhline(100 * value, ls="--", lw=1, color=colour, label=f"{name} ({100 * value:.1f}%)")
    knn_ax.set(xlabel="epoch", ylabel="kNN@20 top-1 (%)", title="online kNN@20 on a held-out subset")
    knn_ax.legend(fontsize=7)
    fig.suptitle(f"training: {subject}", fontsize=10)
    return _save(fig, path)


def _write_per_class(path: Path, per_class) -> str:
    groups = per_class if isinstance(per_class, dict) else {"": per_class}
    lines = []
    for encoder, rows in groups.items():
        if encoder:
            lines += [f"## {encoder}", ""]
        lines += ["| class | precision (%) | recall (%) | f1 (%) | support |", "|---|---:|---:|---:|---:|"]
        lines += [
            f"| {r['class']} | {100 * r['precision']:.2f} | {100 * r['recall']:.2f} | {100 * r['f1']:.2f} "
            f"| {r['support']} |"
            for r in rows
        ]
        lines.append("")
    path.write_text("\n".join(lines))
    return path.name
