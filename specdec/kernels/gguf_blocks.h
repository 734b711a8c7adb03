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

// The AVX-512 build (VNNI, BW and VL; `specdec.gguf_linear.build_kernel`): int8 products in one
// instruction per block pair, and float products on two rows of W per 16-lane register. Every
// result is the AVX2 build's, bit for bit.
#if defined(__AVX512VNNI__) && defined(__AVX512VL__) && defined(__AVX512BW__)
#define SPECDEC_VNNI 1
#endif

// How far ahead of its reads a product asks for weight bytes (rows of W are contiguous, so
// this runs into the next rows). Why: the hardware prefetcher alone left a one-token step of
// the default target stalled on memory for about a third of its time (decoder stack plus LM
// head, 400 tokens of context: 17 ms -> 11 ms with it; a 4-8 row tree about 10% faster).
constexpr int64_t kPrefetchBytes = 4096;

// Asks for the cache line `kPrefetchBytes` past `p`; call once per 64 bytes read.
inline void prefetch_ahead(const uint8_t* p) { _mm_prefetch(reinterpret_cast<const char*>(p) + kPrefetchBytes, _MM_HINT_T0); }

// Bytes of one block's weights, and blocks per 64-byte cache line, of a Q4_1 or Q8_0 row.
template <bool Q4>
constexpr int64_t kBlockBytes = Q4 ? kBlock / 2 : kBlock;
template <bool Q4>
constexpr int64_t kLineBlocks = 64 / kBlockBytes<Q4>;

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline float hmax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
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
    if (g % kLineBlocks<Q4> == 0) {
      for (int j = 0; j < NR; ++j) prefetch_ahead(qs + j * row_bytes + g * kBlockBytes<Q4>);
    }
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

#ifdef SPECDEC_VNNI
// Two 8-lane vectors as one 16-lane register: a in lanes 0-7, b in lanes 8-15.
inline __m512 pair_ps(__m256 a, __m256 b) {
  return _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castpd256_pd512(_mm256_castps_pd(a)), _mm256_castps_pd(b), 1));
}

// Eight floats at p in both halves of a register: a load that broadcasts, no shuffle.
inline __m512 broadcast8(const float* p) { return _mm512_castpd_ps(_mm512_broadcast_f64x4(_mm256_loadu_pd(reinterpret_cast<const double*>(p)))); }

inline __m256 upper_ps(__m512 v) { return _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)); }

// Block g of two rows of W (a, b: their bytes; da/db, ma/mb: their scales) as four 16-lane
// vectors: lanes 0-7 hold what decode_q4_1 / decode_q8_0 give for row a, lanes 8-15 for row b,
// by the same operations lane for lane.
template <bool Q4>
inline void decode_pair(const uint8_t* a, const uint8_t* b, float da, float db, float ma, float mb, __m512 w[4]) {
  const __m512 vd = pair_ps(_mm256_set1_ps(da), _mm256_set1_ps(db));
  if constexpr (Q4) {
    const __m128i mask = _mm_set1_epi8(0x0F);
    const __m128i ba = _mm_loadu_si128(reinterpret_cast<const __m128i*>(a)), bb = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b));
    const __m128i lo_a = _mm_and_si128(ba, mask), hi_a = _mm_and_si128(_mm_srli_epi16(ba, 4), mask);
    const __m128i lo_b = _mm_and_si128(bb, mask), hi_b = _mm_and_si128(_mm_srli_epi16(bb, 4), mask);
    // Element groups 0-7, 8-15 (low nibbles) and 16-23, 24-31 (high nibbles) of each row.
    const __m128i parts[4] = {_mm_unpacklo_epi64(lo_a, lo_b), _mm_unpackhi_epi64(lo_a, lo_b), _mm_unpacklo_epi64(hi_a, hi_b),
                              _mm_unpackhi_epi64(hi_a, hi_b)};
    const __m512 vm = pair_ps(_mm256_set1_ps(ma), _mm256_set1_ps(mb));
    for (int i = 0; i < 4; ++i) w[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(parts[i])), vd, vm);
  } else {
    for (int i = 0; i < 4; ++i) {
      const __m128i bytes = _mm_unpacklo_epi64(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(a + 8 * i)),
                                               _mm_loadl_epi64(reinterpret_cast<const __m128i*>(b + 8 * i)));
      w[i] = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes)), vd);
    }
  }
}

