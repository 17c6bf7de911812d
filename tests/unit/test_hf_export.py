"""`selfsup export` of a wav2vec 2.0 run writes a folder that `transformers.Wav2Vec2Model.from_pretrained`
loads with every weight, and whose features are the selfsup encoder's (BASE- and LARGE-style layouts,
equal and padded lengths, with the folder's own feature extractor); the exporter needs no transformers."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

import selfsup
from selfsup.cli import main
from selfsup.config import parse_config
from selfsup.eval.features import export_encoder
from selfsup.tasks import task_for
from tests.helpers import save_at

transformers = pytest.importorskip("transformers")  # in the dev extra; the guard is for bare installs

TINY = {
    "conv_channels": 16,
    "embed_dim": 32,
    "num_heads": 2,
    "ffn_dim": 64,
    "num_layers": 2,
    "pos_conv_groups": 4,
    "codebook_entries": 16,
    "codevector_dim": 16,
    "final_dim": 16,
}
# BASE layout: group norm after conv 1, post-LN, even position-conv kernel (one frame trimmed), no conv bias.
# LARGE layout: layer norm after every conv, pre-LN with a final norm, odd kernel, conv bias, waveform normalised.
BASE = {"conv_norm": "group_norm", "layer_norm_first": False, "pos_conv_kernel": 16, "conv_bias": False}
LARGE = {
    "conv_norm": "layer_norm",
    "layer_norm_first": True,
    "pos_conv_kernel": 15,
    "conv_bias": True,
    "normalize_waveform": True,
}


def trained_run(tmp_path, method: dict):
    """(the wav2vec2 objective with noise on every weight, so no norm is the identity, its checkpoint)."""
    cfg = parse_config(
        {
            "name": "w",
            "run_root": str(tmp_path / "runs"),
            "data": {"kind": "audio", "train": "x"},
            "method": {"name": "wav2vec2", "preset": "tiny", **TINY, **method},
        }
    )
    torch.manual_seed(0)
    objective = task_for(cfg).build_objective(cfg)
    with torch.no_grad():
        for p in objective.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ckpt = save_at(cfg.run_dir, cfg, 1, objective.state_dict(), keep=1)
    return objective.eval(), ckpt


def waves(lengths: list[int]) -> list[np.ndarray]:
    g = np.random.default_rng(0)
    return [(0.3 * g.standard_normal(n) + 0.1).astype(np.float32) for n in lengths]


def padded(clips: list[np.ndarray], normalize: bool = False) -> torch.Tensor:
    """(B, S) zero-padded clips; with ``normalize`` each first normalised as selfsup's encoder does (variance
    eps 1e-5)."""
    if normalize:
        clips = [(c - c.mean()) / np.sqrt(c.var() + 1e-5) for c in clips]
    longest = max(len(c) for c in clips)
    return torch.from_numpy(np.stack([np.pad(c, (0, longest - len(c))) for c in clips]))


@pytest.mark.parametrize("layout", [BASE, LARGE], ids=["base", "large"])
def test_exported_folder_loads_into_transformers_with_the_same_features(tmp_path, capsys, layout):
    objective, ckpt = trained_run(tmp_path, layout)
    out = tmp_path / "hf"
    assert main(["export", str(ckpt.parents[1]), str(out)]) == 0
    assert f"Wav2Vec2Model.from_pretrained('{out}')" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert (config["feat_extract_norm"], config["do_stable_layer_norm"]) == (
        ("layer", True) if layout is LARGE else ("group", False)
    )

    model, info = transformers.Wav2Vec2Model.from_pretrained(out, output_loading_info=True)
    assert info["missing_keys"] == info["unexpected_keys"] == info["mismatched_keys"] == set()
    model.eval()
    assert torch.equal(model.masked_spec_embed, objective.mask_embedding)
    extractor = transformers.AutoFeatureExtractor.from_pretrained(out)
    encoder = selfsup.load_encoder(ckpt)  # the checkpoint's encoder in eval mode, as the evaluator uses it
    assert extractor.do_normalize == (layout is LARGE) and extractor.sampling_rate == encoder.sample_rate == 16000

    for lengths in ([8000, 8000, 8000], [8000, 5600, 3300]):  # equal, then padded
        clips = waves(lengths)
        inputs = extractor(clips, sampling_rate=16000, padding=True, return_tensors="pt")
        hf_input = padded(clips, normalize=layout is LARGE)  # what selfsup's encoder sees after its normalisation
        # HF's extractor normalises with variance eps 1e-7, selfsup (as fairseq) with 1e-5: ~5e-5 apart here
        torch.testing.assert_close(inputs.input_values, hf_input, rtol=2e-4, atol=1e-6)
        with torch.no_grad():
            want, frames = encoder(padded(clips), torch.tensor(lengths))
            got = model(hf_input, attention_mask=inputs.attention_mask, output_hidden_states=True)
        valid = torch.arange(want[-1].shape[1])[None, :] < frames[:, None]
        assert got.last_hidden_state.shape == want[-1].shape == (3, 24, 32)
        torch.testing.assert_close(got.last_hidden_state[valid], want[-1][valid], rtol=1e-5, atol=1e-5)
        # selfsup's layer k (k >= 1, what the report's "layer" counts) is HF's hidden_states[k]; pre-LN's
        # last one is last_hidden_state (hidden_states[-1] is before the final norm)
        for k in range(1, len(want) - (layout is LARGE)):
            torch.testing.assert_close(got.hidden_states[k][valid], want[k][valid], rtol=1e-5, atol=1e-5)

    fresh = transformers.Wav2Vec2Model(transformers.Wav2Vec2Config(**config)).eval()
    with torch.no_grad():
        assert not torch.allclose(fresh(**inputs).last_hidden_state, got.last_hidden_state, atol=1e-2)


def test_the_exporter_needs_no_transformers(tmp_path, monkeypatch):
    _, ckpt = trained_run(tmp_path, BASE)
    monkeypatch.setitem(sys.modules, "transformers", None)  # any import of transformers now fails
    line = export_encoder(ckpt, tmp_path / "deep" / "hf")
    assert "Hugging Face folder" in line
    assert sorted(p.name for p in (tmp_path / "deep" / "hf").iterdir()) == [
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
    ]
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "deep" / "hf").iterdir()}
    assert len(set(modes.values())) == 1 and modes["model.safetensors"] & 0o044, modes  # readable like its siblings


def test_a_file_path_is_refused_in_one_line(tmp_path, capsys):
    _, ckpt = trained_run(tmp_path, BASE)
    assert main(["export", str(ckpt), str(tmp_path / "w2v.pt")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "w2v.pt: a wav2vec2 encoder exports as a Hugging Face folder" in err
    assert not (tmp_path / "w2v.pt").exists()
