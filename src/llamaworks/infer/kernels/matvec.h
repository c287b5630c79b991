// Matrix-vector products over weight matrices of several kinds (float32, bfloat16, Q4_1, Q8_0
// blocks), split across threads by output rows: the loop that both the linear ops (qmatmul.cpp)
// and the fused decode step (decode.cpp) run. Each weight row is read once for all input rows
// (`matvec_rows`), or, for a MoE layer's experts, once for the rows routed to it
// (`matvec_segments`).
#pragma once

#include <vector>

#include "blocks.h"
#include "ggml_types.h"

// Each tier's build registers its ops under its own namespace (torch.ops.llamaworks_avx2, ...), so
// several tiers can be loaded into one process (tests compare them); LW_NAMESPACE is set by the
// build.
#ifndef LW_NAMESPACE
#define LW_NAMESPACE llamaworks
#endif
#define LW_LIBRARY_(ns, m) TORCH_LIBRARY(ns, m)
#define LW_LIBRARY(m) LW_LIBRARY_(LW_NAMESPACE, m)
#define LW_FRAGMENT_(ns, m) TORCH_LIBRARY_FRAGMENT(ns, m)
#define LW_FRAGMENT(m) LW_FRAGMENT_(LW_NAMESPACE, m)
#define LW_IMPL_(ns, m) TORCH_LIBRARY_IMPL(ns, CPU, m)
#define LW_IMPL(m) LW_IMPL_(LW_NAMESPACE, m)

namespace {

enum Kind : int64_t { F32 = 0, BF16 = 1, KQ4_1 = 4, KQ8_0 = 8 };

struct Mat {
  const uint8_t* data;
  int64_t rows, row_bytes, kind;
};

// Bytes of one row of k weights of a block kind (Q4_1, Q8_0 or a GGML kind), or -1 when k does
// not fit the kind's blocks or the kind is not a block kind.
inline int64_t block_row_bytes(int64_t kind, int64_t k) {
  if (kind == KQ4_1 || kind == KQ8_0)
    return k % QK ? -1 : k / QK * (kind == KQ4_1 ? Q4_1_BYTES : Q8_0_BYTES);
  return is_ggml_kind(kind) ? ggml_row_bytes(kind, k) : -1;
}

inline bool is_block_kind(int64_t kind) {
  return kind == KQ4_1 || kind == KQ8_0 || is_ggml_kind(kind);
}

inline float dot_f32(const float* a, const float* b, int64_t n) {
  int64_t i = 0;
  float s = 0.f;
#ifdef LW_AVX512
  __m512 acc = _mm512_setzero_ps();
  for (; i + 16 <= n; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
  s = _mm512_reduce_add_ps(acc);
#elif defined(LW_AVX2)
  __m256 acc = _mm256_setzero_ps();
  for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  s = hsum(acc);
#endif
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// Dot products of x [k] with 4 consecutive float32 / bfloat16 rows (stride ld elements).
inline void dot4_f32(const float* w, int64_t ld, const float* x, int64_t k, float* out) {
  int64_t i = 0;
  float s[4] = {0.f, 0.f, 0.f, 0.f};
#ifdef LW_AVX512
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  for (; i + 16 <= k; i += 16) {
    const __m512 xv = _mm512_loadu_ps(x + i);
    a0 = _mm512_fmadd_ps(_mm512_loadu_ps(w + i), xv, a0);
    a1 = _mm512_fmadd_ps(_mm512_loadu_ps(w + ld + i), xv, a1);
    a2 = _mm512_fmadd_ps(_mm512_loadu_ps(w + 2 * ld + i), xv, a2);
    a3 = _mm512_fmadd_ps(_mm512_loadu_ps(w + 3 * ld + i), xv, a3);
  }
  s[0] = _mm512_reduce_add_ps(a0);
  s[1] = _mm512_reduce_add_ps(a1);
  s[2] = _mm512_reduce_add_ps(a2);
  s[3] = _mm512_reduce_add_ps(a3);
#elif defined(LW_AVX2)
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  for (; i + 8 <= k; i += 8) {
    const __m256 xv = _mm256_loadu_ps(x + i);
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i), xv, a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w + ld + i), xv, a1);
    a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w + 2 * ld + i), xv, a2);
    a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w + 3 * ld + i), xv, a3);
  }
  s[0] = hsum(a0), s[1] = hsum(a1), s[2] = hsum(a2), s[3] = hsum(a3);
