// A Llama-family decoder stack over n new tokens (n small: a one-token step or a token tree)
// with every projection on GGUF blocks, in one call from Python.
//
// Why: on a 2-core CPU a one-token step of the 30-layer default target spent about half of its
// ~30 ms outside the matrix products: a dozen small tensor ops per layer, each a Python call
// and an allocation, plus a general attention kernel. Here each layer is plain loops over
// preallocated buffers: RMSNorm, the fused q/k/v product, rotary embedding, the KV write,
// attention over the visible cache slots, the output product, RMSNorm, gate/up, SiLU, down.
//
// Every row is computed by the same sequence of operations whatever n is and whichever other
// rows share the call (products: gguf_blocks.h; attention: a row reads only the keys its mask
// allows, in slot order). So a token verified inside a tree gets bit-for-bit the logits it
// gets in a one-token step: greedy speculative decoding equals plain decoding exactly, with no
// float near-ties left to chance.
#include "decoder.h"

#include <cmath>
#include <limits>

#include "gguf_blocks.h"

namespace specdec {
namespace {

// e^x for x <= 0 (softmax after subtracting the maximum, SiLU of a negated input): Cody-Waite
// range reduction and a degree-6 polynomial, about 1 ulp; inputs below -87 give ~1e-38.
inline __m256 exp256(__m256 x) {
  x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.0f)), _mm256_set1_ps(-87.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

inline float dot(const float* a, const float* b, int64_t len) {
  __m256 acc = _mm256_setzero_ps();
  for (int64_t j = 0; j < len; j += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + j), _mm256_loadu_ps(b + j), acc);
  return hsum(acc);
}

// out[i] = x[i] * rsqrt(mean(x[i]^2) + eps) * w, as transformers' LlamaRMSNorm in float32.
void rms_norm(const float* x, const float* w, int64_t n, int64_t d, float eps, float* out) {
  for (int64_t i = 0; i < n; ++i) {
    const float* xi = x + i * d;
    const float inv = 1.0f / std::sqrt(dot(xi, xi, d) / static_cast<float>(d) + eps);
    for (int64_t j = 0; j < d; ++j) out[i * d + j] = w[j] * (xi[j] * inv);
  }
}

// Rotary embedding in place on `count` heads of one row: (a, b) -> (a cos - b sin, b cos + a sin)
// over the two halves of each head, as transformers' rotate_half form.
void rotate(float* x, int64_t count, int64_t hd, const float* cos, const float* sin) {
  const int64_t half = hd / 2;
  for (int64_t h = 0; h < count; ++h, x += hd) {
    for (int64_t j = 0; j < half; ++j) {
      const float a = x[j], b = x[j + half];
      x[j] = a * cos[j] + (-b) * sin[j];
      x[j + half] = b * cos[j + half] + a * sin[j + half];
    }
  }
}

// out[i] = silu(gate_up[i, :I]) * gate_up[i, I:], with silu(g) = g / (1 + e^-g).
void silu_mul(const float* gate_up, int64_t n, int64_t inner, float* out) {
  const __m256 one = _mm256_set1_ps(1.0f);
  for (int64_t i = 0; i < n; ++i) {
    const float* g = gate_up + i * 2 * inner;
    for (int64_t j = 0; j < inner; j += 8) {
      const __m256 gv = _mm256_loadu_ps(g + j);
      // e^-g for g >= 0 and e^g / (1 + e^g) form for g < 0 keep exp's input <= 0.
      const __m256 neg = _mm256_cmp_ps(gv, _mm256_setzero_ps(), _CMP_LT_OQ);
      const __m256 e = exp256(_mm256_sub_ps(_mm256_setzero_ps(), _mm256_andnot_ps(_mm256_set1_ps(-0.0f), gv)));
      const __m256 sig = _mm256_blendv_ps(_mm256_div_ps(one, _mm256_add_ps(one, e)), _mm256_div_ps(e, _mm256_add_ps(one, e)), neg);
      _mm256_storeu_ps(out + i * inner + j, _mm256_mul_ps(_mm256_mul_ps(gv, sig), _mm256_loadu_ps(g + inner + j)));
    }
  }
}

struct Attention {
  const float* qkv;    // [n, (hq + 2 hk) * hd], rotated
  const float* keys;   // [hk, capacity, hd] of this layer
  const float* values;
  const bool* mask;    // [n, end] or nullptr (causal)
  int64_t n, start, end, hq, hk, hd, capacity;
  float scale;
  float* out;          // [n, hq * hd]

