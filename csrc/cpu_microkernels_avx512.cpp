// AVX-512 micro-kernels: register-blocked 4-row x 64-lane tiles for Q K^T and P V, and a vectorised
// online-softmax step with a polynomial exp2. Every function carries a target attribute (no global
// -mavx512f), so this file links into a build that still runs on CPUs without AVX-512: the driver only
// calls these after checking the CPU at run time.
#include "cpu_microkernels.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>

#include <cmath>
#include <cstdint>

#if defined(__GNUC__) && !defined(__clang__)
// GCC 12 flags the deliberate `__Y = __Y` (undefined vector) inside its own AVX-512 intrinsic headers.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#define LF_AVX512 __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,fma,avx2")))

namespace latentflow {
namespace {

constexpr int kVecs = kKeyTile / kLanes;  // vectors per key tile row
static_assert(kVecs == 4, "the AVX-512 kernels are written for 64-key tiles");

// 2^x for x <= ~0: round-to-nearest split x = n + f, f in [-1/2, 1/2], degree-7 Taylor polynomial of 2^f
// (truncation error < 1e-8 relative), scaled by 2^n with vscalefps. Exactly 0 below -126.
LF_AVX512 inline __m512 exp2_ps(__m512 x) {
  const __mmask16 alive = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-126.0f), _CMP_GE_OQ);
  x = _mm512_max_ps(x, _mm512_set1_ps(-127.0f));
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, n);
  __m512 p = _mm512_set1_ps(1.5252733804059840e-05f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.5403530393381610e-04f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558146428443e-03f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291076284772e-03f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504108664821580e-02f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022650695910071e-01f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718055994531e-01f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_maskz_mov_ps(alive, _mm512_scalef_ps(p, n));
}

inline float exp2_scalar(float x) { return x < -126.0f ? 0.0f : std::exp2(x); }

// Lanes [lo, hi) of vector c (keys 16c .. 16c+15) as a mask.
LF_AVX512 inline __mmask16 lane_range(int c, int lo, int hi) {
  int a = lo - c * kLanes, b = hi - c * kLanes;
  a = a < 0 ? 0 : (a > kLanes ? kLanes : a);
  b = b < 0 ? 0 : (b > kLanes ? kLanes : b);
  if (b <= a) return 0;
  const uint32_t bits = ((1u << (b - a)) - 1u) << a;
  return static_cast<__mmask16>(bits);
}

LF_AVX512 void qk_tile(const float* q, const float* kt, int dim, int rows, float* s) {
  for (int r = 0; r < rows; r += kRowBlock) {
    const float* q0 = q + static_cast<int64_t>(r) * dim;
    const float* q1 = q0 + dim;
    const float* q2 = q1 + dim;
    const float* q3 = q2 + dim;
    __m512 a00 = _mm512_setzero_ps(), a01 = a00, a02 = a00, a03 = a00;
    __m512 a10 = a00, a11 = a00, a12 = a00, a13 = a00;
    __m512 a20 = a00, a21 = a00, a22 = a00, a23 = a00;
    __m512 a30 = a00, a31 = a00, a32 = a00, a33 = a00;
    const float* kd = kt;
    for (int d = 0; d < dim; ++d, kd += kKeyTile) {
      const __m512 k0 = _mm512_load_ps(kd), k1 = _mm512_load_ps(kd + 16);
      const __m512 k2 = _mm512_load_ps(kd + 32), k3 = _mm512_load_ps(kd + 48);
      __m512 b = _mm512_set1_ps(q0[d]);
      a00 = _mm512_fmadd_ps(b, k0, a00); a01 = _mm512_fmadd_ps(b, k1, a01);
      a02 = _mm512_fmadd_ps(b, k2, a02); a03 = _mm512_fmadd_ps(b, k3, a03);
      b = _mm512_set1_ps(q1[d]);
      a10 = _mm512_fmadd_ps(b, k0, a10); a11 = _mm512_fmadd_ps(b, k1, a11);
      a12 = _mm512_fmadd_ps(b, k2, a12); a13 = _mm512_fmadd_ps(b, k3, a13);
      b = _mm512_set1_ps(q2[d]);
      a20 = _mm512_fmadd_ps(b, k0, a20); a21 = _mm512_fmadd_ps(b, k1, a21);
      a22 = _mm512_fmadd_ps(b, k2, a22); a23 = _mm512_fmadd_ps(b, k3, a23);
      b = _mm512_set1_ps(q3[d]);
      a30 = _mm512_fmadd_ps(b, k0, a30); a31 = _mm512_fmadd_ps(b, k1, a31);
      a32 = _mm512_fmadd_ps(b, k2, a32); a33 = _mm512_fmadd_ps(b, k3, a33);
    }
    float* s0 = s + static_cast<int64_t>(r) * kKeyTile;
    _mm512_store_ps(s0, a00); _mm512_store_ps(s0 + 16, a01); _mm512_store_ps(s0 + 32, a02); _mm512_store_ps(s0 + 48, a03);
    s0 += kKeyTile;
    _mm512_store_ps(s0, a10); _mm512_store_ps(s0 + 16, a11); _mm512_store_ps(s0 + 32, a12); _mm512_store_ps(s0 + 48, a13);
    s0 += kKeyTile;
    _mm512_store_ps(s0, a20); _mm512_store_ps(s0 + 16, a21); _mm512_store_ps(s0 + 32, a22); _mm512_store_ps(s0 + 48, a23);
    s0 += kKeyTile;
    _mm512_store_ps(s0, a30); _mm512_store_ps(s0 + 16, a31); _mm512_store_ps(s0 + 32, a32); _mm512_store_ps(s0 + 48, a33);
  }
}

