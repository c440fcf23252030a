// Fixed-order attention and RMSNorm for the CPU primary, as XLA FFI custom calls.
//
// XLA picks its loops and vector widths per shape, so a token's attention output and norms differ in the last bits
// between a one-token step and a k-token verify (or a batch of sessions). These kernels compute every query and
// every column in one fixed order that depends on nothing but that query's own inputs: a query at position P
// attends positions 0..P, the cached ones first and then the block's own, scored, exponentiated and summed in
// position order, the same whether a position's key came from the cache or from this block. With the products'
// columns already independent (qmatmul.cc), a whole pass then gives each token bitwise the same outputs in any
// block and batch.

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

bool SameDims(ffi::Span<const int64_t> a, ffi::Span<const int64_t> b) {
  return a.size() == b.size() && std::equal(a.begin(), a.end(), b.begin());
}

// sum_i a[i] * b[i] over h inputs: 8 lanes of fused multiply-adds, then the lanes added in a fixed tree.
inline float Dot(const float* a, const float* b, int64_t h) {
  int64_t i = 0;
  float sum = 0.0f;
  if (h >= 8) {
    __m256 acc = _mm256_mul_ps(_mm256_loadu_ps(a), _mm256_loadu_ps(b));
    for (i = 8; i + 8 <= h; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    alignas(32) float t[8];
    _mm256_store_ps(t, acc);
    sum = ((t[0] + t[1]) + (t[2] + t[3])) + ((t[4] + t[5]) + (t[6] + t[7]));
  }
  for (; i < h; ++i) sum = std::fma(a[i], b[i], sum);
  return sum;
}

// Dot(a, keys + j * h, h) for the 8 keys j = 0..7 (rows of keys [8, h], h a multiple of 8): each key's 8 lanes of
// fused multiply-adds as in Dot, then the 8 sums' lanes added by horizontal adds in Dot's own tree, bitwise equal.
inline __m256 Dot8(const float* a, const float* keys, int64_t h) {
  __m256 acc[8];
  for (int j = 0; j < 8; ++j) acc[j] = _mm256_mul_ps(_mm256_loadu_ps(a), _mm256_loadu_ps(keys + j * h));
  for (int64_t i = 8; i < h; i += 8) {
    const __m256 ai = _mm256_loadu_ps(a + i);
    for (int j = 0; j < 8; ++j) acc[j] = _mm256_fmadd_ps(ai, _mm256_loadu_ps(keys + j * h + i), acc[j]);
  }
  // hadd pairs neighbouring lanes within each 128-bit half: after two rounds, half 0 of quad holds (t0+t1)+(t2+t3)
  // and half 1 (t4+t5)+(t6+t7) of each of its 4 keys; adding the halves finishes the tree.
  const __m256 q0 = _mm256_hadd_ps(_mm256_hadd_ps(acc[0], acc[1]), _mm256_hadd_ps(acc[2], acc[3]));
  const __m256 q1 = _mm256_hadd_ps(_mm256_hadd_ps(acc[4], acc[5]), _mm256_hadd_ps(acc[6], acc[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(q0, q1, 0x20), _mm256_permute2f128_ps(q0, q1, 0x31));
}

// acc[i] += p * v[i]
inline void Axpy(float p, const float* v, float* acc, int64_t h) {
  int64_t i = 0;
  const __m256 pp = _mm256_set1_ps(p);
  for (; i + 8 <= h; i += 8) {
    _mm256_storeu_ps(acc + i, _mm256_fmadd_ps(pp, _mm256_loadu_ps(v + i), _mm256_loadu_ps(acc + i)));
  }
  for (; i < h; ++i) acc[i] = std::fma(p, v[i], acc[i]);
}

// exp(x) for 8 lanes at once (x <= 0 here: scores less their maximum): x = n ln 2 + r with |r| <= ln 2 / 2, e^r by
// Cephes' degree-6 polynomial for float, times 2^n through the exponent bits; within ~2 ulp of expf, and each lane's
// value depends on that lane's x alone. Below -87 (where 2^n leaves the normal floats) it returns e^-87 ~ 1.6e-38.
inline __m256 Exp8(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  const __m256 y = _mm256_add_ps(_mm256_fmadd_ps(_mm256_mul_ps(p, r), r, r), _mm256_set1_ps(1.0f));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(bits));
}

struct Attention {
  const float* q;                 // [K, G, H, B, T]
  const float* block_k;           // [B, K, T, H]
  const float* block_v;           // [B, K, T, H]
  const int32_t* lengths;         // [B] cached positions per row
  const int32_t* rows;            // [B] each row's slot in the context segments
  std::vector<const float*> ctx_k;  // segments [R, K, S_j, H], in position order
  std::vector<const float*> ctx_v;
  std::vector<int64_t> ctx_len;   // S_j
  int64_t ctx_total = 0;          // sum of S_j
  float* out;                     // [K, G, H, B, T]
  int64_t b, t, k, g, h;
  int64_t slots = 0;              // R
  float scale;
};

// acc [H] += p * v [H], H a multiple of 8 up to 128 kept in registers across a run of positions by the caller's
// loop (the compiler unrolls the fixed trip count).
template <int H>
inline void AxpyFixed(float p, const float* v, __m256* acc) {
  const __m256 pp = _mm256_set1_ps(p);
  for (int i = 0; i < H / 8; ++i) acc[i] = _mm256_fmadd_ps(pp, _mm256_loadu_ps(v + 8 * i), acc[i]);
}

// The G queries of one key/value head (kh) for token ti in row `row`: query heads kh*G .. kh*G + G - 1, which read
// the same keys and values. Each query's arithmetic is its own and in the same order as if it came alone (scores,
// then exponentials, then the weighted sum of values in position order); the G queries only take turns over each
// window of keys and values while it is in L1, so the keys and values stream once per token instead of G times.
template <int H>  // 0: any head size
void AttendGroup(const Attention& a, int64_t row, int64_t kh, int64_t ti) {
  constexpr int64_t kWindow = 32;  // positions whose values the G queries share from L1 (8 KB at H = 64)
  const int64_t cached = std::clamp<int64_t>(a.lengths[row], 0, a.ctx_total);
  const int64_t positions = cached + ti + 1;
  const int64_t stride = (positions + 7) / 8 * 8;  // whole vectors for Exp8
  thread_local std::vector<float> q, acc, scores, denom;
  q.resize(a.g * a.h);
  acc.assign(a.g * a.h, 0.0f);
  scores.resize(a.g * stride);
  denom.assign(a.g, 0.0f);
  // The positions the queries read, in order, as runs of consecutive keys and values [n, H]: cached ones segment by
  // segment, then the block's first ti + 1 tokens. fn(first position, keys, values, n).
  auto for_each_run = [&](auto&& fn) {
    int64_t pos = 0;
    for (size_t j = 0; j < a.ctx_len.size() && pos < cached; ++j) {
      const int64_t n = std::min(a.ctx_len[j], cached - pos);
      const int64_t base = (a.rows[row] * a.k + kh) * a.ctx_len[j] * a.h;
      fn(pos, a.ctx_k[j] + base, a.ctx_v[j] + base, n);
      pos += n;
    }
    const int64_t base = (row * a.k + kh) * a.t * a.h;
    fn(pos, a.block_k + base, a.block_v + base, ti + 1);
  };
  auto lane = [&](int64_t gi) { return (kh * a.g + gi) * a.h * a.b * a.t + row * a.t + ti; };  // (kh, gi, 0, row, ti)
  for (int64_t gi = 0; gi < a.g; ++gi) {
    for (int64_t i = 0; i < a.h; ++i) q[gi * a.h + i] = a.q[lane(gi) + i * a.b * a.t];
  }
  // Scores: 8 keys at a time where a run has them (Dot8 is bitwise Dot), so where a run ends changes nothing.
  const __m256 scale8 = _mm256_set1_ps(a.scale);
  for_each_run([&](int64_t pos, const float* keys, const float*, int64_t n) {
    int64_t s = 0;
    if (a.h % 8 == 0) {
      for (; s + 8 <= n; s += 8) {
        for (int64_t gi = 0; gi < a.g; ++gi) {
          const __m256 dots = Dot8(q.data() + gi * a.h, keys + s * a.h, a.h);
          _mm256_storeu_ps(&scores[gi * stride + pos + s], _mm256_mul_ps(dots, scale8));
        }
      }
    }
    for (; s < n; ++s) {
      for (int64_t gi = 0; gi < a.g; ++gi) {
        scores[gi * stride + pos + s] = Dot(q.data() + gi * a.h, keys + s * a.h, a.h) * a.scale;
      }
    }
  });
  for (int64_t gi = 0; gi < a.g; ++gi) {  // scores -> unnormalized probabilities, 8 at a time
    float* sg = scores.data() + gi * stride;
    float m = -INFINITY;
    for (int64_t pos = 0; pos < positions; ++pos) m = std::max(m, sg[pos]);
    const __m256 mm = _mm256_set1_ps(m);
    for (int64_t pos = 0; pos < positions; pos += 8) {
      _mm256_storeu_ps(sg + pos, Exp8(_mm256_sub_ps(_mm256_loadu_ps(sg + pos), mm)));
    }
  }
  for_each_run([&](int64_t pos, const float*, const float* values, int64_t n) {
    for (int64_t w = 0; w < n; w += kWindow) {
      const int64_t end = std::min(n, w + kWindow);
      for (int64_t gi = 0; gi < a.g; ++gi) {
        const float* sg = scores.data() + gi * stride + pos;
        float* ag = acc.data() + gi * a.h;
        float d = denom[gi];
        if constexpr (H > 0) {
          __m256 regs[H / 8];
          for (int i = 0; i < H / 8; ++i) regs[i] = _mm256_loadu_ps(ag + 8 * i);
          for (int64_t s = w; s < end; ++s) {
            d += sg[s];
            AxpyFixed<H>(sg[s], values + s * a.h, regs);
          }
          for (int i = 0; i < H / 8; ++i) _mm256_storeu_ps(ag + 8 * i, regs[i]);
        } else {
          for (int64_t s = w; s < end; ++s) {
            d += sg[s];
            Axpy(sg[s], values + s * a.h, ag, a.h);
          }
        }
        denom[gi] = d;
      }
    }
  });
  for (int64_t gi = 0; gi < a.g; ++gi) {
    const float inv = 1.0f / std::max(denom[gi], 1e-30f);
    for (int64_t i = 0; i < a.h; ++i) a.out[lane(gi) + i * a.b * a.t] = acc[gi * a.h + i] * inv;
  }
}

// Reads the operands into `a` (the context segments from ctx's first 2 * segments entries, keys then values).
ffi::Error SetUp(Attention& a, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> block_k, ffi::Buffer<ffi::F32> block_v,
                 ffi::Buffer<ffi::S32> lengths, ffi::Buffer<ffi::S32> rows, const ffi::RemainingArgs& ctx,
                 float* out) {
  auto qd = q.dimensions();  // [K, G, H, B, T]
  auto kd = block_k.dimensions();  // [B, K, T, H]
  if (qd.size() != 5 || kd.size() != 4 || kd[0] != qd[3] || kd[1] != qd[0] || kd[2] != qd[4] || kd[3] != qd[2] ||
      !SameDims(block_v.dimensions(), kd) || lengths.dimensions().size() != 1 || lengths.dimensions()[0] != qd[3] ||
      !SameDims(rows.dimensions(), lengths.dimensions()) || ctx.size() % 2 != 0) {
    return ffi::Error::InvalidArgument(
        "attention: expected q [K, G, H, B, T], block keys and values [B, K, T, H], lengths and rows [B] and "
        "context segments [R, K, S_j, H], keys then values");
  }
  a.q = q.typed_data();
  a.block_k = block_k.typed_data();
  a.block_v = block_v.typed_data();
  a.lengths = lengths.typed_data();
  a.rows = rows.typed_data();
  a.out = out;
  a.k = qd[0], a.g = qd[1], a.h = qd[2], a.b = qd[3], a.t = qd[4];
  a.scale = 1.0f / std::sqrt(static_cast<float>(a.h));
  const size_t segments = ctx.size() / 2;
  for (size_t j = 0; j < segments; ++j) {
    auto kj = ctx.get<ffi::Buffer<ffi::F32>>(j);
    auto vj = ctx.get<ffi::Buffer<ffi::F32>>(segments + j);
    if (kj.has_error() || vj.has_error()) return ffi::Error::InvalidArgument("attention: context must be float32");
    auto sd = kj->dimensions();
    if (sd.size() != 4 || sd[1] != a.k || sd[3] != a.h || !SameDims(vj->dimensions(), sd) ||
        (j > 0 && sd[0] != a.slots)) {
      return ffi::Error::InvalidArgument("attention: a context segment is not [R, K, S_j, H]");
    }
    a.slots = sd[0];
    a.ctx_k.push_back(kj->typed_data());
    a.ctx_v.push_back(vj->typed_data());
    a.ctx_len.push_back(sd[2]);
    a.ctx_total += sd[2];
  }
  for (int64_t row = 0; row < a.b && segments > 0; ++row) {
    if (a.rows[row] < 0 || a.rows[row] >= a.slots) {
      return ffi::Error::InvalidArgument("attention: a row's slot lies outside the context segments");
    }
  }
  return ffi::Error::Success();
}

void Attend(ffi::ThreadPool& pool, const Attention& a) {
  // One task per token and key/value head: its work depends on nothing else.
  auto run = a.h == 64 ? AttendGroup<64> : AttendGroup<0>;
  tandem::ParallelFor(pool, a.b * a.k * a.t, [&a, run](int64_t task) {
    const int64_t ti = task % a.t, kh = task / a.t % a.k, row = task / (a.t * a.k);
    run(a, row, kh, ti);
  });
}

ffi::Error AttentionImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> block_k,
                         ffi::Buffer<ffi::F32> block_v, ffi::Buffer<ffi::S32> lengths, ffi::Buffer<ffi::S32> rows,
                         ffi::RemainingArgs ctx, ffi::ResultBuffer<ffi::F32> out) {
  Attention a;
  if (auto e = SetUp(a, q, block_k, block_v, lengths, rows, ctx, out->typed_data()); e.failure()) return e;
  Attend(pool, a);
  return ffi::Error::Success();
}

// Attention, then the block's keys and values written into the context at each row's positions lengths[b] .. +T - 1
// (past the last segment: dropped). The results after the output are the context segments, aliased to the operands
// (`kernels.attention(..., write=True)`), so the cache is updated in place: one write here instead of an XLA scatter
// per layer and segment, each its own compiled kernel. Written after every query has read, so no query sees the block
// twice.
ffi::Error AttentionWriteImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> block_k,
                              ffi::Buffer<ffi::F32> block_v, ffi::Buffer<ffi::S32> lengths,
                              ffi::Buffer<ffi::S32> rows, ffi::RemainingArgs ctx, ffi::ResultBuffer<ffi::F32> out,
                              ffi::RemainingRets written) {
  Attention a;
  if (auto e = SetUp(a, q, block_k, block_v, lengths, rows, ctx, out->typed_data()); e.failure()) return e;
  const size_t segments = a.ctx_len.size();
  if (written.size() != 2 * segments) {
    return ffi::Error::InvalidArgument("attention: expected one written result per context segment");
  }
  std::vector<float*> dst_k, dst_v;
  for (size_t j = 0; j < segments; ++j) {
    auto kj = written.get<ffi::Buffer<ffi::F32>>(j);
    auto vj = written.get<ffi::Buffer<ffi::F32>>(segments + j);
    if (kj.has_error() || vj.has_error() || (*kj)->dimensions().size() != 4 ||
        !SameDims((*kj)->dimensions(), (*vj)->dimensions()) || (*kj)->dimensions()[2] != a.ctx_len[j]) {
      return ffi::Error::InvalidArgument("attention: the written results must match the context segments");
    }
    dst_k.push_back((*kj)->typed_data());
    dst_v.push_back((*vj)->typed_data());
  }
  Attend(pool, a);
  for (int64_t row = 0; row < a.b; ++row) {
    for (int64_t ti = 0; ti < a.t; ++ti) {
      int64_t pos = static_cast<int64_t>(a.lengths[row]) + ti;
      if (pos < 0 || pos >= a.ctx_total) continue;
      size_t j = 0;
      while (pos >= a.ctx_len[j]) pos -= a.ctx_len[j++];
      for (int64_t kh = 0; kh < a.k; ++kh) {
        const int64_t src = ((row * a.k + kh) * a.t + ti) * a.h;
        const int64_t dst = ((a.rows[row] * a.k + kh) * a.ctx_len[j] + pos) * a.h;
        std::copy_n(a.block_k + src, a.h, dst_k[j] + dst);
        std::copy_n(a.block_v + src, a.h, dst_v[j] + dst);
      }
    }
  }
  return ffi::Error::Success();
}

