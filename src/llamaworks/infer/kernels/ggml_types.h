// The other GGUF tensor types, kept in the file's own blocks: F16, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K
// (the types inside llama.cpp's Q4_K_M / Q5_K_M / Q6_K files besides Q4_0/Q4_1/Q8_0, which have
// their own kernels). `ggml_dequant_row` decodes a row to float32 (prompts' GEMM tiles; F16's
// matvec dots that buffer), as plain loops the compiler vectorizes with each tier's flags.
// Q5_0, Q5_1, Q4_K, Q5_K and Q6_K matvecs are integer dots over the blocks as stored
// (`ggml_int_dot`: int16 activation blocks in plain order, 256-bit code in the AVX2 and AVX-512
// tiers, scalar loops otherwise). Layouts and formulas are llama.cpp's ggml-quants.c ones (the
// reference is gguf-py's dequantize, which the tests use).
//
// A matrix of one of these types has kind GGML_KIND + its GGML type id (F16 1, Q5_0 6, Q5_1 7,
// Q4_K 12, Q5_K 13, Q6_K 14).
#pragma once

#include <cstdint>
#include <cstring>

namespace {

constexpr int64_t GGML_KIND = 100;
enum GgmlType : int64_t { T_F16 = 1, T_Q5_0 = 6, T_Q5_1 = 7, T_Q4_K = 12, T_Q5_K = 13, T_Q6_K = 14 };

// (weights per block, bytes per block) of a type, or (0, 0) if not one of ours.
inline void ggml_block(int64_t type, int64_t* block, int64_t* bytes) {
  switch (type) {
    case T_F16: *block = 1, *bytes = 2; return;
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

// -- integer dot products over the blocks as stored (int16 activation blocks, plain order) -----
// Q4_K: each 32-weight sub-block is unsigned 4-bit quants with a float scale d * sc and min
// dmin * m, so its dot with an activation block is d*sc * dx * sum(q * xq) - dmin*m * sum(x):
// one exact integer dot per sub-block, as the Q4_1 kernel does. Q5_K adds a fifth bit.
// Q6_K: 16-weight sub-blocks of signed 6-bit quants (q - 32) with int8 scales: two integer dots
// per activation block.
// Q5_0 / Q5_1: 32-weight blocks of 5-bit quants (q - 16 with scale d; q * d + m): one integer dot
// per block, the min's part from the block's exact activation sum.
inline bool ggml_int_kernel(int64_t kind) {
  const int64_t t = kind - GGML_KIND;
  return t == T_Q4_K || t == T_Q5_K || t == T_Q6_K || t == T_Q5_0 || t == T_Q5_1;
}

#ifdef LW_DOT4
// Integer dots of byte weights (|q| < 128, sign-extended to int16) with int16 activations a, as
// 8 int32 lanes: 32 weights, or 16 (one 128-bit half).
inline __m256i dot_bytes32(__m256i q, const int16_t* a) {
  const __m256i* av = reinterpret_cast<const __m256i*>(a);
  const __m256i p = dot_i16(_mm256_setzero_si256(),
                            _mm256_cvtepi8_epi16(_mm256_castsi256_si128(q)), _mm256_loadu_si256(av));
  return dot_i16(p, _mm256_cvtepi8_epi16(_mm256_extracti128_si256(q, 1)),
                 _mm256_loadu_si256(av + 1));
}

inline __m256i dot_bytes16(__m128i q, const int16_t* a) {
  return dot_i16(_mm256_setzero_si256(), _mm256_cvtepi8_epi16(q),
                 _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a)));
}
#endif

float q6_k_dot(const uint8_t* row, QuantRow x, int64_t k) {
  float total = 0.f;
#ifdef LW_DOT4
  __m256 acc = _mm256_setzero_ps();
  const __m256i low = _mm256_set1_epi8(0x0F), three = _mm256_set1_epi8(3);
  const __m256i off = _mm256_set1_epi8(32);
#endif
  for (int64_t sb = 0; sb < k / 256; ++sb) {
    const uint8_t* p = row + sb * 210;
    const uint8_t* ql = p;
    const uint8_t* qh = p + 128;
    const int8_t* sc = reinterpret_cast<const int8_t*>(p + 192);
    const float d = fp16_to_fp32(p + 208);
    for (int n = 0; n < 2; ++n, ql += 64, qh += 32, sc += 8) {
      const int64_t y0 = sb * 256 + n * 128;  // first weight of this half
#ifdef LW_DOT4
      const __m256i a0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ql));
      const __m256i a1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ql + 32));
      const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qh));
      __m256i q[4];  // weights y0 + 32 g + l, l = 0..31, as bytes q - 32
      q[0] = _mm256_or_si256(_mm256_and_si256(a0, low),
                             _mm256_slli_epi16(_mm256_and_si256(h, three), 4));
      q[1] = _mm256_or_si256(_mm256_and_si256(a1, low),
                             _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(h, 2), three), 4));
      q[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(a0, 4), low),
                             _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(h, 4), three), 4));
      q[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(a1, 4), low),
                             _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(h, 6), three), 4));
      for (int g = 0; g < 4; ++g) {
        const __m256i qs = _mm256_sub_epi8(q[g], off);
        const int64_t b = (y0 + 32 * g) / QK;  // its activation block
        const int16_t* a = x.q + b * QK;
        const __m256i p0 = dot_bytes16(_mm256_castsi256_si128(qs), a);  // two sub-blocks of 16
        const __m256i p1 = dot_bytes16(_mm256_extracti128_si256(qs, 1), a + 16);
        const float dx = d * x.d[b];
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p0), _mm256_set1_ps(dx * sc[2 * g]), acc);
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p1), _mm256_set1_ps(dx * sc[2 * g + 1]), acc);
      }
