// Weight-only int8 matrix product for the CPU: y[O, N] = dequant(W)[O, I] @ x[I, N], as an XLA FFI custom call.
//
// Weights are stored as 8-row panels, with one scale and one offset per row and 32-input block, so that
// W[p*8 + r, i] = scale[p, i/32, r] * q(p, i, r) + offset[p, i/32, r]. Two forms:
//   8-bit  (TandemQMatmul):  q [O/8, I, 8] int8, q(p, i, r) = q[p, i, r]; scale/offset [O/8, I/32, 8] float32.
//   4-bit  (TandemQMatmul4): q [O/8, I/2, 8] uint8 holding two inputs per byte, q(p, i, r) = q[p, i/2, r] >> 4*(i%2)
//                            & 15; scale/offset [O/8, I/32, 8] float16.
// GGUF's Q8_0 (offset 0) blocks map onto the first exactly and its Q4_1 (q in 0..15, float16 d and m) onto the
// second, which streams 0.625 bytes per weight instead of 1.25. Since q has at most 8 significant bits and the scale
// is a float16 value, the fused multiply-add below rounds to the same float32 weight the dequantizing loader
// produces, in either form.
//
// Each output element is one float32 sum over i in a fixed order (even and odd i in two partial sums, added at the
// end), whatever N is and however the work is split over threads: a column of y is bitwise the same whether its token
// came alone or in a block of 8, so the products add no difference between a k-token verify and k one-token steps.
//
// A pass streams the weights once for up to 4 columns (more columns take further passes over the same panels, from
// cache), dequantizing each 8-weight row of a panel once per pass; panels are split over XLA's intra-op thread pool.

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kBlock = 32;  // inputs per scale/offset

struct Problem {
  const float* x;       // [I, N]
  const void* q;        // [P, I, 8] int8, or [P, I/2, 8] uint8 (4-bit)
  const void* scale;    // [P, I/32, 8] float32, or float16 (4-bit)
  const void* offset;   // [P, I/32, 8] float32, or float16 (4-bit)
  float* y;             // [P*8, N]
  int64_t in;           // I
  int64_t n;            // N
};

// One row-block's scales (or offsets) of a panel as 8 float32 lanes.
template <bool kFour>
inline __m256 LoadScales(const void* base, int64_t index) {
  if constexpr (kFour) {
    const uint16_t* halves = static_cast<const uint16_t*>(base) + index;
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(halves)));
  } else {
    return _mm256_loadu_ps(static_cast<const float*>(base) + index);
  }
}

// Accumulates panel p against columns [c0, c0 + TC). Each output keeps two partial sums, over even and over odd
// inputs, added at the end: that order is the same for every tile width and both weight forms, and two chains per
// output keep the FMA units busy when a tile has few columns. (Two panels per one-column tile, four chains, made
// one-column products ~20% slower on a Zen 4 EPYC and no faster on a Sapphire Rapids Xeon; README, Speed.)
template <int TC, bool kFour>
inline void Tile(const Problem& pr, int64_t p, int64_t c0) {
  constexpr int64_t kPairBytes = kFour ? 8 : 16;  // bytes of q per panel and pair of inputs
  const __m128i low4 = _mm_set1_epi8(15);
  __m256 even[TC], odd[TC];
  for (int c = 0; c < TC; ++c) even[c] = odd[c] = _mm256_setzero_ps();
  const int64_t nb = pr.in / kBlock;
  for (int64_t b = 0; b < nb; ++b) {
    const __m256 s = LoadScales<kFour>(pr.scale, (p * nb + b) * 8);
    const __m256 o = LoadScales<kFour>(pr.offset, (p * nb + b) * 8);
    const uint8_t* qp = static_cast<const uint8_t*>(pr.q) + (p * pr.in + b * kBlock) / 2 * kPairBytes;
    const float* xp = pr.x + b * kBlock * pr.n + c0;
    for (int64_t i = 0; i < kBlock; i += 2, qp += kPairBytes, xp += 2 * pr.n) {
      __m256i q0, q1;  // input i's and input i+1's 8 rows as int32
      if constexpr (kFour) {
        const __m128i v = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(qp));
        q0 = _mm256_cvtepu8_epi32(_mm_and_si128(v, low4));
        q1 = _mm256_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(v, 4), low4));
      } else {
        const __m128i q16 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qp));
        q0 = _mm256_cvtepi8_epi32(q16);
        q1 = _mm256_cvtepi8_epi32(_mm_srli_si128(q16, 8));
      }
      const __m256 w0 = _mm256_fmadd_ps(s, _mm256_cvtepi32_ps(q0), o);
      const __m256 w1 = _mm256_fmadd_ps(s, _mm256_cvtepi32_ps(q1), o);
      for (int c = 0; c < TC; ++c) {
        even[c] = _mm256_fmadd_ps(w0, _mm256_broadcast_ss(xp + c), even[c]);
        odd[c] = _mm256_fmadd_ps(w1, _mm256_broadcast_ss(xp + pr.n + c), odd[c]);
      }
    }
  }
  alignas(32) float out[8];
  for (int c = 0; c < TC; ++c) {
    _mm256_store_ps(out, _mm256_add_ps(even[c], odd[c]));
    for (int r = 0; r < 8; ++r) pr.y[(p * 8 + r) * pr.n + c0 + c] = out[r];
  }
}

