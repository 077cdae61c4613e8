// Driver of the fused CPU probed-attention kernel.
//
// The (b, kv head) pairs are processed in chunks whose packed operands fit a fixed budget (one buffer,
// reused chunk after chunk: bounded extra memory, few page faults). Per chunk, three phases, each a
// parallel_for over fixed-size tiles, so results never depend on the batch, the chunking or the threads:
//   1. pack K (transposed, [D][64] per key tile) and V ([64][Dv padded to 16]) as float32;
//   2. forward: per (b, h, 64-query tile) an online softmax over 64-key tiles, with every capture and
//      intervention applied inside the tile loop (no Nq x Nk map). Query-dependent masks (causal,
//      attn_mask) are applied to the logit tile before the softmax; key tiles that they mask entirely
//      are skipped (causal: the loop stops at the diagonal, so causal attention costs about half);
//   3. key_mass (only when asked): per (b, h, 64-key tile) recompute q.k with the final lse and sum p over
//      the query tiles in order (a split-then-fixed-order reduction: no atomics).
#include "probed_attention_cpu.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu_dtype.h"
#include "cpu_microkernels.h"
#include "cpu_parallel.h"

namespace latentflow {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

struct F32 {
  using Storage = float;
  static float load(Storage x) { return x; }
  static Storage store(float x) { return x; }
};
struct BF16 {
  using Storage = uint16_t;
  static float load(Storage x) { return bf16_to_float(x); }
  static Storage store(float x) { return float_to_bf16(x); }
};
struct F16 {
  using Storage = uint16_t;
  static float load(Storage x) { return fp16_to_float(x); }
  static Storage store(float x) { return float_to_fp16(x); }
};

struct FreeDeleter {
  void operator()(void* p) const { std::free(p); }
};
using FloatBuffer = std::unique_ptr<float[], FreeDeleter>;

// 64-byte aligned float buffer, zero-initialised unless `zero` is false (then every read region must
// be written first).
FloatBuffer aligned_floats(int64_t count, bool zero = true) {
  const size_t bytes = static_cast<size_t>(((std::max<int64_t>(count, 1) * 4 + 63) / 64) * 64);
  void* p = std::aligned_alloc(64, bytes);
  if (!p) throw std::bad_alloc();
  if (zero) std::fill(static_cast<char*>(p), static_cast<char*>(p) + bytes, 0);
  return FloatBuffer(static_cast<float*>(p));
}

// Packed operands of one chunk of kv heads stay below this (unless one kv head alone needs more).
constexpr int64_t kChunkBudgetFloats = int64_t{2} << 20;  // 8 MiB

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Per-call constants and packed operands shared by all tasks.
struct Layout {
  int64_t B, H, Hkv, Nq, Nk, D, Dv, G, group;
  int64_t q_tiles, k_tiles, dv_padded;
  int64_t kt_tile_floats, v_tile_floats;
};

// Per-worker scratch of the forward and key_mass phases.
struct Scratch {
  FloatBuffer q, s, o, key_bias, row_max, row_norm, row_ent, row_alpha, row_seg, acc;
  std::unique_ptr<SegmentPiece[]> pieces;
  explicit Scratch(const Layout& L)
      : q(aligned_floats(kQueryTile * L.D)),
        s(aligned_floats(kQueryTile * kKeyTile)),
        o(aligned_floats(kQueryTile * L.dv_padded)),
        key_bias(aligned_floats(kKeyTile)),
        row_max(aligned_floats(kQueryTile)),
        row_norm(aligned_floats(kQueryTile)),
        row_ent(aligned_floats(kQueryTile)),
        row_alpha(aligned_floats(kQueryTile)),
        row_seg(aligned_floats(kQueryTile * std::max<int64_t>(L.G, 1))),
        acc(aligned_floats(kKeyTile)),
        pieces(new SegmentPiece[kKeyTile]) {}
};

template <typename T>
class Runner {
 public:
  using Storage = typename T::Storage;

