"""PhraseTextEncoder: a small contextual text encoder over a fixed vocabulary (the `small` model's).

Like T5's last_hidden_state, every token's feature depends on the whole phrase: word and position
embeddings go through a few pre-norm transformer encoder layers (bidirectional self-attention over the
prompt's tokens, padding masked). Weights live in the model's state dict under ``text_encoder.*`` and are
trained jointly with the DiT.

The encoder computes its attention with explicit matrix products rather than
``F.scaled_dot_product_attention``, so the hook-style probing API (which intercepts SDPA) sees only the
DiT's attention sites.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .text import TextEncoder, tokenize_words


class _EncoderLayer(nn.Module):
    def __init__(self, dim: int, heads: int, ffn_dim: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn_in = nn.Linear(dim, ffn_dim)
        self.ffn_out = nn.Linear(ffn_dim, dim)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        logits = (q @ k.transpose(-1, -2)) / math.sqrt(D // self.heads)
        logits = logits.masked_fill(~key_mask[:, None, None, :], float("-inf"))
        attn = torch.softmax(logits, dim=-1) @ v  # every row has >= 1 real token: no all-masked rows
        x = x + self.out(attn.transpose(1, 2).reshape(B, L, D))
        return x + self.ffn_out(F.gelu(self.ffn_in(self.norm2(x))))


class PhraseTextEncoder(TextEncoder):
    """Prompts (lowercase words from ``vocabulary``, at most ``max_tokens``) -> contextual features.

    Returns (features [B, L, dim] float32, mask [B, L] bool, True = token); padded positions are zero.
    """

    def __init__(self, vocabulary, dim: int = 128, layers: int = 2, heads: int = 4, max_tokens: int = 8,
                 ffn_mult: int = 2):
        super().__init__()
        vocabulary = tuple(vocabulary)
        if not vocabulary or len(set(vocabulary)) != len(vocabulary):
            raise ValueError("vocabulary must be a non-empty list of distinct words")
        for name, value in (("dim", dim), ("layers", layers), ("heads", heads), ("max_tokens", max_tokens),
                            ("ffn_mult", ffn_mult)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
        self.vocabulary = vocabulary
        self.max_tokens = max_tokens
        self._index = {w: i for i, w in enumerate(vocabulary)}
        self.token_embedding = nn.Embedding(len(vocabulary), dim)
        self.position_embedding = nn.Parameter(torch.randn(max_tokens, dim) * 0.1)
        self.layers = nn.ModuleList(_EncoderLayer(dim, heads, ffn_mult * dim) for _ in range(layers))
        self.final_norm = nn.LayerNorm(dim)

    @property
    def dim(self) -> int:
        return self.token_embedding.embedding_dim

    def tokenize(self, prompt: str) -> list[int]:
        return tokenize_words(prompt, self._index, self.max_tokens)

    def forward(self, prompts) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise TypeError("prompts must be a non-empty list of strings")
        ids = [self.tokenize(p) for p in prompts]
        length = max(len(t) for t in ids)
        device = self.token_embedding.weight.device
        # one prompt at a time, at its own length: a prompt's features do not depend on the batch
        # (padding it to another length would change the float rounding of the matrix products)
        features = torch.zeros(len(ids), length, self.dim, device=device)
        mask = torch.zeros(len(ids), length, dtype=torch.bool, device=device)
        encoded: dict[tuple, torch.Tensor] = {}  # repeated prompts are encoded once
        for b, t in enumerate(ids):
            if tuple(t) not in encoded:
                tokens = torch.tensor(t, dtype=torch.long, device=device)[None]
                x = self.token_embedding(tokens) + self.position_embedding[: len(t)]
                row_mask = torch.ones(1, len(t), dtype=torch.bool, device=device)
                for layer in self.layers:
                    x = layer(x, row_mask)
                encoded[tuple(t)] = self.final_norm(x)[0]
            features[b, : len(t)] = encoded[tuple(t)].to(features.dtype)
            mask[b, : len(t)] = True
        return features.float(), mask
