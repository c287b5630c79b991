// Shared by our CPU kernels: llama.cpp's Q4_1/Q8_0 block layout, activation quantization to int16
// blocks, and the fused dequantize-dot products in three tiers, chosen by the compiler flags of
// the build (kernels/__init__.py builds one library per tier): AVX-512BW (with VNNI where
// compiled for it), AVX2 + FMA + F16C (with AVX-VNNI where compiled for it), and portable code. Included by qmatmul.cpp (the linear ops) and decode.cpp (the fused decode
// step); everything is in an anonymous namespace, one copy per translation unit.
//
// y[b, n] = sum_k x[b, k] * w[n, k] with the weights in blocks of 32 along k:
//   Q4_1: w[j] = d * q[j] + m, q in 0..15; fp16 d and m; byte j of the block's 16 quant bytes holds
//         q[j] (low nibble) and q[j + 16] (high nibble).
//   Q8_0: w[j] = d * q[j], q int8, fp16 d.
// Activations are quantized to int16 per block of 32 (scale amax / 32767), so each block's dot
// product is an exact integer dot (vpmaddwd / VNNI vpdpwssd) scaled once.
//
// The weight bytes are widened to int16 lanes with shifts and masks only (no shuffles, which
// share one port with the permutes on the CPUs we measured): a 16-bit lane holds two weight
// bytes, and the activations are stored in the order that lines them up (`Layout` below).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif

// The tier this translation unit is compiled for (by the build's -march flags).
#if defined(__AVX512BW__) && defined(__AVX512F__)
#define LW_AVX512 1
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define LW_AVX2 1
#endif
#if defined(LW_AVX512) || defined(LW_AVX2)
#define LW_DOT4 1  // the 4-row vector block kernels exist in this tier
#endif

