// The other GGUF tensor types, kept in the file's own blocks: F16, Q4_0, Q5_0, Q5_1, Q4_K, Q5_K,
// Q6_K (the types inside llama.cpp's Q4_0 / Q4_K_M / Q5_K_M / Q6_K files besides Q4_1/Q8_0, which
// have their own kernels). `ggml_dequant_row` decodes a row to float32 (prompts' GEMM tiles; F16's
// matvec dots that buffer), as plain loops the compiler vectorizes with each tier's flags.
// Q4_0, Q5_0, Q5_1, Q4_K, Q5_K and Q6_K matvecs are integer dots over the blocks as stored on int8
// activations (`ggml_int8_dot`; 256-bit code in the AVX2 and AVX-512 tiers, plain integer loops
// otherwise). Layouts and formulas are llama.cpp's ggml-quants.c ones (the
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
    case T_Q4_0:  // d (fp16), 16 bytes: weight j is the low nibble of byte j, 16 + j its high
      for (int64_t b = 0; b < k / 32; ++b, y += 32) {
        const uint8_t* p = row + b * 18;
        const float d = fp16_to_fp32(p);
        for (int j = 0; j < 16; ++j) {
          y[j] = static_cast<float>((p[2 + j] & 0x0F) - 8) * d;
          y[j + 16] = static_cast<float>((p[2 + j] >> 4) - 8) * d;
        }
      }
      return;
    case T_Q5_0:
    case T_Q5_1: {
      const bool has_min = type == T_Q5_1;
      const int64_t bytes = has_min ? 24 : 22;
      for (int64_t b = 0; b < k / 32; ++b, y += 32) {
        const uint8_t* p = row + b * bytes;
        const float d = fp16_to_fp32(p), m = has_min ? fp16_to_fp32(p + 2) : 0.f;
        uint32_t qh;
        std::memcpy(&qh, p + (has_min ? 4 : 2), 4);
        const uint8_t* qs = p + (has_min ? 8 : 6);
        const int off = has_min ? 0 : 16;
        for (int j = 0; j < 16; ++j) {
          const int x0 = (qs[j] & 0x0F) | (((qh >> j) << 4) & 0x10);
          const int x1 = (qs[j] >> 4) | ((qh >> (j + 12)) & 0x10);
          y[j] = static_cast<float>(x0 - off) * d + m;
          y[j + 16] = static_cast<float>(x1 - off) * d + m;
        }
      }
      return;
    }
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
    uint32_t sm[4];
    k4_scales_mins(p + 4, sm);
    const __m256i sm16 = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sm)));
    // the mins' part: min_j * (activation sum of sub-block j = two bsums)
    const __m256i bs = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.bsum + sb * 16));
    const __m128i bs32 = _mm_hadd_epi16(_mm256_castsi256_si128(bs), _mm256_extracti128_si256(bs, 1));
    const __m128i mins = _mm_madd_epi16(_mm256_extracti128_si256(sm16, 1), bs32);
    accm = _mm_fmadd_ps(_mm_set1_ps(fp16_to_fp32(p + 2) * dx), _mm_cvtepi32_ps(mins), accm);
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
  __m128 m = _mm_add_ps(accm, _mm_movehl_ps(accm, accm));
  m = _mm_add_ss(m, _mm_movehdup_ps(m));
  return hsum(acc) - _mm_cvtss_f32(m);
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

