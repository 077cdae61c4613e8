// A minimal deterministic-friendly parallel-for on std::thread (no OpenMP: torch ships its own libgomp
// and a second OpenMP runtime in the same process causes trouble). Tasks are handed out dynamically, but
// every task writes only its own outputs, so results never depend on which thread ran what.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <thread>
#include <vector>

namespace latentflow {

// Runs body(worker, task) for task in [0, num_tasks) on up to num_threads threads (the caller is worker 0).
// Threads are started per call: simple, fork-safe and re-entrant; the cost (~tens of microseconds) is
// negligible next to the work of one call.
template <typename Body>
void parallel_for(int64_t num_tasks, int num_threads, Body&& body) {
  const int workers = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(num_threads, num_tasks)));
  if (workers <= 1) {
    for (int64_t t = 0; t < num_tasks; ++t) body(0, t);
    return;
  }
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