namespace {

constexpr int64_t QK = 32;
constexpr int64_t Q4_1_BYTES = 20;
constexpr int64_t Q8_0_BYTES = 34;

inline float fp16_to_fp32(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
#if defined(__F16C__)
  return _cvtsh_ss(h);
#else
  const uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff;
  if (exp == 0) {
    const float v = std::ldexp(static_cast<float>(man), -24);
    return sign ? -v : v;
  }
  uint32_t bits = exp == 31 ? sign | 0x7f800000u | (man << 13)
                            : sign | ((exp + 112) << 23) | (man << 13);
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
#endif
}

// Activations of one row, quantized per block to int16 (scale amax / 32767: rounding error near
// 1e-5 relative, far below the weights'): q [K] in the kernel's order, scale d [K/32], exact block
// sums s [K/32].
struct QuantRow {
  const int16_t* q;
  const float* d;
  const float* s;
};

// Where element j of block b goes in the quantized row.
//   Q4_1: blocks go in groups of G = 4 (then one group of 2, then 1 for what is left). A group's
//     nibble bytes, read as 16-bit lanes t = 0..8G-1 (bytes 2t, 2t+1 of block bo = t / 8), give
//     four int16 vectors: low nibble of the even byte, low nibble of the odd byte, high nibble of
//     the even byte, high nibble of the odd byte; vector k's lane t must meet the activation of
//     that same weight, so it is stored at g * 32 + k * 8G + t.
//   Q8_0: groups of 2 blocks (then 1): 16-bit lanes t hold bytes 2t (even) and 2t + 1 (odd),
//     widened with arithmetic shifts; activation of element j at g * 32 + (j & 1) * 16G + t.
//   Plain: b * 32 + j.
enum class Layout { Plain, Q4_1, Q8_0 };

inline int64_t group_of(int64_t b, int64_t nb, int64_t size, int64_t* start) {
  const int64_t full = nb / size * size;
  if (b < full) {
    *start = b - b % size;
    return size;
  }
  if (size == 4 && nb - full >= 2 && b < full + 2) {
    *start = full;
    return 2;
  }
  *start = b;
  return 1;
}

inline int64_t q_pos(Layout layout, int64_t b, int64_t j, int64_t nb) {
  int64_t g = 0;
  if (layout == Layout::Q4_1) {
    const int64_t G = group_of(b, nb, 4, &g), jj = j & 15;
    const int64_t k = (jj & 1) + (j >= 16 ? 2 : 0);
    return g * QK + k * 8 * G + (b - g) * 8 + jj / 2;
  }
  if (layout == Layout::Q8_0) {
    const int64_t G = group_of(b, nb, 2, &g);
    return g * QK + (j & 1) * 16 * G + (b - g) * 16 + j / 2;
  }
  return b * QK + j;
}

// The activation orders this tier's kernels read: the vector tiers' interleaved ones, or the plain
// order in the portable tier (whose simple loops the compiler vectorizes).
#ifdef LW_DOT4
constexpr Layout ACT4 = Layout::Q4_1, ACT8 = Layout::Q8_0;
#else
constexpr Layout ACT4 = Layout::Plain, ACT8 = Layout::Plain;
#endif

void quantize_row(const float* x, int64_t k, Layout layout, int16_t* q, float* d, float* s) {
  const int64_t nb = k / QK;
  for (int64_t b = 0; b < nb; ++b) {
    const float* xb = x + b * QK;
    float amax = 0.f, sum = 0.f;
    for (int j = 0; j < QK; ++j) {
      amax = std::max(amax, std::fabs(xb[j]));
      sum += xb[j];
    }
    const float scale = amax / 32767.f, inv = scale > 0.f ? 1.f / scale : 0.f;
    for (int j = 0; j < QK; ++j) {
      q[q_pos(layout, b, j, nb)] = static_cast<int16_t>(std::nearbyint(xb[j] * inv));
    }
    d[b] = scale;
    s[b] = sum;
  }
}

// Weight rows: all blocks' quants first, then their fp16 scales (and mins): the GGUF blocks'
// bytes, regrouped so the kernel reads 64 bytes of quants and 16 scales at a time.
//   Q4_1 row: nb * 16 bytes of nibbles | nb fp16 d | nb fp16 m     (20 bytes per block)
//   Q8_0 row: nb * 32 int8               | nb fp16 d                 (34 bytes per block)

// Ask for the weight rows a few rows ahead to be fetched while this one computes (F16 rows only:
// the quantized rows stream one at a time for the hardware prefetcher, matvec.h).
constexpr int64_t PREFETCH_ROWS = 8;
inline void prefetch(const uint8_t* p, const uint8_t* end, int64_t bytes) {
  for (int64_t o = 0; o < bytes && p + o < end; o += 64) __builtin_prefetch(p + o, 0, 3);
}

// One row, portable code (also the reference for the vector code's element order).
// Integer dot of block b of one row with its activations (the quant part, before scales).
inline int block_dot_q4_1(const uint8_t* row, const int16_t* xq, int64_t b, int64_t nb) {
  int sum = 0;
  for (int j = 0; j < 16; ++j) {
    const uint8_t byte = row[b * 16 + j];
    sum += (byte & 0x0f) * xq[q_pos(ACT4, b, j, nb)] + (byte >> 4) * xq[q_pos(ACT4, b, j + 16, nb)];
  }
  return sum;
}

inline int block_dot_q8_0(const uint8_t* row, const int16_t* xq, int64_t b, int64_t nb) {
  const int8_t* w = reinterpret_cast<const int8_t*>(row + b * 32);
  int sum = 0;
  for (int j = 0; j < QK; ++j) sum += w[j] * xq[q_pos(ACT8, b, j, nb)];
  return sum;
}

float dot_q4_1(const uint8_t* row, QuantRow x, int64_t nb) {
  const uint8_t* ds = row + nb * 16;
  float total = 0.f;
  for (int64_t b = 0; b < nb; ++b) {
    total += fp16_to_fp32(ds + 2 * b) * x.d[b] * block_dot_q4_1(row, x.q, b, nb) +
             fp16_to_fp32(ds + nb * 2 + 2 * b) * x.s[b];
  }
  return total;
}

float dot_q8_0(const uint8_t* row, QuantRow x, int64_t nb) {
  const uint8_t* ds = row + nb * 32;
  float total = 0.f;
  for (int64_t b = 0; b < nb; ++b) {
    total += fp16_to_fp32(ds + 2 * b) * x.d[b] * block_dot_q8_0(row, x.q, b, nb);
  }
  return total;
}

#ifdef LW_DOT4
// The sum of a 256-bit float vector's lanes (both vector tiers).
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif

#ifdef LW_AVX512
inline __m512i dot_i16(__m512i acc, __m512i a, __m512i b) {
#if defined(__AVX512VNNI__)
  return _mm512_dpwssd_epi32(acc, a, b);
#else
  return _mm512_add_epi32(acc, _mm512_madd_epi16(a, b));
#endif
}

inline __m256i dot_i16(__m256i acc, __m256i a, __m256i b) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpwssd_epi32(acc, a, b);
#else
  return _mm256_add_epi32(acc, _mm256_madd_epi16(a, b));
#endif
}

