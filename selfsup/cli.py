"""The ``selfsup`` command line: parse the arguments, then call the one function of the command.

Each ``_<command>(args)`` imports what it needs inside itself, so ``selfsup --help`` loads no torch
(``tests/unit/test_startup.py``). Work two commands share is a plain function that takes plain
values (``write_fashion_mnist_shards``, ``run_pretraining``). This is the only module that parses
arguments.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from selfsup import __version__

DESCRIPTION = (
    "Self-supervised pretraining on WebDataset shards: SimCLR, MoCo v2/v3, BYOL and SimSiam for images,\n"
    "wav2vec 2.0 for speech, trained under Ray Train on this machine or a cluster, and scored by kNN,\n"
    "retrieval and a linear probe. `selfsup demo` runs the whole path on Fashion-MNIST.")
EPILOG = """examples:
  selfsup demo --download              Fashion-MNIST -> shards -> SimCLR -> evaluation report
  selfsup configs                      the shipped configs, by name
  selfsup pretrain quickstart --no-ray optim.epochs=2

Options and key.sub=value overrides may come in any order; `selfsup COMMAND --help` explains each."""
OVERRIDES_HELP = "config overrides key.sub=value, values parsed as YAML (optim.lr=0.1 data.batch_size=128)"
CONFIG_HELP = "a YAML file, or the name of a shipped config (`selfsup configs` lists them)"
ADDRESS_HELP = "the cluster's dashboard, http://HEAD:8265 (default: RAY_ADDRESS)"
SHOWN_SKIPPED = 20  # `shards write` prints this many skipped files, then a count

# The errors that end a command with one line instead of a traceback, by the module that defines each.
ONE_LINE_ERRORS = {
    "selfsup.config": ("ConfigError",),
    "selfsup.core.checkpoint": ("CheckpointError", "CheckpointSpaceError"),
    "selfsup.data.reader": ("ManifestError",),
    "selfsup.data.sources": ("DatasetNotFound",),
    "selfsup.cluster.submit": ("SubmitError",),
    "selfsup.cluster.trainer": ("RunFailed",),
    "selfsup.train.lease": ("RunLeaseError",),
}


def write_fashion_mnist_shards(out: str | Path, download: bool, per_shard: int) -> None:
    """Fashion-MNIST's train and test splits as shards in ``out/train`` and ``out/test``."""
    from selfsup.data import shards, sources

    folder = sources.find_fashion_mnist(Path(out) / "download" if download else None)
    for split in ("train", "test"):
        samples, n = sources.fashion_mnist_samples(split, folder)
        shards.write_shards(samples, Path(out) / split, split=split, classes=sources.FASHION_MNIST_CLASSES,
                            total=n, samples_per_shard=per_shard, source=f"fashion-mnist {folder}")
    print(f"wrote {out}/train and {out}/test")


def run_pretraining(cfg, no_ray: bool, address: str | None) -> None:
    """Pretrain the ``ExperimentConfig`` ``cfg`` under Ray Train (a Ray of its own, or the cluster at
    ``address`` / RAY_ADDRESS), or in this process when ``no_ray``; print the summary."""
    from selfsup.train.lease import run_lease

    with run_lease(cfg):  # taken before torch loads, so that a second driver is refused at once
        from selfsup.cluster.trainer import pretrain_here, run_pretraining as pretrain_on_ray

        summary = pretrain_here(cfg) if no_ray else pretrain_on_ray(cfg, address)
    print(f"done: {summary['steps']} steps, final weights in {summary['checkpoint']}, "
          f"{summary['data']['skipped']} bad samples skipped")