// cos and sin [H, N] of rotate-half RoPE at positions [N]: frequency i < H/2 is theta^(-2i/H), repeated over both
// halves of a head. Each entry is computed in double from its own position and rounded once, so a position's tables
// are the same in any call (XLA fuses its own sin and cos into each consumer, where their last bits follow the
// fusion's shape).
ffi::Error RopeTablesImpl(ffi::Buffer<ffi::S32> positions, ffi::ResultBuffer<ffi::F32> cos,
                          ffi::ResultBuffer<ffi::F32> sin, float theta) {
  auto cd = cos->dimensions();
  if (positions.dimensions().size() != 1 || cd.size() != 2 || cd[1] != positions.dimensions()[0] || cd[0] % 2 != 0 ||
      !SameDims(sin->dimensions(), cd)) {
    return ffi::Error::InvalidArgument("rope_tables: expected positions [N] and tables [H, N] with H even");
  }
  const int64_t h = cd[0], n = cd[1], half = h / 2;
  const int32_t* pos = positions.typed_data();
  float* c = cos->typed_data();
  float* s = sin->typed_data();
  for (int64_t i = 0; i < half; ++i) {
    const double inv = std::pow(static_cast<double>(theta), -2.0 * static_cast<double>(i) / static_cast<double>(h));
    for (int64_t j = 0; j < n; ++j) {
      const double angle = static_cast<double>(pos[j]) * inv;
      c[i * n + j] = c[(i + half) * n + j] = static_cast<float>(std::cos(angle));
      s[i * n + j] = s[(i + half) * n + j] = static_cast<float>(std::sin(angle));
    }
  }
  return ffi::Error::Success();
}

