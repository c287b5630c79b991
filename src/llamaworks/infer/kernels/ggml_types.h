// The other GGUF tensor types, kept in the file's own blocks: F16, Q4_0, Q5_0, Q5_1, Q4_K, Q5_K,
// Q6_K (the types inside llama.cpp's Q4_0 / Q4_K_M / Q5_K_M / Q6_K files besides Q4_1/Q8_0, which
// have their own kernels). `ggml_dequant_row` decodes a row to float32 (prompts' GEMM tiles; F16's
// matvec dots that buffer), as plain loops the compiler vectorizes with each tier's flags.
// Q4_0, Q5_0, Q5_1, Q4_K, Q5_K and Q6_K matvecs are integer dots over the blocks as stored on int8
// activations: the K-quants one row at a time (`ggml_int8_dot`, 256-bit code in both vector
// tiers; Q4_K/Q5_K in 512-bit steps in the AVX-512 tier, `qk4_rows`), Q4_0/Q5_0/Q5_1 by
// `dot_block32` (four blocks per 512-bit step in the AVX-512 tier, two per 256-bit step in
// AVX2); the kernels take R rows, and the matvec streams one at a time (matvec.h); plain
// integer loops in the portable tier. Layouts and formulas are llama.cpp's ggml-quants.c ones (the
// reference is gguf-py's dequantize, which the tests use).
//
// A matrix of one of these types has kind GGML_KIND + its GGML type id (F16 1, Q4_0 2, Q5_0 6,
// Q5_1 7, Q4_K 12, Q5_K 13, Q6_K 14).
#pragma once

#include <cstdint>
#include <cstring>

