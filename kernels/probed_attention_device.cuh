// Device building blocks shared by the forward and key_mass kernels: tile sizes, async tile copies,
// the m16n8k16 tensor-core MMA and its fragment loads, and the per-key logit bias.
//
// Fragment layout of mma.sync.m16n8k16 (PTX ISA, "Matrix fragments for mma.m16n8k16"), with
// g = lane / 4 and t = lane % 4; each 32-bit register holds two 16-bit elements, the lower column/k
// index in the low half:
//   A (16x16, row-major): a0 = A[g][2t..2t+1], a1 = A[g+8][2t..], a2 = A[g][2t+8..], a3 = A[g+8][2t+8..]
//   B (16x8, k x n):      b0 = B[2t..2t+1][g],  b1 = B[2t+8..2t+9][g]
//   C (16x8, float):      c0,c1 = C[g][2t..2t+1], c2,c3 = C[g+8][2t..2t+1]
// Two adjacent C tiles of S = Q K^T (keys 16c..16c+7 and 16c+8..16c+15) therefore form exactly the A
// fragment of P for the P V product (the FlashAttention-2 register reuse).
#pragma once

#ifndef LATENTFLOW_EMULATE  // tests/cuda_emulator/ runs these kernels on the host with its own definitions
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "probed_attention.cuh"

namespace latentflow {
namespace device {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kQueryTile = 64;        // query rows per step of the key_mass loop
constexpr int kPad = 8;               // 16-bit elements of padding per shared-memory row (see load_pair)


__device__ __forceinline__ float neg_inf() { return -__int_as_float(0x7f800000); }

// The kernels' dynamic shared memory.
#ifdef LATENTFLOW_EMULATE
#define LATENTFLOW_DYNAMIC_SMEM(name) unsigned char* name = ::latentflow_emu::dynamic_smem()
#else
#define LATENTFLOW_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#endif

// ---- scalar shared-memory accesses ----
// Plain loads and stores on the GPU; the host emulation checks each one for races (cuda_emulation.h),
// so every shared-memory access of the kernels goes through these, load_pair, ldmatrix or cp.async.
#ifdef LATENTFLOW_EMULATE
using ::latentflow_emu::smem_load;
using ::latentflow_emu::smem_store;
#else
template <typename T>
__device__ __forceinline__ T smem_load(const T* p) {
  return *p;
}
template <typename T>
__device__ __forceinline__ void smem_store(T* p, T value) {
  *p = value;
}
#endif

// ---- asynchronous global -> shared copies (sm_80+) ----

#ifdef LATENTFLOW_EMULATE
__device__ __forceinline__ void cp_async_16(void* smem_dst, const void* gmem_src, bool valid) {
  ::latentflow_emu::copy16(smem_dst, gmem_src, valid);
}
__device__ __forceinline__ void cp_async_commit() { ::latentflow_emu::cp_async_commit(); }
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  ::latentflow_emu::cp_async_wait(kPending);
}
#else
__device__ __forceinline__ void cp_async_16(void* smem_dst, const void* gmem_src, bool valid) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
  const int src_bytes = valid ? 16 : 0;  // 0: the 16 bytes are zero-filled and nothing is read
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem_src), "r"(src_bytes)
               : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}
#endif

// Copies rows [0, rows_valid) of a [kRows, kDim] tile (row stride `row_stride` elements, last dim
// contiguous) into shared memory with row pitch kDim + kPad; rows >= rows_valid are zero-filled so that
// padded keys/queries contribute finite zeros (never NaN) to the MMAs. `gmem` points at row 0, which
// is always a valid row (rows_valid >= 1).
template <int kRows, int kDim>
__device__ __forceinline__ void load_tile_async(uint16_t* smem, const uint16_t* gmem, int64_t row_stride,
                                                int rows_valid, int tid) {
  constexpr int kChunksPerRow = kDim / 8;  // 16-byte chunks
  constexpr int kChunks = kRows * kChunksPerRow;
  static_assert(kChunks % kThreads == 0, "tile copy is split evenly over the CTA");
#pragma unroll
  for (int i = 0; i < kChunks / kThreads; ++i) {
    const int chunk = tid + i * kThreads;
    const int row = chunk / kChunksPerRow;
    const int col = (chunk % kChunksPerRow) * 8;
    const bool valid = row < rows_valid;
    const uint16_t* src = valid ? gmem + row * row_stride + col : gmem;
    cp_async_16(smem + row * (kDim + kPad) + col, src, valid);
  }
}