// fp16 values p[0..n) (n <= 16) as 16 floats, zero past n.
inline __m512 load_fp16(const uint8_t* p, int64_t n) {
  const __mmask16 m = n >= 16 ? __mmask16(0xffff) : __mmask16((1u << n) - 1);
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p));
}

// lanes [4 x i, 4 x i+1, 4 x i+2, 4 x i+3]: picks the 4 block scales of a Q4_1 group
inline __m512i quad_index(int64_t i) {
  return _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(i)),
                          _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0));
}

// lanes [8 x i, 8 x i+1]: the 2 block scales of a Q8_0 group
inline __m512i pair_index(int64_t i) {
  return _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(i)),
                          _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0));
}

// R rows at once (the matvec streams one, matvec.h): activation loads are shared, R independent
// accumulators, and each row's 16 block scales of a chunk (d_w * d_x) stay in a register for
// the permutes.
// (always inlined: the one row loop calling both kernels, matvec.h, is ~25% slower otherwise)
template <int R>
__attribute__((always_inline)) inline void rows_q4_1(const uint8_t* row, int64_t row_bytes,
                                                    QuantRow x, int64_t nb, float* out) {
  __m512 acc[R], macc[R], dx[R];
  __m256 acc2[R];
  float tail[R] = {};
  for (int r = 0; r < R; ++r) acc[r] = macc[r] = _mm512_setzero_ps(), acc2[r] = _mm256_setzero_ps();
  const __m512i low = _mm512_set1_epi16(0x0f), four = _mm512_set1_epi32(4);
  const int64_t full = nb / 4 * 4;
  for (int64_t c = 0; c < nb; c += 16) {
    const int64_t n = std::min<int64_t>(16, nb - c);
    const __mmask16 mask = n >= 16 ? 0xffff : (1u << n) - 1;
    const __m512 xd = _mm512_maskz_loadu_ps(mask, x.d + c);
    const __m512 xs = _mm512_maskz_loadu_ps(mask, x.s + c);
    for (int r = 0; r < R; ++r) {
      const uint8_t* ds = row + r * row_bytes + nb * 16;
      dx[r] = _mm512_mul_ps(load_fp16(ds + 2 * c, n), xd);
      macc[r] = _mm512_fmadd_ps(load_fp16(ds + nb * 2 + 2 * c, n), xs, macc[r]);
    }
    __m512i idx = quad_index(0);
    int64_t i = 0;
    for (; i + 4 <= n && c + i + 4 <= full; i += 4, idx = _mm512_add_epi32(idx, four)) {
      const int16_t* a = x.q + (c + i) * QK;
      const __m512i a0 = _mm512_loadu_si512(a), a1 = _mm512_loadu_si512(a + 32);
      const __m512i a2 = _mm512_loadu_si512(a + 64), a3 = _mm512_loadu_si512(a + 96);
      for (int r = 0; r < R; ++r) {
        const __m512i v = _mm512_loadu_si512(row + r * row_bytes + (c + i) * 16);
        __m512i p = dot_i16(_mm512_setzero_si512(), _mm512_and_si512(v, low), a0);
        __m512i p2 = dot_i16(_mm512_setzero_si512(),
                             _mm512_and_si512(_mm512_srli_epi16(v, 4), low), a2);
        p = dot_i16(p, _mm512_and_si512(_mm512_srli_epi16(v, 8), low), a1);
        p2 = dot_i16(p2, _mm512_srli_epi16(v, 12), a3);
        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(p, p2)),
                                 _mm512_permutexvar_ps(idx, dx[r]), acc[r]);
      }
    }
    if (i + 2 <= n && c + i == full) {  // a group of 2 blocks after the last group of 4
      const int16_t* a = x.q + (c + i) * QK;
      const __m256i lo = _mm256_set1_epi16(0x0f);
      const __m256i a0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a));
      const __m256i a1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + 16));
      const __m256i a2 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + 32));
      const __m256i a3 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + 48));
      for (int r = 0; r < R; ++r) {
        const __m256i v = _mm256_loadu_si256(
            reinterpret_cast<const __m256i*>(row + r * row_bytes + (c + i) * 16));
        __m256i p = dot_i16(_mm256_setzero_si256(), _mm256_and_si256(v, lo), a0);
        p = dot_i16(p, _mm256_and_si256(_mm256_srli_epi16(v, 8), lo), a1);
        p = dot_i16(p, _mm256_and_si256(_mm256_srli_epi16(v, 4), lo), a2);
        p = dot_i16(p, _mm256_srli_epi16(v, 12), a3);
        // lanes 0-3 are block i's sums, 4-7 block i + 1's: scales [4 x d_i, 4 x d_i+1]
        const __m256 scale = _mm512_castps512_ps256(_mm512_permutexvar_ps(idx, dx[r]));
        acc2[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), scale, acc2[r]);
      }
      i += 2;
    }
    if (i < n) {  // a single last block
      const int64_t b = c + i;
      for (int r = 0; r < R; ++r) {
        const uint8_t* rr = row + r * row_bytes;
        tail[r] += fp16_to_fp32(rr + nb * 16 + 2 * b) * x.d[b] * block_dot_q4_1(rr, x.q, b, nb);
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    const __m512 all = _mm512_add_ps(_mm512_add_ps(acc[r], macc[r]), _mm512_zextps256_ps512(acc2[r]));
    out[r] = _mm512_reduce_add_ps(all) + tail[r];
  }
}

