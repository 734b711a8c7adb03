// Building blocks of a Llama decoder layer on float32 rows, shared by the target's decoder
// stack (decoder.cpp) and the draft head (draft_head.cpp). Each row is computed by the same
// operations whatever the other rows of the call are, so results never depend on batching.
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <vector>

#include "gguf_blocks.h"

namespace specdec {


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
inline void rms_norm(const float* x, const float* w, int64_t n, int64_t d, float eps, float* out) {
  for (int64_t i = 0; i < n; ++i) {
    const float* xi = x + i * d;
    const float inv = 1.0f / std::sqrt(dot(xi, xi, d) / static_cast<float>(d) + eps);
    for (int64_t j = 0; j < d; ++j) out[i * d + j] = w[j] * (xi[j] * inv);
  }
}

// Rotary embedding in place on `count` heads of one row: (a, b) -> (a cos - b sin, b cos + a sin)
// over the two halves of each head, as transformers' rotate_half form.
inline void rotate(float* x, int64_t count, int64_t hd, const float* cos, const float* sin) {
  const int64_t half = hd / 2;
  for (int64_t h = 0; h < count; ++h, x += hd) {
    for (int64_t j = 0; j < half; ++j) {
      const float a = x[j], b = x[j + half];
      x[j] = a * cos[j] + (-b) * sin[j];
      x[j + half] = b * cos[j + half] + a * sin[j + half];
    }
  }
}

// out[i] = silu(gate[i]) * up[i] over `inner` columns, silu(g) = g / (1 + e^-g); gate and up
// rows are `stride` floats apart (a fused gate/up product: the two halves of one row).
inline void silu_mul(const float* gate, const float* up, int64_t stride, int64_t n, int64_t inner, float* out) {
  const __m256 one = _mm256_set1_ps(1.0f);
  for (int64_t i = 0; i < n; ++i) {
    const float* g = gate + i * stride;
    const float* u = up + i * stride;
    for (int64_t j = 0; j < inner; j += 8) {
      const __m256 gv = _mm256_loadu_ps(g + j);
      // sigmoid as 1 / (1 + e^-g) for g >= 0 and e^g / (1 + e^g) for g < 0: exp's input stays <= 0.
      const __m256 neg = _mm256_cmp_ps(gv, _mm256_setzero_ps(), _CMP_LT_OQ);
      const __m256 e = exp256(_mm256_sub_ps(_mm256_setzero_ps(), _mm256_andnot_ps(_mm256_set1_ps(-0.0f), gv)));
      const __m256 sig = _mm256_blendv_ps(_mm256_div_ps(one, _mm256_add_ps(one, e)), _mm256_div_ps(e, _mm256_add_ps(one, e)), neg);
      _mm256_storeu_ps(out + i * inner + j, _mm256_mul_ps(_mm256_mul_ps(gv, sig), _mm256_loadu_ps(u + j)));
    }
  }
}

// Rotate the q and k heads of each qkv row ([n, (hq + 2 hk) * hd]) at its position and store the
// row's keys and values at cache slots start + i (keys, values: [hk, capacity, hd]).
inline void rotate_and_store(float* qkv, int64_t n, int64_t hq, int64_t hk, int64_t hd, const float* cos, const float* sin,
                             float* keys, float* values, int64_t capacity, int64_t start) {
  const int64_t width = (hq + 2 * hk) * hd;
  for (int64_t i = 0; i < n; ++i) {
    float* row = qkv + i * width;
    rotate(row, hq + hk, hd, cos + i * hd, sin + i * hd);
    for (int64_t g = 0; g < hk; ++g) {
      std::copy_n(row + (hq + g) * hd, hd, keys + (g * capacity + start + i) * hd);
      std::copy_n(row + (hq + hk + g) * hd, hd, values + (g * capacity + start + i) * hd);
    }
  }
}

// r[u] = the sum of the eight lanes of a[u], for eight vectors at once.
inline __m256 hsum8(const __m256 a[8]) {
  const __m256 t0 = _mm256_hadd_ps(a[0], a[1]), t1 = _mm256_hadd_ps(a[2], a[3]);
  const __m256 t2 = _mm256_hadd_ps(a[4], a[5]), t3 = _mm256_hadd_ps(a[6], a[7]);
  const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

// One query (head_dim = 8 * V) against `count` keys and values: softmax(q.k * scale) . v into
// o. The keys are rows slots[s] of k and v, or rows 0..count-1 when slots is null. p: scratch
// of count rounded up to 8 floats. Every score, the total and the weighted sum are computed by
// the same operations whatever count is, so a row's result depends only on the keys it sees.
template <int V>
void attend(const float* q, const float* k, const float* v, const int64_t* slots, int64_t count, float scale, float* p, float* o) {
  constexpr int64_t hd = 8 * V;
  const auto row = [&](int64_t s) { return (slots ? slots[s] : s) * hd; };
  // Scores eight keys at a time (a missing key scores a zero vector), each one FMA chain over
  // the head's slices then hsum8's lane sum, with the query held in registers.
  __m256 qv[V];
  for (int c = 0; c < V; ++c) qv[c] = _mm256_loadu_ps(q + 8 * c);
  int64_t s = 0;
  for (; s < count; s += 8) {
    const int64_t live = std::min<int64_t>(8, count - s);
    __m256 acc[8];
    for (int u = 0; u < 8; ++u) {
      if (u >= live) {
        acc[u] = _mm256_setzero_ps();
        continue;
      }
      const float* ks = k + row(s + u);
      acc[u] = _mm256_mul_ps(qv[0], _mm256_loadu_ps(ks));
      for (int c = 1; c < V; ++c) acc[u] = _mm256_fmadd_ps(qv[c], _mm256_loadu_ps(ks + 8 * c), acc[u]);
    }
    _mm256_storeu_ps(p + s, _mm256_mul_ps(hsum8(acc), _mm256_set1_ps(scale)));
  }
  const int64_t padded = (count + 7) / 8 * 8;
  for (s = count; s < padded; ++s) p[s] = -std::numeric_limits<float>::infinity();
  __m256 vtop = _mm256_loadu_ps(p);
  for (s = 8; s < padded; s += 8) vtop = _mm256_max_ps(vtop, _mm256_loadu_ps(p + s));
  vtop = _mm256_max_ps(vtop, _mm256_permute2f128_ps(vtop, vtop, 1));
  vtop = _mm256_max_ps(vtop, _mm256_permute_ps(vtop, 0x4E));
  vtop = _mm256_max_ps(vtop, _mm256_permute_ps(vtop, 0xB1));
  // The total in eight lanes (position order within each), then one lane sum.
  __m256 sum = _mm256_setzero_ps();
  for (s = 0; s < padded; s += 8) {
    const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(p + s), vtop));
    _mm256_storeu_ps(p + s, e);
    sum = _mm256_add_ps(sum, e);
  }
  const float total = hsum(sum);
  // Two accumulators per slice of the head (even and odd positions) halve the FMA chains' length.
  __m256 acc[2][V];
  for (int c = 0; c < V; ++c) acc[0][c] = acc[1][c] = _mm256_setzero_ps();
  for (s = 0; s + 2 <= count; s += 2) {
    for (int j = 0; j < 2; ++j) {
      const __m256 w = _mm256_set1_ps(p[s + j]);
      const float* vs = v + row(s + j);
      for (int c = 0; c < V; ++c) acc[j][c] = _mm256_fmadd_ps(w, _mm256_loadu_ps(vs + 8 * c), acc[j][c]);
    }
  }
  if (s < count) {
    const __m256 w = _mm256_set1_ps(p[s]);
    const float* vs = v + row(s);
    for (int c = 0; c < V; ++c) acc[0][c] = _mm256_fmadd_ps(w, _mm256_loadu_ps(vs + 8 * c), acc[0][c]);
  }
  for (int c = 0; c < V; ++c) acc[0][c] = _mm256_add_ps(acc[0][c], acc[1][c]);
  const __m256 inv = _mm256_set1_ps(1.0f / total);
  for (int c = 0; c < V; ++c) _mm256_storeu_ps(o + 8 * c, _mm256_mul_ps(acc[0][c], inv));
}

