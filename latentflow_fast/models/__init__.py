"""SAM Audio architecture: config, DiT, attention router, codecs, text encoders, loading."""

from ..sampler import Evaluation, SampleResult, evaluation_schedule, num_evaluations, sample_ode
from .attention import AttentionRouter, sdpa, site_name
from .codecs import AudioCodec
from .config import PRESETS, SAMAudioConfig
from .dacvae import DACVAE
from .dit import DiT
from .loading import check_state_dict, load_model, read_checkpoint
from .sam_audio import SAMAudio, SeparationInputs, SeparationResult
from .text import PrecomputedTextEncoder, T5TextEncoder, TextEncoder

__all__ = [
    "AttentionRouter", "AudioCodec", "DACVAE", "DiT", "Evaluation", "PRESETS", "PrecomputedTextEncoder", "SAMAudio",
    "SAMAudioConfig", "SampleResult", "SeparationInputs", "SeparationResult", "T5TextEncoder", "TextEncoder",
    "check_state_dict", "evaluation_schedule", "load_model", "num_evaluations", "read_checkpoint",
    "sample_ode", "sdpa", "site_name",
]
