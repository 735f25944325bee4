// Building blocks shared by the UNet and the VAE (diffusers' models/resnet.py, models/downsampling.py,
// models/upsampling.py): module names equal diffusers' weight names, so both models load by a straight map.
#pragma once
#include <torch/torch.h>

#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "models/nn.h"

namespace tl {

// Every non-linearity a supported config names. The two name tables are the libraries' own spellings:
// diffusers.models.activations.get_activation (UNet/VAE act_fn, compared lower-cased) and transformers' ACT2FN
// (CLIP hidden_act), each computed as that library computes it.
enum class Activation { SiLU, Mish, GELU, GELUTanh, GELUNew, GELUFast, QuickGELU, ReLU };
extern const std::vector<std::pair<std::string, Activation>> kActivations;              // diffusers' names
extern const std::vector<std::pair<std::string, Activation>> kTransformersActivations;  // transformers' names
torch::Tensor activate(Activation act, const torch::Tensor& x);

// ResnetBlock2D: norm1 -> act -> conv1 (+ time_emb_proj(act(temb)) when the block has a time embedding, as in the
// UNet; the VAE's blocks have none) -> norm2 -> act -> conv2, plus the (1x1 conv_shortcut when in != out) input,
// divided by output_scale_factor. Dropout is 0 in both models.
struct ResnetBlock2D : torch::nn::Module {
  std::shared_ptr<nn::GroupNorm> norm1, norm2;
  std::shared_ptr<nn::Conv2d> conv1, conv2, conv_shortcut;
  std::shared_ptr<nn::Linear> time_emb_proj;  // absent when temb_channels is 0
  Activation act;
  double output_scale_factor;
  ResnetBlock2D(int64_t in, int64_t out, int64_t temb_channels, int64_t groups, double eps, Activation act = Activation::SiLU,
                double output_scale_factor = 1.0);
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& temb = torch::Tensor()) const;
};

// Downsample2D (a 3x3 stride-2 conv; padding 0 means diffusers' F.pad (0, 1, 0, 1) first) or Upsample2D (nearest x2,
// or to `size` when the UNet's skip connection needs it, then a 3x3 conv): "downsamplers.0" / "upsamplers.0".
struct Sampler2D : torch::nn::Module {
  std::shared_ptr<nn::Conv2d> conv;
  bool down;
  int64_t padding;
  Sampler2D(int64_t channels, bool down, int64_t padding);
  torch::Tensor forward(const torch::Tensor& x, std::optional<std::vector<int64_t>> size = std::nullopt) const;
};

}  // namespace tl
