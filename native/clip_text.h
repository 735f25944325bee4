// TEMPORARY stub until the CLIP implementation lands.
#pragma once
#include <torch/torch.h>
#include "json.h"
namespace tl {
struct CLIPTextConfig { int64_t hidden_size = 0; };
struct CLIPTextModel : torch::nn::Module {
  CLIPTextConfig config;
  torch::Tensor forward(const torch::Tensor&, bool = false) const { throw std::runtime_error("CLIP not implemented"); }
  static std::shared_ptr<CLIPTextModel> load(const std::string&, const std::string&, std::optional<torch::ScalarType>, torch::Device) { throw std::runtime_error("CLIP not implemented"); }
};
}
