"""Probed attention with a general additive mask (causal, per-query, float biases), computed exactly.

The fused operator takes key padding masks only. Intercepted models that use other masks (GPT-style
`is_causal=True`, nn.MultiheadAttention `attn_mask`, additive position biases) are still probed, exactly,
by this eager path: the operator's contract (docs/design.md, section 2) with one more term added to the logits,

    s[b,h,i,j] = scale * logit_scale[b,h] * <q, k> + segment_bias[b,h,seg(j)] + attn_bias[b,h,i,j]

computed in float64 over query chunks (it materializes [B, H, chunk, Nk], as the reference backend does).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..ops import AttentionPlan
from ..ops.reference import reference_attention

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
    out, captures = reference_attention(plan, torch.float64, query_chunk, attn_bias=attn_bias)
    return out.to(plan.q.dtype), {name: t.to(torch.float32) for name, t in captures.items()}
