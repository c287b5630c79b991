// The fused decode step: all transformer layers of a Llama model for one new token per row, in
// one call, with no PyTorch op between them.
//
// Eager PyTorch spends ~20 ops per layer per token (norms, projections, rotary, cache writes,
// attention, activation, residuals), and at batch 1 their dispatch costs more than the weight
// matvecs themselves. Here one op runs, per layer: RMSNorm -> q/k/v matvecs -> rotary (HF's
// half-split pairs) -> cache write -> grouped-query attention over the masked cache slots -> o
// matvec + residual -> RMSNorm -> gate/up matvecs -> SiLU(gate) * up -> down matvec + residual,
// with the same math as model.py (float32 activations, float32 cache), all inside one OpenMP
// parallel region whose threads meet at barriers.
//
// The dense families run the same step through per-layer extras (model.py's switches): q/k/v and
// o biases (Qwen2), per-head q/k RMSNorm before rotary (Qwen3, Gemma 3), norms after attention
// and MLP (Gemma 3's sandwich), tanh-GELU (GeGLU), an attention scale, and sliding layers with
// their own rotary table and key mask. Norm weights come as the multiplier itself (Gemma's 1 + w
// is formed by the caller), so one RMSNorm serves every family.
//
// Weights may be float32 or bfloat16 [out, in] matrices, or llama.cpp Q4_1 / Q8_0 block rows
// (blocks.h); each matrix says its kind (0 f32, 1 bf16, 4 Q4_1, 8 Q8_0). Matrices that read the
// same input (q/k/v, gate/up) are split across threads as one range of rows. Batch rows each have their own rotary position,
// cache write slot and key mask, so padded batches and per-row (continuous batching) caches work.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <limits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "matvec.h"

namespace {

// out = x / rms(x) * weight, per row (model.RMSNorm in float32).
void rms_norm(const float* x, const float* w, int64_t B, int64_t D, double eps, float* out) {
  for (int64_t b = 0; b < B; ++b) {
    const float* xr = x + b * D;
    const float ss = dot_f32(xr, xr, D);
    const float r = 1.f / std::sqrt(ss / static_cast<float>(D) + static_cast<float>(eps));
    for (int64_t i = 0; i < D; ++i) out[b * D + i] = w[i] * (xr[i] * r);
  }
}

// Rotate one head in place: pairs (i, i + half), as model.apply_rope.
inline void rope(float* h, const float* cos, const float* sin, int64_t half) {
  for (int64_t i = 0; i < half; ++i) {
    const float a = h[i], b = h[i + half];
    h[i] = a * cos[i] - b * sin[i];
    h[i + half] = b * cos[i] + a * sin[i];
  }
}

Mat as_mat(const at::Tensor& w, int64_t kind, int64_t k, const char* what) {
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && w.device().is_cpu(), what,
              ": weights must be a contiguous 2-D CPU tensor");
  int64_t bytes = 0;
  switch (kind) {
    case F32:
      TORCH_CHECK(w.scalar_type() == at::kFloat, what, ": kind 0 needs float32 weights");
      bytes = k * 4;
      break;
    case BF16:
      TORCH_CHECK(w.scalar_type() == at::kBFloat16, what, ": kind 1 needs bfloat16 weights");
      bytes = k * 2;
      break;
    default:
      TORCH_CHECK(is_block_kind(kind), what, ": unknown weight kind ", kind);
      bytes = block_row_bytes(kind, k);
      TORCH_CHECK(w.scalar_type() == at::kByte && bytes > 0, what,
                  ": block kinds need uint8 rows and an input size that is a multiple of the "
                  "block");
  }
  TORCH_CHECK(w.size(1) * w.element_size() == bytes, what, ": weight rows of ",
              w.size(1) * w.element_size(), " bytes do not match an input size of ", k);
  return {static_cast<const uint8_t*>(w.data_ptr()), w.size(0), bytes, kind};
}

constexpr int64_t PER_LAYER = 17;  // weights per layer (see decode_layers)

// Optional per-layer float32 vector of `n` values (an empty tensor: absent).
const float* optional_vec(const at::Tensor& t, int64_t n, const char* what) {
  if (t.numel() == 0) return nullptr;
  TORCH_CHECK(t.numel() == n && t.scalar_type() == at::kFloat && t.is_contiguous(), what,
              ": must be a contiguous float32 vector of ", n);
  return t.data_ptr<float>();
}

inline void add_bias(float* y, const float* bias, int64_t n) {
  if (bias != nullptr)
    for (int64_t i = 0; i < n; ++i) y[i] += bias[i];
}

