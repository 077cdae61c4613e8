// Fused element-wise passes of the SAM Audio DiT block on the CPU (float32 inference).
//
// Why: at the stand-in models' sizes (T = 200 frames x D = 256 channels) every torch element-wise op costs
// far more in dispatch and thread fork/join than in arithmetic. A DiT block runs ~80 of them (RMSNorm is 6,
// RoPE 7, modulate 3, the head split's copy 1, ...); these two passes replace most of them with one loop
// each over the block's activations.
//
// Both work row by row ((batch, frame) pairs) in a fixed order, so a row's result never depends on the
// batch size or on which thread ran it (the probe engine's exact mode relies on that). The mean of squares
// is accumulated in double: as accurate as torch's float32 reduction or better, not bitwise equal to it.
#include "dit_fused_cpu.h"

#include <cmath>
#include <vector>

#include "cpu_parallel.h"

namespace latentflow {

namespace {

constexpr int kLanes = 8;  // independent partial sums: the reduction is not one serial dependency chain

// 1 / sqrt(mean(x^2) + eps) over n values spaced `stride` apart. Lane j sums the values i = j (mod 8) in
// double, then the lanes add up in a fixed order: deterministic, vectorisable, no reassociation flags.
inline float inverse_rms(const float* x, int64_t n, int64_t stride, float eps) {
  double lanes[kLanes] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      const double value = x[(i + j) * stride];
      lanes[j] += value * value;
    }
  }
  for (int j = 0; i < n; ++i, ++j) {
    const double value = x[i * stride];
    lanes[j] += value * value;
  }
  double sum = 0.0;
  for (int j = 0; j < kLanes; ++j) sum += lanes[j];
  return 1.0f / std::sqrt(static_cast<float>(sum / static_cast<double>(n)) + eps);
}

// Rows per task: sized for threads started per call (tens of microseconds, more than one thread spends on
// a whole [200, 256] or [1000, 128] activation), so only much larger inputs split.
constexpr int64_t kElementsPerTask = 1 << 20;

template <typename RowFn>
void for_rows(int64_t rows, int64_t elements_per_row, int num_threads, RowFn&& row_fn) {
  const int64_t rows_per_task = std::max<int64_t>(1, kElementsPerTask / std::max<int64_t>(1, elements_per_row));
  const int64_t tasks = (rows + rows_per_task - 1) / rows_per_task;
  parallel_for(tasks, num_threads, [&](int, int64_t task) {
    const int64_t end = std::min(rows, (task + 1) * rows_per_task);
    for (int64_t r = task * rows_per_task; r < end; ++r) row_fn(r);
  });
}

}  // namespace

void head_norm_rope_cpu(const HeadNormRopeArgs& a) {
  const int64_t H = a.heads, hd = a.head_dim, T = a.frames;
  for_rows(a.batch * T, H * hd, a.num_threads, [&](int64_t row) {
    const int64_t b = row / T, t = row % T;
    const float* x = a.x + b * a.x_batch_stride + t * a.x_frame_stride;
    const float* cos = a.cos ? a.cos + t * (hd / 2) : nullptr;
    const float* sin = a.sin ? a.sin + t * (hd / 2) : nullptr;
    for (int64_t h = 0; h < H; ++h) {
      // Strided heads (SAM Audio): head h holds channels h, h + H, h + 2H, ...
      const float* xh = x + h;
      float* out = a.out + ((b * H + h) * T + t) * hd;
      if (a.weight) {
        const float r = inverse_rms(xh, hd, H, a.eps);
        for (int64_t d = 0; d < hd; ++d) out[d] = (xh[d * H] * r) * a.weight[d];
      } else {
        for (int64_t d = 0; d < hd; ++d) out[d] = xh[d * H];
      }
      if (cos) {  // RoPE over adjacent pairs (2i, 2i + 1)
        for (int64_t i = 0; i < hd / 2; ++i) {
          const float x1 = out[2 * i], x2 = out[2 * i + 1];
          out[2 * i] = x1 * cos[i] - x2 * sin[i];
          out[2 * i + 1] = x1 * sin[i] + x2 * cos[i];
        }
      }
    }
  });
}

void norm_modulate_cpu(const NormModulateArgs& a) {
  const int64_t D = a.dim, T = a.frames;
  for_rows(a.batch * T, D, a.num_threads, [&](int64_t row) {
    const int64_t b = row / T;
    const float* x = a.x + row * D;
    const float* shift = a.shift + b * a.modulation_batch_stride;
    const float* scale = a.scale + b * a.modulation_batch_stride;
    float* out = a.out + row * D;
    const float r = inverse_rms(x, D, 1, a.eps);
    for (int64_t c = 0; c < D; ++c) out[c] = ((x[c] * r) * a.weight[c]) * (1.0f + scale[c]) + shift[c];
  });
}

}  // namespace latentflow
