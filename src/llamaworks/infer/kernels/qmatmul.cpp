// Fused dequantize + matrix-vector ops for llama.cpp's Q4_1 and Q8_0 weight blocks (the block
// format and the dot products are in blocks.h, the threaded row loop in matvec.h).
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <ATen/ATen.h>

#include <string>
#include <tuple>
#include <vector>

#include "matvec.h"

namespace {

int64_t row_bytes(int64_t kind, int64_t k) {
  TORCH_CHECK(is_block_kind(kind), "unknown weight kind ", kind);
  return block_row_bytes(kind, k);
}

// x [..., K] @ W.T for block rows W [N, bytes] of `kind` (Q4_1, Q8_0 or a GGML kind).
at::Tensor qlinear(const at::Tensor& x, const at::Tensor& w, int64_t kind) {
  TORCH_CHECK(w.dtype() == at::kByte && w.dim() == 2 && w.is_contiguous(),
              "weight blocks must be a contiguous uint8 [out, blocks * bytes] tensor");
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "qlinear runs on CPU tensors");
  const int64_t k = x.size(-1), n = w.size(0);
  TORCH_CHECK(w.size(1) == row_bytes(kind, k),
              "input size ", k, " does not match weight blocks of ", w.size(1), " bytes");
  const at::Tensor x2 = x.reshape({-1, k}).to(at::kFloat).contiguous();
  const std::vector<Mat> mats = {{w.data_ptr<uint8_t>(), n, w.size(1), kind}};
  Input in;
  in.x = x2.data_ptr<float>(), in.B = x2.size(0), in.K = k;
  prepare(in, mats);
  at::Tensor y = at::empty({in.B, n}, x2.options());
  float* yp = y.data_ptr<float>();
  const int64_t threads = std::max(1, at::get_num_threads());
  at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      matvec_rows(in, mats, yp, n, static_cast<int>(t), static_cast<int>(threads));
    }
  });
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = n;
  return y.view(shape).to(x.scalar_type());
}

at::Tensor q4_1_linear(const at::Tensor& x, const at::Tensor& w) { return qlinear(x, w, KQ4_1); }

at::Tensor q8_0_linear(const at::Tensor& x, const at::Tensor& w) { return qlinear(x, w, KQ8_0); }

// x @ W.T for W in a GGUF type's own blocks (kind = 100 + GGML type id; ggml_types.h).
at::Tensor gguf_linear(const at::Tensor& x, const at::Tensor& w, int64_t kind) {
  TORCH_CHECK(is_ggml_kind(kind), "unknown GGUF weight kind ", kind);
  return qlinear(x, w, kind);
}

static void check_block_rows(const at::Tensor& w, int64_t kind, int64_t k) {
  TORCH_CHECK(w.dtype() == at::kByte && w.dim() == 2 && w.is_contiguous() && w.device().is_cpu(),
              "weight blocks must be a contiguous uint8 [out, bytes] CPU tensor");
  TORCH_CHECK(is_ggml_kind(kind), "unknown GGUF weight kind ", kind);
  TORCH_CHECK(w.size(1) == row_bytes(kind, k), "input size ", k, " does not match rows of ",
              w.size(1), " bytes");
}

// The float32 weights [N, k] of GGUF block rows W (kind as above), rows split across threads.
at::Tensor dequant_rows(const at::Tensor& w, int64_t kind, int64_t k) {
  check_block_rows(w, kind, k);
  at::Tensor out = at::empty({w.size(0), k}, at::kFloat);
  const uint8_t* wp = w.data_ptr<uint8_t>();
  float* op = out.data_ptr<float>();
  const int64_t rb = w.size(1);
  at::parallel_for(0, w.size(0), 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) ggml_dequant_row(kind - GGML_KIND, wp + r * rb, k, op + r * k);
  });
  return out;
}

// The same weights rounded to bfloat16 as at::Tensor::to rounds (to nearest even; a NaN becomes
// c10's quiet NaN 0x7fc0): the prompt GEMMs' bf16 tiles without a float32 tile written and
// read again.
at::Tensor dequant_rows_bf16(const at::Tensor& w, int64_t kind, int64_t k) {
  check_block_rows(w, kind, k);
  at::Tensor out = at::empty({w.size(0), k}, at::kBFloat16);
  const uint8_t* wp = w.data_ptr<uint8_t>();
  uint16_t* op = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  const int64_t rb = w.size(1);
  at::parallel_for(0, w.size(0), 16, [&](int64_t r0, int64_t r1) {
    std::vector<float> row(k);
    for (int64_t r = r0; r < r1; ++r) {
      ggml_dequant_row(kind - GGML_KIND, wp + r * rb, k, row.data());
      const uint32_t* bits = reinterpret_cast<const uint32_t*>(row.data());
      uint16_t* o = op + r * k;
      for (int64_t i = 0; i < k; ++i) {
        const uint32_t b = bits[i];
        o[i] = (b & 0x7fffffffu) > 0x7f800000u
                   ? static_cast<uint16_t>(0x7fc0u)
                   : static_cast<uint16_t>((b + 0x7fffu + ((b >> 16) & 1u)) >> 16);
      }
    }
  });
  return out;
}