// y = x * cos + rotate_half(x) * sin over x [..., H, N], each output from its own inputs in double, rounded once.
ffi::Error RopeImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> cos, ffi::Buffer<ffi::F32> sin,
                    ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions();
  auto cd = cos.dimensions();
  if (xd.size() < 2 || cd.size() != 2 || cd[0] != xd[xd.size() - 2] || cd[1] != xd[xd.size() - 1] ||
      cd[0] % 2 != 0 || !SameDims(sin.dimensions(), cd)) {
    return ffi::Error::InvalidArgument("rope: expected x [..., H, N] and cos, sin [H, N] with H even");
  }
  const int64_t h = cd[0], n = cd[1], half = h / 2, heads = x.element_count() / (h * n);
  const float* xp = x.typed_data();
  const float* c = cos.typed_data();
  const float* s = sin.typed_data();
  float* yp = y->typed_data();
  for (int64_t r = 0; r < heads; ++r) {
    const float* xr = xp + r * h * n;
    float* yr = yp + r * h * n;
    for (int64_t i = 0; i < half; ++i) {
      for (int64_t j = 0; j < n; ++j) {
        const double a = xr[i * n + j], b = xr[(i + half) * n + j];
        yr[i * n + j] = static_cast<float>(a * c[i * n + j] - b * s[i * n + j]);
        yr[(i + half) * n + j] = static_cast<float>(b * c[(i + half) * n + j] + a * s[(i + half) * n + j]);
      }
    }
  }
  return ffi::Error::Success();
}

