"""wav2vec2-tiny pretrained on ~7 h of real speech, probed on spoken digits with unseen voices.

1. builds the speech corpus (Debian packages) and the spoken-digit set (espeak-ng) into ``--data``
   (``selfsup.data.builders``, as ``selfsup demo --audio`` does);
2. writes 16 kHz FLAC shards with ``selfsup shards write audio-folder``;
3. pretrains ``configs/wav2vec2-tiny.yaml`` without Ray for its ``optim.epochs``, or fewer if they do not
   fit ``--minutes`` of training (``optim.minutes``: the loop times its first steps and sizes the schedule);
4. evaluates with ``evaluate``: best layer by kNN on held-out train voices, then kNN@20 and
   the linear probe on the test voices, against random init and log-mel.

    python -m benchmarks.wav2vec2_probe            # the config's ~1,800 updates within a 15-minute budget (<= 20)
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from selfsup.cluster.driver import pretrain
from selfsup.config import load_config
from selfsup.demo import build_audio_probe_clips, write_audio_probe_shards
from selfsup.eval.run import evaluate

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "wav2vec2-tiny.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=15.0, help="pretraining budget (default 15)")
    parser.add_argument("--data", default="data", help="cache folder for corpora and shards")
    parser.add_argument("--per-class", type=int, default=100, help="spoken digits per class (4/5 train)")
    parser.add_argument("--run-root", default="runs/bench")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: the config's train.threads)")
    parser.add_argument("overrides", nargs="*", help="extra key.sub=value config overrides")
    args = parser.parse_args()

    started = time.time()
    speech, digits = write_audio_probe_shards(*build_audio_probe_clips(args.data, args.per_class))
    overrides = [f"data.train={speech}", *([f"train.threads={args.threads}"] if args.threads else []), *args.overrides]
    print("config: configs/wav2vec2-tiny.yaml", " ".join(overrides))
    cfg = load_config(CONFIG, overrides + [f"run_root={args.run_root}", f"optim.minutes={args.minutes}"])
    print(
        f"pretraining wav2vec2-tiny: {cfg.optim.epochs:g} epochs of {cfg.data.batch_size} clips "
        f"(<= {cfg.data.max_seconds:g} s), or fewer if they do not fit {args.minutes:g} min"
    )
    train_start = time.time()
    summary = pretrain(cfg, use_ray=False, restart=True)  # a fresh run: an earlier one is set aside
    train_minutes = (time.time() - train_start) / 60
    result = evaluate(cfg.run_dir, str(digits / "train"), str(digits / "test"), cfg.run_dir / "report")

    last = summary["last"]
    print(
        f"\nwav2vec2-tiny, {summary['steps']} steps in {train_minutes:.1f} min on "
        f"{torch.get_num_threads()} CPU threads; "
        f"final loss {last['loss']:.3f}, accuracy {last['accuracy']:.3f}, perplexity {last['perplexity_hard']:.0f}"
    )
    print(f"spoken digits: {digits} (train/test voices disjoint)\n")
    print(f"| {'encoder':<22} | layer | kNN@20 | linear |")
    print(f"|{'-' * 24}|-------|--------|--------|")
    names = {
        "checkpoint": "wav2vec2-tiny pretrained",
        "random_init": "wav2vec2-tiny random",
        "log_mel": "log-mel mean+std",
    }
    for key, scores in result["encoders"].items():
        layer = result["details"][key].get("layer", "-")
        print(f"| {names.get(key, key):<22} | {layer!s:>5} | {scores['knn@20']:6.3f} | {scores['linear']:6.3f} |")
    print(f"\nreport: {cfg.run_dir / 'report'}; total {(time.time() - started) / 60:.1f} min")


if __name__ == "__main__":
    main()
