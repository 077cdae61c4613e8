// Fused element-wise passes of the SAM Audio DiT block (float32, CPU); see dit_fused_cpu.cpp.
#pragma once

#include <cstdint>

namespace latentflow {

// out [B, H, T, hd] (contiguous) = RoPE(RMSNorm_hd(x split into strided heads) * weight)
// x: [B, T, H * hd] with the channel stride 1; head h holds channels h, h + H, ... (SAM Audio's layout).
// weight == nullptr: no norm; cos == sin == nullptr: no RoPE (cos / sin: [T, hd / 2] contiguous).
struct HeadNormRopeArgs {
  const float* x = nullptr;
  int64_t x_batch_stride = 0, x_frame_stride = 0;
  int64_t batch = 0, frames = 0, heads = 0, head_dim = 0;
  const float* weight = nullptr;
  float eps = 0.0f;
  const float* cos = nullptr;
  const float* sin = nullptr;
  float* out = nullptr;
  int num_threads = 1;
};

// out [B, T, D] = (RMSNorm_D(x) * weight) * (1 + scale[b]) + shift[b]   (adaLN's modulate(norm(x)))
// x, out: contiguous [B, T, D]; shift / scale: [D] rows spaced modulation_batch_stride apart
// (0 = one row shared by the whole batch).
struct NormModulateArgs {
  const float* x = nullptr;
  int64_t batch = 0, frames = 0, dim = 0;
  const float* weight = nullptr;
  float eps = 0.0f;
  const float* shift = nullptr;
  const float* scale = nullptr;
  int64_t modulation_batch_stride = 0;
  float* out = nullptr;
  int num_threads = 1;
};

void head_norm_rope_cpu(const HeadNormRopeArgs& args);
void norm_modulate_cpu(const NormModulateArgs& args);

}  // namespace latentflow
