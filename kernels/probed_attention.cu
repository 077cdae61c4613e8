// CUDA forward kernel of probed attention (DESIGN.md section 3), FlashAttention-2 style:
// one CTA = 4 warps = 64 query rows of one (b, h); each warp owns 16 rows and streams the keys in tiles
// of 64 (cp.async double buffer), S = Q K^T and O += P V on mma.sync.m16n8k16 tensor cores, an online
// softmax in float32, and the captures carried online beside it:
//   lse, max        from the running max m and normaliser l;
//   entropy         U = sum_j e^{s_j - m} (s_j - m), rescaled like l; H = log l - U / l;
//   segment_mass    the open segment's normaliser, rescaled like l; when a segment ends inside a tile its
//                   log-mass log(sum) + m is written to the output, and the epilogue turns every entry
//                   into exp(logmass - lse) (each entry is written and rewritten by the same thread).
// Interventions: logit_scale folds into the per-row logit multiplier, segment_bias and the padding mask
// into a per-key bias, and patch / gate / out_bias are applied in the epilogue.
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

template <int D>
constexpr int forward_smem_bytes() {
  // Q tile + 2 K tiles + 2 V tiles (16-bit, padded rows) + per-key bias and segment of the current tile.
  return (kBlockM + 4 * kBlockN) * (D + kPad) * 2 + kBlockN * (4 + 4);
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads)
    latentflow_probed_attn_fwd_cuda(const ProbedAttentionArgs args) {
  constexpr int kPitch = D + kPad;
  constexpr int kTileElems = kBlockN * kPitch;
  constexpr int kNTiles = kBlockN / 8;  // 8-key MMA tiles of S per warp
  constexpr int kOTiles = D / 8;        // 8-column MMA tiles of O per warp

  LATENTFLOW_DYNAMIC_SMEM(smem_raw);
  uint16_t* q_s = reinterpret_cast<uint16_t*>(smem_raw);
  uint16_t* k_s = q_s + kBlockM * kPitch;  // [2][kBlockN][kPitch]
  uint16_t* v_s = k_s + 2 * kTileElems;    // [2][kBlockN][kPitch]
  float* bias_s = reinterpret_cast<float*>(v_s + 2 * kTileElems);
  int* seg_s = reinterpret_cast<int*>(bias_s + kBlockN);

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int g = lane >> 2, t4 = lane & 3;
  const int b = blockIdx.z, h = blockIdx.y;
  const int Nq = args.num_queries, Nk = args.num_keys, G = args.num_segments;
  const int q0 = blockIdx.x * kBlockM;
  const int hk = h / (args.heads / args.kv_heads);
  const int64_t bh = static_cast<int64_t>(b) * args.heads + h;

  const uint16_t* q_g = static_cast<const uint16_t*>(args.q) + b * args.q_stride[0] + h * args.q_stride[1] +
                        q0 * args.q_stride[2];
  const uint16_t* k_g = static_cast<const uint16_t*>(args.k) + b * args.k_stride[0] + hk * args.k_stride[1];
  const uint16_t* v_g = static_cast<const uint16_t*>(args.v) + b * args.v_stride[0] + hk * args.v_stride[1];
  const float logit_mult = args.scale * (args.logit_scale != nullptr ? args.logit_scale[bh] : 1.0f);
  const bool want_entropy = args.entropy != nullptr;
  const bool want_segments = args.segment_mass != nullptr;
  const int num_tiles = (Nk + kBlockN - 1) / kBlockN;

  // Prologue: Q and the first K/V tile in one copy group.
  load_tile_async<kBlockM, D>(q_s, q_g, args.q_stride[2], min(kBlockM, Nq - q0), tid);
  load_tile_async<kBlockN, D>(k_s, k_g, args.k_stride[2], min(kBlockN, Nk), tid);
  load_tile_async<kBlockN, D>(v_s, v_g, args.v_stride[2], min(kBlockN, Nk), tid);
  cp_async_commit();

  // Row state: index r = 0 for row g of the warp's 16, r = 1 for row g + 8. m is identical in the 4
  // lanes of a quad; l, u and seg_open are per-lane partial sums over the lane's columns.
  float m[2] = {neg_inf(), neg_inf()};
  float l[2] = {0.0f, 0.0f};
  float u[2] = {0.0f, 0.0f};
  float seg_open[2] = {0.0f, 0.0f};
  float acc_o[kOTiles][4];
#pragma unroll
  for (int n = 0; n < kOTiles; ++n) acc_o[n][0] = acc_o[n][1] = acc_o[n][2] = acc_o[n][3] = 0.0f;
  uint32_t q_frag[D / 16][4];

  for (int tile = 0; tile < num_tiles; ++tile) {
    const int k0 = tile * kBlockN;
    const int buf = tile & 1;
    const bool prefetch = tile + 1 < num_tiles;
    if (prefetch) {  // into the other buffer, whose readers finished before the previous trailing barrier
      const int k1 = k0 + kBlockN;
      load_tile_async<kBlockN, D>(k_s + (buf ^ 1) * kTileElems, k_g + k1 * args.k_stride[2], args.k_stride[2],
                                  min(kBlockN, Nk - k1), tid);
      load_tile_async<kBlockN, D>(v_s + (buf ^ 1) * kTileElems, v_g + k1 * args.v_stride[2], args.v_stride[2],
                                  min(kBlockN, Nk - k1), tid);
      cp_async_commit();
    }
    if (tid < kBlockN) {
      int segment;
      bias_s[tid] = key_bias(args, bh, b, k0 + tid, &segment);
      seg_s[tid] = segment;
    }
    if (prefetch) {
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();  // this tile's K/V (and Q) copies of every thread, bias_s and seg_s are visible

    if (tile == 0) {
#pragma unroll
      for (int c = 0; c < D / 16; ++c) load_a_frag(q_frag[c], q_s, kPitch, warp * 16, c * 16, lane);
    }

    // S = Q K^T for the warp's 16 rows x 64 keys.
    const uint16_t* kt = k_s + buf * kTileElems;
    float s[kNTiles][4];
#pragma unroll
    for (int n = 0; n < kNTiles; ++n) {
      s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
#pragma unroll
      for (int c = 0; c < D / 16; ++c) {
        uint32_t bf[2];
        load_b_frag_rows(bf, kt, kPitch, n * 8, c * 16, lane);
        mma_16816<T>(s[n], q_frag[c], bf);
      }
    }

    // Logits with interventions; -inf for padded, knocked-out and out-of-range keys.
    float tile_max[2] = {neg_inf(), neg_inf()};
#pragma unroll
    for (int n = 0; n < kNTiles; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[n][e] = s[n][e] * logit_mult + bias_s[n * 8 + 2 * t4 + (e & 1)];
        tile_max[e >> 1] = fmaxf(tile_max[e >> 1], s[n][e]);
      }
    }

    // Online softmax update. m_ref is the finite reference the exponentials use (0 while the row has
    // seen only -inf), so no -inf - -inf ever occurs.
    float m_ref[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float m_new = fmaxf(m[r], quad_max(tile_max[r]));
      m_ref[r] = m_new == neg_inf() ? 0.0f : m_new;
      const float alpha = __expf(m[r] - m_ref[r]);  // 0 while m was -inf (and l, u, acc are 0)
      const float shift = m[r] == neg_inf() ? 0.0f : m[r] - m_ref[r];
      u[r] = alpha * (u[r] + l[r] * shift);  // re-centre sum p (s - m) on the new max
      l[r] *= alpha;
      seg_open[r] *= alpha;
#pragma unroll
      for (int n = 0; n < kOTiles; ++n) {
        acc_o[n][2 * r] *= alpha;
        acc_o[n][2 * r + 1] *= alpha;
      }
      m[r] = m_new;
    }
#pragma unroll
    for (int n = 0; n < kNTiles; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = e >> 1;
        const float x = s[n][e] - m_ref[r];
        const float p = __expf(x);  // 0 for x = -inf
        l[r] += p;
        if (want_entropy) u[r] += p > 0.0f ? p * x : 0.0f;
        s[n][e] = p;
      }
    }

    if (want_segments) {
      // Segments present in this tile, in key order; every segment but possibly the last ends here.
      const int valid_keys = min(kBlockN, Nk - k0);
      const int first = seg_s[0], last = seg_s[valid_keys - 1];
      for (int segment = first; segment <= last; ++segment) {
        const int64_t seg_end = args.segments[segment + 1];
        const int lo = static_cast<int>(max(args.segments[segment], static_cast<int64_t>(k0)) - k0);
        const int hi = static_cast<int>(min(seg_end, static_cast<int64_t>(k0 + kBlockN)) - k0);
#pragma unroll
        for (int n = 0; n < kNTiles; ++n) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int col = n * 8 + 2 * t4 + (e & 1);
            if (col >= lo && col < hi) seg_open[e >> 1] += s[n][e];
          }
        }
        if (seg_end <= k0 + kBlockN) {  // the segment ends in this tile: store its log-mass
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            const float total = quad_sum(seg_open[r]);
            const int row = q0 + warp * 16 + g + 8 * r;
            if (t4 == (segment & 3) && row < Nq) {
              args.segment_mass[(bh * Nq + row) * G + segment] = total > 0.0f ? __logf(total) + m_ref[r] : neg_inf();
            }
            seg_open[r] = 0.0f;
          }
        }
      }
    }

    // O += P V: the S accumulators of key tiles 2c, 2c+1 are the A fragment of P for key chunk c.
    const uint16_t* vt = v_s + buf * kTileElems;
