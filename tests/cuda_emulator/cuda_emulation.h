// Host emulation of the slice of CUDA that kernels/probed_attention*.cu use, so that the real kernel
// source runs on a CPU-only machine against the float64 reference (tests/test_cuda_emulated.py).
//
// Force-included (g++ -include) before the kernel sources, which are compiled as C++ with
// -DLATENTFLOW_EMULATE. Each CTA runs as kThreads real std::threads:
//   __syncthreads          a CTA-wide std::barrier;
//   __shfl_xor_sync        a warp-wide exchange between two warp barriers (a divergent shuffle deadlocks,
//                          which the test's timeout reports);
//   mma.m16n8k16           every lane publishes its A/B fragment registers, and each lane rebuilds the
//                          16x16 A and 16x8 B tiles from the PTX ISA fragment layout (section "Matrix
//                          Fragments for mma.m16n8k16 with floating point type") and computes its C
//                          fragment in float;
//   ldmatrix.x4.trans      every lane publishes its row address; each lane gathers its registers by the
//                          PTX ISA's ldmatrix layout;
//   cp.async               strict: the source is read at issue, but the 16 bytes land in shared memory
//                          only when the issuing thread's cp.async.wait_group retires their group (or at
//                          thread exit), the latest moment the hardware allows. A wait that retires too
//                          few groups therefore leaves the tile unwritten;
//   shared memory          a per-CTA buffer of exactly the launch's dynamic size, filled with 0xFF bytes
//                          (NaN in float32, bfloat16 and float16) so that a read of unwritten data poisons
//                          the result, plus a guard band that is checked after the CTA (overflow ->
//                          exception);
//   races                  every shared-memory access of the kernels goes through load_pair, ldmatrix,
//                          cp.async or smem_load/smem_store, which this header checks against a shadow
//                          (per 4-byte word: last writer and readers, with the barrier interval of the
//                          access). Two accesses of different threads to one word in the same interval
//                          (between two __syncthreads), one of them a write, are a race (RAW, WAR, WAW).
//                          A cp.async counts as a write from its issue to its landing. The first race is
//                          reported as an exception after the CTA.
// What this does NOT check: the real hardware's fragment layout (it encodes the documented one), races
// through global memory, bank conflicts, register spills or speed.
#pragma once

#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <deque>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)

using std::max;
using std::min;

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

// ---- 16-bit float types (bit containers with IEEE round-to-nearest-even conversions) ----

struct __half {
  uint16_t bits;
};
struct __nv_bfloat16 {
  uint16_t bits;
};
struct __half2 {
  __half x, y;
};
struct __nv_bfloat162 {
  __nv_bfloat16 x, y;
};

inline float __half2float(__half h) {
  _Float16 f;
  std::memcpy(&f, &h.bits, 2);
  return static_cast<float>(f);
}
inline __half __float2half_rn(float x) {
  const _Float16 f = static_cast<_Float16>(x);
  __half h;
  std::memcpy(&h.bits, &f, 2);
  return h;
}
inline float __bfloat162float(__nv_bfloat16 h) {
  const uint32_t bits = static_cast<uint32_t>(h.bits) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, 4);
  __nv_bfloat16 h;
  if (std::isnan(x)) {
    h.bits = 0x7fc0;
  } else {
    bits += 0x7fffu + ((bits >> 16) & 1u);
    h.bits = static_cast<uint16_t>(bits >> 16);
  }
  return h;
}
inline __half2 __floats2half2_rn(float lo, float hi) { return {__float2half_rn(lo), __float2half_rn(hi)}; }
inline __nv_bfloat162 __floats2bfloat162_rn(float lo, float hi) {
  return {__float2bfloat16_rn(lo), __float2bfloat16_rn(hi)};
}
inline __half __ushort_as_half(uint16_t bits) { return {bits}; }
inline __nv_bfloat16 __ushort_as_bfloat16(uint16_t bits) { return {bits}; }