LF_AVX512 void softmax_tile(float* s, int rows, const float* key_bias, RowState st, const TileOptions& opt) {
  const int G = st.num_segments;
  const __m512 kb0 = _mm512_load_ps(key_bias), kb1 = _mm512_load_ps(key_bias + 16);
  const __m512 kb2 = _mm512_load_ps(key_bias + 32), kb3 = _mm512_load_ps(key_bias + 48);
  const __m512 floor_t = _mm512_set1_ps(-200.0f);
  for (int r = 0; r < rows; ++r) {
    float* sr = s + r * kKeyTile;
    __m512 x0 = _mm512_add_ps(_mm512_load_ps(sr), kb0);
    __m512 x1 = _mm512_add_ps(_mm512_load_ps(sr + 16), kb1);
    __m512 x2 = _mm512_add_ps(_mm512_load_ps(sr + 32), kb2);
    __m512 x3 = _mm512_add_ps(_mm512_load_ps(sr + 48), kb3);
    const float tile_max = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_max_ps(x0, x1), _mm512_max_ps(x2, x3)));
    if (tile_max == -INFINITY) {  // no live key for this row here: state unchanged
      const __m512 z = _mm512_setzero_ps();
      _mm512_store_ps(sr, z); _mm512_store_ps(sr + 16, z); _mm512_store_ps(sr + 32, z); _mm512_store_ps(sr + 48, z);
      st.alpha[r] = 1.0f;
      continue;
    }
    const float old_max = st.max[r];
    const float new_max = old_max > tile_max ? old_max : tile_max;
    const float alpha = old_max == -INFINITY ? 0.0f : exp2_scalar(old_max - new_max);
    const __m512 m = _mm512_set1_ps(new_max);
    // -inf (masked) logits become -200, so p = 0 and p * t = 0 (never NaN).
    x0 = _mm512_max_ps(_mm512_sub_ps(x0, m), floor_t);
    x1 = _mm512_max_ps(_mm512_sub_ps(x1, m), floor_t);
    x2 = _mm512_max_ps(_mm512_sub_ps(x2, m), floor_t);
    x3 = _mm512_max_ps(_mm512_sub_ps(x3, m), floor_t);
    const __m512 p0 = exp2_ps(x0), p1 = exp2_ps(x1), p2 = exp2_ps(x2), p3 = exp2_ps(x3);
    _mm512_store_ps(sr, p0); _mm512_store_ps(sr + 16, p1); _mm512_store_ps(sr + 32, p2); _mm512_store_ps(sr + 48, p3);
    const float psum = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(p0, p1), _mm512_add_ps(p2, p3)));
    const float old_norm = st.norm[r];
    st.norm[r] = old_norm * alpha + psum;
    if (opt.entropy) {
      __m512 pt = _mm512_mul_ps(p0, x0);
      pt = _mm512_fmadd_ps(p1, x1, pt);
      pt = _mm512_fmadd_ps(p2, x2, pt);
      pt = _mm512_fmadd_ps(p3, x3, pt);
      const float carried = old_norm > 0.0f ? alpha * (st.ent[r] + (old_max - new_max) * old_norm) : 0.0f;
      st.ent[r] = carried + _mm512_reduce_add_ps(pt);
    }
    if (opt.segments) {
      float* seg = st.seg + static_cast<int64_t>(r) * G;
      if (alpha != 1.0f)
        for (int g = 0; g < G; ++g) seg[g] *= alpha;
      if (opt.num_pieces == 1) {
        seg[opt.pieces[0].g] += psum;
      } else {
        for (int n = 0; n < opt.num_pieces; ++n) {
          const int lo = opt.pieces[n].lo, hi = opt.pieces[n].hi;
          if (hi - lo == 1) {  // one key (a segment per text token): the sum below would give p[lo] exactly
            seg[opt.pieces[n].g] += sr[lo];
            continue;
          }
          __m512 acc = _mm512_maskz_mov_ps(lane_range(0, lo, hi), p0);
          acc = _mm512_add_ps(acc, _mm512_maskz_mov_ps(lane_range(1, lo, hi), p1));
          acc = _mm512_add_ps(acc, _mm512_maskz_mov_ps(lane_range(2, lo, hi), p2));
          acc = _mm512_add_ps(acc, _mm512_maskz_mov_ps(lane_range(3, lo, hi), p3));
          seg[opt.pieces[n].g] += _mm512_reduce_add_ps(acc);
        }
      }
    }
    st.max[r] = new_max;
    st.alpha[r] = alpha;
  }
}

