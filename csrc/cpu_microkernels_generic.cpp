// Portable micro-kernels, for CPUs with neither AVX-512 nor AVX2 (old x86) and for non-x86 builds
// (aarch64 ...). They are written on a 4-lane float vector that GCC and Clang lower to the build
// target's BASELINE vector ISA (SSE2 on x86-64, NEON on aarch64) with no target flags and no
// -march=native, so the binary stays runnable on every CPU of its architecture; other compilers get
// a plain per-lane struct. Auto-vectorisation of plain loops was tried first: GCC 12 vectorised the
// register blocks across rows with shuffles and ran 10x slower than these explicit vectors.
//
// Same tiles, same 4-row blocks and the same per-element operation order in Q K^T and P V as the other
// paths (one multiply-add chain over d, resp. over the 64 keys); the same exp2 algorithm; own fixed
// orders for the horizontal sums. Without FMA in the baseline ISA (x86-64) the multiply-adds round
// twice, so the paths agree to rounding, not bitwise; within this path results are bitwise
// deterministic and batch / thread-count invariant like the others.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "cpu_microkernels.h"

namespace latentflow {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr int kW = 4;  // lanes of one vector
#if defined(__aarch64__) || defined(__ARM_NEON)
constexpr int kBlockVecs = 4;  // 32 vector registers: 4 rows x 4 vectors of accumulators
#else
constexpr int kBlockVecs = 2;  // 16 vector registers (SSE2): 4 rows x 2 vectors
#endif
constexpr int kChunk = kBlockVecs * kW;  // lanes per register block
static_assert(kKeyTile % kChunk == 0 && kLanes % kChunk == 0, "tiles must split into whole register blocks");

#if defined(__GNUC__) || defined(__clang__)
typedef float vf __attribute__((vector_size(16)));
typedef int32_t vi __attribute__((vector_size(16)));
inline vi as_int(vf a) { return (vi)a; }  // a cast between same-size vector types is a bit cast
inline vf as_float(vi a) { return (vf)a; }
inline vi to_int(vf a) { return __builtin_convertvector(a, vi); }
inline vi greater(vf a, vf b) { return a > b; }  // all-ones lanes where a > b
#else
struct vf {
  float v[kW];
  float operator[](int i) const { return v[i]; }
};
struct vi {
  int32_t v[kW];
};
inline vf operator+(vf a, vf b) { for (int i = 0; i < kW; ++i) a.v[i] += b.v[i]; return a; }
inline vf operator-(vf a, vf b) { for (int i = 0; i < kW; ++i) a.v[i] -= b.v[i]; return a; }
inline vf operator*(vf a, vf b) { for (int i = 0; i < kW; ++i) a.v[i] *= b.v[i]; return a; }
inline vi operator&(vi a, vi b) { for (int i = 0; i < kW; ++i) a.v[i] &= b.v[i]; return a; }
inline vi operator|(vi a, vi b) { for (int i = 0; i < kW; ++i) a.v[i] |= b.v[i]; return a; }
inline vi operator~(vi a) { for (int i = 0; i < kW; ++i) a.v[i] = ~a.v[i]; return a; }
inline vi operator+(vi a, vi b) { for (int i = 0; i < kW; ++i) a.v[i] += b.v[i]; return a; }
inline vi operator<<(vi a, int n) { for (int i = 0; i < kW; ++i) a.v[i] = static_cast<int32_t>(static_cast<uint32_t>(a.v[i]) << n); return a; }
inline vi as_int(vf a) { vi r; std::memcpy(&r, &a, sizeof r); return r; }
inline vf as_float(vi a) { vf r; std::memcpy(&r, &a, sizeof r); return r; }
inline vi to_int(vf a) { vi r; for (int i = 0; i < kW; ++i) r.v[i] = static_cast<int32_t>(a.v[i]); return r; }
inline vi greater(vf a, vf b) { vi r; for (int i = 0; i < kW; ++i) r.v[i] = a.v[i] > b.v[i] ? -1 : 0; return r; }
#endif

inline vf load(const float* p) { vf r; std::memcpy(&r, p, sizeof r); return r; }
inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
inline vf splat(float x) { return vf{x, x, x, x}; }
inline vi splat_int(int32_t x) { return vi{x, x, x, x}; }
inline vf select(vi mask, vf a, vf b) { return as_float((as_int(a) & mask) | (as_int(b) & ~mask)); }
inline vf vmax(vf a, vf b) { return select(greater(a, b), a, b); }
inline float hsum(vf a) { return (a[0] + a[1]) + (a[2] + a[3]); }
inline float hmax(vf a) {
  const float x = a[0] > a[1] ? a[0] : a[1], y = a[2] > a[3] ? a[2] : a[3];
  return x > y ? x : y;
}

// 2^x for x in [-200, 0], the vector paths' algorithm: round-to-nearest split x = n + f, degree-7
// polynomial of f, 2^n written into the exponent field. Exactly 0 below -126.
inline vf exp2_poly(vf x) {
  const vi alive = ~greater(splat(-126.0f), x);  // x >= -126
  x = vmax(x, splat(-127.0f));
  const vf magic = splat(12582912.0f);  // 1.5 * 2^23: (x + magic) - magic rounds |x| < 2^22 to nearest
  const vf n = (x + magic) - magic;
  const vf f = x - n;
  vf p = splat(1.5252733804059840e-05f);
  p = p * f + splat(1.5403530393381610e-04f);
  p = p * f + splat(1.3333558146428443e-03f);
  p = p * f + splat(9.6181291076284772e-03f);
  p = p * f + splat(5.5504108664821580e-02f);
  p = p * f + splat(2.4022650695910071e-01f);
  p = p * f + splat(6.9314718055994531e-01f);
  p = p * f + splat(1.0f);
  const vf scale = as_float((to_int(n) + splat_int(127)) << 23);
  return as_float(as_int(p * scale) & alive);
}

inline float exp2_clamped(float x) { return x < -126.0f ? 0.0f : std::exp2(x); }

// s[r0..r0+3][chunk] for one 4-row block: 4 x kBlockVecs accumulators, one multiply-add chain over d each.
inline void qk_block(const float* q, const float* kt, int dim, float* s) {
  vf acc[kRowBlock][kBlockVecs];
  for (int rr = 0; rr < kRowBlock; ++rr)
    for (int c = 0; c < kBlockVecs; ++c) acc[rr][c] = splat(0.0f);
  const float* kd = kt;
  for (int d = 0; d < dim; ++d, kd += kKeyTile) {
    vf kv[kBlockVecs];
    for (int c = 0; c < kBlockVecs; ++c) kv[c] = load(kd + c * kW);
    for (int rr = 0; rr < kRowBlock; ++rr) {
      const vf b = splat(q[rr * dim + d]);
      for (int c = 0; c < kBlockVecs; ++c) acc[rr][c] = acc[rr][c] + b * kv[c];
    }
  }
  for (int rr = 0; rr < kRowBlock; ++rr)
    for (int c = 0; c < kBlockVecs; ++c) store(s + rr * kKeyTile + c * kW, acc[rr][c]);
}

void qk_tile(const float* q, const float* kt, int dim, int rows, float* s) {
  for (int r = 0; r < rows; r += kRowBlock)
    for (int c0 = 0; c0 < kKeyTile; c0 += kChunk)
      qk_block(q + static_cast<int64_t>(r) * dim, kt + c0, dim, s + static_cast<int64_t>(r) * kKeyTile + c0);
}

void softmax_tile(float* s, int rows, const float* key_bias, RowState st, const TileOptions& opt) {
  const int G = st.num_segments;
  for (int r = 0; r < rows; ++r) {
    float* sr = s + r * kKeyTile;
    // Two streaming passes over the row (a whole row in registers would not fit the 16 of SSE2).
    vf m0 = splat(kNegInf), m1 = m0;
    for (int c = 0; c < kKeyTile; c += 2 * kW) {
      const vf x0 = load(sr + c) + load(key_bias + c), x1 = load(sr + c + kW) + load(key_bias + c + kW);
      store(sr + c, x0);
      store(sr + c + kW, x1);
      m0 = vmax(m0, x0);
      m1 = vmax(m1, x1);
    }
    const float tile_max = hmax(vmax(m0, m1));
    if (tile_max == kNegInf) {  // no live key for this row here: state unchanged
      for (int j = 0; j < kKeyTile; ++j) sr[j] = 0.0f;
      st.alpha[r] = 1.0f;
      continue;
    }
    const float old_max = st.max[r];
    const float new_max = old_max > tile_max ? old_max : tile_max;
    const float alpha = old_max == kNegInf ? 0.0f : exp2_clamped(old_max - new_max);
    const vf nm = splat(new_max), floor_t = splat(-200.0f);
    // Two interleaved accumulators per sum (even / odd vectors), combined at the end: a fixed order.
    vf s0 = splat(0.0f), s1 = s0, e0 = s0, e1 = s0;
    for (int c = 0; c < kKeyTile; c += 2 * kW) {
      // -inf (masked) logits become -200, so p = 0 and p * t = 0 (never NaN).
      const vf t0 = vmax(load(sr + c) - nm, floor_t), t1 = vmax(load(sr + c + kW) - nm, floor_t);
      const vf p0 = exp2_poly(t0), p1 = exp2_poly(t1);
      store(sr + c, p0);
      store(sr + c + kW, p1);
      s0 = s0 + p0;
      s1 = s1 + p1;
      e0 = e0 + p0 * t0;
      e1 = e1 + p1 * t1;
    }
    const float psum = hsum(s0 + s1);
    const float old_norm = st.norm[r];
    st.norm[r] = old_norm * alpha + psum;
    if (opt.entropy) {
      const float carried = old_norm > 0.0f ? alpha * (st.ent[r] + (old_max - new_max) * old_norm) : 0.0f;
      st.ent[r] = carried + hsum(e0 + e1);
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

// o[r0..r0+3][chunk] = alpha * o + p v over the 64 keys of the tile.
inline void pv_block(const float* p, const float* v, const float* alpha, int vdp, int keys, float* o) {
  vf acc[kRowBlock][kBlockVecs];
  for (int rr = 0; rr < kRowBlock; ++rr) {
    const vf a = splat(alpha[rr]);
    for (int c = 0; c < kBlockVecs; ++c) acc[rr][c] = a * load(o + rr * vdp + c * kW);
  }
  const float* vj = v;
  for (int j = 0; j < keys; ++j, vj += vdp) {
    vf vv[kBlockVecs];
    for (int c = 0; c < kBlockVecs; ++c) vv[c] = load(vj + c * kW);
    for (int rr = 0; rr < kRowBlock; ++rr) {
      const vf b = splat(p[rr * kKeyTile + j]);
      for (int c = 0; c < kBlockVecs; ++c) acc[rr][c] = acc[rr][c] + b * vv[c];
    }
  }
  for (int rr = 0; rr < kRowBlock; ++rr)
    for (int c = 0; c < kBlockVecs; ++c) store(o + rr * vdp + c * kW, acc[rr][c]);
}

void pv_tile(const float* p, const float* v, const float* alpha, int rows, int vdim_padded, int keys, float* o) {
  for (int r = 0; r < rows; r += kRowBlock) {
    float* orow = o + static_cast<int64_t>(r) * vdim_padded;
    for (int c0 = 0; c0 < vdim_padded; c0 += kChunk)
      pv_block(p + r * kKeyTile, v + c0, alpha + r, vdim_padded, keys, orow + c0);
  }
}

void key_mass_row(const float* s, const float* key_bias, float lse, float* acc) {
  const vf l = splat(lse), floor_t = splat(-200.0f);
  for (int c = 0; c < kKeyTile; c += kW) {
    const vf t = vmax(load(s + c) + load(key_bias + c) - l, floor_t);
    store(acc + c, load(acc + c) + exp2_poly(t));
  }
}

}  // namespace

const MicroKernels& generic_kernels() {
  static const MicroKernels kernels{qk_tile, softmax_tile, pv_tile, key_mass_row};
  return kernels;
}

}  // namespace latentflow
