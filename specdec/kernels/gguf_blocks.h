// Products with weights stored in the GGUF's own blocks (Q4_1, Q8_0): float32 activations and
// accumulation, the weights decoded exactly (w = d*q + m, w = d*q) right before their fused
// multiply-adds, so a product equals the float32 one up to summation order while the weights
// cost 4-5x fewer bytes to read. Every output element is one FMA chain whose order does not
// depend on how many rows x has, so a row's result is the same alone or in a batch. AVX2 + FMA.
#pragma once

#include <ATen/Parallel.h>
#include <torch/extension.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace specdec {

constexpr int64_t kBlock = 32;  // elements per GGUF block (Q4_1 and Q8_0)

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// The 32 weights of block `g` of a Q4_1 row as four vectors: byte j holds element j in its low
// nibble and element j + 16 in its high nibble (ggml's layout).
inline void decode_q4_1(const uint8_t* qs, float d, float m, __m256 w[4]) {
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
  const __m128i mask = _mm_set1_epi8(0x0F);
  const __m128i lo = _mm_and_si128(bytes, mask);
  const __m128i hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), mask);
  const __m256 vd = _mm256_set1_ps(d), vm = _mm256_set1_ps(m);
  const __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
  for (int i = 0; i < 4; ++i) {
    w[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(parts[i])), vd, vm);
  }
}

inline void decode_q8_0(const int8_t* qs, float d, __m256 w[4]) {
  const __m256 vd = _mm256_set1_ps(d);
  for (int i = 0; i < 4; ++i) {
    const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(qs + 8 * i));
    w[i] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)), vd);
  }
}

// NR rows of W (row_bytes apart) against MR rows of x: each block of W is decoded once for all
// MR rows, and the NR x MR accumulators are independent FMA chains. Every output element is the
// same chain (acc = 0; for each block, for each of its four vectors: acc = fma(w, x, acc); then
// the lane sum) whatever MR and NR are, so tiling never changes a result; NR > 1 only gives a few
// rows of x enough independent chains to hide the FMA latency.
template <bool Q4, int MR, int NR>
void tile(const float* x, int64_t K, const uint8_t* qs, int64_t row_bytes, const float* d, const float* m, float* y, int64_t N) {
  const int64_t blocks = K / kBlock;
  __m256 acc[NR][MR];
  for (int j = 0; j < NR; ++j)
    for (int r = 0; r < MR; ++r) acc[j][r] = _mm256_setzero_ps();
  for (int64_t g = 0; g < blocks; ++g) {
    for (int j = 0; j < NR; ++j) {
      __m256 w[4];
      if constexpr (Q4) {
        decode_q4_1(qs + j * row_bytes + g * kBlock / 2, d[j * blocks + g], m[j * blocks + g], w);
      } else {
        decode_q8_0(reinterpret_cast<const int8_t*>(qs + j * row_bytes + g * kBlock), d[j * blocks + g], w);
      }
      for (int i = 0; i < 4; ++i)
        for (int r = 0; r < MR; ++r) acc[j][r] = _mm256_fmadd_ps(w[i], _mm256_loadu_ps(x + r * K + g * kBlock + 8 * i), acc[j][r]);
    }
  }
  for (int j = 0; j < NR; ++j)
    for (int r = 0; r < MR; ++r) y[r * N + j] = hsum(acc[j][r]);
}

// Rows n0..n1 of W against MR rows of x, NR rows of W at a time (the rest one by one).
template <bool Q4, int MR, int NR>
void tile_rows(const float* x, int64_t K, const uint8_t* qs, const float* d, const float* m, float* y, int64_t N, int64_t n0, int64_t n1) {
  const int64_t blocks = K / kBlock, row_bytes = Q4 ? K / 2 : K;
  int64_t n = n0;
  for (; n + NR <= n1; n += NR) tile<Q4, MR, NR>(x, K, qs + n * row_bytes, row_bytes, d + n * blocks, Q4 ? m + n * blocks : nullptr, y + n, N);
  for (; n < n1; ++n) tile<Q4, MR, 1>(x, K, qs + n * row_bytes, row_bytes, d + n * blocks, Q4 ? m + n * blocks : nullptr, y + n, N);
}

