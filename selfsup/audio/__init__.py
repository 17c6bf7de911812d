"""wav2vec 2.0 pretraining: feature encoder, span masking, Gumbel quantiser, context network, loss,
codebook health monitoring, and audio decoding."""

from selfsup.audio.decode import decode_audio, encode_flac
from selfsup.audio.health import CodebookCollapse, CodebookHealthMonitor
from selfsup.audio.wav2vec2 import Wav2Vec2Encoder, Wav2Vec2Pretraining

__all__ = [
    "CodebookCollapse",
    "CodebookHealthMonitor",
    "Wav2Vec2Encoder",
    "Wav2Vec2Pretraining",
    "decode_audio",
    "encode_flac",
]
