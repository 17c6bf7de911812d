"""wav2vec 2.0: frames, masking, quantiser, loss (against an independent re-computation), configs, health."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from selfsup.audio.feature_encoder import GradMultiply, num_frames
from selfsup.audio.health import CodebookCollapse, CodebookHealthMonitor
from selfsup.audio.loss import contrastive_logits, sample_negatives
from selfsup.audio.masking import compute_span_mask
from selfsup.audio.quantizer import gumbel_temperature
from selfsup.audio.wav2vec2 import Wav2Vec2Pretraining
from selfsup.config import Wav2Vec2Config, load_config
from selfsup.core.objective import Objective, Progress

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
METRICS = {
    "loss",
    "contrastive_loss",
    "diversity_loss",
    "feature_penalty",
    "accuracy",
    "perplexity_hard",
    "perplexity_soft",
    "gumbel_temperature",
    "duplicate_distractor_fraction",
}


def _tiny(seed: int = 0) -> Wav2Vec2Pretraining:
    torch.manual_seed(seed)
    return Wav2Vec2Pretraining(Wav2Vec2Config.tiny())


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two utterances, 1 s and 0.75 s (zero-padded), of noisy tones: (2, 16000), lengths (2,)."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(16000) / 16000
    waves = torch.stack([torch.sin(2 * math.pi * f * t) for f in (220.0, 330.0)]) * 0.3
    waves = waves + 0.05 * torch.randn(waves.shape, generator=g)
    lengths = torch.tensor([16000, 12000])
    waves[1, 12000:] = 0.0
    return waves, lengths


def test_one_second_of_audio_gives_49_frames():
    cfg = Wav2Vec2Config.tiny()
    assert num_frames(16000, cfg.conv_kernels, cfg.conv_strides) == 49
    model = _tiny().eval()
    with torch.no_grad():
        features, frame_lengths = model.encoder.extract_features(torch.zeros(1, 16000), torch.tensor([16000]))
    assert features.shape == (1, 49, cfg.conv_channels)
    assert frame_lengths.tolist() == [49]


def test_span_mask_masks_about_49_percent_with_equal_counts_per_row():
    torch.manual_seed(0)
    fractions = [compute_span_mask(torch.full((4,), 1000), 1000, 0.65, 10).float().mean() for _ in range(25)]
    assert 0.42 <= float(torch.stack(fractions).mean()) <= 0.56
    lengths = torch.tensor([500, 420, 300, 137])
    for _ in range(20):
        mask = compute_span_mask(lengths, 500, 0.65, 10)
        counts = mask.sum(dim=1)
        assert (counts == counts[0]).all() and counts[0] > 0
        assert not (mask & (torch.arange(500)[None, :] >= lengths[:, None])).any()  # no padding masked
        assert counts[0] <= 0.65 * 137  # limited by the shortest row


def test_initial_contrastive_loss_is_about_log_k_plus_1():
    model = _tiny().eval()
    with torch.no_grad():
        out = model(_batch(), Progress(0, 100))
    assert abs(float(out["contrastive_loss"]) - math.log(model.cfg.num_negatives + 1)) < 0.5


@pytest.mark.parametrize("training", [True, False])
def test_perplexities_within_one_and_g_times_v(training):
    model = _tiny().train(training)
    num_codes = model.quantizer.num_codes
    with torch.no_grad():
        out = model(_batch(), Progress(0, 100))
        for key in ("perplexity_hard", "perplexity_soft"):
            assert 1.0 <= float(out[key]) <= num_codes
        # A collapsed quantiser (one entry per group always wins) sits at the floor, G.
        model.quantizer.weight_proj.weight.zero_()
        model.quantizer.weight_proj.bias.zero_()
        model.quantizer.weight_proj.bias[:: model.quantizer.entries] = 100.0
        collapsed = model.eval()(_batch(), Progress(0, 100))
    assert float(collapsed["perplexity_hard"]) == pytest.approx(model.quantizer.groups)
    assert float(collapsed["perplexity_soft"]) == pytest.approx(model.quantizer.groups, abs=1e-3)


def test_distractors_are_other_masked_frames_of_the_same_utterance():
    torch.manual_seed(0)
    lengths = torch.tensor([200, 150, 90])
    mask = compute_span_mask(lengths, 200, 0.65, 10)
    negatives = sample_negatives(mask, 100)
    assert negatives.shape == (3, 200, 100)
    for b in range(3):
        masked = mask[b].nonzero().flatten()
        seen = torch.zeros(200, dtype=torch.bool)
        for t in masked.tolist():
            idx = negatives[b, t]
            assert (idx != t).all(), "a distractor is the positive itself"
            assert mask[b, idx].all(), "a distractor is not a masked frame"
            seen[idx] = True
        assert torch.equal(seen, mask[b])  # every other masked frame gets drawn somewhere


def test_identical_targets_are_masked_and_counted():
    context = torch.randn(1, 4, 8)
    targets = torch.randn(1, 4, 8)
    targets[0, 2] = targets[0, 0]
    codes = torch.tensor([[[1, 1], [2, 2], [1, 1], [1, 3]]])  # frame 2 duplicates frame 0; 3 differs
    negatives = torch.tensor([[[2, 1, 3], [0, 2, 3], [0, 1, 3], [0, 1, 2]]])
    logits, duplicates = contrastive_logits(context, targets, codes, negatives, 0.1)
    assert duplicates.tolist() == [[[True, False, False], [False, False, False], [True, False, False], [False] * 3]]
    assert torch.isinf(logits[0, 0, 1]) and torch.isinf(logits[0, 2, 1])
    assert torch.isfinite(logits[0, 1]).all()
    expected = F.cosine_similarity(context[0, 1], targets[0, 3], dim=0) / 0.1
    assert float(logits[0, 1, 3]) == pytest.approx(float(expected.detach()), abs=1e-5)


def test_logits_are_float32_under_autocast():
    model = _tiny()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        step = model.step(*_batch())
    assert step.logits.dtype == torch.float32
    assert torch.isfinite(step.metrics["loss"])


def _independent_loss(model: Wav2Vec2Pretraining, waves, lengths, mask, negatives) -> torch.Tensor:
    """The wav2vec 2.0 loss written out frame by frame in float64 from the model's building blocks."""
    cfg = model.cfg
    enc = model.encoder
    features, frame_lengths = enc.feature_extractor(waves, lengths)
    normed = F.layer_norm(features, (cfg.conv_channels,), enc.layer_norm.weight, enc.layer_norm.bias)
    x = normed @ enc.post_extract_proj.weight.T + enc.post_extract_proj.bias
    x = torch.where(mask[..., None], model.mask_embedding, x)
    context = model.final_proj(enc.context(x, frame_lengths)[-1]).double()
    q_logits = model.quantizer.weight_proj(normed).double().view(*mask.shape, cfg.codebook_groups, -1)
    picked = [model.quantizer.codebook[g][q_logits[:, :, g].argmax(-1)] for g in range(cfg.codebook_groups)]
    targets = model.project_q(torch.cat(picked, dim=-1)).double()

    losses = []
    for b, t in mask.nonzero().tolist():
        candidates = torch.stack([targets[b, t], *targets[b, negatives[b, t]]])
        sims = torch.stack([F.cosine_similarity(context[b, t], c, dim=0) for c in candidates]) / cfg.logit_temperature
        same = (candidates[1:] == candidates[0]).all(dim=-1)
        sims = torch.cat([sims[:1], sims[1:].masked_fill(same, -math.inf)])
        losses.append(torch.logsumexp(sims, dim=0) - sims[0])
    contrastive = torch.stack(losses).mean()

    probs = q_logits[mask].softmax(dim=-1).mean(dim=0)  # (G, V)
    perplexity = sum(torch.exp(-(p[p > 0] * p[p > 0].log()).sum()) for p in probs)
    num_codes = cfg.codebook_groups * cfg.codebook_entries
    diversity = (num_codes - perplexity) / num_codes
    valid = torch.arange(mask.shape[1])[None, :] < frame_lengths[:, None]
    penalty = features.double()[valid].pow(2).mean()
    return contrastive + cfg.diversity_weight * diversity + cfg.feature_penalty_weight * penalty


