// transformers' CLIPTextModel (the Stable Diffusion text encoder), numerically matching transformers 5.x with
// SDPA attention: token + position embeddings, pre-LN encoder layers with causal self-attention, final LayerNorm.
// Parameters are registered under the names of real checkpoints, with the `text_model.` prefix
// (`text_model.encoder.layers.3.mlp.fc1.weight`); load_from() also accepts files without it (transformers 5 writes
// CLIPTextModel without the prefix).
#pragma once
#include <torch/torch.h>

#include <functional>

#include <memory>
#include <optional>
#include <string>

#include "models/blocks.h"
#include "io/json.h"
#include "models/nn.h"
#include "io/weights.h"

namespace tl {

struct CLIPTextConfig {
  // Defaults are transformers' CLIPTextConfig defaults (used for keys a config.json lacks).
  int64_t vocab_size = 49408;
  int64_t hidden_size = 512;
  int64_t intermediate_size = 2048;
  int64_t num_hidden_layers = 12;
  int64_t num_attention_heads = 8;
  int64_t max_position_embeddings = 77;
  double layer_norm_eps = 1e-5;
  double attention_dropout = 0.0;  // applied only in training mode, as transformers does
  // transformers' ACT2FN names (kTransformersActivations): quick_gelu | gelu | gelu_new | gelu_pytorch_tanh | relu | silu ...
  Activation hidden_act = Activation::QuickGELU;

  // Ignores unknown keys, fills missing (or null) keys with the defaults, and throws UserError("EBADCONFIG")
  // naming `path`, the key and the accepted values for anything unsupported. A full CLIPModel config (with a
  // "text_config" object) is accepted too: its text_config is used.
  static CLIPTextConfig from_json(const Json& j, const std::string& path);
};

// Building blocks (own namespace: the UNet and VAE have blocks with generic names of their own).
namespace clip {

struct CLIPAttention : torch::nn::Module {
  int64_t heads;
  double dropout;
  std::shared_ptr<nn::Linear> k_proj, v_proj, q_proj, out_proj;
  explicit CLIPAttention(const CLIPTextConfig& cfg);
  torch::Tensor forward(const torch::Tensor& x) const;  // causal self-attention, [B, T, C]
};

struct CLIPMLP : torch::nn::Module {
  Activation act;
  std::shared_ptr<nn::Linear> fc1, fc2;
  explicit CLIPMLP(const CLIPTextConfig& cfg);
  torch::Tensor forward(const torch::Tensor& x) const;
};

struct CLIPEncoderLayer : torch::nn::Module {
  std::shared_ptr<CLIPAttention> self_attn;
  std::shared_ptr<nn::LayerNorm> layer_norm1;
  std::shared_ptr<CLIPMLP> mlp;
  std::shared_ptr<nn::LayerNorm> layer_norm2;
  explicit CLIPEncoderLayer(const CLIPTextConfig& cfg);
  torch::Tensor forward(const torch::Tensor& x) const;
};

struct CLIPEncoder : torch::nn::Module {
  nn::Children<CLIPEncoderLayer> layers;
  explicit CLIPEncoder(const CLIPTextConfig& cfg);
};

struct CLIPTextEmbeddings : torch::nn::Module {
  std::shared_ptr<nn::Embedding> token_embedding, position_embedding;
  explicit CLIPTextEmbeddings(const CLIPTextConfig& cfg);
};

// The `text_model` child: embeddings, encoder, final_layer_norm.
struct CLIPTextTransformer : torch::nn::Module {
  std::shared_ptr<CLIPTextEmbeddings> embeddings;
  std::shared_ptr<CLIPEncoder> encoder;
  std::shared_ptr<nn::LayerNorm> final_layer_norm;
  explicit CLIPTextTransformer(const CLIPTextConfig& cfg);
};

}  // namespace clip

struct CLIPTextModel : torch::nn::Module {
  explicit CLIPTextModel(const CLIPTextConfig& cfg);
  CLIPTextConfig config;
  std::shared_ptr<clip::CLIPTextTransformer> text_model;

  // input_ids: integer [B, T] (T <= max_position_embeddings) -> last_hidden_state [B, T, hidden_size], in the
  // weights' dtype, on the weights' device. No padding mask (Stable Diffusion pipelines pass none).
  // gradient_checkpointing: each encoder layer is recomputed in backward (only when grad mode is on).
  torch::Tensor forward(const torch::Tensor& input_ids, bool gradient_checkpointing = false) const;

  // Its folder (text_encoder/): config.json + model.safetensors (or model.<variant>.safetensors, or shards).
  using Config = CLIPTextConfig;
  static constexpr const char* kWeightsStem = "model";
  // From a config and a weight source whose keys `rename` maps to this folder layout's names ("" = not the text
  // encoder's; the text_model. prefix is added when missing). Floating weights are converted to dtype when given,
  // and placed on device.
  static std::shared_ptr<CLIPTextModel> load_from(const CLIPTextConfig& cfg, const WeightSource& src,
                                                  const std::function<std::string(const std::string&)>& rename,
                                                  std::optional<torch::ScalarType> dtype, torch::Device device);
};

}  // namespace tl