  Runner(const ProbedAttentionCpuArgs& a, const MicroKernels& mk) : a_(a), mk_(mk) {
    L_.B = a.batch; L_.H = a.heads; L_.Hkv = a.kv_heads; L_.Nq = a.num_queries; L_.Nk = a.num_keys;
    L_.D = a.head_dim; L_.Dv = a.value_dim; L_.G = a.segments ? a.num_segments : 0;
    L_.group = L_.H / L_.Hkv;
    L_.q_tiles = ceil_div(L_.Nq, kQueryTile);
    L_.k_tiles = ceil_div(L_.Nk, kKeyTile);
    L_.dv_padded = ceil_div(L_.Dv, kLanes) * kLanes;
    L_.kt_tile_floats = L_.D * kKeyTile;
    L_.v_tile_floats = kKeyTile * L_.dv_padded;
    want_stats_ = a.lse || a.max || a.entropy || a.segment_mass || a.key_mass;
    query_masks_ = a.causal || a.attn_mask_bool || a.attn_mask_float;
  }

  void run() {
    const int threads = std::max(1, a_.num_threads);
    const int64_t total = L_.B * L_.Hkv;  // kv heads, indexed bk = b * Hkv + hk
    const int64_t q_floats = L_.group * L_.q_tiles * kQueryTile * L_.D;  // scaled queries of one kv head's group
    const int64_t per_kv_head = L_.k_tiles * (L_.kt_tile_floats + L_.v_tile_floats) +
                                (a_.key_mass ? q_floats + L_.group * L_.Nq : 0);
    chunk_ = std::max<int64_t>(1, std::min<int64_t>(total, kChunkBudgetFloats / per_kv_head));
    // Not zeroed: packing writes every tile in full (padding included), and the forward pass writes every
    // query row and lse the key_mass pass reads.
    k_packed_ = aligned_floats(chunk_ * L_.k_tiles * L_.kt_tile_floats, false);
    v_packed_ = aligned_floats(chunk_ * L_.k_tiles * L_.v_tile_floats, false);
    if (a_.key_mass) {  // the second pass re-reads the scaled queries and the base-2 lse of every row
      q_packed_ = aligned_floats(chunk_ * q_floats, false);
      lse2_ = aligned_floats(chunk_ * L_.group * L_.Nq, false);
    }
    std::vector<std::unique_ptr<Scratch>> scratch(threads);
    auto scratch_of = [&](int worker) -> Scratch& {
      if (!scratch[worker]) scratch[worker] = std::make_unique<Scratch>(L_);
      return *scratch[worker];
    };
    for (int64_t first = 0; first < total; first += chunk_) {
      const int64_t count = std::min(chunk_, total - first);
      parallel_for(count * L_.k_tiles, threads, [&](int, int64_t t) { pack_kv(first, t); });
      parallel_for(count * L_.group * L_.q_tiles, threads,
                   [&](int w, int64_t t) { forward_tile(scratch_of(w), first, t); });
      if (a_.key_mass)
        parallel_for(count * L_.group * L_.k_tiles, threads,
                     [&](int w, int64_t t) { key_mass_tile(scratch_of(w), first, t); });
    }
  }

 private:
  const ProbedAttentionCpuArgs& a_;
  const MicroKernels& mk_;
  Layout L_{};
  bool want_stats_ = false;
  bool query_masks_ = false;  // causal or attn_mask
  int64_t chunk_ = 1;  // kv heads per chunk
  // Indexed by the kv head's slot in the chunk (bk - first) and, for queries, the head within its group.
  FloatBuffer k_packed_, v_packed_, q_packed_, lse2_;

  static float load(const void* base, int64_t offset) { return T::load(static_cast<const Storage*>(base)[offset]); }

  float* kt_tile(int64_t slot, int64_t kt) const { return k_packed_.get() + (slot * L_.k_tiles + kt) * L_.kt_tile_floats; }
  float* v_tile(int64_t slot, int64_t kt) const { return v_packed_.get() + (slot * L_.k_tiles + kt) * L_.v_tile_floats; }
  // Slot of head (slot, head-in-group gi) for the per-query buffers of the key_mass pass.
  int64_t query_slot(int64_t slot, int64_t gi) const { return slot * L_.group + gi; }