// y[:, n] = x[:, n] / sqrt(mean(x[:, n]^2) + eps) * weight, the sum of squares in input order.
ffi::Error RmsNormImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> weight, ffi::ResultBuffer<ffi::F32> y,
                       float eps) {
  auto xd = x.dimensions();
  if (xd.size() != 2 || weight.dimensions().size() != 1 || weight.dimensions()[0] != xd[0]) {
    return ffi::Error::InvalidArgument("rms_norm: expected x [D, N] and weight [D]");
  }
  const int64_t d = xd[0], n = xd[1];
  const float* xp = x.typed_data();
  const float* w = weight.typed_data();
  float* yp = y->typed_data();
  for (int64_t c = 0; c < n; ++c) {
    float ss = 0.0f;
    for (int64_t i = 0; i < d; ++i) ss = std::fma(xp[i * n + c], xp[i * n + c], ss);
    const float r = 1.0f / std::sqrt(ss / static_cast<float>(d) + eps);
    for (int64_t i = 0; i < d; ++i) yp[i * n + c] = xp[i * n + c] * r * w[i];
  }
  return ffi::Error::Success();
}

// top[n] = the first v with x[v, n] the greatest of column n, NaN above every number (jnp.argmax's order), in one
// pass over the rows [V, N] split into chunks of rows over the pool; the chunks' winners are merged in row order.
ffi::Error ArgmaxImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::S32> top) {
  auto xd = x.dimensions();
  if (xd.size() != 2 || xd[0] < 1) return ffi::Error::InvalidArgument("argmax: expected x [V, N] with V >= 1");
  const int64_t v = xd[0], n = xd[1];
  const float* xp = x.typed_data();
  constexpr int64_t kRows = 4096;  // rows per task
  const int64_t chunks = (v + kRows - 1) / kRows;
  std::vector<float> best(chunks * n);
  std::vector<int32_t> where(chunks * n);
  // a beats b when it is greater, or NaN where b is not (ties and later NaNs keep the first).
  auto beats = [](float a, float b) { return a > b || (std::isnan(a) && !std::isnan(b)); };
  tandem::ParallelFor(pool, chunks, [&](int64_t c) {
    float* bc = best.data() + c * n;
    int32_t* wc = where.data() + c * n;
    const int64_t end = std::min(v, (c + 1) * kRows);
    for (int64_t j = 0; j < n; ++j) bc[j] = xp[c * kRows * n + j], wc[j] = static_cast<int32_t>(c * kRows);
    for (int64_t r = c * kRows + 1; r < end; ++r) {
      for (int64_t j = 0; j < n; ++j) {
        if (beats(xp[r * n + j], bc[j])) bc[j] = xp[r * n + j], wc[j] = static_cast<int32_t>(r);
      }
    }
  });
  int32_t* out = top->typed_data();
  for (int64_t j = 0; j < n; ++j) {
    int64_t c0 = 0;
    for (int64_t c = 1; c < chunks; ++c) c0 = beats(best[c * n + j], best[c0 * n + j]) ? c : c0;
    out[j] = where[c0 * n + j];
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(TandemArgmax, ArgmaxImpl,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<ffi::S32>>());

// Both attention handlers' operands: q, block keys and values, lengths, rows, then the context segments; and the output.
static auto AttentionBinding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::S32>>()
      .Arg<ffi::Buffer<ffi::S32>>()
      .RemainingArgs()
      .Ret<ffi::Buffer<ffi::F32>>();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(TandemAttention, AttentionImpl, AttentionBinding());

// The written context segments follow the output (aliased to the context operands).
XLA_FFI_DEFINE_HANDLER_SYMBOL(TandemAttentionWrite, AttentionWriteImpl, AttentionBinding().RemainingRets());

XLA_FFI_DEFINE_HANDLER_SYMBOL(TandemRopeTables, RopeTablesImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("theta"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(TandemRope, RopeImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(TandemRmsNorm, RmsNormImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("eps"));