  // Query row i, head h: softmax over the visible slots (in slot order) of q.k * scale, times v.
  void row(int64_t i, int64_t h, std::vector<int64_t>& slots, std::vector<float>& p) const {
    const int64_t g = h / (hq / hk);
    const float* q = qkv + i * (hq + 2 * hk) * hd + h * hd;
    const float* kg = keys + g * capacity * hd;
    const float* vg = values + g * capacity * hd;
    slots.clear();
    for (int64_t j = 0; j < end; ++j) {
      if (mask ? mask[i * end + j] : j <= start + i) slots.push_back(j);
    }
    const int64_t count = static_cast<int64_t>(slots.size());
    const int64_t padded = (count + 7) / 8 * 8;
    p.assign(padded, -std::numeric_limits<float>::infinity());
    float top = -std::numeric_limits<float>::infinity();
    for (int64_t s = 0; s < count; ++s) {
      p[s] = dot(q, kg + slots[s] * hd, hd) * scale;
      top = std::max(top, p[s]);
    }
    const __m256 vtop = _mm256_set1_ps(top);
    for (int64_t s = 0; s < padded; s += 8) _mm256_storeu_ps(&p[s], exp256(_mm256_sub_ps(_mm256_loadu_ps(&p[s]), vtop)));
    float total = 0.0f;
    for (int64_t s = 0; s < count; ++s) total += p[s];
    float* o = out + i * hq * hd + h * hd;
    for (int64_t j = 0; j < hd; ++j) o[j] = 0.0f;
    for (int64_t s = 0; s < count; ++s) {
      const __m256 w = _mm256_set1_ps(p[s]);
      const float* v = vg + slots[s] * hd;
      for (int64_t j = 0; j < hd; j += 8) _mm256_storeu_ps(o + j, _mm256_fmadd_ps(w, _mm256_loadu_ps(v + j), _mm256_loadu_ps(o + j)));
    }
    const float inv = 1.0f / total;
    for (int64_t j = 0; j < hd; ++j) o[j] *= inv;
  }

  void run() const {
    at::parallel_for(0, n * hq, 1, [&](int64_t b, int64_t e) {
      std::vector<int64_t> slots;
      std::vector<float> p;
      for (int64_t t = b; t < e; ++t) row(t / hq, t % hq, slots, p);
    });
  }
};

}  // namespace

