// Host-facing API of the CUDA probed-attention kernels (docs/design.md, the operator contract).
//
// Plain C++ (no CUDA types) so that bindings/cuda_bindings.cpp, compiled by the host compiler, can
// include it. The launchers take raw pointers, shapes, strides (in elements) and a cudaStream_t passed as
// void*; they never allocate and never synchronise, so a call is capturable in a CUDA graph. Every
// output buffer is allocated by the caller (latentflow_fast/ops/backend_cuda.py) before the launch.
//
// Bad arguments throw std::invalid_argument (ValueError in Python); CUDA errors throw
// std::runtime_error (RuntimeError).
#pragma once

#include <cstdint>
#include <string>

namespace latentflow {

enum class ElementType : int { kFloat16 = 0, kBFloat16 = 1 };

struct ProbedAttentionArgs {
  ElementType dtype = ElementType::kFloat16;
  int device = 0;  // CUDA device ordinal the pointers live on
  int batch = 0, heads = 0, kv_heads = 0, num_queries = 0, num_keys = 0;
  int head_dim = 0, value_dim = 0, num_segments = 0;
  float scale = 1.0f;
  int rows_per_warp = 32;  // forward: query rows per warp, 16 or 32 (each K/V fragment then feeds 2 MMAs)

  // q [B,H,Nq,D], k [B,Hkv,Nk,D], v [B,Hkv,Nk,Dv]: strides of dims 0..2 in elements; the last dim is
  // contiguous, every stride is a multiple of 8 elements and every base pointer is 16-byte aligned.
  const void* q = nullptr;
  int64_t q_stride[3] = {0, 0, 0};
  const void* k = nullptr;
  int64_t k_stride[3] = {0, 0, 0};
  const void* v = nullptr;
  int64_t v_stride[3] = {0, 0, 0};
  void* out = nullptr;  // contiguous [B,H,Nq,Dv], dtype of q

  // Optional inputs (nullptr = inactive); all contiguous.
  const uint8_t* key_padding_mask = nullptr;  // bool [B,Nk], true = attend
  const int64_t* segments = nullptr;          // [G+1] boundaries
  const float* logit_scale = nullptr;         // [B,H]
  const float* segment_bias = nullptr;        // [B,H,G]
  const float* head_gate = nullptr;           // [B,H]
  const float* out_bias = nullptr;            // [B,H,Dv]
  const void* out_patch = nullptr;            // [B,H,Nq,Dv], any strides (elements, 4 dims)
  int64_t out_patch_stride[4] = {0, 0, 0, 0};
  const uint8_t* patch_mask = nullptr;  // bool [B,H]

  // Query-dependent masks. causal: query i sees keys j <= i + causal_offset. attn_mask (at most one of
  // the two pointers): [Bm, Hm, Nq, Nk], contiguous per (b, h), bool (nonzero = attend) or float32
  // additive (finite or -inf); attn_mask_stride_b / _h are 0 for a broadcast batch / head dim.
  bool causal = false;
  int causal_offset = 0;
  const uint8_t* attn_mask_bool = nullptr;
  const float* attn_mask_float = nullptr;
  int64_t attn_mask_stride_b = 0, attn_mask_stride_h = 0;

  // Optional float32 outputs (nullptr = not captured); all contiguous.
  float* lse = nullptr;           // [B,H,Nq]; required by the key_mass pass
  float* row_max = nullptr;       // [B,H,Nq]
  float* entropy = nullptr;       // [B,H,Nq]
  float* segment_mass = nullptr;  // [B,H,Nq,G]
  float* key_mass = nullptr;      // [B,H,Nk]
};

// Forward pass: out plus lse / max / entropy / segment_mass (kernel latentflow_probed_attn_fwd_cuda).
void launch_probed_attention_forward(const ProbedAttentionArgs& args, void* stream);

// Second pass: key_mass from q, k and the forward's lse (kernel latentflow_probed_attn_key_mass_cuda).
// Must be launched on the same stream after the forward pass.
void launch_probed_attention_key_mass(const ProbedAttentionArgs& args, void* stream);

// Checks shared by both launchers (throws std::invalid_argument naming the argument).
void validate_probed_attention_args(const ProbedAttentionArgs& args, bool for_key_mass);

// "nvcc=<major>.<minor>.<build>;archs=<__CUDA_ARCH_LIST__>;runtime=<cudart version>".
std::string cuda_build_info();

}  // namespace latentflow
