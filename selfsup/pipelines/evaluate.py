"""Checkpoint -> features -> kNN and linear probe -> report, beside raw-pixel and random-init baselines."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from ..config import ExperimentConfig
from ..eval.knn import weighted_knn
from ..eval.linear import linear_probe
from ..eval.metrics import confusion
from ..eval.report import format_table, write_report
from ..ssl import build_method
from ..vision.augment import BatchViews
from ..vision.backbones import build_backbone
from .checkpoint import load_checkpoint, resolve_checkpoint
from .loader import decode_image
from .shards import iter_shard, read_manifest

log = logging.getLogger("selfsup.evaluate")


def read_images(location: str, channels: int, size: int) -> tuple[torch.Tensor, np.ndarray, list[str], list[str]]:
    """Every decodable image of a shard folder, in order: uint8 (N, C, size, size), labels (N,),
    class names, and one line per skipped sample or shard."""
    manifest, urls = read_manifest(location)
    images, labels, problems = [], [], []
    with tqdm(total=manifest["num_samples"], desc=f"read {location}", unit="img", mininterval=1.0) as bar:
        for url in urls:
            try:
                for sample in iter_shard(url):
                    try:
                        img, label = decode_image(sample, channels, size)
                    except ValueError as err:
                        problems.append(f"{url}: {err}")
                        continue
                    images.append(img)
                    labels.append(label)
                    bar.update(1)
            except Exception as err:  # truncated tar
                problems.append(f"{url}: unreadable ({type(err).__name__}: {err})")
    if not images:
        raise ValueError(f"{location}: no decodable images; run `selfsup shards verify {location}`")
    return torch.stack(images), np.asarray(labels), manifest.get("classes", []), problems


@torch.no_grad()
def extract_features(encoder: nn.Module, images: torch.Tensor, views: BatchViews, batch_size: int = 1024,
                     desc: str = "features") -> np.ndarray:
    """Un-augmented features: uint8 (N, C, H, W) -> float32 (N, D)."""
    encoder.eval()
    out = []
    for i in tqdm(range(0, len(images), batch_size), desc=desc, unit="batch", mininterval=1.0):
        out.append(encoder(views.plain(images[i:i + batch_size])).float())
    return torch.cat(out).numpy()


def score(name: str, bank: np.ndarray, bank_y: np.ndarray, queries: np.ndarray, query_y: np.ndarray,
          num_classes: int, knn_settings) -> tuple[dict, dict]:
    """kNN at each (k, T) and the linear probe: ({metric: top-1 fraction}, details)."""
    log.info("scoring %s (%d-d features)", name, bank.shape[1])
    knn = weighted_knn(bank, bank_y, queries, query_y, settings=knn_settings, num_classes=num_classes)
    probe = linear_probe(bank, bank_y, queries, query_y, num_classes=num_classes)
    scores = {**knn.top1, "linear": probe.top1}
    details = {"knn_top5": knn.top5, "linear_top5": probe.top5,
               "linear_hparams": {"lr": probe.lr, "weight_decay": probe.weight_decay, "val_top1": probe.val_top1},
               "predictions": probe.predictions, "probabilities": probe.probabilities}
    return scores, details


def evaluate(checkpoint: str | Path, train: str, test: str, out: str | Path | None = None,
             baselines: bool = True, threads: int | None = None) -> dict:
    """Score a checkpoint's encoder (and the baselines) on ``test`` against ``train``; writes the report."""
    if threads:
        torch.set_num_threads(threads)
    ckpt = resolve_checkpoint(checkpoint)
    cfg, model_state, _ = load_checkpoint(ckpt)
    out = Path(out) if out else ckpt.parent.parent / f"eval-{Path(test.rstrip('/')).name}"
    d = cfg.data
    views = BatchViews(cfg.view_recipes(), d.image_size, d.mean, d.std)
    train_x, train_y, classes, bad_train = read_images(train, d.channels, d.image_size)
    test_x, test_y, _, bad_test = read_images(test, d.channels, d.image_size)
    num_classes = max(len(classes), int(max(train_y.max(), test_y.max())) + 1)
    classes = classes or [str(c) for c in range(num_classes)]
    knn_settings = [tuple(s) for s in cfg.eval.knn]

    encoders: dict[str, dict] = {}
    details: dict[str, dict] = {}
    trained = _encoder(cfg, model_state)
    bank = extract_features(trained, train_x, views, desc="features (checkpoint, train)")
    queries = extract_features(trained, test_x, views, desc="features (checkpoint, test)")
    encoders["checkpoint"], details["checkpoint"] = score("checkpoint", bank, train_y, queries, test_y,
                                                          num_classes, knn_settings)
    if baselines:
        flat = lambda x: x.reshape(len(x), -1).float().div(255).numpy()  # noqa: E731
        encoders["pixels"], details["pixels"] = score("pixels", flat(train_x), train_y, flat(test_x), test_y,
                                                      num_classes, knn_settings)
        torch.manual_seed(cfg.seed)
        random_init = _encoder(cfg, None)
        bank = extract_features(random_init, train_x, views, desc="features (random init, train)")
        queries = extract_features(random_init, test_x, views, desc="features (random init, test)")
        encoders["random_init"], details["random_init"] = score("random_init", bank, train_y, queries, test_y,
                                                                num_classes, knn_settings)
    best = details["checkpoint"]
    notes = [f"checkpoint: {ckpt}", f"train: {train} ({len(train_y)} samples), test: {test} ({len(test_y)} samples)"]
    if bad_train or bad_test:
        notes.append(f"skipped {len(bad_train)} train and {len(bad_test)} test samples: "
                     + "; ".join((bad_train + bad_test)[:5]))
    report = write_report(
        out, title=f"selfsup evaluation: {cfg.name} ({cfg.method.name}, {cfg.model.backbone} w{cfg.model.width})",
        encoders=encoders,
        details={k: {kk: vv for kk, vv in v.items() if kk not in ("predictions", "probabilities")}
                 for k, v in details.items()} | {"checkpoint_path": str(ckpt), "skipped": bad_train + bad_test},
        class_names=classes, confusion_matrix=confusion(test_y, best["predictions"], num_classes),
        notes=notes)
    print(format_table(encoders))
    print(f"report: {out / 'report.md'}")
    return report


def _encoder(cfg: ExperimentConfig, model_state: dict | None) -> nn.Module:
    """The method's encoder with the checkpoint's weights (or at random initialisation)."""
    backbone, dim = build_backbone(cfg.model.backbone, cfg.model.width, cfg.data.channels, cfg.model.small_stem,
                                   cfg.data.image_size)
    method = build_method(cfg.method, backbone, dim)
    if model_state is not None:
        method.load_state_dict(model_state)
    return method.encoder
