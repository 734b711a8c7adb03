// The greedy token of each row of x under a Q8_0 weight (the target's LM head), exactly the
// argmax of block_matmul's float32 logits, without computing all of them in float32.
//
// Why: a one-row float32 product over the LM head's 49,152 rows is bound by its FMA chains
// (about 2 ms a step here), while the int8 product reads the same bytes in half the time. Greedy
// decoding needs only the largest logit, so the int8 logits screen the vocabulary and the few
// rows that could still hold the maximum are recomputed in float32, each by the same FMA chain
// as block_matmul (gguf_blocks.h), so the answer is the one the full product gives, ties included
// (the lowest index, as torch.argmax).
//
// The screen's bound: with x quantized per block (x = dx*xq + e), block_matmul_int8 computes
// the sum over blocks of dw*dx*sum(qw*xq), which differs from the exact sum of x*w by the sum of
// e*w; by Cauchy-Schwarz |sum e*w| <= |w| |e|. Both products also round: block_matmul's chain
// by at most 576 units in the last place of sum|x*w| <= |x| |w| (about 3.4e-5 |x| |w| for
// K = 576), the int8 one's scaling and lane sums by far less. So |exact - approx| <= B =
// |w| (1.01 |e| + slack |x|) with slack = 4 K 2^-24 (above both for any K), and a row n whose
// approx + B is below the largest approx - B over all rows cannot hold the maximum.
#pragma once

#include "gguf_blocks.h"

namespace specdec {

// Rows of x: the index of the largest float32 logit (block_matmul's numbers), lowest on ties;
// -1 for a row with a non-finite input (the caller computes its logits instead).
// wnorm: float32 [N], each row's Euclidean norm of its decoded weights, rounded up.
inline std::vector<int64_t> block_argmax(const float* x, int64_t M, const BlockWeight& w, const float* wnorm) {
  TORCH_CHECK(!w.q4, "greedy screening is built for Q8_0 weights");
  const int64_t K = w.K, N = w.N, blocks = K / kBlock;
  const QuantRows xq = quantize_rows(x, M, K);
  std::vector<float> approx(M * N);
  block_matmul_int8(xq, w, approx.data());
  const float slack = 4.0f * static_cast<float>(K) * 0x1p-24f;
  std::vector<int64_t> best(M, -1);
  for (int64_t r = 0; r < M; ++r) {
    const float* xr = x + r * K;
    // |x| and |e| of this row, e = x - dx*xq as the int8 product saw it.
    double xx = 0.0, ee = 0.0;
    for (int64_t g = 0; g < blocks; ++g) {
      const int64_t at = xq.slot(r, g);
      const int8_t* q = xq.q.data() + at * kBlock;
      const double d = xq.d8[8 * at];
      for (int64_t i = 0; i < kBlock; ++i) {
        const double v = xr[g * kBlock + i], e = v - q[i] * d;
        xx += v * v;
        ee += e * e;
      }
    }
    if (!std::isfinite(xx)) continue;
    const float* a = approx.data() + r * N;
    const float margin_x = static_cast<float>(1.01 * std::sqrt(ee) + slack * std::sqrt(xx));
    const __m256 vm = _mm256_set1_ps(margin_x);
    // The largest lower bound a - B over all rows of W ...
    __m256 vfloor = _mm256_set1_ps(-INFINITY);
    int64_t n = 0;
    for (; n + 8 <= N; n += 8) vfloor = _mm256_max_ps(vfloor, _mm256_fnmadd_ps(_mm256_loadu_ps(wnorm + n), vm, _mm256_loadu_ps(a + n)));
    float floor = hmax(vfloor);
    for (; n < N; ++n) floor = std::max(floor, a[n] - wnorm[n] * margin_x);
    // ... then, in row order, every row whose upper bound a + B reaches it, computed exactly.
    float top = -INFINITY;
    const auto candidate = [&](int64_t c) {
      float exact;
      tile<false, 1, 1>(xr, K, w.qs + c * K, K, w.d + c * blocks, nullptr, &exact, 1);
      if (best[r] < 0 || exact > top) top = exact, best[r] = c;
    };
    const __m256 vf = _mm256_set1_ps(floor);
    for (n = 0; n + 8 <= N; n += 8) {
      const __m256 upper = _mm256_fmadd_ps(_mm256_loadu_ps(wnorm + n), vm, _mm256_loadu_ps(a + n));
      for (int bits = _mm256_movemask_ps(_mm256_cmp_ps(upper, vf, _CMP_GE_OQ)); bits; bits &= bits - 1) candidate(n + __builtin_ctz(bits));
    }
    for (; n < N; ++n) {
      if (a[n] + wnorm[n] * margin_x >= floor) candidate(n);
    }
  }
  return best;
}

}  // namespace specdec