struct Attention {
  const float* qkv;    // [n, (hq + 2 hk) * hd], rotated
  const float* keys;   // [hk, capacity, hd] of this layer
  const float* values;
  const bool* mask;    // [n, end] or nullptr (causal)
  int64_t n, start, end, hq, hk, hd, capacity;
  float scale;
  float* out;          // [n, hq * hd]

  // Every query row and head: softmax over the row's visible slots (in slot order) of
  // q.k * scale, times v. Rows without a mask see slots 0..start+i, contiguous.
  void run() const {
    std::vector<std::vector<int64_t>> slots(mask ? n : 0);
    for (int64_t i = 0; i < static_cast<int64_t>(slots.size()); ++i) {
      for (int64_t j = 0; j < end; ++j) {
        if (mask[i * end + j]) slots[i].push_back(j);
      }
    }
    at::parallel_for(0, n * hq, 1, [&](int64_t b, int64_t e) {
      std::vector<float> p(end + 8);
      for (int64_t t = b; t < e; ++t) {
        const int64_t i = t / hq, h = t % hq, g = h / (hq / hk);
        const int64_t* rows = mask ? slots[i].data() : nullptr;
        const int64_t count = mask ? static_cast<int64_t>(slots[i].size()) : start + i + 1;
        const float* q = qkv + i * (hq + 2 * hk) * hd + h * hd;
        const float* k = keys + g * capacity * hd;
        const float* v = values + g * capacity * hd;
        float* o = out + i * hq * hd + h * hd;
        switch (hd) {
          case 8: attend<1>(q, k, v, rows, count, scale, p.data(), o); break;
          case 16: attend<2>(q, k, v, rows, count, scale, p.data(), o); break;
          case 32: attend<4>(q, k, v, rows, count, scale, p.data(), o); break;
          case 64: attend<8>(q, k, v, rows, count, scale, p.data(), o); break;
          default: attend<16>(q, k, v, rows, count, scale, p.data(), o); break;
        }
      }
    });
  }
};

