"""Triton kernels for probed attention (docs/design.md, the operator contract).

Two kernels with stable names (for `ncu --kernel-name` filters):

* `latentflow_probed_attn_fwd`: one program per (query block, batch row x head). Online softmax over key
  blocks (flash-attention style, log2 domain), plus, each behind a constexpr flag so that an inactive
  feature compiles away: logit_scale, segment_bias, key-padding mask, head_gate, out_bias, out_patch and
  the captures lse, max, entropy, segment_mass.
* `latentflow_probed_attn_key_mass`: the deterministic second pass for key_mass. One program per
  (key block, batch row x head); it recomputes q.k for every query block in a fixed order with the
  final lse of the forward pass and sums p over queries. No atomics, so the bits never depend on
  scheduling.

Hot loop of the forward, per key block (log2 units):
  s   = q.k * qk_scale + key_bias[j]        one FMA per element. key_bias folds the segment bias, the
                                            padding mask and keys past Nk into one [BLOCK_N] vector;
                                            a masked key gets MASKED = -2^120 (finite, see below)
  m'  = max(m, max_j s),  p = 2^(s - m'),  alpha = 2^(m - m')
  l   = alpha l + sum_j p
  t   = alpha (t + (m - m') l) + sum_j p (s - m')     entropy numerator, relative to m (no cancellation):
                                            one FMA per element, since p (s - m') is 0 * finite = 0
                                            for a masked key (never 0 * -inf = NaN)
  acc = alpha acc + p V
Because MASKED is finite, m starts at MASKED and every exponent is finite: a row that has seen only
masked keys has m = MASKED and p = 1 for them, and the first live key resets l, t and acc through
alpha = 2^(MASKED - m') = 0. A row whose final m is MASKED had no live key: the epilogue gives it the
contract's p = 0 (out = gate * 0 + bias or the patch, lse = max = -inf, entropy = 0, segment_mass = 0).
A finite segment bias down to about -9e35 still behaves as a number (only -inf knocks a segment out), and
(m - m') l is clamped to -2^64 * l before it could overflow.

segment_mass keeps only the open segment's normaliser in registers (one [BLOCK_M] vector, rescaled
like l). When a segment ends, its absolute log2-mass log2(mass) + m is written to the segment_mass
output; the epilogue turns every entry into 2^(logmass - lse2) (lse2 in log2 units). So the registers
and shared memory do not depend on G, and any G works (G = Nk included). A key block that straddles
segment boundaries finds each key's segment by a binary search among the at most BLOCK_N segments it can
touch, and sums p per segment exactly with a one-hot float32 product ([BLOCK_M, BLOCK_N] x
[BLOCK_N, BLOCK_N]); a block inside one segment (nearly all of them when G << Nk) costs one add per row.

Offsets: a row offset start * stride can pass 2^31 (N ~ 350k with packed-QKV strides), so every tile's
base is computed by `_row_offset`, in 64-bit when the launcher sees an element offset >= 2^31 (WIDE),
else in 32-bit; offsets inside a tile stay 32-bit (the launcher copies a tensor whose in-tile span would
not fit).

A patched head (out_patch + patch_mask) whose statistics nobody asked for skips its key loop entirely.

Query-dependent masks: IS_CAUSAL (query i sees keys j <= i + causal_offset) cuts the key loop at the
query block's diagonal -- blocks past it are never loaded -- and masks the diagonal block per element;
HAS_QMASK loads the [BLOCK_M, BLOCK_N] tile of attn_mask ([Bm, Hm, Nq, Nk], batch / head strides 0 when
broadcast) with every key block: bool (uint8) masks set MASKED, float masks (QMASK_FLOAT) add
mask * log2(e), clamped at MASKED so that -inf stays finite. Because the causal cut can leave segments
unvisited, their log-masses are written as -inf after the loop (the open one gets its partial mass).

USE_TMA (sm_90+, chosen by the launcher's tile table when the layout meets TMA's rules) loads the K and V
tiles through tensor descriptors (TMA) instead of pointer tiles; everything else is the same kernel.

Head dims that are not a power of two are padded to the next one (at least 16, tl.dot's minimum)
with masked loads (EVEN_D / EVEN_DV flags drop the masks when no padding is needed).
"""

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
MASKED = tl.constexpr(-1.329227995784916e36)  # -2^120: logit of a masked key, log2 units (finite)
FAR = tl.constexpr(-18446744073709551616.0)    # -2^64: any shift of the running max beyond this gives alpha = 0