// Q8_0, R rows at once, two blocks (64 weight bytes) per step.
template <int R>
__attribute__((always_inline)) inline void rows_q8_0(const uint8_t* row, int64_t row_bytes,
                                                    QuantRow x, int64_t nb, float* out) {
  __m512 acc[R], dx[R];
  float tail[R] = {};
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  const __m512i two = _mm512_set1_epi32(2);
  const int64_t full = nb / 2 * 2;
  for (int64_t c = 0; c < nb; c += 16) {
    const int64_t n = std::min<int64_t>(16, nb - c);
    const __m512 xd = _mm512_maskz_loadu_ps(n >= 16 ? 0xffff : (1u << n) - 1, x.d + c);
    for (int r = 0; r < R; ++r) {
      dx[r] = _mm512_mul_ps(load_fp16(row + r * row_bytes + nb * 32 + 2 * c, n), xd);
    }
    __m512i idx = pair_index(0);
    int64_t i = 0;
    for (; i + 2 <= n && c + i + 2 <= full; i += 2, idx = _mm512_add_epi32(idx, two)) {
      const int16_t* a = x.q + (c + i) * QK;
      const __m512i even = _mm512_loadu_si512(a), odd = _mm512_loadu_si512(a + 32);
      for (int r = 0; r < R; ++r) {
        const __m512i v = _mm512_loadu_si512(row + r * row_bytes + (c + i) * 32);
        __m512i p = dot_i16(_mm512_setzero_si512(), _mm512_srai_epi16(_mm512_slli_epi16(v, 8), 8),
                            even);
        p = dot_i16(p, _mm512_srai_epi16(v, 8), odd);
        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), _mm512_permutexvar_ps(idx, dx[r]),
                                 acc[r]);
      }
    }
    if (i < n) {  // a single last block
      const int64_t b = c + i;
      for (int r = 0; r < R; ++r) {
        const uint8_t* rr = row + r * row_bytes;
        tail[r] += fp16_to_fp32(rr + nb * 32 + 2 * b) * x.d[b] * block_dot_q8_0(rr, x.q, b, nb);
      }
    }
  }
  for (int r = 0; r < R; ++r) out[r] = _mm512_reduce_add_ps(acc[r]) + tail[r];
}

#elif defined(LW_AVX2)
// The AVX2 tier: the same activation layout, read as 256-bit halves (one half of a Q4_1 group of 4
// is 2 blocks, as a group of 2 is; one Q8_0 block is one half of a group of 2).
inline __m256i dot_i16(__m256i acc, __m256i a, __m256i b) {
#if defined(__AVXVNNI__)
  return _mm256_dpwssd_avx_epi32(acc, a, b);
#else
  return _mm256_add_epi32(acc, _mm256_madd_epi16(a, b));
#endif
}

// n <= 8 fp16 values at p as 8 floats, zero past n.
inline __m256 load_fp16x8(const uint8_t* p, int64_t n) {
  if (n >= 8) return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  alignas(16) uint16_t buf[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  std::memcpy(buf, p, static_cast<size_t>(n) * 2);
  return _mm256_cvtph_ps(_mm_load_si128(reinterpret_cast<const __m128i*>(buf)));
}

// n <= 8 floats at p, zero past n.
inline __m256 load_f32x8(const float* p, int64_t n) {
  if (n >= 8) return _mm256_loadu_ps(p);
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_maskload_ps(p, _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), lanes));
}

inline __m256i load256(const void* p) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
}

