// The fused CPU probed-attention kernel (docs/design.md, the operator contract): raw pointers, shapes and strides in,
// no libtorch. The Python side (latentflow_fast/ops/backend_cpu.py) allocates every output and passes
// already validated, normalised arguments; `check_args` re-checks what would otherwise crash.
#pragma once

#include <array>
#include <cstdint>

namespace latentflow {

enum class ScalarType : int { Float32 = 0, BFloat16 = 1, Float16 = 2 };

// Which micro-kernels run: auto = the best the CPU has (AVX-512, else AVX2 + FMA, else the portable
// version). Naming a path the CPU lacks is an error. Results are bitwise reproducible within one path.
enum class CpuIsa : int { Auto = 0, Avx512 = 1, Generic = 2, Avx2 = 3 };

struct ProbedAttentionCpuArgs {
  ScalarType dtype = ScalarType::Float32;  // of q, k, v, out_patch and out
  int64_t batch = 0, heads = 0, kv_heads = 0, num_queries = 0, num_keys = 0, head_dim = 0, value_dim = 0;
  int64_t num_segments = 0;  // G (0 = no segments)

  // Inputs in any strides (elements), dims ordered [B, H, N, D].
  const void* q = nullptr;
  std::array<int64_t, 4> q_strides{};
  const void* k = nullptr;
  std::array<int64_t, 4> k_strides{};
  const void* v = nullptr;
  std::array<int64_t, 4> v_strides{};
  float scale = 1.0f;

  // Optional, contiguous (null = inactive).
  const bool* key_padding_mask = nullptr;  // [B, Nk], true = attend
  const int64_t* segments = nullptr;       // [G + 1]
  const float* logit_scale = nullptr;      // [B, H]
  const float* segment_bias = nullptr;     // [B, H, G]
  const float* head_gate = nullptr;        // [B, H]
  const float* out_bias = nullptr;         // [B, H, Dv]
  const void* out_patch = nullptr;         // [B, H, Nq, Dv], any strides, dtype
  std::array<int64_t, 4> out_patch_strides{};
  const bool* patch_mask = nullptr;        // [B, H]

  // Query-dependent masks. causal: query i sees keys j <= i + causal_offset. attn_mask (at most one of
  // the two pointers): [Bm, Hm, Nq, Nk] contiguous per (b, h), bool (true = attend) or float additive
  // (finite or -inf); attn_mask_batch_stride / attn_mask_head_stride are 0 for a broadcast dim.
  bool causal = false;
  int64_t causal_offset = 0;
  const bool* attn_mask_bool = nullptr;
  const float* attn_mask_float = nullptr;
  int64_t attn_mask_batch_stride = 0, attn_mask_head_stride = 0;

  // Outputs: out is contiguous [B, H, Nq, Dv] in dtype; captures contiguous float32, null = not wanted.
  void* out = nullptr;
  float* lse = nullptr;           // [B, H, Nq]
  float* max = nullptr;           // [B, H, Nq]
  float* entropy = nullptr;       // [B, H, Nq]
  float* segment_mass = nullptr;  // [B, H, Nq, G]
  float* key_mass = nullptr;      // [B, H, Nk]

  int num_threads = 1;
  CpuIsa isa = CpuIsa::Auto;
};

// Throws std::invalid_argument naming the offending argument.
void check_args(const ProbedAttentionCpuArgs& args);

// Runs the kernel (calls check_args first). Safe to call without the GIL and from several threads.
void probed_attention_cpu(const ProbedAttentionCpuArgs& args);

// True when this CPU can run the AVX-512 micro-kernels.
bool cpu_has_avx512();
// True when this CPU can run the AVX2 + FMA micro-kernels.
bool cpu_has_avx2();
// The path `isa` runs on this CPU (Auto resolved; never Auto). Throws std::invalid_argument when the
// CPU lacks the requested one.
CpuIsa resolve_isa(CpuIsa isa);
const char* isa_name(CpuIsa isa);

}  // namespace latentflow
