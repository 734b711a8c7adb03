// Building blocks of a Llama decoder layer on float32 rows, shared by the target's decoder
// stack (decoder.cpp) and the draft head (draft_head.cpp). Each row is computed by the same
// operations whatever the other rows of the call are, so results never depend on batching.
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
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

// Attention of one query (head_dim = 8 * V) in three steps, so that several queries can share
// each key and value while it is in L1 (`Attention::run`): scores of any slice of the keys,
// the softmax over all of them, then the weighted sum of the values, resumable at any even
// position. Each step computes every score, the total and every FMA chain the same way whatever
// the slicing, so a query's result depends only on the keys it sees.
template <int V>
struct Query {
  static constexpr int64_t hd = 8 * V;
  const float* q;
  float* p;      // scores, then weights: count rounded up to 8 floats
  float* acc;    // [2][hd]: the even and odd positions' partial sums of the values
  int64_t count;

  // Scores of keys at positions from..to-1 (rows slots[s], or s when slots is null), eight at a
  // time, each one FMA chain over the head's slices then hsum8's lane sum, with the query held
  // in registers; a missing key scores a zero vector.
  void score(const float* k, const int64_t* slots, int64_t from, int64_t to, float scale) const {
    __m256 qv[V];
    for (int c = 0; c < V; ++c) qv[c] = _mm256_loadu_ps(q + 8 * c);
    float block[8];
    for (int64_t s = from; s < to; s += 8) {
      const int64_t live = std::min<int64_t>(8, to - s);
      __m256 a[8];
      for (int u = 0; u < 8; ++u) {
        if (u >= live) {
          a[u] = _mm256_setzero_ps();
          continue;
        }
        const float* ks = k + (slots ? slots[s + u] : s + u) * hd;
        a[u] = _mm256_mul_ps(qv[0], _mm256_loadu_ps(ks));
        for (int c = 1; c < V; ++c) a[u] = _mm256_fmadd_ps(qv[c], _mm256_loadu_ps(ks + 8 * c), a[u]);
      }
      _mm256_storeu_ps(block, _mm256_mul_ps(hsum8(a), _mm256_set1_ps(scale)));
      std::copy_n(block, live, p + s);
    }
  }

  // Scores -> softmax weights in place (unnormalised) and the accumulators cleared; returns the total.
  float softmax() const {
    const int64_t padded = (count + 7) / 8 * 8;
    for (int64_t s = count; s < padded; ++s) p[s] = -std::numeric_limits<float>::infinity();
    __m256 vtop = _mm256_loadu_ps(p);
    for (int64_t s = 8; s < padded; s += 8) vtop = _mm256_max_ps(vtop, _mm256_loadu_ps(p + s));
    vtop = _mm256_max_ps(vtop, _mm256_permute2f128_ps(vtop, vtop, 1));
    vtop = _mm256_max_ps(vtop, _mm256_permute_ps(vtop, 0x4E));
    vtop = _mm256_max_ps(vtop, _mm256_permute_ps(vtop, 0xB1));
    // The total in eight lanes (position order within each), then one lane sum.
    __m256 sum = _mm256_setzero_ps();
    for (int64_t s = 0; s < padded; s += 8) {
      const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(p + s), vtop));
      _mm256_storeu_ps(p + s, e);
      sum = _mm256_add_ps(sum, e);
    }
    std::fill_n(acc, 2 * hd, 0.0f);
    return hsum(sum);
  }

  // Adds the values at positions from..to-1 (from even; to even unless it is count) to the
  // accumulators: two per slice of the head (even and odd positions) halve the FMA chains'
  // length; a last odd position goes to the even one.
  void add_values(const float* v, const int64_t* slots, int64_t from, int64_t to) const {
    __m256 a[2][V];
    for (int j = 0; j < 2; ++j)
      for (int c = 0; c < V; ++c) a[j][c] = _mm256_loadu_ps(acc + j * hd + 8 * c);
    int64_t s = from;
    for (; s + 2 <= to; s += 2) {
      for (int j = 0; j < 2; ++j) {
        const __m256 w = _mm256_set1_ps(p[s + j]);
        const float* vs = v + (slots ? slots[s + j] : s + j) * hd;
        for (int c = 0; c < V; ++c) a[j][c] = _mm256_fmadd_ps(w, _mm256_loadu_ps(vs + 8 * c), a[j][c]);
      }
    }
    if (s < to) {
      const __m256 w = _mm256_set1_ps(p[s]);
      const float* vs = v + (slots ? slots[s] : s) * hd;
      for (int c = 0; c < V; ++c) a[0][c] = _mm256_fmadd_ps(w, _mm256_loadu_ps(vs + 8 * c), a[0][c]);
    }
    for (int j = 0; j < 2; ++j)
      for (int c = 0; c < V; ++c) _mm256_storeu_ps(acc + j * hd + 8 * c, a[j][c]);
  }

  void finish(float total, float* o) const {
    const __m256 inv = _mm256_set1_ps(1.0f / total);
    for (int c = 0; c < V; ++c) {
      _mm256_storeu_ps(o + 8 * c, _mm256_mul_ps(_mm256_add_ps(_mm256_loadu_ps(acc + 8 * c), _mm256_loadu_ps(acc + hd + 8 * c)), inv));
    }
  }
};

struct Attention {
  const float* qkv;    // [n, (hq + 2 hk) * hd], rotated
  const float* keys;   // [hk, capacity, hd] of this layer
  const float* values;
  const bool* mask;    // [n, end] or nullptr (causal)
  int64_t n, start, end, hq, hk, hd, capacity;
  float scale;
  float* out;          // [n, hq * hd]

