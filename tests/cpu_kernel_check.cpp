// Standalone check of the native CPU kernel (no Python, no torch): random inputs with every capture, the
// path "auto" picks on this CPU and the portable path, against a float64 reference. Used by
// tests/test_cpu_backend.py to try a cross-compiled aarch64 build (NEON) under qemu-aarch64:
//
//   aarch64-linux-gnu-g++ -O3 -std=gnu++17 -static -pthread -Icsrc tests/cpu_kernel_check.cpp csrc/*.cpp -o /tmp/check
//   qemu-aarch64 /tmp/check
#include <cmath>
#include <cstdio>
#include <initializer_list>
#include <random>
#include <vector>
#include "probed_attention_cpu.h"
using namespace latentflow;
int main() {
  const int B = 2, H = 3, N = 150, M = 137, D = 40, Dv = 24, G = 3;
  std::mt19937 rng(0);
  std::normal_distribution<float> nd;
  std::vector<float> q(B * H * N * D), k(B * H * M * D), v(B * H * M * Dv);
  for (auto* vec : {&q, &k, &v}) for (auto& x : *vec) x = nd(rng);
  std::vector<int64_t> seg = {0, 50, 64, M};
  const float scale = 1.0f / std::sqrt(float(D));
  int fails = 0;
  for (CpuIsa isa : {CpuIsa::Auto, CpuIsa::Generic}) {
    std::vector<float> out(B * H * N * Dv), lse(B * H * N), ent(B * H * N), sm(B * H * N * G), km(B * H * M);
    ProbedAttentionCpuArgs a;
    a.batch = B; a.heads = H; a.kv_heads = H; a.num_queries = N; a.num_keys = M; a.head_dim = D; a.value_dim = Dv;
    a.num_segments = G; a.segments = seg.data();
    a.q = q.data(); a.q_strides = {H * N * D, N * D, D, 1};
    a.k = k.data(); a.k_strides = {H * M * D, M * D, D, 1};
    a.v = v.data(); a.v_strides = {H * M * Dv, M * Dv, Dv, 1};
    a.scale = scale; a.out = out.data(); a.lse = lse.data(); a.entropy = ent.data(); a.segment_mass = sm.data();
    a.key_mass = km.data(); a.num_threads = 2; a.isa = isa;
    probed_attention_cpu(a);
    double err = 0, km_err = 0;
    std::vector<double> kmr(B * H * M, 0.0);
    for (int bh = 0; bh < B * H; ++bh)
      for (int i = 0; i < N; ++i) {
        std::vector<double> s(M);
        double mx = -1e300;
        for (int j = 0; j < M; ++j) {
          double acc = 0;
          for (int d = 0; d < D; ++d) acc += double(q[(bh * N + i) * D + d]) * k[(bh * M + j) * D + d];
          s[j] = acc * scale; mx = std::max(mx, s[j]);
        }
        double z = 0; for (int j = 0; j < M; ++j) z += std::exp(s[j] - mx);
        const double l = mx + std::log(z);
        double h = 0, segs[G] = {0, 0, 0};
        for (int j = 0; j < M; ++j) {
          const double p = std::exp(s[j] - l);
          h -= p * (s[j] - l);
          for (int g = 0; g < G; ++g) if (j >= seg[g] && j < seg[g + 1]) segs[g] += p;
          kmr[bh * M + j] += p;
        }
        for (int c = 0; c < Dv; ++c) {
          double o = 0;
          for (int j = 0; j < M; ++j) o += std::exp(s[j] - l) * v[(bh * M + j) * Dv + c];
          err = std::max(err, std::abs(o - out[(bh * N + i) * Dv + c]));
        }
        err = std::max(err, std::abs(l - lse[bh * N + i]) / std::max(1.0, std::abs(l)));
        err = std::max(err, std::abs(h - ent[bh * N + i]) / std::max(1.0, std::abs(h)));
        for (int g = 0; g < G; ++g) err = std::max(err, std::abs(segs[g] - sm[(bh * N + i) * G + g]));
      }
    for (int x = 0; x < B * H * M; ++x) km_err = std::max(km_err, std::abs(kmr[x] - km[x]) / std::max(1.0, kmr[x]));
    std::printf("isa %s -> %s: max error %.2e, key_mass %.2e\n", isa_name(isa), isa_name(resolve_isa(isa)), err, km_err);
    if (!(err < 1e-5 && km_err < 1e-5)) ++fails;
  }
  std::printf(fails ? "FAILED\n" : "OK\n");
  return fails;
}