namespace {

constexpr int64_t GGML_KIND = 100;
enum GgmlType : int64_t {
  T_F16 = 1, T_Q4_0 = 2, T_Q5_0 = 6, T_Q5_1 = 7, T_Q4_K = 12, T_Q5_K = 13, T_Q6_K = 14
};

// (weights per block, bytes per block) of a type, or (0, 0) if not one of ours.
inline void ggml_block(int64_t type, int64_t* block, int64_t* bytes) {
  switch (type) {
    case T_F16: *block = 1, *bytes = 2; return;
    case T_Q4_0: *block = 32, *bytes = 18; return;
    case T_Q5_0: *block = 32, *bytes = 22; return;
    case T_Q5_1: *block = 32, *bytes = 24; return;
    case T_Q4_K: *block = 256, *bytes = 144; return;
    case T_Q5_K: *block = 256, *bytes = 176; return;
    case T_Q6_K: *block = 256, *bytes = 210; return;
    default: *block = 0, *bytes = 0;
  }
}

inline bool is_ggml_kind(int64_t kind) {
  int64_t block, bytes;
  ggml_block(kind - GGML_KIND, &block, &bytes);
  return kind > GGML_KIND && block > 0;
}

// Bytes of one row of k weights of `kind`, or -1 if k is not a multiple of its block size.
inline int64_t ggml_row_bytes(int64_t kind, int64_t k) {
  int64_t block, bytes;
  ggml_block(kind - GGML_KIND, &block, &bytes);
  return block && k % block == 0 ? k / block * bytes : -1;
}

// The 6-bit scale and min of sub-block j of a Q4_K / Q5_K super-block (12 packed bytes).
inline void scale_min_k4(int j, const uint8_t* q, uint8_t* d, uint8_t* m) {
  if (j < 4) {
    *d = q[j] & 63;
    *m = q[j + 4] & 63;
  } else {
    *d = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
    *m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
  }
}

// Q4_0 / Q5_0 / Q5_1 rows -> float32 (below, with their dot kernels).
template <int64_t TYPE>
void dequant_b32(const uint8_t* row, int64_t k, float* y);

// One row of k weights of GGML type `type` -> float32 y[k].
void ggml_dequant_row(int64_t type, const uint8_t* row, int64_t k, float* y) {
  switch (type) {
    case T_F16: {
      int64_t i = 0;
#if defined(LW_AVX512)
      for (; i + 16 <= k; i += 16)
        _mm512_storeu_ps(y + i, _mm512_cvtph_ps(_mm256_loadu_si256(
                                    reinterpret_cast<const __m256i*>(row + 2 * i))));
#elif defined(LW_AVX2)
      for (; i + 8 <= k; i += 8)
        _mm256_storeu_ps(y + i, _mm256_cvtph_ps(_mm_loadu_si128(
                                    reinterpret_cast<const __m128i*>(row + 2 * i))));
#endif
      for (; i < k; ++i) y[i] = fp16_to_fp32(row + 2 * i);
      return;
    }
    case T_Q4_0: return dequant_b32<T_Q4_0>(row, k, y);
    case T_Q5_0: return dequant_b32<T_Q5_0>(row, k, y);
    case T_Q5_1: return dequant_b32<T_Q5_1>(row, k, y);
    case T_Q4_K:
    case T_Q5_K: {
      const bool five = type == T_Q5_K;
      const int64_t bytes = five ? 176 : 144;
      for (int64_t b = 0; b < k / 256; ++b) {
        const uint8_t* p = row + b * bytes;
        const float d = fp16_to_fp32(p), dmin = fp16_to_fp32(p + 2);
        const uint8_t* scales = p + 4;
        const uint8_t* qh = p + 16;               // Q5_K only: 32 bytes of high bits
        const uint8_t* ql = p + (five ? 48 : 16);  // 128 bytes of low nibbles
        uint8_t u1 = 1, u2 = 2;
        for (int j = 0, is = 0; j < 256; j += 64, is += 2, ql += 32) {
          uint8_t sc, mn;
          scale_min_k4(is, scales, &sc, &mn);
          const float d1 = d * sc, m1 = dmin * mn;
          scale_min_k4(is + 1, scales, &sc, &mn);
          const float d2 = d * sc, m2 = dmin * mn;
          for (int l = 0; l < 32; ++l) {
            const int hi = five && (qh[l] & u1) ? 16 : 0;
            y[l] = d1 * static_cast<float>((ql[l] & 0xF) + hi) - m1;
          }
          for (int l = 0; l < 32; ++l) {
            const int hi = five && (qh[l] & u2) ? 16 : 0;
            y[l + 32] = d2 * static_cast<float>((ql[l] >> 4) + hi) - m2;
          }
          y += 64;
          u1 <<= 2, u2 <<= 2;
        }
      }
      return;
    }
    case T_Q6_K: {
      for (int64_t b = 0; b < k / 256; ++b) {
        const uint8_t* p = row + b * 210;
        const uint8_t* ql = p;
        const uint8_t* qh = p + 128;
        const int8_t* sc = reinterpret_cast<const int8_t*>(p + 192);
        const float d = fp16_to_fp32(p + 208);
        for (int n = 0; n < 256; n += 128, y += 128, ql += 64, qh += 32, sc += 8) {
          for (int h = 0; h < 2; ++h) {  // 16 weights of each of the four groups share a scale
            const float s1 = d * static_cast<float>(sc[h + 0]), s2 = d * static_cast<float>(sc[h + 2]);
            const float s3 = d * static_cast<float>(sc[h + 4]), s4 = d * static_cast<float>(sc[h + 6]);
            for (int l = h * 16; l < h * 16 + 16; ++l) {
              const int q1 = ((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32;
              const int q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
              const int q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
              const int q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
              y[l] = s1 * static_cast<float>(q1);
              y[l + 32] = s2 * static_cast<float>(q2);
              y[l + 64] = s3 * static_cast<float>(q3);
              y[l + 96] = s4 * static_cast<float>(q4);
            }
          }
        }
      }
      return;
    }
    default:
      for (int64_t i = 0; i < k; ++i) y[i] = 0.f;
  }
}

// -- integer dots over the blocks as stored, on int8 activations (as llama.cpp's) ------------
// A matvec input row is quantized once (shared by every weight row and thread) per block: int8
// q = round(x / dx), dx = amax / 127, plus sums of consecutive q. The K-quants take blocks of 256
// with a sum per 16 (`bsum`: llama.cpp's Q8_K); Q4_0, Q5_0, Q5_1 (rows of any multiple of 32)
// blocks of 32 with their sum (Q8_1-like).
// A K-quant super-block's dot is then integer up to one float scale: d_w * dx * (sum over
// sub-blocks of scale_j * sum(qw * q)), minus (Q4_K / Q5_K) dmin_w * dx * sum of min_j * the
// sub-block's activation sum (from bsum); Q6_K's -32 offset is folded the same way. The vector
// tiers multiply the unsigned weight bytes by the signed activation bytes (vpmaddubsw: pairs
// summed to int16, which cannot saturate: qw <= 63, |q| <= 127), then by the int16 sub-block
// scales into int32 lanes (vpmaddwd, or VNNI's vpdpwssd, which also accumulates). Activation
// rounding changes results by about 1e-2 of an element's size (llama.cpp's error, not the int16
// kernels' 1e-5); the result equals the float64 dot of the dequantized weights with the
// quantized activations to float32 rounding.
constexpr int64_t QKK = 256;

struct Q8Row {
  const int8_t* q;      // [K]
  const float* d;       // [K / block]
  const int16_t* bsum;  // [K / 16] (K-quants) or [K / 32] (Q4_0, Q5_0, Q5_1)
};

inline bool ggml_q8k_kernel(int64_t kind) {
  const int64_t t = kind - GGML_KIND;
  return t == T_Q4_K || t == T_Q5_K || t == T_Q6_K;
}

inline bool ggml_q8b_kernel(int64_t kind) {
  const int64_t t = kind - GGML_KIND;
  return t == T_Q4_0 || t == T_Q5_0 || t == T_Q5_1;
}

// One row x [k] (k a multiple of `block`) -> q, d [k / block], sums [k / group] of each `group`
// consecutive q. q = nearbyint(float32(x * (1 / dx))): half to even, as torch.round of the same
// float32 product.
void quantize_row_q8(const float* x, int64_t k, int64_t block, int64_t group, int8_t* q, float* d,
                     int16_t* sums) {
  for (int64_t b = 0; b < k / block; ++b) {
    const float* xb = x + b * block;
    int8_t* qb = q + b * block;
    float amax = 0.f;
    for (int64_t j = 0; j < block; ++j) amax = std::max(amax, std::fabs(xb[j]));
    const float scale = amax / 127.f, inv = scale > 0.f ? 1.f / scale : 0.f;
    for (int64_t j = 0; j < block; ++j) {
      const float v = std::nearbyint(xb[j] * inv);
      qb[j] = static_cast<int8_t>(std::min(127.f, std::max(-127.f, v)));
    }
    d[b] = scale;
  }
  for (int64_t g = 0; g < k / group; ++g) {
    int sum = 0;
    for (int64_t j = 0; j < group; ++j) sum += q[g * group + j];
    sums[g] = static_cast<int16_t>(sum);
  }
}

// The 8 six-bit scales (bytes 0-7 of out) and 8 mins (bytes 8-15) of a Q4_K / Q5_K super-block
// from its 12 packed bytes (scale_min_k4's unpacking, four bytes at a time).
inline void k4_scales_mins(const uint8_t* p, uint32_t out[4]) {
  uint32_t a, b, c;
  std::memcpy(&a, p, 4), std::memcpy(&b, p + 4, 4), std::memcpy(&c, p + 8, 4);
  out[0] = a & 0x3f3f3f3fu;                                        // scales 0-3
  out[1] = (c & 0x0f0f0f0fu) | ((a >> 2) & 0x30303030u);           // scales 4-7
  out[2] = b & 0x3f3f3f3fu;                                        // mins 0-3
  out[3] = ((c >> 4) & 0x0f0f0f0fu) | ((b >> 2) & 0x30303030u);    // mins 4-7
}

#ifndef LW_DOT4
// Integer dot of n unsigned weight bytes with int8 activations, for the portable tier: one
// plain loop of 16-bit products the compiler vectorizes (not inlined: inlined into the callers'
// loops, GCC 12 vectorized those instead, with 32-bit multiplies and spills, 5-10x slower).
__attribute__((noinline)) int dot_u8_i8(const uint8_t* q, const int8_t* a, int n) {
  int s = 0;
  for (int l = 0; l < n; ++l) s += static_cast<int16_t>(q[l]) * static_cast<int16_t>(a[l]);
  return s;
}

// SPREAD16[v]: byte i = 16 if bit i of v is set (Q5_0 / Q5_1's fifth bits, 8 at a time, in the
// byte order of a little-endian load).
struct Spread16 {
  uint64_t v[256];
  constexpr Spread16() : v() {
    for (int b = 0; b < 256; ++b)
      for (int i = 0; i < 8; ++i)
        if (b >> i & 1) v[b] |= uint64_t{16} << (8 * i);
  }
  uint64_t operator[](uint32_t i) const { return v[i]; }
};
constexpr Spread16 SPREAD16;
#endif

#ifdef LW_DOT4
// Byte-shuffle mask that repeats 16-bit lane i of each 128-bit half everywhere in that half.
inline __m256i rep16(int i) { return _mm256_set1_epi16(static_cast<short>((2 * i + 1) << 8 | 2 * i)); }

// The activation sums of a super-block's 8 sub-blocks of 32 (pairs of its 16 bsums), as int16.
inline __m128i sub_block_sums(const int16_t* bsum) {
  const __m256i bs = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bsum));
  return _mm_hadd_epi16(_mm256_castsi256_si128(bs), _mm256_extracti128_si256(bs, 1));
}

// A Q4_K / Q5_K super-block's 8 scales (int16 lanes 0-7) and 8 mins (8-15); adds the mins' part,
// dmin dx sum_j min_j * sums_j, to *accm (subtracted at the end).
inline __m256i k4_scales_add_mins(const uint8_t* p, __m128i sums, float dx, __m128* accm) {
  uint32_t sm[4];
  k4_scales_mins(p + 4, sm);
  const __m256i sm16 = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sm)));
  const __m128i mins = _mm_madd_epi16(_mm256_extracti128_si256(sm16, 1), sums);
  *accm = _mm_fmadd_ps(_mm_set1_ps(fp16_to_fp32(p + 2) * dx), _mm_cvtepi32_ps(mins), *accm);
  return sm16;
}

