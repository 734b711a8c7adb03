// The draft head's forward (specdec/head.py: FSPAD or plain EAGLE-2) over n new (feature, token)
// pairs of one or many draft sessions on Q8_0 blocks, in one call from Python.
//
// Why: a proposal runs the head once per tree depth on a handful of rows; in Python each run
// was some forty small tensor ops, about as long as the head's matrix products themselves.
// The math is the module's, step for step: h = fc([emb, f]); with feature sampling
// h += down(silu(gate(emb)) * up(norm(h))); a = h + attention(norm(h)); m = mlp(norm(a));
// out = [a, a] + m with partial alignment (first half for the LM head, second half the predicted
// feature), else a + m for both.
#include "layer_ops.h"
#include "stacks.h"

namespace specdec {

// emb, features: float32 [n, d], the pairs of one or more sequences, each sequence's rows together
// (a batched proposal: every draft session's frontier at one depth). Sequence s owns rows[s]
// consecutive rows; kvs[s]: its float32 [2, hk, capacity, hd] head cache, whose slots starts[s]..
// receive those rows' keys and values; masks[s] as in decoder_forward (none: causal). Every
// product runs over all n rows at once (the weights are read once for the batch), attention over
// each sequence's own cache, so a row gets the same result alone or batched. cos, sin: [n, hd].
// norms: [feature-sampling norm,] input norm, post-attention norm. blocks: (qs, d, m) of fc,
// [feature sampling's gate, up, down,] the fused q/k/v, output, fused gate/up and down, all Q8_0.
// int8_activations: every product quantizes its input to int8 blocks (gguf_blocks.h; lossy, as a
// proposal may be). Returns (logit hidden [n, d], predicted feature [n, d]).
std::tuple<torch::Tensor, torch::Tensor> head_forward(torch::Tensor emb, torch::Tensor features, std::vector<torch::Tensor> kvs,
                                                     std::vector<int64_t> starts, std::vector<int64_t> rows,
                                                     std::vector<std::optional<torch::Tensor>> masks, torch::Tensor cos,
                                                     torch::Tensor sin, std::vector<torch::Tensor> norms,
                                                     std::vector<torch::Tensor> blocks, bool feature_sampling,
                                                     bool partial_alignment, int64_t heads, int64_t kv_heads, double scale,
                                                     double eps, bool int8_activations) {
  TORCH_CHECK(emb.scalar_type() == torch::kFloat32 && emb.dim() == 2 && emb.is_contiguous() && features.sizes() == emb.sizes() &&
                  features.scalar_type() == torch::kFloat32 && features.is_contiguous(),
              "emb and features must be contiguous float32 [n, d]");
  const size_t count = kvs.size();
  const int64_t n = emb.size(0), d = emb.size(1);
  const Sequences seqs = sequences_of(count, starts, rows, masks, n);
  const std::vector<int64_t>& offsets = seqs.offsets;
  for (size_t s = 0; s < count; ++s) {
    const torch::Tensor& kv = kvs[s];
    TORCH_CHECK(kv.scalar_type() == torch::kFloat32 && kv.dim() == 4 && kv.is_contiguous() && kv.size(0) == 2,
                "kv must be contiguous float32 [2, hk, cap, hd]");
    check_attention_args(heads, kv_heads, kv.size(1), kv.size(3), d, starts[s] + rows[s], kv.size(2), cos, sin, n);
  }
  const int64_t hk = kvs[0].size(1), hd = kvs[0].size(3);
  const size_t projections = feature_sampling ? 8 : 5;
  TORCH_CHECK(norms.size() == (feature_sampling ? 3u : 2u) && blocks.size() == 3 * projections,
              "expected the norms and projections of this head variant");
  for (const auto& w : norms) TORCH_CHECK(w.scalar_type() == torch::kFloat32 && w.numel() == d, "norm weights must be float32 [d]");
  size_t next = 0;
  const auto weight = [&](int64_t in, int64_t out) {
    const BlockWeight w = block_weight(blocks[next], blocks[next + 1], blocks[next + 2], false, in);
    TORCH_CHECK(out < 0 || w.N == out, "projection shapes do not match the head");
    next += 3;
    return w;
  };
  const auto mm = [int8_activations](const float* x, int64_t rows, const BlockWeight& w, float* y) {
    block_matmul_any(x, rows, w, y, int8_activations);
  };
  const BlockWeight fc = weight(2 * d, d);
  const int64_t qkv_width = (heads + 2 * kv_heads) * hd;
  const auto opts = emb.options();
  torch::Tensor x2 = torch::cat({emb, features}, 1), h = torch::empty({n, d}, opts), normed = torch::empty({n, d}, opts),
                proj = torch::empty({n, d}, opts);
  float *hp = h.data_ptr<float>(), *np = normed.data_ptr<float>(), *pp = proj.data_ptr<float>();
  const float feps = static_cast<float>(eps);
  mm(x2.data_ptr<float>(), n, fc, hp);
  size_t norm = 0;
  if (feature_sampling) {
    const BlockWeight gate = weight(d, -1), up = weight(d, gate.N), down = weight(gate.N, d);
    TORCH_CHECK(gate.N % 8 == 0, "the MLP width must be a multiple of 8");
    torch::Tensor g = torch::empty({n, gate.N}, opts), u = torch::empty({n, gate.N}, opts), act = torch::empty({n, gate.N}, opts);
    rms_norm(hp, norms[norm++].data_ptr<float>(), n, d, feps, np);
    mm(emb.data_ptr<float>(), n, gate, g.data_ptr<float>());
    mm(np, n, up, u.data_ptr<float>());
    silu_mul(g.data_ptr<float>(), u.data_ptr<float>(), gate.N, n, gate.N, act.data_ptr<float>());
    mm(act.data_ptr<float>(), n, down, pp);
    for (int64_t j = 0; j < n * d; ++j) hp[j] += pp[j];
  }
  const BlockWeight wqkv = weight(d, qkv_width), wo = weight(heads * hd, d), wgu = weight(d, -1);
  const int64_t inner = wgu.N / 2;
  const int64_t width = partial_alignment ? 2 * d : d;
  const BlockWeight wdown = weight(inner, width);
  TORCH_CHECK(inner % 8 == 0, "the MLP width must be a multiple of 8");
  torch::Tensor qkv = torch::empty({n, qkv_width}, opts), att = torch::empty({n, heads * hd}, opts),
                gate_up = torch::empty({n, 2 * inner}, opts), act = torch::empty({n, inner}, opts),
                mlp = torch::empty({n, width}, opts);
  float *qp = qkv.data_ptr<float>(), *ap = att.data_ptr<float>(), *gp = gate_up.data_ptr<float>(), *mp = mlp.data_ptr<float>();
  rms_norm(hp, norms[norm++].data_ptr<float>(), n, d, feps, np);
  mm(np, n, wqkv, qp);
  for (size_t s = 0; s < count; ++s) {
    const int64_t o = offsets[s], m = rows[s], capacity = kvs[s].size(2);
    float* keys = kvs[s].data_ptr<float>();
    float* values = keys + hk * capacity * hd;
    rotate_and_store(qp + o * qkv_width, m, heads, hk, hd, cos.data_ptr<float>() + o * hd, sin.data_ptr<float>() + o * hd, keys,
                     values, capacity, starts[s]);
    Attention{qp + o * qkv_width, keys, values, seqs.masks[s], m, starts[s], starts[s] + m, heads, hk, hd, capacity,
              static_cast<float>(scale), ap + o * heads * hd}
        .run();
  }
  mm(ap, n, wo, pp);
  for (int64_t j = 0; j < n * d; ++j) hp[j] += pp[j];  // h is now the attention block's output a
  rms_norm(hp, norms[norm++].data_ptr<float>(), n, d, feps, np);
  mm(np, n, wgu, gp);
  silu_mul(gp, gp + inner, 2 * inner, n, inner, act.data_ptr<float>());
  mm(act.data_ptr<float>(), n, wdown, mp);
  torch::Tensor logit_hidden = torch::empty({n, d}, opts), feature = partial_alignment ? torch::empty({n, d}, opts) : logit_hidden;
  float *lp = logit_hidden.data_ptr<float>(), *fp = feature.data_ptr<float>();
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j < d; ++j) {
      lp[i * d + j] = hp[i * d + j] + mp[i * width + j];
      if (partial_alignment) fp[i * d + j] = hp[i * d + j] + mp[i * width + d + j];
    }
  }
  return {logit_hidden, feature};
}

}  // namespace specdec
