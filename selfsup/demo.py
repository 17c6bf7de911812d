"""``selfsup demo``: the whole path on a small data set, in a fixed time, through the one driver.

The image demo writes Fashion-MNIST's shards (unless there), pretrains ``quickstart`` for what is left of
``DEMO_MINUTES`` and evaluates the final checkpoint against raw pixels and random initialisation. The
audio demo does the same with real speech and spoken digits built from system packages and wav2vec2-tiny.
Heavy libraries load inside the functions (``selfsup --help`` reads the defaults here).
"""

from __future__ import annotations

import time
from pathlib import Path

DEMO = {"config": "quickstart", "data": "data/fashion-mnist"}  # `selfsup demo`'s defaults
DEMO_MINUTES = 10.0  # the whole image demo on 2 cores, pip aside: pretraining gets what the shards leave ...
DEMO_RESERVE_STEPS = 340  # ... less the time of this many steps at the run's pace, for Ray's start and the evaluation
DEMO_CONTEXT = [  # the report's pointer to the longer runs
    'Longer runs and GPUs reach more: README, "The five methods on Fashion-MNIST", gives what the benchmarks '
    "measured and the commands that reproduce them (`python -m benchmarks.methods_fmnist`).",
]
AUDIO_DEMO = {"config": "wav2vec2-tiny", "data": "data/audio-demo"}  # ... with --audio
AUDIO_DEMO_PER_CLASS = 100  # spoken digits a class: 80 train, 20 test
AUDIO_DEMO_MINUTES = 15  # the whole audio demo on 2 cores; pretraining gets what the data leaves ...
AUDIO_EVAL_RESERVE_S = 180  # ... less this for the evaluation


def image_demo(
    config: str, data: str | Path, overrides: list[str], use_ray: bool, download: bool, restart: bool
) -> Path:
    """Shards -> pretraining within ``DEMO_MINUTES`` -> evaluation report; returns the report folder."""
    from selfsup.cluster.driver import done_line, pretrain
    from selfsup.config import load_config
    from selfsup.data.builders import write_fashion_mnist_shards
    from selfsup.data.reader import MANIFEST
    from selfsup.eval.run import evaluate
    from selfsup.tracking.wandb_run import log_eval_report

    started, data = time.time(), Path(data)
    if not (data / "train" / MANIFEST).exists() or not (data / "test" / MANIFEST).exists():
        print(f"[1/3] shards: writing Fashion-MNIST to {data}")
        write_fashion_mnist_shards(data, download, per_shard=5000)
    else:
        print(f"[1/3] shards: reusing {data} (delete it to write them again)")
    minutes = (60 * DEMO_MINUTES - (time.time() - started)) / 60
    cfg = load_config(
        config,
        [
            f"data.train={data / 'train'}",
            f"data.test={data / 'test'}",
            f"optim.minutes={minutes:.2f}",
            f"optim.reserve_steps={DEMO_RESERVE_STEPS}",
            *overrides,
        ],
    )
    print(
        f"[2/3] pretraining {cfg.method.name} ({cfg.model.backbone}, width {cfg.model.width}) for "
        f"{cfg.optim.epochs:g} epochs or what fits in {cfg.optim.minutes:.1f} min with the evaluation's time kept, "
        + ("under Ray Train" if use_ray else "in this process")
    )
    trained = time.time()
    print(done_line(pretrain(cfg, use_ray=use_ray, restart=restart)))
    trained = time.time() - trained
    print("[3/3] evaluating the final checkpoint against raw pixels and the same network at random initialisation")
    out = cfg.run_dir / "report"
    log_eval_report(evaluate(cfg.run_dir, str(data / "train"), str(data / "test"), out, context=DEMO_CONTEXT), out)
    total = time.time() - started
    print(
        f"demo finished in {total / 60:.1f} min, {trained / 60:.1f} of them pretraining ({trained / total:.0%}); "
        f"open {out / 'report.html'}"
    )
    return out


