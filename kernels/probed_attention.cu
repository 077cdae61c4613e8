// CUDA forward kernel of probed attention (docs/design.md, the operator contract), FlashAttention-2 style:
// one CTA = 4 warps = 64 * kM query rows of one (b, h); each warp owns kM sub-tiles of 16 rows and
// streams the keys in tiles of kKeys = 64 or 32 (cp.async double buffer), S = Q K^T and O += P V on
// mma.sync.m16n8k16 tensor cores (every K/V fragment read from shared memory feeds kM MMAs), an online
// softmax in float32, and the captures carried online beside it:
//   lse, max        from the running max m and normaliser l;
//   entropy         U = sum_j e^{s_j - m} (s_j - m), rescaled like l; H = log l - U / l;
//   segment_mass    the open segment's normaliser, rescaled like l; when a segment ends inside a tile its
//                   log-mass log(sum) + m is written to the output, and the epilogue turns every entry
//                   into exp(logmass - lse) (each entry is written and rewritten by the same thread).
// Interventions: logit_scale folds into the per-row logit multiplier, segment_bias and the padding mask
// into a per-key bias, and patch / gate / out_bias are applied in the epilogue.
// Query-dependent masks: causal cuts the key loop at the CTA's diagonal (tiles past the last row's
// diagonal are never loaded) and masks per element; attn_mask is read per element from global memory.
// Segments the cut loop never closes get their log-mass in the epilogue (the open one its partial mass).
// No atomics; every reduction has a fixed order, and a CTA reads only its own (b, h) row, so results are
// deterministic and batch invariant.
#ifndef LATENTFLOW_EMULATE
#include <cuda_runtime.h>
#endif

#include <stdexcept>
#include <string>

#include "probed_attention.cuh"
#include "probed_attention_device.cuh"

