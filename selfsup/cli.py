"""The ``selfsup`` command line: parse the arguments, then call the one function of the command.

Each ``_<command>(args)`` imports what it needs inside itself, so ``selfsup --help`` loads no torch
(``tests/unit/test_startup.py``). Work two commands share is a plain function that takes plain
values in the module that owns it (training: ``selfsup.cluster.driver.pretrain``; the demo:
``selfsup.demo``). An error meant for one line is a ``selfsup.errors.OneLineError``, printed as
``selfsup: error: ...`` (exit 2). This is the only module that parses arguments.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from selfsup import __version__
from selfsup.demo import AUDIO_DEMO, AUDIO_DEMO_MINUTES, DEMO
from selfsup.errors import OneLineError

DESCRIPTION = (
    "Self-supervised pretraining on WebDataset shards: SimCLR, MoCo v2/v3, BYOL and SimSiam for images,\n"
    "wav2vec 2.0 for speech, trained under Ray Train on this machine or a cluster, and scored by kNN,\n"
    "retrieval and a linear probe. `selfsup demo` runs the whole path on Fashion-MNIST."
)
EPILOG = """examples:
  selfsup demo --download              Fashion-MNIST -> shards -> SimCLR -> evaluation report
  selfsup configs                      the shipped configs, by name
  selfsup pretrain quickstart --no-ray optim.epochs=2

Options and key.sub=value overrides may come in any order; `selfsup COMMAND --help` explains each."""
OVERRIDES_HELP = "config overrides key.sub=value, values parsed as YAML (optim.lr=0.1 data.batch_size=128)"
CONFIG_HELP = "a YAML file, or the name of a shipped config (`selfsup configs` lists them)"
ADDRESS_HELP = "the cluster's dashboard, http://HEAD:8265 (default: RAY_ADDRESS)"
VERBOSE_HELP = "show every log line: selfsup's debug lines, Ray's own and its workers' (default: progress and warnings)"
SHOWN_SKIPPED = 20  # `shards write` prints this many skipped files, then a count


def interrupted_line(err: KeyboardInterrupt, argv: list[str]) -> str:
    """What Ctrl-C says: for a run, its last checkpoint and the command (``argv`` without --restart) that
    resumes it."""
    import shlex

    from selfsup.cluster.driver import Interrupted

    if not isinstance(err, Interrupted):
        return "interrupted"
    from selfsup.core.checkpoint import CheckpointProgress, list_checkpoints

    command = shlex.join(["selfsup", *(a for a in argv if a != "--restart")])
    found = list_checkpoints(err.cfg.run_dir)
    if not found:
        return f"interrupted before the first checkpoint of {err.cfg.run_dir}; `{command}` starts it again"
    step = getattr(CheckpointProgress.read(found[-1]), "step", "?")
    return f"interrupted; the last checkpoint is {found[-1]} (step {step}); resume with: {command}"


def _shards_write(args) -> None:
    if args.test_fraction is not None and args.source != "image-folder":
        raise SystemExit("--test-fraction is for image-folder; audio-folder splits by its --labels CSV's split column")
    if args.test_fraction is not None and args.split is not None:
        raise SystemExit("--test-fraction writes OUT/train and OUT/test; leave out --split")
    if args.source == "fashion-mnist":
        from selfsup.data.builders import write_fashion_mnist_shards

        (out,) = args.paths
        write_fashion_mnist_shards(out, args.download, args.per_shard)
        print(f"wrote {out}/train and {out}/test")
    else:
        {
            "idx": _shards_write_idx,
            "image-folder": _shards_write_image_folder,
            "audio-folder": _shards_write_audio_folder,
        }[args.source](args, args.split or "train")


def _shards_write_idx(args, split: str) -> None:
    from selfsup.data import shards, sources

    if len(args.paths) != 3:
        raise SystemExit("usage: selfsup shards write idx IMAGES LABELS OUT")
    images, labels, out = args.paths
    samples, n = sources.idx_samples(images, labels, prefix=f"{split}-")
    m = shards.write_shards(
        samples,
        out,
        split=split,
        total=n,
        samples_per_shard=args.per_shard,
        classes=args.classes.split(",") if args.classes else None,
        source=f"idx {images}",
    )
    print(f"wrote {m['num_samples']} samples in {len(m['shards'])} shards to {out}")
    _print_skipped(m, out)


def _shards_write_image_folder(args, split: str) -> None:
    """One split to OUT, or with ``--test-fraction`` a stratified train/test split to OUT/train and OUT/test."""
    from selfsup.data import shards, sources

    root, out = _shards_two_paths(args, "image-folder DIR OUT")
    if args.max_side is not None and args.max_side < sources.MIN_MAX_SIDE:
        raise SystemExit(
            f"--max-side {args.max_side} is below {sources.MIN_MAX_SIDE} px; views are cut at "
            "data.image_size from the stored images, so keep it at least that"
        )
    files, classes = sources.image_folder_files(root)
    parts = (
        {split: (files, Path(out))}
        if args.test_fraction is None
        else {
            name: (part, Path(out) / name)
            for name, part in zip(("train", "test"), sources.stratified_split(files, args.test_fraction))
        }
    )
    for name, (part, dest) in parts.items():
        m = shards.write_shards(
            sources.image_samples(part, args.max_side, args.processes),
            dest,
            split=name,
            classes=classes,
            total=len(part),
            samples_per_shard=args.per_shard,
            source=f"image folder {root}",
            extra={"max_side": args.max_side} if args.max_side else None,
        )
        converted = m.get("converted", [])
        print(
            f"wrote {m['num_samples']} samples ({len(converted)} converted, {len(m['skipped'])} unreadable "
            f"skipped) to {dest}"
        )
        for entry in converted[:SHOWN_SKIPPED]:
            print(f"  converted: {entry}")
        _print_skipped(m, dest)


def _shards_write_audio_folder(args, split: str) -> None:
    """One split to OUT, or one folder OUT/<split> per value of the ``--labels`` CSV's split column."""
    from selfsup.data.builders import write_audio_folder_shards

    root, out = _shards_two_paths(args, "audio-folder DIR OUT")
    for dest, m in write_audio_folder_shards(root, out, args.labels, args.per_shard, split):
        print(f"wrote {m['num_samples']} clips ({len(m['skipped'])} bad skipped) to {dest}")
        _print_skipped(m, dest)