// Rows n0..n1 of W against all M rows of x, up to 8 rows of x at a time; with up to four rows
// of x, several Q4_1 rows of W share a tile (measured here: one or two rows of x on one row of
// W were bound by the latency of their one or two FMA chains).
template <bool Q4>
void matmul_rows(const float* x, int64_t M, int64_t K, const uint8_t* qs, const float* d, const float* m,
                 float* y, int64_t N, int64_t n0, int64_t n1) {
  // Q8_0 rows are 4-bit rows' double in bytes and cheap to decode: reading several at once
  // only slowed them (the LM head's 49152 rows), so they stay one row of W per tile.
  constexpr int NR1 = Q4 ? 4 : 1, NR2 = Q4 ? 2 : 1;
  for (int64_t r = 0; r < M; r += 8) {
    const float* xr = x + r * K;
    float* yr = y + r * N;
    switch (std::min<int64_t>(8, M - r)) {
      case 1: tile_rows<Q4, 1, NR1>(xr, K, qs, d, m, yr, N, n0, n1); break;
      case 2: tile_rows<Q4, 2, NR2>(xr, K, qs, d, m, yr, N, n0, n1); break;
      case 3: tile_rows<Q4, 3, NR2>(xr, K, qs, d, m, yr, N, n0, n1); break;
      case 4: tile_rows<Q4, 4, NR2>(xr, K, qs, d, m, yr, N, n0, n1); break;
      case 5: tile_rows<Q4, 5, 1>(xr, K, qs, d, m, yr, N, n0, n1); break;
      case 6: tile_rows<Q4, 6, 1>(xr, K, qs, d, m, yr, N, n0, n1); break;
      case 7: tile_rows<Q4, 7, 1>(xr, K, qs, d, m, yr, N, n0, n1); break;
      default: tile_rows<Q4, 8, 1>(xr, K, qs, d, m, yr, N, n0, n1); break;
    }
  }
}

// A weight in GGUF blocks: qs [N, K/2] (Q4_1) or [N, K] (Q8_0) bytes, d and m [N, K/32].
struct BlockWeight {
  const uint8_t* qs;
  const float* d;
  const float* m;  // nullptr for Q8_0
  int64_t N, K;
  bool q4;
};

// A checked view of a weight's block tensors, for inputs of K features.
inline BlockWeight block_weight(const torch::Tensor& qs, const torch::Tensor& d, const torch::Tensor& m, bool q4, int64_t K) {
  TORCH_CHECK(qs.scalar_type() == torch::kUInt8 && qs.dim() == 2 && qs.is_contiguous(), "qs must be contiguous uint8 [N, bytes]");
  TORCH_CHECK(d.scalar_type() == torch::kFloat32 && d.is_contiguous(), "d must be contiguous float32");
  const int64_t N = qs.size(0);
  TORCH_CHECK(K % kBlock == 0 && qs.size(1) == (q4 ? K / 2 : K) && d.dim() == 2 && d.size(0) == N && d.size(1) == K / kBlock,
              "shapes of x, qs and d do not match");
  TORCH_CHECK(!q4 || (m.scalar_type() == torch::kFloat32 && m.is_contiguous() && m.sizes() == d.sizes()),
              "m must be float32 shaped like d");
  return {qs.data_ptr<uint8_t>(), d.data_ptr<float>(), q4 ? m.data_ptr<float>() : nullptr, N, K, q4};
}

