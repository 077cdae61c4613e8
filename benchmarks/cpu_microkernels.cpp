// Roofline companion of benchmarks/attention_cpu.py: this CPU's single-core fp32 peaks (register-only
// loops) and the throughput of the CPU kernel's micro-kernels on one L1-resident 64 x 64 tile (D = 64),
// per path. Single thread, thread CPU time (less sensitive to a loaded machine than wall time), best of 5.
//
//   g++ -O3 -std=c++17 -Icsrc benchmarks/cpu_microkernels.cpp csrc/cpu_microkernels_*.cpp -o /tmp/lf_microkernels
//   /tmp/lf_microkernels
//
// "qk" and "pv" count 2 * 64 * 64 * 64 flops each; "tile" is qk + softmax (with entropy and segment
// sums) + pv, the inner step of the forward pass.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <initializer_list>

#include "cpu_microkernels.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wuninitialized"  // GCC 12's own AVX-512 headers (see csrc/cpu_microkernels_avx512.cpp)
#endif

using namespace latentflow;

namespace {

double thread_seconds() {
  timespec t;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
  return t.tv_sec + 1e-9 * t.tv_nsec;
}

template <typename F>
double best_of_5(F&& f) {
  double best = 1e30;
  for (int rep = 0; rep < 5; ++rep) {
    const double t0 = thread_seconds();
    f();
    best = std::min(best, thread_seconds() - t0);
  }
  return best;
}

constexpr long kPeakIters = 20000000;

#if defined(__x86_64__)
// 12 independent accumulator chains: enough to hide the FMA latency on 2 FMA ports.
__attribute__((target("avx2,fma"))) float peak_avx2() {
  __m256 a[12];
  for (int i = 0; i < 12; ++i) a[i] = _mm256_set1_ps(0.1f * i);
  const __m256 b = _mm256_set1_ps(0.999f), c = _mm256_set1_ps(0.001f);
  for (long k = 0; k < kPeakIters; ++k)
#pragma GCC unroll 12
    for (int i = 0; i < 12; ++i) a[i] = _mm256_fmadd_ps(a[i], b, c);
  __m256 s = a[0];
  for (int i = 1; i < 12; ++i) s = _mm256_add_ps(s, a[i]);
  return _mm256_cvtss_f32(s);
}

__attribute__((target("avx512f"))) float peak_avx512() {
  __m512 a[12];
  for (int i = 0; i < 12; ++i) a[i] = _mm512_set1_ps(0.1f * i);
  const __m512 b = _mm512_set1_ps(0.999f), c = _mm512_set1_ps(0.001f);
  for (long k = 0; k < kPeakIters; ++k)
#pragma GCC unroll 12
    for (int i = 0; i < 12; ++i) a[i] = _mm512_fmadd_ps(a[i], b, c);
  __m512 s = a[0];
  for (int i = 1; i < 12; ++i) s = _mm512_add_ps(s, a[i]);
  return _mm512_reduce_add_ps(s);
}

// The x86-64 baseline (what the portable path is compiled for): 4 lanes, separate multiply and add.
float peak_sse2() {
  __m128 a[12];
  for (int i = 0; i < 12; ++i) a[i] = _mm_set1_ps(0.1f * i);
  const __m128 b = _mm_set1_ps(0.999f), c = _mm_set1_ps(0.001f);
  for (long k = 0; k < kPeakIters; ++k)
#pragma GCC unroll 12
    for (int i = 0; i < 12; ++i) a[i] = _mm_add_ps(_mm_mul_ps(a[i], b), c);
  __m128 s = a[0];
  for (int i = 1; i < 12; ++i) s = _mm_add_ps(s, a[i]);
  return _mm_cvtss_f32(s);
}
#endif

float* floats(int n, float lo, float hi) {
  float* p = static_cast<float*>(std::aligned_alloc(64, n * sizeof(float)));
  for (int i = 0; i < n; ++i) p[i] = lo + (hi - lo) * (std::rand() / static_cast<float>(RAND_MAX));
  return p;
}

void tile_throughput(const char* name, const MicroKernels& mk) {
  constexpr int D = 64, R = kQueryTile, iters = 2000;
  float* q = floats(R * D, -0.15f, 0.15f);
  float* kt = floats(D * kKeyTile, -0.5f, 0.5f);
  float* v = floats(kKeyTile * D, -0.5f, 0.5f);
  float* s = floats(R * kKeyTile, 0.0f, 0.0f);
  float* o = floats(R * D, 0.0f, 0.0f);
  float* bias = floats(kKeyTile, 0.0f, 0.0f);
  float mx[R], norm[R], ent[R], alpha[R], seg[R * 2];
  for (int r = 0; r < R; ++r) mx[r] = -INFINITY, norm[r] = ent[r] = alpha[r] = 0.0f;
  std::memset(seg, 0, sizeof seg);
  SegmentPiece pieces[2] = {{0, 0, 40}, {1, 40, 64}};
  const TileOptions opt{true, true, pieces, 2};
  const RowState st{mx, norm, ent, seg, alpha, 2};
  const double tq = best_of_5([&] { for (int i = 0; i < iters; ++i) mk.qk_tile(q, kt, D, R, s); }) / iters;
  const double tp = best_of_5([&] { for (int i = 0; i < iters; ++i) mk.pv_tile(s, v, alpha, R, D, o); }) / iters;
  const double tt = best_of_5([&] {
    for (int i = 0; i < iters; ++i) {
      mk.qk_tile(q, kt, D, R, s);
      mk.softmax_tile(s, R, bias, st, opt);
      mk.pv_tile(s, v, alpha, R, D, o);
    }
  }) / iters;
  const double flops = 2.0 * R * kKeyTile * D;
  std::printf("%-8s qk %6.2f us (%6.1f GFLOP/s) | pv %6.2f us (%6.1f GFLOP/s) | tile %6.2f us (%6.1f GFLOP/s, softmax+captures ~%.0f%%)\n",
              name, tq * 1e6, flops / tq / 1e9, tp * 1e6, flops / tp / 1e9, tt * 1e6, 2 * flops / tt / 1e9,
              100.0 * (tt - tq - tp) / tt);
  for (float* p : {q, kt, v, s, o, bias}) std::free(p);
}

}  // namespace

int main() {
  std::printf("single-core fp32 peaks (register-only loops):\n");
#if defined(__x86_64__)
  volatile float sink = 0.0f;
  if (__builtin_cpu_supports("avx512f")) {
    const double t = best_of_5([&] { sink = sink + peak_avx512(); });
    std::printf("  AVX-512 FMA    %6.1f GFLOP/s\n", kPeakIters * 12.0 * 16 * 2 / t / 1e9);
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    const double t = best_of_5([&] { sink = sink + peak_avx2(); });
    std::printf("  AVX2 FMA       %6.1f GFLOP/s\n", kPeakIters * 12.0 * 8 * 2 / t / 1e9);
  }
  const double t = best_of_5([&] { sink = sink + peak_sse2(); });
  std::printf("  SSE2 mul+add   %6.1f GFLOP/s (the portable path's baseline ISA)\n", kPeakIters * 12.0 * 4 * 2 / t / 1e9);
  std::printf("micro-kernels, one 64x64 tile, D=64, L1-resident:\n");
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("fma"))
    tile_throughput("avx512", avx512_kernels());
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) tile_throughput("avx2", avx2_kernels());
#else
  std::printf("  (no peak loops for this architecture)\nmicro-kernels, one 64x64 tile, D=64, L1-resident:\n");
#endif
  tile_throughput("generic", generic_kernels());
  return 0;
}