def _shards_two_paths(args, usage: str) -> tuple[str, str]:
    """The source's DIR OUT positionals, or the usage line."""
    if len(args.paths) != 2:
        raise SystemExit(f"usage: selfsup shards write {usage}")
    return args.paths[0], args.paths[1]


def _print_skipped(manifest: dict, out: str | Path) -> None:
    """The files ``write_shards`` skipped (its manifest's ``skipped``): the first ``SHOWN_SKIPPED``, then a count."""
    skipped = manifest.get("skipped", [])
    for entry in skipped[:SHOWN_SKIPPED]:
        print(f"  skipped: {entry}")
    if len(skipped) > SHOWN_SKIPPED:
        print(
            f"  ... and {len(skipped) - SHOWN_SKIPPED} more; all {len(skipped)} are listed in "
            f'{Path(out) / "manifest.json"} under "skipped"'
        )


def _shards_verify(args) -> int:
    from selfsup.data.shards import verify_shards

    report = verify_shards(args.dir)
    for p in report.problems:
        print(f"problem: {p}")
    print(f"{args.dir}: {report.shards} shards, {report.samples} good samples, {len(report.problems)} problems")
    return 0 if report.ok else 1


def index_split(folder: str | Path, given: str | None) -> str:
    """The split `shards index` records: ``given`` (--split), else the name the folder's tars share
    (``val`` of ``val-000000.tar``, ``val-000001.tar``), else the folder's name."""
    import re

    if given:
        return given
    stems = {re.sub(r"[-_.]?\d+$", "", p.stem) for p in Path(folder).glob("*.tar")}
    return stems.pop() if len(stems) == 1 and "" not in stems else Path(folder).resolve().name


