"""Checkpoint -> features -> kNN and linear probe -> report, beside raw-pixel and random-init baselines
(images), or log-mel and random-init baselines (wav2vec 2.0, ``evaluate_audio``)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from ..config import ExperimentConfig
from ..eval.knn import weighted_knn
from ..eval.linear import linear_probe, paper_crop_scale
from ..eval.metrics import confusion, per_class_report, project_2d, roc_auc_ovr
from ..eval.report import format_table, write_report
from ..eval.retrieval import retrieval_metrics, save_neighbour_grid
from ..vision.augment import BatchViews, ViewRecipe
from .checkpoint import checkpoint_step, load_checkpoint, resolve_checkpoint
from .loader import decode_image
from .pretrain import build_vision_method
from .shards import decode_sample, iter_shard, read_manifest

log = logging.getLogger("selfsup.evaluate")

_ARRAYS = ("predictions", "probabilities", "neighbours")  # per-query details kept out of report.json
_TSNE_POINTS = 2000  # test samples in the t-SNE map (t-SNE is quadratic)
_RETRIEVAL_QUERIES = 2000  # test queries that rank the whole bank (about 20 s against 60,000 on one core)
_GRID_QUERIES, _GRID_NEIGHBOURS = 10, 8  # neighbours.png: one query per class (at most 10), 8 neighbours each


def read_images(location: str, channels: int, size: int, limit: int | None = None,
                ) -> tuple[torch.Tensor, np.ndarray, list[str], list[str]]:
    """Every decodable image of a shard folder, in order: uint8 (N, C, size, size), labels (N,),
    class names, and one line per skipped sample or shard. ``limit``: at most that many images,
    taken evenly from the first samples of every shard."""
    manifest, urls = read_manifest(location)
    per_shard = -(-limit // max(1, len(urls))) if limit else None
    images, labels, problems = [], [], []
    total = min(limit, manifest["num_samples"]) if limit else manifest["num_samples"]
    with tqdm(total=total, desc=f"read {location}", unit="img", mininterval=1.0, disable=bool(limit)) as bar:
        for url in urls:
            taken = 0
            try:
                for sample in iter_shard(url):
                    if (per_shard and taken >= per_shard) or (limit and len(images) >= limit):
                        break
                    try:
                        img, label = decode_image(sample, channels, size)
                    except ValueError as err:
                        problems.append(f"{url}: {err}")
                        continue
                    images.append(img)
                    labels.append(label)
                    taken += 1
                    bar.update(1)
            except Exception as err:  # truncated tar
                problems.append(f"{url}: unreadable ({type(err).__name__}: {err})")
    if not images:
        raise ValueError(f"{location}: the split is empty (no decodable images); "
                         f"run `selfsup shards verify {location}`")
    return torch.stack(images), np.asarray(labels), manifest.get("classes", []), problems


@torch.no_grad()
def extract_features(encoder: nn.Module, images: torch.Tensor, views: BatchViews, batch_size: int = 256,
                     desc: str = "features", augment: bool = False) -> np.ndarray:
    """Features on the encoder's device: uint8 (N, C, H, W) -> float32 (N, D), un-augmented, or
    through ``views``' first recipe with ``augment``; NaN or inf features (diverged weights) are an
    error naming ``desc``."""
    encoder.eval().to(memory_format=torch.channels_last)  # faster convolutions on CPU and GPU
    device = next(encoder.parameters()).device
    out = []
    for i in tqdm(range(0, len(images), batch_size), desc=desc, unit="batch", mininterval=1.0):
        batch = images[i:i + batch_size].to(device)
        x = (views(batch)[0] if augment else views.plain(batch)).contiguous(memory_format=torch.channels_last)
        out.append(encoder(x).float().cpu())
    features = torch.cat(out).numpy()
    bad = int((~np.isfinite(features).all(axis=1)).sum())
    if bad:
        raise ValueError(f"{desc}: {bad} of {len(features)} feature rows are NaN or inf; "
                         "the weights have probably diverged (see the run's metrics.jsonl)")
    return features


def probe_features(encoder: nn.Module, images: torch.Tensor, views: BatchViews, n_views: int, seed: int = 0,
                   desc: str = "features") -> np.ndarray:
    """The linear probe's train rows: uint8 (N, C, H, W) -> float32 (n_views·N, D), the un-augmented
    features, then ``n_views`` - 1 passes of the paper probe's random-resized crops and flips
    (``paper_crop_scale``), block by block as ``linear_probe(train_views=n_views)`` reads them."""
    blocks = [extract_features(encoder, images, views, desc=desc)]
    if n_views > 1:
        device = next(encoder.parameters()).device
        crops = BatchViews([ViewRecipe(crop_scale=paper_crop_scale(views.size), flip_p=0.5)], views.size,
                           views.mean.flatten().tolist(), views.std.flatten().tolist(),
                           generator=torch.Generator(device=device).manual_seed(seed))
        blocks += [extract_features(encoder, images, crops, desc=f"{desc}, view {v + 1}/{n_views}", augment=True)
                   for v in range(1, n_views)]
    return np.concatenate(blocks)


def score(name: str, bank: np.ndarray, bank_y: np.ndarray, queries: np.ndarray, query_y: np.ndarray,
          num_classes: int, knn_settings, probe_train: np.ndarray | None = None) -> tuple[dict, dict]:
    """kNN of ``queries`` (M, D) against ``bank`` (N, D) at each (k, T), and the linear probe, trained on
    ``probe_train`` ((V·N, D) from ``probe_features``) or else on ``bank``: ({metric: top-1}, details)."""
    log.info("scoring %s (%d-d features)", name, bank.shape[1])
    knn = weighted_knn(bank, bank_y, queries, query_y, settings=knn_settings, num_classes=num_classes)
    views = 1 if probe_train is None else len(probe_train) // len(bank)
    probe = linear_probe(bank if probe_train is None else probe_train, np.tile(bank_y, views), queries, query_y,
                         num_classes=num_classes, train_views=views)
    scores = {**knn.top1, "linear": probe.top1}
    details = {"knn_top5": knn.top5, "linear_top5": probe.top5,
               "linear_hparams": {"lr": probe.lr, "weight_decay": probe.weight_decay, "val_top1": probe.val_top1},
               "predictions": probe.predictions, "probabilities": probe.probabilities, "neighbours": knn.neighbours}
    return scores, details


def evaluate(checkpoint: str | Path, train: str, test: str, out: str | Path | None = None,
             baselines: bool = True, threads: int | None = None, tsne: bool = False, tracking: bool = True) -> dict:
    """Score a checkpoint's encoder (and the baselines) on ``test`` against ``train``; writes the report.

    For the checkpoint: kNN, linear probe, retrieval metrics, per-class scores, ROC, confusion,
    a PCA map of the test features (``tsne``: a t-SNE map too) and a query/neighbour grid. With
    ``tracking`` and the run's ``tracking.mode`` not "disabled", the same goes to its W&B run.
    """
    if threads:
        torch.set_num_threads(threads)
    ckpt = resolve_checkpoint(checkpoint)
    cfg, model_state, _ = load_checkpoint(ckpt)
    if cfg.method.name == "wav2vec2":
        return evaluate_audio(ckpt, train, test, out, baselines)
    out = Path(out) if out else ckpt.parent.parent / f"eval-{Path(test.rstrip('/')).name}"
    d = cfg.data
    views = BatchViews(cfg.view_recipes(), d.image_size, d.mean, d.std)
    train_x, train_y, classes, bad_train = read_images(train, d.channels, d.image_size)
    test_x, test_y, _, bad_test = read_images(test, d.channels, d.image_size)
    num_classes = max(len(classes), int(max(train_y.max(), test_y.max())) + 1)
    classes = list(classes) + [str(c) for c in range(len(classes), num_classes)]
    knn_settings = [tuple(s) for s in cfg.eval.knn]

    encoders: dict[str, dict] = {}
    details: dict[str, dict] = {}
    def features(encoder: nn.Module, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(probe train rows (V·N, D), bank (N, D): their un-augmented block, queries (M, D))."""
        probe_train = probe_features(encoder, train_x, views, cfg.eval.probe_views, desc=f"features ({name}, train)")
        return probe_train, probe_train[: len(train_x)], extract_features(encoder, test_x, views,
                                                                          desc=f"features ({name}, test)")

    probe_train, bank, queries = features(_encoder(cfg, model_state, eval_device()), "checkpoint")
    encoders["checkpoint"], details["checkpoint"] = score("checkpoint", bank, train_y, queries, test_y,
                                                          num_classes, knn_settings, probe_train)
    ranked = np.sort(np.random.default_rng(0).permutation(len(queries))[:_RETRIEVAL_QUERIES])
    encoders["checkpoint"].update(retrieval_metrics(bank, train_y, queries[ranked], test_y[ranked]))
    maps = {"embedding": (project_2d(queries, "pca"), test_y)}
    if tsne:
        rows = np.random.default_rng(0).permutation(len(queries))[:_TSNE_POINTS]
        maps["embedding-tsne"] = (project_2d(queries[rows], "tsne"), test_y[rows])
    if baselines:
        flat = lambda x: x.reshape(len(x), -1).float().div(255).numpy()  # noqa: E731
        encoders["pixels"], details["pixels"] = score("pixels", flat(train_x), train_y, flat(test_x), test_y,
                                                      num_classes, knn_settings)
        torch.manual_seed(cfg.seed)
        probe_train, bank, queries = features(_encoder(cfg, None, eval_device()), "random init")
        encoders["random_init"], details["random_init"] = score("random_init", bank, train_y, queries, test_y,
                                                                num_classes, knn_settings, probe_train)
    best = details["checkpoint"]
    hp = best["linear_hparams"]
    notes = [f"checkpoint: {ckpt}", f"train: {train} ({len(train_y)} samples), test: {test} ({len(test_y)} samples)",
             f"linear probe (checkpoint): {cfg.eval.probe_views} view(s) per train image (un-augmented + crops and flips); "
             f"lr={hp['lr']:g}, weight_decay={hp['weight_decay']:g} chosen on held-out train images "
             f"(top-1 {100 * hp['val_top1']:.2f}%); per-class scores, ROC and confusion are its predictions"]
    if len(ranked) < len(test_y):
        notes.append(f"retrieval metrics: {len(ranked)} random test queries, each ranking all {len(train_y)} train samples")
    only_test = sorted(set(test_y.tolist()) - set(train_y.tolist()))
    if only_test:
        notes.append(f"classes present only in test (never predictable): {[classes[c] for c in only_test]}")
    if bad_train or bad_test:
        notes.append(f"skipped {len(bad_train)} train and {len(bad_test)} test samples: "
                     + "; ".join((bad_train + bad_test)[:5]))
    out.mkdir(parents=True, exist_ok=True)
    shown = np.unique(test_y, return_index=True)[1][:_GRID_QUERIES]  # the first test sample of each class
    save_neighbour_grid(out / "neighbours.png", test_x[shown], train_x[best["neighbours"][shown, :_GRID_NEIGHBOURS]],
                        test_y[shown], train_y[best["neighbours"][shown, :_GRID_NEIGHBOURS]], classes)
    report = write_report(
        out, title=f"selfsup evaluation: {cfg.name} ({cfg.method.name}, {cfg.model.backbone} w{cfg.model.width})",
        encoders=encoders,
        details={k: {kk: vv for kk, vv in v.items() if kk not in _ARRAYS} for k, v in details.items()}
        | {"checkpoint_path": str(ckpt), "skipped": bad_train + bad_test, "classes_only_in_test": only_test,
           "per_class": per_class_report(test_y, best["predictions"], classes)},
        class_names=classes, confusion_matrix=confusion(test_y, best["predictions"], num_classes),
        roc=roc_auc_ovr(test_y, best["probabilities"]), embedding_2d=maps, figures={"neighbours": "neighbours.png"},
        notes=notes)
    if tracking and cfg.tracking.mode != "disabled":
        log_to_wandb(ckpt, cfg, report, out)
    print(format_table(encoders))
    print(f"report: {out / 'report.md'}")
    return report


