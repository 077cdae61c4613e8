"""Triton kernels for probed attention (DESIGN.md section 3).

Two kernels with stable names (for `ncu --kernel-name` filters):

* `latentflow_probed_attn_fwd`: one program per (query block, batch row x head). Online softmax over key
  blocks (flash-attention style, log2 domain), plus, each behind a constexpr flag so that an inactive
  feature compiles away: logit_scale, segment_bias, key-padding mask, head_gate, out_bias, out_patch and
  the captures lse, max, entropy, segment_mass.
* `latentflow_probed_attn_key_mass`: the deterministic second pass for key_mass. One program per
  (key block, batch row x head); it recomputes q.k for every query block in a fixed order with the
  final lse of the forward pass and sums p over queries. No atomics, so the bits never depend on
  scheduling.

Online forms, all rescaled by alpha = 2^(m_old - m_new) when the running max m moves (log2 units):
  l   = sum_j 2^(s_j - m)                       (the normaliser)
  t   = sum_j 2^(s_j - m) (s_j - m)              (entropy numerator, kept relative to m: no cancellation)
        moving m adds (m_old - m_new) * l_old before the rescale
  seg = sum_{j in segment g} 2^(s_j - m)         (per-segment normalisers. Segments are contiguous and key
        blocks advance in order, so only the current segment's mass is live, in a [BLOCK_M] vector
        rescaled like l; it moves into a [BLOCK_M, G_PAD] accumulator, kept relative to the base of that
        moment, when the segment ends. A block straddling boundaries adds one exact float32 masked row sum
        per segment present. Inside a segment segment_mass costs one FMA per row per key block.)
At the end: lse = (m + log2 l) ln2, entropy = (log2 l - t / l) ln2, segment_mass = seg / l.
A row whose logits are all -inf keeps l = 0 and gets p = 0: out = gate * 0 + bias (or the patch),
lse = max = -inf, entropy = 0, segment_mass = 0.

A patched head (out_patch + patch_mask) whose statistics nobody asked for skips its key loop entirely.

Head dims that are not a power of two are padded to the next one (at least 16, tl.dot's minimum)
with masked loads (EVEN_D / EVEN_DV flags drop the masks when no padding is needed).
"""

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _load_tile(ptrs, rows_ok, cols_ok, MASK_ROWS: tl.constexpr, MASK_COLS: tl.constexpr):
    """Load a 2-D tile, masking rows and/or columns only where the flags say padding is possible."""
    if MASK_ROWS and MASK_COLS:
        tile = tl.load(ptrs, mask=rows_ok[:, None] & cols_ok[None, :], other=0.0)
    elif MASK_ROWS:
        tile = tl.load(ptrs, mask=rows_ok[:, None], other=0.0)
    elif MASK_COLS:
        tile = tl.load(ptrs, mask=cols_ok[None, :], other=0.0)
    else:
        tile = tl.load(ptrs)
    return tile


@triton.jit
def _segment_of(positions, bounds):
    """seg(j) for key positions (any shape [N]): how many upper boundaries s_1..s_G lie at or below j."""
    return tl.sum((positions[:, None] >= bounds[None, :]).to(tl.int32), axis=1)


@triton.jit
def _segment_bias(offs_n, G, seg_bias_row, bounds):
    """segment_bias[seg(j)] for each key j (padded keys j >= Nk read the last segment; they are masked)."""
    return tl.load(seg_bias_row + tl.minimum(_segment_of(offs_n, bounds), G - 1))


@triton.jit
def _key_logit_terms(
    s, offs_n, Nk, mask_row, bias,
    HAS_MASK: tl.constexpr, HAS_SEG_BIAS: tl.constexpr, MASK_KEYS: tl.constexpr, KEYS_ON_ROWS: tl.constexpr,
):
    """Add the per-key terms to a score tile (log2 units): segment bias, then -inf for masked/padded keys.

    The key axis is the column axis of `s` (forward pass) or its row axis (key_mass pass, KEYS_ON_ROWS).
    """
    if HAS_SEG_BIAS:
        bias = bias * LOG2E
        if KEYS_ON_ROWS:
            s = s + bias[:, None]
        else:
            s = s + bias[None, :]
    if HAS_MASK or MASK_KEYS:
        if HAS_MASK:
            if MASK_KEYS:
                keep = tl.load(mask_row + offs_n, mask=offs_n < Nk, other=0) != 0
            else:
                keep = tl.load(mask_row + offs_n) != 0
        else:
            keep = offs_n < Nk
        if KEYS_ON_ROWS:
            s = tl.where(keep[:, None], s, float("-inf"))
        else:
            s = tl.where(keep[None, :], s, float("-inf"))
    return s