@pytest.mark.parametrize("entries", [320, 2])  # 2 entries: many distractors duplicate the positive
def test_optimiser_step_matches_independent_loss_and_updates_parameters(entries):
    torch.manual_seed(0)
    cfg = Wav2Vec2Config(**{**Wav2Vec2Config.tiny().model_dump(), "codebook_entries": entries})
    model = Wav2Vec2Pretraining(cfg).eval()  # eval: no dropout, argmax quantiser -> deterministic
    waves, lengths = _batch()
    torch.manual_seed(1)
    step = model.step(waves, lengths)
    mask, negatives = step.mask, step.negatives
    expected = _independent_loss(model, waves, lengths, mask, negatives)
    assert float(step.metrics["loss"].detach()) == pytest.approx(float(expected.detach()), abs=1e-5)
    duplicates = float(step.metrics["duplicate_distractor_fraction"])
    assert duplicates == pytest.approx(float(step.duplicates[mask].float().mean()))
    assert (duplicates > 0.1) == (entries == 2)

    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimiser = torch.optim.SGD(model.param_groups(), lr=1e-2)
    optimiser.zero_grad()
    step.metrics["loss"].backward()
    optimiser.step()
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    for name in (
        "encoder.feature_extractor.conv_layers.0.conv.weight",
        "encoder.context.layers.0.attention.q_proj.weight",
        "mask_embedding",
        "quantizer.weight_proj.weight",
        "quantizer.codebook",
        "project_q.weight",
        "final_proj.weight",
    ):
        assert name in changed, name
    after = model.step(waves, lengths, mask=mask, negatives=negatives).metrics["loss"]
    assert float(after.detach()) == pytest.approx(
        float(_independent_loss(model, waves, lengths, mask, negatives).detach()), abs=1e-5
    )
    assert float(after.detach()) < float(step.metrics["loss"].detach())