def _shards_write(args) -> None:
    from selfsup.data import shards, sources

    if args.source == "fashion-mnist":
        (out,) = args.paths
        write_fashion_mnist_shards(out, args.download, args.per_shard)
    elif args.source == "idx":
        if len(args.paths) != 3:
            raise SystemExit("usage: selfsup shards write idx IMAGES LABELS OUT")
        images, labels, out = args.paths
        samples, n = sources.idx_samples(images, labels, prefix=f"{args.split}-")
        m = shards.write_shards(samples, out, split=args.split, total=n, samples_per_shard=args.per_shard,
                                classes=args.classes.split(",") if args.classes else None, source=f"idx {images}")
        print(f"wrote {m['num_samples']} samples in {len(m['shards'])} shards to {out}")
        _print_skipped(m, out)
    elif args.source == "image-folder":
        root, out = args.paths
        if args.max_side is not None and args.max_side < sources.MIN_MAX_SIDE:
            raise SystemExit(f"--max-side {args.max_side} is below {sources.MIN_MAX_SIDE} px; views are cut at "
                             "data.image_size from the stored images, so keep it at least that")
        samples, n, classes = sources.image_folder_samples(root, args.max_side, args.processes)
        m = shards.write_shards(samples, out, split=args.split, classes=classes, total=n,
                                samples_per_shard=args.per_shard, source=f"image folder {root}",
                                extra={"max_side": args.max_side} if args.max_side else None)
        converted = m.get("converted", [])
        print(f"wrote {m['num_samples']} samples ({len(converted)} converted, {len(m['skipped'])} unreadable "
              f"skipped) to {out}")
        for entry in converted[:SHOWN_SKIPPED]:
            print(f"  converted: {entry}")
        _print_skipped(m, out)
    elif args.source == "audio-folder":
        root, out = args.paths
        splits = sources.audio_label_splits(args.labels)
        for split in splits or [args.split]:
            samples, n, classes = sources.audio_folder_samples(root, args.labels, split if splits else None)
            dest = Path(out) / split if splits else Path(out)
            m = shards.write_shards(samples, dest, split=split, kind="audio", classes=classes, total=n,
                                    samples_per_shard=args.per_shard, source=f"audio folder {root}")
            print(f"wrote {m['num_samples']} clips ({len(m['skipped'])} bad skipped) to {dest}")
            _print_skipped(m, dest)


def _print_skipped(manifest: dict, out: str | Path) -> None:
    """The files ``write_shards`` skipped (its manifest's ``skipped``): the first ``SHOWN_SKIPPED``, then a count."""
    skipped = manifest.get("skipped", [])
    for entry in skipped[:SHOWN_SKIPPED]:
        print(f"  skipped: {entry}")
    if len(skipped) > SHOWN_SKIPPED:
        print(f"  ... and {len(skipped) - SHOWN_SKIPPED} more; all {len(skipped)} are listed in "
              f"{Path(out) / 'manifest.json'} under \"skipped\"")


def _shards_verify(args) -> int:
    from selfsup.data.shards import verify_shards

    report = verify_shards(args.dir)
    for p in report.problems:
        print(f"problem: {p}")
    print(f"{args.dir}: {report.shards} shards, {report.samples} good samples, {len(report.problems)} problems")
    return 0 if report.ok else 1


def _shards_info(args) -> None:
    from selfsup.data.shards import shards_info

    print(json.dumps(shards_info(args.dir), indent=1))


def _pretrain(args) -> None:
    from selfsup.config import load_config

    run_pretraining(load_config(args.config, args.overrides), args.no_ray, args.address)


def _configs(args) -> None:
    from selfsup.config import CONFIG_DIR, config_description, shipped_configs

    configs = shipped_configs()
    width = max(map(len, configs))
    for name, path in configs.items():
        print(f"{name:<{width}}  {config_description(path)}")
    print(f"\n{len(configs)} configs in {CONFIG_DIR}; run one by name: selfsup pretrain NAME [key.sub=value ...]")


def _config_show(args) -> None:
    from selfsup.config import dump_config, find_config, load_config

    cfg = load_config(args.config, args.overrides)
    print(f"# {find_config(args.config)} {' '.join(args.overrides)}".rstrip())
    print(dump_config(cfg), end="")