// o[r0..r0+3][c0 .. c0 + 16*NV) = alpha * o + p v, over the 64 keys of the tile.
template <int NV>
LF_AVX512 inline void pv_block(const float* p, const float* v, const float* alpha, int vdp, int keys, float* o) {
  __m512 acc[kRowBlock][NV];
  for (int rr = 0; rr < kRowBlock; ++rr) {
    const __m512 a = _mm512_set1_ps(alpha[rr]);
    for (int c = 0; c < NV; ++c) acc[rr][c] = _mm512_mul_ps(a, _mm512_load_ps(o + rr * vdp + c * kLanes));
  }
  const float* vj = v;
  for (int j = 0; j < keys; ++j, vj += vdp) {
    __m512 vv[NV];
    for (int c = 0; c < NV; ++c) vv[c] = _mm512_load_ps(vj + c * kLanes);
    for (int rr = 0; rr < kRowBlock; ++rr) {
      const __m512 b = _mm512_set1_ps(p[rr * kKeyTile + j]);
      for (int c = 0; c < NV; ++c) acc[rr][c] = _mm512_fmadd_ps(b, vv[c], acc[rr][c]);
    }
  }
  for (int rr = 0; rr < kRowBlock; ++rr)
    for (int c = 0; c < NV; ++c) _mm512_store_ps(o + rr * vdp + c * kLanes, acc[rr][c]);
}

LF_AVX512 void pv_tile(const float* p, const float* v, const float* alpha, int rows, int vdim_padded, int keys,
                       float* o) {
  for (int r = 0; r < rows; r += kRowBlock) {
    const float* pr = p + r * kKeyTile;
    float* orow = o + static_cast<int64_t>(r) * vdim_padded;
    int c0 = 0;
    for (; c0 + 4 * kLanes <= vdim_padded; c0 += 4 * kLanes)
      pv_block<4>(pr, v + c0, alpha + r, vdim_padded, keys, orow + c0);
    switch ((vdim_padded - c0) / kLanes) {
      case 3: pv_block<3>(pr, v + c0, alpha + r, vdim_padded, keys, orow + c0); break;
      case 2: pv_block<2>(pr, v + c0, alpha + r, vdim_padded, keys, orow + c0); break;
      case 1: pv_block<1>(pr, v + c0, alpha + r, vdim_padded, keys, orow + c0); break;
      default: break;
    }
  }
}

LF_AVX512 void key_mass_row(const float* s, const float* key_bias, float lse, float* acc) {
  const __m512 l = _mm512_set1_ps(lse);
  const __m512 floor_t = _mm512_set1_ps(-200.0f);
  for (int c = 0; c < kKeyTile; c += kLanes) {
    __m512 t = _mm512_sub_ps(_mm512_add_ps(_mm512_load_ps(s + c), _mm512_load_ps(key_bias + c)), l);
    t = _mm512_max_ps(t, floor_t);
    _mm512_store_ps(acc + c, _mm512_add_ps(_mm512_load_ps(acc + c), exp2_ps(t)));
  }
}

}  // namespace

const MicroKernels& avx512_kernels() {
  static const MicroKernels kernels{qk_tile, softmax_tile, pv_tile, key_mass_row};
  return kernels;
}

}  // namespace latentflow

#else  // not x86-64 GCC/Clang: no AVX-512 path (cpu_has_avx512() is false, so this is never selected)

namespace latentflow {
const MicroKernels& avx512_kernels() { return generic_kernels(); }
}  // namespace latentflow

#endif