namespace latentflow {
namespace device {

template <int D, int kM, int kKeys>
constexpr int forward_smem_bytes() {
  // Q tile + 2 K tiles + 2 V tiles (16-bit, padded rows) + per-key bias and segment of the current tile.
  return (16 * kWarps * kM + 4 * kKeys) * (D + kPad) * 2 + kKeys * (4 + 4);
}

// kMasks: the instance that handles causal / attn_mask (a separate instance, so that the common unmasked
// call keeps the register allocation and loop of the kernel without them).
template <typename T, int D, int kM, int kKeys, bool kMasks>
__global__ void __launch_bounds__(kThreads)
    latentflow_probed_attn_fwd_cuda(const ProbedAttentionArgs args) {
  constexpr int kRows = 16 * kWarps * kM;  // query rows per CTA
  constexpr int kPitch = D + kPad;
  constexpr int kTileElems = kKeys * kPitch;
  constexpr int kNTiles = kKeys / 8;  // 8-key MMA tiles of S per 16-row sub-tile
  static_assert(kKeys % 16 == 0 && kKeys <= kThreads, "key tile: whole 16-key MMA chunks, one bias per thread");
  constexpr int kOTiles = D / 8;        // 8-column MMA tiles of O per 16-row sub-tile
  static_assert(kOTiles % 2 == 0, "V fragments are loaded two n-tiles at a time");
  // Q fragments stay in registers when they fit beside the accumulators, else they are re-read from
  // shared memory every key tile (the FlashAttention-2 choice at D = 128).
  constexpr bool kQInRegisters = kM * D <= 128;

  LATENTFLOW_DYNAMIC_SMEM(smem_raw);
  uint16_t* q_s = reinterpret_cast<uint16_t*>(smem_raw);
  uint16_t* k_s = q_s + kRows * kPitch;  // [2][kKeys][kPitch]
  uint16_t* v_s = k_s + 2 * kTileElems;  // [2][kKeys][kPitch]
  float* bias_s = reinterpret_cast<float*>(v_s + 2 * kTileElems);
  int* seg_s = reinterpret_cast<int*>(bias_s + kKeys);

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int g = lane >> 2, t4 = lane & 3;
  const int b = blockIdx.z, h = blockIdx.y;
  const int Nq = args.num_queries, Nk = args.num_keys, G = args.num_segments;
  const int q0 = blockIdx.x * kRows;
  const int warp_row0 = warp * 16 * kM;  // first row of the warp's sub-tiles within the CTA's rows
  const int hk = h / (args.heads / args.kv_heads);
  const int64_t bh = static_cast<int64_t>(b) * args.heads + h;

  const uint16_t* q_g = static_cast<const uint16_t*>(args.q) + b * args.q_stride[0] + h * args.q_stride[1] +
                        q0 * args.q_stride[2];
  const uint16_t* k_g = static_cast<const uint16_t*>(args.k) + b * args.k_stride[0] + hk * args.k_stride[1];
  const uint16_t* v_g = static_cast<const uint16_t*>(args.v) + b * args.v_stride[0] + hk * args.v_stride[1];
  const float logit_mult = args.scale * (args.logit_scale != nullptr ? args.logit_scale[bh] : 1.0f);
  const bool want_entropy = args.entropy != nullptr;
  const bool want_segments = args.segment_mass != nullptr;
  // Causal: keys past the diagonal of the CTA's last row are never loaded.
  const int key_end = kMasks && args.causal ? max(0, min(Nk, min(q0 + kRows, Nq) - 1 + args.causal_offset + 1)) : Nk;
  const int num_tiles = (key_end + kKeys - 1) / kKeys;
  const int64_t mask_offset = b * args.attn_mask_stride_b + h * args.attn_mask_stride_h;

  // Prologue: Q and the first K/V tile in one copy group.
  load_tile_async<kRows, D>(q_s, q_g, args.q_stride[2], min(kRows, Nq - q0), tid);
  load_tile_async<kKeys, D>(k_s, k_g, args.k_stride[2], min(kKeys, Nk), tid);
  load_tile_async<kKeys, D>(v_s, v_g, args.v_stride[2], min(kKeys, Nk), tid);
  cp_async_commit();

  // Row state of sub-tile i: [i][0] for its row g, [i][1] for row g + 8. m is identical in the 4 lanes
  // of a quad; l, u and seg_open are per-lane partial sums over the lane's columns.
  float m[kM][2], l[kM][2], u[kM][2], seg_open[kM][2];
  float acc_o[kM][kOTiles][4];
#pragma unroll
  for (int i = 0; i < kM; ++i) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      m[i][r] = neg_inf();
      l[i][r] = u[i][r] = seg_open[i][r] = 0.0f;
    }
#pragma unroll
    for (int n = 0; n < kOTiles; ++n) acc_o[i][n][0] = acc_o[i][n][1] = acc_o[i][n][2] = acc_o[i][n][3] = 0.0f;
  }
  uint32_t q_frag[kQInRegisters ? kM : 1][kQInRegisters ? D / 16 : 1][4];