// `tile` for two rows of W (n, n + 1) side by side in 16 lanes against MR rows of x, each
// 8-float piece of x broadcast to both halves: every lane runs the FMA chain it runs in the
// 8-lane tile, so the results are the same, from half as many FMA instructions (a batch of rows
// is bound by them on this kind of CPU).
template <bool Q4, int MR>
void tile_pair(const float* x, int64_t K, const uint8_t* qs, int64_t row_bytes, const float* d, const float* m, float* y, int64_t N) {
  const int64_t blocks = K / kBlock;
  __m512 acc[MR];
  for (int r = 0; r < MR; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < blocks; ++g) {
    if (g % kLineBlocks<Q4> == 0) {
      prefetch_ahead(qs + g * kBlockBytes<Q4>);
      prefetch_ahead(qs + row_bytes + g * kBlockBytes<Q4>);
    }
    __m512 w[4];
    const uint8_t* a = qs + g * kBlockBytes<Q4>;
    decode_pair<Q4>(a, a + row_bytes, d[g], d[blocks + g], Q4 ? m[g] : 0.0f, Q4 ? m[blocks + g] : 0.0f, w);
    for (int i = 0; i < 4; ++i)
      for (int r = 0; r < MR; ++r) acc[r] = _mm512_fmadd_ps(w[i], broadcast8(x + r * K + g * kBlock + 8 * i), acc[r]);
  }
  for (int r = 0; r < MR; ++r) {
    y[r * N] = hsum(_mm512_castps512_ps256(acc[r]));
    y[r * N + 1] = hsum(upper_ps(acc[r]));
  }
}
#endif

