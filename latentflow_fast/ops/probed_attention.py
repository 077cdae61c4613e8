"""`probed_attention`: the public operator (docs/design.md, section 2) and its torch.library registration.

The Python function validates and normalises arguments (`plan.build_plan`), picks a backend, then calls
the custom op `latentflow::probed_attention`, whose arguments are already normalised tensors. The op has a
fake (meta) implementation, so it traces under torch.compile and passes `torch.library.opcheck`.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from . import autograd as _autograd
from . import backends
from .plan import CAPTURE_NAMES, AttentionPlan, RowParam, _is_tracing, build_plan, capture_shapes
from .profiling import nvtx_range

_EMPTY = (0,)


def _plan_from_op_args(q, k, v, key_padding_mask, scale, segments, logit_scale, segment_bias, head_gate,
                       out_bias, out_patch, patch_mask, flags, causal_offset=None, attn_mask=None) -> AttentionPlan:
    return AttentionPlan(
        q=q, k=k, v=v, scale=scale, key_padding_mask=key_padding_mask, segments=segments,
        logit_scale=logit_scale, segment_bias=segment_bias, head_gate=head_gate, out_bias=out_bias,
        out_patch=out_patch, patch_mask=patch_mask,
        capture=tuple(name for name, on in zip(CAPTURE_NAMES, flags) if on),
        causal_offset=causal_offset, attn_mask=attn_mask,
    )


@torch.library.custom_op("latentflow::probed_attention", mutates_args=())
def _probed_attention_op(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_padding_mask: Optional[Tensor],
    scale: float,
    segments: Optional[Tensor],
    logit_scale: Optional[Tensor],
    segment_bias: Optional[Tensor],
    head_gate: Optional[Tensor],
    out_bias: Optional[Tensor],
    out_patch: Optional[Tensor],
    patch_mask: Optional[Tensor],
    capture_flags: Sequence[bool],
    backend: str,
    causal_offset: Optional[int] = None,
    attn_mask: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    plan = _plan_from_op_args(q, k, v, key_padding_mask, scale, segments, logit_scale, segment_bias,
                              head_gate, out_bias, out_patch, patch_mask, capture_flags, causal_offset, attn_mask)
    out, captures = backends.runner(backend)(plan)
    empty = q.new_empty(_EMPTY, dtype=torch.float32)
    return (out,) + tuple(captures[name] if name in captures else empty.clone() for name in CAPTURE_NAMES)


@_probed_attention_op.register_fake
def _(q, k, v, key_padding_mask, scale, segments, logit_scale, segment_bias, head_gate, out_bias,
      out_patch, patch_mask, capture_flags, backend, causal_offset=None, attn_mask=None):
    plan = _plan_from_op_args(q, k, v, key_padding_mask, scale, segments, logit_scale, segment_bias,
                              head_gate, out_bias, out_patch, patch_mask, capture_flags, causal_offset, attn_mask)
    shapes = capture_shapes(plan)
    out = q.new_empty((plan.batch, plan.heads, plan.num_queries, plan.value_dim))
    return (out,) + tuple(
        q.new_empty(shapes[name] if name in shapes else _EMPTY, dtype=torch.float32) for name in CAPTURE_NAMES
    )


# Gradients: a recompute-based blockwise backward (ops/autograd.py) that uses the saved lse.
torch.library.register_autograd("latentflow::probed_attention", _autograd.backward,
                                setup_context=_autograd.setup_context)


def _needs_grad(plan: AttentionPlan) -> bool:
    if not torch.is_grad_enabled():
        return False
    return any(t is not None and t.requires_grad
               for t in (plan.q, plan.k, plan.v, plan.logit_scale, plan.segment_bias, plan.head_gate,
                         plan.out_bias, plan.out_patch))


def _dispatch_mode_active() -> bool:
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    return _get_current_dispatch_mode() is not None


def _empty_result(plan: AttentionPlan) -> tuple[Tensor, dict]:
    """Results for an empty batch or zero queries, without calling a backend."""
    q = plan.q
    out = q.new_zeros((plan.batch, plan.heads, plan.num_queries, plan.value_dim))
    captures = {name: q.new_zeros(shape, dtype=torch.float32) for name, shape in capture_shapes(plan).items()}
    return out, captures


def run_plan(plan: AttentionPlan, backend: str = "auto") -> tuple[Tensor, dict]:
    """Run an already validated plan (used by the probe engine, which builds plans itself)."""
    name = backends.resolve(backend, plan)
    if plan.batch == 0 or plan.num_queries == 0:
        return _empty_result(plan)
    flags = [plan.wants(n) for n in CAPTURE_NAMES]
    wanted = list(flags)
    grad = _needs_grad(plan)
    if grad:
        flags[0] = True  # the backward rebuilds probabilities from the forward's lse
    with nvtx_range(f"latentflow.probed_attention.{name}"):
        if _eager_plain(plan, grad):
            # Plain eager call without gradients: the op's own implementation, without the dispatcher's round
            # trip (about 0.3 ms a call on the CPU, as much as the kernel at batch 1). Same results.
            out, captures = backends.runner(name)(plan)
            return out, {n: captures[n] for n, on in zip(CAPTURE_NAMES, wanted) if on}
        results = _probed_attention_op(
            plan.q, plan.k, plan.v, plan.key_padding_mask, plan.scale, plan.segments, plan.logit_scale,
            plan.segment_bias, plan.head_gate, plan.out_bias, plan.out_patch, plan.patch_mask, flags, name,
            plan.causal_offset, plan.attn_mask,
        )
    return results[0], {n: t for n, t, on in zip(CAPTURE_NAMES, results[1:], wanted) if on}


def _eager_plain(plan: AttentionPlan, grad: bool) -> bool:
    """True when going through the custom op would change nothing: no gradient, no tracing (torch.compile,
    CUDA graphs), no dispatch mode (fake tensors, functionalisation) and plain CPU tensors."""
    if grad or _is_tracing() or _dispatch_mode_active():
        return False
    tensors = [t for t in (plan.q, plan.k, plan.v, plan.key_padding_mask, plan.segments, plan.logit_scale,
                           plan.segment_bias, plan.head_gate, plan.out_bias, plan.out_patch, plan.patch_mask,
                           plan.attn_mask) if t is not None]
    return all(type(t) is Tensor and t.device.type == "cpu" for t in tensors)


def probed_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    key_padding_mask: Optional[Tensor] = None,
    causal=False,
    attn_mask: Optional[Tensor] = None,
    scale: Optional[float] = None,
    segments=None,
    logit_scale: RowParam = None,
    segment_bias: RowParam = None,
    head_gate: RowParam = None,
    out_bias: RowParam = None,
    out_patch: Optional[Tensor] = None,
    patch_mask=None,
    capture: Sequence[str] = (),
    backend: str = "auto",
) -> tuple[Tensor, dict]:
    """Attention that captures statistics of its distribution and applies interventions in one pass.

    Args:
        q: [B, H, Nq, D]; k: [B, Hkv, Nk, D]; v: [B, Hkv, Nk, Dv] with H % Hkv == 0 (head h reads kv head
            h // (H // Hkv)). float32, bfloat16 or float16 (float64 on the reference backend).
        key_padding_mask: bool [B, Nk], True = attend.
        causal: True (or "top_left") masks keys j > i for query i, as torch SDPA's is_causal (top-left
            aligned also when Nq != Nk); "bottom_right" masks keys j > i + Nk - Nq (FlashAttention's
            alignment, decoding with a KV cache).
        attn_mask: bool (True = attend) or additive float mask (-inf allowed, NaN / +inf refused),
            broadcastable to [B, H, Nq, Nk] as in torch SDPA; combines with every other mask.
        scale: logit scale, default 1/sqrt(D).
        segments: int [G+1] boundaries 0 = s_0 < ... < s_G = Nk of contiguous key segments.
        logit_scale: per-(row, head) temperature, broadcastable to [B, H] (1 = none, 0 = uniform).
        segment_bias: added to the logits of every key of a segment, broadcastable to [B, H, G]
            (-inf knocks the segment out).
        head_gate: multiplies the head output, broadcastable to [B, H] (0 ablates the head).
        out_bias: added to the head output, broadcastable to [B, H, Dv].
        out_patch: [B, H, Nq, Dv] replacement head outputs, taken where `patch_mask` (bool, broadcastable to
            [B, H]; default all True) is set.
        capture: names from "lse", "max", "entropy", "segment_mass", "key_mass".
        backend: "auto", "reference", "cpu", "triton" or "cuda".

    Returns:
        (out [B, H, Nq, Dv] in q's dtype, {capture name: float32 tensor}).
    """
    plan = build_plan(
        q, k, v, key_padding_mask=key_padding_mask, causal=causal, attn_mask=attn_mask, scale=scale,
        segments=segments, logit_scale=logit_scale, segment_bias=segment_bias, head_gate=head_gate, out_bias=out_bias, out_patch=out_patch,
        patch_mask=patch_mask, capture=capture,
    )
    if plan.q.dtype == torch.float64 and backend not in ("auto", "reference"):
        raise TypeError(f"q has dtype torch.float64, which only the reference backend supports (backend={backend!r})")
    return run_plan(plan, backend)