// Calls f(std::integral_constant<int, cols>{}) for 1 <= cols <= W: each tile width gets its own unrolled code.
template <int W, typename F>
inline void WithWidth(int64_t cols, F&& f) {
  if constexpr (W == 1) {
    f(std::integral_constant<int, 1>{});
  } else if (cols == W) {
    f(std::integral_constant<int, W>{});
  } else {
    WithWidth<W - 1>(cols, f);
  }
}

// Runs tile(cols, p, c0) over panels [p_begin, p_end) and all n columns, up to kMax columns per tile.
template <int kMax, typename TileFn>
void ForEachTile(int64_t n, int64_t p_begin, int64_t p_end, TileFn&& tile) {
  for (int64_t c0 = 0; c0 < n; c0 += kMax) {
    const int64_t cols = std::min<int64_t>(kMax, n - c0);
    for (int64_t p = p_begin; p < p_end; ++p) {
      WithWidth<kMax>(cols, [&](auto width) { tile(width, p, c0); });
    }
  }
}

template <bool kFour>
void Panels(const Problem& pr, int64_t p_begin, int64_t p_end) {
  ForEachTile<4>(pr.n, p_begin, p_end,
                 [&pr](auto cols, int64_t p, int64_t c0) { Tile<decltype(cols)::value, kFour>(pr, p, c0); });
}

// Splits the panels over XLA's intra-op thread pool in chunks of 8 panels (64 rows: each task's weights contiguous)
// and runs them.
template <typename Prob, void (*kPanels)(const Prob&, int64_t, int64_t)>
ffi::Error Run(ffi::ThreadPool pool, const Prob& problem, int64_t panels) {
  constexpr int64_t kChunk = 8;
  tandem::ParallelFor(pool, (panels + kChunk - 1) / kChunk, [problem, panels](int64_t c) {
    kPanels(problem, c * kChunk, std::min(panels, (c + 1) * kChunk));
  });
  return ffi::Error::Success();
}

// The handler of either form (8-bit: int8 q with float32 scales; 4-bit: uint8 q with float16 scales): checks the
// shapes, then runs the product.
template <ffi::DataType kQ, ffi::DataType kScale>
ffi::Error QMatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<kQ> q, ffi::Buffer<kScale> scale,
                       ffi::Buffer<kScale> offset, ffi::ResultBuffer<ffi::F32> y) {
  constexpr bool kFour = kQ == ffi::DataType::U8;
  constexpr int64_t kInputsPerByte = kFour ? 2 : 1;
  auto xd = x.dimensions();
  auto qd = q.dimensions();
  if (xd.size() != 2 || qd.size() != 3 || qd[2] != 8 || kInputsPerByte * qd[1] != xd[0] || xd[0] % kBlock != 0) {
    return ffi::Error::InvalidArgument(kFour ? "qmatmul: expected x [I, N], 4-bit q [P, I/2, 8] with I a multiple of 32"
                                             : "qmatmul: expected x [I, N], q [P, I, 8] with I a multiple of 32");
  }
  const Problem pr{x.typed_data(), q.typed_data(), scale.typed_data(), offset.typed_data(), y->typed_data(),
                   xd[0], xd[1]};
  return Run<Problem, Panels<kFour>>(pool, pr, qd[0]);
}

// ---- Integer dot products: weights times activations quantized to 8 bits (TandemQMatmul4Dot, TandemQMatmul8Dot). ----
//
// Each column of x is quantized per 32-input block like GGUF's Q8_0 (d = max|x| / 127, xq = round(x / d)) by the
// calling thread first, and
//   y[o, n] = sum over blocks b of  scale[o, b] * d[n, b] * (sum_i q[o, i] * xq[i, n])  +  offset[o, b] * sum_i x[i, n]
// with the integer sums exact and the float ones in block order: a column's result depends on that column alone.
// Both layouts keep 8 rows' 4 consecutive inputs in one 32-byte vector, the 32-bit lane that vpmaddubsw + vpmaddwd
// multiply against 4 bytes of a column:
//   4-bit (Q4_1): q [P, I/8, 8, 4] uint8, byte (p, g, r, j) holding input 8g+j of row p*8+r in its low nibble and
//                 input 8g+4+j in its high one, so one load and a mask (or a shift and a mask) give two vectors;
//   8-bit (Q8_0): q [P, I/4, 8, 4] int8, byte (p, g, r, j) = input 4g+j of row p*8+r; no offsets. vpmaddubsw takes
//                 unsigned bytes, so it multiplies |q| by x with q's sign moved onto x (vpsignb).