  for (int tile = 0; tile < num_tiles; ++tile) {
    const int k0 = tile * kKeys;
    const int buf = tile & 1;
    const bool prefetch = tile + 1 < num_tiles;
    if (prefetch) {  // into the other buffer, whose readers finished before the previous trailing barrier
      const int k1 = k0 + kKeys;
      load_tile_async<kKeys, D>(k_s + (buf ^ 1) * kTileElems, k_g + k1 * args.k_stride[2], args.k_stride[2],
                                  min(kKeys, Nk - k1), tid);
      load_tile_async<kKeys, D>(v_s + (buf ^ 1) * kTileElems, v_g + k1 * args.v_stride[2], args.v_stride[2],
                                  min(kKeys, Nk - k1), tid);
      cp_async_commit();
    }
    if (tid < kKeys) {
      int segment;
      smem_store(&bias_s[tid], key_bias(args, bh, b, k0 + tid, &segment));
      smem_store(&seg_s[tid], segment);
    }
    if (prefetch) {
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();  // this tile's K/V (and Q) copies of every thread, bias_s and seg_s are visible

    if constexpr (kQInRegisters) {
      if (tile == 0) {
#pragma unroll
        for (int i = 0; i < kM; ++i) {
#pragma unroll
          for (int c = 0; c < D / 16; ++c) load_a_frag(q_frag[i][c], q_s, kPitch, warp_row0 + 16 * i, c * 16, lane);
        }
      }
    }

    // S = Q K^T for the warp's kM x 16 rows x 64 keys; each K fragment feeds kM MMAs.
    const uint16_t* kt = k_s + buf * kTileElems;
    float s[kM][kNTiles][4];
#pragma unroll
    for (int i = 0; i < kM; ++i) {
#pragma unroll
      for (int n = 0; n < kNTiles; ++n) s[i][n][0] = s[i][n][1] = s[i][n][2] = s[i][n][3] = 0.0f;
    }
#pragma unroll
    for (int c = 0; c < D / 16; ++c) {
      uint32_t qa[kM][4];
#pragma unroll
      for (int i = 0; i < kM; ++i) {
        if constexpr (kQInRegisters) {
#pragma unroll
          for (int x = 0; x < 4; ++x) qa[i][x] = q_frag[i][c][x];
        } else {
          load_a_frag(qa[i], q_s, kPitch, warp_row0 + 16 * i, c * 16, lane);
        }
      }
#pragma unroll
      for (int n = 0; n < kNTiles; ++n) {
        uint32_t bf[2];
        load_b_frag_rows(bf, kt, kPitch, n * 8, c * 16, lane);
#pragma unroll
        for (int i = 0; i < kM; ++i) mma_16816<T>(s[i][n], qa[i], bf);
      }
    }

    // Logits with interventions; -inf for padded, knocked-out and out-of-range keys.
    float tile_max[kM][2];
#pragma unroll
    for (int i = 0; i < kM; ++i) {
      tile_max[i][0] = tile_max[i][1] = neg_inf();
#pragma unroll
      for (int n = 0; n < kNTiles; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          s[i][n][e] = s[i][n][e] * logit_mult + smem_load(&bias_s[n * 8 + 2 * t4 + (e & 1)]);
          if constexpr (kMasks) {
            s[i][n][e] = apply_query_masks(args, mask_offset, q0 + warp_row0 + 16 * i + g + 8 * (e >> 1),
                                           k0 + n * 8 + 2 * t4 + (e & 1), s[i][n][e]);
          }
          tile_max[i][e >> 1] = fmaxf(tile_max[i][e >> 1], s[i][n][e]);
        }
      }
    }

    // Online softmax update. m_ref is the finite reference the exponentials use (0 while the row has
    // seen only -inf), so no -inf - -inf ever occurs.
    float m_ref[kM][2];
#pragma unroll
    for (int i = 0; i < kM; ++i) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const float m_new = fmaxf(m[i][r], quad_max(tile_max[i][r]));
        m_ref[i][r] = m_new == neg_inf() ? 0.0f : m_new;
        const float alpha = __expf(m[i][r] - m_ref[i][r]);  // 0 while m was -inf (and l, u, acc are 0)
        const float shift = m[i][r] == neg_inf() ? 0.0f : m[i][r] - m_ref[i][r];
        u[i][r] = alpha * (u[i][r] + l[i][r] * shift);  // re-centre sum p (s - m) on the new max
        l[i][r] *= alpha;
        seg_open[i][r] *= alpha;
#pragma unroll
        for (int n = 0; n < kOTiles; ++n) {
          acc_o[i][n][2 * r] *= alpha;
          acc_o[i][n][2 * r + 1] *= alpha;
        }
        m[i][r] = m_new;
      }
#pragma unroll
      for (int n = 0; n < kNTiles; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int r = e >> 1;
          const float x = s[i][n][e] - m_ref[i][r];
          const float p = __expf(x);  // 0 for x = -inf
          l[i][r] += p;
          if (want_entropy) u[i][r] += p > 0.0f ? p * x : 0.0f;
          s[i][n][e] = p;
        }
      }
    }

    if (want_segments) {
      // Segments present in this tile, in key order; every segment but possibly the last ends here.
      const int valid_keys = min(kKeys, Nk - k0);
      const int first = smem_load(&seg_s[0]), last = smem_load(&seg_s[valid_keys - 1]);
      for (int segment = first; segment <= last; ++segment) {
        const int64_t seg_end = args.segments[segment + 1];
        const int lo = static_cast<int>(max(args.segments[segment], static_cast<int64_t>(k0)) - k0);
        const int hi = static_cast<int>(min(seg_end, static_cast<int64_t>(k0 + kKeys)) - k0);
        const bool ends_here = seg_end <= k0 + kKeys;
#pragma unroll
        for (int i = 0; i < kM; ++i) {
#pragma unroll
          for (int n = 0; n < kNTiles; ++n) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const int col = n * 8 + 2 * t4 + (e & 1);
              if (col >= lo && col < hi) seg_open[i][e >> 1] += s[i][n][e];
            }
          }
          if (ends_here) {  // store the segment's log-mass relative to this tile's reference
#pragma unroll
            for (int r = 0; r < 2; ++r) {
              const float total = quad_sum(seg_open[i][r]);
              const int row = q0 + warp_row0 + 16 * i + g + 8 * r;
              if (t4 == (segment & 3) && row < Nq) {
                args.segment_mass[(bh * Nq + row) * G + segment] =
                    total > 0.0f ? __logf(total) + m_ref[i][r] : neg_inf();
              }
              seg_open[i][r] = 0.0f;
            }
          }
        }
      }
    }

    // O += P V: the S accumulators of key tiles 2c, 2c+1 are the A fragment of P for key chunk c; each
    // V fragment feeds kM MMAs.
    const uint16_t* vt = v_s + buf * kTileElems;