// Exact float32 dot products of x [R, K] with the selected weight rows idx [R, k] (dequantized
// in float32, no activation rounding): the output head's re-check of its top logits.
at::Tensor rows_dot(const at::Tensor& x, const at::Tensor& w, const at::Tensor& idx, int64_t bits) {
  TORCH_CHECK(bits == 4 || bits == 8, "bits must be 4 (Q4_1) or 8 (Q8_0)");
  const int64_t k = x.size(-1), nb = k / QK, bytes = bits == 4 ? Q4_1_BYTES : Q8_0_BYTES;
  TORCH_CHECK(k % QK == 0 && w.dim() == 2 && w.size(1) == nb * bytes && w.is_contiguous(),
              "input size ", k, " does not match the weight rows");
  const at::Tensor x2 = x.reshape({-1, k}).to(at::kFloat).contiguous();
  const at::Tensor i2 = idx.reshape({x2.size(0), -1}).to(at::kLong).contiguous();
  at::Tensor out = at::empty(i2.sizes(), x2.options());
  const float* xp = x2.data_ptr<float>();
  const int64_t* ip = i2.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const int64_t per = i2.size(1), n = w.size(0);
  for (int64_t r = 0; r < x2.size(0); ++r) {
    for (int64_t j = 0; j < per; ++j) {
      const int64_t row = ip[r * per + j];
      TORCH_CHECK(row >= 0 && row < n, "row index ", row, " out of range");
      const uint8_t* wr = wp + row * w.size(1);
      const float* xr = xp + r * k;
      float total = 0.f;
      for (int64_t b = 0; b < nb; ++b) {
        float dot = 0.f, sum = 0.f;
        if (bits == 4) {
          for (int t = 0; t < 16; ++t) {
            const uint8_t byte = wr[b * 16 + t];
            dot += (byte & 0x0f) * xr[b * QK + t] + (byte >> 4) * xr[b * QK + t + 16];
          }
          for (int t = 0; t < QK; ++t) sum += xr[b * QK + t];
          total += fp16_to_fp32(wr + nb * 16 + 2 * b) * dot + fp16_to_fp32(wr + nb * 18 + 2 * b) * sum;
        } else {
          const int8_t* q = reinterpret_cast<const int8_t*>(wr + b * QK);
          for (int t = 0; t < QK; ++t) dot += q[t] * xr[b * QK + t];
          total += fp16_to_fp32(wr + nb * QK + 2 * b) * dot;
        }
      }
      op[r * per + j] = total;
    }
  }
  std::vector<int64_t> shape(idx.sizes().begin(), idx.sizes().end());
  return out.view(shape);
}

// The int8 activation blocks the GGUF-type kernels dot against (ggml_types.h's quantize_row_q8)
// of x [R, K]: block 256 (the K-quants; K a multiple of 256) with sums per 16, or block 32
// (Q5_0 / Q5_1) with sums per 32: q int8 [R, K], d float32 [R, K / block], sums int16. For
// tests: the exact reference of what the kernels compute.
std::tuple<at::Tensor, at::Tensor, at::Tensor> q8_quantize(const at::Tensor& x, int64_t block) {
  TORCH_CHECK(block == QKK || block == QK, "q8_quantize: block must be 256 or 32");
  TORCH_CHECK(x.dim() == 2 && x.device().is_cpu() && x.size(1) % block == 0,
              "q8_quantize takes a [rows, K] CPU tensor with K a multiple of the block");
  const at::Tensor x2 = x.to(at::kFloat).contiguous();
  const int64_t R = x2.size(0), K = x2.size(1), group = block == QKK ? 16 : QK;
  at::Tensor q = at::empty({R, K}, at::kChar), d = at::empty({R, K / block}, at::kFloat);
  at::Tensor sums = at::empty({R, K / group}, at::kShort);
  for (int64_t r = 0; r < R; ++r)
    quantize_row_q8(x2.data_ptr<float>() + r * K, K, block, group, q.data_ptr<int8_t>() + r * K,
                    d.data_ptr<float>() + r * (K / block), sums.data_ptr<int16_t>() + r * (K / group));
  return {q, d, sums};
}

// Which instruction set this build targets (for logs and tests).
std::string isa() {
#if defined(LW_AVX512) && defined(__AVX512VNNI__)
  return "avx512vnni";
#elif defined(LW_AVX512)
  return "avx512";
#elif defined(LW_AVX2) && defined(__AVXVNNI__)
  return "avx2vnni";
#elif defined(LW_AVX2)
  return "avx2";
#else
  return "scalar";
#endif
}

}  // namespace

LW_LIBRARY(m) {
  m.def("q4_1_linear(Tensor x, Tensor w) -> Tensor");
  m.def("q8_0_linear(Tensor x, Tensor w) -> Tensor");
  m.def("rows_dot(Tensor x, Tensor w, Tensor idx, int bits) -> Tensor");
  m.def("gguf_linear(Tensor x, Tensor w, int kind) -> Tensor");
  m.def("dequant_rows(Tensor w, int kind, int k) -> Tensor");
  m.def("dequant_rows_bf16(Tensor w, int kind, int k) -> Tensor");
  m.def("q8_quantize(Tensor x, int block) -> (Tensor, Tensor, Tensor)");
  m.def("isa() -> str", &isa);
}

LW_IMPL(m) {
  m.impl("q4_1_linear", &q4_1_linear);
  m.impl("q8_0_linear", &q8_0_linear);
  m.impl("rows_dot", &rows_dot);
  m.impl("gguf_linear", &gguf_linear);
  m.impl("dequant_rows", &dequant_rows);
  m.impl("dequant_rows_bf16", &dequant_rows_bf16);
  m.impl("q8_quantize", &q8_quantize);
}