// ---- tensor-core MMA ----

template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#ifdef LATENTFLOW_EMULATE
  ::latentflow_emu::mma_16816<T>(c, a, b);
#else
  if constexpr (std::is_same<T, __half>::value) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    static_assert(std::is_same<T, __nv_bfloat16>::value, "float16 or bfloat16");
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
#endif
}

// Two consecutive 16-bit elements (row-major tile in shared memory) as one register. With a row pitch
// of D + 8 elements, the 32 lanes of a fragment load (rows g, words t) hit 32 distinct banks.
__device__ __forceinline__ uint32_t load_pair(const uint16_t* p) {
  return smem_load(reinterpret_cast<const uint32_t*>(p));
}

// A fragment of rows [row0, row0+16) and columns [col0, col0+16) of a row-major tile.
__device__ __forceinline__ void load_a_frag(uint32_t (&a)[4], const uint16_t* tile, int pitch, int row0, int col0,
                                            int lane) {
  const int g = lane >> 2, t = lane & 3;
  const uint16_t* p = tile + (row0 + g) * pitch + col0 + 2 * t;
  a[0] = load_pair(p);
  a[1] = load_pair(p + 8 * pitch);
  a[2] = load_pair(p + 8);
  a[3] = load_pair(p + 8 * pitch + 8);
}

// B fragment (k x n = 16 x 8) whose column n is row (row0 + n) of a row-major tile, k = columns
// [col0, col0+16): the K^T operand of S = Q K^T (and Q^T of S^T = K Q^T).
__device__ __forceinline__ void load_b_frag_rows(uint32_t (&b)[2], const uint16_t* tile, int pitch, int row0, int col0,
                                                 int lane) {
  const int g = lane >> 2, t = lane & 3;
  const uint16_t* p = tile + (row0 + g) * pitch + col0 + 2 * t;
  b[0] = load_pair(p);
  b[1] = load_pair(p + 8);
}

// ldmatrix.x4.trans: lane l supplies the address of row (l % 8) of 8x8 matrix (l / 8) (16 bytes, 16-byte
// aligned); register m of lane l receives rows 2(l%4), 2(l%4)+1 of column l/4 of matrix m, i.e. the
// B fragment half of a k x n tile stored k-major (PTX ISA, "Warp-level matrix load instruction: ldmatrix").
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const uint16_t* row) {
#ifdef LATENTFLOW_EMULATE
  ::latentflow_emu::ldmatrix_x4_trans(r, row);
#else
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
#endif
}

// B fragments (k x n = 16 x 8) of two adjacent n-tiles, columns [col0, col0+8) and [col0+8, col0+16),
// with k = rows [row0, row0+16) of a row-major tile: the V operand of O = P V, in one ldmatrix.
// Matrix m covers rows row0 + 8 (m & 1) and columns col0 + 8 (m >> 1); with the D + 8 row pitch the
// 8 rows of each matrix fall in distinct bank quadruples.
__device__ __forceinline__ void load_b_frag_cols_x2(uint32_t (&b_lo)[2], uint32_t (&b_hi)[2], const uint16_t* tile,
                                                    int pitch, int row0, int col0, int lane) {
  const int m = lane >> 3, j = lane & 7;
  uint32_t r[4];
  ldmatrix_x4_trans(r, tile + (row0 + j + 8 * (m & 1)) * pitch + col0 + 8 * (m >> 1));
  b_lo[0] = r[0];
  b_lo[1] = r[1];
  b_hi[0] = r[2];
  b_hi[1] = r[3];
}