#else
      for (int g = 0; g < 4; ++g) {
        const int64_t b = (y0 + 32 * g) / QK;
        const int16_t* a = x.q + b * QK;
        int s0 = 0, s1 = 0;
        for (int l = 0; l < 32; ++l) {
          const uint8_t lo = g & 1 ? ql[l + 32] : ql[l];
          const int q4 = g < 2 ? lo & 0xF : lo >> 4;
          const int q6 = (q4 | (((qh[l] >> (2 * g)) & 3) << 4)) - 32;
          (l < 16 ? s0 : s1) += q6 * a[l];
        }
        total += d * x.d[b] * (static_cast<float>(sc[2 * g]) * s0 +
                               static_cast<float>(sc[2 * g + 1]) * s1);
      }
#endif
    }
  }
#ifdef LW_DOT4
  total += hsum(acc);
#endif
  return total;
}

float q5_dot(bool has_min, const uint8_t* row, QuantRow x, int64_t k) {
  const int64_t bytes = has_min ? 24 : 22;
  float total = 0.f;
#ifdef LW_DOT4
  __m256 acc = _mm256_setzero_ps();
  const __m128i low = _mm_set1_epi8(0x0F);
  const __m256i spread = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                                          2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
  const __m256i bits = _mm256_set1_epi64x(static_cast<int64_t>(0x8040201008040201ULL));
  const __m256i sixteen = _mm256_set1_epi8(16);
#endif
  for (int64_t b = 0; b < k / 32; ++b) {
    const uint8_t* p = row + b * bytes;
    const float d = fp16_to_fp32(p);
    uint32_t qh;
    std::memcpy(&qh, p + (has_min ? 4 : 2), 4);
    const uint8_t* qs = p + (has_min ? 8 : 6);
    if (has_min) total += fp16_to_fp32(p + 2) * x.s[b];
    const int16_t* a = x.q + b * QK;
#ifdef LW_DOT4
    const __m128i n = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
    const __m256i nib = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(n, 4), low),
                                         _mm_and_si128(n, low));  // weights 0-15 | 16-31
    __m256i hb = _mm256_shuffle_epi8(_mm256_set1_epi32(static_cast<int>(qh)), spread);
    hb = _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(hb, bits), bits), sixteen);
    __m256i q = _mm256_or_si256(nib, hb);  // 0..31
    if (!has_min) q = _mm256_sub_epi8(q, sixteen);  // -16..15
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_bytes32(q, a)), _mm256_set1_ps(d * x.d[b]), acc);
#else
    const int off = has_min ? 0 : 16;
    int sum = 0;
    for (int j = 0; j < 16; ++j) {
      const int x0 = (qs[j] & 0x0F) | (((qh >> j) << 4) & 0x10);
      const int x1 = (qs[j] >> 4) | ((qh >> (j + 12)) & 0x10);
      sum += (x0 - off) * a[j] + (x1 - off) * a[j + 16];
    }
    total += d * x.d[b] * static_cast<float>(sum);