// x: float32 [n, d], the embedded tokens (updated in place and returned: the residual stream
// after the last layer, before the final norm). kv: float32 [layers, 2, hk, capacity, hd]; the
// new keys and values go to slots start..start+n-1. cos, sin: [n, hd] at the tokens' positions.
// mask: bool [n, start+n] (True = may attend) or none (causal: row i sees slots 0..start+i).
// norms: input and post-attention norm weights per layer; blocks: (qs, d, m) of the fused
// q/k/v, output, fused gate/up and down projections per layer, q4 their kinds.
torch::Tensor decoder_forward(torch::Tensor x, torch::Tensor kv, int64_t start, torch::Tensor cos, torch::Tensor sin,
                              std::optional<torch::Tensor> mask, std::vector<torch::Tensor> norms,
                              std::vector<torch::Tensor> blocks, std::vector<bool> q4, int64_t heads, int64_t kv_heads,
                              double scale, double eps) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.dim() == 2 && x.is_contiguous(), "x must be contiguous float32 [n, d]");
  TORCH_CHECK(kv.scalar_type() == torch::kFloat32 && kv.dim() == 5 && kv.is_contiguous(), "kv must be contiguous float32 [L, 2, hk, cap, hd]");
  const int64_t n = x.size(0), d = x.size(1), layers = kv.size(0), hk = kv.size(2), capacity = kv.size(3), hd = kv.size(4);
  const int64_t end = start + n;
  TORCH_CHECK(hk == kv_heads && heads % kv_heads == 0 && hd % 8 == 0 && d % 8 == 0, "unsupported head layout");
  TORCH_CHECK(end <= capacity, "the KV cache is too small");
  TORCH_CHECK(norms.size() == static_cast<size_t>(2 * layers) && blocks.size() == static_cast<size_t>(12 * layers) &&
                  q4.size() == static_cast<size_t>(4 * layers),
              "expected 2 norms, 4 projections and 4 kinds per layer");
  TORCH_CHECK(cos.scalar_type() == torch::kFloat32 && cos.is_contiguous() && cos.size(0) == n && cos.size(1) == hd &&
                  sin.sizes() == cos.sizes() && sin.is_contiguous(),
              "cos and sin must be contiguous float32 [n, hd]");
  const bool* mask_ptr = nullptr;
  torch::Tensor mask_c;
  if (mask.has_value()) {
    mask_c = mask->contiguous();
    TORCH_CHECK(mask_c.scalar_type() == torch::kBool && mask_c.dim() == 2 && mask_c.size(0) == n && mask_c.size(1) == end,
                "mask must be bool [n, start + n]");
    mask_ptr = mask_c.data_ptr<bool>();
  }
  const int64_t qkv_width = (heads + 2 * kv_heads) * hd;
  const auto opts = x.options();
  const auto weight = [&](int64_t layer, int64_t which, int64_t in) {
    const size_t at = static_cast<size_t>(12 * layer + 3 * which);
    return block_weight(blocks[at], blocks[at + 1], blocks[at + 2], q4[4 * layer + which], in);
  };
  const int64_t inner = blocks[6].size(0) / 2;
  TORCH_CHECK(inner % 8 == 0, "the MLP width must be a multiple of 8");
  torch::Tensor normed = torch::empty({n, d}, opts), qkv = torch::empty({n, qkv_width}, opts),
                att = torch::empty({n, heads * hd}, opts), proj = torch::empty({n, d}, opts),
                gate_up = torch::empty({n, 2 * inner}, opts), act = torch::empty({n, inner}, opts);
  float *xp = x.data_ptr<float>(), *np = normed.data_ptr<float>(), *qp = qkv.data_ptr<float>(), *ap = att.data_ptr<float>(),
        *pp = proj.data_ptr<float>(), *gp = gate_up.data_ptr<float>(), *actp = act.data_ptr<float>();
  const float *cp = cos.data_ptr<float>(), *sp = sin.data_ptr<float>();
  float* kvp = kv.data_ptr<float>();
  const float feps = static_cast<float>(eps);
  for (int64_t l = 0; l < layers; ++l) {
    const BlockWeight wqkv = weight(l, 0, d), wo = weight(l, 1, heads * hd), wgu = weight(l, 2, d), wdown = weight(l, 3, inner);
    TORCH_CHECK(wqkv.N == qkv_width && wo.N == d && wgu.N == 2 * inner && wdown.N == d, "projection shapes do not match the model");
    TORCH_CHECK(norms[2 * l].numel() == d && norms[2 * l + 1].numel() == d, "norm weights must have d elements");
    rms_norm(xp, norms[2 * l].data_ptr<float>(), n, d, feps, np);
    block_matmul(np, n, wqkv, qp);
    float* keys = kvp + (l * 2 + 0) * hk * capacity * hd;
    float* values = kvp + (l * 2 + 1) * hk * capacity * hd;
    for (int64_t i = 0; i < n; ++i) {
      float* row = qp + i * qkv_width;
      rotate(row, heads + kv_heads, hd, cp + i * hd, sp + i * hd);
      for (int64_t g = 0; g < hk; ++g) {
        std::copy_n(row + (heads + g) * hd, hd, keys + (g * capacity + start + i) * hd);
        std::copy_n(row + (heads + hk + g) * hd, hd, values + (g * capacity + start + i) * hd);
      }
    }
    Attention{qp, keys, values, mask_ptr, n, start, end, heads, hk, hd, capacity, static_cast<float>(scale), ap}.run();
    block_matmul(ap, n, wo, pp);
    for (int64_t j = 0; j < n * d; ++j) xp[j] += pp[j];
    rms_norm(xp, norms[2 * l + 1].data_ptr<float>(), n, d, feps, np);
    block_matmul(np, n, wgu, gp);
    silu_mul(gp, n, inner, actp);
    block_matmul(actp, n, wdown, pp);
    for (int64_t j = 0; j < n * d; ++j) xp[j] += pp[j];
  }
  return x;
}

}  // namespace specdec