// ---- element conversions ----

template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  if constexpr (std::is_same<T, __half>::value) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  } else {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
}

template <typename T>
__device__ __forceinline__ float to_float(uint16_t bits) {
  if constexpr (std::is_same<T, __half>::value) {
    return __half2float(__ushort_as_half(bits));
  } else {
    return __bfloat162float(__ushort_as_bfloat16(bits));
  }
}

// ---- per-key bias: padding mask, segment bias, keys past Nk ----

// The segment g of key j: the largest g in [0, G) with segments[g] <= j (segments[0] = 0 <= j).
__device__ __forceinline__ int find_segment(const int64_t* segments, int num_segments, int j) {
  int lo = 0, hi = num_segments - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (segments[mid] <= j) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

// Additive logit bias of key j for row (b, h): -inf for a padded key or a key past Nk, else the
// segment bias of its segment (0 without one). Also returns its segment (-1 past Nk or without segments).
__device__ __forceinline__ float key_bias(const ProbedAttentionArgs& args, int64_t bh, int b, int j, int* segment) {
  *segment = -1;
  if (j >= args.num_keys) return neg_inf();
  if (args.segments != nullptr) *segment = find_segment(args.segments, args.num_segments, j);
  if (args.key_padding_mask != nullptr && !args.key_padding_mask[static_cast<int64_t>(b) * args.num_keys + j]) {
    return neg_inf();
  }
  if (args.segment_bias != nullptr) return args.segment_bias[bh * args.num_segments + *segment];
  return 0.0f;
}

// True when a call needs the kernels' causal / attn_mask instance.
inline bool has_query_masks(const ProbedAttentionArgs& args) {
  return args.causal || args.attn_mask_bool != nullptr || args.attn_mask_float != nullptr;
}

// Query-dependent masks of logit s for (query row, key col) of row (b, h): -inf where causal or a bool
// attn_mask blocks the pair, + the float attn_mask otherwise. `mask_offset` is the element offset of attn_mask[b, h, 0, 0]; rows >= Nq and keys >= Nk read nothing.
__device__ __forceinline__ float apply_query_masks(const ProbedAttentionArgs& args, int64_t mask_offset, int row,
                                                   int col, float s) {
  if (args.causal && col > row + args.causal_offset) return neg_inf();
  if (col >= args.num_keys || row >= args.num_queries) return s;  // padding: -inf already via the key bias
  const int64_t at = mask_offset + static_cast<int64_t>(row) * args.num_keys + col;
  if (args.attn_mask_bool != nullptr && args.attn_mask_bool[at] == 0) return neg_inf();
  if (args.attn_mask_float != nullptr) return s + args.attn_mask_float[at];
  return s;
}

// Sum over the 4 lanes of a quad (the lanes sharing one MMA row); the same bits in all four lanes.
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  x += __shfl_xor_sync(0xffffffffu, x, 2);
  return x;
}

__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
  return x;
}

}  // namespace device

// Host side: makes `device` current for one launch and puts the caller's current device back when the
// launch returns or throws. The CUDA runtime's current device is per-thread state that torch and the
// caller rely on; a launcher that switched it and left it would move their later work to another GPU.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    check(cudaGetDevice(&previous_), "cudaGetDevice");
    if (previous_ != device) {
      check(cudaSetDevice(device), "cudaSetDevice");
      switched_ = true;
    }
  }
  ~DeviceGuard() {
    if (switched_) cudaSetDevice(previous_);  // best effort: a destructor must not throw
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  static void check(cudaError_t status, const char* what) {
    if (status != cudaSuccess) {
      throw std::runtime_error(std::string("latentflow CUDA: ") + what + ": " + cudaGetErrorName(status) + ": " +
                               cudaGetErrorString(status));
    }
  }
  int previous_ = -1;
  bool switched_ = false;
};

}  // namespace latentflow
