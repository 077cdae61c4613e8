"""Triton kernels for the backward of probed attention (the math: latentflow_fast/ops/autograd.py).

Recompute-based, as FlashAttention-2's backward, and deterministic (no atomics): three kernels over
contiguous float32 operands prepared by the launcher (`ops/autograd_triton.py`): q [BH, Nq, D_PAD],
k / v expanded to the query heads [BH, Nk, D_PAD / DV_PAD], the per-key logit bias kb [BH, Nk] (segment
bias and key mask folded, MASKED for a blocked key), the logit scale per (b, h) row, the forward's lse
[BH, Nq] (+BIG for a row that attends to nothing, so p = 0 there) and the gradient dO reaching the
attention output (gate and patch already applied) [BH, Nq, DV_PAD].

Per tile: s = qk_scale * ls * q.k + kb[j], p = exp(s - lse), and dP = dO . v^T plus the capture terms
(key_mass: g_km[j]; segment_mass: g_sm[i, seg(j)]; entropy: -g_ent[i] (s - lse)).

* `latentflow_probed_attn_bwd_delta` (per query block, keys streamed): Delta_i = sum_j p_ij dP_ij, and
  (STORE_O) the attention output p @ v, which the head-gate gradient needs.
* `latentflow_probed_attn_bwd_dkdv` (per key block, queries streamed in a fixed order):
  dS = p (dP - Delta) + p g_lse;  dv_j = sum_i p_ij dO_i;  dk_j = qk_scale ls sum_i dS_ij q_i; the column
  sums of dS (for the segment-bias gradient) and a per-key-block partial of sum dS * (qk_scale q.k) (for
  the logit-scale gradient), reduced by the launcher in a fixed order.
* `latentflow_probed_attn_bwd_dq` (per query block, keys streamed): dq_i = qk_scale ls sum_j dS_ij k_j.
"""

import triton
import triton.language as tl

MASKED = tl.constexpr(-1.0e30)


@triton.jit
def _tile(q, k_ptrs, v_ptrs, kb_ptr, offs_n, Nk, rows_ok, ls, qk_scale, lse, dO, g_km_ptr, g_sm_ptrs, seg_ptr,
          g_ent, HAS_KM: tl.constexpr, HAS_SM: tl.constexpr, HAS_ENT: tl.constexpr, PREC: tl.constexpr):
    """Recompute (raw logits, p, dP) of one [BLOCK_M, BLOCK_N] tile."""
    keys_ok = offs_n < Nk
    kt = tl.load(k_ptrs, mask=keys_ok[None, :], other=0.0)        # [D_PAD, BLOCK_N]
    vt = tl.load(v_ptrs, mask=keys_ok[None, :], other=0.0)        # [DV_PAD, BLOCK_N]
    kb = tl.load(kb_ptr + offs_n, mask=keys_ok, other=MASKED)
    raw = tl.dot(q, kt, input_precision=PREC) * qk_scale
    s = raw * ls + kb[None, :]
    centred = s - lse[:, None]
    p = tl.exp(centred)
    dP = tl.dot(dO, vt, input_precision=PREC)
    if HAS_KM:
        dP += tl.load(g_km_ptr + offs_n, mask=keys_ok, other=0.0)[None, :]
    if HAS_SM:
        seg = tl.load(seg_ptr + offs_n, mask=keys_ok, other=0)
        dP += tl.load(g_sm_ptrs + seg[None, :], mask=rows_ok[:, None] & keys_ok[None, :], other=0.0)  # g_sm[i, seg(j)]
    if HAS_ENT:
        dP -= g_ent[:, None] * tl.where(p > 0.0, centred, 0.0)
    return raw, p, dP


