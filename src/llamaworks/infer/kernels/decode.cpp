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
// Mixture-of-experts layers (Mixtral, Qwen3-MoE) replace gate/up/down by a router matvec, the
// top-k choice (softmax or sigmoid scores, an optional choice bias, renormalized and scaled
// weights, as model.route), and only the chosen experts' gate/up/down matvecs: the token copies
// are grouped by expert, so each chosen expert's weight rows (a slice of the stacked [E, out, in]
// tensors, in any kind below) are read once for the rows that chose it.
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
constexpr int64_t PER_MOE = 5;  // router, gate, up, down experts, router choice bias

// One projection of E stacked experts: expert e's rows are one contiguous [rows, row_bytes]
// slice at data + e * stride (a view such as gate_up[:, :I] keeps that per expert).
struct ExpertMats {
  const uint8_t* data = nullptr;
  int64_t stride = 0, rows = 0, row_bytes = 0, kind = 0, n = 0;
  Mat at(int64_t e) const { return {data + e * stride, rows, row_bytes, kind}; }
};

ExpertMats as_experts(const at::Tensor& t, int64_t kind, int64_t k, const char* what) {
  TORCH_CHECK(t.dim() == 3 && t.size(0) > 0 && t.device().is_cpu(), what,
              ": experts must be a 3-D [experts, out, in] CPU tensor");
  const Mat first = as_mat(t.select(0, 0), kind, k, what);  // checks kind, dtype and row size
  ExpertMats m;
  m.data = first.data, m.rows = first.rows, m.row_bytes = first.row_bytes, m.kind = kind;
  m.stride = t.stride(0) * static_cast<int64_t>(t.element_size()), m.n = t.size(0);
  return m;
}

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

// act[j] = act_fn(gu[j]) * gu[n + j]: SiLU, or tanh-GELU as F.gelu(approximate="tanh").
inline void glu(const float* gu, int64_t n, bool gelu, float* act) {
  for (int64_t j = 0; j < n; ++j) {
    const float g = gu[j], u = gu[n + j];
    if (gelu) {
      const float c = 0.7978845608028654f * (g + 0.044715f * g * g * g);
      act[j] = 0.5f * g * (1.f + std::tanh(c)) * u;
    } else {
      act[j] = g / (1.f + std::exp(-g)) * u;
    }
  }
}

