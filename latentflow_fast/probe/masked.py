"""Probed attention with a general additive mask (causal, per-query, float biases), computed exactly.

The fused operator takes key padding masks only. Intercepted models that use other masks (GPT-style
`is_causal=True`, nn.MultiheadAttention `attn_mask`, additive position biases) are still probed, exactly,
by this eager path: the operator's contract (DESIGN.md section 3) with one more term added to the logits,

    s[b,h,i,j] = scale * logit_scale[b,h] * <q, k> + segment_bias[b,h,seg(j)] + attn_bias[b,h,i,j]

computed in float64 over query chunks (it materializes [B, H, chunk, Nk], as the reference backend does).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..ops import AttentionPlan

QUERY_CHUNK = 256


def biased_attention(plan: AttentionPlan, attn_bias: Tensor, query_chunk: int = QUERY_CHUNK) -> tuple[Tensor, dict]:
    """(out in q's dtype, float32 captures) for `plan` with `attn_bias` (float, broadcastable to [B, H, Nq, Nk];
    -inf blocks a key) added to the logits."""
    B, H, Nq, Nk = plan.batch, plan.heads, plan.num_queries, plan.num_keys
    if attn_bias.dim() != 4:
        raise ValueError(f"attn_bias must have 4 dims broadcastable to [B, H, Nq, Nk], got {tuple(attn_bias.shape)}")
    try:
        torch.broadcast_shapes(attn_bias.shape, (B, H, Nq, Nk))
    except RuntimeError:
        raise ValueError(f"attn_bias of shape {tuple(attn_bias.shape)} is not broadcastable to "
                         f"{(B, H, Nq, Nk)}") from None
    f64 = torch.float64
    if Nq == 0:
        empty = plan.q.new_zeros((B, H, 0, plan.value_dim))
        from ..ops.plan import capture_shapes

        return empty, {n: plan.q.new_zeros(shape, dtype=torch.float32) for n, shape in capture_shapes(plan).items()}
    group = H // plan.kv_heads
    q = plan.q.to(f64)
    k = plan.k.to(f64).repeat_interleave(group, dim=1)
    v = plan.v.to(f64).repeat_interleave(group, dim=1)
    bias = attn_bias.to(f64)
    key_bias = torch.zeros(1, 1, 1, Nk, dtype=f64, device=q.device)
    if plan.segment_bias is not None:
        seg_of_key = torch.bucketize(torch.arange(Nk, device=q.device), plan.segments[1:], right=True)
        key_bias = key_bias + plan.segment_bias.to(f64)[:, :, seg_of_key][:, :, None, :]
    if plan.key_padding_mask is not None:
        key_bias = key_bias.masked_fill(~plan.key_padding_mask[:, None, None, :], float("-inf"))

    outs, lses, maxes, entropies, seg_masses = [], [], [], [], []
    key_mass = torch.zeros(B, H, Nk, dtype=f64, device=q.device)
    for start in range(0, Nq, query_chunk):
        stop = min(Nq, start + query_chunk)
        s = torch.einsum("bhid,bhjd->bhij", q[:, :, start:stop], k) * plan.scale
        if plan.logit_scale is not None:
            s = s * plan.logit_scale.to(f64)[:, :, None, None]
        s = s + key_bias + (bias if bias.shape[2] == 1 else bias[:, :, start:stop])
        lse = torch.logsumexp(s, dim=-1)
        alive = torch.isfinite(lse)[..., None]
        p = torch.where(alive, torch.exp(s - torch.where(alive, lse[..., None], 0)), 0)
        outs.append(p @ v)
        lses.append(lse)
        maxes.append(s.amax(dim=-1))
        entropies.append(-torch.special.xlogy(p, p).sum(dim=-1))
        if plan.wants("segment_mass"):
            bounds = plan.segments.tolist()
            seg_masses.append(torch.stack([p[..., a:b].sum(-1) for a, b in zip(bounds, bounds[1:])], dim=-1))
        key_mass += p.sum(dim=2)

    o = torch.cat(outs, dim=2)
    if plan.out_patch is not None:
        o = torch.where(plan.patch_mask[:, :, None, None], plan.out_patch.to(f64), o)
    if plan.head_gate is not None:
        o = o * plan.head_gate.to(f64)[:, :, None, None]
    if plan.out_bias is not None:
        o = o + plan.out_bias.to(f64)[:, :, None, :]
    captures = {
        "lse": lambda: torch.cat(lses, dim=2),
        "max": lambda: torch.cat(maxes, dim=2),
        "entropy": lambda: torch.cat(entropies, dim=2),
        "segment_mass": lambda: torch.cat(seg_masses, dim=2),
        "key_mass": lambda: key_mass,
    }
    return o.to(plan.q.dtype), {name: captures[name]().to(torch.float32) for name in plan.capture}