// ---- math intrinsics ----

inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __int_as_float(int i) {
  float f;
  std::memcpy(&f, &i, 4);
  return f;
}

// ---- a minimal CUDA runtime ----

using cudaStream_t = void*;
enum cudaError_t { cudaSuccess = 0 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
template <typename F>
inline cudaError_t cudaFuncSetAttribute(F, cudaFuncAttribute, int) {
  return cudaSuccess;
}
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
// The calling thread's current device, as in the real runtime (a per-thread setting); tests read and set
// it through the module's _emu_* functions to check that launches put it back.
namespace latentflow_emu {
inline int& current_device() {
  thread_local int device = 0;
  return device;
}
inline int& set_device_calls() {
  thread_local int calls = 0;
  return calls;
}
}  // namespace latentflow_emu
inline cudaError_t cudaGetDevice(int* device) {
  *device = latentflow_emu::current_device();
  return cudaSuccess;
}
inline cudaError_t cudaSetDevice(int device) {
  latentflow_emu::current_device() = device;
  ++latentflow_emu::set_device_calls();
  return cudaSuccess;
}
inline cudaError_t cudaRuntimeGetVersion(int* version) {
  *version = 0;
  return cudaSuccess;
}
inline const char* cudaGetErrorName(cudaError_t) { return "cudaSuccess"; }
inline const char* cudaGetErrorString(cudaError_t) { return "no error"; }

// ---- execution model ----

namespace latentflow_emu {

constexpr size_t kGuardBytes = 4096;
constexpr unsigned char kGuardByte = 0xA5;

struct Warp {
  explicit Warp() : barrier(32) {}
  std::barrier<> barrier;
  float shuffle[32];
  uint32_t a[32][4];
  uint32_t b[32][2];
  const uint16_t* rows[32];
};

constexpr unsigned char kUnwrittenByte = 0xFF;  // NaN in every float type the kernels use
constexpr int kManyReaders = -2;

// Shadow of one 4-byte word of shared memory: last writer and reader(s), with their barrier interval.
struct ShadowWord {
  int write_tid = -1, write_epoch = -1, read_tid = -1, read_epoch = -1;
};

struct Cta {
  Cta(int threads, size_t smem_bytes)
      : barrier(threads), smem(smem_bytes + kGuardBytes, kGuardByte), size(smem_bytes), shadow((smem_bytes + 3) / 4) {
    std::memset(smem.data(), kUnwrittenByte, smem_bytes);
    for (int w = 0; w < threads / 32; ++w) warps.emplace_back(std::make_unique<Warp>());
  }
  std::barrier<> barrier;
  std::vector<std::unique_ptr<Warp>> warps;
  std::vector<unsigned char> smem;
  size_t size;
  std::vector<ShadowWord> shadow;
  std::mutex shadow_mutex;
  std::string race;  // first race found, empty if none
};

struct PendingCopy {
  void* dst;
  unsigned char bytes[16];
};

struct ThreadContext {
  dim3 thread, block;
  Cta* cta = nullptr;
  int epoch = 0;                                  // __syncthreads passed so far
  std::vector<PendingCopy> open_group;            // cp.async issued since the last commit
  std::deque<std::vector<PendingCopy>> committed;  // committed groups, oldest first
};
inline thread_local ThreadContext tls;

inline unsigned char* dynamic_smem() { return tls.cta->smem.data(); }
inline Warp& my_warp() { return *tls.cta->warps[tls.thread.x / 32]; }
inline int my_lane() { return static_cast<int>(tls.thread.x % 32); }

// Record an access of `bytes` bytes at `p` by this thread; a conflicting access of another thread in the
// same barrier interval is a race. Addresses outside the dynamic shared memory are not tracked.
inline void shadow_access(const void* p, size_t bytes, bool write, const char* what) {
  Cta& cta = *tls.cta;
  const auto* base = cta.smem.data();
  const auto* c = static_cast<const unsigned char*>(p);
  if (c < base || c >= base + cta.size) return;
  const int me = static_cast<int>(tls.thread.x), epoch = tls.epoch;
  std::lock_guard<std::mutex> lock(cta.shadow_mutex);
  for (size_t w = (c - base) / 4; w <= (c - base + bytes - 1) / 4 && w < cta.shadow.size(); ++w) {
    ShadowWord& s = cta.shadow[w];
    const char* hazard = nullptr;
    int other = -1;
    if (s.write_epoch == epoch && s.write_tid != me) {
      hazard = write ? "write after write" : "read after write";
      other = s.write_tid;
    } else if (write && s.read_epoch == epoch && s.read_tid != me) {
      hazard = "write after read";
      other = s.read_tid;
    }
    if (hazard != nullptr && cta.race.empty()) {
      cta.race = std::string("emulator: shared-memory race (") + hazard + ") at byte " + std::to_string(4 * w) +
                 " by thread " + std::to_string(me) + " (" + what + ") and thread " +
                 (other == kManyReaders ? std::string("several") : std::to_string(other)) +
                 " between the same two __syncthreads, block (" + std::to_string(tls.block.x) + "," +
                 std::to_string(tls.block.y) + "," + std::to_string(tls.block.z) + ")";
    }
    if (write) {
      s.write_tid = me;
      s.write_epoch = epoch;
    } else if (s.read_epoch == epoch) {
      if (s.read_tid != me) s.read_tid = kManyReaders;
    } else {
      s.read_tid = me;
      s.read_epoch = epoch;
    }
  }
}

// cp.async: the source is read now, the destination written when the group retires.
inline void copy16(void* dst, const void* src, bool valid) {
  PendingCopy copy{dst, {}};
  if (valid) {
    std::memcpy(copy.bytes, src, 16);
  } else {
    std::memset(copy.bytes, 0, 16);
  }
  shadow_access(dst, 16, true, "cp.async issue");
  tls.open_group.push_back(copy);
}

inline void land(const std::vector<PendingCopy>& group) {
  for (const PendingCopy& copy : group) {
    shadow_access(copy.dst, 16, true, "cp.async landing");
    std::memcpy(copy.dst, copy.bytes, 16);
  }
}

inline void cp_async_commit() {
  tls.committed.push_back(std::move(tls.open_group));
  tls.open_group.clear();
}

// cp.async.wait_group n: every committed group but the n most recent has landed.
inline void cp_async_wait(int pending) {
  while (static_cast<int>(tls.committed.size()) > pending) {
    land(tls.committed.front());
    tls.committed.pop_front();
  }
}

inline void drain_copies() {  // at thread exit the hardware completes whatever is still in flight
  cp_async_commit();
  cp_async_wait(0);
}

template <typename T>
inline T smem_load(const T* p) {
  shadow_access(p, sizeof(T), false, "load");
  return *p;
}

template <typename T>
inline void smem_store(T* p, T value) {
  shadow_access(p, sizeof(T), true, "store");
  *p = value;
}

template <typename T>
inline float bits_to_float(uint32_t bits) {
  if constexpr (std::is_same<T, __half>::value) {
    return __half2float(__half{static_cast<uint16_t>(bits)});
  } else {
    return __bfloat162float(__nv_bfloat16{static_cast<uint16_t>(bits)});
  }
}

// Element i (0 = low half of register 0) of a fragment.
inline uint32_t element(const uint32_t* regs, int i) { return (regs[i / 2] >> (16 * (i % 2))) & 0xffffu; }

template <typename T>
void mma_16816(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  Warp& w = my_warp();
  const int lane = my_lane();
  std::memcpy(w.a[lane], a, sizeof(a));
  std::memcpy(w.b[lane], b, sizeof(b));
  w.barrier.arrive_and_wait();
  float A[16][16], B[16][8];
  for (int l = 0; l < 32; ++l) {
    const int g = l >> 2, t = l & 3;
    for (int i = 0; i < 8; ++i) {  // A: row g for a0,a1,a4,a5 else g+8; col 2t + (i&1) (+8 for i >= 4)
      const int row = (i < 2 || (i >= 4 && i < 6)) ? g : g + 8;
      const int col = 2 * t + (i & 1) + (i >= 4 ? 8 : 0);
      A[row][col] = bits_to_float<T>(element(w.a[l], i));
    }
    for (int i = 0; i < 4; ++i) {  // B: row (k) 2t + (i&1) (+8 for i >= 2); col (n) g
      const int row = 2 * t + (i & 1) + (i >= 2 ? 8 : 0);
      B[row][g] = bits_to_float<T>(element(w.b[l], i));
    }
  }
  const int g = lane >> 2, t = lane & 3;
  for (int i = 0; i < 4; ++i) {  // C: row g for c0,c1 else g+8; col 2t + (i&1)
    const int row = i < 2 ? g : g + 8;
    const int col = 2 * t + (i & 1);
    float sum = 0.0f;
    for (int k = 0; k < 16; ++k) sum += A[row][k] * B[k][col];
    c[i] += sum;
  }
  w.barrier.arrive_and_wait();  // nobody overwrites the published fragments before all lanes read them
}

// ldmatrix.m8n8.x4.trans.b16: lane 8m + j supplies row j of matrix m; register m of lane l receives the
// elements (row 2(l%4), col l/4) [low half] and (row 2(l%4)+1, col l/4) [high half] of matrix m.
inline void ldmatrix_x4_trans(uint32_t (&r)[4], const uint16_t* row) {
  Warp& w = my_warp();
  const int lane = my_lane();
  shadow_access(row, 16, false, "ldmatrix");
  w.rows[lane] = row;
  w.barrier.arrive_and_wait();
  const int g = lane >> 2, t = lane & 3;
  for (int m = 0; m < 4; ++m) {
    const uint16_t lo = w.rows[8 * m + 2 * t][g];
    const uint16_t hi = w.rows[8 * m + 2 * t + 1][g];
    r[m] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
  }
  w.barrier.arrive_and_wait();
}

template <typename Kernel, typename Args>
void launch(Kernel kernel, dim3 grid, int threads, size_t smem_bytes, const Args& args) {
  for (unsigned z = 0; z < grid.z; ++z) {
    for (unsigned y = 0; y < grid.y; ++y) {
      for (unsigned x = 0; x < grid.x; ++x) {
        Cta cta(threads, smem_bytes);
        std::vector<std::thread> pool;
        pool.reserve(threads);
        for (int t = 0; t < threads; ++t) {
          pool.emplace_back([&, t] {
            tls = ThreadContext{};
            tls.thread = dim3(t);
            tls.block = dim3(x, y, z);
            tls.cta = &cta;
            kernel(args);
            drain_copies();
          });
        }
        for (auto& th : pool) th.join();
        if (!cta.race.empty()) throw std::runtime_error(cta.race);
        for (size_t i = smem_bytes; i < cta.smem.size(); ++i) {
          if (cta.smem[i] != kGuardByte) throw std::runtime_error("emulator: shared memory written past its size");
        }
      }
    }
  }
}

}  // namespace latentflow_emu

#define threadIdx (::latentflow_emu::tls.thread)
#define blockIdx (::latentflow_emu::tls.block)

inline void __syncthreads() {
  latentflow_emu::tls.cta->barrier.arrive_and_wait();
  ++latentflow_emu::tls.epoch;  // accesses after this barrier are ordered after those of every thread before it
}

inline float __shfl_xor_sync(unsigned, float value, int lane_mask) {
  latentflow_emu::Warp& w = latentflow_emu::my_warp();
  const int lane = latentflow_emu::my_lane();
  w.shuffle[lane] = value;
  w.barrier.arrive_and_wait();
  const float result = w.shuffle[lane ^ lane_mask];
  w.barrier.arrive_and_wait();
  return result;
}
