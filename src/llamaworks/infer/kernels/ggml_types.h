// The other GGUF tensor types, kept in the file's own blocks: F16, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K
// (the types inside llama.cpp's Q4_K_M / Q5_K_M / Q6_K files besides Q4_0/Q4_1/Q8_0, which have
// their own integer kernels). Each row is dequantized block by block into a float32 buffer that
// stays in L1/L2, then dotted with the activation rows: written as plain loops that the compiler
// vectorizes with each tier's flags (AVX-512, AVX2, portable). Layouts and formulas are
// llama.cpp's ggml-quants.c ones (the reference is gguf-py's dequantize, which the tests use).
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

// Bytes of one row of k weights of `kind` (k a multiple of the block size).
inline int64_t ggml_row_bytes(int64_t kind, int64_t k) {
  int64_t block, bytes;
  ggml_block(kind - GGML_KIND, &block, &bytes);
  return block ? k / block * bytes : 0;
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

}  // namespace