def audio_demo(config: str, data: str | Path, overrides: list[str], use_ray: bool) -> Path:
    """The speech corpus and spoken digits built from system packages -> shards -> wav2vec2-tiny
    pretrained within what is left of ``AUDIO_DEMO_MINUTES`` -> kNN and the linear probe on the unseen
    test voices, against log-mel and random init; returns the report folder."""
    from selfsup.cluster.driver import done_line, pretrain
    from selfsup.config import load_config
    from selfsup.eval.run import evaluate
    from selfsup.tracking.wandb_run import log_eval_report

    started, phases = time.time(), {}
    print(f"[1/4] clips: spoken digits (espeak-ng) and real speech (Debian packages) in {data}")
    corpus, digits = build_audio_probe_clips(data, AUDIO_DEMO_PER_CLASS)
    phases["clips"] = time.time() - started
    print("[2/4] 16 kHz FLAC shards")
    speech, digit = write_audio_probe_shards(corpus, digits)
    phases["shards"] = time.time() - started - sum(phases.values())
    minutes = max(1.0, (60 * AUDIO_DEMO_MINUTES - AUDIO_EVAL_RESERVE_S - (time.time() - started)) / 60)
    cfg = load_config(config, ["name=audio-demo", f"data.train={speech}", f"optim.minutes={minutes:.1f}", *overrides])
    layers = getattr(cfg.method, "num_layers", None)  # wav2vec 2.0's; another config given with --config has none
    print(
        f"[3/4] pretraining {cfg.name} ({cfg.method.name}{f', {layers} layers' if layers else ''}) on {speech} for "
        f"{cfg.optim.epochs:g} epochs or {cfg.optim.minutes:g} min, whichever ends first"
    )
    print(done_line(pretrain(cfg, use_ray=use_ray)))
    phases["pretraining"] = time.time() - started - sum(phases.values())
    print(f"[4/4] evaluating on spoken digits, test voices unseen in train ({digit})")
    out = cfg.run_dir / "report"  # one thread: the tiny model's clip-by-clip forwards are faster on busy cores
    log_eval_report(evaluate(cfg.run_dir, str(digit / "train"), str(digit / "test"), out, threads=1), out)
    phases["evaluation"] = time.time() - started - sum(phases.values())
    print(
        ", ".join(f"{name} {seconds / 60:.1f} min" for name, seconds in phases.items())
        + f"; demo finished in {(time.time() - started) / 60:.1f} min"
    )
    return out


def build_audio_probe_clips(data: str | Path, per_class: int) -> tuple[Path, Path]:
    """The audio demo's clips under ``data``, each set built unless there (and said so): ``per_class``
    spoken digits a class from espeak-ng, then the speech corpus from Debian packages. (corpus, digits)."""
    from selfsup.data import builders

    corpus, digits = Path(data) / "speech-corpus", Path(data) / f"spoken-digits-{per_class}"
    for done, build, what in (
        (digits / builders.DIGITS_CSV, lambda: builders.build_spoken_digits(digits, per_class), "spoken digits"),
        (corpus / builders.SPEECH_CSV, lambda: builders.build_speech_corpus(corpus), "speech"),
    ):
        print(f"  {what}: already in {done.parent}" if done.exists() else f"  {what}: {build()} clips in {done.parent}")
    return corpus, digits


def write_audio_probe_shards(corpus: Path, digits: Path) -> tuple[Path, Path]:
    """16 kHz FLAC shards of ``build_audio_probe_clips``' folders beside them, each written unless there:
    (speech shards, digit shards with train/ and test/)."""
    from selfsup.data.builders import DIGITS_CSV, SPEECH_CSV, write_audio_folder_shards
    from selfsup.data.reader import MANIFEST

    speech, digit = corpus.with_name(f"{corpus.name}-shards"), digits.with_name(f"{digits.name}-shards")
    for folder, labels, out, done, per_shard in (
        (corpus, SPEECH_CSV, speech, speech / MANIFEST, 1000),
        (digits, DIGITS_CSV, digit, digit / "test" / MANIFEST, 5000),
    ):
        if done.exists():
            print(f"  shards of {folder.name}: already in {out}")
            continue
        for dest, m in write_audio_folder_shards(folder, out, str(folder / labels), per_shard):
            print(f"wrote {m['num_samples']} clips ({len(m['skipped'])} bad skipped) to {dest}")
    return speech, digit
