// The decoder stack of a Llama-family target on GGUF blocks, in one call (decoder.cpp).
#pragma once

#include <torch/extension.h>

#include <optional>
#include <vector>

namespace specdec {

torch::Tensor decoder_forward(torch::Tensor x, torch::Tensor kv, int64_t start, torch::Tensor cos, torch::Tensor sin,
                              std::optional<torch::Tensor> mask, std::vector<torch::Tensor> norms,
                              std::vector<torch::Tensor> blocks, std::vector<bool> q4, int64_t heads, int64_t kv_heads,
                              double scale, double eps);

}  // namespace specdec