def test_forward_follows_the_objective_contract_and_does_not_leak_gradients():
    model = _tiny()
    assert isinstance(model, Objective)
    out = model(_batch(), Progress(0, 100))
    assert out.keys() >= METRICS
    assert out["loss"].requires_grad and out["loss"].ndim == 0
    for key in METRICS - {"loss"}:
        assert not out[key].requires_grad and out[key].ndim == 0, key
    grouped = [p for group in model.param_groups() for p in group["params"]]
    assert len(grouped) == len(list(model.parameters())) == len({id(p) for p in grouped})


def test_encoder_returns_every_layer_for_probes():
    model = _tiny().eval()
    waves, lengths = _batch()
    with torch.no_grad():
        layers, frame_lengths = model.encoder(waves, lengths)
    assert len(layers) == model.cfg.num_layers + 1
    assert all(h.shape == (2, 49, model.cfg.embed_dim) for h in layers)
    assert frame_lengths.tolist() == [49, num_frames(12000, model.cfg.conv_kernels, model.cfg.conv_strides)]


def test_feature_gradient_is_scaled():
    x = torch.ones(3, requires_grad=True)
    GradMultiply.apply(x, 0.1).sum().backward()
    assert torch.allclose(x.grad, torch.full((3,), 0.1))


@pytest.mark.parametrize("total_steps", [1000, 400_000])
def test_gumbel_temperature_anneals_2_to_half_at_the_paper_fraction(total_steps):
    assert gumbel_temperature(Progress(0, total_steps)) == pytest.approx(2.0)
    paper_fraction = math.log(4) / -math.log(0.999995) / 400_000  # ~0.693
    assert gumbel_temperature(Progress(int(0.95 * paper_fraction * total_steps), total_steps)) > 0.5
    assert gumbel_temperature(Progress(int(1.02 * paper_fraction * total_steps), total_steps)) == 0.5
    model = _tiny()
    model.on_after_step(Progress(total_steps // 2, total_steps))
    out = model(_batch(), Progress(total_steps // 2, total_steps))
    assert 0.5 < float(out["gumbel_temperature"]) < 2.0


def test_base_has_95m_parameters():
    with torch.device("meta"):
        model = Wav2Vec2Pretraining(Wav2Vec2Config.base())
    assert 94e6 <= sum(p.numel() for p in model.parameters()) <= 96e6


@pytest.mark.parametrize("name", ["tiny", "base", "large"])
def test_each_shipped_wav2vec2_config_takes_its_model_from_the_preset_alone(name):
    path = CONFIGS / f"wav2vec2-{name}.yaml"
    raw = yaml.safe_load(path.read_text())
    assert raw["method"] == {"name": "wav2vec2", "preset": name}  # the values live in Wav2Vec2Config only
    assert {"lr", "betas", "eps", "weight_decay"} <= raw["optim"].keys()
    cfg = load_config(path)  # a full experiment that `selfsup pretrain` accepts
    assert cfg.data.kind == "audio" and cfg.data.max_seconds > 0
    model = cfg.method.model_dump(exclude={"name", "preset"})
    assert Wav2Vec2Config(**model) == getattr(Wav2Vec2Config, name)()
    # a value beside the preset wins over it; an unknown key is refused
    assert load_config(path, ["method.num_negatives=7"]).method.num_negatives == 7
    with pytest.raises(ValueError, match="no_such_key"):
        Wav2Vec2Config(**model, no_such_key=1)


def _feed(monitor, series):
    return [monitor.update(step, {"accuracy": a, "perplexity_hard": p}) for step, (a, p) in enumerate(series)]


def test_health_monitor_flags_collapse_and_shortcut_and_not_healthy_runs():
    healthy = [(0.05 + 0.02 * i, 300.0 + 5 * i) for i in range(12)]
    assert not any(_feed(CodebookHealthMonitor(window=5), healthy))

    collapsing = [(0.3, 40.0), (0.3, 20.0), (0.3, 8.0), (0.3, 3.5)]
    alarms = _feed(CodebookHealthMonitor(window=5), collapsing)
    assert not any(alarms[:3]) and "collapse" in alarms[3][0]

    shortcut = [(0.2 + 0.05 * i, 300.0 * 0.85**i) for i in range(6)]
    alarms = _feed(CodebookHealthMonitor(window=5), shortcut)
    assert not any(alarms[:4]) and "accuracy rose" in alarms[4][0]

    with pytest.raises(CodebookCollapse, match="collapse"):
        _feed(CodebookHealthMonitor(raise_on_alarm=True), collapsing)