def log_to_wandb(ckpt: Path, cfg: ExperimentConfig, report: dict, out: Path) -> None:
    """The report's numbers (``eval/<encoder>/<metric>`` against ``eval/step``, the checkpoint's
    step), its tables and its PNGs, to the W&B run of the checkpoint's run (resumed by id, job_type "eval")."""
    import wandb

    from ..cluster.tracking import start_run

    if ckpt.parent.name != "checkpoints":
        log.info("W&B: %s is not inside a run's checkpoints/ folder; not logged", ckpt)
        return
    run = start_run(ckpt.parent.parent, cfg.name, cfg.tracking.mode, cfg.tracking.project, cfg.tracking.entity,
                    cfg.model_dump(mode="json"), job_type="eval")
    run.define_metric("eval/step")
    run.define_metric("eval/*", step_metric="eval/step")
    encoders = report["encoders"]
    metrics = list(dict.fromkeys(m for values in encoders.values() for m in values))
    per_class = report["details"]["per_class"]
    record = {f"eval/{name}/{m}": v for name, values in encoders.items() for m, v in values.items()}
    record |= {f"eval/{key}": wandb.Image(str(out / name)) for key, name in report["files"].items() if name.endswith(".png")}
    record["eval/scores"] = wandb.Table(columns=["encoder", *metrics],
                                        data=[[name, *[values.get(m) for m in metrics]] for name, values in encoders.items()])
    record["eval/per_class"] = wandb.Table(columns=list(per_class[0]), data=[list(r.values()) for r in per_class])
    run.log({"eval/step": checkpoint_step(ckpt), **record})
    run.summary.update({"eval/checkpoint": str(ckpt), "eval/linear_hparams": report["details"]["checkpoint"]["linear_hparams"]})
    run.finish()