def _submit(args) -> int:
    from selfsup.cluster.submit import submit

    return submit(args.config, args.overrides, args.address, wait=not args.no_wait, env_names=args.env)


def _jobs(args) -> int:
    from selfsup.cluster.submit import jobs

    return jobs(args.action, args.job_id, args.address)


def _eval(args) -> None:
    if args.checkpoint[0] == "compare":
        from selfsup.eval.compare import compare

        if len(args.checkpoint) < 2:
            raise SystemExit("usage: selfsup eval compare RUN_DIR [RUN_DIR ...] --train DIR --test DIR [--out DIR]")
        compare(args.checkpoint[1:], args.train, args.test, args.out or Path(args.checkpoint[1]).parent / "compare")
        return
    from selfsup.eval.run import evaluate, report_dir
    from selfsup.tracking.wandb_run import log_eval_report

    if len(args.checkpoint) != 1:
        raise SystemExit("selfsup eval takes one checkpoint; `selfsup eval compare RUN_DIR ...` compares runs")
    out = report_dir(args.checkpoint[0], args.test, args.out)
    log_eval_report(evaluate(args.checkpoint[0], args.train, args.test, out, not args.no_baselines, tsne=args.tsne), out)


def _export(args) -> None:
    import torch

    from selfsup.eval.features import export_encoder

    export = export_encoder(args.checkpoint)
    torch.save(export, args.out)
    print(f"wrote the {export['arch']} encoder (weights, geometry and input; format {export['format']}) to {args.out}")


def _demo(args) -> None:
    from selfsup.config import load_config
    from selfsup.data.reader import MANIFEST
    from selfsup.eval.run import evaluate
    from selfsup.tracking.wandb_run import log_eval_report

    started = time.time()
    data = Path(args.data)
    if not (data / "train" / MANIFEST).exists() or not (data / "test" / MANIFEST).exists():
        print(f"[1/3] writing Fashion-MNIST shards to {data}")
        write_fashion_mnist_shards(data, args.download, per_shard=5000)
    else:
        print(f"[1/3] shards already in {data}")
    cfg = load_config(args.config, [f"data.train={data / 'train'}", f"data.test={data / 'test'}", *args.overrides])
    print(f"[2/3] pretraining {cfg.method.name} ({cfg.model.backbone}, width {cfg.model.width}) "
          f"for {cfg.optim.epochs} epochs under Ray Train")
    run_pretraining(cfg, args.no_ray, address=None)
    print("[3/3] evaluating the final checkpoint")
    log_eval_report(evaluate(cfg.run_dir, str(data / "train"), str(data / "test"), cfg.run_dir / "report"),
                    cfg.run_dir / "report")
    print(f"demo finished in {(time.time() - started) / 60:.1f} min")