struct DotProblem {
  const int8_t* xq;     // [N, I] quantized columns
  const float* xd;      // [N, I/32] their block scales
  const float* xs;      // [N, I/32] float sums of each block of x
  const uint8_t* q;     // 4-bit [P, I/8, 8, 4] or 8-bit [P, I/4, 8, 4]
  const uint16_t* scale;   // [P, I/32, 8] float16
  const uint16_t* offset;  // [P, I/32, 8] float16; null for 8-bit weights
  float* y;             // [P*8, N]
  int64_t in;
  int64_t n;
};

// acc + per 32-bit lane the sum of 4 products of unsigned w and signed x bytes. The AVX2 build multiplies u8 * s8
// pairs summed to int16 (at most 2 * 128 * 127, so no saturation), then pairs of those to int32; the AVX-512 VNNI
// build (TANDEM_VNNI, chosen at load time on CPUs that have it) does the same in one vpdpbusd, which does not saturate
// either: both give the exact integer sum, so both builds' products are bitwise the same.
inline __m256i Dot4(__m256i acc, __m256i w, __m256i x) {
#ifdef TANDEM_VNNI
  return _mm256_dpbusd_epi32(acc, w, x);
#else
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1)));
#endif
}

// Column c's 4 quantized inputs from input i on, broadcast to every 32-bit lane.
inline __m256i Inputs4(const DotProblem& pr, int64_t c, int64_t i) {
  int32_t v;
  __builtin_memcpy(&v, pr.xq + c * pr.in + i, 4);
  return _mm256_set1_epi32(v);
}

template <int TC, bool kEight>
inline void DotTile(const DotProblem& pr, int64_t p, int64_t c0) {
  constexpr int64_t kVectors = kEight ? 8 : 4;  // 32-byte weight vectors per 32-input block
  const __m256i low4 = _mm256_set1_epi8(15);
  __m256 acc[TC];
  for (int c = 0; c < TC; ++c) acc[c] = _mm256_setzero_ps();
  const int64_t nb = pr.in / kBlock;
  const uint8_t* qp = pr.q + p * nb * kVectors * 32;
  for (int64_t b = 0; b < nb; ++b) {
    __m256i sum0[TC], sum1[TC];  // two integer chains per column (their sum is exact, in any order)
    for (int c = 0; c < TC; ++c) sum0[c] = sum1[c] = _mm256_setzero_si256();
    for (int64_t g = 0; g < kVectors; g += 1 + kEight, qp += 32 * (1 + kEight)) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qp));
      if constexpr (kEight) {  // inputs 4g..4g+3, then (next vector) 4g+4..4g+7
        const __m256i v1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qp + 32));
        const __m256i a0 = _mm256_abs_epi8(v), a1 = _mm256_abs_epi8(v1);
        for (int c = 0; c < TC; ++c) {
          const int64_t i = b * kBlock + g * 4;
          sum0[c] = Dot4(sum0[c], a0, _mm256_sign_epi8(Inputs4(pr, c0 + c, i), v));
          sum1[c] = Dot4(sum1[c], a1, _mm256_sign_epi8(Inputs4(pr, c0 + c, i + 4), v1));
        }
      } else {  // low nibbles: inputs 8g..8g+3; high ones: 8g+4..8g+7
        const __m256i lo = _mm256_and_si256(v, low4);
        const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
        for (int c = 0; c < TC; ++c) {
          const int64_t i = b * kBlock + g * 8;
          sum0[c] = Dot4(sum0[c], lo, Inputs4(pr, c0 + c, i));
          sum1[c] = Dot4(sum1[c], hi, Inputs4(pr, c0 + c, i + 4));
        }
      }
    }
    const int64_t sb = (p * nb + b) * 8;
    const __m256 s = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(pr.scale + sb)));
    for (int c = 0; c < TC; ++c) {
      const int64_t xb = (c0 + c) * nb + b;
      const __m256 dot = _mm256_cvtepi32_ps(_mm256_add_epi32(sum0[c], sum1[c]));
      acc[c] = _mm256_fmadd_ps(_mm256_mul_ps(s, _mm256_set1_ps(pr.xd[xb])), dot, acc[c]);
      if constexpr (!kEight) {
        const __m256 o = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(pr.offset + sb)));
        acc[c] = _mm256_fmadd_ps(o, _mm256_set1_ps(pr.xs[xb]), acc[c]);
      }
    }
  }
  alignas(32) float out[8];
  for (int c = 0; c < TC; ++c) {
    _mm256_store_ps(out, acc[c]);
    for (int r = 0; r < 8; ++r) pr.y[(p * 8 + r) * pr.n + c0 + c] = out[r];
  }
}