// Rows n0..n1 of W against MR rows of x, NR rows of W at a time (the rest one by one); in the
// AVX-512 build, with two or more rows of x, two rows of W per register instead.
template <bool Q4, int MR, int NR>
void tile_rows(const float* x, int64_t K, const uint8_t* qs, const float* d, const float* m, float* y, int64_t N, int64_t n0, int64_t n1) {
  const int64_t blocks = K / kBlock, row_bytes = Q4 ? K / 2 : K;
  int64_t n = n0;
#ifdef SPECDEC_VNNI
  if constexpr (MR > 1) {
    for (; n + 2 <= n1; n += 2) tile_pair<Q4, MR>(x, K, qs + n * row_bytes, row_bytes, d + n * blocks, Q4 ? m + n * blocks : nullptr, y + n, N);
  }
#endif
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

// Lossy, opt-in: x quantized to int8 per block of 32 (xq = round(x / dx), dx = max|x| / 127,
// as llama.cpp quantizes activations for its 4- and 8-bit weights), so that a block's dot
// product with a weight row is exact integer multiply-adds scaled once: Q8_0 w = dw*q gives
// dw*dx*sum(q*xq); Q4_1 w = dw*q + mw gives dw*dx*sum(q*xq) + mw*sx with sx = dx*sum(xq).
// With AVX-512 (BW, VL, VNNI) one instruction makes two blocks' 64 products and their sums in
// 16 lanes; without it AVX2 makes the same exact integers, block by block, into two 8-lane
// accumulators (even and odd blocks) that hold what the two halves of the 16 lanes hold, so
// both builds give the same floats. A row's result does not depend on the other rows.

// x quantized, in groups of up to 8 rows (what one tile multiplies with a weight row), each
// group laid out block pair by block pair: for pair p and row r the 64 bytes of blocks 2p and
// 2p+1 (a last odd block: its 32), so a tile reads every row of a pair at fixed offsets from
// one pointer. d8 holds each block's dx eight times (one per lane) in the same order; s is
// dx * sum(xq) per block, row by row.
// Where block g of row r of a group of `rows` rows starts within the group, counted in blocks.
inline int64_t group_slot(int64_t rows, int64_t blocks, int64_t r, int64_t g) {
  const int64_t pair = g / 2, width = 2 * pair + 1 < blocks ? 2 : 1;
  return pair * 2 * rows + r * width + (g & 1);
}

struct QuantRows {
  int64_t M, blocks;
  std::vector<int8_t> q;
  std::vector<float> d8, s;

  // Where block g of row r starts, counted in blocks.
  int64_t slot(int64_t r, int64_t g) const {
    const int64_t first = r & ~int64_t{7};
    return first * blocks + group_slot(std::min<int64_t>(8, M - first), blocks, r - first, g);
  }
};

inline QuantRows quantize_rows(const float* x, int64_t M, int64_t K) {
  const int64_t blocks = K / kBlock;
  QuantRows out{M, blocks, std::vector<int8_t>(M * K), std::vector<float>(8 * M * blocks), std::vector<float>(M * blocks)};
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  for (int64_t r = 0; r < M; ++r) {
    for (int64_t g = 0; g < blocks; ++g) {
      const float* xb = x + r * K + g * kBlock;
      __m256 v[4], amax = _mm256_setzero_ps();
      for (int i = 0; i < 4; ++i) {
        v[i] = _mm256_loadu_ps(xb + 8 * i);
        amax = _mm256_max_ps(amax, _mm256_and_ps(v[i], abs_mask));
      }
      const float d = hmax(amax) / 127.0f, inv = d > 0.0f ? 1.0f / d : 0.0f;
      const __m256 vinv = _mm256_set1_ps(inv);
      __m256i q[4], sum = _mm256_setzero_si256();
      for (int i = 0; i < 4; ++i) {  // round half to even, as std::nearbyint
        q[i] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[i], vinv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        sum = _mm256_add_epi32(sum, q[i]);
      }
      // int32 -> int8 in element order: the packs work within 128-bit lanes, the permutes undo that.
      const __m256i p8 = _mm256_packs_epi16(_mm256_permute4x64_epi64(_mm256_packs_epi32(q[0], q[1]), 0xD8),
                                            _mm256_permute4x64_epi64(_mm256_packs_epi32(q[2], q[3]), 0xD8));
      const int64_t at = out.slot(r, g);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out.q.data() + at * kBlock), _mm256_permute4x64_epi64(p8, 0xD8));
      __m128i s = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
      s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
      s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
      _mm256_storeu_ps(out.d8.data() + 8 * at, _mm256_set1_ps(d));
      out.s[r * blocks + g] = d * static_cast<float>(_mm_cvtsi128_si32(s));
    }
  }
  return out;
}

// The 32 weights of block g as unsigned bytes in element order and (Q8_0) the signed ones:
// Q4_1 nibbles as they are (byte j: element j low, j + 16 high); Q8_0 |w|, its sign to go to x.
template <bool Q4>
inline void weight_bytes(const uint8_t* row, int64_t g, __m256i& unsigned_w, __m256i& signed_w) {
  if constexpr (Q4) {
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + g * kBlock / 2));
    unsigned_w = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(bytes, 4), bytes), _mm256_set1_epi8(0x0F));
    signed_w = unsigned_w;
  } else {
    signed_w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + g * kBlock));
    unsigned_w = _mm256_sign_epi8(signed_w, signed_w);
  }
}

// Sums of u[i] * s[i] over groups of four bytes (u unsigned, s signed), exact in int32.
inline __m256i dot_u8s8(__m256i u, __m256i s) {
#ifdef SPECDEC_VNNI
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#else
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));  // no pair reaches 2^15
#endif
}

