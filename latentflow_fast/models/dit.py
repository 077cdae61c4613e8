"""The SAM Audio DiT (the `transformer.*` module), written after facebookresearch/sam-audio.

Parameter names match SAM Audio checkpoints exactly. Facts that matter for probing:
- heads are STRIDED: x.reshape(B, T, D // H, H) -> head h holds channels h, h + H, h + 2H, ...;
  the head outputs merge back contiguously as "(h d)" before `wo`;
- q/k RMSNorm over head_dim, then RoPE (adjacent pairs, theta 20000) on self-attention only;
- adaLN-single blocks; cross-attention is neither normed nor gated; text reaches the DiT only there.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops import dit_cpu
from ..ops.profiling import nvtx_range
from .attention import AttentionRouter, site_name
from .config import SAMAudioConfig
from .hook_points import HookPointModule
from .invariant import Conv1d, Linear

# Residual-stream hook points of every DiT block, in forward order (all [B, T, D]).
HOOK_POINTS = ("hook_resid_pre", "hook_attn_out", "hook_cross_attn_out", "hook_resid_mid", "hook_mlp_out",
               "hook_resid_post")


class RMSNorm(nn.Module):
    """RMSNorm computed in float32, cast back to the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight).type_as(x)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


def norm_modulate(norm: RMSNorm, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """modulate(norm(x), shift, scale), in one native pass on CPU float32 inference (ops/dit_cpu.py)."""
    if dit_cpu.applies(x, norm.weight, shift, scale):
        out = dit_cpu.norm_modulate(x, norm.weight, norm.eps, shift, scale)
        if out is not None:
            return out
    return modulate(norm(x), shift, scale)


class RotaryEmbedding(nn.Module):
    """RoPE over adjacent channel pairs (2i, 2i+1) of each head. No parameters or buffers: the tables are
    computed on the CPU in float32 (so every device sees the same values) and cached per (length, device)."""

    def __init__(self, head_dim: int, theta: float, max_positions: int):
        super().__init__()
        self.head_dim, self.theta, self.max_positions = head_dim, theta, max_positions
        self._cache: dict = {}

    def tables(self, T: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (T, str(device))
        if key not in self._cache:
            if T > self.max_positions:
                raise ValueError(f"sequence length {T} exceeds max_positions {self.max_positions}")
            hd = self.head_dim
            inv = 1.0 / (self.theta ** (torch.arange(0, hd, 2)[: hd // 2].float() / hd))
            angles = torch.outer(torch.arange(T), inv).float()  # [T, hd/2]
            self._cache[key] = (angles.cos().to(device), angles.sin().to(device))
        return self._cache[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, H, T, hd] -> rotated, same shape and dtype."""
        cos, sin = self.tables(x.shape[-2], x.device)
        pairs = x.float().unflatten(-1, (-1, 2))  # [..., hd/2, 2]
        x1, x2 = pairs[..., 0], pairs[..., 1]
        out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
        return out.flatten(-2).type_as(x)


def split_heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """[B, T, D] -> [B, H, T, D/H] with STRIDED heads: head h holds channels h, h+H, ... (SAM Audio)."""
    B, T, D = x.shape
    return x.reshape(B, T, D // n_heads, n_heads).permute(0, 3, 1, 2)


def project_heads(x: torch.Tensor, n_heads: int, norm: Optional[RMSNorm],
                  rope: Optional["RotaryEmbedding"]) -> torch.Tensor:
    """[B, T, D] projections -> [B, H, T, hd] strided heads, RMSNorm'd (norm) and rotated (rope).

    On CPU float32 inference one native pass (ops/dit_cpu.py) does all three and returns them contiguous."""
    weight = None if norm is None else norm.weight
    if dit_cpu.applies(x, weight):
        cos, sin = rope.tables(x.shape[1], x.device) if rope is not None else (None, None)
        return dit_cpu.head_norm_rope(x, n_heads, weight, 0.0 if norm is None else norm.eps, cos, sin)
    heads = split_heads(x, n_heads)
    if norm is not None:
        heads = norm(heads)
    return heads if rope is None else rope(heads)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[B, H, T, hd] -> [B, T, H*hd], contiguous "(h d)" (not the inverse of split_heads; as SAM Audio)."""
    B, H, T, hd = x.shape
    return x.transpose(1, 2).reshape(B, T, H * hd)


class Attention(nn.Module):
    def __init__(self, dim: int, n_heads: int, site: str, router: AttentionRouter,
                 qk_norm: bool = True, norm_eps: float = 1e-5, bias: bool = False):
        super().__init__()
        self.n_heads = n_heads
        self.head_dim = dim // n_heads
        self.site = site
        self.router = router  # shared plain object: not a submodule, adds no state-dict keys
        self.wq = Linear(dim, dim, bias=bias)
        self.wk = Linear(dim, dim, bias=bias)
        self.wv = Linear(dim, dim, bias=bias)
        self.wo = Linear(dim, dim, bias=bias)
        self.qk_norm = qk_norm
        if qk_norm:
            self.q_norm = RMSNorm(self.head_dim, norm_eps)
            self.k_norm = RMSNorm(self.head_dim, norm_eps)

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None,
                key_padding_mask: Optional[torch.Tensor] = None,
                rope: Optional[RotaryEmbedding] = None) -> torch.Tensor:
        # The module-level entry of the router: a handler there may answer without running the module
        # (LSAC). With none, one dict lookup and no closure: the plain path costs what it did before.
        if self.site not in self.router.module_handlers:
            return self.compute(x, context, key_padding_mask, rope)
        return self.router.module_output(self.site, lambda: self.compute(x, context, key_padding_mask, rope))

    def compute(self, x: torch.Tensor, context: Optional[torch.Tensor] = None,
                key_padding_mask: Optional[torch.Tensor] = None,
                rope: Optional[RotaryEmbedding] = None) -> torch.Tensor:
        """The module's output, computed (projections, norms, RoPE, the router's attention call, `wo`)."""
        kv_in = x if context is None else context
        q = project_heads(self.wq(x), self.n_heads, self.q_norm if self.qk_norm else None, rope)
        k = project_heads(self.wk(kv_in), self.n_heads, self.k_norm if self.qk_norm else None, rope)
        v = split_heads(self.wv(kv_in), self.n_heads)
        if k.shape[0] != q.shape[0]:  # a context shared by every row: keys/values computed once
            k, v = k.expand(q.shape[0], -1, -1, -1), v.expand(q.shape[0], -1, -1, -1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.expand(q.shape[0], -1)
        out = self.router(self.site, q, k, v, key_padding_mask)
        return self.wo(merge_heads(out))


class SwiGLU(nn.Module):
    """w2(silu(w1 x) * w3 x); used for the FFN and for the time / context embedders."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, bias: bool = False, dropout: float = 0.0):
        super().__init__()
        self.w1 = Linear(in_dim, hidden_dim, bias=bias)
        self.w2 = Linear(hidden_dim, out_dim, bias=bias)
        self.w3 = Linear(in_dim, hidden_dim, bias=bias)
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.w1(x)) * self.w3(x)
        return self.w2(F.dropout(h, self.dropout, self.training))


class Projection(nn.Module):
    """Holds a SwiGLU under the name `projection` (SAM Audio's embedder key layout)."""

    def __init__(self, in_dim: int, out_dim: int, bias: bool = False, dropout: float = 0.0):
        super().__init__()
        self.projection = SwiGLU(in_dim, out_dim, out_dim, bias, dropout)


class TimestepEmbedder(Projection):
    """sin/cos of t (t in [0, 1], not scaled by 1000) -> SwiGLU -> dim."""

    def __init__(self, dim: int, frequency_dim: int = 256, bias: bool = False, max_period: float = 10000.0):
        super().__init__(frequency_dim, dim, bias)
        self.frequency_dim = frequency_dim
        self.max_period = max_period

    def sinusoid(self, t: torch.Tensor) -> torch.Tensor:
        half = self.frequency_dim // 2
        freqs = torch.exp(-math.log(self.max_period) * torch.arange(half, dtype=torch.float32) / half)
        args = t[:, None].float() * freqs.to(t.device)[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if self.frequency_dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return emb.to(t.dtype)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.projection(self.sinusoid(t).to(self.projection.w1.weight.dtype))


class ContextEmbedder(Projection):
    """y_embedder: SwiGLU over the memory tokens (optional RMSNorm first)."""

    def __init__(self, in_dim: int, dim: int, bias: bool = False, norm: bool = False, eps: float = 1e-5):
        super().__init__(in_dim, dim, bias)
        self.norm = RMSNorm(in_dim, eps) if norm else None

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.projection(y if self.norm is None else self.norm(y))


class ConvBlock(nn.Module):
    """GroupNorm(1 group) -> SiLU -> Conv1d(k=3, 'same' padding); layout [B, C, T]."""

    def __init__(self, channels: int, kernel_size: int = 3):
        super().__init__()
        self.groupnorm = nn.GroupNorm(1, channels)
        self.project = Conv1d(channels, channels, kernel_size, padding=kernel_size // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(F.silu(self.groupnorm(x)))


class ResnetBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.block1 = ConvBlock(channels)
        self.block2 = ConvBlock(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block2(self.block1(x))


class Patcher(nn.Module):
    """x_embedder: a residual conv block over time (patch size 1), [B, T, D] in and out."""

    def __init__(self, dim: int):
        super().__init__()
        self.block = ResnetBlock(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x.transpose(1, 2)).transpose(1, 2)


class DiTBlock(nn.Module):
    def __init__(self, cfg: SAMAudioConfig, layer: int, router: AttentionRouter):
        super().__init__()
        D = cfg.dim
        self.attention = Attention(D, cfg.n_heads, site_name(layer, "self_attn"), router,
                                   cfg.qk_norm, cfg.norm_eps, cfg.fc_bias)
        self.cross_attention = Attention(D, cfg.n_heads, site_name(layer, "cross_attn"), router,
                                         cfg.qk_norm, cfg.norm_eps, cfg.fc_bias)
        self.feed_forward = SwiGLU(D, cfg.ffn_hidden_dim, D, cfg.fc_bias, cfg.dropout)
        self.attention_norm = RMSNorm(D, cfg.norm_eps)
        self.ffn_norm = RMSNorm(D, cfg.norm_eps)
        self.scale_shift_table = nn.Parameter(torch.randn(6, D) / D**0.5)
        # TransformerLens-style hook points on the residual stream (identities; see models/hook_points.py).
        # attn_out / mlp_out are the terms added to the residual, i.e. after the adaLN gates.
        for kind in HOOK_POINTS:
            setattr(self, kind, HookPointModule(f"layers.{layer}.{kind}"))

    def forward(self, x: torch.Tensor, y: torch.Tensor, t0: torch.Tensor,
                padding_mask: Optional[torch.Tensor], memory_mask: Optional[torch.Tensor],
                rope: RotaryEmbedding) -> torch.Tensor:
        mods = self.scale_shift_table[None] + t0.reshape(t0.shape[0], 6, -1)  # [B or 1, 6, D]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods.chunk(6, dim=1)
        x = self.hook_resid_pre(x)
        h = x + self.hook_attn_out(gate_msa * self.attention(norm_modulate(self.attention_norm, x, shift_msa, scale_msa),
                                                             key_padding_mask=padding_mask, rope=rope))
        # no norm, no gate on the cross-attention
        h = self.hook_resid_mid(h + self.hook_cross_attn_out(self.cross_attention(h, context=y,
                                                                                  key_padding_mask=memory_mask)))
        return self.hook_resid_post(
            h + self.hook_mlp_out(gate_mlp * self.feed_forward(norm_modulate(self.ffn_norm, h, shift_mlp, scale_mlp))))


class DiT(nn.Module):
    def __init__(self, cfg: SAMAudioConfig, router: Optional[AttentionRouter] = None):
        super().__init__()
        D = cfg.dim
        self.config = cfg
        self.attention_router = router if router is not None else AttentionRouter()
        self.dropout = cfg.dropout
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.max_positions)
        self.layers = nn.ModuleList(DiTBlock(cfg, i, self.attention_router) for i in range(cfg.n_layers))
        self._range_names = [f"latentflow.layer.{i}" for i in range(cfg.n_layers)]
        self.norm = RMSNorm(D, cfg.norm_eps)
        self.output = Linear(D, cfg.out_channels, bias=cfg.fc_bias)
        self.x_embedder = Patcher(D)
        self.y_embedder = ContextEmbedder(cfg.context_dim, D, cfg.fc_bias, cfg.context_norm, cfg.norm_eps)
        self.t_embedder = TimestepEmbedder(D, cfg.frequency_embedding_dim, cfg.fc_bias)
        self.t_block = Linear(D, 6 * D, bias=cfg.t_block_bias)
        self.final_layer_scale_shift_table = nn.Parameter(torch.randn(2, D) / D**0.5)

    def forward(self, x: Optional[torch.Tensor], time: torch.Tensor, memory: torch.Tensor,
                memory_mask: Optional[torch.Tensor] = None,
                padding_mask: Optional[torch.Tensor] = None, *,
                start_layer: int = 0, hidden: Optional[torch.Tensor] = None,
                layer_inputs: Optional[list] = None) -> torch.Tensor:
        """x [B,T,D] (after `proj`), time [B], memory [B,L,D] -> [B,T,out_channels].

        Resuming (prefix reuse): with ``start_layer`` = l > 0, ``hidden`` [B,T,D] is the input of layer l
        (as recorded by an earlier pass) and ``x`` is ignored; layers 0..l-1 are skipped.
        ``layer_inputs``: a list that receives the input of every layer that runs, in order.
        ``time`` and ``memory`` may have batch 1 while the hidden state has batch B: the conditioning is
        then computed once and broadcast (the rows share it).
        """
        if not 0 <= start_layer < len(self.layers) or (start_layer > 0) != (hidden is not None):
            raise ValueError(f"start_layer must be in [0, {len(self.layers)}) and hidden given exactly when "
                             f"start_layer > 0; got start_layer={start_layer}, hidden={hidden is not None}")
        h = hidden if start_layer > 0 else F.dropout(self.x_embedder(x), self.dropout, self.training)
        t = self.t_embedder(time)  # [B or 1, D]
        t0 = self.t_block(F.silu(t))  # [B or 1, 6D]
        y = self.y_embedder(memory)  # [B or 1, L, D]: broadcast by the cross-attention
        for i in range(start_layer, len(self.layers)):
            if layer_inputs is not None:
                layer_inputs.append(h)
            with nvtx_range(self._range_names[i]):  # latentflow.layer.<i>: Nsight / torch profiler
                h = self.layers[i](h, y, t0, padding_mask, memory_mask, self.rope)
        shift, scale = (self.final_layer_scale_shift_table[None] + t[:, None]).chunk(2, dim=1)
        h = norm_modulate(self.norm, h, shift, scale)
        return self.output(F.dropout(h, self.dropout, self.training))
