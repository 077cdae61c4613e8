"""The backward of `latentflow::probed_attention` (registered with `torch.library.register_autograd`).

Recompute-based, as FlashAttention's backward: nothing of size N x N is saved by the forward. The backward
walks the queries in blocks; per block it rebuilds the logits s = scale * logit_scale * q.k + segment_bias
(masked keys -inf) for that block only ([B, H, block, Nk], bounded by `BLOCK_ELEMENTS`), the probabilities
p = exp(s - lse) from the forward's saved lse, and accumulates dq, dk, dv and the parameter gradients. It is
written in torch operations, so it runs on every device and after every backend (reference, cpu, triton,
cuda); plans whose forward ran on a GPU backend use the Triton kernels of the same algorithm instead
(kernels/triton_probed_attention_bwd.py, launched by ops/autograd_triton.py).

What is differentiable (docs/design.md, section 2):
- out w.r.t. q, k, v and the float tensors logit_scale, segment_bias, head_gate, out_bias, out_patch;
- the captures lse, entropy, segment_mass and key_mass (all are smooth functions of the logits);
  `max` has the subgradient of a max (1 at the first arg-max key of the row).
key_padding_mask, patch_mask and segments are discrete (no gradient).

Gradient algebra (per row i of one (b, h)): with dP_ij the gradient reaching p_ij from out (dO_i . v_j) and
from the mass / entropy captures, the softmax Jacobian gives dS_ij = p_ij (dP_ij - sum_k p_ik dP_ik), plus
p_ij * dlse_i from the lse capture. The entropy -sum p log p contributes dP_ij = -dH_i (s_ij - lse_i) (its
constant term cancels in the Jacobian).
"""

from __future__ import annotations

import torch

from .plan import CAPTURE_NAMES

# Upper bound on the elements of one materialised [B, H, block, Nk] logit block in the backward.
BLOCK_ELEMENTS = 1 << 22

_OUT_INDEX = {name: 1 + i for i, name in enumerate(CAPTURE_NAMES)}
# The op's arguments this backward understands, in the order the gradient functions use (the op's schema is
# read by name, so arguments added to the op later cannot be misread as these).
ARG_ORDER = ("q", "k", "v", "key_padding_mask", "scale", "segments", "logit_scale", "segment_bias", "head_gate",
             "out_bias", "out_patch", "patch_mask")
_Q, _K, _V, _KPM, _SCALE, _SEG, _LS, _SB, _GATE, _OB, _PATCH, _PMASK = range(12)
_OTHER_KNOWN = ("capture_flags", "backend")
MASK_ARGS = ("causal_offset", "attn_mask")  # handled by the torch backward (the Triton backward has no masks)


def _schema_names() -> list:
    return [a.name for a in torch.ops.latentflow.probed_attention.default._schema.arguments]


def setup_context(ctx, inputs, output) -> None:
    names = _schema_names()
    args = dict(zip(names, inputs))
    # An argument this backward does not know (e.g. a mask added to the operator later) must not be ignored
    # silently: if it is active, backward() raises instead of returning wrong gradients.
    ctx.unsupported = sorted(n for n, a in args.items()
                             if n not in ARG_ORDER + _OTHER_KNOWN + MASK_ARGS and a is not None and a is not False)
    lse = output[_OUT_INDEX["lse"]] if args["capture_flags"][0] else None
    ctx.save_for_backward(*(args[n] for n in ARG_ORDER if n != "scale"), lse, args.get("attn_mask"))
    ctx.causal_offset = args.get("causal_offset")
    ctx.scale = float(args["scale"])
    ctx.names = names
    ctx.backend = args.get("backend", "reference")


def _live(t):
    """A gradient that carries information (autograd passes None or a zero-size tensor for unused outputs)."""
    return t is not None and t.numel() > 0


def backward(ctx, dout, *dcaps):
    if ctx.unsupported:
        raise NotImplementedError(f"gradients of probed_attention with {', '.join(ctx.unsupported)} are not "
                                  "implemented (latentflow_fast/ops/autograd.py)")
    q, k, v, kpm, segments, ls, sb, gate, ob, patch, pmask, saved_lse, attn_mask = ctx.saved_tensors
    position = {n: i for i, n in enumerate(ctx.names)}
    needs = tuple(ctx.needs_input_grad[position[n]] for n in ARG_ORDER)
    caps = dict(zip(CAPTURE_NAMES, dcaps))
    masks = {"causal_offset": ctx.causal_offset, "attn_mask": attn_mask,
             "mask_grad": attn_mask is not None and "attn_mask" in position
             and ctx.needs_input_grad[position["attn_mask"]]}
    if ctx.causal_offset is None and attn_mask is None and _use_triton(ctx.backend, q, saved_lse, caps):
        from . import autograd_triton

        live = {name: t for name, t in caps.items() if _live(t)}
        grads = autograd_triton.backward(q, k, v, kpm, ctx.scale, segments, ls, sb, gate, patch, pmask, saved_lse,
                                         dout if _live(dout) else None, live, needs)
    else:
        grads = _probed_attention_backward(q, k, v, kpm, ctx.scale, segments, ls, sb, gate, patch, pmask,
                                           saved_lse, dout, caps, needs, masks)
    by_name = dict(zip(ARG_ORDER, grads))
    if len(grads) > len(ARG_ORDER):
        by_name["attn_mask"] = grads[len(ARG_ORDER)]
    return tuple(by_name.get(n) for n in ctx.names)


