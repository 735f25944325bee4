// diffusers' AutoencoderKL (the Stable Diffusion VAE), numerically matching diffusers with AttnProcessor2_0:
// Encoder (conv_in, DownEncoderBlock2D/AttnDownEncoderBlock2D blocks, UNetMidBlock2D, GroupNorm+SiLU+conv_out),
// quant_conv, the diagonal Gaussian posterior; post_quant_conv, Decoder (conv_in, mid block, UpDecoderBlock2D/
// AttnUpDecoderBlock2D blocks, GroupNorm+SiLU+conv_out). Parameters carry diffusers' names
// (`encoder.mid_block.attentions.0.to_q.weight`, `decoder.up_blocks.0.resnets.2.conv_shortcut.weight`, ...).
#pragma once
#include <torch/torch.h>

#include <functional>

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "io/json.h"
#include "models/blocks.h"
#include "models/nn.h"
#include "io/weights.h"

namespace tl {

struct AutoencoderKLConfig {
  // Defaults are diffusers' AutoencoderKL.__init__ defaults (used for keys a config.json lacks or sets to null).
  int64_t in_channels = 3;
  int64_t out_channels = 3;
  int64_t latent_channels = 4;
  std::vector<int64_t> block_out_channels{64};
  int64_t layers_per_block = 1;
  int64_t norm_num_groups = 32;
  Activation act_fn = Activation::SiLU;  // resnet non-linearity: silu | swish | mish | gelu | relu (case-insensitive)
  int64_t sample_size = 32;     // first entry when the file has a list
  double scaling_factor = 0.18215;
  std::optional<double> shift_factor;
  std::optional<std::vector<double>> latents_mean, latents_std;
  bool force_upcast = true;
  bool use_quant_conv = true;
  bool use_post_quant_conv = true;
  bool mid_block_add_attention = true;
  std::vector<std::string> down_block_types{"DownEncoderBlock2D"};  // | AttnDownEncoderBlock2D
  std::vector<std::string> up_block_types{"UpDecoderBlock2D"};      // | AttnUpDecoderBlock2D

  // Ignores unknown keys, fills missing/null keys with the defaults, and throws UserError("EBADCONFIG") naming
  // `path`, the key and the accepted values for anything unsupported.
  static AutoencoderKLConfig from_json(const Json& j, const std::string& path);
};

// Building blocks (own namespace: the UNet has blocks with the same generic names).
namespace vae {

// ResnetBlock2D (without a time embedding) and Sampler2D (Downsample2D with padding 0, Upsample2D) are blocks.h's.

// DownEncoderBlock2D / AttnDownEncoderBlock2D / UpDecoderBlock2D / AttnUpDecoderBlock2D: resnets (each followed
// by an attention in the Attn forms), then downsamplers.0 or upsamplers.0.
struct SampleBlock : torch::nn::Module {
  nn::Children<ResnetBlock2D> resnets;
  nn::Children<nn::Attention> attentions;  // empty unless an Attn* block
  nn::Children<Sampler2D> downsamplers;
  nn::Children<Sampler2D> upsamplers;
  SampleBlock(int64_t in, int64_t out, int64_t num_layers, bool attention, bool down, bool up, int64_t groups, Activation act);
  torch::Tensor forward(const torch::Tensor& x) const;
};

struct MidBlock2D : torch::nn::Module {  // UNetMidBlock2D: resnet, (attention, resnet)
  nn::Children<ResnetBlock2D> resnets;
  nn::Children<nn::Attention> attentions;  // empty when mid_block_add_attention is false
  MidBlock2D(int64_t channels, int64_t groups, Activation act, bool add_attention);
  torch::Tensor forward(const torch::Tensor& x) const;
};

struct Encoder : torch::nn::Module {
  std::shared_ptr<nn::Conv2d> conv_in, conv_out;
  nn::Children<SampleBlock> down_blocks;
  std::shared_ptr<MidBlock2D> mid_block;
  std::shared_ptr<nn::GroupNorm> conv_norm_out;
  explicit Encoder(const AutoencoderKLConfig& cfg);
  torch::Tensor forward(const torch::Tensor& x) const;  // [B, 2 * latent_channels, h, w]
};

struct Decoder : torch::nn::Module {
  std::shared_ptr<nn::Conv2d> conv_in, conv_out;
  std::shared_ptr<MidBlock2D> mid_block;
  nn::Children<SampleBlock> up_blocks;
  std::shared_ptr<nn::GroupNorm> conv_norm_out;
  explicit Decoder(const AutoencoderKLConfig& cfg);
  torch::Tensor forward(const torch::Tensor& z) const;
};

}  // namespace vae

struct AutoencoderKL : torch::nn::Module {
  explicit AutoencoderKL(const AutoencoderKLConfig& cfg);
  AutoencoderKLConfig config;
  std::shared_ptr<vae::Encoder> encoder;
  std::shared_ptr<vae::Decoder> decoder;
  std::shared_ptr<nn::Conv2d> quant_conv, post_quant_conv;  // absent when use_quant_conv / use_post_quant_conv is false

  // DiagonalGaussianDistribution: logvar clamped to [-30, 20], std = exp(0.5 * logvar).
  struct Posterior {
    torch::Tensor mean, logvar, std;
  };
  // image: [B, in_channels, H, W] in [-1, 1] (converted to the weights' dtype/device). The latents are
  // mean + std * noise, times scaling_factor (the caller does both).
  Posterior encode(const torch::Tensor& image) const;
  // z: [B, latent_channels, h, w], already divided by scaling_factor -> [B, out_channels, H, W].
  torch::Tensor decode(const torch::Tensor& z) const;

  // Its folder (vae/): config.json + diffusion_pytorch_model.safetensors (or a variant, or shards).
  using Config = AutoencoderKLConfig;
  static constexpr const char* kWeightsStem = "diffusion_pytorch_model";
  // From a config and a weight source whose keys `rename` maps to diffusers names ("" = not the VAE's). Accepts the
  // old attention names query/key/value/proj_attn (and 1x1-conv-shaped [C, C, 1, 1] weights).
  static std::shared_ptr<AutoencoderKL> load_from(const AutoencoderKLConfig& cfg, const WeightSource& src,
                                                  const std::function<std::string(const std::string&)>& rename,
                                                  std::optional<torch::ScalarType> dtype, torch::Device device);
};

}  // namespace tl
