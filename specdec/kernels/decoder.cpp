// A Llama-family decoder stack over the new tokens of one or many sequences (a one-token step,
// a token tree, or a batch of them: one per sequence) with every projection on GGUF blocks, in
// one call from Python.
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
#include "layer_ops.h"
#include "stacks.h"

namespace specdec {

// x: float32 [n, d], the embedded tokens of one or more sequences, each sequence's rows together
// (updated in place and returned: the residual stream after the last layer, before the final
// norm). Sequence s owns rows[s] consecutive rows; kvs[s]: its float32 [layers, 2, hk, capacity,
// hd] cache, whose slots starts[s].. receive those rows' keys and values; masks[s]: bool
// [rows[s], starts[s] + rows[s]] (True = may attend) or none (causal: row i sees slots
// 0..starts[s]+i). Every product runs over all n rows at once (the weights are read once for
// the whole batch), attention over each sequence's own cache. cos, sin: [n, hd] at the tokens'
// positions. norms: input and post-attention norm weights per layer; blocks: (qs, d, m) of the
// fused q/k/v, output, fused gate/up and down projections per layer, q4 their kinds.
// int8_activations: every product quantizes its input to int8 blocks (gguf_blocks.h: lossy
// against float32, but the same for every row whatever the call, so the guarantee above holds).
torch::Tensor decoder_forward(torch::Tensor x, std::vector<torch::Tensor> kvs, std::vector<int64_t> starts,
                              std::vector<int64_t> rows, std::vector<std::optional<torch::Tensor>> masks, torch::Tensor cos,
                              torch::Tensor sin, std::vector<torch::Tensor> norms, std::vector<torch::Tensor> blocks,
                              std::vector<bool> q4, int64_t heads, int64_t kv_heads, double scale, double eps,
                              bool int8_activations) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.dim() == 2 && x.is_contiguous(), "x must be contiguous float32 [n, d]");
  const size_t count = kvs.size();
  const int64_t n = x.size(0), d = x.size(1);
  const Sequences seqs = sequences_of(count, starts, rows, masks, n);
  const std::vector<int64_t>& offsets = seqs.offsets;
  for (size_t s = 0; s < count; ++s) {
    const torch::Tensor& kv = kvs[s];
    TORCH_CHECK(kv.scalar_type() == torch::kFloat32 && kv.dim() == 5 && kv.is_contiguous(), "kv must be contiguous float32 [L, 2, hk, cap, hd]");
    TORCH_CHECK(kv.size(0) == kvs[0].size(0) && kv.size(2) == kvs[0].size(2) && kv.size(4) == kvs[0].size(4), "every cache must have the model's shape");
    check_attention_args(heads, kv_heads, kv.size(2), kv.size(4), d, starts[s] + rows[s], kv.size(3), cos, sin, n);
  }
  const int64_t layers = kvs[0].size(0), hk = kvs[0].size(2), hd = kvs[0].size(4);
  TORCH_CHECK(norms.size() == static_cast<size_t>(2 * layers) && blocks.size() == static_cast<size_t>(12 * layers) &&
                  q4.size() == static_cast<size_t>(4 * layers),
              "expected 2 norms, 4 projections and 4 kinds per layer");
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
  const float feps = static_cast<float>(eps);
  for (int64_t l = 0; l < layers; ++l) {
    const BlockWeight wqkv = weight(l, 0, d), wo = weight(l, 1, heads * hd), wgu = weight(l, 2, d), wdown = weight(l, 3, inner);
    TORCH_CHECK(wqkv.N == qkv_width && wo.N == d && wgu.N == 2 * inner && wdown.N == d, "projection shapes do not match the model");
    TORCH_CHECK(norms[2 * l].numel() == d && norms[2 * l + 1].numel() == d, "norm weights must have d elements");
    rms_norm(xp, norms[2 * l].data_ptr<float>(), n, d, feps, np);
    block_matmul_any(np, n, wqkv, qp, int8_activations);
    for (size_t s = 0; s < count; ++s) {
      const int64_t o = offsets[s], m = rows[s], capacity = kvs[s].size(3);
      float* kvp = kvs[s].data_ptr<float>();
      float* keys = kvp + (l * 2 + 0) * hk * capacity * hd;
      float* values = kvp + (l * 2 + 1) * hk * capacity * hd;
      rotate_and_store(qp + o * qkv_width, m, heads, hk, hd, cp + o * hd, sp + o * hd, keys, values, capacity, starts[s]);
      Attention{qp + o * qkv_width, keys, values, seqs.masks[s], m, starts[s], starts[s] + m, heads, hk, hd, capacity,
                static_cast<float>(scale), ap + o * heads * hd}
          .run();
    }
    block_matmul_any(ap, n, wo, pp, int8_activations);
    for (int64_t j = 0; j < n * d; ++j) xp[j] += pp[j];
    rms_norm(xp, norms[2 * l + 1].data_ptr<float>(), n, d, feps, np);
    block_matmul_any(np, n, wgu, gp, int8_activations);
    silu_mul(gp, gp + inner, 2 * inner, n, inner, actp);
    block_matmul_any(actp, n, wdown, pp, int8_activations);
    for (int64_t j = 0; j < n * d; ++j) xp[j] += pp[j];
  }
  return x;
}

}  // namespace specdec