#endif
  for (; i < k; ++i) {
    for (int r = 0; r < 4; ++r) s[r] += w[r * ld + i] * x[i];
  }
  for (int r = 0; r < 4; ++r) out[r] = s[r];
}

inline float bf16_to_f32(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline void dot4_bf16(const uint16_t* w, int64_t ld, const float* x, int64_t k, float* out) {
  int64_t i = 0;
  float s[4] = {0.f, 0.f, 0.f, 0.f};
#ifdef LW_AVX512
  __m512 acc[4];
  for (int r = 0; r < 4; ++r) acc[r] = _mm512_setzero_ps();
  for (; i + 16 <= k; i += 16) {
    const __m512 xv = _mm512_loadu_ps(x + i);
    for (int r = 0; r < 4; ++r) {
      const __m512i h = _mm512_cvtepu16_epi32(
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + r * ld + i)));
      acc[r] = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(h, 16)), xv, acc[r]);
    }
  }
  for (int r = 0; r < 4; ++r) s[r] = _mm512_reduce_add_ps(acc[r]);
#elif defined(LW_AVX2)
  __m256 acc[4];
  for (int r = 0; r < 4; ++r) acc[r] = _mm256_setzero_ps();
  for (; i + 8 <= k; i += 8) {
    const __m256 xv = _mm256_loadu_ps(x + i);
    for (int r = 0; r < 4; ++r) {
      const __m256i h = _mm256_cvtepu16_epi32(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + r * ld + i)));
      acc[r] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(h, 16)), xv, acc[r]);
    }
  }
  for (int r = 0; r < 4; ++r) s[r] = hsum(acc[r]);
#endif
  for (; i < k; ++i) {
    for (int r = 0; r < 4; ++r) s[r] += bf16_to_f32(w[r * ld + i]) * x[i];
  }
  for (int r = 0; r < 4; ++r) out[r] = s[r];
}

// The activation rows x [B, K] in every form the weight kinds need.
struct Input {
  const float* x = nullptr;
  int64_t B = 0, K = 0;
  std::vector<int16_t> q4, q8;  // int16 blocks, in the Q4_1 / Q8_0 kernels' orders
  std::vector<float> d4, s4, d8, s8;
  // int8 blocks: of 256 with sums per 16 (the K-quant kernels), of 32 with their sums (Q5_0/Q5_1)
  std::vector<int8_t> qk, qb;
  std::vector<float> dk, db;
  std::vector<int16_t> bk, sb;

  // (decode_layers sizes the vectors for its largest input first, so inside its parallel
  // region these resizes never allocate)
  void prepare(const float* x_, int64_t B_, int64_t K_, bool need4, bool need8,
               bool needb = false, bool needk = false) {
    x = x_, B = B_, K = K_;
    const int64_t nb = K / QK;
    if (needk) {
      qk.resize(B * K), dk.resize(B * (K / QKK)), bk.resize(B * (K / 16));
      for (int64_t b = 0; b < B; ++b)
        quantize_row_q8(x + b * K, K, QKK, 16, &qk[b * K], &dk[b * (K / QKK)], &bk[b * (K / 16)]);
    }
    if (needb) {
      qb.resize(B * K), db.resize(B * nb), sb.resize(B * nb);
      for (int64_t b = 0; b < B; ++b)
        quantize_row_q8(x + b * K, K, QK, QK, &qb[b * K], &db[b * nb], &sb[b * nb]);
    }
    if (need4) {
      q4.resize(B * K), d4.resize(B * nb), s4.resize(B * nb);
      for (int64_t b = 0; b < B; ++b)
        quantize_row(x + b * K, K, ACT4, &q4[b * K], &d4[b * nb], &s4[b * nb]);
    }
    if (need8) {
      q8.resize(B * K), d8.resize(B * nb), s8.resize(B * nb);
      for (int64_t b = 0; b < B; ++b)
        quantize_row(x + b * K, K, ACT8, &q8[b * K], &d8[b * nb], &s8[b * nb]);
    }
  }
  QuantRow row4(int64_t b) const { return {&q4[b * K], &d4[b * (K / QK)], &s4[b * (K / QK)]}; }
  QuantRow row8(int64_t b) const { return {&q8[b * K], &d8[b * (K / QK)], &s8[b * (K / QK)]}; }
  Q8Row rowk(int64_t b) const { return {&qk[b * K], &dk[b * (K / QKK)], &bk[b * (K / 16)]}; }
  Q8Row rowb(int64_t b) const { return {&qb[b * K], &db[b * (K / QK)], &sb[b * (K / QK)]}; }
};