@triton.jit
def latentflow_probed_attn_bwd_delta(
    Q, K, V, KB, LS, LSE, DO, GKM, GSM, SEG, GENT, Delta, O,
    H, Nq, Nk, G, qk_scale, num_m_blocks,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr, DV_PAD: tl.constexpr,
    HAS_KM: tl.constexpr, HAS_SM: tl.constexpr, HAS_ENT: tl.constexpr, STORE_O: tl.constexpr,
    PREC: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_m = pid % num_m_blocks
    bh = (pid // num_m_blocks).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_ok = offs_m < Nq
    offs_d = tl.arange(0, D_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    q = tl.load(Q + bh * Nq * D_PAD + offs_m[:, None] * D_PAD + offs_d[None, :], mask=rows_ok[:, None], other=0.0)
    dO = tl.load(DO + bh * Nq * DV_PAD + offs_m[:, None] * DV_PAD + offs_dv[None, :], mask=rows_ok[:, None],
                 other=0.0)
    lse = tl.load(LSE + bh * Nq + offs_m, mask=rows_ok, other=1.0e30)  # rows past Nq: p = 0
    ls = tl.load(LS + bh)
    g_ent = tl.zeros([BLOCK_M], dtype=tl.float32)
    if HAS_ENT:
        g_ent = tl.load(GENT + bh * Nq + offs_m, mask=rows_ok, other=0.0)
    delta = tl.zeros([BLOCK_M], dtype=tl.float32)
    o = tl.zeros([BLOCK_M, DV_PAD], dtype=tl.float32)
    for start_n in range(0, Nk, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k_ptrs = K + bh * Nk * D_PAD + offs_n[None, :] * D_PAD + offs_d[:, None]
        v_ptrs = V + bh * Nk * DV_PAD + offs_n[None, :] * DV_PAD + offs_dv[:, None]
        g_sm_ptrs = GSM + (bh * Nq + offs_m[:, None]) * G
        raw, p, dP = _tile(q, k_ptrs, v_ptrs, KB + bh * Nk, offs_n, Nk, rows_ok, ls, qk_scale, lse, dO, GKM + bh * Nk,
                           g_sm_ptrs, SEG, g_ent, HAS_KM, HAS_SM, HAS_ENT, PREC)
        delta += tl.sum(p * dP, axis=1)
        if STORE_O:  # the attention output itself, for the head-gate gradient
            o += tl.dot(p, tl.trans(tl.load(v_ptrs, mask=(offs_n < Nk)[None, :], other=0.0)), input_precision=PREC)
    tl.store(Delta + bh * Nq + offs_m, delta, mask=rows_ok)
    if STORE_O:
        tl.store(O + bh * Nq * DV_PAD + offs_m[:, None] * DV_PAD + offs_dv[None, :], o, mask=rows_ok[:, None])


@triton.jit
def latentflow_probed_attn_bwd_dkdv(
    Q, K, V, KB, LS, LSE, DO, GKM, GSM, SEG, GENT, GLSE, Delta,
    DK, DV, DKEY, DLS_PART,
    H, Nq, Nk, G, qk_scale, num_n_blocks,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr, DV_PAD: tl.constexpr,
    HAS_KM: tl.constexpr, HAS_SM: tl.constexpr, HAS_ENT: tl.constexpr, HAS_GLSE: tl.constexpr,
    PREC: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_n = pid % num_n_blocks
    bh = (pid // num_n_blocks).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    keys_ok = offs_n < Nk
    offs_d = tl.arange(0, D_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    ls = tl.load(LS + bh)
    k_ptrs = K + bh * Nk * D_PAD + offs_n[None, :] * D_PAD + offs_d[:, None]
    v_ptrs = V + bh * Nk * DV_PAD + offs_n[None, :] * DV_PAD + offs_dv[:, None]
    dk = tl.zeros([BLOCK_N, D_PAD], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, DV_PAD], dtype=tl.float32)
    dkey = tl.zeros([BLOCK_N], dtype=tl.float32)
    dls = tl.zeros([BLOCK_N], dtype=tl.float32)
    for start_m in range(0, Nq, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        rows_ok = offs_m < Nq
        q = tl.load(Q + bh * Nq * D_PAD + offs_m[:, None] * D_PAD + offs_d[None, :], mask=rows_ok[:, None],
                    other=0.0)
        dO = tl.load(DO + bh * Nq * DV_PAD + offs_m[:, None] * DV_PAD + offs_dv[None, :], mask=rows_ok[:, None],
                     other=0.0)
        lse = tl.load(LSE + bh * Nq + offs_m, mask=rows_ok, other=1.0e30)  # rows past Nq: p = 0
        g_ent = tl.zeros([BLOCK_M], dtype=tl.float32)
        if HAS_ENT:
            g_ent = tl.load(GENT + bh * Nq + offs_m, mask=rows_ok, other=0.0)
        g_sm_ptrs = GSM + (bh * Nq + offs_m[:, None]) * G
        raw, p, dP = _tile(q, k_ptrs, v_ptrs, KB + bh * Nk, offs_n, Nk, rows_ok, ls, qk_scale, lse, dO, GKM + bh * Nk,
                           g_sm_ptrs, SEG, g_ent, HAS_KM, HAS_SM, HAS_ENT, PREC)
        delta = tl.load(Delta + bh * Nq + offs_m, mask=rows_ok, other=0.0)
        dS = p * (dP - delta[:, None])
        if HAS_GLSE:
            dS += p * tl.load(GLSE + bh * Nq + offs_m, mask=rows_ok, other=0.0)[:, None]
        dv += tl.dot(tl.trans(p), dO, input_precision=PREC)
        dk += tl.dot(tl.trans(dS), q, input_precision=PREC)
        dkey += tl.sum(dS, axis=0)
        dls += tl.sum(dS * raw, axis=0)
    dk = dk * (qk_scale * ls)
    tl.store(DK + bh * Nk * D_PAD + offs_n[:, None] * D_PAD + offs_d[None, :], dk, mask=keys_ok[:, None])
    tl.store(DV + bh * Nk * DV_PAD + offs_n[:, None] * DV_PAD + offs_dv[None, :], dv, mask=keys_ok[:, None])
    tl.store(DKEY + bh * Nk + offs_n, dkey, mask=keys_ok)
    tl.store(DLS_PART + bh * num_n_blocks + pid_n, tl.sum(tl.where(keys_ok, dls, 0.0), axis=0))


@triton.jit
def latentflow_probed_attn_bwd_dq(
    Q, K, V, KB, LS, LSE, DO, GKM, GSM, SEG, GENT, GLSE, Delta, DQ,
    H, Nq, Nk, G, qk_scale, num_m_blocks,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr, DV_PAD: tl.constexpr,
    HAS_KM: tl.constexpr, HAS_SM: tl.constexpr, HAS_ENT: tl.constexpr, HAS_GLSE: tl.constexpr,
    PREC: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_m = pid % num_m_blocks
    bh = (pid // num_m_blocks).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_ok = offs_m < Nq
    offs_d = tl.arange(0, D_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    q = tl.load(Q + bh * Nq * D_PAD + offs_m[:, None] * D_PAD + offs_d[None, :], mask=rows_ok[:, None], other=0.0)
    dO = tl.load(DO + bh * Nq * DV_PAD + offs_m[:, None] * DV_PAD + offs_dv[None, :], mask=rows_ok[:, None],
                 other=0.0)
    lse = tl.load(LSE + bh * Nq + offs_m, mask=rows_ok, other=1.0e30)
    ls = tl.load(LS + bh)
    g_ent = tl.zeros([BLOCK_M], dtype=tl.float32)
    if HAS_ENT:
        g_ent = tl.load(GENT + bh * Nq + offs_m, mask=rows_ok, other=0.0)
    g_lse = tl.zeros([BLOCK_M], dtype=tl.float32)
    if HAS_GLSE:
        g_lse = tl.load(GLSE + bh * Nq + offs_m, mask=rows_ok, other=0.0)
    delta = tl.load(Delta + bh * Nq + offs_m, mask=rows_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    for start_n in range(0, Nk, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k_ptrs = K + bh * Nk * D_PAD + offs_n[None, :] * D_PAD + offs_d[:, None]
        v_ptrs = V + bh * Nk * DV_PAD + offs_n[None, :] * DV_PAD + offs_dv[:, None]
        g_sm_ptrs = GSM + (bh * Nq + offs_m[:, None]) * G
        raw, p, dP = _tile(q, k_ptrs, v_ptrs, KB + bh * Nk, offs_n, Nk, rows_ok, ls, qk_scale, lse, dO, GKM + bh * Nk,
                           g_sm_ptrs, SEG, g_ent, HAS_KM, HAS_SM, HAS_ENT, PREC)
        dS = p * (dP - delta[:, None] + g_lse[:, None])
        kt = tl.load(k_ptrs, mask=(offs_n < Nk)[None, :], other=0.0)
        dq += tl.dot(dS, tl.trans(kt), input_precision=PREC)
    dq = dq * (qk_scale * ls)
    tl.store(DQ + bh * Nq * D_PAD + offs_m[:, None] * D_PAD + offs_d[None, :], dq, mask=rows_ok[:, None])