  // Phase 1: one key tile of one kv head, converted to float32; padding keys and lanes written as zero.
  void pack_kv(int64_t first, int64_t task) {
    const int64_t slot = task / L_.k_tiles, kt = task % L_.k_tiles;
    const int64_t bk = first + slot, b = bk / L_.Hkv, hk = bk % L_.Hkv;
    const int64_t k0 = kt * kKeyTile, keys = std::min<int64_t>(kKeyTile, L_.Nk - k0);
    float* kd = kt_tile(slot, kt);
    float* vd = v_tile(slot, kt);
    const auto& ks = a_.k_strides;
    const auto& vs = a_.v_strides;
    for (int64_t j = 0; j < keys; ++j) {
      const int64_t kbase = b * ks[0] + hk * ks[1] + (k0 + j) * ks[2];
      load_row(a_.k, kbase, ks[3], L_.D, kKeyTile, kd + j);
      const int64_t vbase = b * vs[0] + hk * vs[1] + (k0 + j) * vs[2];
      float* vrow = vd + j * L_.dv_padded;
      load_row(a_.v, vbase, vs[3], L_.Dv, 1, vrow);
      std::fill(vrow + L_.Dv, vrow + L_.dv_padded, 0.0f);
    }
    if (keys < kKeyTile) {
      for (int64_t d = 0; d < L_.D; ++d) std::fill(kd + d * kKeyTile + keys, kd + (d + 1) * kKeyTile, 0.0f);
      std::fill(vd + keys * L_.dv_padded, vd + L_.v_tile_floats, 0.0f);
    }
  }

  // dst[c * dst_stride] = src[base + c * stride] for c < count, with a unit-stride fast path the
  // compiler can vectorise (the common layout).
  static void load_row(const void* src, int64_t base, int64_t stride, int64_t count, int64_t dst_stride, float* dst) {
    const Storage* p = static_cast<const Storage*>(src) + base;
    if (stride == 1 && dst_stride == 1) {
      for (int64_t c = 0; c < count; ++c) dst[c] = T::load(p[c]);
    } else if (stride == 1) {
      for (int64_t c = 0; c < count; ++c) dst[c * dst_stride] = T::load(p[c]);
    } else {
      for (int64_t c = 0; c < count; ++c) dst[c * dst_stride] = T::load(p[c * stride]);
    }
  }

  // Bias of every key of tile kt for row (b, h) in base-2 units (segment bias, -inf for masked and padding
  // keys) and the segments the tile covers. Returns false when no key of the tile is live.
  bool key_tile_bias(int64_t b, int64_t bh, int64_t kt, float* bias, SegmentPiece* pieces, int* num_pieces) const {
    const int64_t k0 = kt * kKeyTile;
    const int keys = static_cast<int>(std::min<int64_t>(kKeyTile, L_.Nk - k0));
    std::fill(bias, bias + kKeyTile, kNegInf);
    *num_pieces = 0;
    if (L_.G > 0) {
      const int64_t* seg = a_.segments;
      int64_t g = std::upper_bound(seg, seg + L_.G + 1, k0) - seg - 1;  // segment holding key k0
      for (; g < L_.G && seg[g] < k0 + keys; ++g) {
        const int lo = static_cast<int>(std::max<int64_t>(seg[g], k0) - k0);
        const int hi = static_cast<int>(std::min<int64_t>(seg[g + 1], k0 + keys) - k0);
        pieces[(*num_pieces)++] = SegmentPiece{static_cast<int>(g), lo, hi};
        const float value = a_.segment_bias ? a_.segment_bias[bh * L_.G + g] * kLog2e : 0.0f;
        std::fill(bias + lo, bias + hi, value);
      }
    } else {
      std::fill(bias, bias + keys, 0.0f);
    }
    if (a_.key_padding_mask) {
      const bool* mask = a_.key_padding_mask + b * L_.Nk + k0;
      for (int j = 0; j < keys; ++j)
        if (!mask[j]) bias[j] = kNegInf;
    }
    for (int j = 0; j < keys; ++j)
      if (bias[j] != kNegInf) return true;
    return false;
  }

