"""SAMAudioConfig: the sizes of a SAM Audio model (DiT + input/memory projections).

Field names follow facebookresearch/sam-audio where a counterpart exists; `from_sam_config` maps a
SAM Audio checkpoint's config.json (nested "transformer", "audio_codec", ... sections) onto this flat form.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class SAMAudioConfig:
    # DiT sizes
    dim: int = 2048
    n_heads: int = 16
    n_layers: int = 16
    # codec latent channels per source (C); the model sees 6C inputs and predicts 2C outputs
    latent_dim: int = 128
    # text feature size (T5-base last_hidden_state)
    text_dim: int = 768
    # y_embedder input size; SAM Audio feeds memory_proj(text) (size dim) into it, so it must equal dim
    context_dim: Optional[int] = None
    # SwiGLU FFN: hidden = round_up(int(mult * int(2 * int(ffn_exp * dim) / 3)), multiple_of)
    ffn_exp: float = 4
    ffn_dim_multiplier: float = 1
    multiple_of: int = 64
    norm_eps: float = 1e-5
    qk_norm: bool = True
    fc_bias: bool = False
    t_block_bias: bool = True
    context_norm: bool = False
    # rotary embedding: SAM Audio uses theta = max(10000, 2 * max_positions) = 20000
    max_positions: int = 10000
    rope_theta: float = 20000.0
    frequency_embedding_dim: int = 256
    dropout: float = 0.0
    # additive frame-aligned paths (None = module absent): masked-video features and span anchors
    # (SAM Audio presets: 1024 and 3; the defaults leave them out)
    vision_dim: Optional[int] = None
    num_anchors: Optional[int] = None
    anchor_embedding_dim: int = 128
    # free-form sections kept for the codec / text encoder builders (e.g. DAC-VAE sizes, T5 name)
    audio_codec: Optional[dict] = None
    text_encoder: Optional[dict] = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.context_dim is None:
            self.context_dim = self.dim
        for name in ("dim", "n_heads", "n_layers", "latent_dim", "text_dim", "multiple_of"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.dim % self.n_heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim (dim / n_heads = {self.head_dim}) must be even for RoPE")
        if self.context_dim != self.dim:
            raise ValueError(
                f"context_dim ({self.context_dim}) must equal dim ({self.dim}): memory_proj maps text to dim"
            )

    # derived sizes
    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def in_channels(self) -> int:
        """proj input: cat(noisy [2C], zeros [2C], mixture duplicated [2C])."""
        return 6 * self.latent_dim

    @property
    def out_channels(self) -> int:
        """velocity: target latent [C] then residual latent [C]."""
        return 2 * self.latent_dim

    @property
    def ffn_hidden_dim(self) -> int:
        hidden = int(self.ffn_exp * self.dim)
        hidden = int(2 * hidden / 3)  # SwiGLU keeps the parameter count of a 2-matrix FFN
        hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    def flops_per_evaluation(self, frames: int, text_tokens: int = 1) -> int:
        """Floating-point operations (2 per multiply-add) of one network evaluation at batch 1 over
        ``frames`` latent frames and ``text_tokens`` memory tokens: matrix products and attention only
        (norms, activations and the vision/anchor paths are left out; they are a small share)."""
        if frames < 1 or text_tokens < 1:
            raise ValueError(f"frames and text_tokens must be >= 1, got {frames}, {text_tokens}")
        T, L, D, F = frames, text_tokens, self.dim, self.ffn_hidden_dim
        macs = T * self.in_channels * D + 2 * T * 3 * D * D  # proj; x_embedder (two k=3 convolutions)
        macs += L * (self.text_dim * D + 3 * D * D)  # memory_proj; y_embedder (SwiGLU)
        macs += self.frequency_embedding_dim * D * 2 + D * D + D * 6 * D  # t_embedder; t_block
        per_layer = 4 * T * D * D + 2 * T * T * D  # self-attention: projections, q.k and p.v
        per_layer += 2 * T * D * D + 2 * L * D * D + 2 * T * L * D  # cross-attention
        per_layer += 3 * T * D * F  # SwiGLU feed-forward
        macs += self.n_layers * per_layer + T * D * self.out_channels  # output
        return 2 * macs

    # presets
    @classmethod
    def preset(cls, name: str, **overrides) -> "SAMAudioConfig":
        if name not in PRESETS:
            raise ValueError(f"name: unknown preset {name!r}; known: {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    # serialization
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "SAMAudioConfig":
        if not isinstance(data, dict):
            raise TypeError(f"data must be a dict, got {type(data).__name__}")
        if "transformer" in data:  # a SAM Audio config.json
            return cls.from_sam_config(data)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"data: unknown SAMAudioConfig fields {unknown}")
        return cls(**data)

    def to_json(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, path: str) -> "SAMAudioConfig":
        if not os.path.isfile(path):
            raise FileNotFoundError(f"path: no config file at {path}")
        with open(path) as f:
            return cls.from_dict(json.load(f))

    @classmethod
    def from_sam_config(cls, data: dict) -> "SAMAudioConfig":
        """Map facebookresearch/sam-audio's SAMAudioConfig(**config.json) fields onto this config."""
        t = dict(data.get("transformer") or {})
        codec = dict(data.get("audio_codec") or {})
        text = dict(data.get("text_encoder") or {})
        vision = dict(data.get("vision_encoder") or {})
        dim = t.get("dim", 2048)
        latent_dim = codec.get("codebook_dim", 128)
        out_channels = t.get("out_channels", 256)
        in_channels = data.get("in_channels", 768)
        if out_channels != 2 * latent_dim or in_channels != 6 * latent_dim:
            raise ValueError(
                f"data: in_channels={in_channels}, out_channels={out_channels} do not match "
                f"6 and 2 x codec latent channels ({latent_dim})"
            )
        if t.get("in_channels") is not None:
            raise ValueError("data: transformer.in_channels (a data_proj layer) is not supported")
        if not t.get("use_rope", True):
            raise ValueError("data: transformer.use_rope=false is not supported")
        for key, expected in (("non_linearity", "swiglu"), ("timestep_non_linearity", "swiglu"),
                              ("context_non_linearity", "swiglu"), ("t_block_non_linearity", "silu")):
            if t.get(key, expected) != expected:
                raise ValueError(f"data: transformer.{key}={t[key]!r} is not supported (only {expected!r})")
        max_positions = t.get("max_positions", 10000)
        return cls(
            dim=dim,
            n_heads=t.get("n_heads", 16),
            n_layers=t.get("n_layers", 16),
            latent_dim=latent_dim,
            text_dim=text.get("dim", 768),
            context_dim=t.get("context_dim", 2048),
            ffn_exp=t.get("ffn_exp", 4),
            ffn_dim_multiplier=t.get("ffn_dim_multiplier", 1),
            multiple_of=t.get("multiple_of", 64),
            norm_eps=t.get("norm_eps", 1e-5),
            qk_norm=t.get("qk_norm", True),
            fc_bias=t.get("fc_bias", False),
            t_block_bias=t.get("t_block_bias", True),
            context_norm=t.get("context_norm", False),
            max_positions=max_positions,
            rope_theta=float(max(10000, 2 * max_positions)),
            frequency_embedding_dim=t.get("frequency_embedding_dim", 256),
            dropout=0.0,  # inference: SAM Audio's training dropout is irrelevant
            vision_dim=vision.get("dim", 1024),
            num_anchors=data.get("num_anchors", 3),
            anchor_embedding_dim=data.get("anchor_embedding_dim", 128),
            audio_codec=codec,
            text_encoder=text,
            extra={k: v for k, v in data.items()
                   if k not in ("transformer", "audio_codec", "text_encoder", "vision_encoder",
                                "in_channels", "num_anchors", "anchor_embedding_dim")},
        )


PRESETS: dict[str, dict[str, Any]] = {
    "base": dict(dim=2048, n_heads=16, n_layers=16, vision_dim=1024, num_anchors=3),
    "large": dict(dim=2816, n_heads=22, n_layers=22, vision_dim=1024, num_anchors=3),
}