  // Keys and values shared per L1-sized block by the queries of one task.
  static constexpr int64_t kKeyBlock = 64;

  // Every query row and head: softmax over the row's visible slots (in slot order) of
  // q.k * scale, times v. Rows without a mask see slots 0..start+i, contiguous.
  // Why tasks of many queries: the heads of a key/value group and the rows of a call all read
  // the same committed keys and values; read once per block for all of them, they stay in L1
  // instead of coming from L3 once per row and head (a 4-row tree at 1,000 tokens of context
  // spent most of its attention time on those reads).
  void run() const {
    std::vector<std::vector<int64_t>> slots(mask ? n : 0);
    for (int64_t i = 0; i < static_cast<int64_t>(slots.size()); ++i) {
      for (int64_t j = 0; j < end; ++j) {
        if (mask[i * end + j]) slots[i].push_back(j);
      }
    }
    // Positions every row sees as slots 0..shared-1: the blocks read once for all queries.
    int64_t shared = start + 1;
    for (const auto& row : slots) {
      int64_t j = 0;
      while (j < static_cast<int64_t>(row.size()) && row[j] == j) ++j;
      shared = std::min(shared, j);
    }
    shared = shared / 2 * 2;  // even: the value pairs stay aligned
    switch (hd) {
      case 8: run_heads<1>(slots, shared); break;
      case 16: run_heads<2>(slots, shared); break;
      case 32: run_heads<4>(slots, shared); break;
      case 64: run_heads<8>(slots, shared); break;
      default: run_heads<16>(slots, shared); break;
    }
  }

  // Tasks: each key/value group with half of the rows (all of them for one row).
  template <int V>
  void run_heads(const std::vector<std::vector<int64_t>>& slots, int64_t shared) const {
    const int64_t group = hq / hk, halves = n > 1 ? 2 : 1, rows_per = (n + halves - 1) / halves;
    at::parallel_for(0, hk * halves, 1, [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t) {
        const int64_t g = t / halves, i0 = (t % halves) * rows_per, i1 = std::min(n, i0 + rows_per);
        if (i0 >= i1) continue;
        // Per query: its scores (end rounded up, padded) and its two accumulators; every float is
        // written before it is read, so the buffer is left uninitialised.
        const int64_t count_q = (i1 - i0) * group, stride = (end + 8) + 2 * Query<V>::hd;
        std::unique_ptr<float[]> scratch(new float[count_q * stride]);
        std::vector<Query<V>> queries;
        std::vector<float> totals(count_q);
        for (int64_t i = i0; i < i1; ++i) {
          for (int64_t h = g * group; h < (g + 1) * group; ++h) {
            float* base = scratch.get() + static_cast<int64_t>(queries.size()) * stride;
            const int64_t count = mask ? static_cast<int64_t>(slots[i].size()) : start + i + 1;
            queries.push_back({qkv + i * (hq + 2 * hk) * hd + h * hd, base, base + end + 8, count});
          }
        }
        const float* k = keys + g * capacity * hd;
        const float* v = values + g * capacity * hd;
        for (int64_t s = 0; s < shared; s += kKeyBlock) {
          for (const auto& query : queries) query.score(k, nullptr, s, std::min(shared, s + kKeyBlock), scale);
        }
        for (int64_t j = 0; j < count_q; ++j) {
          const Query<V>& query = queries[j];
          const int64_t i = i0 + j / group;
          query.score(k, mask ? slots[i].data() : nullptr, shared, query.count, scale);
          totals[j] = query.softmax();
        }
        for (int64_t s = 0; s < shared; s += kKeyBlock) {
          for (const auto& query : queries) query.add_values(v, nullptr, s, std::min(shared, s + kKeyBlock));
        }
        for (int64_t j = 0; j < count_q; ++j) {
          const Query<V>& query = queries[j];
          const int64_t i = i0 + j / group, h = g * group + j % group;
          query.add_values(v, mask ? slots[i].data() : nullptr, shared, query.count);
          query.finish(totals[j], out + i * hq * hd + h * hd);
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

// The sequences of a batched call (decoder_forward, head_forward): where each one's rows start
// among the n rows (offsets, one more than sequences) and its mask, checked: one cache, start,
// row count and mask per sequence, at least one row each, the counts adding up to n.
struct Sequences {
  std::vector<int64_t> offsets;
  std::vector<const bool*> masks;
};

inline Sequences sequences_of(size_t caches, const std::vector<int64_t>& starts, const std::vector<int64_t>& rows,
                              const std::vector<std::optional<torch::Tensor>>& masks, int64_t n) {
  TORCH_CHECK(caches > 0 && starts.size() == caches && rows.size() == caches && masks.size() == caches,
              "one cache, start, row count and mask per sequence");
  Sequences out{std::vector<int64_t>(caches + 1, 0), std::vector<const bool*>(caches)};
  for (size_t s = 0; s < caches; ++s) {
    TORCH_CHECK(rows[s] > 0 && starts[s] >= 0, "every sequence needs at least one row and a start >= 0");
    out.offsets[s + 1] = out.offsets[s] + rows[s];
    out.masks[s] = mask_pointer(masks[s], rows[s], starts[s] + rows[s]);
  }
  TORCH_CHECK(out.offsets[caches] == n, "the row counts must add up to the input's rows");
  return out;
}

}  // namespace specdec