// The sum of a 128-bit float vector's lanes.
inline float hsum4(__m128 v) {
  v = _mm_add_ps(v, _mm_movehl_ps(v, v));
  return _mm_cvtss_f32(_mm_add_ss(v, _mm_movehdup_ps(v)));
}

// Bit `pos` of each byte of h as 16 or 0 (Q5_K's fifth bit).
inline __m256i bit_as_16(__m256i h, int pos) {
  const __m256i s = pos <= 4 ? _mm256_slli_epi16(h, 4 - pos) : _mm256_srli_epi16(h, pos - 4);
  return _mm256_and_si256(s, _mm256_set1_epi8(16));
}
#endif

// Q4_K (FIVE: Q5_K) row . x: sub-block 2j is the low nibbles of the 32 quant bytes j, 2j + 1 the
// high ones (Q5_K: plus 16 where bit 2j / 2j + 1 of qh[l] is set).
template <bool FIVE>
float qk4_dot(const uint8_t* row, Q8Row x, int64_t k) {
  constexpr int64_t bytes = FIVE ? 176 : 144;
#ifdef LW_DOT4
  __m256 acc = _mm256_setzero_ps();
  __m128 accm = _mm_setzero_ps();
  const __m256i low = _mm256_set1_epi8(0x0F);
  for (int64_t sb = 0; sb < k / QKK; ++sb) {
    const uint8_t* p = row + sb * bytes;
    const uint8_t* ql = p + (FIVE ? 48 : 16);
    const int8_t* a = x.q + sb * QKK;
    const float dx = x.d[sb];
    const __m256i sm16 = k4_scales_add_mins(p, sub_block_sums(x.bsum + sb * 16), dx, &accm);
    const __m256i scales = _mm256_broadcastsi128_si256(_mm256_castsi256_si128(sm16));
    __m256i h = _mm256_setzero_si256();
    if (FIVE) h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 16));
    __m256i sumi = _mm256_setzero_si256();
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ql + 32 * j));
      __m256i lo = _mm256_and_si256(v, low), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
      if (FIVE) {
        lo = _mm256_or_si256(lo, bit_as_16(h, 2 * j));
        hi = _mm256_or_si256(hi, bit_as_16(h, 2 * j + 1));
      }
      const __m256i plo = _mm256_maddubs_epi16(
          lo, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + 64 * j)));
      const __m256i phi = _mm256_maddubs_epi16(
          hi, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + 64 * j + 32)));
      sumi = dot_i16(sumi, plo, _mm256_shuffle_epi8(scales, rep16(2 * j)));
      sumi = dot_i16(sumi, phi, _mm256_shuffle_epi8(scales, rep16(2 * j + 1)));
    }
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sumi), _mm256_set1_ps(fp16_to_fp32(p) * dx), acc);
  }
  return hsum(acc) - hsum4(accm);
