"""Text encoders behind one interface: prompts -> (features [B, L, dim] float32, mask [B, L] bool, True = token)."""

from __future__ import annotations

import abc
import os
import re
from typing import Mapping, Sequence, Union

import torch
import torch.nn as nn


def check_prompts(prompts) -> list[str]:
    if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)):
        raise TypeError(f"prompts must be a list of str, got {type(prompts).__name__}")
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompts must be a non-empty list of str")
    return list(prompts)


def tokenize_words(prompt, index: Mapping[str, int], max_tokens: int, owner: str = "this model's") -> list[int]:
    """Lower-cased whitespace words of `prompt` -> ids from `index` (fixed-vocabulary encoders).
    Unknown words raise a ValueError that lists the vocabulary."""
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    words = [w for w in re.split(r"\s+", prompt.strip().lower()) if w]
    if not words:
        raise ValueError("prompt must contain at least one word")
    unknown = [w for w in words if w not in index]
    if unknown:
        raise ValueError(f"prompt {prompt!r} has words outside {owner} vocabulary {unknown}; "
                         f"known words: {', '.join(index)}")
    if len(words) > max_tokens:
        raise ValueError(f"prompt {prompt!r} has {len(words)} words, at most {max_tokens} allowed")
    return [index[w] for w in words]


class TextEncoder(nn.Module, abc.ABC):
    """Call with a list of prompts; returns (features [B, L, dim] float32, mask [B, L] bool)."""

    @property
    @abc.abstractmethod
    def dim(self) -> int: ...

    @abc.abstractmethod
    def forward(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]: ...


class PrecomputedTextEncoder(TextEncoder):
    """Looks prompts up in a table of precomputed features ({prompt: [L, dim]}), padding to the longest.

    `table` may be a dict or a path to a file saved with torch.save({prompt: tensor}).
    """

    def __init__(self, table: Union[Mapping[str, torch.Tensor], str, os.PathLike]):
        super().__init__()
        if isinstance(table, (str, os.PathLike)):
            if not os.path.isfile(table):
                raise FileNotFoundError(f"table: no such file {table}")
            table = torch.load(table, map_location="cpu", weights_only=True)
        if not isinstance(table, Mapping) or not table:
            raise TypeError("table must be a non-empty dict {prompt: tensor [L, dim]} or a file holding one")
        dims = set()
        self.table: dict[str, torch.Tensor] = {}
        for prompt, feats in table.items():
            feats = torch.as_tensor(feats, dtype=torch.float32)
            if feats.ndim != 2 or feats.shape[0] < 1:
                raise ValueError(f"table: features of {prompt!r} must be [L>=1, dim], got {tuple(feats.shape)}")
            dims.add(feats.shape[1])
            self.table[prompt] = feats
        if len(dims) != 1:
            raise ValueError(f"table: all features must share one dim, got {sorted(dims)}")
        self._dim = dims.pop()

    @property
    def dim(self) -> int:
        return self._dim

    def forward(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        prompts = check_prompts(prompts)
        missing = [p for p in prompts if p not in self.table]
        if missing:
            raise ValueError(f"prompts: no precomputed features for {missing}; known: {sorted(self.table)}")
        rows = [self.table[p] for p in prompts]
        L = max(r.shape[0] for r in rows)
        feats = torch.zeros(len(rows), L, self._dim)
        mask = torch.zeros(len(rows), L, dtype=torch.bool)
        for i, r in enumerate(rows):
            feats[i, : r.shape[0]] = r
            mask[i, : r.shape[0]] = True
        return feats, mask


class T5TextEncoder(TextEncoder):
    """T5 encoder last_hidden_state (SAM Audio: t5-base, 768-d, padding "longest", max_length 512).

    Loaded from a LOCAL directory only (transformers is an optional extra: pip install transformers sentencepiece).
    """

    def __init__(self, path: Union[str, os.PathLike], max_length: int = 512):
        super().__init__()
        if not os.path.isdir(path):
            raise FileNotFoundError(f"path: T5 directory not found: {path}")
        try:
            import transformers
        except ImportError as e:  # optional dependency
            raise ImportError(
                "T5TextEncoder needs the optional 'transformers' package (pip install transformers sentencepiece)"
            ) from e
        self.model = transformers.T5EncoderModel.from_pretrained(path, local_files_only=True).eval()
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.max_length = max_length

    @property
    def dim(self) -> int:
        return self.model.config.d_model

    @torch.no_grad()
    def forward(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        prompts = check_prompts(prompts)
        device = next(self.model.parameters()).device
        enc = self.tokenizer(prompts, truncation=True, max_length=self.max_length, padding="longest",
                             return_tensors="pt")
        ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
        feats = self.model(input_ids=ids, attention_mask=mask)["last_hidden_state"]
        return feats.float(), mask.bool()