#pragma unroll
    for (int c = 0; c < kKeys / 16; ++c) {
      uint32_t pa[kM][4];
#pragma unroll
      for (int i = 0; i < kM; ++i) {
        pa[i][0] = pack2<T>(s[i][2 * c][0], s[i][2 * c][1]);
        pa[i][1] = pack2<T>(s[i][2 * c][2], s[i][2 * c][3]);
        pa[i][2] = pack2<T>(s[i][2 * c + 1][0], s[i][2 * c + 1][1]);
        pa[i][3] = pack2<T>(s[i][2 * c + 1][2], s[i][2 * c + 1][3]);
      }
#pragma unroll
      for (int n = 0; n < kOTiles; n += 2) {
        uint32_t bf_lo[2], bf_hi[2];
        load_b_frag_cols_x2(bf_lo, bf_hi, vt, kPitch, c * 16, n * 8, lane);
#pragma unroll
        for (int i = 0; i < kM; ++i) {
          mma_16816<T>(acc_o[i][n], pa[i], bf_lo);
          mma_16816<T>(acc_o[i][n + 1], pa[i], bf_hi);
        }
      }
    }
    __syncthreads();  // all warps are done with this buffer and bias_s before they are overwritten
  }
  if (kMasks && num_tiles == 0) cp_async_wait<0>();  // causal with no visible key: drain the prologue's copies
  // Segments with an end past the last visited tile were never written (only a causal loop stops early).
  const int64_t visited_end = static_cast<int64_t>(num_tiles) * kKeys;

  // Epilogue: captures, then out = gate * (patch or O / l) + out_bias.
  const bool patched = args.patch_mask != nullptr && args.patch_mask[bh] != 0;
  const float gate = args.head_gate != nullptr ? args.head_gate[bh] : 1.0f;
  const float* out_bias = args.out_bias != nullptr ? args.out_bias + bh * D : nullptr;
  const uint16_t* patch = static_cast<const uint16_t*>(args.out_patch);
  uint16_t* out = static_cast<uint16_t*>(args.out);
#pragma unroll
  for (int i = 0; i < kM; ++i) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = q0 + warp_row0 + 16 * i + g + 8 * r;
      const float l_row = quad_sum(l[i][r]);
      const float u_row = quad_sum(u[i][r]);
      const float open_total = kMasks && want_segments ? quad_sum(seg_open[i][r]) : 0.0f;
      if (row >= Nq) continue;
      const float lse = l_row > 0.0f ? m[i][r] + __logf(l_row) : neg_inf();
      const int64_t row_index = bh * Nq + row;
      if (t4 == 0) {
        if (args.lse != nullptr) args.lse[row_index] = lse;
        if (args.row_max != nullptr) args.row_max[row_index] = m[i][r];
        if (want_entropy) args.entropy[row_index] = l_row > 0.0f ? __logf(l_row) - u_row / l_row : 0.0f;
      }
      if (want_segments) {  // lane t4 converts the log-masses it stored itself (segments with g % 4 == t4)
        float* seg_row = args.segment_mass + row_index * G;
        const float m_ref = m[i][r] == neg_inf() ? 0.0f : m[i][r];  // the open segment's reference
        for (int segment = t4; segment < G; segment += 4) {
          float log_mass = seg_row[segment];
          if (kMasks && args.segments[segment + 1] > visited_end) {  // not closed: open (partial mass) or never reached
            log_mass = args.segments[segment] < visited_end && open_total > 0.0f ? __logf(open_total) + m_ref
                                                                                  : neg_inf();
          }
          seg_row[segment] = lse == neg_inf() ? 0.0f : __expf(log_mass - lse);
        }
      }
      const float inv_l = l_row > 0.0f ? 1.0f / l_row : 0.0f;