#else
  float total = 0.f;
  for (int64_t sb = 0; sb < k / QKK; ++sb) {
    const uint8_t* p = row + sb * bytes;
    const uint8_t* qh = p + 16;
    const uint8_t* ql = p + (FIVE ? 48 : 16);
    const int8_t* a = x.q + sb * QKK;
    const int16_t* bs = x.bsum + sb * 16;
    uint32_t sm[4];
    k4_scales_mins(p + 4, sm);
    uint8_t scm[16];
    std::memcpy(scm, sm, 16);
    uint8_t q[QKK];  // the super-block's quants in weight order, then plain integer loops
    for (int j = 0; j < 4; ++j) {
      for (int l = 0; l < 32; ++l) {
        q[64 * j + l] = static_cast<uint8_t>((ql[32 * j + l] & 0xF) +
                                             (FIVE ? ((qh[l] >> (2 * j)) & 1) << 4 : 0));
        q[64 * j + 32 + l] = static_cast<uint8_t>((ql[32 * j + l] >> 4) +
                                                  (FIVE ? ((qh[l] >> (2 * j + 1)) & 1) << 4 : 0));
      }
    }
    int sumi = 0, summ = 0;
    for (int s = 0; s < 8; ++s) {
      sumi += scm[s] * dot_u8_i8(q + 32 * s, a + 32 * s, 32);
      summ += scm[8 + s] * (bs[2 * s] + bs[2 * s + 1]);
    }
    const float dx = x.d[sb];
    total += fp16_to_fp32(p) * dx * static_cast<float>(sumi) -
             fp16_to_fp32(p + 2) * dx * static_cast<float>(summ);
  }
  return total;
#endif
}

// Q6_K row . x: each half (128 weights) is 64 bytes of low nibbles and 32 of high bit pairs;
// 16-weight sub-blocks with int8 scales; quants 0..63 (the -32 through bsum).
float q6k_dot(const uint8_t* row, Q8Row x, int64_t k) {
#ifdef LW_DOT4
  __m256 acc = _mm256_setzero_ps();
  const __m256i m4 = _mm256_set1_epi8(0x0F), m3 = _mm256_set1_epi8(0x03);
  const __m256i mc = _mm256_set1_epi8(0x0C), m30 = _mm256_set1_epi8(0x30);
  const __m256i mc0 = _mm256_set1_epi8(static_cast<char>(0xC0));
  // per group g of 32 weights: int16 scale 2g in the low 128-bit half, 2g + 1 in the high one
  const __m256i pick[4] = {_mm256_setr_m128i(_mm256_castsi256_si128(rep16(0)), _mm256_castsi256_si128(rep16(1))),
                           _mm256_setr_m128i(_mm256_castsi256_si128(rep16(2)), _mm256_castsi256_si128(rep16(3))),
                           _mm256_setr_m128i(_mm256_castsi256_si128(rep16(4)), _mm256_castsi256_si128(rep16(5))),
                           _mm256_setr_m128i(_mm256_castsi256_si128(rep16(6)), _mm256_castsi256_si128(rep16(7)))};
  for (int64_t sb = 0; sb < k / QKK; ++sb) {
    const uint8_t* p = row + sb * 210;
    const int8_t* sc = reinterpret_cast<const int8_t*>(p + 192);
    const int8_t* a = x.q + sb * QKK;
    const __m256i sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sc)));
    const __m256i bs = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.bsum + sb * 16));
    __m256i sumi = _mm256_sub_epi32(_mm256_setzero_si256(),
                                    _mm256_slli_epi32(_mm256_madd_epi16(sc16, bs), 5));
#pragma GCC unroll 2
    for (int n = 0; n < 2; ++n) {
      const __m256i s = _mm256_broadcastsi128_si256(_mm_cvtepi8_epi16(
          _mm_loadl_epi64(reinterpret_cast<const __m128i*>(sc + 8 * n))));
      const __m256i l0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 64 * n));
      const __m256i l1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 64 * n + 32));
      const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 128 + 32 * n));
      __m256i q[4];
      q[0] = _mm256_or_si256(_mm256_and_si256(l0, m4), _mm256_slli_epi16(_mm256_and_si256(h, m3), 4));
      q[1] = _mm256_or_si256(_mm256_and_si256(l1, m4), _mm256_slli_epi16(_mm256_and_si256(h, mc), 2));
      q[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), m4), _mm256_and_si256(h, m30));
      q[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), m4),
                             _mm256_srli_epi16(_mm256_and_si256(h, mc0), 2));
#pragma GCC unroll 4
      for (int g = 0; g < 4; ++g) {
        const __m256i pr = _mm256_maddubs_epi16(
            q[g], _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + 128 * n + 32 * g)));
        sumi = dot_i16(sumi, pr, _mm256_shuffle_epi8(s, pick[g]));
      }
    }
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sumi), _mm256_set1_ps(fp16_to_fp32(p + 208) * x.d[sb]),
                          acc);
  }
  return hsum(acc);
#else
  float total = 0.f;
  for (int64_t sb = 0; sb < k / QKK; ++sb) {
    const uint8_t* p = row + sb * 210;
    const int8_t* sc = reinterpret_cast<const int8_t*>(p + 192);
    const int8_t* a = x.q + sb * QKK;
    const int16_t* bs = x.bsum + sb * 16;
    uint8_t q[QKK];  // quants 0..63 in weight order
    for (int n = 0; n < 2; ++n) {
      const uint8_t* ql = p + 64 * n;
      const uint8_t* qh = p + 128 + 32 * n;
      for (int l = 0; l < 32; ++l) {
        q[128 * n + l] = static_cast<uint8_t>((ql[l] & 0xF) | ((qh[l] & 3) << 4));
        q[128 * n + 32 + l] = static_cast<uint8_t>((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4));
        q[128 * n + 64 + l] = static_cast<uint8_t>((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4));
        q[128 * n + 96 + l] = static_cast<uint8_t>((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4));
      }
    }
    int sumi = 0;
    for (int s = 0; s < 16; ++s) {
      sumi += sc[s] * (dot_u8_i8(q + 16 * s, a + 16 * s, 16) - 32 * bs[s]);
    }
    total += fp16_to_fp32(p + 208) * x.d[sb] * static_cast<float>(sumi);
  }
  return total;
