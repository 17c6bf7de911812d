"""Fast linear probe (DINOv2-style grid on cached features) vs the papers' protocol (frozen backbone,
random-resized crops + flips, SGD momentum 0.9, cosine, 100 epochs) on a Fashion-MNIST checkpoint;
the crops keep 70-100% of a 28-px image (``paper_crop_scale``).

    python -m benchmarks.linear_probe                     # the demo's checkpoint (trains runs/quickstart if missing)
    python -m benchmarks.linear_probe --views 1 2 4 8 --device cuda --paper-batch 1024

Prints both test top-1, their difference (target: fast within 0.5 points of paper) and the speed
ratio (target: fast >= 20x faster). The fast probe's time includes extracting the features; with
``--views V`` it trains on the un-augmented features plus V - 1 passes of the paper probe's crops
and flips (``probe_features``; the default of ``eval.probe_views`` is 4), for 20 / V epochs (the
same number of steps). With ``--paper-epochs`` below 100 the paper probe's 100-epoch time is also
extrapolated (its cost per epoch is constant), but its accuracy is that of the shortened schedule.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from selfsup.core.checkpoint import load_checkpoint, resolve_checkpoint
from selfsup.eval.features import encoder_from_checkpoint
from selfsup.eval.linear import linear_probe, linear_probe_paper
from selfsup.tasks.vision import VisionTask, extract_features, paper_crop_scale, probe_features, views_for


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default="runs/quickstart", help="checkpoint or run directory (default: the demo's)")
    p.add_argument("--train", default="data/fashion-mnist/train")
    p.add_argument("--test", default="data/fashion-mnist/test")
    p.add_argument("--paper-epochs", type=int, default=100)
    p.add_argument("--paper-lr", type=float, default=0.1, help="paper probe LR at batch 256")
    p.add_argument("--paper-batch", type=int, default=256, help="paper probe batch (the LR scales linearly)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="where the encoder runs")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--views", type=int, nargs="+", default=[1, 4], help="fast probes to run: train views per image")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if not Path(args.checkpoint).exists():
        print(f"no checkpoint at {args.checkpoint}: pretraining the demo's recipe, configs/quickstart.yaml (~10 min)")
        subprocess.run(
            [
                sys.executable,
                "-m",
                "selfsup.cli",
                "pretrain",
                "configs/quickstart.yaml",
                f"name={Path(args.checkpoint).name}",
                f"train.threads={args.threads}",
                f"data.train={args.train}",
                "tracking.mode=disabled",
                "--no-ray",
            ],
            check=True,
        )
    ckpt = resolve_checkpoint(args.checkpoint)
    cfg, state, _ = load_checkpoint(ckpt)
    d = cfg.data
    encoder = encoder_from_checkpoint(cfg, state, args.device)
    train, test = VisionTask().read_labelled(args.train, cfg), VisionTask().read_labelled(args.test, cfg)
    train_x, train_y, test_x, test_y = train.inputs, train.labels, test.inputs, test.labels
    num_classes = len(train.classes)

    views = views_for(cfg)
    fast = {}
    for n_views in args.views:
        start = time.perf_counter()
        bank = probe_features(encoder, train_x, views, n_views, desc="features (train)")
        queries = extract_features(encoder, test_x, views, desc="features (test)")
        result = linear_probe(bank, np.tile(train_y, n_views), queries, test_y, num_classes, train_views=n_views)
        fast[n_views] = (result, time.perf_counter() - start)

    start = time.perf_counter()
    paper = linear_probe_paper(
        encoder,
        train_x,
        train_y,
        test_x,
        test_y,
        num_classes,
        d.image_size,
        d.mean,
        d.std,
        epochs=args.paper_epochs,
        batch_size=args.paper_batch,
        lr=args.paper_lr,
    )
    paper_s = time.perf_counter() - start
    paper_100_s = paper_s * 100 / args.paper_epochs

    print(
        f"checkpoint {ckpt} ({cfg.method.name}, {cfg.model.backbone} w{cfg.model.width}); "
        f"{len(train_y)} train / {len(test_y)} test images; {args.device}, {args.threads} torch thread(s)"
    )
    print(
        f"paper probe ({args.paper_epochs} epochs, batch {args.paper_batch}, lr={paper.lr:g} at 256, crops of scale "
        f"{paper_crop_scale(d.image_size)} + flips): top-1 {100 * paper.top1:.2f}%  "
        f"in {paper_s:.1f} s ({paper_s / args.paper_epochs:.1f} s/epoch; 100 epochs ~ {paper_100_s:.0f} s)"
    )
    for n_views, (result, seconds) in fast.items():
        diff = 100 * (result.top1 - paper.top1)
        print(
            f"fast probe, {n_views} view(s) per train image (grid chose lr={result.lr:g} wd={result.weight_decay:g}, "
            f"20/{n_views} epochs on cached features): top-1 {100 * result.top1:.2f}%  in {seconds:.1f} s "
            f"(feature extraction included)"
        )
        shortened = "" if args.paper_epochs >= 100 else f"; paper ran {args.paper_epochs} of 100 epochs"
        print(
            f"    difference fast - paper: {diff:+.2f} points (target |diff| <= 0.5: "
            f"{'met' if abs(diff) <= 0.5 else 'NOT met'}{shortened}); "
            f"speed ratio {paper_s / seconds:.1f}x measured, {paper_100_s / seconds:.1f}x against 100 paper epochs "
            f"(target >= 20x: {'met' if paper_100_s / seconds >= 20 else 'NOT met'})"
        )


if __name__ == "__main__":
    main()
