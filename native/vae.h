// TEMPORARY stub until the VAE implementation lands.
#pragma once
#include <torch/torch.h>
#include "json.h"
namespace tl {
struct AutoencoderKLConfig { double scaling_factor = 0.18215; };
struct AutoencoderKL : torch::nn::Module {
  AutoencoderKLConfig config;
  struct Posterior { torch::Tensor mean, logvar, std; };
  Posterior encode(const torch::Tensor&) const { throw std::runtime_error("VAE not implemented"); }
  torch::Tensor decode(const torch::Tensor&) const { throw std::runtime_error("VAE not implemented"); }
  static std::shared_ptr<AutoencoderKL> load(const std::string&, const std::string&, std::optional<torch::ScalarType>, torch::Device) { throw std::runtime_error("VAE not implemented"); }
};
}