// acc = fma(dw*dx, the 8 lane sums of one block's integer products, acc) for one block.
template <bool Q4>
inline __m256 block_step(__m256i u, __m256i sw, const int8_t* x, const float* dx8, float dw, __m256 acc) {
  const __m256i xq = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
  const __m256i dot = dot_u8s8(u, Q4 ? xq : _mm256_sign_epi8(xq, sw));
  return _mm256_fmadd_ps(_mm256_mul_ps(_mm256_set1_ps(dw), _mm256_loadu_ps(dx8)), _mm256_cvtepi32_ps(dot), acc);
}

// Weight rows n0..n1 against one group of MR rows of xq (xg, dg: the group's q and d8; sg its
// s). Per row of W, row of x and lane: acc_even sums the even blocks' block_step, acc_odd the
// odd ones'; the result is the lane sum of acc_even + acc_odd plus (Q4_1) mw . sx in 8 lanes.
template <bool Q4, int MR>
void tile_int8(const int8_t* xg, const float* dg, const float* sg, const BlockWeight& w, int64_t n0, int64_t n1, float* y) {
  const int64_t K = w.K, blocks = K / kBlock, pairs = blocks / 2, row_bytes = Q4 ? K / 2 : K;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w.qs + n * row_bytes;
    const float* dw = w.d + n * blocks;
    __m256 sums[MR];
#ifdef SPECDEC_VNNI
    __m512 acc[MR];
    for (int r = 0; r < MR; ++r) acc[r] = _mm512_setzero_ps();
    const int8_t* xp = xg;
    const float* dp = dg;
    for (int64_t p = 0; p < pairs; ++p, xp += MR * 2 * kBlock, dp += MR * 16) {
      if (2 * p % kLineBlocks<Q4> == 0) prefetch_ahead(row + 2 * p * kBlockBytes<Q4>);
      __m512i uw;
      __mmask64 negative = 0;
      if constexpr (Q4) {  // 16 bytes per block: [B0 | B1] -> [B0 & 15, B0 >> 4, B1 & 15, B1 >> 4]
        const __m512i b = _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + p * kBlock)));
        const __m512i z = _mm512_shuffle_i64x2(b, b, _MM_SHUFFLE(1, 1, 0, 0));
        uw = _mm512_and_si512(_mm512_mask_blend_epi64(0xCC, z, _mm512_srli_epi16(z, 4)), _mm512_set1_epi8(0x0F));
      } else {
        const __m512i w = _mm512_loadu_si512(row + p * 2 * kBlock);
        uw = _mm512_abs_epi8(w);
        negative = _mm512_movepi8_mask(w);
      }
      const __m512 scale = _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castpd256_pd512(_mm256_castps_pd(_mm256_set1_ps(dw[2 * p]))),
                                                               _mm256_castps_pd(_mm256_set1_ps(dw[2 * p + 1])), 1));
      for (int r = 0; r < MR; ++r) {
        __m512i x = _mm512_loadu_si512(xp + r * 2 * kBlock);
        if constexpr (!Q4) x = _mm512_mask_sub_epi8(x, negative, _mm512_setzero_si512(), x);
        const __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), uw, x);
        acc[r] = _mm512_fmadd_ps(_mm512_mul_ps(scale, _mm512_loadu_ps(dp + r * 16)), _mm512_cvtepi32_ps(dot), acc[r]);
      }
    }
    __m256i u, sw;
    if (blocks & 1) weight_bytes<Q4>(row, blocks - 1, u, sw);
    for (int r = 0; r < MR; ++r) {
      __m256 even = _mm512_castps512_ps256(acc[r]);
      if (blocks & 1) even = block_step<Q4>(u, sw, xp + r * kBlock, dp + r * 8, dw[blocks - 1], even);
      sums[r] = _mm256_add_ps(even, _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc[r]), 1)));
    }
