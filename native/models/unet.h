// diffusers' UNet2DConditionModel (SD 1.x / 2.x family), built from unet/config.json. Parameter names equal
// diffusers' weight names (down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight, ...).
#pragma once
#include <torch/torch.h>

#include <functional>

#include <optional>
#include <string>
#include <vector>

#include "io/json.h"
#include "models/blocks.h"
#include "models/nn.h"
#include "io/weights.h"

namespace tl {

struct UNet2DConditionConfig {
  int64_t in_channels = 4, out_channels = 4, sample_size = 64;
  bool center_input_sample = false;
  bool flip_sin_to_cos = true;
  double freq_shift = 0;
  std::vector<std::string> down_block_types, up_block_types;
  std::vector<int64_t> block_out_channels;
  std::vector<int64_t> layers_per_block;        // per down block (an int in config.json is broadcast)
  std::vector<int64_t> transformer_layers_per_block;
  int64_t downsample_padding = 1;
  double mid_block_scale_factor = 1;
  int64_t norm_num_groups = 32;
  double norm_eps = 1e-5;
  std::vector<int64_t> cross_attention_dim;      // per down block
  std::vector<int64_t> num_attention_heads;      // per down block (attention_head_dim when num_attention_heads is null)
  std::vector<bool> only_cross_attention;
  bool use_linear_projection = false;
  bool upcast_attention = false;
  int64_t conv_in_kernel = 3, conv_out_kernel = 3;
  double resnet_out_scale_factor = 1.0;
  bool has_mid_block = true;

  static UNet2DConditionConfig from_json(const Json& j, const std::string& path);
};

struct BasicTransformerBlock : torch::nn::Module {
  std::shared_ptr<nn::LayerNorm> norm1, norm2, norm3;
  std::shared_ptr<nn::Attention> attn1, attn2;
  std::shared_ptr<nn::Linear> ff_proj, ff_out;  // ff.net.0.proj (GEGLU), ff.net.2
  bool only_cross_attention;
  BasicTransformerBlock(int64_t dim, int64_t heads, int64_t head_dim, int64_t cross_dim, bool only_cross);
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& context) const;
};

struct Transformer2DModel : torch::nn::Module {
  std::shared_ptr<nn::GroupNorm> norm;
  std::shared_ptr<nn::Conv2d> proj_in_conv, proj_out_conv;
  std::shared_ptr<nn::Linear> proj_in_linear, proj_out_linear;
  nn::Children<BasicTransformerBlock> transformer_blocks;
  bool use_linear_projection;
  Transformer2DModel(int64_t channels, int64_t heads, int64_t layers, int64_t cross_dim, int64_t groups, bool linear, bool only_cross);
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& context, bool checkpointing) const;
};

struct UNetBlock : torch::nn::Module {  // Down/Up blocks with or without cross-attention, and the mid block
  nn::Children<ResnetBlock2D> resnets;
  nn::Children<Transformer2DModel> attentions;
  nn::Children<Sampler2D> samplers;  // "downsamplers" or "upsamplers"
};

struct UNet2DConditionModel : torch::nn::Module {
  UNet2DConditionConfig config;
  std::shared_ptr<nn::Conv2d> conv_in, conv_out;
  std::shared_ptr<nn::Linear> time_linear_1, time_linear_2;  // time_embedding.linear_1/2
  nn::Children<UNetBlock> down_blocks, up_blocks;
  std::shared_ptr<UNetBlock> mid_block;
  std::shared_ptr<nn::GroupNorm> conv_norm_out;
  bool gradient_checkpointing = false;

  explicit UNet2DConditionModel(const UNet2DConditionConfig& cfg);
  // sample [B,C,h,w]; timesteps int/float [B] or scalar; encoder_hidden_states [B,T,D] -> noise prediction.
  torch::Tensor forward(const torch::Tensor& sample, const torch::Tensor& timesteps, const torch::Tensor& encoder_hidden_states) const;

  // Its folder (unet/): config.json + diffusion_pytorch_model[.variant].safetensors (or shards).
  using Config = UNet2DConditionConfig;
  static constexpr const char* kWeightsStem = "diffusion_pytorch_model";
  // From a config and a weight source whose keys `rename` maps to diffusers names ("" = not this model's key; a
  // single-file checkpoint's names are mapped this way, single_file.cpp).
  static std::shared_ptr<UNet2DConditionModel> load_from(const UNet2DConditionConfig& cfg, const WeightSource& src,
                                                         const std::function<std::string(const std::string&)>& rename,
                                                         std::optional<torch::ScalarType> dtype, torch::Device device);
};

// diffusers' get_timestep_embedding.
torch::Tensor timestep_embedding(const torch::Tensor& timesteps, int64_t dim, bool flip_sin_to_cos, double freq_shift);

}  // namespace tl