// Q5_0 / Q5_1 row . x (int8 blocks of 32): quants 0..31 from 16 nibble bytes and 32 high bits;
// Q5_0's weights are d (q - 16), Q5_1's d q + m, so the offset or min comes from the block's
// activation sum.
float q5_dot(bool has_min, const uint8_t* row, Q8Row x, int64_t k) {
  const int64_t bytes = has_min ? 24 : 22;
  float total = 0.f;
#ifdef LW_DOT4
  __m256 acc = _mm256_setzero_ps();
  const __m128i low = _mm_set1_epi8(0x0F);
  const __m256i spread = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                                          2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
  const __m256i bits = _mm256_set1_epi64x(static_cast<int64_t>(0x8040201008040201ULL));
  const __m256i sixteen = _mm256_set1_epi8(16), ones = _mm256_set1_epi16(1);
#endif
  for (int64_t b = 0; b < k / QK; ++b) {
    const uint8_t* p = row + b * bytes;
    const float dx = x.d[b], d = fp16_to_fp32(p) * dx;
    uint32_t qh;
    std::memcpy(&qh, p + (has_min ? 4 : 2), 4);
    const uint8_t* qs = p + (has_min ? 8 : 6);
    total += (has_min ? fp16_to_fp32(p + 2) * dx : -16.f * d) * static_cast<float>(x.bsum[b]);
    const int8_t* a = x.q + b * QK;
#ifdef LW_DOT4
    const __m128i n = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
    const __m256i nib = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(n, 4), low),
                                         _mm_and_si128(n, low));  // weights 0-15 | 16-31
    __m256i hb = _mm256_shuffle_epi8(_mm256_set1_epi32(static_cast<int>(qh)), spread);
    hb = _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(hb, bits), bits), sixteen);
    const __m256i pr = _mm256_maddubs_epi16(_mm256_or_si256(nib, hb),
                                            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a)));
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_i16(_mm256_setzero_si256(), pr, ones)),
                          _mm256_set1_ps(d), acc);
#else
    uint8_t q[QK];  // quants 0..31 in weight order
    for (int j = 0; j < 16; ++j) q[j] = qs[j] & 0x0F, q[j + 16] = qs[j] >> 4;
    for (int j = 0; j < 4; ++j) {  // the fifth bits, 8 at a time
      uint64_t lanes;
      std::memcpy(&lanes, q + 8 * j, 8);
      lanes |= SPREAD16[(qh >> (8 * j)) & 0xff];
      std::memcpy(q + 8 * j, &lanes, 8);
    }
    total += d * static_cast<float>(dot_u8_i8(q, a, QK));
#endif
  }
#ifdef LW_DOT4
  total += hsum(acc);
#endif
  return total;
}

// Q4_0 row . x (int8 blocks of 32): weight j of a block is d (q_j - 8), q from the low nibbles
// (0-15) and high nibbles (16-31) of its 16 bytes; the -8 comes from the block's activation sum,
// added to the integer dot before the one float multiply per block.
float q4_0_dot(const uint8_t* row, Q8Row x, int64_t k) {
#ifdef LW_DOT4
  __m256 acc = _mm256_setzero_ps();
  const __m128i low = _mm_set1_epi8(0x0F);
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t b = 0; b < k / QK; ++b) {
    const uint8_t* p = row + b * 18;
    const __m128i n = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 2));
    const __m256i nib = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(n, 4), low),
                                         _mm_and_si128(n, low));  // weights 0-15 | 16-31
    const __m256i pr = _mm256_maddubs_epi16(
        nib, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.q + b * QK)));
    const __m256i sumi = _mm256_add_epi32(dot_i16(_mm256_setzero_si256(), pr, ones),
                                          _mm256_setr_epi32(-8 * x.bsum[b], 0, 0, 0, 0, 0, 0, 0));
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sumi), _mm256_set1_ps(fp16_to_fp32(p) * x.d[b]),
                          acc);
  }
  return hsum(acc);
#else
  float total = 0.f;
  for (int64_t b = 0; b < k / QK; ++b) {
    const uint8_t* p = row + b * 18;
    uint8_t q[QK];
    for (int j = 0; j < 16; ++j) q[j] = p[2 + j] & 0x0F, q[j + 16] = p[2 + j] >> 4;
    total += fp16_to_fp32(p) * x.d[b] *
             static_cast<float>(dot_u8_i8(q, x.q + b * QK, QK) - 8 * x.bsum[b]);
  }
  return total;
#endif
}

float ggml_int8_dot(int64_t kind, const uint8_t* row, Q8Row x, int64_t k) {
  if (kind == GGML_KIND + T_Q4_0) return q4_0_dot(row, x, k);
  if (kind == GGML_KIND + T_Q5_0 || kind == GGML_KIND + T_Q5_1)
    return q5_dot(kind == GGML_KIND + T_Q5_1, row, x, k);
  if (kind == GGML_KIND + T_Q6_K) return q6k_dot(row, x, k);
  if (kind == GGML_KIND + T_Q5_K) return qk4_dot<true>(row, x, k);
  return qk4_dot<false>(row, x, k);
}

}  // namespace
