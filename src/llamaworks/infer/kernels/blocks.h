// Shared by our CPU kernels: llama.cpp's Q4_1/Q8_0 block layout, activation quantization to int16
// blocks, and the fused dequantize-dot products (AVX-512 with VNNI where compiled for it, else
// portable scalar code). Included by qmatmul.cpp (the linear ops) and decode.cpp (the fused decode
// step); everything is in an anonymous namespace, one copy per translation unit.
//
// y[b, n] = sum_k x[b, k] * w[n, k] with the weights in blocks of 32 along k:
//   Q4_1: w[j] = d * q[j] + m, q in 0..15; fp16 d and m; byte j of the block's 16 quant bytes holds
//         q[j] (low nibble) and q[j + 16] (high nibble).
//   Q8_0: w[j] = d * q[j], q int8, fp16 d.
// Activations are quantized to int16 per block of 32 (scale amax / 32767), so each block's dot
// product is an exact integer dot (vpmaddwd / VNNI vpdpwssd) scaled once.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
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
// 1e-5 relative, far below the weights'): q [K], scale d [K/32], exact block sums s [K/32].
// For Q4_1 each pair of blocks (b, b + 1) is stored as b[0:16] b+1[0:16] b[16:32] b+1[16:32], the
// order in which the kernel unpacks their nibbles.
struct QuantRow {
  const int16_t* q;
  const float* d;
  const float* s;
};

void quantize_row(const float* x, int64_t k, bool pair_order, int16_t* q, float* d, float* s) {
  const int64_t nb = k / QK;
  for (int64_t b = 0; b < nb; ++b) {
    const float* xb = x + b * QK;
    float amax = 0.f, sum = 0.f;
    for (int j = 0; j < QK; ++j) {
      amax = std::max(amax, std::fabs(xb[j]));
      sum += xb[j];
    }
    const float scale = amax / 32767.f, inv = scale > 0.f ? 1.f / scale : 0.f;
    const bool paired = pair_order && (b | 1) < nb;
    for (int j = 0; j < QK; ++j) {
      int64_t at = b * QK + j;
      if (paired) at = (b & ~int64_t(1)) * QK + (j >= 16 ? 32 : 0) + (b & 1) * 16 + (j & 15);
      q[at] = static_cast<int16_t>(std::nearbyint(xb[j] * inv));
    }
    d[b] = scale;
    s[b] = sum;
  }
}

// Weight rows: all blocks' quants first, then their fp16 scales (and mins): the GGUF blocks'
// bytes, regrouped so the kernel reads 32 bytes of quants and 16 scales at a time.
//   Q4_1 row: nb * 16 bytes of nibbles | nb fp16 d | nb fp16 m     (20 bytes per block)
//   Q8_0 row: nb * 32 int8               | nb fp16 d                 (34 bytes per block)

#if defined(__AVX512BW__) && defined(__AVX512F__)
#define LW_AVX512 1
inline __m512i dot_i16(__m512i acc, __m512i a, __m512i b) {
#if defined(__AVX512VNNI__)
  return _mm512_dpwssd_epi32(acc, a, b);
#else
  return _mm512_add_epi32(acc, _mm512_madd_epi16(a, b));
#endif
}

// fp16 values p[0..n) (n <= 16) as 16 floats, zero past n.
inline __m512 load_fp16(const uint8_t* p, int64_t n) {
  const __mmask16 m = n >= 16 ? __mmask16(0xffff) : __mmask16((1u << n) - 1);
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p));
}
#endif

