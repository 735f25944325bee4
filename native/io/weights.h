// Loading a model component's weights by name from a diffusers/transformers folder.
#pragma once
#include <torch/torch.h>

#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "io/json.h"
#include "io/safetensors.h"

namespace tl {

// The weights of one component folder (unet/, vae/, text_encoder/): a single safetensors file, a variant
// (`*.fp16.safetensors`), or shards listed in `*.safetensors.index.json`. Pickle files are refused.
class WeightSource {
 public:
  // `stem` is "diffusion_pytorch_model" or "model"; variant is "" or e.g. "fp16".
  static WeightSource open_component(const std::string& dir, const std::string& stem, const std::string& variant);
  static WeightSource open_file(const std::string& path);

  std::vector<std::string> keys() const;
  bool has(const std::string& key) const { return where_.count(key) > 0; }
  std::vector<int64_t> shape(const std::string& key) const;
  torch::Tensor get(const std::string& key, std::optional<torch::ScalarType> dtype, std::optional<torch::Device> device) const;
  std::string describe() const;  // the file(s), for messages

 private:
  std::vector<std::shared_ptr<st::File>> files_;
  std::map<std::string, size_t> where_;  // key -> index into files_
};

// Reads a config.json into Json; the message names the file when it is missing or malformed.
Json read_json_file(const std::string& path);

struct LoadOptions {
  std::optional<torch::ScalarType> dtype;                 // convert floating weights
  torch::Device device = torch::kCPU;
  std::function<std::string(const std::string&)> rename;  // maps a file key to a module name ("" = ignore)
};

// Copies every parameter of `m` from `src` by name. Missing keys, unexpected keys and shape mismatches are
// errors naming the full key path (and both shapes), listed all at once.
void load_module(torch::nn::Module& m, const WeightSource& src, const LoadOptions& opts, const std::string& component);

bool is_lora_param(const std::string& name);

}  // namespace tl
