// A Stable Diffusion model folder (diffusers layout) loaded on one device, and the `forward` parity tool.
#pragma once
#include <torch/torch.h>

#include <memory>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "io/safetensors.h"
#include "lora/lora.h"
#include "models/clip_text.h"
#include "models/unet.h"
#include "models/vae.h"

namespace tl {

struct Pipeline {
  std::string dir;
  torch::Device device = torch::kCPU;
  std::optional<torch::ScalarType> dtype;  // of the frozen weights; LoRA stays fp32
  std::shared_ptr<CLIPTextModel> text_encoder;
  std::shared_ptr<UNet2DConditionModel> unet;
  std::shared_ptr<AutoencoderKL> vae;
};

struct PipelineOptions {
  std::set<std::string> components{"text_encoder", "unet", "vae"};
  std::string variant;
  std::optional<torch::ScalarType> dtype;
  torch::Device device = torch::kCPU;
};

// `dir` is a diffusers folder, or a single-file SD 1.x checkpoint in the original layout (single_file.h).
std::shared_ptr<Pipeline> load_pipeline(const std::string& dir, const PipelineOptions& opts);

// The configs inferred from a single-file checkpoint: {"unet": {...}, "vae": {...}, "text_encoder": {...}} (JSON text).
std::string single_file_configs_json(const std::string& file);

// The modules LoRA adapts, by component: {"unet", "text_encoder"} (either may be null when not loaded).
std::map<std::string, torch::nn::Module*> lora_models(Pipeline& p);

// Applies a LoRA file (diffusers, peft or kohya keys, detected) to the pipeline's UNet and text encoder at `scale`
// (peft's adapter scale). Returns the number of adapted modules; `format` receives the file's format.
// `file` may be a folder (see read_lora_file); `alpha_if_unknown` is --lora-alpha, used only when the LoRA does not say.
size_t pipeline_apply_lora(Pipeline& p, const std::string& file, double scale, LoraFormat* format = nullptr,
                           std::optional<double> alpha_if_unknown = std::nullopt);

// A component ("unet" | "vae" | "text_encoder") built from <dir>/config.json, without loading weights.
std::shared_ptr<torch::nn::Module> build_component(const std::string& dir, const std::string& kind);

// Seeded random weights for a component folder that has a config.json (make-tiny-model): writes
// diffusion_pytorch_model.safetensors / model.safetensors, with the names real checkpoints use.
void write_random_weights(const std::string& dir, const std::string& kind, uint64_t seed);

struct ForwardOptions {
  std::string lora_path;  // applied to the UNet (and the text encoder when the file has text_encoder keys)
  double lora_scale = 1.0;
  std::optional<double> lora_alpha;  // --lora-alpha: the alpha of a LoRA file that does not say (see read_lora_file)
  bool backward = false;
  bool gradient_checkpointing = false;  // backward through checkpointed blocks (must give the same gradients)
};

// The parity tool: each component runs when its inputs are present (see `train-lora forward --help`).
NamedTensors run_forward(Pipeline& p, const NamedTensors& inputs, const ForwardOptions& opts);

}  // namespace tl
