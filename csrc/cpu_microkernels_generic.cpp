// Portable micro-kernels: plain loops the compiler may auto-vectorise for the baseline ISA.
// They follow the AVX-512 versions step by step (same clamps, same state updates), so both paths
// meet the same tolerance; they are not bitwise equal to each other (different exp and sum orders).
#include <cmath>
#include <limits>

#include "cpu_microkernels.h"

namespace latentflow {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// 2^x with the kernel's conventions: exactly 0 below -126 (never a denormal), -inf -> 0.
inline float exp2_clamped(float x) { return x < -126.0f ? 0.0f : std::exp2(x); }

void qk_tile(const float* q, const float* kt, int dim, int rows, float* s) {
  for (int r = 0; r < rows; ++r) {
    float acc[kKeyTile] = {};
    const float* qr = q + static_cast<int64_t>(r) * dim;
    for (int d = 0; d < dim; ++d) {
      const float qd = qr[d];
      const float* kd = kt + static_cast<int64_t>(d) * kKeyTile;
      for (int j = 0; j < kKeyTile; ++j) acc[j] += qd * kd[j];
    }
    for (int j = 0; j < kKeyTile; ++j) s[r * kKeyTile + j] = acc[j];
  }
}

void softmax_tile(float* s, int rows, const float* key_bias, RowState st, const TileOptions& opt) {
  const int G = st.num_segments;
  for (int r = 0; r < rows; ++r) {
    float* sr = s + r * kKeyTile;
    float tile_max = kNegInf;
    for (int j = 0; j < kKeyTile; ++j) {
      sr[j] += key_bias[j];
      tile_max = sr[j] > tile_max ? sr[j] : tile_max;
    }
    if (tile_max == kNegInf) {  // no live key for this row here: state unchanged
      for (int j = 0; j < kKeyTile; ++j) sr[j] = 0.0f;
      st.alpha[r] = 1.0f;
      continue;
    }
    const float old_max = st.max[r];
    const float new_max = old_max > tile_max ? old_max : tile_max;
    const float alpha = old_max == kNegInf ? 0.0f : exp2_clamped(old_max - new_max);
    float psum = 0.0f, pt_sum = 0.0f;
    for (int j = 0; j < kKeyTile; ++j) {
      float t = sr[j] - new_max;
      t = t > -200.0f ? t : -200.0f;  // -inf (masked) -> finite, so p * t is 0, not NaN
      const float p = exp2_clamped(t);
      sr[j] = p;
      psum += p;
      pt_sum += p * t;
    }
    const float old_norm = st.norm[r];
    st.norm[r] = old_norm * alpha + psum;
    if (opt.entropy) {
      const float carried = old_norm > 0.0f ? alpha * (st.ent[r] + (old_max - new_max) * old_norm) : 0.0f;
      st.ent[r] = carried + pt_sum;
    }
    if (opt.segments) {
      float* seg = st.seg + static_cast<int64_t>(r) * G;
      if (alpha != 1.0f)
        for (int g = 0; g < G; ++g) seg[g] *= alpha;
      if (opt.num_pieces == 1) {
        seg[opt.pieces[0].g] += psum;
      } else {
        for (int n = 0; n < opt.num_pieces; ++n) {
          float sum = 0.0f;
          for (int j = opt.pieces[n].lo; j < opt.pieces[n].hi; ++j) sum += sr[j];
          seg[opt.pieces[n].g] += sum;
        }
      }
    }
    st.max[r] = new_max;
    st.alpha[r] = alpha;
  }
}

void pv_tile(const float* p, const float* v, const float* alpha, int rows, int vdim_padded, float* o) {
  for (int r = 0; r < rows; ++r) {
    float* orow = o + static_cast<int64_t>(r) * vdim_padded;
    const float a = alpha[r];
    for (int c = 0; c < vdim_padded; ++c) orow[c] *= a;
    for (int j = 0; j < kKeyTile; ++j) {
      const float pj = p[r * kKeyTile + j];
      const float* vj = v + static_cast<int64_t>(j) * vdim_padded;
      for (int c = 0; c < vdim_padded; ++c) orow[c] += pj * vj[c];
    }
  }
}

void key_mass_row(const float* s, const float* key_bias, float lse, float* acc) {
  for (int j = 0; j < kKeyTile; ++j) {
    float t = s[j] + key_bias[j] - lse;
    t = t > -200.0f ? t : -200.0f;
    acc[j] += exp2_clamped(t);
  }
}

}  // namespace

const MicroKernels& generic_kernels() {
  static const MicroKernels kernels{qk_tile, softmax_tile, pv_tile, key_mass_row};
  return kernels;
}

}  // namespace latentflow
