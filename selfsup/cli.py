"""``selfsup shards|pretrain|eval|export|demo …``: parse, validate, call. Nothing else lives here."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path


def _shards_write(args) -> None:
    from .pipelines import shards, sources

    if args.source == "fashion-mnist":
        (out,) = args.paths
        folder = sources.find_fashion_mnist(Path(out) / "download" if args.download else None)
        for split in ("train", "test"):
            samples, n = sources.fashion_mnist_samples(split, folder)
            shards.write_shards(samples, Path(out) / split, split=split, classes=sources.FASHION_MNIST_CLASSES,
                                total=n, samples_per_shard=args.per_shard, source=f"fashion-mnist {folder}")
        print(f"wrote {out}/train and {out}/test")
    elif args.source == "idx":
        if len(args.paths) != 3:
            raise SystemExit("usage: selfsup shards write idx IMAGES LABELS OUT")
        images, labels, out = args.paths
        samples, n = sources.idx_samples(images, labels, prefix=f"{args.split}-")
        m = shards.write_shards(samples, out, split=args.split, total=n, samples_per_shard=args.per_shard,
                                classes=args.classes.split(",") if args.classes else None, source=f"idx {images}")
        print(f"wrote {m['num_samples']} samples in {len(m['shards'])} shards to {out}")
    elif args.source == "image-folder":
        root, out = args.paths
        samples, n, classes = sources.image_folder_samples(root)
        m = shards.write_shards(samples, out, split=args.split, classes=classes, total=n,
                                samples_per_shard=args.per_shard, source=f"image folder {root}")
        print(f"wrote {m['num_samples']} samples ({len(m['skipped'])} unreadable skipped) to {out}")
    elif args.source == "audio-folder":
        root, out = args.paths
        splits = sources.audio_label_splits(args.labels)
        for split in splits or [args.split]:
            samples, n, classes = sources.audio_folder_samples(root, args.labels, split if splits else None)
            dest = Path(out) / split if splits else Path(out)
            m = shards.write_shards(samples, dest, split=split, kind="audio", classes=classes, total=n,
                                    samples_per_shard=args.per_shard, source=f"audio folder {root}")
            print(f"wrote {m['num_samples']} clips ({len(m['skipped'])} bad skipped) to {dest}")


def _shards_verify(args) -> int:
    from .pipelines.shards import verify_shards

    report = verify_shards(args.dir)
    for p in report.problems:
        print(f"problem: {p}")
    print(f"{args.dir}: {report.shards} shards, {report.samples} good samples, {len(report.problems)} problems")
    return 0 if report.ok else 1


def _shards_info(args) -> None:
    from .pipelines.shards import shards_info

    print(json.dumps(shards_info(args.dir), indent=1))


def _pretrain(args) -> None:
    from .config import load_config

    cfg = load_config(args.config, args.overrides)
    if args.no_ray:
        from .cluster.trainer import make_reporter
        from .pipelines.pretrain import pretrain

        summary = pretrain(cfg, make_reporter(cfg, under_ray=False))
    else:
        from .cluster.trainer import run_pretraining

        summary = run_pretraining(cfg, args.address)
    print(f"done: {summary['steps']} steps, last checkpoint {summary['checkpoint']}, "
          f"{summary['data']['skipped']} bad samples skipped")


def _submit(args) -> int:
    from .cluster.submit import SubmitError, submit

    try:
        return submit(args.config, args.overrides, args.address, wait=not args.no_wait, env_names=args.env)
    except SubmitError as err:
        print(f"selfsup: error: {err}", file=sys.stderr)
        return 2


def _jobs(args) -> int:
    from .cluster.submit import SubmitError, jobs

    try:
        return jobs(args.action, args.job_id, args.address)
    except SubmitError as err:
        print(f"selfsup: error: {err}", file=sys.stderr)
        return 2


def _eval(args) -> None:
    if args.checkpoint[0] == "compare":
        from .pipelines.compare import compare

        if len(args.checkpoint) < 2:
            raise SystemExit("usage: selfsup eval compare RUN_DIR [RUN_DIR ...] --train DIR --test DIR [--out DIR]")
        compare(args.checkpoint[1:], args.train, args.test, args.out or Path(args.checkpoint[1]).parent / "compare")
        return
    from .pipelines.evaluate import evaluate

    if len(args.checkpoint) != 1:
        raise SystemExit("selfsup eval takes one checkpoint; `selfsup eval compare RUN_DIR ...` compares runs")
    evaluate(args.checkpoint[0], args.train, args.test, args.out, baselines=not args.no_baselines, tsne=args.tsne)


def _export(args) -> None:
    import torch

    from .pipelines.evaluate import _encoder
    from .pipelines.checkpoint import load_checkpoint
    from .vision.backbones import export_state_dict

    cfg, state, _ = load_checkpoint(args.checkpoint)
    torch.save(export_state_dict(_encoder(cfg, state)), args.out)
    print(f"wrote {cfg.model.backbone} backbone weights (torchvision key names) to {args.out}")


def _demo(args) -> None:
    from .config import load_config
    from .pipelines.evaluate import evaluate
    from .pipelines.shards import MANIFEST

    started = time.time()
    data = Path(args.data)
    if not (data / "train" / MANIFEST).exists() or not (data / "test" / MANIFEST).exists():
        print(f"[1/3] writing Fashion-MNIST shards to {data}")
        _shards_write(argparse.Namespace(source="fashion-mnist", paths=[str(data)], download=args.download,
                                         per_shard=5000))
    else:
        print(f"[1/3] shards already in {data}")
    overrides = [f"data.train={data / 'train'}", f"data.test={data / 'test'}", *args.overrides]
    cfg = load_config(args.config, overrides)
    print(f"[2/3] pretraining {cfg.method.name} ({cfg.model.backbone}, width {cfg.model.width}) "
          f"for {cfg.optim.epochs} epochs under Ray Train")
    _pretrain(argparse.Namespace(config=args.config, overrides=overrides, no_ray=args.no_ray, address=None))
    print("[3/3] evaluating the final checkpoint")
    evaluate(cfg.run_dir, str(data / "train"), str(data / "test"), cfg.run_dir / "report")
    print(f"demo finished in {(time.time() - started) / 60:.1f} min")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="selfsup", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    sh = sub.add_parser("shards", help="write, verify and inspect WebDataset shards").add_subparsers(
        dest="action", required=True)
    w = sh.add_parser("write", help="write shards from a dataset")
    w.add_argument("source", choices=["fashion-mnist", "idx", "image-folder", "audio-folder"])
    w.add_argument("paths", nargs="+",
                   help="fashion-mnist OUT | idx IMAGES LABELS OUT | image-folder DIR OUT | audio-folder DIR OUT")
    w.add_argument("--split", default="train")
    w.add_argument("--classes", help="comma-separated class names (idx)")
    w.add_argument("--labels", help="audio-folder: CSV with path (relative to DIR), label, split, ... columns; "
                                    "a split column writes OUT/<split> per split")
    w.add_argument("--per-shard", type=int, default=5000, help="samples per shard")
    w.add_argument("--download", action="store_true", help="download Fashion-MNIST when it is not installed")
    w.set_defaults(func=_shards_write)
    v = sh.add_parser("verify", help="check checksums and decode every sample")
    v.add_argument("dir")
    v.set_defaults(func=_shards_verify)
    i = sh.add_parser("info", help="counts and classes")
    i.add_argument("dir")
    i.set_defaults(func=_shards_info)

    t = sub.add_parser("pretrain", help="pretrain under Ray Train (local, or the cluster at RAY_ADDRESS)")
    t.add_argument("config")
    t.add_argument("overrides", nargs="*", help="key.sub=value")
    t.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    t.add_argument("--no-ray", action="store_true", help="run the loop in this process, without Ray")
    t.set_defaults(func=_pretrain)

    s = sub.add_parser("submit", help="run `selfsup pretrain` as a Ray job on a cluster (Job Submission SDK)")
    s.add_argument("config")
    s.add_argument("overrides", nargs="*", help="key.sub=value")
    s.add_argument("--address", help="the cluster's dashboard, http://HEAD:8265 (default: RAY_ADDRESS)")
    s.add_argument("--no-wait", action="store_true", help="print the job id and return without following the logs")
    s.add_argument("--env", action="append", default=[], metavar="NAME",
                   help="pass this environment variable to the job (secrets: never on the command line)")
    s.set_defaults(func=_submit)
    j = sub.add_parser("jobs", help="status, logs or stop of a submitted job")
    j.add_argument("action", choices=["status", "logs", "stop"])
    j.add_argument("job_id")
    j.add_argument("--address", help="the cluster's dashboard, http://HEAD:8265 (default: RAY_ADDRESS)")
    j.set_defaults(func=_jobs)

    e = sub.add_parser("eval", help="kNN + linear probe of a checkpoint, with baselines; `eval compare RUN…`: "
                                    "every checkpoint of each run")
    e.add_argument("checkpoint", nargs="+", help="checkpoint directory, or a run directory (its latest checkpoint); "
                                                 "or `compare RUN_DIR [RUN_DIR ...]`")
    e.add_argument("--train", required=True)
    e.add_argument("--test", required=True)
    e.add_argument("--out")
    e.add_argument("--no-baselines", action="store_true")
    e.add_argument("--tsne", action="store_true", help="a t-SNE map of the test features besides the PCA one")
    e.set_defaults(func=_eval)

    x = sub.add_parser("export", help="write the backbone as a torchvision state dict")
    x.add_argument("checkpoint")
    x.add_argument("out")
    x.set_defaults(func=_export)

    d = sub.add_parser("demo", help="Fashion-MNIST -> shards -> SimCLR under Ray -> evaluation report")
    d.add_argument("--config", default="configs/quickstart.yaml")
    d.add_argument("--data", default="data/fashion-mnist")
    d.add_argument("--download", action="store_true")
    d.add_argument("--no-ray", action="store_true")
    d.add_argument("overrides", nargs="*")
    d.set_defaults(func=_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    from .config import ConfigError
    from .pipelines.checkpoint import CheckpointError
    from .pipelines.shards import ManifestError
    from .pipelines.sources import DatasetNotFound

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("faiss").setLevel(logging.WARNING)
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except (ConfigError, CheckpointError, ManifestError, DatasetNotFound) as err:
        print(f"selfsup: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
