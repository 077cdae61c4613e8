"""The `small` stand-in model: SAM Audio's DiT at 8 layers x 256 wide (head dim 64), an MDCT codec at 50 latent
frames per second (80 channels, 0-2 kHz; exact on the band-limited scenes) and a contextual phrase encoder. See docs/small_model.md.

``load_model("small")`` loads the shipped weights; ``build_small_model()`` gives a randomly initialised one.
"""

from __future__ import annotations

import copy

from ..data.scenes import CLIP_SECONDS, vocabulary
from .standins import build_standin_model

DEFAULT_SMALL_CONFIG: dict = {
    "name": "small",
    "trained_clip_seconds": CLIP_SECONDS,
    "codec": {"type": "mdct", "sample_rate": 16_000, "hop": 320, "bins": 80, "scale": 10.0},
    "text_encoder": {"type": "phrase_transformer", "vocabulary": list(vocabulary()), "dim": 128, "layers": 2,
                     "heads": 4, "max_tokens": 8},
    "model": {"dim": 256, "n_heads": 4, "n_layers": 8, "latent_dim": 80, "text_dim": 128},
}


def build_small_model(config_dict: dict | None = None):
    return build_standin_model(copy.deepcopy(DEFAULT_SMALL_CONFIG if config_dict is None else config_dict))