#pragma unroll
    for (int c = 0; c < kBlockN / 16; ++c) {
      uint32_t pa[4];
      pa[0] = pack2<T>(s[2 * c][0], s[2 * c][1]);
      pa[1] = pack2<T>(s[2 * c][2], s[2 * c][3]);
      pa[2] = pack2<T>(s[2 * c + 1][0], s[2 * c + 1][1]);
      pa[3] = pack2<T>(s[2 * c + 1][2], s[2 * c + 1][3]);
#pragma unroll
      for (int n = 0; n < kOTiles; n += 2) {
        uint32_t bf_lo[2], bf_hi[2];
        load_b_frag_cols_x2(bf_lo, bf_hi, vt, kPitch, c * 16, n * 8, lane);
        mma_16816<T>(acc_o[n], pa, bf_lo);
        mma_16816<T>(acc_o[n + 1], pa, bf_hi);
      }
    }
    __syncthreads();  // all warps are done with this buffer and bias_s before they are overwritten
  }

  // Epilogue: captures, then out = gate * (patch or O / l) + out_bias.
  const bool patched = args.patch_mask != nullptr && args.patch_mask[bh] != 0;
  const float gate = args.head_gate != nullptr ? args.head_gate[bh] : 1.0f;
  const float* out_bias = args.out_bias != nullptr ? args.out_bias + bh * D : nullptr;
  const uint16_t* patch = static_cast<const uint16_t*>(args.out_patch);
  uint16_t* out = static_cast<uint16_t*>(args.out);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = q0 + warp * 16 + g + 8 * r;
    const float l_row = quad_sum(l[r]);
    const float u_row = quad_sum(u[r]);
    if (row >= Nq) continue;
    const float lse = l_row > 0.0f ? m[r] + __logf(l_row) : neg_inf();
    const int64_t row_index = bh * Nq + row;
    if (t4 == 0) {
      if (args.lse != nullptr) args.lse[row_index] = lse;
      if (args.row_max != nullptr) args.row_max[row_index] = m[r];
      if (want_entropy) args.entropy[row_index] = l_row > 0.0f ? __logf(l_row) - u_row / l_row : 0.0f;
    }
    if (want_segments) {  // lane t4 converts the log-masses it stored itself (segments with g % 4 == t4)
      float* seg_row = args.segment_mass + row_index * G;
      for (int segment = t4; segment < G; segment += 4) {
        seg_row[segment] = lse == neg_inf() ? 0.0f : __expf(seg_row[segment] - lse);
      }
    }
    const float inv_l = l_row > 0.0f ? 1.0f / l_row : 0.0f;