@triton.jit
def _fwd_key_block(
    acc, l_i, m_i, t_i, seg_acc, l_seg, m_snap, seg_cur, seg_end,
    q, k_head, v_head, mask_row, seg_bias_row, Segments, bounds,
    start_n, Nk, D, DV, G, qk_scale2,
    stride_kn, stride_kd, stride_vn, stride_vd,
    BLOCK_N: tl.constexpr, D_PAD: tl.constexpr, DV_PAD: tl.constexpr, G_PAD: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_SEG_BIAS: tl.constexpr, STORE_ENT: tl.constexpr, STORE_SEG: tl.constexpr,
    MASK_KEYS: tl.constexpr, EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Fold one block of keys [start_n, start_n + BLOCK_N) into the running softmax state of a query block.

    seg_cur is the segment of key start_n and seg_end its end (scalars carried from block to block), so a
    block inside one segment -- nearly all of them -- needs no per-key segment lookup. segment_mass keeps
    the running mass of the current segment in l_seg (rescaled like l_i: one FMA per row per block); a
    segment's mass moves into seg_acc [BLOCK_M, G_PAD] only when the segment ends, and seg_acc is kept
    relative to the base m_snap of that moment, so the wide accumulator is touched once per boundary.
    """
    offs_n = start_n + tl.arange(0, BLOCK_N)
    block_end = tl.minimum(start_n + BLOCK_N, Nk)
    in_one_segment = block_end <= seg_end
    offs_d = tl.arange(0, D_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    keys_ok = offs_n < Nk

    # K^T tile [D_PAD, BLOCK_N] and scores in log2 units (scale * logit_scale * log2(e) folded in).
    kt_ptrs = k_head + offs_d[:, None] * stride_kd + offs_n[None, :] * stride_kn
    kt = _load_tile(kt_ptrs, offs_d < D, keys_ok, not EVEN_D, MASK_KEYS)
    s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale2
    bias = tl.zeros([BLOCK_N], dtype=tl.float32)
    if HAS_SEG_BIAS:
        if in_one_segment:
            bias += tl.load(seg_bias_row + seg_cur)
        else:
            bias += _segment_bias(offs_n, G, seg_bias_row, bounds)
    s = _key_logit_terms(s, offs_n, Nk, mask_row, bias, HAS_MASK, HAS_SEG_BIAS, MASK_KEYS, False)

    # Online softmax; a row with no finite logit so far keeps base 0 so that nothing becomes NaN.
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_base = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2(m_i - m_base)
    shifted = s - m_base[:, None]
    p = tl.math.exp2(shifted)
    p_sum = tl.sum(p, axis=1)
    if STORE_ENT:
        moved = (tl.where(l_i > 0.0, m_i, m_base) - m_base) * l_i  # 0 while the row is still empty
        t_i = alpha * (t_i + moved) + tl.sum(p * tl.where(p > 0.0, shifted, 0.0), axis=1)
    l_i = l_i * alpha + p_sum

    seg_last = seg_cur  # segment of the block's last key
    if HAS_SEG_BIAS or STORE_SEG:
        if not in_one_segment:
            seg_last = tl.sum((block_end - 1 >= bounds).to(tl.int32))
    if STORE_SEG:
        offs_g = tl.arange(0, G_PAD)
        if in_one_segment:
            l_seg = l_seg * alpha + p_sum
        else:
            # Boundaries inside the block (rare): exact float32 row sums per segment present; the ones
            # that end here go to seg_acc, the last one continues in l_seg.
            seg_acc = seg_acc * tl.math.exp2(tl.minimum(m_snap - m_base, 0.0))[:, None]
            m_snap = m_base
            seg_of_key = _segment_of(offs_n, bounds)
            carried = l_seg * alpha
            for g in range(seg_cur, seg_last + 1):
                part = tl.sum(tl.where(seg_of_key[None, :] == g, p, 0.0), axis=1)
                part += tl.where(g == seg_cur, carried, 0.0)
                seg_acc = tl.where(offs_g[None, :] == g, part[:, None], seg_acc)
            l_seg = tl.sum(tl.where(offs_g[None, :] == seg_last, seg_acc, 0.0), axis=1)
            seg_acc = tl.where(offs_g[None, :] == seg_last, 0.0, seg_acc)
    v_ptrs = v_head + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd
    v = _load_tile(v_ptrs, keys_ok, offs_dv < DV, MASK_KEYS, not EVEN_DV)
    p_lo = p.to(v.dtype)
    acc = tl.dot(p_lo, v, acc * alpha[:, None], input_precision=DOT_PRECISION)

    if HAS_SEG_BIAS or STORE_SEG:
        if not in_one_segment:
            seg_cur = seg_last
            seg_end = tl.load(Segments + 1 + seg_last).to(tl.int32)
        if seg_end <= start_n + BLOCK_N:  # the current segment ends with this block
            if STORE_SEG:
                seg_acc = seg_acc * tl.math.exp2(tl.minimum(m_snap - m_base, 0.0))[:, None]
                m_snap = m_base
                seg_acc = tl.where(tl.arange(0, G_PAD)[None, :] == seg_cur, l_seg[:, None], seg_acc)
                l_seg = l_seg * 0.0
            seg_cur = seg_cur + 1
            seg_end = tl.load(Segments + 1 + tl.minimum(seg_cur, G - 1)).to(tl.int32)
    return acc, l_i, m_new, t_i, seg_acc, l_seg, m_snap, seg_cur, seg_end


@triton.jit
def latentflow_probed_attn_fwd(
    Q, K, V, Out,
    Mask, Segments, LogitScale, SegBias, HeadGate, OutBias, Patch, PatchMask,
    Lse, Max, Entropy, SegMass,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_pb, stride_ph, stride_pm, stride_pd,
    H, GROUP, Nq, Nk, D, DV, G, num_m_blocks, qk_scale2,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    D_PAD: tl.constexpr, DV_PAD: tl.constexpr, G_PAD: tl.constexpr, EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_LOGIT_SCALE: tl.constexpr, HAS_SEG_BIAS: tl.constexpr,
    HAS_GATE: tl.constexpr, HAS_OUT_BIAS: tl.constexpr, HAS_PATCH: tl.constexpr,
    STORE_LSE: tl.constexpr, STORE_MAX: tl.constexpr, STORE_ENT: tl.constexpr, STORE_SEG: tl.constexpr,
    SKIP_PATCHED: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # 1-D grid, query blocks of one head adjacent (K/V reuse in L2; no 65535 limit on B*H).
    pid = tl.program_id(0)
    pid_m = pid % num_m_blocks
    bh = (pid // num_m_blocks).to(tl.int64)
    b = bh // H
    h = bh % H
    kvh = h // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    rows_ok = offs_m < Nq

    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd
    q = _load_tile(q_ptrs, rows_ok, offs_d < D, True, not EVEN_D)
    k_head = K + b * stride_kb + kvh * stride_kh
    v_head = V + b * stride_vb + kvh * stride_vh
    mask_row = Mask + b * Nk
    seg_bias_row = SegBias + bh * G

    if HAS_SEG_BIAS or STORE_SEG:
        offs_g = tl.arange(0, G_PAD)
        # s_1..s_G as int32 (Nk < 2^31); padding lanes never count
        bounds = tl.load(Segments + 1 + offs_g, mask=offs_g < G, other=2147483647).to(tl.int32)
    else:
        bounds = tl.zeros([G_PAD], dtype=tl.int32)

    qk_scale = qk_scale2
    if HAS_LOGIT_SCALE:
        qk_scale = qk_scale * tl.load(LogitScale + bh)

    acc = tl.zeros([BLOCK_M, DV_PAD], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    t_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    seg_acc = tl.zeros([BLOCK_M, G_PAD], dtype=tl.float32)  # masses of ended segments, relative to m_snap
    l_seg = tl.zeros([BLOCK_M], dtype=tl.float32)             # mass of the current segment, relative to m
    m_snap = tl.zeros([BLOCK_M], dtype=tl.float32)
    seg_cur = tl.zeros([], dtype=tl.int32)  # segment of the current block's first key ...
    seg_end = seg_cur + Nk                   # ... and where that segment ends
    if HAS_SEG_BIAS or STORE_SEG:
        seg_end = tl.load(Segments + 1).to(tl.int32)

    n_full = (Nk // BLOCK_N) * BLOCK_N
    n_end = Nk
    if SKIP_PATCHED:
        # A patched head whose statistics nobody asked for needs no attention at all (cached heads).
        patched = tl.load(PatchMask + bh) != 0
        n_full = tl.where(patched, 0, n_full)
        n_end = tl.where(patched, 0, n_end)

    for start_n in range(0, n_full, BLOCK_N):
        acc, l_i, m_i, t_i, seg_acc, l_seg, m_snap, seg_cur, seg_end = _fwd_key_block(
            acc, l_i, m_i, t_i, seg_acc, l_seg, m_snap, seg_cur, seg_end, q, k_head, v_head, mask_row, seg_bias_row, Segments, bounds,
            start_n, Nk, D, DV, G, qk_scale, stride_kn, stride_kd, stride_vn, stride_vd,
            BLOCK_N, D_PAD, DV_PAD, G_PAD, HAS_MASK, HAS_SEG_BIAS, STORE_ENT, STORE_SEG,
            False, EVEN_D, EVEN_DV, DOT_PRECISION,
        )
    for start_n in range(n_full, n_end, BLOCK_N):  # the ragged last block, if any
        acc, l_i, m_i, t_i, seg_acc, l_seg, m_snap, seg_cur, seg_end = _fwd_key_block(
            acc, l_i, m_i, t_i, seg_acc, l_seg, m_snap, seg_cur, seg_end, q, k_head, v_head, mask_row, seg_bias_row, Segments, bounds,
            start_n, Nk, D, DV, G, qk_scale, stride_kn, stride_kd, stride_vn, stride_vd,
            BLOCK_N, D_PAD, DV_PAD, G_PAD, HAS_MASK, HAS_SEG_BIAS, STORE_ENT, STORE_SEG,
            True, EVEN_D, EVEN_DV, DOT_PRECISION,
        )

    alive = l_i > 0.0
    l_safe = tl.where(alive, l_i, 1.0)
    o = acc / l_safe[:, None]
    dv_ok = offs_dv < DV
    if HAS_PATCH:
        patched_row = tl.load(PatchMask + bh) != 0
        patch_ptrs = (Patch + b * stride_pb + h * stride_ph
                      + offs_m[:, None] * stride_pm + offs_dv[None, :] * stride_pd)
        patch = tl.load(patch_ptrs, mask=rows_ok[:, None] & dv_ok[None, :] & patched_row, other=0.0)
        o = tl.where(patched_row, patch.to(tl.float32), o)
    if HAS_GATE:
        o = o * tl.load(HeadGate + bh)
    if HAS_OUT_BIAS:
        o = o + tl.load(OutBias + bh * DV + offs_dv, mask=dv_ok, other=0.0)[None, :]
    out_ptrs = Out + (bh * Nq + offs_m[:, None]) * DV + offs_dv[None, :]
    tl.store(out_ptrs, o.to(Out.dtype.element_ty), mask=rows_ok[:, None] & dv_ok[None, :])

    row_index = bh * Nq + offs_m
    log2_l = tl.log2(l_safe)
    if STORE_LSE:
        tl.store(Lse + row_index, tl.where(alive, (m_i + log2_l) * LN2, float("-inf")),
                 mask=rows_ok)
    if STORE_MAX:
        tl.store(Max + row_index, m_i * LN2, mask=rows_ok)
    if STORE_ENT:
        tl.store(Entropy + row_index, tl.where(alive, (log2_l - t_i / l_safe) * LN2, 0.0),
                 mask=rows_ok)
    if STORE_SEG:
        offs_g = tl.arange(0, G_PAD)
        seg_ptrs = SegMass + row_index[:, None] * G + offs_g[None, :]
        # Every segment ended by the last key block, so seg_acc holds them all (relative to m_snap).
        m_final = tl.where(m_i == float("-inf"), 0.0, m_i)
        scale = tl.math.exp2(tl.minimum(m_snap - m_final, 0.0)) / l_safe
        tl.store(seg_ptrs, seg_acc * scale[:, None], mask=rows_ok[:, None] & (offs_g[None, :] < G))


@triton.jit
def latentflow_probed_attn_key_mass(
    Q, K, Lse, KeyMass,
    Mask, Segments, LogitScale, SegBias,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    H, GROUP, Nq, Nk, D, G, num_n_blocks, qk_scale2,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, D_PAD: tl.constexpr, G_PAD: tl.constexpr,
    EVEN_D: tl.constexpr, HAS_MASK: tl.constexpr, HAS_LOGIT_SCALE: tl.constexpr, HAS_SEG_BIAS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """key_mass[b, h, j] = sum_i 2^(s_ij - lse_i): keys on the rows of the tile, queries in a fixed order."""
    pid = tl.program_id(0)
    pid_n = pid % num_n_blocks
    bh = (pid // num_n_blocks).to(tl.int64)
    b = bh // H
    h = bh % H
    kvh = h // GROUP
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    keys_ok = offs_n < Nk

    k_ptrs = K + b * stride_kb + kvh * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd
    k = _load_tile(k_ptrs, keys_ok, offs_d < D, True, not EVEN_D)

    if HAS_SEG_BIAS:
        offs_g = tl.arange(0, G_PAD)
        bounds = tl.load(Segments + 1 + offs_g, mask=offs_g < G, other=2147483647).to(tl.int32)
    else:
        bounds = tl.zeros([G_PAD], dtype=tl.int32)
    qk_scale = qk_scale2
    if HAS_LOGIT_SCALE:
        qk_scale = qk_scale * tl.load(LogitScale + bh)
    # The per-key terms are the same for every query block: compute them once as a [BLOCK_N, 1] column.
    bias = tl.zeros([BLOCK_N], dtype=tl.float32)
    if HAS_SEG_BIAS:
        bias = _segment_bias(offs_n, G, SegBias + bh * G, bounds)
    key_terms = _key_logit_terms(tl.zeros([BLOCK_N, 1], dtype=tl.float32), offs_n, Nk, Mask + b * Nk, bias,
                                 HAS_MASK, HAS_SEG_BIAS, True, True)

    # Keys that are all masked or knocked out (padding) receive no mass: skip their query loop.
    q_end = tl.where(tl.max(key_terms) > float("-inf"), Nq, 0)

    q_head = Q + b * stride_qb + h * stride_qh
    mass = tl.zeros([BLOCK_N], dtype=tl.float32)
    for start_m in range(0, q_end, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        rows_ok = offs_m < Nq
        qt_ptrs = q_head + offs_d[:, None] * stride_qd + offs_m[None, :] * stride_qm
        qt = _load_tile(qt_ptrs, offs_d < D, rows_ok, not EVEN_D, True)
        s = tl.dot(k, qt, input_precision=DOT_PRECISION) * qk_scale + key_terms  # [BLOCK_N, BLOCK_M]
        lse = tl.load(Lse + bh * Nq + offs_m, mask=rows_ok, other=float("-inf")) * LOG2E
        live = lse > float("-inf")
        p = tl.math.exp2(s - tl.where(live, lse, 0.0)[None, :])
        mass += tl.sum(tl.where(live[None, :], p, 0.0), axis=1)
    tl.store(KeyMass + bh * Nk + offs_n, mass, mask=keys_ok)
