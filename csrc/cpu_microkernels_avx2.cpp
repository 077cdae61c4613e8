// AVX2 + FMA micro-kernels, for x86 CPUs without AVX-512 (most AMD Zen 2/3, many client Intel parts).
//
// Same contract as the AVX-512 file: same tiles (kQueryTile x kKeyTile, 4-row blocks), same per-element
// operation order in Q K^T and P V (one FMA chain over d, resp. over the 64 keys of a tile), the same
// exp2 polynomial and clamps. With 16 ymm registers a 4 x 64 accumulator block does not fit, so the
// tiles are walked in 4-row x 24-lane register blocks (12 accumulators); the blocking changes which
// registers hold a value, not the order of the operations on it. Only the horizontal sums of the
// softmax (psum, entropy, segment pieces) use their own fixed order, so this path is bitwise
// deterministic, batch- and thread-count invariant, and agrees with the AVX-512 one to rounding.
//
// Every function carries a target attribute instead of a per-file -mavx2: with -mavx2 on the file,
// inline library functions compiled here (std::fill, std::exp2 wrappers...) could be merged by the
// linker with the baseline copies and then run on a CPU without AVX2. The driver only calls these
// after checking the CPU at run time.
#include "cpu_microkernels.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>

#include <cmath>
#include <cstdint>

#define LF_AVX2 __attribute__((target("avx2,fma")))

