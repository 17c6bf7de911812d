"""wav2vec 2.0 BASE training throughput on CPU: seconds of audio per second of training.

One training step = forward + backward + Adam step on a batch of ``--batch`` utterances of
``--seconds`` seconds, for selfsup's ``Wav2Vec2Pretraining`` and, when ``transformers`` is installed,
HuggingFace ``Wav2Vec2ForPreTraining`` in the same BASE configuration (mask and negatives sampled
inside the timed step for both). Prints both throughputs and their ratio.

    python -m benchmarks.wav2vec2_speed            # or: python benchmarks/wav2vec2_speed.py
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from selfsup.audio.wav2vec2 import Wav2Vec2Pretraining
from selfsup.config import Wav2Vec2Config
from selfsup.core.objective import Progress


def _time_steps(step: Callable[[], None], warmup: int, steps: int) -> list[float]:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times


def selfsup_step(waves: torch.Tensor, lengths: torch.Tensor) -> Callable[[], None]:
    model = Wav2Vec2Pretraining(Wav2Vec2Config.base()).train()
    optimiser = torch.optim.Adam(model.param_groups(), lr=5e-4, betas=(0.9, 0.98), eps=1e-6)

    def step() -> None:
        optimiser.zero_grad(set_to_none=True)
        model((waves, lengths), Progress(0, 400_000))["loss"].backward()
        optimiser.step()

    return step


def huggingface_step(waves: torch.Tensor) -> Callable[[], None] | None:
    try:
        from transformers import Wav2Vec2Config as HFConfig
        from transformers import Wav2Vec2ForPreTraining
        from transformers.models.wav2vec2.modeling_wav2vec2 import _compute_mask_indices, _sample_negative_indices
    except ImportError:
        return None
    cfg = HFConfig(  # BASE as in the paper, matching Wav2Vec2Config.base()
        feat_extract_norm="group",
        do_stable_layer_norm=False,
        conv_bias=False,
        hidden_dropout=0.1,
        attention_dropout=0.1,
        activation_dropout=0.0,
        feat_proj_dropout=0.1,
        feat_quantizer_dropout=0.1,
        layerdrop=0.05,
        mask_time_prob=0.65,
        mask_time_length=10,
        mask_time_min_masks=2,
        num_codevector_groups=2,
        num_codevectors_per_group=320,
        codevector_dim=256,
        proj_codevector_dim=256,
        num_negatives=100,
        contrastive_logits_temperature=0.1,
        diversity_loss_weight=0.1,
    )
    model = Wav2Vec2ForPreTraining(cfg).train()
    optimiser = torch.optim.Adam(model.parameters(), lr=5e-4, betas=(0.9, 0.98), eps=1e-6)
    batch = waves.shape[0]
    frames = int(model._get_feat_extract_output_lengths(waves.shape[1]))

    def step() -> None:
        mask = _compute_mask_indices((batch, frames), cfg.mask_time_prob, cfg.mask_time_length, min_masks=2)
        negatives = _sample_negative_indices((batch, frames), cfg.num_negatives, mask_time_indices=mask)
        optimiser.zero_grad(set_to_none=True)
        out = model(
            waves,
            mask_time_indices=torch.from_numpy(mask),
            sampled_negative_indices=torch.from_numpy(negatives),
        )
        out.loss.backward()
        optimiser.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()

    torch.manual_seed(0)
    samples = int(args.seconds * 16_000)
    waves = torch.randn(args.batch, samples) * 0.1
    lengths = torch.full((args.batch,), samples, dtype=torch.int64)
    audio_seconds = args.batch * args.seconds
    print(
        f"wav2vec2-base training step (fwd+bwd+Adam) on CPU, {torch.get_num_threads()} threads, "
        f"batch {args.batch} x {args.seconds:g} s, {args.warmup} warm-up + {args.steps} timed steps"
    )

    ours = statistics.median(_time_steps(selfsup_step(waves, lengths), args.warmup, args.steps))
    print(f"selfsup Wav2Vec2Pretraining:        {ours:7.2f} s/step  {audio_seconds / ours:6.2f} audio-s/s")

    hf = huggingface_step(waves)
    if hf is None:
        print(
            "transformers Wav2Vec2ForPreTraining: skipped (transformers is not installed; "
            "pip install transformers==5.24.0)"
        )
        return
    theirs = statistics.median(_time_steps(hf, args.warmup, args.steps))
    print(f"transformers Wav2Vec2ForPreTraining: {theirs:7.2f} s/step  {audio_seconds / theirs:6.2f} audio-s/s")
    print(f"ratio selfsup / transformers throughput: {theirs / ours:.2f}x")


if __name__ == "__main__":
    main()