float dot_q4_1(const uint8_t* row, QuantRow x, int64_t nb) {
  const uint8_t* qs = row;
  const uint8_t* ds = row + nb * 16;
  const uint8_t* ms = ds + nb * 2;
#ifdef LW_AVX512
  __m512 acc = _mm512_setzero_ps(), macc = _mm512_setzero_ps();
  const __m512i low = _mm512_set1_epi16(0x0f);
  alignas(64) float dx[16];
  for (int64_t c = 0; c < nb; c += 16) {  // chunks of 16 blocks share one scale load
    const int64_t n = std::min<int64_t>(16, nb - c);
    const __m512 xd = _mm512_maskz_loadu_ps(n >= 16 ? 0xffff : (1u << n) - 1, x.d + c);
    const __m512 xs = _mm512_maskz_loadu_ps(n >= 16 ? 0xffff : (1u << n) - 1, x.s + c);
    _mm512_store_ps(dx, _mm512_mul_ps(load_fp16(ds + 2 * c, n), xd));
    macc = _mm512_fmadd_ps(load_fp16(ms + 2 * c, n), xs, macc);
    int64_t i = 0;
    for (; i + 1 < n; i += 2) {  // two blocks: 32 bytes of nibbles
      const int64_t b = c + i;
      const __m512i v = _mm512_cvtepu8_epi16(
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs + b * 16)));
      const int16_t* a = x.q + b * QK;
      __m512i p = dot_i16(_mm512_setzero_si512(), _mm512_and_si512(v, low),
                          _mm512_loadu_si512(a));
      p = dot_i16(p, _mm512_srli_epi16(v, 4), _mm512_loadu_si512(a + 32));
      // lanes 0-7 are block b's partial sums, lanes 8-15 block b + 1's
      const __m512 scale = _mm512_insertf32x8(_mm512_set1_ps(dx[i]), _mm256_set1_ps(dx[i + 1]), 1);
      acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), scale, acc);
    }
    if (i < n) {  // a last odd block, stored in plain order
      const int64_t b = c + i;
      const __m256i v = _mm256_cvtepu8_epi16(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs + b * 16)));
      const int16_t* a = x.q + b * QK;
      const __m256i p = _mm256_add_epi32(
          _mm256_madd_epi16(_mm256_and_si256(v, _mm256_set1_epi16(0x0f)),
                            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a))),
          _mm256_madd_epi16(_mm256_srli_epi16(v, 4),
                            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + 16))));
      acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_zextsi256_si512(p)),
                            _mm512_set1_ps(dx[i]), acc);
    }
  }
  return _mm512_reduce_add_ps(acc) + _mm512_reduce_add_ps(macc);
#else
  float total = 0.f;
  for (int64_t b = 0; b < nb; ++b) {
    const bool paired = (b | 1) < nb;
    int sum = 0;
    for (int j = 0; j < 16; ++j) {
      const uint8_t byte = qs[b * 16 + j];
      const int64_t lo = paired ? (b & ~int64_t(1)) * QK + (b & 1) * 16 + j : b * QK + j;
      const int64_t hi = paired ? lo + 32 : lo + 16;
      sum += (byte & 0x0f) * x.q[lo] + (byte >> 4) * x.q[hi];
    }
    total += fp16_to_fp32(ds + 2 * b) * x.d[b] * sum + fp16_to_fp32(ms + 2 * b) * x.s[b];
  }
  return total;
#endif
}

