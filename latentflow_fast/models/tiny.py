"""The tiny default model: an exactly invertible DCT codec, a fixed-vocabulary text encoder and
a small SAM-Audio-architecture DiT (docs/design.md, section 4).

``build_tiny_model(config_dict)`` builds the model described by the shipped
``latentflow_fast/assets/tiny/config.json``; ``load_model("tiny")`` then loads the weights.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
from torch import nn

from .codecs import AudioCodec
from .text import TextEncoder, tokenize_words

TINY_VOCABULARY: tuple[str, ...] = (
    "sine", "tone", "square", "wave", "white", "noise", "click", "train", "chirp", "bursts",
)


def dct_matrix(n: int) -> torch.Tensor:
    """Orthonormal DCT-II matrix ``M`` [n, n] (float64): coefficients = M @ frame, frame = M.T @ coefficients."""
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    m = np.cos(np.pi * (i + 0.5) * k / n) * math.sqrt(2.0 / n)
    m[0] /= math.sqrt(2.0)
    return torch.from_numpy(m)


class TinyCodec(AudioCodec):
    """Non-overlapping frames of ``hop`` samples, each mapped by an orthonormal DCT-II and scaled.

    latent[b, t, :] = scale * DCT(wave[b, t*hop:(t+1)*hop]); decode is the exact inverse
    (an orthogonal matrix), so ``decode(encode(x)) == x`` up to float32 rounding for any
    ``x`` whose length is a multiple of ``hop`` (shorter tails are zero-padded by ``encode``).
    ``scale`` (default 10) brings sources at RMS ~0.1 to latents of ~unit variance.
    The DCT matrix is a plain attribute (float64, cast per call): the codec adds no state-dict keys.
    """

    def __init__(self, sample_rate: int = 16_000, hop: int = 64, scale: float = 10.0):
        super().__init__()
        if not isinstance(hop, int) or hop < 1:
            raise ValueError(f"hop must be a positive int, got {hop!r}")
        if not isinstance(sample_rate, int) or sample_rate < 1:
            raise ValueError(f"sample_rate must be a positive int, got {sample_rate!r}")
        if not (scale > 0 and math.isfinite(scale)):
            raise ValueError(f"scale must be a positive finite number, got {scale!r}")
        self.hop = hop
        self.scale = float(scale)
        self._sample_rate = sample_rate
        # float64 master copy, not a buffer: adds no state-dict keys and survives model.to(float32)
        self._basis64 = dct_matrix(hop)
        self._basis_cache: dict = {}

    @property
    def sample_rate(self) -> int:
        return self._sample_rate

    @property
    def frame_rate(self) -> float:
        return self._sample_rate / self.hop

    @property
    def latent_dim(self) -> int:
        return self.hop

    @property
    def hop_length(self) -> int:
        return self.hop

    def basis(self, device, dtype) -> torch.Tensor:
        key = (str(device), dtype)
        if key not in self._basis_cache:
            self._basis_cache[key] = self._basis64.to(device=device, dtype=dtype)
        return self._basis_cache[key]

    def encode(self, wave: torch.Tensor) -> torch.Tensor:
        """wave [B, S] (or [S]) -> latent [B, ceil(S / hop), hop]."""
        if not isinstance(wave, torch.Tensor):
            raise TypeError(f"wave must be a torch.Tensor, got {type(wave).__name__}")
        if wave.dim() == 1:
            wave = wave.unsqueeze(0)
        if wave.dim() != 2 or wave.shape[-1] == 0:
            raise ValueError(f"wave must be [B, S] with S > 0, got shape {tuple(wave.shape)}")
        if not wave.is_floating_point():
            raise TypeError(f"wave must be a floating tensor, got {wave.dtype}")
        pad = (-wave.shape[-1]) % self.hop
        if pad:
            wave = torch.nn.functional.pad(wave, (0, pad))
        frames = wave.reshape(wave.shape[0], -1, self.hop)
        basis = self.basis(wave.device, wave.dtype)
        return (frames @ basis.T) * self.scale

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """latent [B, T, hop] -> wave [B, T * hop]."""
        if not isinstance(latent, torch.Tensor):
            raise TypeError(f"latent must be a torch.Tensor, got {type(latent).__name__}")
        if latent.dim() != 3 or latent.shape[-1] != self.hop:
            raise ValueError(f"latent must be [B, T, {self.hop}], got shape {tuple(latent.shape)}")
        basis = self.basis(latent.device, latent.dtype)
        frames = (latent / self.scale) @ basis
        return frames.reshape(latent.shape[0], -1)


class TinyTextEncoder(TextEncoder):
    """Prompts over a fixed vocabulary: lowercase, whitespace tokens, a learned embedding per word
    plus a learned embedding per position. Weights live in the model state dict (``text_encoder.*``).
    """

    def __init__(self, vocabulary=TINY_VOCABULARY, dim: int = 64, max_tokens: int = 4):
        super().__init__()
        vocabulary = tuple(vocabulary)
        if not vocabulary or len(set(vocabulary)) != len(vocabulary):
            raise ValueError("vocabulary must be a non-empty list of distinct words")
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive int, got {max_tokens!r}")
        self.vocabulary = vocabulary
        self.max_tokens = max_tokens
        self._index = {w: i for i, w in enumerate(vocabulary)}
        self.token_embedding = nn.Embedding(len(vocabulary), dim)
        self.position_embedding = nn.Parameter(torch.zeros(max_tokens, dim))
        nn.init.normal_(self.token_embedding.weight, std=1.0)
        nn.init.normal_(self.position_embedding, std=0.1)

    @property
    def dim(self) -> int:
        return self.token_embedding.embedding_dim

    def tokenize(self, prompt: str) -> list[int]:
        return tokenize_words(prompt, self._index, self.max_tokens, owner="the tiny model's")

    def forward(self, prompts) -> tuple[torch.Tensor, torch.Tensor]:
        """prompts (str or list[str]) -> (features [B, L, dim] float32, mask [B, L] bool, True = token)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise TypeError("prompts must be a non-empty list of strings")
        ids = [self.tokenize(p) for p in prompts]
        length = max(len(t) for t in ids)
        device = self.token_embedding.weight.device
        tokens = torch.zeros(len(ids), length, dtype=torch.long, device=device)
        mask = torch.zeros(len(ids), length, dtype=torch.bool, device=device)
        for b, t in enumerate(ids):
            tokens[b, : len(t)] = torch.tensor(t, dtype=torch.long)
            mask[b, : len(t)] = True
        features = self.token_embedding(tokens) + self.position_embedding[:length]
        features = features * mask.unsqueeze(-1)
        return features.float(), mask


# Sizes of the shipped model; the DiT part is SAMAudioConfig's fields.
DEFAULT_TINY_CONFIG: dict = {
    "name": "tiny",
    "codec": {"type": "tiny_dct", "sample_rate": 16_000, "hop": 32, "scale": 10.0},
    "text_encoder": {"type": "tiny_vocab", "vocabulary": list(TINY_VOCABULARY), "dim": 64, "max_tokens": 4},
    # dim = 4 x latent channels: the input projection must carry the noisy state (2C) and the mixture (C)
    # without an information bottleneck (a first run with dim = 2C plateaued far below the quality target)
    "model": {"dim": 128, "n_heads": 4, "n_layers": 3, "latent_dim": 32, "text_dim": 64},
}


def build_tiny_model(config_dict: dict | None = None):
    """SAMAudio with the tiny codec and text encoder attached, from a config dict like
    ``DEFAULT_TINY_CONFIG`` (keys ``codec``, ``text_encoder``, ``model``). Weights are random."""
    from .standins import build_standin_model

    return build_standin_model(copy.deepcopy(DEFAULT_TINY_CONFIG if config_dict is None else config_dict))