def _shards_index(args) -> None:
    from selfsup.data.shards import index_shards

    split = index_split(args.dir, args.split)
    m, lines = index_shards(args.dir, split, args.classes.split(",") if args.classes else None)
    for line in lines[:SHOWN_SKIPPED]:
        print(f"  unreadable, the reader will skip it: {line}")
    if len(lines) > SHOWN_SKIPPED:
        print(f"  ... and {len(lines) - SHOWN_SKIPPED} more")
    print(
        f"indexed {m['num_samples']} {m['format']} samples of split {split!r} in {len(m['shards'])} shards "
        f"({len(lines)} unreadable); "
        f"wrote {Path(args.dir) / 'manifest.json'}; `selfsup shards verify {args.dir}` decodes every sample"
    )


def _shards_info(args) -> None:
    from selfsup.data.shards import shards_info

    print(json.dumps(shards_info(args.dir), indent=1))


def _shards_build(args) -> None:
    from selfsup.data import builders

    if args.dataset == "spoken-digits":
        n, labels = builders.build_spoken_digits(args.out, args.per_class), builders.DIGITS_CSV
    else:
        n, labels = builders.build_speech_corpus(args.out), builders.SPEECH_CSV
    out = Path(args.out)
    print(
        f"{n} clips in {out}; as shards: selfsup shards write audio-folder {out} {out}-shards --labels {out / labels}"
    )


def _pretrain(args) -> None:
    from selfsup.cluster.driver import done_line, pretrain
    from selfsup.config import load_config

    cfg = load_config(args.config, args.overrides)
    print(done_line(pretrain(cfg, use_ray=not args.no_ray, address=args.address, restart=args.restart)))


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

        if len(args.checkpoint) < 2 or not (args.train and args.test):
            raise SystemExit("usage: selfsup eval compare RUN_DIR [RUN_DIR ...] --train DIR --test DIR [--out DIR]")
        compare(args.checkpoint[1:], args.train, args.test, args.out or Path(args.checkpoint[1]).parent / "compare")
        return
    from selfsup.core.storage import require_writable
    from selfsup.eval.run import eval_splits, evaluate, report_dir
    from selfsup.tracking.wandb_run import check_eval_tracking, log_eval_report

    if len(args.checkpoint) != 1:
        raise SystemExit("selfsup eval takes one checkpoint; `selfsup eval compare RUN_DIR ...` compares runs")
    check_eval_tracking(args.checkpoint[0])  # W&B online without credentials: refused before evaluating
    train, test = eval_splits(args.checkpoint[0], args.train, args.test)
    out = report_dir(args.checkpoint[0], test, args.out)
    require_writable(out, "eval writes its report there: pass --out with a writable folder")
    log_eval_report(evaluate(args.checkpoint[0], train, test, out, not args.no_baselines, tsne=args.tsne), out)


def _export(args) -> None:
    from selfsup.eval.features import export_encoder

    print(export_encoder(args.checkpoint, args.out))


def _demo(args) -> None:
    from selfsup import demo

    if args.audio:
        config = AUDIO_DEMO["config"] if args.config == DEMO["config"] else args.config
        demo.audio_demo(
            config,
            AUDIO_DEMO["data"] if args.data == DEMO["data"] else args.data,
            args.overrides,
            use_ray=not args.no_ray,
        )
    else:
        demo.image_demo(
            args.config,
            args.data,
            args.overrides,
            use_ray=not args.no_ray,
            download=args.download,
            restart=args.restart,
        )


def _command(sub, name: str, help: str, examples: list[str], func, rest: str | None = None):
    """The parser of one command, with ``examples`` as its epilog. ``rest`` names its list positional,
    which also takes the positionals that come after an option (``parse_args``)."""
    p = sub.add_parser(
        name,
        help=help,
        description=help,
        epilog="examples:\n" + "\n".join(f"  {e}" for e in examples),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.set_defaults(func=func, rest=rest)
    p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP)
    return p