namespace latentflow {
namespace {

constexpr int kW = 8;                    // float lanes of one ymm vector
constexpr int kVecs = kKeyTile / kW;     // vectors per key-tile row
static_assert(kVecs == 8, "the AVX2 kernels are written for 64-key tiles");
static_assert(kLanes % kW == 0, "value rows are padded to a multiple of the vector width");

// 2^x for x <= ~0, the AVX-512 path's algorithm and coefficients: round-to-nearest split x = n + f,
// degree-7 polynomial of 2^f, times 2^n (built in the exponent field; n >= -126 wherever the result
// is kept, so 2^n is a normal number). Exactly 0 below -126.
LF_AVX2 inline __m256 exp2_ps(__m256 x) {
  const __m256 alive = _mm256_cmp_ps(x, _mm256_set1_ps(-126.0f), _CMP_GE_OQ);
  x = _mm256_max_ps(x, _mm256_set1_ps(-127.0f));
  const __m256 n = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_sub_ps(x, n);
  __m256 p = _mm256_set1_ps(1.5252733804059840e-05f);
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.5403530393381610e-04f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.3333558146428443e-03f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.6181291076284772e-03f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.5504108664821580e-02f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.4022650695910071e-01f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(6.9314718055994531e-01f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_and_ps(alive, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
}

inline float exp2_scalar(float x) { return x < -126.0f ? 0.0f : std::exp2(x); }

// Fixed-order horizontal sum / max of one vector: (lo half + hi half), then pairs.
LF_AVX2 inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

LF_AVX2 inline float hmax(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Sum of the 8 vectors of a tile row as a balanced tree (fixed order).
LF_AVX2 inline __m256 tree_sum(const __m256 (&v)[kVecs]) {
  return _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(v[0], v[1]), _mm256_add_ps(v[2], v[3])),
                       _mm256_add_ps(_mm256_add_ps(v[4], v[5]), _mm256_add_ps(v[6], v[7])));
}

// s[r0..r0+3][c0 .. c0 + 24) for one 4-row block: 12 accumulators, one FMA chain over d each. Named
// variables, not an array: GCC 12 mirrored an accumulator array to the stack on every step of this
// loop (its trip count, dim, is not a constant), costing a third of the throughput.
LF_AVX2 inline void qk_block3(const float* q, const float* kt, int dim, float* s) {
  const float *q0 = q, *q1 = q + dim, *q2 = q + 2 * dim, *q3 = q + 3 * dim;
  __m256 a00 = _mm256_setzero_ps(), a01 = a00, a02 = a00, a10 = a00, a11 = a00, a12 = a00;
  __m256 a20 = a00, a21 = a00, a22 = a00, a30 = a00, a31 = a00, a32 = a00;
  const float* kd = kt;
  for (int d = 0; d < dim; ++d, kd += kKeyTile) {
    const __m256 k0 = _mm256_load_ps(kd), k1 = _mm256_load_ps(kd + kW), k2 = _mm256_load_ps(kd + 2 * kW);
    __m256 b = _mm256_broadcast_ss(q0 + d);
    a00 = _mm256_fmadd_ps(b, k0, a00); a01 = _mm256_fmadd_ps(b, k1, a01); a02 = _mm256_fmadd_ps(b, k2, a02);
    b = _mm256_broadcast_ss(q1 + d);
    a10 = _mm256_fmadd_ps(b, k0, a10); a11 = _mm256_fmadd_ps(b, k1, a11); a12 = _mm256_fmadd_ps(b, k2, a12);
    b = _mm256_broadcast_ss(q2 + d);
    a20 = _mm256_fmadd_ps(b, k0, a20); a21 = _mm256_fmadd_ps(b, k1, a21); a22 = _mm256_fmadd_ps(b, k2, a22);
    b = _mm256_broadcast_ss(q3 + d);
    a30 = _mm256_fmadd_ps(b, k0, a30); a31 = _mm256_fmadd_ps(b, k1, a31); a32 = _mm256_fmadd_ps(b, k2, a32);
  }
  float* s0 = s;
  _mm256_store_ps(s0, a00); _mm256_store_ps(s0 + kW, a01); _mm256_store_ps(s0 + 2 * kW, a02);
  s0 += kKeyTile;
  _mm256_store_ps(s0, a10); _mm256_store_ps(s0 + kW, a11); _mm256_store_ps(s0 + 2 * kW, a12);
  s0 += kKeyTile;
  _mm256_store_ps(s0, a20); _mm256_store_ps(s0 + kW, a21); _mm256_store_ps(s0 + 2 * kW, a22);
  s0 += kKeyTile;
  _mm256_store_ps(s0, a30); _mm256_store_ps(s0 + kW, a31); _mm256_store_ps(s0 + 2 * kW, a32);
}

// The last 16 keys of the tile: 4 rows x 2 vectors.
LF_AVX2 inline void qk_block2(const float* q, const float* kt, int dim, float* s) {
  const float *q0 = q, *q1 = q + dim, *q2 = q + 2 * dim, *q3 = q + 3 * dim;
  __m256 a00 = _mm256_setzero_ps(), a01 = a00, a10 = a00, a11 = a00, a20 = a00, a21 = a00, a30 = a00, a31 = a00;
  const float* kd = kt;
  for (int d = 0; d < dim; ++d, kd += kKeyTile) {
    const __m256 k0 = _mm256_load_ps(kd), k1 = _mm256_load_ps(kd + kW);
    __m256 b = _mm256_broadcast_ss(q0 + d);
    a00 = _mm256_fmadd_ps(b, k0, a00); a01 = _mm256_fmadd_ps(b, k1, a01);
    b = _mm256_broadcast_ss(q1 + d);
    a10 = _mm256_fmadd_ps(b, k0, a10); a11 = _mm256_fmadd_ps(b, k1, a11);
    b = _mm256_broadcast_ss(q2 + d);
    a20 = _mm256_fmadd_ps(b, k0, a20); a21 = _mm256_fmadd_ps(b, k1, a21);
    b = _mm256_broadcast_ss(q3 + d);
    a30 = _mm256_fmadd_ps(b, k0, a30); a31 = _mm256_fmadd_ps(b, k1, a31);
  }
  _mm256_store_ps(s, a00); _mm256_store_ps(s + kW, a01);
  _mm256_store_ps(s + kKeyTile, a10); _mm256_store_ps(s + kKeyTile + kW, a11);
  _mm256_store_ps(s + 2 * kKeyTile, a20); _mm256_store_ps(s + 2 * kKeyTile + kW, a21);
  _mm256_store_ps(s + 3 * kKeyTile, a30); _mm256_store_ps(s + 3 * kKeyTile + kW, a31);
}

LF_AVX2 void qk_tile(const float* q, const float* kt, int dim, int rows, float* s) {
  for (int r = 0; r < rows; r += kRowBlock) {
    const float* qr = q + static_cast<int64_t>(r) * dim;
    float* sr = s + static_cast<int64_t>(r) * kKeyTile;
    // 64 keys = 3 + 3 + 2 vectors.
    qk_block3(qr, kt, dim, sr);
    qk_block3(qr, kt + 3 * kW, dim, sr + 3 * kW);
    qk_block2(qr, kt + 6 * kW, dim, sr + 6 * kW);
  }
}

LF_AVX2 void softmax_tile(float* s, int rows, const float* key_bias, RowState st, const TileOptions& opt) {
  const int G = st.num_segments;
  const __m256 floor_t = _mm256_set1_ps(-200.0f);
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (int r = 0; r < rows; ++r) {
    float* sr = s + r * kKeyTile;
    __m256 x[kVecs];
    for (int c = 0; c < kVecs; ++c) x[c] = _mm256_add_ps(_mm256_load_ps(sr + c * kW), _mm256_load_ps(key_bias + c * kW));
    const __m256 m4 = _mm256_max_ps(_mm256_max_ps(_mm256_max_ps(x[0], x[1]), _mm256_max_ps(x[2], x[3])),
                                    _mm256_max_ps(_mm256_max_ps(x[4], x[5]), _mm256_max_ps(x[6], x[7])));
    const float tile_max = hmax(m4);
    if (tile_max == -INFINITY) {  // no live key for this row here: state unchanged
      const __m256 z = _mm256_setzero_ps();
      for (int c = 0; c < kVecs; ++c) _mm256_store_ps(sr + c * kW, z);
      st.alpha[r] = 1.0f;
      continue;
    }
    const float old_max = st.max[r];
    const float new_max = old_max > tile_max ? old_max : tile_max;
    const float alpha = old_max == -INFINITY ? 0.0f : exp2_scalar(old_max - new_max);
    const __m256 m = _mm256_set1_ps(new_max);
    __m256 p[kVecs];
    for (int c = 0; c < kVecs; ++c) {
      // -inf (masked) logits become -200, so p = 0 and p * t = 0 (never NaN).
      x[c] = _mm256_max_ps(_mm256_sub_ps(x[c], m), floor_t);
      p[c] = exp2_ps(x[c]);
      _mm256_store_ps(sr + c * kW, p[c]);
    }
    const float psum = hsum(tree_sum(p));
    const float old_norm = st.norm[r];
    st.norm[r] = old_norm * alpha + psum;
    if (opt.entropy) {
      __m256 pt = _mm256_mul_ps(p[0], x[0]);
      for (int c = 1; c < kVecs; ++c) pt = _mm256_fmadd_ps(p[c], x[c], pt);
      const float carried = old_norm > 0.0f ? alpha * (st.ent[r] + (old_max - new_max) * old_norm) : 0.0f;
      st.ent[r] = carried + hsum(pt);
    }
    if (opt.segments) {
      float* seg = st.seg + static_cast<int64_t>(r) * G;
      if (alpha != 1.0f)
        for (int g = 0; g < G; ++g) seg[g] *= alpha;
      if (opt.num_pieces == 1) {
        seg[opt.pieces[0].g] += psum;
      } else {
        for (int n = 0; n < opt.num_pieces; ++n) {
          if (opt.pieces[n].hi - opt.pieces[n].lo == 1) {  // one key: the masked sum would give p exactly
            seg[opt.pieces[n].g] += sr[opt.pieces[n].lo];
            continue;
          }
          const __m256i lo = _mm256_set1_epi32(opt.pieces[n].lo), hi = _mm256_set1_epi32(opt.pieces[n].hi);
          __m256 acc = _mm256_setzero_ps();
          for (int c = 0; c < kVecs; ++c) {
            const __m256i key = _mm256_add_epi32(lane, _mm256_set1_epi32(c * kW));
            // lo <= key < hi  <=>  key > lo - 1 and hi > key
            const __m256i in = _mm256_and_si256(_mm256_cmpgt_epi32(key, _mm256_sub_epi32(lo, _mm256_set1_epi32(1))),
                                                _mm256_cmpgt_epi32(hi, key));
            acc = _mm256_add_ps(acc, _mm256_and_ps(_mm256_castsi256_ps(in), p[c]));
          }
          seg[opt.pieces[n].g] += hsum(acc);
        }
      }
    }
    st.max[r] = new_max;
    st.alpha[r] = alpha;
  }
}

// o[r0..r0+3][c0 .. c0 + 8*NV) = alpha * o + p v, over the 64 keys of the tile.
template <int NV>
LF_AVX2 inline void pv_block(const float* p, const float* v, const float* alpha, int vdp, int keys, float* o) {
  __m256 acc[kRowBlock][NV];
  for (int rr = 0; rr < kRowBlock; ++rr) {
    const __m256 a = _mm256_set1_ps(alpha[rr]);
    for (int c = 0; c < NV; ++c) acc[rr][c] = _mm256_mul_ps(a, _mm256_load_ps(o + rr * vdp + c * kW));
  }
  const float* vj = v;
  for (int j = 0; j < keys; ++j, vj += vdp) {
    __m256 vv[NV];
    for (int c = 0; c < NV; ++c) vv[c] = _mm256_load_ps(vj + c * kW);
    for (int rr = 0; rr < kRowBlock; ++rr) {
      const __m256 b = _mm256_broadcast_ss(p + rr * kKeyTile + j);
      for (int c = 0; c < NV; ++c) acc[rr][c] = _mm256_fmadd_ps(b, vv[c], acc[rr][c]);
    }
  }
  for (int rr = 0; rr < kRowBlock; ++rr)
    for (int c = 0; c < NV; ++c) _mm256_store_ps(o + rr * vdp + c * kW, acc[rr][c]);
}

LF_AVX2 void pv_tile(const float* p, const float* v, const float* alpha, int rows, int vdim_padded, int keys,
                     float* o) {
  for (int r = 0; r < rows; r += kRowBlock) {
    const float* pr = p + r * kKeyTile;
    float* orow = o + static_cast<int64_t>(r) * vdim_padded;
    int c0 = 0;
    for (; c0 + 3 * kW <= vdim_padded; c0 += 3 * kW) pv_block<3>(pr, v + c0, alpha + r, vdim_padded, keys, orow + c0);
    switch ((vdim_padded - c0) / kW) {  // vdim_padded is a multiple of 16: 0 or 2 vectors remain
      case 2: pv_block<2>(pr, v + c0, alpha + r, vdim_padded, keys, orow + c0); break;
      case 1: pv_block<1>(pr, v + c0, alpha + r, vdim_padded, keys, orow + c0); break;
      default: break;
    }
  }
}

LF_AVX2 void key_mass_row(const float* s, const float* key_bias, float lse, float* acc) {
  const __m256 l = _mm256_set1_ps(lse);
  const __m256 floor_t = _mm256_set1_ps(-200.0f);
  for (int c = 0; c < kKeyTile; c += kW) {
    __m256 t = _mm256_sub_ps(_mm256_add_ps(_mm256_load_ps(s + c), _mm256_load_ps(key_bias + c)), l);
    t = _mm256_max_ps(t, floor_t);
    _mm256_store_ps(acc + c, _mm256_add_ps(_mm256_load_ps(acc + c), exp2_ps(t)));
  }
}

}  // namespace

const MicroKernels& avx2_kernels() {
  static const MicroKernels kernels{qk_tile, softmax_tile, pv_tile, key_mass_row};
  return kernels;
}

}  // namespace latentflow

#else  // not x86-64 GCC/Clang: no AVX2 path (cpu_has_avx2() is false, so this is never selected)

namespace latentflow {
const MicroKernels& avx2_kernels() { return generic_kernels(); }
}  // namespace latentflow

#endif