// x [B, D] float32: the residual stream after the embeddings. weights: per layer, in order,
// input_layernorm, q, k, v, o, post_attention_layernorm, gate, up, down, then the extras (empty
// tensors where absent): q, k, v, o biases, q_norm, k_norm [head_dim], pre_feedforward and
// post_feedforward norms (sandwich: post_attention_layernorm then norms the attention output);
// kinds: per layer the 7 matrices' kinds. k_cache/v_cache: per layer [rows, n_kv, S_l, head_dim]
// float32 (any strides on the first two dims; each layer may have its own slot count S_l: a
// sliding layer's cache may be a ring of slots), row b using cache row cache_rows[b] (empty: row
// b; several rows may share a cache row: a prompt chunk, one token per row, whose later tokens
// see the earlier ones because every row's keys are written before any row attends), written at
// write_pos [B] (local_write_pos [B] on sliding layers); rope_pos [B] rotary positions;
// mask [B, kv_len] bool: the cache slots each row attends to; sliding layers (sliding[l] != 0)
// use inv_freq_local and local_mask [B, local_kv_len] instead. attn_scale: the softmax scale (0:
// 1/sqrt(hd)); gelu: tanh-GELU instead of SiLU on the gate. Returns the residual stream after the
// last layer.
at::Tensor decode_layers(const at::Tensor& x_in, at::TensorList weights, at::IntArrayRef kinds,
                         at::TensorList k_cache, at::TensorList v_cache,
                         const at::Tensor& write_pos, const at::Tensor& local_write_pos,
                         const at::Tensor& rope_pos, const at::Tensor& inv_freq,
                         const at::Tensor& mask, int64_t n_heads, double eps,
                         const at::Tensor& inv_freq_local, const at::Tensor& local_mask,
                         at::IntArrayRef sliding, double attn_scale, int64_t gelu,
                         const at::Tensor& cache_rows) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == at::kFloat && x_in.device().is_cpu(),
              "x must be a float32 [batch, dim] CPU tensor");
  const int64_t B = x_in.size(0), D = x_in.size(1);
  const int64_t L = static_cast<int64_t>(weights.size()) / PER_LAYER;
  TORCH_CHECK(L >= 1 && static_cast<int64_t>(weights.size()) == PER_LAYER * L &&
                  static_cast<int64_t>(kinds.size()) == 7 * L &&
                  static_cast<int64_t>(sliding.size()) == L,
              "need 17 weight tensors, 7 kinds and a sliding flag per layer");
  TORCH_CHECK(static_cast<int64_t>(k_cache.size()) == L &&
                  static_cast<int64_t>(v_cache.size()) == L,
              "need one key and one value cache per layer");
  const at::Tensor cr = cache_rows.numel() ? cache_rows.to(at::kLong).contiguous()
                                           : at::arange(B, at::kLong);
  TORCH_CHECK(cr.numel() == B, "cache_rows needs one entry per row (or none)");
  const int64_t* crow = cr.data_ptr<int64_t>();
  const int64_t n_kv = k_cache[0].size(1), hd = k_cache[0].size(3);
  TORCH_CHECK(n_heads % n_kv == 0 && hd % 2 == 0, "n_heads must be a multiple of n_kv");
  TORCH_CHECK(mask.dim() == 2 && mask.size(0) == B && mask.scalar_type() == at::kBool &&
                  local_mask.dim() == 2 && local_mask.size(0) == B &&
                  local_mask.scalar_type() == at::kBool,
              "mask and local_mask must be bool [batch, kv_len]");
  TORCH_CHECK(inv_freq.numel() == hd / 2 && inv_freq.scalar_type() == at::kFloat &&
                  inv_freq_local.numel() == hd / 2 &&
                  inv_freq_local.scalar_type() == at::kFloat,
              "inv_freq and inv_freq_local must be float32 [head_dim / 2]");
  const at::Tensor wp = write_pos.to(at::kLong).contiguous(), rp = rope_pos.to(at::kLong).contiguous();
  const at::Tensor lwp = local_write_pos.to(at::kLong).contiguous();
  TORCH_CHECK(wp.numel() == B && rp.numel() == B && lwp.numel() == B,
              "write_pos, local_write_pos and rope_pos need one entry per row");
  const int64_t* wposv[2] = {wp.data_ptr<int64_t>(), lwp.data_ptr<int64_t>()};
  const int64_t kv_lens[2] = {mask.size(1), local_mask.size(1)};
  for (int64_t l = 0; l < L; ++l) {
    const at::Tensor &kc = k_cache[l], &vc = v_cache[l];
    const int kind = sliding[l] != 0;
    TORCH_CHECK(kc.dim() == 4 && kc.sizes() == vc.sizes() && kc.scalar_type() == at::kFloat &&
                    vc.scalar_type() == at::kFloat && kc.size(1) == n_kv && kc.size(3) == hd,
                "caches must be float32 [rows, n_kv, slots, head_dim], alike in every layer");
    TORCH_CHECK(kc.stride(3) == 1 && kc.stride(2) == hd && vc.stride(3) == 1 &&
                    vc.stride(2) == hd,
                "each cache head must be a contiguous [slots, head_dim] block");
    TORCH_CHECK(kv_lens[kind] <= kc.size(2), "mask longer than layer ", l, "'s cache");
    for (int64_t b = 0; b < B; ++b) {
      TORCH_CHECK(crow[b] >= 0 && crow[b] < kc.size(0), "cache row ", crow[b], " out of range");
      TORCH_CHECK(wposv[kind][b] >= 0 && wposv[kind][b] < kc.size(2), "cache write position ",
                  wposv[kind][b], " out of range in layer ", l);
    }
  }
  const int64_t half = hd / 2, group = n_heads / n_kv;
  const int64_t nq = n_heads * hd, nk = n_kv * hd;
  const at::Tensor mk = mask.contiguous(), fr = inv_freq.contiguous();

  // cos/sin of every row's position, shared by all layers of a kind (float32, as
  // model.rope_cos_sin): [0] global layers, [1] sliding layers
  const at::Tensor frl = inv_freq_local.contiguous(), lmk = local_mask.contiguous();
  const int64_t kv_most = std::max(kv_lens[0], kv_lens[1]);
  std::vector<float> cosv[2] = {std::vector<float>(B * half), std::vector<float>(B * half)};
  std::vector<float> sinv[2] = {std::vector<float>(B * half), std::vector<float>(B * half)};
  for (int k = 0; k < 2; ++k) {
    const float* freqs = (k == 0 ? fr : frl).data_ptr<float>();
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t i = 0; i < half; ++i) {
        const float f = static_cast<float>(rp.data_ptr<int64_t>()[b]) * freqs[i];
        cosv[k][b * half + i] = std::cos(f);
        sinv[k][b * half + i] = std::sin(f);
      }
    }
  }

  at::Tensor x = x_in.contiguous().clone();
  float* xp = x.data_ptr<float>();
  const int64_t H = weights[6].size(0);  // hidden size of the MLP (gate rows)
  std::vector<float> h(B * std::max(D, nq)), qkv(B * (nq + 2 * nk)), att(B * nq), out(B * D);
  std::vector<float> gu(B * 2 * H), act(B * H), scores(B * n_heads * kv_most);
  const bool* masks[2] = {mk.data_ptr<bool>(), lmk.data_ptr<bool>()};
  const float scale = attn_scale > 0 ? static_cast<float>(attn_scale)
                                     : 1.f / std::sqrt(static_cast<float>(hd));
  Input in;

  struct LayerMats {
    std::vector<Mat> qkv, o, gu, d;
    const float *norm1, *norm2;
    const float *bq, *bk, *bv, *bo, *qn, *kn, *pre_ffn, *post_ffn;  // nullptr: absent
    int kind;  // 0 global, 1 sliding
    float *kc, *vc;  // this layer's cache, its row and head strides, its write slots
    int64_t kb, kh, vb, vh;
    const int64_t* wpos;
  };
  std::vector<LayerMats> layers(L);  // checked here: nothing below may throw
  for (int64_t l = 0; l < L; ++l) {
    const at::Tensor* w = weights.data() + PER_LAYER * l;
    const int64_t* kd = kinds.data() + 7 * l;
    TORCH_CHECK(w[0].numel() == D && w[5].numel() == D && w[0].scalar_type() == at::kFloat &&
                    w[5].scalar_type() == at::kFloat && w[0].is_contiguous() && w[5].is_contiguous(),
                "norm weights must be contiguous float32 [dim]");
    LayerMats& lm = layers[l];
    lm.qkv = {as_mat(w[1], kd[0], D, "q_proj"), as_mat(w[2], kd[1], D, "k_proj"),
              as_mat(w[3], kd[2], D, "v_proj")};
    TORCH_CHECK(lm.qkv[0].rows == nq && lm.qkv[1].rows == nk && lm.qkv[2].rows == nk,
                "q/k/v sizes do not match the heads");
    lm.o = {as_mat(w[4], kd[3], nq, "o_proj")};
    lm.gu = {as_mat(w[6], kd[4], D, "gate_proj"), as_mat(w[7], kd[5], D, "up_proj")};
    lm.d = {as_mat(w[8], kd[6], H, "down_proj")};
    TORCH_CHECK(lm.o[0].rows == D && lm.gu[0].rows == H && lm.gu[1].rows == H && lm.d[0].rows == D,
                "projection sizes do not match the model's dims");
    lm.norm1 = w[0].data_ptr<float>();
    lm.norm2 = w[5].data_ptr<float>();
    lm.bq = optional_vec(w[9], nq, "q bias");
    lm.bk = optional_vec(w[10], nk, "k bias");
    lm.bv = optional_vec(w[11], nk, "v bias");
    lm.bo = optional_vec(w[12], D, "o bias");
    lm.qn = optional_vec(w[13], hd, "q_norm");
    lm.kn = optional_vec(w[14], hd, "k_norm");
    TORCH_CHECK((lm.qn == nullptr) == (lm.kn == nullptr), "q_norm and k_norm come together");
    lm.pre_ffn = optional_vec(w[15], D, "pre_feedforward_layernorm");
    lm.post_ffn = optional_vec(w[16], D, "post_feedforward_layernorm");
    TORCH_CHECK((lm.pre_ffn == nullptr) == (lm.post_ffn == nullptr),
                "sandwich norms come together");
    lm.kind = sliding[l] != 0;
    lm.kc = k_cache[l].data_ptr<float>(), lm.vc = v_cache[l].data_ptr<float>();
    lm.kb = k_cache[l].stride(0), lm.kh = k_cache[l].stride(1);
    lm.vb = v_cache[l].stride(0), lm.vh = v_cache[l].stride(1);
    lm.wpos = wposv[lm.kind];
  }

  {  // every buffer the quantized inputs need, allocated here: nothing in the region may throw
    bool need4 = false, need8 = false, needp = false;
    for (const LayerMats& lm : layers)
      for (const auto* ms : {&lm.qkv, &lm.o, &lm.gu, &lm.d})
        for (const Mat& m : *ms)
          need4 |= m.kind == KQ4_1, need8 |= m.kind == KQ8_0, needp |= ggml_int_kernel(m.kind);
    const int64_t most = B * std::max({D, nq, H}), blocks = most / QK + 1;
    if (need4) in.q4.resize(most), in.d4.resize(blocks), in.s4.resize(blocks);
    if (need8) in.q8.resize(most), in.d8.resize(blocks), in.s8.resize(blocks);
    if (needp) in.qp.resize(most), in.dp.resize(blocks), in.sp.resize(blocks);
  }

  // One parallel region for the whole step: the threads stay in it and meet at barriers (the
  // serial steps are a few microseconds), instead of starting ~5 parallel regions per layer.
  const int threads = std::max(1, at::get_num_threads());