#endif
  }
#ifdef LW_DOT4
  total += hsum(acc);
#endif
  return total;
}

float ggml_int_dot(int64_t kind, const uint8_t* row, QuantRow x, int64_t k) {
  if (kind == GGML_KIND + T_Q6_K) return q6_k_dot(row, x, k);
  if (kind == GGML_KIND + T_Q5_0 || kind == GGML_KIND + T_Q5_1)
    return q5_dot(kind == GGML_KIND + T_Q5_1, row, x, k);
  const bool five = kind == GGML_KIND + T_Q5_K;
  const int64_t bytes = five ? 176 : 144;
  float total = 0.f;
#ifdef LW_DOT4
  __m256 acc = _mm256_setzero_ps();
  const __m256i low = _mm256_set1_epi8(0x0F);
#endif
  for (int64_t sb = 0; sb < k / 256; ++sb) {
    const uint8_t* p = row + sb * bytes;
    const float d = fp16_to_fp32(p), dmin = fp16_to_fp32(p + 2);
    const uint8_t* scales = p + 4;
    const uint8_t* qh = p + 16;
    const uint8_t* ql = p + (five ? 48 : 16);
    for (int j = 0; j < 4; ++j, ql += 32) {  // sub-blocks 2j (low nibbles) and 2j + 1 (high)
      const int64_t b = sb * 8 + 2 * j;        // the activation block of sub-block 2j
      uint8_t sc0, m0, sc1, m1;
      scale_min_k4(2 * j, scales, &sc0, &m0);
      scale_min_k4(2 * j + 1, scales, &sc1, &m1);
      const int16_t* a = x.q + b * QK;
      total -= dmin * m0 * x.s[b] + dmin * m1 * x.s[b + 1];
#ifdef LW_DOT4
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ql));
      __m256i lo = _mm256_and_si256(v, low), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
      if (five) {  // bit 2j of qh[l] -> +16 on sub-block 2j, bit 2j + 1 -> on 2j + 1
        const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qh));
        const __m256i b0 = _mm256_set1_epi8(static_cast<char>(1 << (2 * j)));
        const __m256i b1 = _mm256_set1_epi8(static_cast<char>(1 << (2 * j + 1)));
        const __m256i sixteen = _mm256_set1_epi8(16);
        lo = _mm256_or_si256(lo, _mm256_and_si256(
            _mm256_cmpeq_epi8(_mm256_and_si256(h, b0), b0), sixteen));
        hi = _mm256_or_si256(hi, _mm256_and_si256(
            _mm256_cmpeq_epi8(_mm256_and_si256(h, b1), b1), sixteen));
      }
      // quants 0..31: the same as signed bytes
      const __m256i p0 = dot_bytes32(lo, a), p1 = dot_bytes32(hi, a + 32);
      acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p0), _mm256_set1_ps(d * sc0 * x.d[b]), acc);
      acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p1), _mm256_set1_ps(d * sc1 * x.d[b + 1]), acc);
#else
      int s0 = 0, s1 = 0;
      for (int l = 0; l < 32; ++l) {
        const int h0 = five && (qh[l] >> (2 * j)) & 1 ? 16 : 0;
        const int h1 = five && (qh[l] >> (2 * j + 1)) & 1 ? 16 : 0;
        s0 += ((ql[l] & 0xF) + h0) * a[l];
        s1 += ((ql[l] >> 4) + h1) * a[32 + l];
      }
      total += d * sc0 * x.d[b] * s0 + d * sc1 * x.d[b + 1] * s1;
#endif
    }
  }
#ifdef LW_DOT4
  total += hsum(acc);
#endif
  return total;
}

}  // namespace
