// Python bindings of the GGUF-block kernels: one product (`gguf_matmul`, see gguf_blocks.h), its
// greedy tokens (`gguf_argmax`, greedy_head.h), the decoder stack of a Llama-family target (`decoder_forward`, decoder.cpp) and the draft head's
// forward (`head_forward`, draft_head.cpp) on such weights.
#include <torch/extension.h>

#include "stacks.h"
#include "gguf_blocks.h"
#include "greedy_head.h"

namespace {

// x: float32 [M, K] contiguous; qs: uint8 [N, K/2] (Q4_1) or [N, K] (Q8_0); d, m: float32
// [N, K/32] (m empty for Q8_0). Returns float32 [M, N].
// With int8_activations x is quantized per block of 32 first (lossy, opt-in: gguf_blocks.h).
torch::Tensor gguf_matmul(torch::Tensor x, torch::Tensor qs, torch::Tensor d, torch::Tensor m, bool q4, bool int8_activations) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.dim() == 2 && x.is_contiguous(), "x must be contiguous float32 [M, K]");
  const specdec::BlockWeight w = specdec::block_weight(qs, d, m, q4, x.size(1));
  auto y = torch::empty({x.size(0), w.N}, x.options());
  specdec::block_matmul_any(x.data_ptr<float>(), x.size(0), w, y.data_ptr<float>(), int8_activations);
  return y;
}

// The argmax of each row of gguf_matmul(x, ...) (float32 x) for a Q8_0 weight, -1 for a row
// with a non-finite input; wnorm: float32 [N], the rows' weight norms rounded up. int64 [M].
torch::Tensor gguf_argmax(torch::Tensor x, torch::Tensor qs, torch::Tensor d, torch::Tensor m, bool q4, torch::Tensor wnorm) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.dim() == 2 && x.is_contiguous(), "x must be contiguous float32 [M, K]");
  const specdec::BlockWeight w = specdec::block_weight(qs, d, m, q4, x.size(1));
  TORCH_CHECK(wnorm.scalar_type() == torch::kFloat32 && wnorm.is_contiguous() && wnorm.numel() == w.N, "wnorm must be float32 [N]");
  const std::vector<int64_t> best = specdec::block_argmax(x.data_ptr<float>(), x.size(0), w, wnorm.data_ptr<float>());
  return torch::tensor(best, torch::kInt64);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("gguf_matmul", &gguf_matmul, "x @ W.T with W in GGUF Q4_1 or Q8_0 blocks (float32 or int8 x)",
             py::arg("x"), py::arg("qs"), py::arg("d"), py::arg("m"), py::arg("q4"), py::arg("int8_activations") = false);
  module.def("gguf_argmax", &gguf_argmax, "the argmax of each row of x @ W.T (float32 x, Q8_0 W), screened with int8 products",
             py::arg("x"), py::arg("qs"), py::arg("d"), py::arg("m"), py::arg("q4"), py::arg("wnorm"));
  module.def("decoder_forward", &specdec::decoder_forward,
             "a Llama decoder stack on GGUF blocks over n new tokens, writing their KV (see decoder.cpp)");
  module.def("head_forward", &specdec::head_forward,
             "the FSPAD / EAGLE-2 draft head on Q8_0 blocks over n new pairs, writing their KV (see draft_head.cpp)");
}
