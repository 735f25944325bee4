// Exporting trained adapters: LoRA files in the formats other tools load (diffusers, peft, kohya), and merged
// model components (W + alpha/r * B @ A folded into the base weights). The adapters come either from live modules
// (a Trainer's or Pipeline's UNet / text encoder, pipeline.h's lora_models) or from a checkpoint's model.safetensors (peft keys).
#pragma once
#include <torch/torch.h>

#include <map>
#include <optional>
#include <string>
#include <vector>

#include "lora/lora.h"

namespace tl {

// Adapters by component ("unet", "text_encoder"); every module carries its own alpha.
using LoraSet = std::map<std::string, LoraWeights>;

// The adapters present in these modules, by component ("unet", "text_encoder"; a null module is skipped), alpha
// already multiplied by a non-1 inference multiplier, so the file computes what the modules compute. Tensors are
// detached CPU copies.
LoraSet lora_set_from_modules(const std::map<std::string, torch::nn::Module*>& models);

// A checkpoint's model.safetensors (keys "unet.<module>.lora_A.weight" / "text_encoder.<module>...") with the
// run's alpha (`conv_alpha` for 3x3 conv adapters, --conv-alpha). Throws UserError ECKPTLORA when the file holds no
// LoRA keys (a full-training checkpoint).
LoraSet lora_set_from_checkpoint(const std::string& model_file, double alpha, std::optional<double> conv_alpha = std::nullopt);

// Tensor names and tensors of the set in a format, sorted by name (the order Python's safetensors writes, so the
// data section, and kohya's hash of it, is the same as sd-scripts would produce). `prefix` replaces the component
// name of peft/diffusers keys ("" keeps it; "base_model.model" for a peft adapter folder). Only `components`
// (all when empty) are included. Text-encoder keys in the diffusers format are diffusers' text-encoder spelling
// (`.lora_linear_layer.down.weight`); kohya keys are `lora_unet_...` / `lora_te_...` with an `.alpha` scalar.
std::vector<std::pair<std::string, torch::Tensor>> lora_set_tensors(const LoraSet& set, LoraFormat format,
                                                                    const std::vector<std::string>& components,
                                                                    const std::string& prefix);

struct MergeStats {
  std::string file;      // the written safetensors file
  int64_t merged = 0;    // weights that got an adapter folded in
  int64_t tensors = 0;   // tensors written
  std::string dtype;     // safetensors dtype of the merged weights (the base file's)
};

// Reads the base component folder's weights (any layout WeightSource accepts: single file, variant, shards) and
// writes <out_dir>/<diffusion_pytorch_model|model>.safetensors with every tensor as stored, except the weights of
// adapted Linear modules, which become W + (alpha/r) * B @ A computed in fp32 and stored in the base dtype.
// Throws when an adapter names a module the base file does not have, or the shapes differ.
// `base_dir` may also be a single-file SD 1.x checkpoint (single_file.h): then `kind` ("unet", "vae", "text_encoder")
// selects that component's tensors, written under their diffusers names (a component without adapters is only
// converted: `w` may be empty).
MergeStats merge_lora_component(const LoraWeights& w, const std::string& kind, const std::string& base_dir,
                                const std::string& variant, const std::string& out_dir);

}  // namespace tl