#endif
}

// -- Q4_0, Q5_0, Q5_1: blocks of 32 weights on int8 activation blocks of 32 -------------------
// Weight j of a block is d (q_j - 8) (Q4_0: q 0..15), d (q_j - 16) (Q5_0) or d q_j + m (Q5_1),
// q 0..31 with bit j of the block's 32-bit qh as its fifth bit. The low nibbles of the 16 quant
// bytes are weights 0-15 and their high nibbles 16-31: the vector kernels put several blocks'
// bytes side by side and the activations in the matching order. The integer dot sum(q a) is
// scaled once per block by s = d dx, and the offset (or the min) comes through the block's
// activation sum, -8 s bsum, -16 s bsum or m dx bsum, summed apart and added at the end.
// The kernels take R rows (activations loaded once for the R rows); the matvec passes one. The
// vector tiers read the fp16 scales of 16 (AVX-512) or 8 (AVX2) blocks of a row per chunk.
template <int64_t TYPE>
struct Block32 {
  static constexpr bool FIVE = TYPE != T_Q4_0, MIN = TYPE == T_Q5_1;
  static constexpr int64_t BYTES = TYPE == T_Q4_0 ? 18 : MIN ? 24 : 22;
  static constexpr int64_t QH = MIN ? 4 : 2, QS = TYPE == T_Q4_0 ? 2 : MIN ? 8 : 6;
  static constexpr int OFFSET = TYPE == T_Q4_0 ? -8 : MIN ? 0 : -16;
};

// The fp16 fields at p, p + stride, ... of n <= N blocks as N raw halves (0 past n), by plain
// loads: a gather here was the first touch of the blocks' cache lines, and on Zen 4 it held the
// stream while they came from memory (the decode step's hottest instructions under perf).
template <int N>
inline void block_halves(const uint8_t* p, int64_t stride, int64_t n, uint16_t* h) {
  if (n == N) {
    for (int j = 0; j < N; ++j) std::memcpy(h + j, p + j * stride, 2);
    return;
  }
  for (int j = 0; j < N; ++j) {
    h[j] = 0;
    if (j < n) std::memcpy(h + j, p + j * stride, 2);
  }
}

#ifdef LW_DOT4
// acc + the sums in fours of unsigned bytes w times signed bytes a, in int32 lanes (VNNI's
// vpdpbusd where compiled for it; else pairs to int16 by vpmaddubsw, which cannot saturate here:
// q <= 31, |a| <= 127).
inline __m256i dot_u8(__m256i acc, __m256i w, __m256i a) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(acc, w, a);
#elif defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(acc, w, a);
#else
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(w, a), _mm256_set1_epi16(1)));
#endif
}

// bytes i of 32: 16 where bit i of bits is set, else 0 (byte i <- byte i / 8 of bits, then
// its bit i % 8)
inline __m256i bits_as_16(uint32_t bits) {
  const __m256i spread = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                                          2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
  const __m256i bit = _mm256_set1_epi64x(static_cast<int64_t>(0x8040201008040201ULL));
  const __m256i hb = _mm256_and_si256(_mm256_shuffle_epi8(_mm256_set1_epi32(static_cast<int>(bits)), spread), bit);
  return _mm256_and_si256(_mm256_cmpeq_epi8(hb, bit), _mm256_set1_epi8(16));
}

// One block's 32 quants in weight order, as the bytes of a 256-bit vector.
template <int64_t TYPE>
inline __m256i quants32(const uint8_t* p) {
  using T = Block32<TYPE>;
  const __m256i v =
      _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + T::QS)));
  __m256i w = _mm256_and_si256(_mm256_blend_epi32(v, _mm256_srli_epi16(v, 4), 0xF0),
                               _mm256_set1_epi8(0x0F));
  if (T::FIVE) {
    uint32_t qh;
    std::memcpy(&qh, p + T::QH, 4);
#ifdef LW_AVX512
    w = _mm256_mask_add_epi8(w, static_cast<__mmask32>(qh), w, _mm256_set1_epi8(16));
#else
    w = _mm256_or_si256(w, bits_as_16(qh));
#endif
  }
  return w;
}
#endif

#ifdef LW_AVX512

// sum of unsigned bytes wl times signed al plus wh times ah, in fours, as 16 int32 lanes (two
// vpdpbusd; without VNNI two vpmaddubsw added as int16, which cannot overflow: q <= 31, |a| <= 127)
inline __m512i dot2_u8(__m512i wl, __m512i al, __m512i wh, __m512i ah) {
#if defined(__AVX512VNNI__)
  return _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), wl, al), wh, ah);
#else
  return _mm512_madd_epi16(_mm512_add_epi16(_mm512_maddubs_epi16(wl, al), _mm512_maddubs_epi16(wh, ah)),
                           _mm512_set1_epi16(1));
#endif
}