  // How the query-dependent masks (causal, attn_mask) touch the tile (query rows [q0, q0 + rows), key
  // tile kt) of row (b, h): kEmpty = every pair masked (the tile is skipped), kPartial = some pairs
  // masked or biased (apply_query_mask must run), kNone = nothing to do.
  enum TileMask { kNone, kPartial, kEmpty };

  const bool* mask_bool(int64_t b, int64_t h) const {
    return a_.attn_mask_bool + b * a_.attn_mask_batch_stride + h * a_.attn_mask_head_stride;
  }
  const float* mask_float(int64_t b, int64_t h) const {
    return a_.attn_mask_float + b * a_.attn_mask_batch_stride + h * a_.attn_mask_head_stride;
  }

  TileMask query_mask_kind(int64_t b, int64_t h, int64_t q0, int64_t rows, int64_t kt) const {
    const int64_t k0 = kt * kKeyTile;
    const int64_t keys = std::min<int64_t>(kKeyTile, L_.Nk - k0);
    TileMask kind = kNone;
    if (a_.causal) {
      if (k0 > q0 + rows - 1 + a_.causal_offset) return kEmpty;            // above the last row's diagonal
      if (k0 + keys - 1 > q0 + a_.causal_offset) kind = kPartial;          // crosses the first row's diagonal
    }
    if (a_.attn_mask_bool) {
      const bool* m = mask_bool(b, h);
      bool any = false, all = true;
      for (int64_t r = 0; r < rows; ++r) {
        const bool* row = m + (q0 + r) * L_.Nk + k0;
        for (int64_t j = 0; j < keys; ++j) {
          any |= row[j];
          all &= row[j];
        }
      }
      if (!any) return kEmpty;
      if (!all) kind = kPartial;
    } else if (a_.attn_mask_float) {
      const float* m = mask_float(b, h);
      bool any = false;
      for (int64_t r = 0; r < rows && !any; ++r) {
        const float* row = m + (q0 + r) * L_.Nk + k0;
        for (int64_t j = 0; j < keys; ++j) any |= row[j] != kNegInf;
      }
      if (!any) return kEmpty;
      kind = kPartial;
    }
    return kind;
  }

  // Masks the base-2 logit tile s [rows4][kKeyTile] in place: -inf for pairs the causal or bool mask
  // blocks, + attn_mask * log2(e) for a float mask. Rows past `rows` are padding and left alone.
  void apply_query_mask(int64_t b, int64_t h, int64_t q0, int64_t rows, int64_t kt, float* s) const {
    const int64_t k0 = kt * kKeyTile;
    const int64_t keys = std::min<int64_t>(kKeyTile, L_.Nk - k0);
    for (int64_t r = 0; r < rows; ++r) {
      float* sr = s + r * kKeyTile;
      if (a_.attn_mask_bool) {
        const bool* row = mask_bool(b, h) + (q0 + r) * L_.Nk + k0;
        for (int64_t j = 0; j < keys; ++j)
          if (!row[j]) sr[j] = kNegInf;
      } else if (a_.attn_mask_float) {
        const float* row = mask_float(b, h) + (q0 + r) * L_.Nk + k0;
        for (int64_t j = 0; j < keys; ++j) sr[j] += row[j] * kLog2e;
      }
      if (a_.causal) {  // keys j > i + offset, i.e. local index > q0 + r + offset - k0
        const int64_t first_blocked = std::max<int64_t>(0, q0 + r + a_.causal_offset - k0 + 1);
        for (int64_t j = first_blocked; j < keys; ++j) sr[j] = kNegInf;
      }
    }
  }

  // Key tiles [0, end) can hold a key some row of the query tile sees under the causal mask.
  int64_t causal_tile_end(int64_t q0, int64_t rows) const {
    if (!a_.causal) return L_.k_tiles;
    const int64_t last_visible = q0 + rows - 1 + a_.causal_offset;  // of the tile's last row
    if (last_visible < 0) return 0;
    return std::min<int64_t>(L_.k_tiles, last_visible / kKeyTile + 1);
  }

