// Work split over XLA's intra-op threads, for spgd_jax's FFI handlers (group_norm_sums.cc, direct_conv.cc).
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace spgd {

// Runs task(0 .. count-1) on the calling thread and on idle threads of XLA's pool; returns when all are done.
// A helper that starts late finds nothing left to claim and touches nothing of this call.
template <class Task>
void RunTasks(xla::ffi::ThreadPool pool, int64_t count, Task task) {
  struct Counters {
    std::atomic<int64_t> next{0}, done{0};
  };
  auto counters = std::make_shared<Counters>();
  auto work = [counters, count, task]() {
    for (int64_t i; (i = counters->next.fetch_add(1)) < count;) {
      task(i);
      counters->done.fetch_add(1);
    }
  };
  int64_t helpers = std::min<int64_t>(pool.num_threads(), count) - 1;
  for (int64_t h = 0; h < helpers; ++h) {
    auto copy = work;
    pool.Schedule(std::move(copy));
  }
  work();
  while (counters->done.load() < count) std::this_thread::yield();
}

}  // namespace spgd
