// A deterministic-friendly parallel-for. Tasks are handed out dynamically, but every task writes only its
// own outputs, so results never depend on which thread ran what.
//
// Threads: torch's own OpenMP pool when the build has OpenMP. The module links libgomp.so.1, the soname
// of the copy torch ships, so the loader gives both the one runtime torch loaded first (one pool, no second
// runtime). Torch's pool threads keep spinning for a while after every torch op; threads of our own would
// fight them for the cores (a 2-thread call at batch 1 ran slower than one thread), while the pool's
// spinning threads pick our tasks up at once. Without OpenMP, or in a forked child (libgomp's pool does
// not survive fork), threads are started per call instead.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <thread>
#include <vector>

#include <cstdlib>
#include <cstring>

#ifdef _OPENMP
#include <omp.h>
#include <pthread.h>
#endif

namespace latentflow {

#ifdef _OPENMP
// Set in every process forked from one that loaded the module: libgomp's pool does not survive fork, so
// a child -- whether or not its parent used the pool (torch's own ops use it too) -- starts its own threads.
inline bool& forked_child() {
  static bool flag = false;
  return flag;
}

// Called once when the module loads (bindings), before any fork the flag must see.
inline void watch_for_fork() {
  static const int registered = pthread_atfork(nullptr, nullptr, [] { forked_child() = true; });
  (void)registered;
}

// LATENTFLOW_CPU_POOL=threads opts out (threads started per call), e.g. to compare the two.
inline bool openmp_usable() {
  const char* pool = std::getenv("LATENTFLOW_CPU_POOL");
  return !forked_child() && !(pool && std::strcmp(pool, "threads") == 0);
}
#else
inline void watch_for_fork() {}
#endif

// "openmp": parallel_for borrows the OpenMP pool; "threads": it starts threads per call.
inline const char* parallel_runtime() {
#ifdef _OPENMP
  if (openmp_usable()) return "openmp";
#endif
  return "threads";
}

// Runs body(worker, task) for task in [0, num_tasks) on up to num_threads threads, worker < num_threads.
// body must not throw.
template <typename Body>
void parallel_for(int64_t num_tasks, int num_threads, Body&& body) {
  const int workers = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(num_threads, num_tasks)));
  if (workers <= 1) {
    for (int64_t t = 0; t < num_tasks; ++t) body(0, t);
    return;
  }
#ifdef _OPENMP
  if (openmp_usable()) {
#pragma omp parallel for num_threads(workers) schedule(dynamic, 1)
    for (int64_t t = 0; t < num_tasks; ++t) body(omp_get_thread_num(), t);
    return;
  }
#endif
  std::atomic<int64_t> next{0};
  auto run = [&](int worker) {
    for (int64_t t = next.fetch_add(1); t < num_tasks; t = next.fetch_add(1)) body(worker, t);
  };
  std::vector<std::thread> threads;
  threads.reserve(workers - 1);
  for (int w = 1; w < workers; ++w) threads.emplace_back(run, w);
  run(0);
  for (auto& th : threads) th.join();
}

}  // namespace latentflow