// R rows (stride row_bytes) . x, four blocks (128 weights) per 512-bit step: the 16 quant bytes
// of blocks j = 0..3 fill quarter j, so the low nibbles are each block's weights 0-15 and the high
// ones its weights 16-31; the activations are put in that order once for the R rows (two 64-byte
// loads, two quarter shuffles), and lanes 4j..4j+3 take block j's scale.
template <int64_t TYPE, int R>
void dot_b32(const uint8_t* row, int64_t row_bytes, Q8Row x, int64_t k, float* out) {
  using T = Block32<TYPE>;
  const int64_t nb = k / QK;
  __m512 acc[R], off[R];
  __m256 acc1[R];
  for (int r = 0; r < R; ++r) acc[r] = off[r] = _mm512_setzero_ps(), acc1[r] = _mm256_setzero_ps();
  const __m512i low = _mm512_set1_epi8(0x0F), sixteen = _mm512_set1_epi8(16);
  const __m512i four = _mm512_set1_epi32(4);
  alignas(32) uint16_t h[16];
  for (int64_t c = 0; c < nb; c += 16) {
    const int64_t n = std::min<int64_t>(16, nb - c);
    const __mmask16 mask = n >= 16 ? __mmask16(0xffff) : __mmask16((1u << n) - 1);
    const __m512 xd = _mm512_maskz_loadu_ps(mask, x.d + c);
    const __m512 xs = _mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(_mm256_maskz_loadu_epi16(mask, x.bsum + c)));
    __m512 s[R];
    for (int r = 0; r < R; ++r) {
      const uint8_t* p = row + r * row_bytes + c * T::BYTES;
      block_halves<16>(p, T::BYTES, n, h);
      s[r] = _mm512_mul_ps(_mm512_cvtph_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(h))), xd);
      if (T::MIN) {
        block_halves<16>(p + 2, T::BYTES, n, h);
        const __m512 m = _mm512_cvtph_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(h)));
        off[r] = _mm512_fmadd_ps(m, _mm512_mul_ps(xd, xs), off[r]);
      } else {
        off[r] = _mm512_fmadd_ps(s[r], xs, off[r]);
      }
    }
    __m512i idx = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
    int64_t i = 0;
    for (; i + 4 <= n; i += 4, idx = _mm512_add_epi32(idx, four)) {
      const int8_t* a = x.q + (c + i) * QK;
      const __m512i a01 = _mm512_loadu_si512(a), a23 = _mm512_loadu_si512(a + 64);
      const __m512i al = _mm512_shuffle_i64x2(a01, a23, 0x88), ah = _mm512_shuffle_i64x2(a01, a23, 0xDD);
      for (int r = 0; r < R; ++r) {
        const uint8_t* p = row + r * row_bytes + (c + i) * T::BYTES;
        __m512i q = _mm512_castsi128_si512(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + T::QS)));
        q = _mm512_inserti32x4(q, _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + T::BYTES + T::QS)), 1);
        q = _mm512_inserti32x4(q, _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 2 * T::BYTES + T::QS)), 2);
        q = _mm512_inserti32x4(q, _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 3 * T::BYTES + T::QS)), 3);
        __m512i wl = _mm512_and_si512(q, low), wh = _mm512_and_si512(_mm512_srli_epi16(q, 4), low);
        if (T::FIVE) {  // bits 0-15 of block j's qh are its weights 0-15, bits 16-31 weights 16-31
          uint64_t ml = 0, mh = 0;
          for (int j = 0; j < 4; ++j) {
            uint32_t qh;
            std::memcpy(&qh, p + j * T::BYTES + T::QH, 4);
            ml |= static_cast<uint64_t>(qh & 0xFFFF) << (16 * j), mh |= static_cast<uint64_t>(qh >> 16) << (16 * j);
          }
          wl = _mm512_mask_add_epi8(wl, ml, wl, sixteen), wh = _mm512_mask_add_epi8(wh, mh, wh, sixteen);
        }
        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot2_u8(wl, al, wh, ah)), _mm512_permutexvar_ps(idx, s[r]), acc[r]);
      }
    }
    for (; i < n; ++i) {  // the last one to three blocks, one at a time
      const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.q + (c + i) * QK));
      const __m512i one = _mm512_set1_epi32(static_cast<int>(i));
      for (int r = 0; r < R; ++r) {
        const __m256i q = quants32<TYPE>(row + r * row_bytes + (c + i) * T::BYTES);
        acc1[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_u8(_mm256_setzero_si256(), q, a)),
                                  _mm512_castps512_ps256(_mm512_permutexvar_ps(one, s[r])), acc1[r]);
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    const float o = _mm512_reduce_add_ps(off[r]);
    out[r] = _mm512_reduce_add_ps(_mm512_add_ps(acc[r], _mm512_zextps256_ps512(acc1[r]))) +
             (T::MIN ? o : static_cast<float>(T::OFFSET) * o);
  }
}

#elif defined(LW_AVX2)

// as the AVX-512 dot2_u8, in 8 int32 lanes
inline __m256i dot2_u8(__m256i wl, __m256i al, __m256i wh, __m256i ah) {
#if (defined(__AVX512VNNI__) && defined(__AVX512VL__)) || defined(__AVXVNNI__)
  return dot_u8(dot_u8(_mm256_setzero_si256(), wl, al), wh, ah);
#else
  return _mm256_madd_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(wl, al), _mm256_maddubs_epi16(wh, ah)),
                           _mm256_set1_epi16(1));
#endif
}

