// Weight-only int8 matrix product for the CPU: y[O, N] = dequant(W)[O, I] @ x[I, N], as an XLA FFI custom call.
//
// Weights are stored as 8-row panels: q [O/8, I, 8] int8, with one scale and one offset per row and 32-input block,
// scale/offset [O/8, I/32, 8] float32, so that W[p*8 + r, i] = scale[p, i/32, r] * q[p, i, r] + offset[p, i/32, r].
// GGUF's Q8_0 (offset 0) and Q4_1 (q in 0..15) blocks map onto it exactly, and since q has at most 8 significant
// bits and the scale is a float16 value, the fused multiply-add below rounds to the same float32 weight the
// dequantizing loader produces.
//
// Each output element is one float32 sum over i in a fixed order (even and odd i in two partial sums, added at the
// end), whatever N is and however the work is split over threads: a column of y is bitwise the same whether its token
// came alone or in a block of 8, so the products add no difference between a k-token verify and k one-token steps.
//
// A pass streams the 1.25 bytes per weight once for up to 4 columns (more columns take further passes over the same
// panels, from cache), dequantizing each 8-weight row of a panel once per pass; panels are split over XLA's intra-op
// thread pool.

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kBlock = 32;  // inputs per scale/offset

struct Problem {
  const float* x;       // [I, N]
  const int8_t* q;      // [P, I, 8]
  const float* scale;   // [P, I/32, 8]
  const float* offset;  // [P, I/32, 8]
  float* y;             // [P*8, N]
  int64_t in;           // I
  int64_t n;            // N
};

// Accumulates panels [p0, p0 + TP) against columns [c0, c0 + TC). Each output keeps two partial sums, over even and
// over odd inputs, added at the end: that order is the same for every tile shape, and two chains per output keep the
// FMA units busy when a tile has few outputs.
template <int TP, int TC>
inline void Tile(const Problem& pr, int64_t p0, int64_t c0) {
  __m256 even[TP][TC], odd[TP][TC];
  for (int a = 0; a < TP; ++a)
    for (int c = 0; c < TC; ++c) even[a][c] = odd[a][c] = _mm256_setzero_ps();
  const int64_t nb = pr.in / kBlock;
  for (int64_t b = 0; b < nb; ++b) {
    for (int a = 0; a < TP; ++a) {
      const __m256 s = _mm256_loadu_ps(pr.scale + ((p0 + a) * nb + b) * 8);
      const __m256 o = _mm256_loadu_ps(pr.offset + ((p0 + a) * nb + b) * 8);
      const int8_t* qp = pr.q + ((p0 + a) * pr.in + b * kBlock) * 8;
      const float* xp = pr.x + b * kBlock * pr.n + c0;
      for (int64_t i = 0; i < kBlock; i += 2, qp += 16, xp += 2 * pr.n) {
        const __m128i q16 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qp));
        const __m256 w0 = _mm256_fmadd_ps(s, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q16)), o);
        const __m256 w1 = _mm256_fmadd_ps(s, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(q16, 8))), o);
        for (int c = 0; c < TC; ++c) {
          even[a][c] = _mm256_fmadd_ps(w0, _mm256_broadcast_ss(xp + c), even[a][c]);
          odd[a][c] = _mm256_fmadd_ps(w1, _mm256_broadcast_ss(xp + pr.n + c), odd[a][c]);
        }
      }
    }
  }
  alignas(32) float out[8];
  for (int a = 0; a < TP; ++a)
    for (int c = 0; c < TC; ++c) {
      _mm256_store_ps(out, _mm256_add_ps(even[a][c], odd[a][c]));
      for (int r = 0; r < 8; ++r) pr.y[((p0 + a) * 8 + r) * pr.n + c0 + c] = out[r];
    }
}

void Panels(const Problem& pr, int64_t p_begin, int64_t p_end) {
  for (int64_t c0 = 0; c0 < pr.n; c0 += 4) {
    const int64_t cols = std::min<int64_t>(4, pr.n - c0);
    for (int64_t p = p_begin; p < p_end; ++p) {
      switch (cols) {
        case 1: Tile<1, 1>(pr, p, c0); break;
        case 2: Tile<1, 2>(pr, p, c0); break;
        case 3: Tile<1, 3>(pr, p, c0); break;
        default: Tile<1, 4>(pr, p, c0); break;
      }
    }
  }
}

ffi::Error QMatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> q,
                       ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> offset,
                       ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions();
  auto qd = q.dimensions();
  if (xd.size() != 2 || qd.size() != 3 || qd[2] != 8 || qd[1] != xd[0] || xd[0] % kBlock != 0) {
    return ffi::Error::InvalidArgument("qmatmul: expected x [I, N], q [P, I, 8] with I a multiple of 32");
  }
  const int64_t panels = qd[0];
  // Chunks of 8 panels (64 rows) keep each task's weights contiguous. The caller takes chunks too and returns once
  // every chunk is finished, not once every helper has run: a helper still queued behind other work (the pool may be
  // busy, or its other threads waiting in calls like this one) then finds nothing left, touching only the shared
  // state it co-owns, so a busy pool delays the product but never deadlocks it.
  struct Shared {
    Problem pr;
    int64_t n_chunks;
    int64_t panels;
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> finished{0};
  };
  constexpr int64_t kChunk = 8;
  auto shared = std::make_shared<Shared>();
  shared->pr = Problem{x.typed_data(), q.typed_data(), scale.typed_data(), offset.typed_data(), y->typed_data(),
                       xd[0], xd[1]};
  shared->panels = panels;
  shared->n_chunks = (panels + kChunk - 1) / kChunk;
  auto work = [](Shared& st) {
    for (int64_t c; (c = st.next.fetch_add(1, std::memory_order_relaxed)) < st.n_chunks;) {
      Panels(st.pr, c * kChunk, std::min(st.panels, (c + 1) * kChunk));
      st.finished.fetch_add(1, std::memory_order_acq_rel);
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), shared->n_chunks) - 1;
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([shared, work] { work(*shared); });
  work(*shared);
  while (shared->finished.load(std::memory_order_acquire) < shared->n_chunks) _mm_pause();
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(TandemQMatmul, QMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