// Columns per dot tile: AVX-512's 32 vector registers hold 8 columns' accumulators, AVX2's 16 hold 4.
#ifdef TANDEM_VNNI
constexpr int kDotTile = 8;
#else
constexpr int kDotTile = 4;
#endif

template <bool kEight>
void DotPanels(const DotProblem& pr, int64_t p_begin, int64_t p_end) {
  ForEachTile<kDotTile>(pr.n, p_begin, p_end,
                        [&pr](auto cols, int64_t p, int64_t c0) { DotTile<decltype(cols)::value, kEight>(pr, p, c0); });
}

// Quantizes x [I, N] column by column into 32-input blocks: xq [N, I], xd and xs [N, I/32].
void QuantizeColumns(const float* x, int64_t in, int64_t n, int8_t* xq, float* xd, float* xs) {
  const int64_t nb = in / kBlock;
  for (int64_t c = 0; c < n; ++c) {
    for (int64_t b = 0; b < nb; ++b) {
      float amax = 0.0f, sum = 0.0f;
      for (int64_t i = 0; i < kBlock; ++i) {
        const float v = x[(b * kBlock + i) * n + c];
        amax = std::max(amax, std::fabs(v));
        sum += v;
      }
      const float d = amax / 127.0f;
      const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
      for (int64_t i = 0; i < kBlock; ++i) {
        xq[c * in + b * kBlock + i] = static_cast<int8_t>(std::nearbyint(x[(b * kBlock + i) * n + c] * inv));
      }
      xd[c * nb + b] = d;
      xs[c * nb + b] = sum;
    }
  }
}

// The handler of either dot form (4-bit: uint8 q with offsets; 8-bit: int8 q, none): checks the shapes, quantizes
// the columns, then runs the product.
template <bool kEight, typename QBuffer>
ffi::Error DotImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, QBuffer q, ffi::Buffer<ffi::F16> scale,
                   const uint16_t* offset, ffi::ResultBuffer<ffi::F32> y) {
  constexpr int64_t kPerGroup = kEight ? 4 : 8;  // inputs per group of q's second axis
  auto xd = x.dimensions();
  auto qd = q.dimensions();
  if (xd.size() != 2 || qd.size() != 4 || qd[2] != 8 || qd[3] != 4 || kPerGroup * qd[1] != xd[0] ||
      xd[0] % kBlock != 0) {
    return ffi::Error::InvalidArgument(kEight ? "qmatmul: expected x [I, N], 8-bit dot-form q [P, I/4, 8, 4] with I "
                                                "a multiple of 32"
                                              : "qmatmul: expected x [I, N], dot-form q [P, I/8, 8, 4] with I a "
                                                "multiple of 32");
  }
  const int64_t in = xd[0], n = xd[1];
  std::vector<int8_t> xq(in * n);
  std::vector<float> xscale(in / kBlock * n), xsum(in / kBlock * n);
  QuantizeColumns(x.typed_data(), in, n, xq.data(), xscale.data(), xsum.data());
  const DotProblem pr{xq.data(),
                      xscale.data(),
                      xsum.data(),
                      reinterpret_cast<const uint8_t*>(q.typed_data()),
                      reinterpret_cast<const uint16_t*>(scale.typed_data()),
                      offset,
                      y->typed_data(),
                      in,
                      n};
  return Run<DotProblem, DotPanels<kEight>>(pool, pr, qd[0]);
}

ffi::Error QMatmul4DotImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> q,
                           ffi::Buffer<ffi::F16> scale, ffi::Buffer<ffi::F16> offset, ffi::ResultBuffer<ffi::F32> y) {
  return DotImpl<false>(pool, x, q, scale, reinterpret_cast<const uint16_t*>(offset.typed_data()), y);
}

ffi::Error QMatmul8DotImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> q,
                           ffi::Buffer<ffi::F16> scale, ffi::ResultBuffer<ffi::F32> y) {
  return DotImpl<true>(pool, x, q, scale, nullptr, y);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(TandemQMatmul8Dot, QMatmul8DotImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(TandemQMatmul4Dot, QMatmul4DotImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::F16>>()
                                  .Arg<ffi::Buffer<ffi::F16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(TandemQMatmul, (QMatmulImpl<ffi::S8, ffi::F32>),
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(TandemQMatmul4, (QMatmulImpl<ffi::U8, ffi::F16>),
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::F16>>()
                                  .Arg<ffi::Buffer<ffi::F16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