def _command(sub, name: str, help: str, examples: list[str], func, rest: str | None = None):
    """The parser of one command, with ``examples`` as its epilog. ``rest`` names its list positional,
    which also takes the positionals that come after an option (``parse_args``)."""
    p = sub.add_parser(name, help=help, description=help,
                       epilog="examples:\n" + "\n".join(f"  {e}" for e in examples),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(func=func, rest=rest)
    return p


def _add_shards(sub) -> None:
    sh = sub.add_parser("shards", help="write, verify and inspect WebDataset shards",
                        description="write, verify and inspect WebDataset shards").add_subparsers(
        dest="action", required=True)
    w = _command(sh, "write", "write shards from a dataset", [
        "selfsup shards write fashion-mnist data/fashion-mnist --download",
        "selfsup shards write image-folder /data/imagenet/train data/imagenet/train",
        "selfsup shards write idx train-images.gz train-labels.gz data/digits/train --classes 0,1,2,3,4,5,6,7,8,9",
        "selfsup shards write audio-folder data/speech data/speech-shards --labels data/speech/metadata.csv"],
        _shards_write, rest="paths")
    w.add_argument("source", choices=["fashion-mnist", "idx", "image-folder", "audio-folder"],
                   help="what to read: Fashion-MNIST (installed, or --download), idx files, a folder of "
                        "class folders of images, or a folder of audio clips")
    w.add_argument("paths", nargs="+",
                   help="fashion-mnist OUT | idx IMAGES LABELS OUT | image-folder DIR OUT | audio-folder DIR OUT")
    w.add_argument("--split", default="train", help="the split name written in the manifest (default: train)")
    w.add_argument("--classes", help="idx: comma-separated class names, in label order")
    w.add_argument("--labels", help="audio-folder: CSV with path (relative to DIR), label, split, ... columns; "
                                    "a split column writes OUT/<split> per split")
    w.add_argument("--per-shard", type=int, default=5000, help="samples per shard (default: 5000)")
    w.add_argument("--download", action="store_true", help="download Fashion-MNIST when it is not installed")
    w.add_argument("--max-side", type=int, help="image-folder: re-encode images whose long side exceeds this "
                                                "(JPEGs are otherwise stored byte for byte); training refuses "
                                                "shards whose max side is below data.image_size")
    w.add_argument("--processes", type=int, default=2, help="image-folder: processes checking the images (default: 2)")
    v = _command(sh, "verify", "check checksums and decode every sample",
                 ["selfsup shards verify data/fashion-mnist/train"], _shards_verify)
    v.add_argument("dir", help="a shard folder (with its manifest.json)")
    i = _command(sh, "info", "print a shard folder's counts and classes",
                 ["selfsup shards info data/fashion-mnist/train"], _shards_info)
    i.add_argument("dir", help="a shard folder (with its manifest.json)")


def _add_configs(sub) -> None:
    _command(sub, "configs", "list the shipped configs, with a line on each", ["selfsup configs"], _configs)
    c = sub.add_parser("config", help="print a resolved config (`selfsup config show --help`)",
                       description="print a resolved config").add_subparsers(dest="action", required=True)
    s = _command(c, "show", "print the config a command would run, overrides applied, as YAML", [
        "selfsup config show quickstart method.name=byol",
        "selfsup config show configs/simclr-resnet18-fmnist.yaml optim.epochs=50 > my-run.yaml"],
        _config_show, rest="overrides")
    s.add_argument("config", help=CONFIG_HELP)
    s.add_argument("overrides", nargs="*", help=OVERRIDES_HELP + "; method.name=OTHER starts from OTHER's defaults")


def _add_cluster(sub) -> None:
    t = _command(sub, "pretrain", "pretrain under Ray Train (local, or the cluster at RAY_ADDRESS)", [
        "selfsup pretrain quickstart --no-ray optim.epochs=2",
        "selfsup pretrain simclr-resnet18-fmnist scaling.num_workers=8 scaling.use_gpu=true",
        "selfsup pretrain configs/wav2vec2-tiny.yaml data.train=data/speech/train"], _pretrain, rest="overrides")
    t.add_argument("config", help=CONFIG_HELP)
    t.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    t.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    t.add_argument("--no-ray", action="store_true", help="run the loop in this process, without Ray")

    s = _command(sub, "submit", "run `selfsup pretrain` as a Ray job on a cluster (Job Submission SDK)", [
        "selfsup submit simclr-resnet50-imagenet data.train=s3://BUCKET/shards/train run_root=s3://BUCKET/runs "
        "--address http://127.0.0.1:8265 --env WANDB_API_KEY"], _submit, rest="overrides")
    s.add_argument("config", help=CONFIG_HELP)
    s.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    s.add_argument("--address", help=ADDRESS_HELP)
    s.add_argument("--no-wait", action="store_true", help="print the job id and return without following the logs")
    s.add_argument("--env", action="append", default=[], metavar="NAME",
                   help="pass this environment variable to the job (secrets: never on the command line)")
    j = _command(sub, "jobs", "status, logs or stop of a submitted job",
                 ["selfsup jobs logs raysubmit_1a2b3c --address http://127.0.0.1:8265"], _jobs)
    j.add_argument("action", choices=["status", "logs", "stop"], help="what to do with the job")
    j.add_argument("job_id", help="the id `selfsup submit` printed")
    j.add_argument("--address", help=ADDRESS_HELP)


def _add_eval(sub) -> None:
    e = _command(sub, "eval", "kNN + linear probe of a checkpoint, with baselines; `eval compare RUN…`: "
                              "every checkpoint of each run", [
        "selfsup eval runs/quickstart --train data/fashion-mnist/train --test data/fashion-mnist/test",
        "selfsup eval compare runs/simclr runs/byol --train data/fashion-mnist/train --test data/fashion-mnist/test"],
        _eval, rest="checkpoint")
    e.add_argument("checkpoint", nargs="+", help="checkpoint directory, or a run directory (its latest checkpoint); "
                                                 "or `compare RUN_DIR [RUN_DIR ...]`")
    e.add_argument("--train", required=True, help="labelled shards the kNN bank and the linear probe train on")
    e.add_argument("--test", required=True, help="labelled shards the scores are measured on")
    e.add_argument("--out", help="report folder (default: report/ in the run, or RUN/../compare for compare)")
    e.add_argument("--no-baselines", action="store_true",
                   help="skip the raw-pixel and random-initialisation baselines")
    e.add_argument("--tsne", action="store_true", help="a t-SNE map of the test features besides the PCA one")

    x = _command(sub, "export", "write the encoder's weights with what builds the matching torchvision model",
                 ["selfsup export runs/quickstart encoder.pt"], _export)
    x.add_argument("checkpoint", help="checkpoint directory, or a run directory (its latest checkpoint)")
    x.add_argument("out", help="the file to write: a dict with the state dict and what builds the model "
                               "(selfsup.vision.backbones.torchvision_model loads an image encoder's)")

    d = _command(sub, "demo", "Fashion-MNIST -> shards -> SimCLR under Ray -> evaluation report",
                 ["selfsup demo --download", "selfsup demo --no-ray optim.minutes=2"], _demo, rest="overrides")
    d.add_argument("--config", default="quickstart", help=CONFIG_HELP + " (default: quickstart)")
    d.add_argument("--data", default="data/fashion-mnist",
                   help="where the shards are, or are written when missing (default: data/fashion-mnist)")
    d.add_argument("--download", action="store_true", help="download Fashion-MNIST when it is not installed")
    d.add_argument("--no-ray", action="store_true", help="train in this process, without Ray")
    d.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)