def _use_triton(backend: str, q, saved_lse, caps: dict) -> bool:
    """The Triton backward serves plans whose forward ran on a GPU backend (or on "triton" under
    TRITON_INTERPRET=1), in float32 / 16-bit, with the saved lse, and no gradient on the `max` capture."""
    if saved_lse is None or q.dtype == torch.float64 or _live(caps.get("max")):
        return False
    from .backend_triton import interpreter_enabled, unavailable_reason

    on_gpu = q.is_cuda and backend in ("triton", "cuda")
    interpreted = backend == "triton" and interpreter_enabled() and not q.is_cuda
    return (on_gpu or interpreted) and unavailable_reason() is None


def _probed_attention_backward(q, k, v, kpm, scale, segments, ls, sb, gate, patch, pmask, saved_lse,
                               dout, dcaps, needs, masks=None):
    B, H, Nq, D = q.shape
    Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[3]
    group = H // Hkv
    # float64 inputs are differentiated in float64 (gradcheck); everything else in float32.
    cd = torch.float64 if q.dtype == torch.float64 else torch.float32
    dev = q.device
    kk = k.to(cd).repeat_interleave(group, dim=1)  # [B, H, Nk, D]
    vv = v.to(cd).repeat_interleave(group, dim=1)
    seg_of_key = None
    if segments is not None:
        seg_of_key = torch.bucketize(torch.arange(Nk, device=dev), segments[1:], right=True)
    key_bias = None  # [B, H, 1, Nk]
    if sb is not None:
        key_bias = sb.to(cd)[:, :, seg_of_key][:, :, None, :]
    if kpm is not None:
        blocked = torch.zeros(B, 1, 1, Nk, dtype=cd, device=dev).masked_fill(~kpm[:, None, None, :], float("-inf"))
        key_bias = blocked if key_bias is None else key_bias + blocked
    lsf = None if ls is None else ls.to(cd)[:, :, None, None]

    dout = dout.to(cd) if _live(dout) else None
    gate_c = None if gate is None else gate.to(cd)[:, :, None, None]
    keep = None if pmask is None else (~pmask)[:, :, None, None]  # rows computed by attention, not patched
    dO = None  # gradient reaching the attention output itself (before patch / gate / bias)
    if dout is not None:
        dO = dout if gate_c is None else dout * gate_c
        if keep is not None:
            dO = dO * keep
    dc = {name: dcaps[name].to(cd) for name in CAPTURE_NAMES if _live(dcaps.get(name))}
    use_saved_lse = saved_lse is not None and cd == torch.float32  # the contract stores lse in float32

    dq = torch.zeros(B, H, Nq, D, dtype=cd, device=dev)
    dk = torch.zeros(B, H, Nk, D, dtype=cd, device=dev)
    dv = torch.zeros(B, H, Nk, Dv, dtype=cd, device=dev)
    dls = torch.zeros(B, H, dtype=cd, device=dev) if ls is not None else None
    dkey = torch.zeros(B, H, Nk, dtype=cd, device=dev) if sb is not None else None  # sum_i dS_ij
    dgate = torch.zeros(B, H, dtype=cd, device=dev) if gate is not None and needs[_GATE] else None
    attn_needed = dO is not None or dc
    masks = masks or {}
    attn_mask, causal_offset = masks.get("attn_mask"), masks.get("causal_offset")
    dmask = None  # gradient of an additive float mask: dS, summed over the dims it broadcasts over
    if attn_mask is not None and attn_mask.is_floating_point() and masks.get("mask_grad"):
        dmask = torch.zeros(attn_mask.shape, dtype=cd, device=dev)
    block = max(1, min(Nq, BLOCK_ELEMENTS // max(1, B * H * Nk)))
    for i0 in range(0, Nq, block):
        i1 = min(Nq, i0 + block)
        qb = q[:, :, i0:i1].to(cd)
        raw = torch.matmul(qb, kk.transpose(-1, -2)) * scale  # [B, H, b, Nk]
        s = raw if lsf is None else raw * lsf
        if key_bias is not None:
            s = s + key_bias
        if attn_mask is not None:  # [Bm, Hm, Nq, Nk], as the forward's plan holds it
            m = attn_mask[:, :, i0:i1]
            s = s.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else s + m.to(cd)
        if causal_offset is not None:  # key j is visible to query i iff j <= i + offset
            rows_i = torch.arange(i0, i1, device=dev)[:, None]
            s = s.masked_fill(torch.arange(Nk, device=dev)[None, :] > rows_i + causal_offset, float("-inf"))
        if use_saved_lse:
            lse = saved_lse[:, :, i0:i1].to(cd)
        else:
            lse = torch.logsumexp(s, dim=-1)
        alive = torch.isfinite(lse)[..., None]
        lse_safe = torch.where(alive, lse[..., None], 0.0)
        p = torch.where(alive, torch.exp(s - lse_safe), 0.0)
        if dgate is not None and dout is not None:
            o = torch.matmul(p, vv)
            if keep is not None:
                o = torch.where(keep, o, patch[:, :, i0:i1].to(cd))
            dgate += (dout[:, :, i0:i1] * o).sum(dim=(-1, -2))
        if not attn_needed:
            continue
        dP = torch.zeros_like(p)
        if dO is not None:
            dOb = dO[:, :, i0:i1]
            dP = dP + torch.matmul(dOb, vv.transpose(-1, -2))
            dv += torch.matmul(p.transpose(-1, -2), dOb)
        if "segment_mass" in dc:
            dP = dP + dc["segment_mass"][:, :, i0:i1][..., seg_of_key]
        if "key_mass" in dc:
            dP = dP + dc["key_mass"][:, :, None, :]
        if "entropy" in dc:
            centred = torch.where(p > 0, s - lse_safe, 0.0)  # log p where p > 0 (0 * log 0 = 0)
            dP = dP - dc["entropy"][:, :, i0:i1, None] * centred
        dS = p * (dP - (p * dP).sum(dim=-1, keepdim=True))
        if "lse" in dc:
            dS = dS + p * torch.where(alive, dc["lse"][:, :, i0:i1, None], 0.0)
        if "max" in dc:
            first_max = torch.nn.functional.one_hot(s.argmax(dim=-1), Nk).to(cd) * alive
            dS = dS + first_max * dc["max"][:, :, i0:i1, None]
        if dls is not None:
            dls += (dS * raw).sum(dim=(-1, -2))
        if dkey is not None:
            dkey += dS.sum(dim=2)
        if dmask is not None:
            reduce_dims = tuple(d for d in (0, 1) if attn_mask.shape[d] == 1 and dS.shape[d] != 1)
            dmask[:, :, i0:i1] = dS.sum(dim=reduce_dims, keepdim=True) if reduce_dims else dS
        dS_qk = dS if lsf is None else dS * lsf  # gradient w.r.t. scale * q.k
        dq[:, :, i0:i1] = torch.matmul(dS_qk, kk) * scale
        dk += torch.matmul(dS_qk.transpose(-1, -2), qb) * scale

    def kv_heads(t):  # heads sharing a kv head (GQA) add their gradients
        return t if group == 1 else t.reshape(B, Hkv, group, *t.shape[2:]).sum(dim=2)

    dsb = None
    if dkey is not None and needs[_SB]:
        dsb = torch.zeros_like(sb, dtype=cd).index_add_(2, seg_of_key, dkey)
        dsb = dsb.to(sb.dtype)
    d_out_bias = dout.sum(dim=2).to(torch.float32) if dout is not None and needs[_OB] else None
    d_patch = None
    if patch is not None and dout is not None and needs[_PATCH]:
        d_patch = dout if gate_c is None else dout * gate_c
        d_patch = torch.where(pmask[:, :, None, None], d_patch, 0.0).to(patch.dtype)
    grads = [None] * 12
    grads[_Q] = dq.to(q.dtype) if needs[_Q] else None
    grads[_K] = kv_heads(dk).to(k.dtype) if needs[_K] else None
    grads[_V] = kv_heads(dv).to(v.dtype) if needs[_V] else None
    grads[_LS] = dls.to(ls.dtype) if dls is not None and needs[_LS] else None
    grads[_SB] = dsb
    grads[_GATE] = dgate.to(gate.dtype) if dgate is not None else None
    grads[_OB] = d_out_bias
    grads[_PATCH] = d_patch
    if dmask is not None:
        grads.append(dmask.to(attn_mask.dtype))
    return tuple(grads)