def _add_shards(sub) -> None:
    sh = sub.add_parser(
        "shards",
        help="write, index, verify and inspect WebDataset shards",
        description="write, index, verify and inspect WebDataset shards",
    ).add_subparsers(dest="action", required=True)
    w = _command(
        sh,
        "write",
        "write shards from a dataset",
        [
            "selfsup shards write fashion-mnist data/fashion-mnist --download",
            "selfsup shards write image-folder /data/imagenet/train data/imagenet/train",
            "selfsup shards write image-folder photos/ data/photos --test-fraction 0.1   # data/photos/{train,test}",
            "selfsup shards write idx train-images.gz train-labels.gz data/digits/train --classes 0,1,2,3,4,5,6,7,8,9",
            "selfsup shards write audio-folder data/speech data/speech-shards --labels data/speech/metadata.csv",
        ],
        _shards_write,
        rest="paths",
    )
    w.add_argument(
        "source",
        choices=["fashion-mnist", "idx", "image-folder", "audio-folder"],
        help="what to read: Fashion-MNIST (installed, or --download), idx files, a folder of "
        "class folders of images, or a folder of audio clips",
    )
    w.add_argument(
        "paths",
        nargs="+",
        help="fashion-mnist OUT | idx IMAGES LABELS OUT | image-folder DIR OUT | audio-folder DIR OUT",
    )
    w.add_argument("--split", help="the split name written in the manifest (default: train)")
    w.add_argument(
        "--test-fraction",
        type=float,
        metavar="F",
        help="image-folder: put a fraction F of each class's images (picked with a fixed seed, the "
        "same every time) in OUT/test and the rest in OUT/train",
    )
    w.add_argument("--classes", help="idx: comma-separated class names, in label order")
    w.add_argument(
        "--labels",
        help="audio-folder: CSV with path (relative to DIR), label, split, ... columns; "
        "a split column writes OUT/<split> per split",
    )
    w.add_argument("--per-shard", type=int, default=5000, help="samples per shard (default: 5000)")
    w.add_argument("--download", action="store_true", help="download Fashion-MNIST when it is not installed")
    w.add_argument(
        "--max-side",
        type=int,
        help="image-folder: re-encode images whose long side exceeds this "
        "(JPEGs are otherwise stored byte for byte); training refuses "
        "shards whose max side is below data.image_size",
    )
    w.add_argument("--processes", type=int, default=2, help="image-folder: processes checking the images (default: 2)")
    x = _command(
        sh,
        "index",
        "write the manifest.json of a folder of WebDataset tars made by other tools "
        "(TarWriter, tar); the tars stay as they are",
        [
            "selfsup shards index /data/my-wds-shards",
            "selfsup shards index /data/wds/val --split val --classes cat,dog",
        ],
        _shards_index,
    )
    x.add_argument(
        "dir", help="a folder of .tar shards: <key>.jpg/.png + <key>.cls images, or <key>.flac + <key>.json audio"
    )
    x.add_argument(
        "--split",
        help="the split name written in the manifest (default: the name its tars share, "
        "val of val-000000.tar, else the folder's name)",
    )
    x.add_argument("--classes", help="comma-separated class names, in label order")
    v = _command(
        sh,
        "verify",
        "check checksums and decode every sample",
        ["selfsup shards verify data/fashion-mnist/train"],
        _shards_verify,
    )
    v.add_argument("dir", help="a shard folder (with its manifest.json)")
    i = _command(
        sh,
        "info",
        "print a shard folder's counts and classes",
        ["selfsup shards info data/fashion-mnist/train"],
        _shards_info,
    )
    i.add_argument("dir", help="a shard folder (with its manifest.json)")
    b = _command(
        sh,
        "build",
        "build an audio set from system packages, as a folder of clips + CSV (audio demo)",
        [
            "selfsup shards build spoken-digits data/spoken-digits --per-class 100   # espeak-ng; voices disjoint",
            "selfsup shards build speech-corpus data/speech-corpus   # ~7 h of real speech from 4 Debian packages",
        ],
        _shards_build,
    )
    b.add_argument(
        "dataset",
        choices=["spoken-digits", "speech-corpus"],
        help="spoken-digits: labelled, synthesised with espeak-ng; speech-corpus: unlabelled real speech "
        "(apt-get download + dpkg-deb)",
    )
    b.add_argument("out", help="the folder to write: clips/ and labels.csv or metadata.csv")
    b.add_argument(
        "--per-class", type=int, default=200, help="spoken-digits: clips a digit, 1 in 5 test (default: 200)"
    )


