"""Launcher of the Triton backward kernels (kernels/triton_probed_attention_bwd.py).

Used by ops/autograd.py for plans whose forward ran on a GPU backend ("triton", "cuda"), or on "triton"
under TRITON_INTERPRET=1 (tests on CPU tensors). The operands are copied to contiguous float32 with head
dims padded to a power of two and k / v expanded to the query heads, which keeps the kernels to plain
row-major tiles; GQA heads are summed back here. Gradients of the `max` capture and float64 inputs stay
on the torch implementation. Tiles are fixed per padded head dim (deterministic; not tuned on a GPU yet).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from .autograd import _GATE, _K, _LS, _OB, _PATCH, _Q, _SB, _V
from .backend_triton import _kernels as _forward_kernels  # noqa: F401  (applies the interpreter patch)
from .backend_triton import _device_scope, _pow2, interpreter_enabled, triton_cdiv

MASKED = -1.0e30
DEAD_ROW_LSE = 1.0e30  # lse of a row that attends to nothing: every p = exp(s - lse) is 0


def _tiles(d_pad: int) -> tuple:
    if interpreter_enabled():
        return 16, 16, 1
    return (64, 64, 4) if d_pad <= 64 else (32, 32, 4)


def _kernels():
    _forward_kernels()
    from latentflow_fast.kernels import triton_probed_attention_bwd

    return triton_probed_attention_bwd


def backward(q, k, v, kpm, scale, segments, ls, sb, gate, patch, pmask, lse, dout, dc: dict, needs):
    """Same contract as autograd._probed_attention_backward (float32 math, lse required)."""
    B, H, Nq, D = q.shape
    Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[3]
    group = H // Hkv
    dev = q.device
    f32 = dict(dtype=torch.float32, device=dev)
    d_pad, dv_pad = _pow2(D), _pow2(Dv)
    BH = B * H

    def rows(t, width, pad):
        return F.pad(t.float(), (0, pad - width)).reshape(BH, t.shape[2], pad).contiguous()

    qf = rows(q, D, d_pad)
    kf = rows(k.repeat_interleave(group, dim=1), D, d_pad)
    vf = rows(v.repeat_interleave(group, dim=1), Dv, dv_pad)
    seg_of_key = None
    kb = torch.zeros(B, H, Nk, **f32)
    if segments is not None:
        seg_of_key = torch.bucketize(torch.arange(Nk, device=dev), segments[1:], right=True)
    if sb is not None:
        kb = kb + sb.float()[:, :, seg_of_key]
    if kpm is not None:
        kb = kb.masked_fill(~kpm[:, None, :], MASKED)
    kb = kb.clamp_min(MASKED).reshape(BH, Nk).contiguous()  # -inf (knocked-out segment) -> MASKED
    lsv = (ls.float() if ls is not None else torch.ones(B, H, **f32)).reshape(BH).contiguous()
    lse_rows = torch.where(torch.isfinite(lse), lse, DEAD_ROW_LSE).reshape(BH, Nq).float().contiguous()

    gate_c = None if gate is None else gate.float()[:, :, None, None]
    keep = None if pmask is None else (~pmask)[:, :, None, None]
    if dout is not None:
        dO = dout.float() if gate_c is None else dout.float() * gate_c
        if keep is not None:
            dO = dO * keep
    else:
        dO = torch.zeros(B, H, Nq, Dv, **f32)
    dOf = rows(dO, Dv, dv_pad)
    dummy = torch.zeros(1, **f32)

    def flat(name, shape):
        return dc[name].float().reshape(shape).contiguous() if name in dc else dummy

    G = segments.shape[0] - 1 if segments is not None else 1
    gkm, gsm = flat("key_mass", (BH, Nk)), flat("segment_mass", (BH, Nq, G))
    gent, glse = flat("entropy", (BH, Nq)), flat("lse", (BH, Nq))
    seg = seg_of_key.to(torch.int32).contiguous() if seg_of_key is not None else torch.zeros(1, dtype=torch.int32,
                                                                                               device=dev)
    flags = dict(HAS_KM="key_mass" in dc, HAS_SM="segment_mass" in dc, HAS_ENT="entropy" in dc)
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    block_m, block_n, warps = _tiles(max(d_pad, dv_pad))
    want_o = gate is not None and needs[_GATE] and dout is not None
    delta = torch.empty(BH, Nq, **f32)
    o = torch.empty(BH, Nq, dv_pad, **f32) if want_o else dummy
    dq = torch.empty(BH, Nq, d_pad, **f32)
    dk = torch.empty(BH, Nk, d_pad, **f32)
    dv = torch.empty(BH, Nk, dv_pad, **f32)
    dkey = torch.empty(BH, Nk, **f32)
    n_m, n_n = triton_cdiv(Nq, block_m), triton_cdiv(Nk, block_n)
    dls_part = torch.empty(BH, n_n, **f32)
    kern = _kernels()
    common = (qf, kf, vf, kb, lsv, lse_rows, dOf, gkm, gsm, seg, gent)
    meta = dict(BLOCK_M=block_m, BLOCK_N=block_n, D_PAD=d_pad, DV_PAD=dv_pad, PREC=prec, num_warps=warps, **flags)
    with _device_scope(dev):
        kern.latentflow_probed_attn_bwd_delta[(BH * n_m,)](*common, delta, o, H, Nq, Nk, G, float(scale), n_m,
                                                           STORE_O=want_o, **meta)
        kern.latentflow_probed_attn_bwd_dkdv[(BH * n_n,)](*common, glse, delta, dk, dv, dkey, dls_part, H, Nq, Nk,
                                                          G, float(scale), n_n, HAS_GLSE="lse" in dc, **meta)
        kern.latentflow_probed_attn_bwd_dq[(BH * n_m,)](*common, glse, delta, dq, H, Nq, Nk, G, float(scale), n_m,
                                                        HAS_GLSE="lse" in dc, **meta)

    def kv_heads(t, width):
        t = t[..., :width].reshape(B, H, Nk, width)
        return t if group == 1 else t.reshape(B, Hkv, group, Nk, width).sum(dim=2)

    grads = [None] * 12
    grads[_Q] = dq[..., :D].reshape(B, H, Nq, D).to(q.dtype) if needs[_Q] else None
    grads[_K] = kv_heads(dk, D).to(k.dtype) if needs[_K] else None
    grads[_V] = kv_heads(dv, Dv).to(v.dtype) if needs[_V] else None
    if ls is not None and needs[_LS]:
        grads[_LS] = dls_part.sum(dim=1).reshape(B, H).to(ls.dtype)
    if sb is not None and needs[_SB]:
        grads[_SB] = torch.zeros_like(sb).index_add_(2, seg_of_key, dkey.reshape(B, H, Nk).to(sb.dtype))
    if want_o:
        o_p = o[..., :Dv].reshape(B, H, Nq, Dv)
        if keep is not None:
            o_p = torch.where(keep, o_p, patch.float())
        grads[_GATE] = (dout.float() * o_p).sum(dim=(-1, -2)).to(gate.dtype)
    if dout is not None and needs[_OB]:
        grads[_OB] = dout.float().sum(dim=2)
    if patch is not None and dout is not None and needs[_PATCH]:
        d_patch = dout if gate_c is None else dout * gate_c.to(dout.dtype)
        grads[_PATCH] = torch.where(pmask[:, :, None, None], d_patch, 0.0).to(patch.dtype)
    return tuple(grads)