  // Scaled base-2 query rows of one tile; rows past Nq (up to a multiple of kRowBlock) are zero.
  void pack_queries(int64_t b, int64_t h, int64_t q0, int64_t rows, int64_t rows4, float qscale, float* dst) const {
    const auto& qs = a_.q_strides;
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t base = b * qs[0] + h * qs[1] + (q0 + r) * qs[2];
      float* row = dst + r * L_.D;
      load_row(a_.q, base, qs[3], L_.D, 1, row);
      for (int64_t d = 0; d < L_.D; ++d) row[d] *= qscale;
    }
    std::fill(dst + rows * L_.D, dst + rows4 * L_.D, 0.0f);
  }

  // Phase 2: one (b, h, query tile).
  void forward_tile(Scratch& sc, int64_t first, int64_t task) {
    const int64_t slot = task / (L_.group * L_.q_tiles), gi = (task / L_.q_tiles) % L_.group, qt = task % L_.q_tiles;
    const int64_t bk = first + slot, b = bk / L_.Hkv, h = (bk % L_.Hkv) * L_.group + gi;
    const int64_t bh = b * L_.H + h, qs = query_slot(slot, gi);
    const int64_t q0 = qt * kQueryTile;
    const int64_t rows = std::min<int64_t>(kQueryTile, L_.Nq - q0);
    const int rows4 = static_cast<int>(ceil_div(rows, kRowBlock) * kRowBlock);
    const bool patched = a_.patch_mask && a_.patch_mask[bh];
    const float gate = a_.head_gate ? a_.head_gate[bh] : 1.0f;
    // A patched or fully gated head needs no attention unless a capture describes its distribution.
    const bool attend = want_stats_ || !(patched || gate == 0.0f);

    RowState st{sc.row_max.get(), sc.row_norm.get(), sc.row_ent.get(), sc.row_seg.get(), sc.row_alpha.get(),
                static_cast<int>(L_.G)};
    std::fill(st.max, st.max + kQueryTile, kNegInf);
    std::fill(st.norm, st.norm + kQueryTile, 0.0f);
    std::fill(st.ent, st.ent + kQueryTile, 0.0f);
    std::fill(st.seg, st.seg + kQueryTile * std::max<int64_t>(L_.G, 1), 0.0f);
    float* o = sc.o.get();
    if (attend) {
      const float qscale = a_.scale * (a_.logit_scale ? a_.logit_scale[bh] : 1.0f) * kLog2e;
      float* qtile = a_.key_mass ? q_packed_.get() + (qs * L_.q_tiles + qt) * kQueryTile * L_.D : sc.q.get();
      pack_queries(b, h, q0, rows, rows4, qscale, qtile);
      std::fill(o, o + rows4 * L_.dv_padded, 0.0f);
      TileOptions opt{a_.entropy != nullptr, a_.segment_mass != nullptr, sc.pieces.get(), 0};
      const int64_t kt_end = causal_tile_end(q0, rows);  // causal: tiles past the diagonal are never read
      for (int64_t kt = 0; kt < kt_end; ++kt) {
        const TileMask qmask = query_masks_ ? query_mask_kind(b, h, q0, rows, kt) : kNone;
        if (qmask == kEmpty) continue;
        if (!key_tile_bias(b, bh, kt, sc.key_bias.get(), sc.pieces.get(), &opt.num_pieces)) continue;
        mk_.qk_tile(qtile, kt_tile(slot, kt), static_cast<int>(L_.D), rows4, sc.s.get());
        if (qmask == kPartial) apply_query_mask(b, h, q0, rows, kt, sc.s.get());
        mk_.softmax_tile(sc.s.get(), rows4, sc.key_bias.get(), st, opt);
        mk_.pv_tile(sc.s.get(), v_tile(slot, kt), st.alpha, rows4, static_cast<int>(L_.dv_padded),
                    static_cast<int>(std::min<int64_t>(kKeyTile, L_.Nk - kt * kKeyTile)), o);
      }
    }
    finish_rows(sc, st, b, h, bh, qs, q0, rows, patched, gate, attend);
  }