// Four rows at once (AVX-512 only): the activation loads and scale math are shared and the four
// independent accumulators hide the instruction latencies.
#ifdef LW_AVX512
void dot4_q4_1(const uint8_t* row, int64_t row_bytes, QuantRow x, int64_t nb, float* out) {
  constexpr int R = 4;
  __m512 acc[R], macc[R];
  for (int r = 0; r < R; ++r) acc[r] = macc[r] = _mm512_setzero_ps();
  const __m512i low = _mm512_set1_epi16(0x0f);
  alignas(64) float dx[R][16];
  for (int64_t c = 0; c < nb; c += 16) {
    const int64_t n = std::min<int64_t>(16, nb - c);
    const __mmask16 mask = n >= 16 ? 0xffff : (1u << n) - 1;
    const __m512 xd = _mm512_maskz_loadu_ps(mask, x.d + c);
    const __m512 xs = _mm512_maskz_loadu_ps(mask, x.s + c);
    for (int r = 0; r < R; ++r) {
      const uint8_t* ds = row + r * row_bytes + nb * 16;
      _mm512_store_ps(dx[r], _mm512_mul_ps(load_fp16(ds + 2 * c, n), xd));
      macc[r] = _mm512_fmadd_ps(load_fp16(ds + nb * 2 + 2 * c, n), xs, macc[r]);
    }
    int64_t i = 0;
    for (; i + 1 < n; i += 2) {
      const int64_t b = c + i;
      const int16_t* a = x.q + b * QK;
      const __m512i alo = _mm512_loadu_si512(a), ahi = _mm512_loadu_si512(a + 32);
      for (int r = 0; r < R; ++r) {
        const __m512i v = _mm512_cvtepu8_epi16(
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + r * row_bytes + b * 16)));
        __m512i p = dot_i16(_mm512_setzero_si512(), _mm512_and_si512(v, low), alo);
        p = dot_i16(p, _mm512_srli_epi16(v, 4), ahi);
        const __m512 scale =
            _mm512_insertf32x8(_mm512_set1_ps(dx[r][i]), _mm256_set1_ps(dx[r][i + 1]), 1);
        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), scale, acc[r]);
      }
    }
    if (i < n) {  // a last odd block: the single-row code handles it below
      for (int r = 0; r < R; ++r) dx[r][i] = 0.f;
    }
  }
  for (int r = 0; r < R; ++r) {
    out[r] = _mm512_reduce_add_ps(acc[r]) + _mm512_reduce_add_ps(macc[r]);
  }
  if (nb % 2) {  // the odd last block, per row (its mins are already counted)
    const int64_t b = nb - 1;
    const int16_t* a = x.q + b * QK;
    for (int r = 0; r < R; ++r) {
      const uint8_t* rr = row + r * row_bytes;
      int sum = 0;
      for (int j = 0; j < 16; ++j) {
        const uint8_t byte = rr[b * 16 + j];
        sum += (byte & 0x0f) * a[j] + (byte >> 4) * a[j + 16];
      }
      out[r] += fp16_to_fp32(rr + nb * 16 + 2 * b) * x.d[b] * sum;
    }
  }
}
#endif

float dot_q8_0(const uint8_t* row, QuantRow x, int64_t nb) {
  const uint8_t* qs = row;
  const uint8_t* ds = row + nb * 32;
#ifdef LW_AVX512
  __m512 acc = _mm512_setzero_ps();
  alignas(64) float dx[16];
  for (int64_t c = 0; c < nb; c += 16) {
    const int64_t n = std::min<int64_t>(16, nb - c);
    const __m512 xd = _mm512_maskz_loadu_ps(n >= 16 ? 0xffff : (1u << n) - 1, x.d + c);
    _mm512_store_ps(dx, _mm512_mul_ps(load_fp16(ds + 2 * c, n), xd));
    int64_t i = 0;
    for (; i + 1 < n; i += 2) {  // two blocks, their lane sums folded into one vector
      const int64_t b = c + i;
      const __m512i w0 = _mm512_cvtepi8_epi16(
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs + b * 32)));
      const __m512i w1 = _mm512_cvtepi8_epi16(
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs + b * 32 + 32)));
      const __m512i p0 = dot_i16(_mm512_setzero_si512(), w0, _mm512_loadu_si512(x.q + b * QK));
      const __m512i p1 = dot_i16(_mm512_setzero_si512(), w1,
                                 _mm512_loadu_si512(x.q + b * QK + 32));
      // [p0 lo256 + p0 hi256 | p1 lo256 + p1 hi256]
      const __m512i lo = _mm512_shuffle_i64x2(p0, p1, 0x44), hi = _mm512_shuffle_i64x2(p0, p1, 0xee);
      const __m512 scale = _mm512_insertf32x8(_mm512_set1_ps(dx[i]), _mm256_set1_ps(dx[i + 1]), 1);
      acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(lo, hi)), scale, acc);
    }
    if (i < n) {
      const int64_t b = c + i;
      const __m512i w = _mm512_cvtepi8_epi16(
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs + b * 32)));
      const __m512i p = dot_i16(_mm512_setzero_si512(), w, _mm512_loadu_si512(x.q + b * QK));
      acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), _mm512_set1_ps(dx[i]), acc);
    }
  }
  return _mm512_reduce_add_ps(acc);
#else
  float total = 0.f;
  for (int64_t b = 0; b < nb; ++b) {
    const int8_t* w = reinterpret_cast<const int8_t*>(qs + b * 32);
    int sum = 0;
    for (int j = 0; j < QK; ++j) sum += w[j] * x.q[b * QK + j];
    total += fp16_to_fp32(ds + 2 * b) * x.d[b] * sum;
  }
  return total;
#endif
}


}  // namespace
