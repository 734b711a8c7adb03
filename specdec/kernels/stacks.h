// Whole forward passes on GGUF blocks in one call each: the target's decoder stack
// (decoder.cpp) and the draft head (draft_head.cpp).
#pragma once

#include <torch/extension.h>

#include <optional>
#include <tuple>
#include <vector>

namespace specdec {

torch::Tensor decoder_forward(torch::Tensor x, std::vector<torch::Tensor> kvs, std::vector<int64_t> starts,
                              std::vector<int64_t> rows, std::vector<std::optional<torch::Tensor>> masks, torch::Tensor cos,
                              torch::Tensor sin, std::vector<torch::Tensor> norms, std::vector<torch::Tensor> blocks,
                              std::vector<bool> q4, int64_t heads, int64_t kv_heads, double scale, double eps,
                              bool int8_activations);

std::tuple<torch::Tensor, torch::Tensor> head_forward(torch::Tensor emb, torch::Tensor features, std::vector<torch::Tensor> kvs,
                                                     std::vector<int64_t> starts, std::vector<int64_t> rows,
                                                     std::vector<std::optional<torch::Tensor>> masks, torch::Tensor cos,
                                                     torch::Tensor sin, std::vector<torch::Tensor> norms,
                                                     std::vector<torch::Tensor> blocks, bool feature_sampling,
                                                     bool partial_alignment, int64_t heads, int64_t kv_heads, double scale,
                                                     double eps, bool int8_activations);

}  // namespace specdec