#else
    __m256 acc[2][MR];
    for (int r = 0; r < MR; ++r) acc[0][r] = acc[1][r] = _mm256_setzero_ps();
    for (int64_t g = 0; g < blocks; ++g) {
      if (g % kLineBlocks<Q4> == 0) prefetch_ahead(row + g * kBlockBytes<Q4>);
      __m256i u, sw;
      weight_bytes<Q4>(row, g, u, sw);
      for (int r = 0; r < MR; ++r) {
        const int64_t at = group_slot(MR, blocks, r, g);
        acc[g & 1][r] = block_step<Q4>(u, sw, xg + at * kBlock, dg + at * 8, dw[g], acc[g & 1][r]);
      }
    }
    for (int r = 0; r < MR; ++r) sums[r] = _mm256_add_ps(acc[0][r], acc[1][r]);
#endif
    for (int r = 0; r < MR; ++r) {
      float out = hsum(sums[r]);
      if constexpr (Q4) {
        const float *mw = w.m + n * blocks, *s = sg + r * blocks;
        __m256 off = _mm256_setzero_ps();
        int64_t b = 0;
        for (; b + 8 <= blocks; b += 8) off = _mm256_fmadd_ps(_mm256_loadu_ps(mw + b), _mm256_loadu_ps(s + b), off);
        float tail = 0.0f;
        for (; b < blocks; ++b) tail = std::fma(mw[b], s[b], tail);
        out += hsum(off) + tail;
      }
      y[r * w.N + n] = out;
    }
  }
}

template <bool Q4>
void tile_int8_group(int64_t rows, const int8_t* xg, const float* dg, const float* sg, const BlockWeight& w, int64_t n0,
                     int64_t n1, float* y) {
  switch (rows) {
    case 1: tile_int8<Q4, 1>(xg, dg, sg, w, n0, n1, y); break;
    case 2: tile_int8<Q4, 2>(xg, dg, sg, w, n0, n1, y); break;
    case 3: tile_int8<Q4, 3>(xg, dg, sg, w, n0, n1, y); break;
    case 4: tile_int8<Q4, 4>(xg, dg, sg, w, n0, n1, y); break;
    case 5: tile_int8<Q4, 5>(xg, dg, sg, w, n0, n1, y); break;
    case 6: tile_int8<Q4, 6>(xg, dg, sg, w, n0, n1, y); break;
    case 7: tile_int8<Q4, 7>(xg, dg, sg, w, n0, n1, y); break;
    default: tile_int8<Q4, 8>(xg, dg, sg, w, n0, n1, y); break;
  }
}

// y [M, N] ~= x [M, K] @ W.T with x quantized as above (xq = quantize_rows(x, M, K)): rows of W
// split across threads, then taken 64 at a time (in cache) against each group of rows of x.
inline void block_matmul_int8(const QuantRows& xq, const BlockWeight& w, float* y) {
  const int64_t M = xq.M, blocks = xq.blocks;
  at::parallel_for(0, w.N, 64, [&](int64_t n0, int64_t n1) {
    for (int64_t nb = n0; nb < n1; nb += 64) {
      const int64_t ne = std::min(n1, nb + 64);
      for (int64_t r = 0; r < M; r += 8) {
        const int8_t* xg = xq.q.data() + r * w.K;
        const float *dg = xq.d8.data() + 8 * r * blocks, *sg = xq.s.data() + r * blocks;
        const int64_t rows = std::min<int64_t>(8, M - r);
        if (w.q4) {
          tile_int8_group<true>(rows, xg, dg, sg, w, nb, ne, y + r * w.N);
        } else {
          tile_int8_group<false>(rows, xg, dg, sg, w, nb, ne, y + r * w.N);
        }
      }
    }
  });
}

inline void block_matmul_int8(const float* x, int64_t M, const BlockWeight& w, float* y) {
  block_matmul_int8(quantize_rows(x, M, w.K), w, y);
}

// Either product: int8 activations (above) or float32 ones (block_matmul).
inline void block_matmul_any(const float* x, int64_t M, const BlockWeight& w, float* y, bool int8_activations) {
  if (int8_activations) {
    block_matmul_int8(x, M, w, y);
  } else {
    block_matmul(x, M, w, y);
  }
}

}  // namespace specdec
