// CUDA second pass of probed attention: key_mass[b,h,j] = sum_i exp(s_ij - lse_i), the attention each
// key receives, with lse from the forward pass. Like a flash backward it recomputes the logits: one
// CTA = 128 keys of one (b, h), each warp owns 32 of them (two 16-key sub-tiles) as the M dimension of
// S^T = K Q^T, and the CTA walks the query tiles of 64 in a fixed order. A key's sum lives in the registers of its own warp (per-lane
// partials, then a quad sum), so there are no atomics and no cross-CTA reductions: deterministic and
// batch invariant.
#ifndef LATENTFLOW_EMULATE
#include <cuda_runtime.h>
#endif

#include <stdexcept>
#include <string>

#include "probed_attention.cuh"
#include "probed_attention_device.cuh"

namespace latentflow {
namespace device {

template <int D, int kM>
constexpr int key_mass_smem_bytes() {
  // K tile + 2 Q tiles (16-bit, padded rows) + 2 lse tiles + per-key bias.
  return (16 * kWarps * kM + 2 * kQueryTile) * (D + kPad) * 2 + 2 * kQueryTile * 4 + 16 * kWarps * kM * 4;
}

template <typename T, int D, int kM, bool kMasks>  // kMasks: the causal / attn_mask instance
__global__ void __launch_bounds__(kThreads)
    latentflow_probed_attn_key_mass_cuda(const ProbedAttentionArgs args) {
  constexpr int kKeys = 16 * kWarps * kM;  // keys per CTA: kM sub-tiles of 16 per warp
  constexpr int kPitch = D + kPad;
  constexpr int kQTileElems = kQueryTile * kPitch;
  constexpr int kNTiles = kQueryTile / 8;  // 8-query MMA tiles of S^T
  static_assert(kQueryTile <= kThreads, "one lse per thread");

  LATENTFLOW_DYNAMIC_SMEM(smem_raw);
  uint16_t* k_s = reinterpret_cast<uint16_t*>(smem_raw);          // [kKeys][kPitch]
  uint16_t* q_s = k_s + kKeys * kPitch;                            // [2][kQueryTile][kPitch]
  float* lse_s = reinterpret_cast<float*>(q_s + 2 * kQTileElems);  // [2][kQueryTile]
  float* bias_s = lse_s + 2 * kQueryTile;                          // [kKeys]

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int g = lane >> 2, t4 = lane & 3;
  const int b = blockIdx.z, h = blockIdx.y;
  const int Nq = args.num_queries, Nk = args.num_keys;
  const int k0 = blockIdx.x * kKeys;
  const int warp_key0 = warp * 16 * kM;  // first key of the warp's sub-tiles within the CTA's keys
  const int hk = h / (args.heads / args.kv_heads);
  const int64_t bh = static_cast<int64_t>(b) * args.heads + h;

  const uint16_t* q_g = static_cast<const uint16_t*>(args.q) + b * args.q_stride[0] + h * args.q_stride[1];
  const uint16_t* k_g = static_cast<const uint16_t*>(args.k) + b * args.k_stride[0] + hk * args.k_stride[1] +
                        k0 * args.k_stride[2];
  const float* lse_g = args.lse + bh * Nq;
  const float logit_mult = args.scale * (args.logit_scale != nullptr ? args.logit_scale[bh] : 1.0f);
  const int num_tiles = (Nq + kQueryTile - 1) / kQueryTile;
  // Causal: query tiles before the first query that sees key k0 contribute nothing; start after them
  // (the remaining tiles are summed in the same order).
  const int first_tile = kMasks && args.causal ? min(num_tiles, max(0, k0 - args.causal_offset) / kQueryTile) : 0;
  const int64_t mask_offset = b * args.attn_mask_stride_b + h * args.attn_mask_stride_h;

  // Prologue: the K tile and the first Q tile in one copy group; lse and key bias by plain stores.
  const int qf = first_tile * kQueryTile;
  const int q_load = first_tile < num_tiles ? qf : 0;  // row q_load must exist; with no tile to visit, any does
  load_tile_async<kKeys, D>(k_s, k_g, args.k_stride[2], min(kKeys, Nk - k0), tid);
  load_tile_async<kQueryTile, D>(q_s, q_g + q_load * args.q_stride[2], args.q_stride[2],
                                 min(kQueryTile, Nq - q_load), tid);
  cp_async_commit();
  if (tid < kQueryTile) smem_store(&lse_s[tid], qf + tid < Nq ? lse_g[qf + tid] : neg_inf());
  for (int key = tid; key < kKeys; key += kThreads) {
    int segment;
    smem_store(&bias_s[key], key_bias(args, bh, b, k0 + key, &segment));
  }

  float mass[kM][2];  // per-lane partial sums for keys g and g + 8 of each sub-tile
  float bias[kM][2];
  uint32_t k_frag[kM][D / 16][4];
#pragma unroll
  for (int i = 0; i < kM; ++i) mass[i][0] = mass[i][1] = 0.0f;

  for (int tile = first_tile; tile < num_tiles; ++tile) {
    const int buf = (tile - first_tile) & 1;
    const bool prefetch = tile + 1 < num_tiles;
    if (prefetch) {  // into the other buffers, whose readers finished before the previous trailing barrier
      const int q1 = (tile + 1) * kQueryTile;
      load_tile_async<kQueryTile, D>(q_s + (buf ^ 1) * kQTileElems, q_g + q1 * args.q_stride[2], args.q_stride[2],
                                     min(kQueryTile, Nq - q1), tid);
      cp_async_commit();
      if (tid < kQueryTile) smem_store(&lse_s[(buf ^ 1) * kQueryTile + tid], q1 + tid < Nq ? lse_g[q1 + tid] : neg_inf());
    }
    if (prefetch) {
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();  // this tile's Q (and K) copies, lse_s and bias_s are visible to all warps

    if (tile == first_tile) {
#pragma unroll
      for (int i = 0; i < kM; ++i) {
#pragma unroll
        for (int c = 0; c < D / 16; ++c) load_a_frag(k_frag[i][c], k_s, kPitch, warp_key0 + 16 * i, c * 16, lane);
        bias[i][0] = smem_load(&bias_s[warp_key0 + 16 * i + g]);
        bias[i][1] = smem_load(&bias_s[warp_key0 + 16 * i + g + 8]);
      }
    }

    const uint16_t* qt = q_s + buf * kQTileElems;
    const float* lse_t = lse_s + buf * kQueryTile;
#pragma unroll
    for (int n = 0; n < kNTiles; ++n) {
      float st[kM][4];  // S^T of sub-tile i: rows = keys g, g+8; columns = queries 2t4, 2t4+1 of tile n
#pragma unroll
      for (int i = 0; i < kM; ++i) st[i][0] = st[i][1] = st[i][2] = st[i][3] = 0.0f;
#pragma unroll
      for (int c = 0; c < D / 16; ++c) {
        uint32_t bf[2];
        load_b_frag_rows(bf, qt, kPitch, n * 8, c * 16, lane);  // each Q fragment feeds kM MMAs
#pragma unroll
        for (int i = 0; i < kM; ++i) mma_16816<T>(st[i], k_frag[i][c], bf);
      }
      const float lse0 = smem_load(&lse_t[n * 8 + 2 * t4]), lse1 = smem_load(&lse_t[n * 8 + 2 * t4 + 1]);
#pragma unroll
      for (int i = 0; i < kM; ++i) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float lse = (e & 1) ? lse1 : lse0;
          float s = st[i][e] * logit_mult + bias[i][e >> 1];
          if constexpr (kMasks) {
            s = apply_query_masks(args, mask_offset, tile * kQueryTile + n * 8 + 2 * t4 + (e & 1),
                                  k0 + warp_key0 + 16 * i + g + 8 * (e >> 1), s);
          }
          // A query row with lse = -inf (fully masked, or past Nq) has p = 0; s = -inf gives exp(-inf) = 0.
          mass[i][e >> 1] += lse == neg_inf() ? 0.0f : __expf(s - lse);
        }
      }
    }
    __syncthreads();  // all warps are done with this buffer before it is overwritten
  }