// y [M, N] = x [M, K] @ W.T, rows of W split across threads.
inline void block_matmul(const float* x, int64_t M, const BlockWeight& w, float* y) {
  at::parallel_for(0, w.N, 64, [&](int64_t n0, int64_t n1) {
    if (w.q4) {
      matmul_rows<true>(x, M, w.K, w.qs, w.d, w.m, y, w.N, n0, n1);
    } else {
      matmul_rows<false>(x, M, w.K, w.qs, w.d, w.m, y, w.N, n0, n1);
    }
  });
}

// Lossy and only for the draft head: x quantized to int8 per block of 32 (xq = round(x / dx),
// dx = max|x| / 127, as llama.cpp's Q8_0 activations), so that a block's dot product with a
// Q8_0 weight row is integer multiply-adds (32 products in three instructions) scaled once by
// dw * dx. About twice the throughput of decoding the weights to float32.
struct QuantRows {
  std::vector<int8_t> q;
  std::vector<float> d;
};

inline QuantRows quantize_rows(const float* x, int64_t M, int64_t K) {
  QuantRows out{std::vector<int8_t>(M * K), std::vector<float>(M * K / kBlock)};
  for (int64_t b = 0; b < M * K / kBlock; ++b) {
    const float* xb = x + b * kBlock;
    float amax = 0.0f;
    for (int64_t j = 0; j < kBlock; ++j) amax = std::max(amax, std::fabs(xb[j]));
    const float d = amax / 127.0f, inv = d > 0.0f ? 1.0f / d : 0.0f;
    out.d[b] = d;
    for (int64_t j = 0; j < kBlock; ++j) out.q[b * kBlock + j] = static_cast<int8_t>(std::nearbyint(xb[j] * inv));
  }
  return out;
}

template <int MR>
void tile_q8(const int8_t* xq, const float* dx, int64_t K, const int8_t* wq, const float* dw, float* y, int64_t N) {
  const __m256i ones = _mm256_set1_epi16(1);
  const int64_t blocks = K / kBlock;
  __m256 acc[MR];
  for (int r = 0; r < MR; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t g = 0; g < blocks; ++g) {
    const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wq + g * kBlock));
    const __m256i aw = _mm256_sign_epi8(w, w);  // |w|, unsigned for maddubs; the sign moves to x
    for (int r = 0; r < MR; ++r) {
      const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + r * K + g * kBlock));
      const __m256i dot = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, _mm256_sign_epi8(x, w)), ones);
      acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(dw[g] * dx[r * blocks + g]), _mm256_cvtepi32_ps(dot), acc[r]);
    }
  }
  for (int r = 0; r < MR; ++r) y[r * N] = hsum(acc[r]);
}

// y [M, N] ~= x [M, K] @ W.T for a Q8_0 weight, x quantized as above.
inline void block_matmul_q8(const float* x, int64_t M, const BlockWeight& w, float* y) {
  TORCH_CHECK(!w.q4, "int8 activations need a Q8_0 weight");
  const QuantRows xq = quantize_rows(x, M, w.K);
  const int64_t blocks = w.K / kBlock;
  at::parallel_for(0, w.N, 64, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const int8_t* wn = reinterpret_cast<const int8_t*>(w.qs) + n * w.K;
      const float* dn = w.d + n * blocks;
      for (int64_t r = 0; r < M; r += 4) {
        const int8_t* xr = xq.q.data() + r * w.K;
        const float* dr = xq.d.data() + r * blocks;
        float* yr = y + r * w.N + n;
        switch (std::min<int64_t>(4, M - r)) {
          case 1: tile_q8<1>(xr, dr, w.K, wn, dn, yr, w.N); break;
          case 2: tile_q8<2>(xr, dr, w.K, wn, dn, yr, w.N); break;
          case 3: tile_q8<3>(xr, dr, w.K, wn, dn, yr, w.N); break;
          default: tile_q8<4>(xr, dr, w.K, wn, dn, yr, w.N); break;
        }
      }
    }
  });
}

}  // namespace specdec