def _add_configs(sub) -> None:
    _command(sub, "configs", "list the shipped configs, with a line on each", ["selfsup configs"], _configs)
    c = sub.add_parser(
        "config", help="print a resolved config (`selfsup config show --help`)", description="print a resolved config"
    ).add_subparsers(dest="action", required=True)
    s = _command(
        c,
        "show",
        "print the config a command would run, overrides applied, as YAML",
        [
            "selfsup config show quickstart method.name=byol",
            "selfsup config show configs/simclr-resnet18-fmnist.yaml optim.epochs=50 > my-run.yaml",
        ],
        _config_show,
        rest="overrides",
    )
    s.add_argument("config", help=CONFIG_HELP)
    s.add_argument("overrides", nargs="*", help=OVERRIDES_HELP + "; method.name=OTHER starts from OTHER's defaults")


def _add_cluster(sub) -> None:
    t = _command(
        sub,
        "pretrain",
        "pretrain under Ray Train (local, or the cluster at RAY_ADDRESS)",
        [
            "selfsup pretrain quickstart --no-ray optim.epochs=2",
            "selfsup pretrain simclr-resnet18-fmnist scaling.num_workers=8 scaling.use_gpu=true",
            "selfsup pretrain configs/wav2vec2-tiny.yaml data.train=data/speech/train",
            "selfsup pretrain quickstart --no-ray model.width=64 --restart",
        ],
        _pretrain,
        rest="overrides",
    )
    t.add_argument("config", help=CONFIG_HELP)
    t.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    t.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    t.add_argument("--no-ray", action="store_true", help="run the loop in this process, without Ray")
    t.add_argument(
        "--restart",
        action="store_true",
        help="start afresh: the run folder's old contents move to RUN.old-<time> (nothing is deleted); "
        "without it a run is resumed, and refused if its checkpoints were trained with another config",
    )

    s = _command(
        sub,
        "submit",
        "run `selfsup pretrain` as a Ray job on a cluster (Job Submission SDK)",
        [
            "selfsup submit simclr-resnet50-imagenet data.train=s3://BUCKET/shards/train run_root=s3://BUCKET/runs "
            "--address http://127.0.0.1:8265 --env WANDB_API_KEY"
        ],
        _submit,
        rest="overrides",
    )
    s.add_argument("config", help=CONFIG_HELP)
    s.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    s.add_argument("--address", help=ADDRESS_HELP)
    s.add_argument("--no-wait", action="store_true", help="print the job id and return without following the logs")
    s.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME",
        help="pass this environment variable to the job (secrets: never on the command line)",
    )
    j = _command(
        sub,
        "jobs",
        "status, logs or stop of a submitted job",
        ["selfsup jobs logs raysubmit_1a2b3c --address http://127.0.0.1:8265"],
        _jobs,
    )
    j.add_argument("action", choices=["status", "logs", "stop"], help="what to do with the job")
    j.add_argument("job_id", help="the id `selfsup submit` printed")
    j.add_argument("--address", help=ADDRESS_HELP)