#pragma omp parallel num_threads(threads)
  {
#ifdef _OPENMP
    const int tid = omp_get_thread_num(), T = omp_get_num_threads();
#else
    const int tid = 0, T = 1;
#endif
    for (int64_t l = 0; l < L; ++l) {
      const LayerMats& lm = layers[l];
      // attention block
#pragma omp single
      {
        rms_norm(xp, lm.norm1, B, D, eps, h.data());
        in.x = h.data(), in.B = B, in.K = D;
        prepare(in, lm.qkv);
      }
      matvec_rows(in, lm.qkv, qkv.data(), nq + 2 * nk, tid, T);
#pragma omp barrier
#pragma omp single
      for (int64_t b = 0; b < B; ++b) {
        float* row = qkv.data() + b * (nq + 2 * nk);
        add_bias(row, lm.bq, nq);
        add_bias(row + nq, lm.bk, nk);
        add_bias(row + nq + nk, lm.bv, nk);
        if (lm.qn != nullptr)  // per-head norms before rotary (q heads, then k heads)
          for (int64_t hh = 0; hh < n_heads + n_kv; ++hh)
            rms_norm(row + hh * hd, hh < n_heads ? lm.qn : lm.kn, 1, hd, eps, row + hh * hd);
        for (int64_t hh = 0; hh < n_heads + n_kv; ++hh)  // q heads, then k heads
          rope(row + hh * hd, &cosv[lm.kind][b * half], &sinv[lm.kind][b * half], half);
        for (int64_t g = 0; g < n_kv; ++g) {
          const int64_t w = lm.wpos[b] * hd;
          std::memcpy(lm.kc + crow[b] * lm.kb + g * lm.kh + w, row + nq + g * hd, hd * 4);
          std::memcpy(lm.vc + crow[b] * lm.vb + g * lm.vh + w, row + nq + nk + g * hd, hd * 4);
        }
      }
      const int64_t tasks = B * n_heads, per = (tasks + T - 1) / T;
      // head-major: a thread's tasks run one head over consecutive rows, so the rows of a
      // prompt chunk (sharing a cache row) read the same keys while they are in cache
      for (int64_t t = tid * per; t < std::min(tasks, (tid + 1) * per); ++t) {
        const int64_t hh = t / B, b = t % B, g = hh / group;
        const float* q = qkv.data() + b * (nq + 2 * nk) + hh * hd;
        const float* keys = lm.kc + crow[b] * lm.kb + g * lm.kh;
        const float* vals = lm.vc + crow[b] * lm.vb + g * lm.vh;
        const int64_t kv_len = kv_lens[lm.kind];
        const bool* m = masks[lm.kind] + b * kv_len;
        float* sc = scores.data() + t * kv_most;
        float mx = -std::numeric_limits<float>::infinity();
        for (int64_t s = 0; s < kv_len; ++s) {
          if (!m[s]) continue;
          sc[s] = dot_f32(q, keys + s * hd, hd) * scale;
          mx = std::max(mx, sc[s]);
        }
        float* o = att.data() + b * nq + hh * hd;
        std::fill(o, o + hd, 0.f);
        if (mx == -std::numeric_limits<float>::infinity()) continue;  // no visible slot
        float denom = 0.f;
        for (int64_t s = 0; s < kv_len; ++s) {
          if (!m[s]) continue;
          const float p = std::exp(sc[s] - mx);
          denom += p;
          for (int64_t i = 0; i < hd; ++i) o[i] += p * vals[s * hd + i];
        }
        const float inv = 1.f / denom;
        for (int64_t i = 0; i < hd; ++i) o[i] *= inv;
      }
#pragma omp barrier
#pragma omp single
      {
        in.x = att.data(), in.K = nq;
        prepare(in, lm.o);
      }
      matvec_rows(in, lm.o, out.data(), D, tid, T);
#pragma omp barrier
      // MLP block
#pragma omp single
      {
        for (int64_t b = 0; b < B; ++b) add_bias(out.data() + b * D, lm.bo, D);
        if (lm.pre_ffn != nullptr) {  // sandwich: norm the attention output, then the MLP input
          rms_norm(out.data(), lm.norm2, B, D, eps, out.data());
          for (int64_t i = 0; i < B * D; ++i) xp[i] += out[i];
          rms_norm(xp, lm.pre_ffn, B, D, eps, h.data());
        } else {
          for (int64_t i = 0; i < B * D; ++i) xp[i] += out[i];
          rms_norm(xp, lm.norm2, B, D, eps, h.data());
        }
        in.x = h.data(), in.K = D;
        prepare(in, lm.gu);
      }
      matvec_rows(in, lm.gu, gu.data(), 2 * H, tid, T);
#pragma omp barrier
#pragma omp single
      {
        for (int64_t b = 0; b < B; ++b) {
          for (int64_t j = 0; j < H; ++j) {
            const float g = gu[b * 2 * H + j], u = gu[b * 2 * H + H + j];
            if (gelu) {  // tanh approximation, as F.gelu(approximate="tanh")
              const float c = 0.7978845608028654f * (g + 0.044715f * g * g * g);
              act[b * H + j] = 0.5f * g * (1.f + std::tanh(c)) * u;
            } else {
              act[b * H + j] = g / (1.f + std::exp(-g)) * u;
            }
          }
        }
        in.x = act.data(), in.K = H;
        prepare(in, lm.d);
      }
      matvec_rows(in, lm.d, out.data(), D, tid, T);
#pragma omp barrier
#pragma omp single
      {
        if (lm.post_ffn != nullptr) rms_norm(out.data(), lm.post_ffn, B, D, eps, out.data());
        for (int64_t i = 0; i < B * D; ++i) xp[i] += out[i];
      }
    }
  }
  return x;
}

}  // namespace

LW_FRAGMENT(m) {
  m.def("decode_layers(Tensor x, Tensor[] weights, int[] kinds, Tensor(a!)[] k_cache, "
        "Tensor(b!)[] v_cache, Tensor write_pos, Tensor local_write_pos, Tensor rope_pos, "
        "Tensor inv_freq, Tensor mask, "
        "int n_heads, float eps, Tensor inv_freq_local, Tensor local_mask, int[] sliding, "
        "float attn_scale, int gelu, Tensor cache_rows) -> Tensor");
}

LW_IMPL(m) {
  m.impl("decode_layers", &decode_layers);
}