// Quantize the input rows for the kinds `mats` need (one thread).
void prepare(Input& in, const std::vector<Mat>& mats) {
  bool need4 = false, need8 = false, needb = false, needk = false;
  for (const Mat& m : mats) {
    need4 |= m.kind == KQ4_1;
    need8 |= m.kind == KQ8_0;
    needb |= ggml_q8b_kernel(m.kind);
    needk |= ggml_q8k_kernel(m.kind);
  }
  in.prepare(in.x, in.B, in.K, need4, need8, needb, needk);
}

// One weight matrix applied to a run of input rows: y[b * ldy + col + r] = mats row r . x row b
// for b in [b0, b0 + nb) (a MoE layer's experts each take the token copies routed to them).
struct Segment {
  Mat m;
  int64_t b0, nb, col;
};

// Weight rows [r0, r1) of segment s for its input rows (thread-local work of matvec_segments).
inline void segment_rows(const Input& in, const Segment& s, int64_t r0, int64_t r1, float* y,
                         int64_t ldy) {
  const Mat& m = s.m;
  const float* x = in.x;
  const int64_t K = in.K, nb = K / QK, b1 = s.b0 + s.nb;
  const uint8_t* end = m.data + m.rows * m.row_bytes;
  float* yc = y + s.col;
  const bool q8b = ggml_q8b_kernel(m.kind), q8k = ggml_q8k_kernel(m.kind);
  // Quantized rows go one at a time, each streamed start to end, with no software prefetch: a
  // thread's rows are one sequential stream the hardware prefetcher follows. Four rows at a time
  // (sharing the activation loads) interleave four streams per thread; on an AMD EPYC Zen 4 that
  // left 3B decode at 8.7 tok/s (Q4_0) against 14-17 one row at a time (BENCHMARKS 2026-12-04).
#ifdef LW_DOT4
  const bool own = m.kind == KQ4_1 || m.kind == KQ8_0;  // our Q4_1/Q8_0 rows' vector kernels
#else
  const bool own = false;
#endif
  if (q8b || q8k || own) {
    for (int64_t i = r0; i < r1; ++i) {
      const uint8_t* w = m.data + i * m.row_bytes;
      for (int64_t b = s.b0; b < b1; ++b) {
        float v = 0.f;
        if (q8b) dot_block32<1>(m.kind, w, m.row_bytes, in.rowb(b), K, &v);  // int8 activations
        else if (q8k) kquant_rows<1>(m.kind, w, m.row_bytes, in.rowk(b), K, &v);
#ifdef LW_DOT4
        else if (m.kind == KQ4_1) rows_q4_1<1>(w, m.row_bytes, in.row4(b), nb, &v);
        else rows_q8_0<1>(w, m.row_bytes, in.row8(b), nb, &v);
#endif
        yc[b * ldy + i] = v;
      }
    }
    return;
  }
  if (is_ggml_kind(m.kind)) {  // F16: each row decoded into a buffer, then one dot per input row
    thread_local std::vector<float> buf;
    if (static_cast<int64_t>(buf.size()) < K) buf.resize(K);
    for (int64_t i = r0; i < r1; ++i) {
      const uint8_t* w = m.data + i * m.row_bytes;
      prefetch(w + PREFETCH_ROWS * m.row_bytes, end, m.row_bytes);
      ggml_dequant_row(m.kind - GGML_KIND, w, K, buf.data());
      for (int64_t b = s.b0; b < b1; ++b) yc[b * ldy + i] = dot_f32(buf.data(), x + b * K, K);
    }
    return;
  }
  int64_t i = r0;
  float four[4];
  for (; i + 4 <= r1; i += 4) {
    const uint8_t* w = m.data + i * m.row_bytes;
    for (int64_t b = s.b0; b < b1; ++b) {
      switch (m.kind) {
        case F32:
          dot4_f32(reinterpret_cast<const float*>(w), K, x + b * K, K, four);
          break;
        case BF16:
          dot4_bf16(reinterpret_cast<const uint16_t*>(w), K, x + b * K, K, four);
          break;
        case KQ4_1:  // (the portable tier's Q4_1 and Q8_0)
          for (int r = 0; r < 4; ++r) four[r] = dot_q4_1(w + r * m.row_bytes, in.row4(b), nb);
          break;
        default:
          for (int r = 0; r < 4; ++r) four[r] = dot_q8_0(w + r * m.row_bytes, in.row8(b), nb);
      }
      for (int r = 0; r < 4; ++r) yc[b * ldy + i + r] = four[r];
    }
  }
  for (; i < r1; ++i) {  // the last rows of a range, one at a time
    const uint8_t* w = m.data + i * m.row_bytes;
    for (int64_t b = s.b0; b < b1; ++b) {
      float v = 0.f;
      if (m.kind == F32 || m.kind == BF16) {
        for (int64_t j = 0; j < K; ++j) {
          const float wj = m.kind == F32 ? reinterpret_cast<const float*>(w)[j]
                                         : bf16_to_f32(reinterpret_cast<const uint16_t*>(w)[j]);
          v += wj * x[b * K + j];
        }
      } else if (m.kind == KQ4_1) {
        v = dot_q4_1(w, in.row4(b), nb);
      } else {
        v = dot_q8_0(w, in.row8(b), nb);
      }
      yc[b * ldy + i] = v;
    }
  }
}

