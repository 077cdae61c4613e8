// The ISA-specific inner loops of the CPU kernel, behind one table so the driver is written once.
//
// Every tile has FIXED sizes (kQueryTile x kKeyTile) that depend on nothing but these constants, so a
// row's result never depends on the batch, the thread count or the ISA dispatch of other rows.
// Logits are kept in base 2 (q is pre-multiplied by scale * logit_scale * log2(e)) so the softmax
// uses exp2 directly; captures are converted back to nats at the end.
#pragma once

#include <cstdint>

namespace latentflow {

constexpr int kQueryTile = 64;  // query rows per task (the unit of parallelism)
constexpr int kKeyTile = 64;    // keys per tile of the online softmax (4 AVX-512 / 8 AVX2 vectors)
constexpr int kRowBlock = 4;    // query rows per register block of the micro-kernels
constexpr int kLanes = 16;      // value dims are padded to a multiple (one AVX-512 / two AVX2 vectors)

// A run of keys [lo, hi) of one key tile that belongs to segment g.
struct SegmentPiece {
  int g, lo, hi;
};

// Running online-softmax state of the rows of one query tile (arrays of kQueryTile entries).
struct RowState {
  float* max;      // running max of the base-2 logits (-inf until a live key is seen)
  float* norm;     // sum_j 2^(s_j - max)
  float* ent;      // sum_j 2^(s_j - max) * (s_j - max)        (entropy numerator, base 2)
  float* seg;      // [row][G] per-segment normalisers, rescaled like norm
  float* alpha;    // per row: rescale factor of this tile (old state * alpha)
  int num_segments;
};

struct TileOptions {
  bool entropy;
  bool segments;
  const SegmentPiece* pieces;  // segments of this key tile, in key order
  int num_pieces;
};

struct MicroKernels {
  // s[r][j] = sum_d q[r][d] * kt[d][j] for r < rows (a multiple of kRowBlock), j < kKeyTile.
  // q rows have stride `dim`; kt is [dim][kKeyTile]; s is [rows][kKeyTile].
  void (*qk_tile)(const float* q, const float* kt, int dim, int rows, float* s);
  // In place: s <- p = 2^(s + key_bias - new_max); updates state and writes state.alpha.
  void (*softmax_tile)(float* s, int rows, const float* key_bias, RowState state, const TileOptions& opt);
  // o[r][:] = alpha[r] * o[r][:] + sum_{j < keys} p[r][j] * v[j][:], o and v rows of vdim_padded floats.
  // `keys` = the tile's keys that exist (< kKeyTile only in the last tile): the padding keys' p and v are
  // +0, so their terms could only add +0; skipping them changes no bit and saves most of the work when
  // Nk is small (cross-attention over a few text tokens).
  void (*pv_tile)(const float* p, const float* v, const float* alpha, int rows, int vdim_padded, int keys,
                  float* o);
  // acc[j] += 2^(s[j] + key_bias[j] - lse) for one query row (key_mass second pass).
  void (*key_mass_row)(const float* s, const float* key_bias, float lse, float* acc);
};

const MicroKernels& generic_kernels();
const MicroKernels& avx512_kernels();  // only call when cpu_has_avx512()
const MicroKernels& avx2_kernels();    // only call when cpu_has_avx2()

}  // namespace latentflow