// R rows (stride row_bytes) . x, two blocks (64 weights) per 256-bit step, in the AVX-512
// kernel's order: block j's 16 quant bytes in half j, its low nibbles weights 0-15.
template <int64_t TYPE, int R>
void dot_b32(const uint8_t* row, int64_t row_bytes, Q8Row x, int64_t k, float* out) {
  using T = Block32<TYPE>;
  const int64_t nb = k / QK;
  __m256 acc[R], off[R];
  for (int r = 0; r < R; ++r) acc[r] = off[r] = _mm256_setzero_ps();
  const __m256i low = _mm256_set1_epi8(0x0F), two = _mm256_set1_epi32(2);
  alignas(16) uint16_t h[8];
  for (int64_t c = 0; c < nb; c += 8) {
    const int64_t n = std::min<int64_t>(8, nb - c);
    const __m256 xd = load_f32x8(x.d + c, n);
    alignas(16) int16_t bs[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    std::memcpy(bs, x.bsum + c, static_cast<size_t>(n) * 2);
    const __m256 xs = _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm_load_si128(reinterpret_cast<const __m128i*>(bs))));
    __m256 s[R];
    for (int r = 0; r < R; ++r) {
      const uint8_t* p = row + r * row_bytes + c * T::BYTES;
      block_halves<8>(p, T::BYTES, n, h);
      s[r] = _mm256_mul_ps(_mm256_cvtph_ps(_mm_load_si128(reinterpret_cast<const __m128i*>(h))), xd);
      if (T::MIN) {
        block_halves<8>(p + 2, T::BYTES, n, h);
        const __m256 m = _mm256_cvtph_ps(_mm_load_si128(reinterpret_cast<const __m128i*>(h)));
        off[r] = _mm256_fmadd_ps(m, _mm256_mul_ps(xd, xs), off[r]);
      } else {
        off[r] = _mm256_fmadd_ps(s[r], xs, off[r]);
      }
    }
    __m256i idx = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
    int64_t i = 0;
    for (; i + 2 <= n; i += 2, idx = _mm256_add_epi32(idx, two)) {
      const int8_t* a = x.q + (c + i) * QK;
      const __m256i a0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a));
      const __m256i a1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + QK));
      const __m256i al = _mm256_permute2x128_si256(a0, a1, 0x20), ah = _mm256_permute2x128_si256(a0, a1, 0x31);
      for (int r = 0; r < R; ++r) {
        const uint8_t* p = row + r * row_bytes + (c + i) * T::BYTES;
        const __m256i q = _mm256_loadu2_m128i(reinterpret_cast<const __m128i*>(p + T::BYTES + T::QS),
                                              reinterpret_cast<const __m128i*>(p + T::QS));
        __m256i wl = _mm256_and_si256(q, low), wh = _mm256_and_si256(_mm256_srli_epi16(q, 4), low);
        if (T::FIVE) {
          uint32_t h0, h1;
          std::memcpy(&h0, p + T::QH, 4), std::memcpy(&h1, p + T::BYTES + T::QH, 4);
          wl = _mm256_or_si256(wl, bits_as_16((h0 & 0xFFFF) | (h1 << 16)));
          wh = _mm256_or_si256(wh, bits_as_16((h0 >> 16) | (h1 & 0xFFFF0000u)));
        }
        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot2_u8(wl, al, wh, ah)), _mm256_permutevar8x32_ps(s[r], idx), acc[r]);
      }
    }
    if (i < n) {  // a single last block
      const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.q + (c + i) * QK));
      const __m256i one = _mm256_set1_epi32(static_cast<int>(i));
      for (int r = 0; r < R; ++r) {
        const __m256i q = quants32<TYPE>(row + r * row_bytes + (c + i) * T::BYTES);
        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_u8(_mm256_setzero_si256(), q, a)),
                                 _mm256_permutevar8x32_ps(s[r], one), acc[r]);
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    const float o = hsum(off[r]);
    out[r] = hsum(acc[r]) + (T::MIN ? o : static_cast<float>(T::OFFSET) * o);
  }
}

#else
// Portable: each block's quants in weight order, then one plain integer loop.
template <int64_t TYPE, int R>
void dot_b32(const uint8_t* row, int64_t row_bytes, Q8Row x, int64_t k, float* out) {
  using T = Block32<TYPE>;
  for (int r = 0; r < R; ++r) {
    float total = 0.f;
    for (int64_t b = 0; b < k / QK; ++b) {
      const uint8_t* p = row + r * row_bytes + b * T::BYTES;
      const uint8_t* qs = p + T::QS;
      uint8_t q[QK];
      for (int j = 0; j < 16; ++j) q[j] = qs[j] & 0x0F, q[j + 16] = qs[j] >> 4;
      if (T::FIVE) {
        uint32_t qh;
        std::memcpy(&qh, p + T::QH, 4);
        for (int j = 0; j < 4; ++j) {  // the fifth bits, 8 at a time
          uint64_t lanes;
          std::memcpy(&lanes, q + 8 * j, 8);
          lanes |= SPREAD16[(qh >> (8 * j)) & 0xff];
          std::memcpy(q + 8 * j, &lanes, 8);
        }
      }
      const int sumi = dot_u8_i8(q, x.q + b * QK, QK);
      const float s = fp16_to_fp32(p) * x.d[b];
      total += T::MIN ? s * static_cast<float>(sumi) +
                            fp16_to_fp32(p + 2) * x.d[b] * static_cast<float>(x.bsum[b])
                      : s * static_cast<float>(sumi + T::OFFSET * x.bsum[b]);
    }
    out[r] = total;
  }
}
#endif

// Weight j of each block: float32 (q_j + offset) * d, or (Q5_1) q_j * d + m, each product and
// sum rounded as gguf-py's dequantize rounds them.
template <int64_t TYPE>
void dequant_b32(const uint8_t* row, int64_t k, float* y) {
  using T = Block32<TYPE>;
  for (int64_t b = 0; b < k / QK; ++b, y += QK) {
    const uint8_t* p = row + b * T::BYTES;
    const float d = fp16_to_fp32(p), m = T::MIN ? fp16_to_fp32(p + 2) : 0.f;
#ifdef LW_DOT4
    alignas(32) uint8_t q[QK];
    _mm256_store_si256(reinterpret_cast<__m256i*>(q), quants32<TYPE>(p));
    const __m256 dv = _mm256_set1_ps(d), mv = _mm256_set1_ps(m);
    const __m256i off = _mm256_set1_epi32(T::OFFSET);
    for (int j = 0; j < QK; j += 8) {
      const __m256i qi = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + j)));
      const __m256 v = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(qi, off)), dv);
      _mm256_storeu_ps(y + j, T::MIN ? _mm256_add_ps(v, mv) : v);
    }
#else
    const uint8_t* qs = p + T::QS;
    uint32_t qh = 0;
    if (T::FIVE) std::memcpy(&qh, p + T::QH, 4);
    for (int j = 0; j < 16; ++j) {
      const int x0 = (qs[j] & 0x0F) | (((qh >> j) << 4) & 0x10);
      const int x1 = (qs[j] >> 4) | ((qh >> (j + 12)) & 0x10);
      const float v0 = static_cast<float>(x0 + T::OFFSET) * d, v1 = static_cast<float>(x1 + T::OFFSET) * d;
      y[j] = T::MIN ? v0 + m : v0;
      y[j + 16] = T::MIN ? v1 + m : v1;
    }