#pragma unroll
      for (int n = 0; n < kOTiles; ++n) {
        const int col = n * 8 + 2 * t4;
        float o0 = acc_o[i][n][2 * r] * inv_l;
        float o1 = acc_o[i][n][2 * r + 1] * inv_l;
        if (patched) {
          const uint16_t* p = patch + b * args.out_patch_stride[0] + h * args.out_patch_stride[1] +
                              row * args.out_patch_stride[2] + col * args.out_patch_stride[3];
          o0 = to_float<T>(p[0]);
          o1 = to_float<T>(p[args.out_patch_stride[3]]);
        }
        o0 *= gate;
        o1 *= gate;
        if (out_bias != nullptr) {
          o0 += out_bias[col];
          o1 += out_bias[col + 1];
        }
        *reinterpret_cast<uint32_t*>(out + row_index * D + col) = pack2<T>(o0, o1);
      }
    }
  }
}

}  // namespace device

// ---------------------------------------------------------------------------------------------------
// Host side

namespace {

void check_cuda(cudaError_t status, const char* what) {
  if (status != cudaSuccess) {
    throw std::runtime_error(std::string("latentflow CUDA: ") + what + ": " + cudaGetErrorName(status) + ": " +
                             cudaGetErrorString(status));
  }
}

void require(bool ok, const std::string& message) {
  if (!ok) throw std::invalid_argument(message);
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

template <typename T, int D, int kM, bool kMasks>
void launch_forward_typed(const ProbedAttentionArgs& args, cudaStream_t stream) {
  // 32 rows per warp at D = 128 keeps the accumulators in registers only with 32-key tiles.
  constexpr int kKeys = (kM == 2 && D == 128) ? 32 : 64;
  auto kernel = device::latentflow_probed_attn_fwd_cuda<T, D, kM, kKeys, kMasks>;
  constexpr int smem = device::forward_smem_bytes<D, kM, kKeys>();
  constexpr int rows = 16 * device::kWarps * kM;
  // Not a stream operation: legal while a CUDA graph is being captured.
  check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem),
             "cudaFuncSetAttribute(latentflow_probed_attn_fwd_cuda)");
  const dim3 grid((args.num_queries + rows - 1) / rows, args.heads, args.batch);
#ifdef LATENTFLOW_EMULATE
  ::latentflow_emu::launch(kernel, grid, device::kThreads, smem, args);
#else
  kernel<<<grid, device::kThreads, smem, stream>>>(args);
#endif
  check_cuda(cudaGetLastError(), "launch of latentflow_probed_attn_fwd_cuda");
}

template <typename T, int D, bool kMasks>
void launch_forward_masks(const ProbedAttentionArgs& args, cudaStream_t stream) {
  if (args.rows_per_warp == 16) {
    launch_forward_typed<T, D, 1, kMasks>(args, stream);
  } else {
    launch_forward_typed<T, D, 2, kMasks>(args, stream);
  }
}

template <typename T, int D>
void launch_forward_rows(const ProbedAttentionArgs& args, cudaStream_t stream) {
  if (device::has_query_masks(args)) {
    launch_forward_masks<T, D, true>(args, stream);
  } else {
    launch_forward_masks<T, D, false>(args, stream);
  }
}

}  // namespace