def eval_device() -> torch.device:
    """Where evaluation runs the encoders: the GPU when there is one."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _encoder(cfg: ExperimentConfig, model_state: dict | None, device: torch.device | str = "cpu") -> nn.Module:
    """The method's encoder on ``device`` with the checkpoint's weights (or at random initialisation)."""
    method = build_vision_method(cfg)
    if model_state is not None:
        method.load_state_dict(model_state)
    return method.encoder.to(device)


def read_audio(location: str) -> tuple[list[np.ndarray], np.ndarray, list[str], list[str], list[str]]:
    """Every decodable clip of an audio shard folder, in order: float32 (T_i,) 16 kHz waveforms,
    labels (N,), group per clip (its ``voice`` or ``speaker`` column, else ""), class names, and one
    line per skipped sample or shard."""
    manifest, urls = read_manifest(location)
    waves, labels, groups, problems = [], [], [], []
    for url in urls:
        try:
            for sample in iter_shard(url):
                try:
                    (wave, _), info = decode_sample(sample, "audio")
                    if info.get("label", "") in ("", None):
                        raise ValueError(f"sample {sample.get('__key__')}: no label in its .json")
                except ValueError as err:
                    problems.append(f"{url}: {err}")
                    continue
                waves.append(wave)
                labels.append(int(info["label"]))
                groups.append(str(info.get("voice", info.get("speaker", ""))))
        except Exception as err:  # truncated tar
            problems.append(f"{url}: unreadable ({type(err).__name__}: {err})")
    if not waves:
        raise ValueError(f"{location}: no decodable labelled clips; run `selfsup shards verify {location}`")
    return waves, np.asarray(labels), groups, manifest.get("classes", []), problems


@torch.no_grad()
def audio_layer_features(encoder: nn.Module, waves: list[np.ndarray], min_samples: int,
                         desc: str = "features") -> list[np.ndarray]:
    """Mean over frames of every encoder layer's output, one clip at a time (no padding effects):
    [(N, D)] for the projected features and each transformer layer. Clips under ``min_samples``
    (the receptive field) are zero-padded to it."""
    encoder.eval()
    per_layer: list[list[torch.Tensor]] = []
    for wave in tqdm(waves, desc=desc, unit="clip", mininterval=1.0):
        x = torch.from_numpy(np.pad(wave, (0, max(0, min_samples - len(wave)))))[None]
        layers, _ = encoder(x, torch.tensor([x.shape[1]]))
        if not per_layer:
            per_layer = [[] for _ in layers]
        for i, h in enumerate(layers):
            per_layer[i].append(h[0].float().mean(dim=0))
    return [torch.stack(f).numpy() for f in per_layer]


def log_mel_features(waves: list[np.ndarray], n_mels: int = 80) -> np.ndarray:
    """The log-mel baseline: 25 ms windows, 10 ms hop, ``n_mels`` bands; mean and std over time -> (N, 2 * n_mels)."""
    import torchaudio

    mel = torchaudio.transforms.MelSpectrogram(sample_rate=16_000, n_fft=400, hop_length=160, n_mels=n_mels)
    out = []
    for wave in waves:
        spec = torch.log(mel(torch.from_numpy(wave)) + 1e-6)  # (n_mels, frames)
        out.append(torch.cat([spec.mean(dim=1), spec.std(dim=1, correction=0)]))
    return torch.stack(out).numpy()


def _standardise(train_x: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    """Z-score every feature with the train rows' mean and std (features of different encoders and
    layers differ wildly in offset and scale, which cosine kNN would otherwise see)."""
    mean, std = train_x.mean(axis=0), train_x.std(axis=0) + 1e-6
    return [(x - mean) / std for x in (train_x, *others)]


def holdout_split(labels: np.ndarray, groups: list[str], fraction: float, seed: int) -> np.ndarray:
    """Boolean (N,) mask of held-out train rows: whole groups (voices/speakers) when the clips have
    them, as the test split holds unseen voices; else a random ``fraction`` of rows."""
    rng = np.random.default_rng(seed)
    names = sorted(set(groups))
    if len(names) >= 5:
        held = set(rng.permutation(names)[: max(1, round(fraction * len(names)))].tolist())
        mask = np.array([g in held for g in groups])
        if len(np.unique(labels[~mask])) == len(np.unique(labels)):
            return mask
    mask = np.zeros(len(labels), dtype=bool)
    mask[rng.permutation(len(labels))[: max(1, round(fraction * len(labels)))]] = True
    return mask


def best_layer(train_layers: list[np.ndarray], labels: np.ndarray, held: np.ndarray, num_classes: int) -> tuple[int, list[float]]:
    """The layer whose features classify the held-out train rows best by weighted kNN@20 (T=0.07)
    against the rest: (layer index, held-out top-1 of every layer)."""
    k, scores = min(20, int((~held).sum())), []
    for x in train_layers:
        fit, val = _standardise(x[~held], x[held])
        result = weighted_knn(fit, labels[~held], val, labels[held], settings=[(k, 0.07)], num_classes=num_classes)
        scores.append(result.top1[f"knn@{k}"])
    return int(np.argmax(scores)), scores


def evaluate_audio(checkpoint: str | Path, train: str, test: str, out: str | Path | None = None,
                   baselines: bool = True, holdout: float = 0.2) -> dict:
    """Score a wav2vec 2.0 checkpoint on labelled audio shards; writes the report to ``out`` and
    returns ``{"scores": {encoder: {metric: top-1}}, "details": {encoder: {...}}, "report": out}``.

    Every encoder layer is mean-pooled; the layer is picked by kNN on a held-out part of ``train``
    (``holdout``, by voice/speaker when known); kNN and the linear probe then score it on ``test``
    with all of ``train`` as the bank. Baselines, through the same evaluators: log-mel (mean + std
    pooled) and the same model at random initialisation (its own best layer).
    """
    from ..audio.feature_encoder import receptive_field
    from ..audio.wav2vec2 import Wav2Vec2Pretraining

    ckpt = resolve_checkpoint(checkpoint)
    cfg, model_state, _ = load_checkpoint(ckpt)
    out = Path(out) if out else ckpt.parent.parent / f"eval-{Path(test.rstrip('/')).name}"
    train_w, train_y, groups, classes, bad_train = read_audio(train)
    test_w, test_y, _, _, bad_test = read_audio(test)
    num_classes = max(len(classes), int(max(train_y.max(), test_y.max())) + 1)
    classes = classes or [str(c) for c in range(num_classes)]
    knn_settings = [tuple(s) for s in cfg.eval.knn]
    held = holdout_split(train_y, groups, holdout, cfg.seed)
    min_samples, _ = receptive_field(cfg.method.conv_kernels, cfg.method.conv_strides)

    def model_features(state: dict | None, name: str) -> tuple[np.ndarray, np.ndarray, dict]:
        torch.manual_seed(cfg.seed)
        objective = Wav2Vec2Pretraining(cfg.method)
        if state is not None:
            objective.load_state_dict(state)
        train_layers = audio_layer_features(objective.encoder, train_w, min_samples, f"features ({name}, train)")
        layer, val_scores = best_layer(train_layers, train_y, held, num_classes)
        log.info("%s: layer %d is best on held-out train (kNN@20 per layer %s)", name, layer,
                 [round(v, 3) for v in val_scores])
        test_layer = audio_layer_features(objective.encoder, test_w, min_samples, f"features ({name}, test)")[layer]
        return train_layers[layer], test_layer, {"layer": layer, "heldout_knn20_per_layer": val_scores}

    features = {"checkpoint": model_features(model_state, "checkpoint")}
    if baselines:
        features["log_mel"] = (log_mel_features(train_w), log_mel_features(test_w), {})
        features["random_init"] = model_features(None, "random_init")
    encoders: dict[str, dict] = {}
    details: dict[str, dict] = {}
    for name, (bank, queries, extra) in features.items():
        bank, queries = _standardise(bank, queries)
        encoders[name], details[name] = score(name, bank, train_y, queries, test_y, num_classes, knn_settings)
        details[name].update(extra)
    notes = [f"checkpoint: {ckpt}", f"train: {train} ({len(train_y)} clips, {int(held.sum())} held out to pick "
             f"the layer), test: {test} ({len(test_y)} clips)",
             "features: mean over frames of one encoder layer (0 = projected conv features), z-scored with "
             "train statistics; log-mel: 80 bands, mean + std over time"]
    if bad_train or bad_test:
        notes.append(f"skipped {len(bad_train)} train and {len(bad_test)} test clips: "
                     + "; ".join((bad_train + bad_test)[:5]))
    plain = {k: {kk: vv for kk, vv in v.items() if kk not in _ARRAYS} for k, v in details.items()}
    write_report(
        out, title=f"selfsup evaluation: {cfg.name} (wav2vec2, {cfg.method.num_layers} layers of {cfg.method.embed_dim})",
        encoders=encoders, details=plain | {"checkpoint_path": str(ckpt), "skipped": bad_train + bad_test},
        class_names=classes, confusion_matrix=confusion(test_y, details["checkpoint"]["predictions"], num_classes),
        notes=notes)
    print(format_table(encoders))
    print(f"report: {out / 'report.md'}")
    return {"scores": encoders, "details": plain, "report": out}