// Head sizes the attention kernel is built for.
inline bool supported_head_dim(int64_t hd) { return hd == 8 || hd == 16 || hd == 32 || hd == 64 || hd == 128; }

// The checks every attention caller needs: a supported head layout, room in the cache for slots
// up to `end`, and cos/sin tables of one row per new token.
inline void check_attention_args(int64_t heads, int64_t kv_heads, int64_t cache_kv_heads, int64_t hd, int64_t d, int64_t end,
                                 int64_t capacity, const torch::Tensor& cos, const torch::Tensor& sin, int64_t n) {
  TORCH_CHECK(cache_kv_heads == kv_heads && heads % kv_heads == 0 && supported_head_dim(hd) && d % 8 == 0, "unsupported head layout");
  TORCH_CHECK(end <= capacity, "the KV cache is too small");
  TORCH_CHECK(cos.scalar_type() == torch::kFloat32 && cos.is_contiguous() && cos.size(0) == n && cos.size(1) == hd &&
                  sin.sizes() == cos.sizes() && sin.is_contiguous(),
              "cos and sin must be contiguous float32 [n, hd]");
}

// The C++ view of a `mask` argument: bool [n, end] (True = may attend), or nullptr for causal.
inline const bool* mask_pointer(const std::optional<torch::Tensor>& mask, int64_t n, int64_t end) {
  if (!mask.has_value()) return nullptr;
  TORCH_CHECK(mask->scalar_type() == torch::kBool && mask->dim() == 2 && mask->size(0) == n && mask->size(1) == end &&
                  mask->is_contiguous(),
              "mask must be contiguous bool [n, start + n]");
  return mask->data_ptr<bool>();
}

}  // namespace specdec