// Q4_1, R rows at once, two blocks (32 weight bytes) per step; the mins' part (m * sum(x)) is
// added to the same accumulators (only their total is used).
template <int R>
__attribute__((always_inline)) inline void rows_q4_1(const uint8_t* row, int64_t row_bytes,
                                                    QuantRow x, int64_t nb, float* out) {
  __m256 acc[R];
  float tail[R] = {};
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  const __m256i low = _mm256_set1_epi16(0x0f);
  const int64_t full = nb / 4 * 4;
  for (int64_t c = 0; c < nb; c += 8) {
    const int64_t n = std::min<int64_t>(8, nb - c);
    const __m256 xd = load_f32x8(x.d + c, n), xs = load_f32x8(x.s + c, n);
    __m256 dx[R];
    for (int r = 0; r < R; ++r) {
      const uint8_t* ds = row + r * row_bytes + nb * 16;
      dx[r] = _mm256_mul_ps(load_fp16x8(ds + 2 * c, n), xd);
      acc[r] = _mm256_fmadd_ps(load_fp16x8(ds + nb * 2 + 2 * c, n), xs, acc[r]);
    }
    int64_t i = 0;
    for (; i + 2 <= n; i += 2) {
      const int64_t b = c + i;
      const int16_t* a;
      int64_t stride;  // between the four activation vectors of the pair
      if (b + 2 <= full) {  // half (b - g) / 2 of the group of 4 starting at g
        const int64_t g = b - b % 4;
        a = x.q + g * QK + (b - g) / 2 * 16, stride = 32;
      } else if (b == full) {  // the group of 2 after the last group of 4
        a = x.q + b * QK, stride = 16;
      } else {
        break;
      }
      const __m256i a0 = load256(a), a1 = load256(a + stride);
      const __m256i a2 = load256(a + 2 * stride), a3 = load256(a + 3 * stride);
      // lanes 0-3 hold block b's sums, 4-7 block b + 1's: scales [4 x dx_i, 4 x dx_i+1]
      const __m256i idx = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(i)),
                                           _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1));
      for (int r = 0; r < R; ++r) {
        const __m256i v = load256(row + r * row_bytes + b * 16);
        __m256i p = dot_i16(_mm256_setzero_si256(), _mm256_and_si256(v, low), a0);
        p = dot_i16(p, _mm256_and_si256(_mm256_srli_epi16(v, 8), low), a1);
        p = dot_i16(p, _mm256_and_si256(_mm256_srli_epi16(v, 4), low), a2);
        p = dot_i16(p, _mm256_srli_epi16(v, 12), a3);
        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_permutevar8x32_ps(dx[r], idx),
                                 acc[r]);
      }
    }
    if (i < n) {  // a single last block
      const int64_t b = c + i;
      for (int r = 0; r < R; ++r) {
        const uint8_t* rr = row + r * row_bytes;
        tail[r] += fp16_to_fp32(rr + nb * 16 + 2 * b) * x.d[b] * block_dot_q4_1(rr, x.q, b, nb);
      }
    }
  }
  for (int r = 0; r < R; ++r) out[r] = hsum(acc[r]) + tail[r];
}

// Q8_0, R rows at once, one block (32 weight bytes) per step.
template <int R>
__attribute__((always_inline)) inline void rows_q8_0(const uint8_t* row, int64_t row_bytes,
                                                    QuantRow x, int64_t nb, float* out) {
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  const int64_t full = nb / 2 * 2;
  for (int64_t c = 0; c < nb; c += 8) {
    const int64_t n = std::min<int64_t>(8, nb - c);
    const __m256 xd = load_f32x8(x.d + c, n);
    __m256 dx[R];
    for (int r = 0; r < R; ++r) {
      dx[r] = _mm256_mul_ps(load_fp16x8(row + r * row_bytes + nb * 32 + 2 * c, n), xd);
    }
    for (int64_t i = 0; i < n; ++i) {
      const int64_t b = c + i;
      // even elements' activations, then odd ones' (q_pos: groups of 2 blocks, then 1)
      const int16_t* ea = b < full ? x.q + (b - b % 2) * QK + (b % 2) * 16 : x.q + b * QK;
      const int16_t* oa = ea + (b < full ? 32 : 16);
      const __m256i even = load256(ea), odd = load256(oa);
      const __m256i idx = _mm256_set1_epi32(static_cast<int>(i));
      for (int r = 0; r < R; ++r) {
        const __m256i v = load256(row + r * row_bytes + b * 32);
        __m256i p = dot_i16(_mm256_setzero_si256(),
                            _mm256_srai_epi16(_mm256_slli_epi16(v, 8), 8), even);
        p = dot_i16(p, _mm256_srai_epi16(v, 8), odd);
        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_permutevar8x32_ps(dx[r], idx),
                                 acc[r]);
      }
    }
  }
  for (int r = 0; r < R; ++r) out[r] = hsum(acc[r]);
}
#endif

}  // namespace