// Every segment's outputs (y row stride ldy): thread tid of T takes its share of all segments'
// weight rows together (multiples of 4); each weight row is read once for its input rows.
// `prepare` must have run for the segments' kinds.
void matvec_segments(const Input& in, const std::vector<Segment>& segs, float* y, int64_t ldy,
                     int tid, int T) {
  int64_t total = 0;
  for (const Segment& s : segs) total += s.m.rows;
  const int64_t share = (total / T + 3) / 4 * 4;
  const int64_t n0 = std::min(total, tid * share);
  const int64_t n1 = tid == T - 1 ? total : std::min(total, n0 + share);
  int64_t base = 0;
  for (const Segment& s : segs) {
    const int64_t lo = std::max(n0, base), hi = std::min(n1, base + s.m.rows);
    if (lo < hi) segment_rows(in, s, lo - base, hi - base, y, ldy);
    base += s.m.rows;
  }
}

// y[b, n0:n1] of the concatenated outputs of `mats` for every input row b (y row stride ldy):
// thread tid of T takes its share of the output rows (multiples of 4); each weight row is read
// once for all batch rows. `prepare` must have run.
void matvec_rows(const Input& in, const std::vector<Mat>& mats, float* y, int64_t ldy, int tid,
                 int T) {
  int64_t total = 0;
  for (const Mat& m : mats) total += m.rows;
  const int64_t share = (total / T + 3) / 4 * 4;
  const int64_t n0 = std::min(total, tid * share);
  const int64_t n1 = tid == T - 1 ? total : std::min(total, n0 + share);
  int64_t base = 0;
  for (const Mat& m : mats) {
    const int64_t lo = std::max(n0, base), hi = std::min(n1, base + m.rows);
    if (lo < hi) segment_rows(in, Segment{m, 0, in.B, base}, lo - base, hi - base, y, ldy);
    base += m.rows;
  }
}

}  // namespace