def _add_eval(sub) -> None:
    e = _command(
        sub,
        "eval",
        "kNN + linear probe of a checkpoint, with baselines; `eval compare RUN…`: every checkpoint of each run",
        [
            "selfsup eval runs/quickstart   # on the run's data.train and data.test",
            "selfsup eval runs/quickstart --train data/fashion-mnist/train --test data/fashion-mnist/test",
            "selfsup eval compare runs/simclr runs/byol --train data/fashion-mnist/train "
            "--test data/fashion-mnist/test",
        ],
        _eval,
        rest="checkpoint",
    )
    e.add_argument(
        "checkpoint",
        nargs="+",
        help="checkpoint directory, or a run directory (its latest checkpoint); or `compare RUN_DIR [RUN_DIR ...]`",
    )
    e.add_argument(
        "--train",
        help="labelled shards the kNN bank and the linear probe train on (default: the "
        "run's data.train; compare: required)",
    )
    e.add_argument(
        "--test", help="labelled shards the scores are measured on (default: the run's data.test; compare: required)"
    )
    e.add_argument(
        "--out",
        help="report folder (default: RUN/eval-<test folder name>-<8 hex digits of the test "
        "data>, with -2, -3 ... added rather than overwrite a report; compare: "
        "RUN/../compare)",
    )
    e.add_argument("--no-baselines", action="store_true", help="skip the raw-pixel and random-initialisation baselines")
    e.add_argument("--tsne", action="store_true", help="a t-SNE map of the test features besides the PCA one")

    x = _command(
        sub,
        "export",
        "write the encoder's weights with what builds the model: the matching torchvision "
        "model (images), a Hugging Face transformers Wav2Vec2Model (wav2vec 2.0)",
        ["selfsup export runs/quickstart encoder.pt", "selfsup export runs/wav2vec2-tiny wav2vec2-tiny-hf"],
        _export,
    )
    x.add_argument("checkpoint", help="checkpoint directory, or a run directory (its latest checkpoint)")
    x.add_argument(
        "out",
        help="images: the file to write, a dict with `state_dict` (torchvision's key names: "
        "torchvision.models.resnet18() with .fc = nn.Identity() loads it strictly for the "
        "standard geometry; selfsup.vision.backbones.torchvision_model builds any); "
        "wav2vec 2.0: the folder to write (config.json, model.safetensors, "
        "preprocessor_config.json) for transformers.Wav2Vec2Model.from_pretrained",
    )

    d = _command(
        sub,
        "demo",
        "Fashion-MNIST -> shards -> SimCLR under Ray -> evaluation report",
        ["selfsup demo --download", "selfsup demo --no-ray optim.minutes=2", "selfsup demo --audio"],
        _demo,
        rest="overrides",
    )
    d.add_argument(
        "--config",
        default=DEMO["config"],
        help=CONFIG_HELP + f" (default: {DEMO['config']}; with --audio {AUDIO_DEMO['config']})",
    )
    d.add_argument(
        "--data",
        default=DEMO["data"],
        help="where the shards are, or are written when missing "
        f"(default: {DEMO['data']}; with --audio {AUDIO_DEMO['data']})",
    )
    d.add_argument(
        "--audio",
        action="store_true",
        help="the speech demo: real speech (Debian packages) and spoken digits (espeak-ng) -> shards -> "
        f"wav2vec2-tiny -> kNN and linear probe vs log-mel and random init, in {AUDIO_DEMO_MINUTES} min",
    )
    d.add_argument("--download", action="store_true", help="download Fashion-MNIST when it is not installed")
    d.add_argument("--no-ray", action="store_true", help="train in this process, without Ray")
    d.add_argument(
        "--restart",
        action="store_true",
        help="start the demo's run afresh (the old run is kept beside it) instead of resuming it",
    )
    d.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)


def build_parser() -> argparse.ArgumentParser:
    """The ``selfsup`` parser; each command's ``func`` takes the parsed arguments."""
    p = argparse.ArgumentParser(
        prog="selfsup", description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--version", action="version", version=f"selfsup {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
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


class _ConsoleFormatter(logging.Formatter):
    """Progress as plain lines, warnings and errors marked as such, notes (``selfsup.note``) as
    ``selfsup: note:`` lines."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        if record.name == "selfsup.note":
            return f"selfsup: note: {line}"
        return line if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {line}"


def setup_logging(verbose: bool) -> None:
    """selfsup's INFO lines as plain text, other libraries' warnings (``verbose``: selfsup's DEBUG and the
    others' INFO lines too, FAISS's loader probing and torch's exit statistics among them, each line with
    its level and logger)."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s") if verbose else _ConsoleFormatter())
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, handlers=[handler], force=True)
    logging.getLogger("selfsup").setLevel(logging.DEBUG if verbose else logging.INFO)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    for stream in (sys.stdout, sys.stderr):  # a name no locale can encode (a tar's raw bytes) is escaped, not fatal
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    args = parse_args(argv)
    setup_logging(args.verbose)
    try:
        return args.func(args) or 0
    except KeyboardInterrupt as err:  # 128 + SIGINT, as a shell reports a command Ctrl-C ended
        print(("\n" if sys.stderr.isatty() else "") + f"selfsup: error: {interrupted_line(err, argv)}", file=sys.stderr)
        return 130
    except OneLineError as err:
        print(f"selfsup: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