  // Normalise, apply patch / gate / bias, write the output rows and the captures of one query tile.
  void finish_rows(Scratch& sc, const RowState& st, int64_t b, int64_t h, int64_t bh, int64_t qs, int64_t q0, int64_t rows,
                   bool patched, float gate, bool attend) {
    Storage* out = static_cast<Storage*>(a_.out);
    const float* bias = a_.out_bias ? a_.out_bias + bh * L_.Dv : nullptr;
    const auto& ps = a_.out_patch_strides;
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t i = q0 + r;
      const float norm = attend ? st.norm[r] : 0.0f;
      const float inv = norm > 0.0f ? 1.0f / norm : 0.0f;
      const float* orow = sc.o.get() + r * L_.dv_padded;
      Storage* dst = out + (bh * L_.Nq + i) * L_.Dv;
      const int64_t pbase = b * ps[0] + h * ps[1] + i * ps[2];
      for (int64_t c = 0; c < L_.Dv; ++c) {
        float value = patched ? load(a_.out_patch, pbase + c * ps[3]) : orow[c] * inv;
        if (a_.head_gate) value *= gate;
        if (bias) value += bias[c];
        dst[c] = T::store(value);
      }
      if (!want_stats_) continue;
      const int64_t row = bh * L_.Nq + i;
      const bool alive = norm > 0.0f;
      const float log2_norm = alive ? std::log2(norm) : 0.0f;
      const float lse2 = alive ? st.max[r] + log2_norm : kNegInf;
      if (a_.lse) a_.lse[row] = lse2 * kLn2;
      if (a_.max) a_.max[row] = st.max[r] * kLn2;
      if (a_.entropy) a_.entropy[row] = alive ? kLn2 * (log2_norm - st.ent[r] * inv) : 0.0f;
      if (a_.segment_mass) {
        const float* seg = st.seg + r * L_.G;
        float* dst_seg = a_.segment_mass + row * L_.G;
        for (int64_t g = 0; g < L_.G; ++g) dst_seg[g] = seg[g] * inv;
      }
      if (a_.key_mass) lse2_[qs * L_.Nq + i] = lse2;
    }
  }

  // Phase 3: attention received by one key tile of row (b, h), summed over query tiles in order.
  void key_mass_tile(Scratch& sc, int64_t first, int64_t task) {
    const int64_t slot = task / (L_.group * L_.k_tiles), gi = (task / L_.k_tiles) % L_.group, kt = task % L_.k_tiles;
    const int64_t bk = first + slot, b = bk / L_.Hkv, h = (bk % L_.Hkv) * L_.group + gi;
    const int64_t bh = b * L_.H + h, qs = query_slot(slot, gi);
    float* acc = sc.acc.get();
    std::fill(acc, acc + kKeyTile, 0.0f);
    int num_pieces = 0;
    if (key_tile_bias(b, bh, kt, sc.key_bias.get(), sc.pieces.get(), &num_pieces)) {
      for (int64_t qt = 0; qt < L_.q_tiles; ++qt) {
        const int64_t q0 = qt * kQueryTile;
        const int64_t rows = std::min<int64_t>(kQueryTile, L_.Nq - q0);
        const int rows4 = static_cast<int>(ceil_div(rows, kRowBlock) * kRowBlock);
        const float* lse2 = lse2_.get() + qs * L_.Nq + q0;
        const float* qtile = q_packed_.get() + (qs * L_.q_tiles + qt) * kQueryTile * L_.D;
        const TileMask qmask = query_masks_ ? query_mask_kind(b, h, q0, rows, kt) : kNone;
        if (qmask == kEmpty) continue;  // fixed order kept: skipping adds nothing
        mk_.qk_tile(qtile, kt_tile(slot, kt), static_cast<int>(L_.D), rows4, sc.s.get());
        if (qmask == kPartial) apply_query_mask(b, h, q0, rows, kt, sc.s.get());
        for (int64_t r = 0; r < rows; ++r)
          if (lse2[r] != kNegInf) mk_.key_mass_row(sc.s.get() + r * kKeyTile, sc.key_bias.get(), lse2[r], acc);
      }
    }
    const int64_t k0 = kt * kKeyTile;
    const int64_t keys = std::min<int64_t>(kKeyTile, L_.Nk - k0);
    std::copy(acc, acc + keys, a_.key_mass + bh * L_.Nk + k0);
  }
};