// model.route for one row of router logits [n]: scores (softmax, or each expert's sigmoid),
// the k best by score + bias (ties: the lower index), their unbiased scores as weights,
// renormalized to sum to 1 if `norm` (+1e-20 for sigmoid), times `scale`. probs: scratch [n].
inline void route(const float* logits, int64_t n, int64_t k, bool sigmoid, bool norm, float scale,
                  const float* bias, float* probs, int64_t* idx, float* w) {
  if (sigmoid) {
    for (int64_t e = 0; e < n; ++e) probs[e] = 1.f / (1.f + std::exp(-logits[e]));
  } else {
    float mx = -std::numeric_limits<float>::infinity(), sum = 0.f;
    for (int64_t e = 0; e < n; ++e) mx = std::max(mx, logits[e]);
    for (int64_t e = 0; e < n; ++e) sum += probs[e] = std::exp(logits[e] - mx);
    for (int64_t e = 0; e < n; ++e) probs[e] /= sum;
  }
  float total = 0.f;
  for (int64_t j = 0; j < k; ++j) {
    int64_t best = -1;
    float top = -std::numeric_limits<float>::infinity();
    for (int64_t e = 0; e < n; ++e) {
      bool taken = false;
      for (int64_t i = 0; i < j; ++i) taken |= idx[i] == e;
      const float c = probs[e] + (bias != nullptr ? bias[e] : 0.f);
      if (!taken && (best < 0 || c > top)) best = e, top = c;
    }
    idx[j] = best, w[j] = probs[best], total += probs[best];
  }
  const float div = norm ? total + (sigmoid ? 1e-20f : 0.f) : 1.f;
  for (int64_t j = 0; j < k; ++j) w[j] = w[j] / div * scale;
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
// 1/sqrt(hd)); gelu: tanh-GELU instead of SiLU on the gate (experts too). moe: per layer -1
// (dense) or the index m of its MoE entries: experts[5m..5m+4] = router [E, dim], gate and up
// [E, I, dim], down [E, dim, I] (each expert's slice contiguous; any weight kind), the router's
// choice bias [E] (empty: none), with expert_kinds[4m..4m+3] their kinds; such a layer's gate /
// up / down weight slots are unused. top_k, router_sigmoid, router_norm, router_scale: the
// routing (model.route). Returns the residual stream after the last layer.
at::Tensor decode_layers(const at::Tensor& x_in, at::TensorList weights, at::IntArrayRef kinds,
                         at::TensorList k_cache, at::TensorList v_cache,
                         const at::Tensor& write_pos, const at::Tensor& local_write_pos,
                         const at::Tensor& rope_pos, const at::Tensor& inv_freq,
                         const at::Tensor& mask, int64_t n_heads, double eps,
                         const at::Tensor& inv_freq_local, const at::Tensor& local_mask,
                         at::IntArrayRef sliding, double attn_scale, int64_t gelu,
                         const at::Tensor& cache_rows, at::TensorList experts,
                         at::IntArrayRef expert_kinds, at::IntArrayRef moe, int64_t top_k,
                         int64_t router_sigmoid, int64_t router_norm, double router_scale) {
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
  TORCH_CHECK(static_cast<int64_t>(moe.size()) == L, "need a MoE index per layer (-1: dense)");
  int64_t H = 0, E = 0, I = 0;  // the largest dense hidden size, expert count, expert size
  for (int64_t l = 0; l < L; ++l) {
    if (moe[l] < 0) {
      H = std::max(H, weights[PER_LAYER * l + 6].size(0));
    } else {
      TORCH_CHECK(PER_MOE * (moe[l] + 1) <= static_cast<int64_t>(experts.size()) &&
                      4 * (moe[l] + 1) <= static_cast<int64_t>(expert_kinds.size()),
                  "layer ", l, ": MoE index ", moe[l], " out of range");
      const at::Tensor* ex = experts.data() + PER_MOE * moe[l];
      E = std::max(E, ex[1].size(0)), I = std::max(I, ex[1].size(1));
    }
  }
  TORCH_CHECK(E == 0 || (top_k >= 1 && top_k <= E), "top_k must be in 1..experts");
  const int64_t BK = E ? B * top_k : 0;  // token copies, one per chosen expert
  std::vector<float> h(B * std::max(D, nq)), qkv(B * (nq + 2 * nk)), att(B * nq), out(B * D);
  std::vector<float> gu(B * 2 * H), act(B * H), scores(B * n_heads * kv_most);
  // MoE scratch: router logits, the copies' inputs / gate-up / activations / outputs in expert
  // order, each copy's row and weight, tokens per expert, the segments of one layer
  std::vector<float> logits(B * E), probs(E), xg(BK * D), gu_e(BK * 2 * I), act_e(BK * I),
      out_e(BK * D), slot_w(BK);
  std::vector<int64_t> slot_row(BK), chosen(BK), count(E), first(E);
  std::vector<float> chosen_w(BK);
  std::vector<Segment> segs_gu, segs_d;
  segs_gu.reserve(2 * E), segs_d.reserve(E);
  const bool* masks[2] = {mk.data_ptr<bool>(), lmk.data_ptr<bool>()};
  const float scale = attn_scale > 0 ? static_cast<float>(attn_scale)
                                     : 1.f / std::sqrt(static_cast<float>(hd));
  Input in;

  struct LayerMats {
    std::vector<Mat> qkv, o, gu, d;
    int64_t moe = -1;  // >= 0: a MoE layer (then gu holds the router, probe expert 0's mats)
    ExpertMats eg, eu, ed;
    std::vector<Mat> probe_gu, probe_d;  // expert 0's slices: which input forms `prepare` makes
    const float* choice_bias = nullptr;
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
    TORCH_CHECK(lm.o[0].rows == D, "o_proj size does not match the model's dims");
    lm.moe = moe[l];
    if (lm.moe >= 0) {
      const at::Tensor* ex = experts.data() + PER_MOE * lm.moe;
      const int64_t* ek = expert_kinds.data() + 4 * lm.moe;
      lm.gu = {as_mat(ex[0], ek[0], D, "router")};
      lm.eg = as_experts(ex[1], ek[1], D, "experts gate");
      lm.eu = as_experts(ex[2], ek[2], D, "experts up");
      lm.ed = as_experts(ex[3], ek[3], lm.eg.rows, "experts down");
      const int64_t n = lm.eg.n;
      TORCH_CHECK(lm.gu[0].rows == n && lm.eu.n == n && lm.ed.n == n && lm.eu.rows == lm.eg.rows &&
                      lm.ed.rows == D && n <= E,
                  "router / expert sizes do not match the model's dims");
      lm.choice_bias = optional_vec(ex[4], n, "router choice bias");
      lm.probe_gu = {lm.eg.at(0), lm.eu.at(0)}, lm.probe_d = {lm.ed.at(0)};
    } else {
      const int64_t hl = w[6].size(0);
      lm.gu = {as_mat(w[6], kd[4], D, "gate_proj"), as_mat(w[7], kd[5], D, "up_proj")};
      lm.d = {as_mat(w[8], kd[6], hl, "down_proj")};
      TORCH_CHECK(lm.gu[1].rows == hl && lm.d[0].rows == D,
                  "projection sizes do not match the model's dims");
    }
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
    bool need4 = false, need8 = false, needb = false, needk = false;
    for (const LayerMats& lm : layers)
      for (const auto* ms : {&lm.qkv, &lm.o, &lm.gu, &lm.d, &lm.probe_gu, &lm.probe_d})
        for (const Mat& m : *ms)
          need4 |= m.kind == KQ4_1, need8 |= m.kind == KQ8_0, needb |= ggml_q8b_kernel(m.kind),
              needk |= ggml_q8k_kernel(m.kind);
    const int64_t most = std::max(B * std::max({D, nq, H}), BK * std::max(D, I));
    const int64_t blocks = most / QK + 1;
    if (need4) in.q4.resize(most), in.d4.resize(blocks), in.s4.resize(blocks);
    if (need8) in.q8.resize(most), in.d8.resize(blocks), in.s8.resize(blocks);
    if (needb) in.qb.resize(most), in.db.resize(blocks), in.sb.resize(blocks);
    if (needk) in.qk.resize(most), in.dk.resize(most / QKK + 1), in.bk.resize(most / 16 + 1);
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
        in.x = h.data(), in.B = B, in.K = D;
        prepare(in, lm.gu);
      }
      if (lm.moe < 0) {  // dense MLP
        const int64_t hl = lm.gu[0].rows;
        matvec_rows(in, lm.gu, gu.data(), 2 * hl, tid, T);
#pragma omp barrier
#pragma omp single
        {
          for (int64_t b = 0; b < B; ++b)
            glu(gu.data() + b * 2 * hl, hl, gelu != 0, act.data() + b * hl);
          in.x = act.data(), in.K = hl;
          prepare(in, lm.d);
        }
        matvec_rows(in, lm.d, out.data(), D, tid, T);
      } else {  // mixture of experts: router, choice, the chosen experts only
        const int64_t n = lm.eg.n, ie = lm.eg.rows;
        matvec_rows(in, lm.gu, logits.data(), n, tid, T);
#pragma omp barrier
#pragma omp single
        {
          for (int64_t b = 0; b < B; ++b)
            route(logits.data() + b * n, n, top_k, router_sigmoid != 0, router_norm != 0,
                  static_cast<float>(router_scale), lm.choice_bias, probs.data(),
                  chosen.data() + b * top_k, chosen_w.data() + b * top_k);
          // copies grouped by expert, rows in order within one (a stable sort by expert, as
          // model.Experts): expert e's copies are slots first[e] .. first[e] + count[e]
          std::fill(count.begin(), count.begin() + n, 0);
          for (int64_t c = 0; c < BK; ++c) ++count[chosen[c]];
          for (int64_t e = 0, at = 0; e < n; ++e) first[e] = at, at += count[e];
          for (int64_t c = 0; c < BK; ++c) {
            const int64_t slot = first[chosen[c]]++;
            slot_row[slot] = c / top_k, slot_w[slot] = chosen_w[c];
            std::memcpy(xg.data() + slot * D, h.data() + (c / top_k) * D, D * 4);
          }
          segs_gu.clear(), segs_d.clear();
          for (int64_t e = 0, at = 0; e < n; at += count[e], ++e) {
            if (count[e] == 0) continue;
            segs_gu.push_back({lm.eg.at(e), at, count[e], 0});
            segs_gu.push_back({lm.eu.at(e), at, count[e], ie});
            segs_d.push_back({lm.ed.at(e), at, count[e], 0});
          }
          in.x = xg.data(), in.B = BK, in.K = D;
          prepare(in, lm.probe_gu);
        }
        matvec_segments(in, segs_gu, gu_e.data(), 2 * ie, tid, T);
#pragma omp barrier
#pragma omp single
        {
          for (int64_t c = 0; c < BK; ++c)
            glu(gu_e.data() + c * 2 * ie, ie, gelu != 0, act_e.data() + c * ie);
          in.x = act_e.data(), in.K = ie;
          prepare(in, lm.probe_d);
        }
        matvec_segments(in, segs_d, out_e.data(), D, tid, T);
#pragma omp barrier
#pragma omp single
        {  // each row's experts summed by their weights, in expert order (as index_add_)
          std::fill(out.begin(), out.end(), 0.f);
          for (int64_t c = 0; c < BK; ++c) {
            float* o = out.data() + slot_row[c] * D;
            const float* y = out_e.data() + c * D;
            for (int64_t i = 0; i < D; ++i) o[i] += y[i] * slot_w[c];
          }
          in.B = B;
        }
      }
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
        "float attn_scale, int gelu, Tensor cache_rows, Tensor[] experts, int[] expert_kinds, "
        "int[] moe, int top_k, int router_sigmoid, int router_norm, float router_scale) -> Tensor");
}

LW_IMPL(m) {
  m.impl("decode_layers", &decode_layers);
}