@triton.jit
def _row_offset(start, stride, WIDE: tl.constexpr):
    """start * stride, the element offset of row `start`: in 64-bit when WIDE (2^31 is passed at N ~ 350k
    when the rows are packed QKV, stride 3 * H * D); in 32-bit otherwise (the launcher sets WIDE when some
    element offset of an input reaches 2^31), which saves 64-bit arithmetic in the hot loop."""
    if WIDE:
        return tl.cast(start, tl.int64) * stride
    else:
        return start * stride


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
def _segment_search(keys, Segments, lo0, hi0, steps):
    """seg(j) for each key j of `keys`, known to lie in segments [lo0, hi0]: the largest g in that range
    with s_g <= j, by a vectorised binary search (`steps` >= ceil(log2(hi0 - lo0 + 1)) halvings)."""
    lo = tl.zeros_like(keys) + lo0
    hi = tl.zeros_like(keys) + hi0
    for _ in range(steps):
        mid = (lo + hi + 1) // 2
        below = tl.load(Segments + mid) <= keys
        lo = tl.where(below, mid, lo)
        hi = tl.where(below, hi, mid - 1)
    return lo


@triton.jit
def _fwd_key_block(
    acc, l_i, m_i, t_i, l_seg, seg_cur, seg_end,
    q, k_head, v_head, desc_k, desc_v, mask_row, seg_bias_row, Segments, SegMass, row_index, rows_ok,
    start_n, Nk, D, DV, G, qk_scale,
    stride_kn, stride_kd, stride_vn, stride_vd,
    qmask_head, offs_m, causal_offset,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, LOG_BLOCK_N: tl.constexpr,
    D_PAD: tl.constexpr, DV_PAD: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_SEG_BIAS: tl.constexpr, STORE_ENT: tl.constexpr, STORE_SEG: tl.constexpr,
    MASK_KEYS: tl.constexpr, EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr, DOT_PRECISION: tl.constexpr,
    WIDE: tl.constexpr, USE_TMA: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_QMASK: tl.constexpr, QMASK_FLOAT: tl.constexpr,
):
    """Fold keys [start_n, start_n + BLOCK_N) into the running softmax state of a query block.

    seg_cur is the segment of key start_n and seg_end its end (scalars carried from block to block), so a
    block inside one segment -- nearly all of them when segments are long -- needs no per-key lookup.
    """
    offs_nb = tl.arange(0, BLOCK_N)
    offs_n = start_n + offs_nb
    offs_d = tl.arange(0, D_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    keys_ok = offs_n < Nk
    block_end = tl.minimum(start_n + BLOCK_N, Nk)
    in_one_segment = block_end <= seg_end

    # K^T tile [D_PAD, BLOCK_N]: a TMA box (rows past Nk and columns past D arrive as zeros), or pointer
    # loads with the tile's base row in 64-bit when WIDE and offsets inside the tile in 32-bit.
    if USE_TMA:
        kt = tl.trans(desc_k.load([start_n, 0]))
    else:
        k_blk = k_head + _row_offset(start_n, stride_kn, WIDE)
        kt_ptrs = k_blk + offs_d[:, None] * stride_kd + offs_nb[None, :] * stride_kn
        kt = _load_tile(kt_ptrs, offs_d < D, keys_ok, not EVEN_D, MASK_KEYS)

    # Per-key logit terms as one [BLOCK_N] bias vector (segment bias, mask, keys past Nk).
    if HAS_SEG_BIAS or STORE_SEG:
        if in_one_segment:
            seg_of_key = tl.zeros([BLOCK_N], dtype=tl.int32) + seg_cur
        else:
            # At most BLOCK_N - 1 segments begin inside the block: search only those.
            seg_of_key = _segment_search(offs_n, Segments, seg_cur, tl.minimum(seg_cur + BLOCK_N - 1, G - 1),
                                         LOG_BLOCK_N)
    key_bias = tl.zeros([BLOCK_N], dtype=tl.float32)
    if HAS_SEG_BIAS:
        key_bias = tl.maximum(tl.load(seg_bias_row + seg_of_key) * LOG2E, MASKED)  # -inf (knock-out) -> MASKED
    if HAS_MASK:
        if MASK_KEYS:
            keep = tl.load(mask_row + offs_n, mask=keys_ok, other=0) != 0
        else:
            keep = tl.load(mask_row + offs_n) != 0
        key_bias = tl.where(keep, key_bias, MASKED)
    elif MASK_KEYS:
        key_bias = tl.where(keys_ok, key_bias, MASKED)

    qk = tl.dot(q, kt, input_precision=DOT_PRECISION)
    if HAS_SEG_BIAS or HAS_MASK or MASK_KEYS:
        s = qk * qk_scale + key_bias[None, :]
    else:
        s = qk * qk_scale
    if HAS_QMASK:  # the attn_mask tile of these queries and keys (64-bit offsets: Nq * Nk may pass 2^31)
        qm_ptrs = qmask_head + offs_m.to(tl.int64)[:, None] * Nk + offs_n[None, :]
        qm = tl.load(qm_ptrs, mask=rows_ok[:, None] & keys_ok[None, :], other=0)
        if QMASK_FLOAT:
            s = tl.maximum(s + qm * LOG2E, MASKED)
        else:
            s = tl.where(qm != 0, s, MASKED)
    if IS_CAUSAL:
        s = tl.where(offs_n[None, :] <= offs_m[:, None] + causal_offset, s, MASKED)

    # Online softmax; every exponent is finite (MASKED is a finite number).
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.math.exp2(m_i - m_new)
    shifted = s - m_new[:, None]
    p = tl.math.exp2(shifted)
    p_sum = tl.sum(p, axis=1)
    if STORE_ENT:
        # (m - m') l, clamped so that a row leaving MASKED (l up to Nk) cannot overflow; alpha is 0 there.
        t_i = alpha * (t_i + tl.maximum(m_i - m_new, FAR) * l_i) + tl.sum(p * shifted, axis=1)
    l_i = l_i * alpha + p_sum

    if USE_TMA:
        v = desc_v.load([start_n, 0])
    else:
        v_blk = v_head + _row_offset(start_n, stride_vn, WIDE)
        v_ptrs = v_blk + offs_nb[:, None] * stride_vn + offs_dv[None, :] * stride_vd
        v = _load_tile(v_ptrs, keys_ok, offs_dv < DV, MASK_KEYS, not EVEN_DV)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)

    if HAS_SEG_BIAS or STORE_SEG:
        if in_one_segment:
            if STORE_SEG:
                l_seg = l_seg * alpha + p_sum
            if seg_end <= start_n + BLOCK_N:  # the segment ends with this block: write its log-mass
                if STORE_SEG:
                    log_mass = tl.where(l_seg > 0.0, tl.log2(tl.where(l_seg > 0.0, l_seg, 1.0)) + m_new,
                                        float("-inf"))
                    tl.store(SegMass + row_index * G + seg_cur, log_mass, mask=rows_ok)
                    l_seg = l_seg * 0.0
                seg_cur = seg_cur + 1
                seg_end = tl.load(Segments + 1 + tl.minimum(seg_cur, G - 1)).to(tl.int32)
        else:
            local = seg_of_key - seg_cur  # [BLOCK_N], local segment index in [0, BLOCK_N)
            n_local = tl.max(tl.where(keys_ok, local, 0)) + 1
            seg_last = seg_cur + n_local - 1
            last_ends = tl.load(Segments + 1 + seg_last) <= start_n + BLOCK_N
            if STORE_SEG:
                # Segments present in the block, in key order: exact float32 row sums of p, one masked sum
                # per segment (registers stay [BLOCK_M] vectors, whatever G is); every segment but
                # possibly the last ends here and gets its log2-mass written.
                n_ended = n_local - 1 + last_ends.to(tl.int32)
                carried = l_seg * alpha
                for c in range(0, n_local):
                    part = tl.sum(tl.where(local[None, :] == c, p, 0.0), axis=1)
                    if c == 0:
                        part += carried
                    if c < n_ended:
                        log_mass = tl.where(part > 0.0, tl.log2(tl.where(part > 0.0, part, 1.0)) + m_new,
                                            float("-inf"))
                        tl.store(SegMass + row_index * G + seg_cur + c, log_mass, mask=rows_ok)
                    else:
                        l_seg = part
                l_seg = tl.where(last_ends, 0.0, l_seg)
            seg_cur = seg_last + last_ends.to(tl.int32)
            seg_end = tl.load(Segments + 1 + tl.minimum(seg_cur, G - 1)).to(tl.int32)
    return acc, l_i, m_new, t_i, l_seg, seg_cur, seg_end


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
    QMask, stride_qmask_b, stride_qmask_h, causal_offset,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, LOG_BLOCK_N: tl.constexpr,
    D_PAD: tl.constexpr, DV_PAD: tl.constexpr, EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_LOGIT_SCALE: tl.constexpr, HAS_SEG_BIAS: tl.constexpr,
    HAS_GATE: tl.constexpr, HAS_OUT_BIAS: tl.constexpr, HAS_PATCH: tl.constexpr,
    STORE_LSE: tl.constexpr, STORE_MAX: tl.constexpr, STORE_ENT: tl.constexpr, STORE_SEG: tl.constexpr,
    SKIP_PATCHED: tl.constexpr, DOT_PRECISION: tl.constexpr, WIDE: tl.constexpr, USE_TMA: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_QMASK: tl.constexpr, QMASK_FLOAT: tl.constexpr,
):
    # 1-D grid, query blocks of one head adjacent (K/V reuse in L2; no 65535 limit on B*H).
    pid = tl.program_id(0)
    pid_m = pid % num_m_blocks
    bh = (pid // num_m_blocks).to(tl.int64)
    b = bh // H
    h = bh % H
    kvh = h // GROUP
    offs_mb = tl.arange(0, BLOCK_M)
    offs_m = pid_m * BLOCK_M + offs_mb
    offs_d = tl.arange(0, D_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    rows_ok = offs_m < Nq
    row_index = bh * Nq + offs_m  # int64

    q_blk = Q + b * stride_qb + h * stride_qh + _row_offset(pid_m * BLOCK_M, stride_qm, WIDE)
    q_ptrs = q_blk + offs_mb[:, None] * stride_qm + offs_d[None, :] * stride_qd
    q = _load_tile(q_ptrs, rows_ok, offs_d < D, True, not EVEN_D)
    k_head = K + b * stride_kb + kvh * stride_kh
    v_head = V + b * stride_vb + kvh * stride_vh
    if USE_TMA:
        # Hopper: K/V tiles through the tensor memory accelerator (descriptors of this (b, kv head)'s
        # [Nk, D] / [Nk, Dv] matrices; the launcher checks TMA's alignment rules before choosing this).
        desc_k = tl.make_tensor_descriptor(k_head, shape=[Nk, D], strides=[stride_kn, 1], block_shape=[BLOCK_N, D_PAD])
        desc_v = tl.make_tensor_descriptor(v_head, shape=[Nk, DV], strides=[stride_vn, 1],
                                           block_shape=[BLOCK_N, DV_PAD])
    else:
        desc_k = k_head
        desc_v = v_head
    mask_row = Mask + b * Nk
    seg_bias_row = SegBias + bh * G

    qk_scale = qk_scale2
    if HAS_LOGIT_SCALE:
        qk_scale = qk_scale * tl.load(LogitScale + bh)

    acc = tl.zeros([BLOCK_M, DV_PAD], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) + MASKED
    t_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    l_seg = tl.zeros([BLOCK_M], dtype=tl.float32)  # mass of the open segment, relative to m
    seg_cur = tl.zeros([], dtype=tl.int32)          # segment of the current block's first key ...
    seg_end = seg_cur + Nk                           # ... and where that segment ends
    if HAS_SEG_BIAS or STORE_SEG:
        seg_end = tl.load(Segments + 1).to(tl.int32)

    qmask_head = QMask + b * stride_qmask_b + h * stride_qmask_h
    n_end = Nk
    if IS_CAUSAL:
        # Keys past the diagonal of the block's last query are never loaded (causal costs about half).
        last_row = tl.minimum(pid_m * BLOCK_M + BLOCK_M - 1, Nq - 1)
        n_end = tl.maximum(tl.minimum(last_row + causal_offset + 1, Nk), 0)
    n_full = (n_end // BLOCK_N) * BLOCK_N
    if SKIP_PATCHED:
        # A patched head whose statistics nobody asked for needs no attention at all (cached heads).
        patched = tl.load(PatchMask + bh) != 0
        n_full = tl.where(patched, 0, n_full)
        n_end = tl.where(patched, 0, n_end)

    for start_n in range(0, n_full, BLOCK_N):
        acc, l_i, m_i, t_i, l_seg, seg_cur, seg_end = _fwd_key_block(
            acc, l_i, m_i, t_i, l_seg, seg_cur, seg_end,
            q, k_head, v_head, desc_k, desc_v, mask_row, seg_bias_row, Segments, SegMass, row_index, rows_ok,
            start_n, Nk, D, DV, G, qk_scale, stride_kn, stride_kd, stride_vn, stride_vd,
            qmask_head, offs_m, causal_offset,
            BLOCK_M, BLOCK_N, LOG_BLOCK_N, D_PAD, DV_PAD, HAS_MASK, HAS_SEG_BIAS, STORE_ENT, STORE_SEG,
            False, EVEN_D, EVEN_DV, DOT_PRECISION, WIDE, USE_TMA, IS_CAUSAL, HAS_QMASK, QMASK_FLOAT,
        )
    for start_n in range(n_full, n_end, BLOCK_N):  # the ragged last block, if any
        acc, l_i, m_i, t_i, l_seg, seg_cur, seg_end = _fwd_key_block(
            acc, l_i, m_i, t_i, l_seg, seg_cur, seg_end,
            q, k_head, v_head, desc_k, desc_v, mask_row, seg_bias_row, Segments, SegMass, row_index, rows_ok,
            start_n, Nk, D, DV, G, qk_scale, stride_kn, stride_kd, stride_vn, stride_vd,
            qmask_head, offs_m, causal_offset,
            BLOCK_M, BLOCK_N, LOG_BLOCK_N, D_PAD, DV_PAD, HAS_MASK, HAS_SEG_BIAS, STORE_ENT, STORE_SEG,
            True, EVEN_D, EVEN_DV, DOT_PRECISION, WIDE, USE_TMA, IS_CAUSAL, HAS_QMASK, QMASK_FLOAT,
        )
    if IS_CAUSAL and STORE_SEG:
        # The loop may stop before the last segment ends: the open segment gets its mass so far, the
        # segments never reached get -inf (mass 0). A loop that reached Nk closed every segment (seg_cur = G).
        for g0 in range(seg_cur, G, BLOCK_N):
            cols = g0 + tl.arange(0, BLOCK_N)
            open_mass = tl.where(l_seg > 0.0, tl.log2(tl.where(l_seg > 0.0, l_seg, 1.0)) + m_i, float("-inf"))
            log_mass = tl.where(cols[None, :] == seg_cur, open_mass[:, None], float("-inf"))
            tl.store(SegMass + row_index[:, None] * G + cols[None, :], log_mass,
                     mask=rows_ok[:, None] & (cols[None, :] < G))

    alive = m_i > MASKED * 0.5  # some key of the row was live
    l_safe = tl.where(alive, l_i, 1.0)
    o = tl.where(alive[:, None], acc / l_safe[:, None], 0.0)
    dv_ok = offs_dv < DV
    if HAS_PATCH:
        patched_row = tl.load(PatchMask + bh) != 0
        patch_blk = Patch + b * stride_pb + h * stride_ph + _row_offset(pid_m * BLOCK_M, stride_pm, WIDE)
        patch_ptrs = patch_blk + offs_mb[:, None] * stride_pm + offs_dv[None, :] * stride_pd
        patch = tl.load(patch_ptrs, mask=rows_ok[:, None] & dv_ok[None, :] & patched_row, other=0.0)
        o = tl.where(patched_row, patch.to(tl.float32), o)
    if HAS_GATE:
        o = o * tl.load(HeadGate + bh)
    if HAS_OUT_BIAS:
        o = o + tl.load(OutBias + bh * DV + offs_dv, mask=dv_ok, other=0.0)[None, :]
    out_ptrs = Out + row_index[:, None] * DV + offs_dv[None, :]
    tl.store(out_ptrs, o.to(Out.dtype.element_ty), mask=rows_ok[:, None] & dv_ok[None, :])

    log2_l = tl.log2(l_safe)
    if STORE_LSE:
        tl.store(Lse + row_index, tl.where(alive, (m_i + log2_l) * LN2, float("-inf")), mask=rows_ok)
    if STORE_MAX:
        tl.store(Max + row_index, tl.where(alive, m_i * LN2, float("-inf")), mask=rows_ok)
    if STORE_ENT:
        tl.store(Entropy + row_index, tl.where(alive, (log2_l - t_i / l_safe) * LN2, 0.0), mask=rows_ok)
    if STORE_SEG:
        # Every segment ended by the last key block, so SegMass holds every log2-mass of these rows; other
        # threads of this program wrote some of them: the barrier makes those writes visible.
        tl.debug_barrier()
        lse2 = tl.where(alive, m_i + log2_l, float("inf"))  # dead rows: 2^(x - inf) = 0
        for g0 in range(0, G, BLOCK_N):
            cols = g0 + tl.arange(0, BLOCK_N)
            seg_ptrs = SegMass + row_index[:, None] * G + cols[None, :]
            seg_ok = rows_ok[:, None] & (cols[None, :] < G)
            log_mass = tl.load(seg_ptrs, mask=seg_ok, other=float("-inf"))
            tl.store(seg_ptrs, tl.math.exp2(log_mass - lse2[:, None]), mask=seg_ok)


@triton.jit
def latentflow_probed_attn_key_mass(
    Q, K, Lse, KeyMass,
    Mask, Segments, LogitScale, SegBias,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    H, GROUP, Nq, Nk, D, G, seg_steps, num_n_blocks, qk_scale2,
    QMask, stride_qmask_b, stride_qmask_h, causal_offset,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, D_PAD: tl.constexpr,
    EVEN_D: tl.constexpr, HAS_MASK: tl.constexpr, HAS_LOGIT_SCALE: tl.constexpr, HAS_SEG_BIAS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, WIDE: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_QMASK: tl.constexpr, QMASK_FLOAT: tl.constexpr,
):
    """key_mass[b, h, j] = sum_i 2^(s_ij - lse2_i): keys on the rows of the tile, queries in a fixed order."""
    pid = tl.program_id(0)
    pid_n = pid % num_n_blocks
    bh = (pid // num_n_blocks).to(tl.int64)
    b = bh // H
    h = bh % H
    kvh = h // GROUP
    offs_nb = tl.arange(0, BLOCK_N)
    offs_n = pid_n * BLOCK_N + offs_nb
    offs_mb = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    keys_ok = offs_n < Nk

    k_blk = K + b * stride_kb + kvh * stride_kh + _row_offset(pid_n * BLOCK_N, stride_kn, WIDE)
    k = _load_tile(k_blk + offs_nb[:, None] * stride_kn + offs_d[None, :] * stride_kd, keys_ok, offs_d < D,
                   True, not EVEN_D)

    qk_scale = qk_scale2
    if HAS_LOGIT_SCALE:
        qk_scale = qk_scale * tl.load(LogitScale + bh)
    # The per-key terms are the same for every query block: one [BLOCK_N] column, -inf for dead keys.
    key_terms = tl.zeros([BLOCK_N], dtype=tl.float32)
    if HAS_SEG_BIAS:
        seg_of_key = _segment_search(tl.minimum(offs_n, Nk - 1), Segments, 0, G - 1, seg_steps)
        key_terms = tl.load(SegBias + bh * G + seg_of_key) * LOG2E
    if HAS_MASK:
        keep = tl.load(Mask + b * Nk + offs_n, mask=keys_ok, other=0) != 0
        key_terms = tl.where(keep, key_terms, float("-inf"))
    else:
        key_terms = tl.where(keys_ok, key_terms, float("-inf"))

    # Keys that are all masked or knocked out (padding) receive no mass: skip their query loop.
    q_end = tl.where(tl.max(key_terms) > float("-inf"), Nq, 0)

    q_start = 0
    if IS_CAUSAL:
        # Queries i < k0 - causal_offset see no key of this block: start at the block holding the first
        # query that does (a multiple of BLOCK_M, so the summation order of the rest is unchanged).
        q_start = tl.maximum(pid_n * BLOCK_N - causal_offset, 0) // BLOCK_M * BLOCK_M
    qmask_head = QMask + b * stride_qmask_b + h * stride_qmask_h

    q_head = Q + b * stride_qb + h * stride_qh
    mass = tl.zeros([BLOCK_N], dtype=tl.float32)
    for start_m in range(q_start, q_end, BLOCK_M):
        rows_ok = start_m + offs_mb < Nq
        qt_ptrs = q_head + _row_offset(start_m, stride_qm, WIDE) + offs_d[:, None] * stride_qd + offs_mb[None, :] * stride_qm
        qt = _load_tile(qt_ptrs, offs_d < D, rows_ok, not EVEN_D, True)
        s = tl.dot(k, qt, input_precision=DOT_PRECISION) * qk_scale + key_terms[:, None]  # [BLOCK_N, BLOCK_M]
        offs_m = start_m + offs_mb
        if HAS_QMASK:  # the attn_mask tile, transposed: keys on the rows
            qm_ptrs = qmask_head + offs_m.to(tl.int64)[None, :] * Nk + offs_n[:, None]
            qm = tl.load(qm_ptrs, mask=keys_ok[:, None] & rows_ok[None, :], other=0)
            if QMASK_FLOAT:
                s = s + qm * LOG2E
            else:
                s = tl.where(qm != 0, s, float("-inf"))
        if IS_CAUSAL:
            s = tl.where(offs_n[:, None] <= offs_m[None, :] + causal_offset, s, float("-inf"))
        lse = tl.load(Lse + bh * Nq + start_m + offs_mb, mask=rows_ok, other=float("-inf"))
        lse2 = tl.where(lse > float("-inf"), lse * LOG2E, float("inf"))  # dead or padded rows: p = 0
        mass += tl.sum(tl.math.exp2(s - lse2[None, :]), axis=1)
    tl.store(KeyMass + bh * Nk + offs_n, mass, mask=keys_ok)
