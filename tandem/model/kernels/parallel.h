// Work split over XLA's intra-op thread pool, shared by the kernels.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>

#include "xla/ffi/api/ffi.h"

namespace tandem {

// Runs fn(0) .. fn(n - 1), each once, on the calling thread and the pool's. The caller takes tasks too and returns
// once every task is finished, not once every helper has run: a helper still queued behind other work (the pool may
// be busy, or its other threads waiting in calls like this one) then finds nothing left, touching only the shared
// state it co-owns, so a busy pool delays the call but never deadlocks it.
template <typename Fn>
void ParallelFor(xla::ffi::ThreadPool& pool, int64_t n, Fn fn) {
  struct Shared {
    explicit Shared(Fn f, int64_t count) : fn(std::move(f)), n(count) {}
    Fn fn;
    int64_t n;
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> finished{0};
  };
  auto shared = std::make_shared<Shared>(std::move(fn), n);
  auto work = [](Shared& st) {
    for (int64_t c; (c = st.next.fetch_add(1, std::memory_order_relaxed)) < st.n;) {
      st.fn(c);
      st.finished.fetch_add(1, std::memory_order_acq_rel);
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), n) - 1;
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([shared, work] { work(*shared); });
  work(*shared);
  while (shared->finished.load(std::memory_order_acquire) < n) _mm_pause();
}

}  // namespace tandem
