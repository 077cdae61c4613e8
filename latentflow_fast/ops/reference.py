"""The oracle: probed attention in eager PyTorch, materialising the attention map.

It follows the contract of docs/design.md, section 2 (The operator contract) line by line, in float64 by default, so every fused
backend is tested against it. `query_chunk` bounds memory to [B, H, chunk, Nk] per step.
"""

from __future__ import annotations

from typing import Optional

import torch

from .plan import AttentionPlan


def _segment_index(plan: AttentionPlan) -> torch.Tensor:
    """seg(j) for every key j: the index g with s_g <= j < s_{g+1}."""
    keys = torch.arange(plan.num_keys, device=plan.q.device)
    return torch.bucketize(keys, plan.segments[1:], right=True)


def reference_attention(
    plan: AttentionPlan,
    compute_dtype: torch.dtype = torch.float64,
    query_chunk: Optional[int] = None,
) -> tuple[torch.Tensor, dict]:
    """Return (out, captures) computed in `compute_dtype` (out and captures stay in that dtype)."""
    B, H, Nq, Nk = plan.batch, plan.heads, plan.num_queries, plan.num_keys
    group = H // plan.kv_heads
    q = plan.q.to(compute_dtype)
    k = plan.k.to(compute_dtype).repeat_interleave(group, dim=1)
    v = plan.v.to(compute_dtype).repeat_interleave(group, dim=1)

    key_bias = None  # [B, H, 1, Nk]: segment bias and padding mask, shared by all queries
    if plan.segment_bias is not None:
        key_bias = plan.segment_bias.to(compute_dtype)[:, :, _segment_index(plan)][:, :, None, :]
    if plan.key_padding_mask is not None:
        masked = torch.zeros(B, 1, 1, Nk, dtype=compute_dtype, device=q.device)
        masked = masked.masked_fill(~plan.key_padding_mask[:, None, None, :], float("-inf"))
        key_bias = masked if key_bias is None else key_bias + masked
    logit_scale = None if plan.logit_scale is None else plan.logit_scale.to(compute_dtype)[:, :, None, None]

    outs, lses, maxes, entropies, seg_masses = [], [], [], [], []
    key_mass = torch.zeros(B, H, Nk, dtype=compute_dtype, device=q.device) if plan.wants("key_mass") else None
    chunk = Nq if not query_chunk else max(1, int(query_chunk))
    for start in range(0, Nq, chunk):
        s = torch.einsum("bhid,bhjd->bhij", q[:, :, start : start + chunk], k) * plan.scale
        if logit_scale is not None:
            s = s * logit_scale
        if key_bias is not None:
            s = s + key_bias
        rows = s.shape[2]
        if plan.attn_mask is not None:  # [Bm, Hm, Nq, Nk], broadcast over batch rows / heads of size 1
            m = plan.attn_mask[:, :, start : start + rows]
            s = s.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else s + m.to(compute_dtype)
        if plan.causal_offset is not None:  # key j is visible to query i iff j <= i + offset
            i = torch.arange(start, start + rows, device=q.device)[:, None]
            j = torch.arange(Nk, device=q.device)[None, :]
            s = s.masked_fill(j > i + plan.causal_offset, float("-inf"))
        lse = torch.logsumexp(s, dim=-1)  # -inf for a row with every logit -inf
        alive = torch.isfinite(lse)[..., None]
        p = torch.where(alive, torch.exp(s - torch.where(alive, lse[..., None], 0)), 0)
        # A row without a finite log-sum-exp attends to nothing: the contract's lse is -inf there (logsumexp
        # itself would give NaN or +inf for overflowing logits), entropy +0 (not -0.0), as the kernels give.
        lse = torch.where(alive[..., 0], lse, float("-inf"))
        outs.append(p @ v)
        lses.append(lse)
        maxes.append(s.amax(dim=-1))
        entropies.append(-torch.special.xlogy(p, p).sum(dim=-1) + 0.0)
        if plan.wants("segment_mass"):
            bounds = plan.segments.tolist()
            seg_masses.append(torch.stack([p[..., a:b].sum(-1) for a, b in zip(bounds, bounds[1:])], dim=-1))
        if key_mass is not None:
            key_mass += p.sum(dim=2)

    if Nq == 0:
        o = torch.zeros(B, H, 0, plan.value_dim, dtype=compute_dtype, device=q.device)
        empty = torch.zeros(B, H, 0, dtype=compute_dtype, device=q.device)
        lses, maxes, entropies = [empty], [empty], [empty]
        seg_masses = [torch.zeros(B, H, 0, plan.num_segments, dtype=compute_dtype, device=q.device)]
    else:
        o = torch.cat(outs, dim=2)
    if plan.out_patch is not None:
        patch = plan.out_patch.to(compute_dtype)
        o = torch.where(plan.patch_mask[:, :, None, None], patch, o)
    if plan.head_gate is not None:
        o = o * plan.head_gate.to(compute_dtype)[:, :, None, None]
    if plan.out_bias is not None:
        o = o + plan.out_bias.to(compute_dtype)[:, :, None, :]

    all_captures = {
        "lse": lambda: torch.cat(lses, dim=2),
        "max": lambda: torch.cat(maxes, dim=2),
        "entropy": lambda: torch.cat(entropies, dim=2),
        "segment_mass": lambda: torch.cat(seg_masses, dim=2),
        "key_mass": lambda: key_mass,
    }
    return o, {name: all_captures[name]() for name in plan.capture}


def reference_backend(plan: AttentionPlan, query_chunk: Optional[int] = None) -> tuple[torch.Tensor, dict]:
    """The "reference" backend: float64 inside (float32 for large maps is the caller's choice), contract dtypes out."""
    out, captures = reference_attention(plan, torch.float64, query_chunk)
    return out.to(plan.q.dtype), {name: t.to(torch.float32) for name, t in captures.items()}