def build_parser() -> argparse.ArgumentParser:
    """The ``selfsup`` parser; each command's ``func`` takes the parsed arguments."""
    p = argparse.ArgumentParser(prog="selfsup", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"selfsup {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_shards(sub)
    _add_configs(sub)
    _add_cluster(sub)
    _add_eval(sub)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The parsed command line. Options may come anywhere: argparse ends a list positional at the
    first option, so the positionals after one (``pretrain CONFIG --no-ray key=value``) are added
    to the command's ``rest`` list; anything else left over is an error."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and (getattr(args, "rest", None) is None or any(a.startswith("-") for a in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        getattr(args, args.rest).extend(extra)
    return args


def _one_line_errors() -> tuple[type[Exception], ...]:
    """The ``ONE_LINE_ERRORS`` of the modules loaded by now: an error can only come from a loaded
    module, and catching it this way imports nothing heavy (torch) for a command that did not."""
    return tuple(getattr(sys.modules[m], name) for m, names in ONE_LINE_ERRORS.items() if m in sys.modules
                 for name in names)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("faiss").setLevel(logging.WARNING)
    args = parse_args(argv)
    try:
        return args.func(args) or 0
    except Exception as err:
        if isinstance(err, _one_line_errors()):
            print(f"selfsup: error: {err}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
