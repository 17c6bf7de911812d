"""A wav2vec 2.0 encoder as a Hugging Face ``transformers`` folder, written without transformers.

The folder holds ``config.json`` (a ``Wav2Vec2Config``), ``model.safetensors`` (the weights under
``Wav2Vec2Model``'s key names, the mask embedding as ``masked_spec_embed``) and
``preprocessor_config.json`` (a ``Wav2Vec2FeatureExtractor``). ``Wav2Vec2Model.from_pretrained``
loads every weight, and in eval mode its ``last_hidden_state`` is the encoder's last layer output;
the encoder's layer k >= 1 is HF's ``hidden_states[k]`` (pre-LN: the last one is ``last_hidden_state``,
HF taking ``hidden_states[-1]`` before the final norm). The encoder's layer 0 (projected conv
features) has no HF output (``extract_features`` is the normalised conv features before the projection).

The architectures are the same: torchaudio's components, which selfsup builds on, are the layers
HF's model has: exact GELU, weight norm over dim 2 on the position conv (written as HF checkpoints
store it, ``weight_g`` / ``weight_v``), post-LN = ``do_stable_layer_norm=False``, pre-LN with a
final layer norm = ``True``, every layer norm at eps 1e-5. The one difference: selfsup's encoder
normalises the waveform itself (``normalize_waveform``, variance eps 1e-5); HF's model does not,
its feature extractor does (``do_normalize``, eps 1e-7). Padded frames: pass ``attention_mask``
(the preprocessor returns it), as selfsup masks padding by length.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save
from torch import Tensor, nn

from selfsup.audio.decode import SAMPLE_RATE
from selfsup.config import Wav2Vec2Config
from selfsup.errors import OneLineError

HF_FILES = ("config.json", "model.safetensors", "preprocessor_config.json")

# selfsup encoder key prefix -> Wav2Vec2Model's, first match wins (weight norm's g and v before the conv).
_RENAMES = (
    ("feature_extractor.", "feature_extractor."),
    ("layer_norm.", "feature_projection.layer_norm."),
    ("post_extract_proj.", "feature_projection.projection."),
    ("context.pos_conv.conv.parametrizations.weight.original0", "encoder.pos_conv_embed.conv.weight_g"),
    ("context.pos_conv.conv.parametrizations.weight.original1", "encoder.pos_conv_embed.conv.weight_v"),
    ("context.pos_conv.", "encoder.pos_conv_embed."),
    ("context.layer_norm.", "encoder.layer_norm."),
    ("context.layers.", "encoder.layers."),
)


class ExportError(OneLineError, ValueError):
    """An export that cannot be written where it was asked."""


def hf_config(cfg: Wav2Vec2Config) -> dict:
    """``cfg`` as a ``transformers.Wav2Vec2Config`` dict (its other fields keep HF's defaults)."""
    layers = len(cfg.conv_kernels)
    return {
        "architectures": ["Wav2Vec2Model"],
        "model_type": "wav2vec2",
        "feat_extract_norm": {"group_norm": "group", "layer_norm": "layer"}[cfg.conv_norm],
        "feat_extract_activation": "gelu",
        "num_feat_extract_layers": layers,
        "conv_dim": [cfg.conv_channels] * layers,
        "conv_kernel": list(cfg.conv_kernels),
        "conv_stride": list(cfg.conv_strides),
        "conv_bias": cfg.conv_bias,
        "hidden_size": cfg.embed_dim,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "intermediate_size": cfg.ffn_dim,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-5,
        "num_conv_pos_embeddings": cfg.pos_conv_kernel,
        "num_conv_pos_embedding_groups": cfg.pos_conv_groups,
        "do_stable_layer_norm": cfg.layer_norm_first,
        "hidden_dropout": cfg.dropout,
        "attention_dropout": cfg.attention_dropout,
        "activation_dropout": cfg.activation_dropout,
        "feat_proj_dropout": cfg.dropout_input,
        "feat_quantizer_dropout": cfg.dropout_features,
        "layerdrop": cfg.layer_drop,
    }


def hf_preprocessor_config(cfg: Wav2Vec2Config) -> dict:
    """The ``Wav2Vec2FeatureExtractor`` of ``cfg``'s input: 16 kHz mono, zero padding with an
    attention mask, normalised per utterance when the encoder normalises."""
    return {
        "feature_extractor_type": "Wav2Vec2FeatureExtractor",
        "feature_size": 1,
        "sampling_rate": SAMPLE_RATE,
        "padding_value": 0.0,
        "padding_side": "right",
        "do_normalize": cfg.normalize_waveform,
        "return_attention_mask": True,
    }


def hf_state_dict(encoder: nn.Module, mask_embedding: Tensor) -> dict[str, Tensor]:
    """A ``Wav2Vec2Encoder``'s weights and the objective's (D,) mask embedding under ``Wav2Vec2Model``'s
    key names, each a contiguous copy (what safetensors stores)."""
    out = {"masked_spec_embed": mask_embedding.detach().clone().contiguous()}
    for key, value in encoder.state_dict().items():
        prefix, name = next(((p, n) for p, n in _RENAMES if key.startswith(p)), (None, None))
        if prefix is None or name is None:
            raise ExportError(f"encoder weight {key} has no Wav2Vec2Model name")
        out[name + key[len(prefix) :]] = value.detach().clone().contiguous()
    return out


def write_hf_folder(out: str | Path, encoder: nn.Module, mask_embedding: Tensor, cfg: Wav2Vec2Config) -> Path:
    """Write :data:`HF_FILES` to the folder ``out`` (made if missing; a file path is refused) and return it."""
    out = Path(out)
    if out.is_file() or out.suffix in (".pt", ".pth", ".bin", ".safetensors"):
        raise ExportError(
            f"{out}: a wav2vec2 encoder exports as a Hugging Face folder ({', '.join(HF_FILES)}); give a folder path"
        )
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(hf_config(cfg), indent=2) + "\n")
    (out / "preprocessor_config.json").write_text(json.dumps(hf_preprocessor_config(cfg), indent=2) + "\n")
    # written as its siblings are (safetensors' save_file makes the file 0600, whatever the umask)
    (out / "model.safetensors").write_bytes(save(hf_state_dict(encoder, mask_embedding), metadata={"format": "pt"}))
    return out