#pragma unroll
    for (int n = 0; n < kOTiles; ++n) {
      const int col = n * 8 + 2 * t4;
      float o0 = acc_o[n][2 * r] * inv_l;
      float o1 = acc_o[n][2 * r + 1] * inv_l;
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

template <typename T, int D>
void launch_forward_typed(const ProbedAttentionArgs& args, cudaStream_t stream) {
  auto kernel = device::latentflow_probed_attn_fwd_cuda<T, D>;
  constexpr int smem = device::forward_smem_bytes<D>();
  // Not a stream operation: legal while a CUDA graph is being captured.
  check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem),
             "cudaFuncSetAttribute(latentflow_probed_attn_fwd_cuda)");
  const dim3 grid((args.num_queries + device::kBlockM - 1) / device::kBlockM, args.heads, args.batch);
#ifdef LATENTFLOW_EMULATE
  ::latentflow_emu::launch(kernel, grid, device::kThreads, smem, args);
#else
  kernel<<<grid, device::kThreads, smem, stream>>>(args);
#endif
  check_cuda(cudaGetLastError(), "launch of latentflow_probed_attn_fwd_cuda");
}

}  // namespace

void validate_probed_attention_args(const ProbedAttentionArgs& args, bool for_key_mass) {
  require(args.dtype == ElementType::kFloat16 || args.dtype == ElementType::kBFloat16,
          "dtype: the CUDA kernels support float16 and bfloat16");
  require(args.head_dim == 64 || args.head_dim == 128, "head_dim: the CUDA kernels support D in {64, 128}, got " +
                                                           std::to_string(args.head_dim));
  require(args.value_dim == args.head_dim, "value_dim: the CUDA kernels need Dv == D");
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

static void set_device(int device) {
  int current = -1;
  check_cuda(cudaGetDevice(&current), "cudaGetDevice");
  if (current != device) check_cuda(cudaSetDevice(device), "cudaSetDevice");
}

void launch_probed_attention_forward(const ProbedAttentionArgs& args, void* stream) {
  validate_probed_attention_args(args, /*for_key_mass=*/false);
  set_device(args.device);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const bool bf16 = args.dtype == ElementType::kBFloat16;
  if (args.head_dim == 64) {
    bf16 ? launch_forward_typed<__nv_bfloat16, 64>(args, s) : launch_forward_typed<__half, 64>(args, s);
  } else {
    bf16 ? launch_forward_typed<__nv_bfloat16, 128>(args, s) : launch_forward_typed<__half, 128>(args, s);
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