void require(bool ok, const std::string& message) {
  if (!ok) throw std::invalid_argument(message);
}

}  // namespace

bool cpu_has_avx512() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
                          __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
                          __builtin_cpu_supports("fma");
  return has;
#else
  return false;
#endif
}

bool cpu_has_avx2() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  // __builtin_cpu_supports also checks that the OS saves the ymm state (XCR0), not just CPUID.
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
#else
  return false;
#endif
}

const char* isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::Auto: return "auto";
    case CpuIsa::Avx512: return "avx512";
    case CpuIsa::Avx2: return "avx2";
    case CpuIsa::Generic: return "generic";
  }
  return "unknown";
}

CpuIsa resolve_isa(CpuIsa isa) {
  const int code = static_cast<int>(isa);
  require(code >= 0 && code <= 3, "isa must be auto, avx512, avx2 or generic");
  require(isa != CpuIsa::Avx512 || cpu_has_avx512(), "isa: this CPU has no AVX-512 (avx512f/dq/bw/vl + fma)");
  require(isa != CpuIsa::Avx2 || cpu_has_avx2(), "isa: this CPU has no AVX2 + FMA");
  if (isa != CpuIsa::Auto) return isa;
  if (cpu_has_avx512()) return CpuIsa::Avx512;
  if (cpu_has_avx2()) return CpuIsa::Avx2;
  return CpuIsa::Generic;
}

void check_args(const ProbedAttentionCpuArgs& a) {
  require(a.batch >= 1, "batch must be >= 1");
  require(a.heads >= 1 && a.kv_heads >= 1, "heads and kv_heads must be >= 1");
  require(a.heads % a.kv_heads == 0, "heads must be a multiple of kv_heads");
  require(a.num_queries >= 1, "num_queries must be >= 1");
  require(a.num_keys >= 1, "num_keys must be >= 1");
  require(a.head_dim >= 1 && a.value_dim >= 1, "head_dim and value_dim must be >= 1");
  require(a.head_dim <= (1 << 20) && a.value_dim <= (1 << 20), "head_dim/value_dim too large");
  require(a.q && a.k && a.v, "q, k and v must not be null");
  require(a.out, "out must not be null");
  const int dtype = static_cast<int>(a.dtype);
  require(dtype >= 0 && dtype <= 2, "dtype must be float32, bfloat16 or float16");
  if (a.segments) {
    require(a.num_segments >= 1, "segments: G must be >= 1");
    require(a.segments[0] == 0, "segments must start at 0");
    for (int64_t g = 0; g < a.num_segments; ++g)
      require(a.segments[g + 1] > a.segments[g], "segments must be strictly increasing");
    require(a.segments[a.num_segments] == a.num_keys, "segments must end at num_keys");
  }
  require(!a.segment_bias || a.segments, "segment_bias needs segments");
  require(!a.segment_mass || a.segments, "segment_mass needs segments");
  require(!a.out_patch || a.patch_mask, "out_patch needs patch_mask");
  require(!a.patch_mask || a.out_patch, "patch_mask needs out_patch");
  require(!(a.attn_mask_bool && a.attn_mask_float), "attn_mask: pass a bool or a float mask, not both");
  require(a.attn_mask_batch_stride >= 0 && a.attn_mask_head_stride >= 0, "attn_mask strides must be >= 0");
  resolve_isa(a.isa);
}

void probed_attention_cpu(const ProbedAttentionCpuArgs& args) {
  check_args(args);
  const CpuIsa isa = resolve_isa(args.isa);
  const MicroKernels& mk = isa == CpuIsa::Avx512 ? avx512_kernels()
                           : isa == CpuIsa::Avx2 ? avx2_kernels()
                                                 : generic_kernels();
  switch (args.dtype) {
    case ScalarType::Float32: Runner<F32>(args, mk).run(); break;
    case ScalarType::BFloat16: Runner<BF16>(args, mk).run(); break;
    case ScalarType::Float16: Runner<F16>(args, mk).run(); break;
  }
}

}  // namespace latentflow