  if (kMasks && first_tile >= num_tiles) cp_async_wait<0>();  // no query sees these keys: drain the prologue's copies
#pragma unroll
  for (int i = 0; i < kM; ++i) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float total = quad_sum(mass[i][r]);
      const int key = k0 + warp_key0 + 16 * i + g + 8 * r;
      if (t4 == 0 && key < Nk) args.key_mass[bh * Nk + key] = total;
    }
  }
}

}  // namespace device

namespace {

void check_cuda(cudaError_t status, const char* what) {
  if (status != cudaSuccess) {
    throw std::runtime_error(std::string("latentflow CUDA: ") + what + ": " + cudaGetErrorName(status) + ": " +
                             cudaGetErrorString(status));
  }
}

template <typename T, int D, bool kMasks>
void launch_key_mass_masks(const ProbedAttentionArgs& args, cudaStream_t stream) {
  constexpr int kM = 2;  // 32 keys per warp: each Q fragment read from shared memory feeds two MMAs
  auto kernel = device::latentflow_probed_attn_key_mass_cuda<T, D, kM, kMasks>;
  constexpr int smem = device::key_mass_smem_bytes<D, kM>();
  constexpr int keys = 16 * device::kWarps * kM;
  check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem),
             "cudaFuncSetAttribute(latentflow_probed_attn_key_mass_cuda)");
  const dim3 grid((args.num_keys + keys - 1) / keys, args.heads, args.batch);
#ifdef LATENTFLOW_EMULATE
  ::latentflow_emu::launch(kernel, grid, device::kThreads, smem, args);
#else
  kernel<<<grid, device::kThreads, smem, stream>>>(args);
#endif
  check_cuda(cudaGetLastError(), "launch of latentflow_probed_attn_key_mass_cuda");
}

template <typename T, int D>
void launch_key_mass_typed(const ProbedAttentionArgs& args, cudaStream_t stream) {
  if (device::has_query_masks(args)) {
    launch_key_mass_masks<T, D, true>(args, stream);
  } else {
    launch_key_mass_masks<T, D, false>(args, stream);
  }
}

}  // namespace

void launch_probed_attention_key_mass(const ProbedAttentionArgs& args, void* stream) {
  validate_probed_attention_args(args, /*for_key_mass=*/true);
  DeviceGuard on_device(args.device);  // the caller's current device is restored on return
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const bool bf16 = args.dtype == ElementType::kBFloat16;
  if (args.head_dim == 64) {
    bf16 ? launch_key_mass_typed<__nv_bfloat16, 64>(args, s) : launch_key_mass_typed<__half, 64>(args, s);
  } else {
    bf16 ? launch_key_mass_typed<__nv_bfloat16, 128>(args, s) : launch_key_mass_typed<__half, 128>(args, s);
  }
}

}  // namespace latentflow