void validate_probed_attention_args(const ProbedAttentionArgs& args, bool for_key_mass) {
  require(args.dtype == ElementType::kFloat16 || args.dtype == ElementType::kBFloat16,
          "dtype: the CUDA kernels support float16 and bfloat16");
  require(args.head_dim == 64 || args.head_dim == 128, "head_dim: the CUDA kernels support D in {64, 128}, got " +
                                                           std::to_string(args.head_dim));
  require(args.value_dim == args.head_dim, "value_dim: the CUDA kernels need Dv == D");
  require(args.rows_per_warp == 16 || args.rows_per_warp == 32, "rows_per_warp: must be 16 or 32");
  require(args.batch >= 1 && args.batch <= 65535, "batch: must be in [1, 65535]");
  require(args.heads >= 1 && args.heads <= 65535, "heads: must be in [1, 65535]");
  require(args.kv_heads >= 1 && args.heads % args.kv_heads == 0, "kv_heads: must divide heads");
  require(args.num_queries >= 1 && args.num_keys >= 1, "num_queries/num_keys: must be >= 1");
  require(args.num_segments >= 0, "num_segments: must be >= 0");
  require(args.q != nullptr && args.k != nullptr, "q/k: null pointer");
  require(aligned16(args.q) && aligned16(args.k), "q/k: base pointers must be 16-byte aligned");
  for (int i = 0; i < 3; ++i) {
    require(args.q_stride[i] % 8 == 0 && args.k_stride[i] % 8 == 0,
            "q_stride/k_stride: strides must be multiples of 8 elements");
  }
  require((args.segments != nullptr) == (args.num_segments > 0), "segments: pointer and num_segments disagree");
  require(args.segment_bias == nullptr || args.segments != nullptr, "segment_bias: needs segments");
  require(args.segment_mass == nullptr || args.segments != nullptr, "segment_mass: needs segments");
  require(args.attn_mask_bool == nullptr || args.attn_mask_float == nullptr,
          "attn_mask: pass a bool or a float mask, not both");
  require(args.attn_mask_stride_b >= 0 && args.attn_mask_stride_h >= 0, "attn_mask: strides must be >= 0");
  if (for_key_mass) {
    require(args.lse != nullptr, "lse: the key_mass pass needs the forward's lse");
    require(args.key_mass != nullptr, "key_mass: null output pointer");
  } else {
    require(args.v != nullptr && args.out != nullptr, "v/out: null pointer");
    require(aligned16(args.v), "v: base pointer must be 16-byte aligned");
    for (int i = 0; i < 3; ++i) require(args.v_stride[i] % 8 == 0, "v_stride: strides must be multiples of 8");
    require(args.out_patch == nullptr || args.patch_mask != nullptr, "patch_mask: needed with out_patch");
    require(args.patch_mask == nullptr || args.out_patch != nullptr, "out_patch: needed with patch_mask");
  }
}

void launch_probed_attention_forward(const ProbedAttentionArgs& args, void* stream) {
  validate_probed_attention_args(args, /*for_key_mass=*/false);
  DeviceGuard on_device(args.device);  // the caller's current device is restored on return
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const bool bf16 = args.dtype == ElementType::kBFloat16;
  if (args.head_dim == 64) {
    bf16 ? launch_forward_rows<__nv_bfloat16, 64>(args, s) : launch_forward_rows<__half, 64>(args, s);
  } else {
    bf16 ? launch_forward_rows<__nv_bfloat16, 128>(args, s) : launch_forward_rows<__half, 128>(args, s);
  }
}

#define LATENTFLOW_STR2(...) #__VA_ARGS__
#define LATENTFLOW_STR(...) LATENTFLOW_STR2(__VA_ARGS__)

std::string cuda_build_info() {
  std::string info = "nvcc=" LATENTFLOW_STR(__CUDACC_VER_MAJOR__) "." LATENTFLOW_STR(
      __CUDACC_VER_MINOR__) "." LATENTFLOW_STR(__CUDACC_VER_BUILD__);
#ifdef __CUDA_ARCH_LIST__
  info += ";archs=" LATENTFLOW_STR(__CUDA_ARCH_LIST__);
#else
  info += ";archs=";
#endif
  int runtime = 0;
  if (cudaRuntimeGetVersion(&runtime) == cudaSuccess) info += ";runtime=" + std::to_string(runtime);
  return info;
}

}  // namespace latentflow