#endif
  }
}

// R rows of a Q4_0 / Q5_0 / Q5_1 matrix (kind; stride row_bytes) . x -> out[R].
template <int R>
inline void dot_block32(int64_t kind, const uint8_t* row, int64_t row_bytes, Q8Row x, int64_t k,
                        float* out) {
  switch (kind - GGML_KIND) {
    case T_Q4_0: return dot_b32<T_Q4_0, R>(row, row_bytes, x, k, out);
    case T_Q5_0: return dot_b32<T_Q5_0, R>(row, row_bytes, x, k, out);
    default: return dot_b32<T_Q5_1, R>(row, row_bytes, x, k, out);
  }
}

// One row of a K-quant matrix (Q4_K, Q5_K, Q6_K) . x.
float ggml_int8_dot(int64_t kind, const uint8_t* row, Q8Row x, int64_t k) {
  if (kind == GGML_KIND + T_Q6_K) return q6k_dot(row, x, k);
  if (kind == GGML_KIND + T_Q5_K) return qk4_dot<true>(row, x, k);
  return qk4_dot<false>(row, x, k);
}

#ifdef LW_AVX512
// Q4_K (FIVE: Q5_K), R rows at a time in 512-bit steps: the 64 quant bytes of sub-blocks
// (0, 1, 2, 3) and then (4, 5, 6, 7) per load; low nibbles pair sub-blocks 2j and 2j + 2, high
// ones 2j + 1 and 2j + 3, and the activations are put in that order once for the R rows. Each
// lane's 6-bit scale comes from one word permute of the row's 8 scales (as int16).
template <bool FIVE, int R>
void qk4_rows(const uint8_t* row, int64_t row_bytes, Q8Row x, int64_t k, float* out) {
  constexpr int64_t bytes = FIVE ? 176 : 144;
  __m512 acc[R];
  __m128 accm[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps(), accm[r] = _mm_setzero_ps();
  const __m512i low = _mm512_set1_epi8(0x0F), sixteen = _mm512_set1_epi8(16);
  // word lanes 0-15 take scale a, 16-31 scale b: (a, b) = (0, 2), (1, 3), (4, 6), (5, 7)
  auto pick = [](int a, int b) {
    return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_set1_epi16(static_cast<short>(a))),
                              _mm256_set1_epi16(static_cast<short>(b)), 1);
  };
  const __m512i picks[4] = {pick(0, 2), pick(1, 3), pick(4, 6), pick(5, 7)};
  // Q5_K: the fifth bit of sub-block s is bit s of qh[l]
  auto bit = [](int a, int b) {
    return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_set1_epi8(static_cast<char>(1 << a))),
                              _mm256_set1_epi8(static_cast<char>(1 << b)), 1);
  };
  const __m512i bits[4] = {bit(0, 2), bit(1, 3), bit(4, 6), bit(5, 7)};
  for (int64_t sb = 0; sb < k / QKK; ++sb) {
    const int8_t* a = x.q + sb * QKK;
    const __m512i l0 = _mm512_loadu_si512(a), l1 = _mm512_loadu_si512(a + 64);
    const __m512i l2 = _mm512_loadu_si512(a + 128), l3 = _mm512_loadu_si512(a + 192);
    const __m512i act[4] = {_mm512_shuffle_i64x2(l0, l1, 0x44), _mm512_shuffle_i64x2(l0, l1, 0xEE),
                            _mm512_shuffle_i64x2(l2, l3, 0x44), _mm512_shuffle_i64x2(l2, l3, 0xEE)};
    const __m128i sums = sub_block_sums(x.bsum + sb * 16);
    const float dx = x.d[sb];
    for (int r = 0; r < R; ++r) {
      const uint8_t* p = row + r * row_bytes + sb * bytes;
      const __m512i sc = _mm512_castsi256_si512(k4_scales_add_mins(p, sums, dx, &accm[r]));
      const uint8_t* ql = p + (FIVE ? 48 : 16);
      const __m512i v0 = _mm512_loadu_si512(ql), v1 = _mm512_loadu_si512(ql + 64);
      __m512i w[4] = {_mm512_and_si512(v0, low), _mm512_and_si512(_mm512_srli_epi16(v0, 4), low),
                      _mm512_and_si512(v1, low), _mm512_and_si512(_mm512_srli_epi16(v1, 4), low)};
      __m512i h = _mm512_setzero_si512();
      if (FIVE) h = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 16)));
      __m512i sumi = _mm512_setzero_si512();
#pragma GCC unroll 4
      for (int g = 0; g < 4; ++g) {
        if (FIVE) w[g] = _mm512_mask_add_epi8(w[g], _mm512_test_epi8_mask(h, bits[g]), w[g], sixteen);
        sumi = dot_i16(sumi, _mm512_maddubs_epi16(w[g], act[g]), _mm512_permutexvar_epi16(picks[g], sc));
      }
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sumi), _mm512_set1_ps(fp16_to_fp32(p) * dx), acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) out[r] = _mm512_reduce_add_ps(acc[r]) - hsum4(accm[r]);
}
#endif

// R rows (stride row_bytes) of a K-quant matrix . x -> out[R].
template <int R>
inline void kquant_rows(int64_t kind, const uint8_t* row, int64_t row_bytes, Q8Row x, int64_t k,
                        float* out) {
#ifdef LW_AVX512
  if (kind == GGML_KIND + T_Q4_K) return qk4_rows<false, R>(row, row_bytes, x, k, out);
  if (kind == GGML_KIND + T_Q5_K) return qk4_rows<true, R>(row, row_bytes, x, k, out);
#endif
  for (int r = 0; r < R; ++r) out[r] = ggml_int8_dot(kind, row + r * row_bytes, x, k);
}

}  // namespace
