// LoRA adapters on a model's Linear and Conv2d layers, and LoRA files in the formats people use:
//   peft      <prefix>.<module>.lora_A.weight / lora_B.weight            (+ alpha in metadata or adapter_config.json)
//   diffusers <prefix>.<module>.lora.down.weight / lora.up.weight        (+ alpha in `lora_adapter_metadata`; absent = r)
//   kohya     lora_unet_<module_with_underscores>.lora_down.weight / .lora_up.weight / .alpha
// Reading autodetects the format. <prefix> is "unet" or "text_encoder"; kohya's is "lora_unet" / "lora_te".
#pragma once
#include <torch/torch.h>

#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "models/nn.h"

namespace tl {

enum class LoraFormat { Peft, Diffusers, Kohya };
LoraFormat lora_format_from_name(const std::string& s);
std::string lora_format_name(LoraFormat f);

struct LoraTarget {
  std::string path;  // module path inside the model, e.g. down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q
  nn::LoraLayer* layer;  // an nn::Linear or nn::Conv2d
};

// peft's rule: a module matches a target when its name equals it or ends with "." + target.
bool lora_target_matches(const std::string& module_path, const std::vector<std::string>& targets);

// Linear and Conv2d modules of `model` whose path matches a target, in module order.
std::vector<LoraTarget> find_lora_targets(torch::nn::Module& model, const std::vector<std::string>& targets);

// Every Linear and Conv2d module path of `model` (what a LoRA file's kohya names map back to).
std::vector<std::string> lora_layer_paths(torch::nn::Module& model);

// Adds adapters to every matching module, as kohya's sd-scripts sizes them: Linear layers and 1x1 convolutions get
// `opts` (--rank / --lora-alpha), convolutions with a larger kernel get `conv_opts` (--conv-rank / --conv-alpha).
// Throws (ELORATARGET, naming the flags) when a target matches no Linear/Conv2d, when a kxk convolution is matched
// without conv_opts, or when conv_opts is given but no kxk convolution is matched. Returns the targets.
std::vector<LoraTarget> inject_lora(torch::nn::Module& model, const std::vector<std::string>& targets,
                                    const nn::LoraOptions& opts, torch::Device device,
                                    const std::optional<nn::LoraOptions>& conv_opts = std::nullopt);

// The adapters present in `model` (Linear/Conv2d modules that have LoRA), in module order.
std::vector<LoraTarget> lora_modules(torch::nn::Module& model);

// One component's adapter weights, independent of file format.
struct LoraWeights {
  struct Entry {
    torch::Tensor down;  // A [r, in] (conv: [r, in, k, k])
    torch::Tensor up;    // B [out, r] (conv: [out, r, 1, 1])
    std::optional<double> alpha;
  };
  std::map<std::string, Entry> modules;  // by module path
  std::optional<double> alpha;           // adapter-wide alpha (metadata); per-module alpha wins
  int64_t rank() const;
};

struct LoraFile {
  LoraFormat format;
  std::map<std::string, LoraWeights> components;  // "unet", "text_encoder"
  std::map<std::string, std::string> metadata;
  std::string file;          // the safetensors file read (inside the folder when a folder was given)
  std::string alpha_source;  // where the alpha came from, for messages ("adapter_config.json", ...)
};

// Reads a LoRA (any supported format): a .safetensors file, a PEFT adapter folder (adapter_config.json +
// adapter_model.safetensors), a train-lora checkpoint folder (model.safetensors + trainer_state.json) or a folder with
// pytorch_lora_weights.safetensors. `module_paths` per component lets kohya names (underscores) map back to module
// paths exactly; unknown names are an error that lists them.
//
// The one place that decides each module's alpha (its strength, scale = alpha / r), first found wins:
//   1. kohya `<module>.alpha` tensors;
//   2. diffusers' `lora_adapter_metadata` (`unet.lora_alpha`, `unet.use_rslora`, ...);
//   3. train-lora metadata: `lora_alpha` (checkpoints) or `train_lora.alpha` (exports);
//   4. adapter_config.json beside adapter_model.safetensors (`lora_alpha`, `use_rslora`);
//   5. trainer_state.json beside a checkpoint's model.safetensors (`config.lora_alpha`);
//   6. the format's own convention: diffusers and kohya files without alpha mean alpha = r;
//   7. `alpha_if_unknown` (the --lora-alpha flag); otherwise a PEFT-format file without any of the above is an error
//      (ELORAALPHA) that says its strength cannot be known and names the flag.
// use_rslora (scale alpha / sqrt(r)) and alpha_pattern entries (literal module paths, as peft and train-lora write them)
// are folded into each module's alpha; DoRA / other peft types and LyCORIS (LoHa, LoKr, OFT) or SDXL files are refused.
LoraFile read_lora_file(const std::string& path, const std::map<std::string, std::vector<std::string>>& module_paths,
                        std::optional<double> alpha_if_unknown = std::nullopt);

// The key of one LoRA matrix ("A"/"B") of a module in a format.
std::string lora_key(const std::string& component, const std::string& module_path, bool is_a, LoraFormat format);


// Applies weights to a model: adds adapters where missing (rank and alpha from the file) and copies A/B.
// Throws when a module path does not exist or a shape differs.
void apply_lora_weights(torch::nn::Module& model, const LoraWeights& w, torch::Device device, const std::string& what);

// read_lora_file for the loaded models of a pipeline ("unet", "text_encoder"; null = not loaded): a file without
// weights for them, or with weights for a model that is not loaded, is an error naming the file.
LoraFile read_lora_for(const std::string& file, const std::map<std::string, torch::nn::Module*>& models, std::optional<double> alpha_if_unknown);

// --init-lora-weights: starts a run's adapters (already injected into `models`, by component name: "unet",
// "text_encoder") from a LoRA file. Every adapter in the file must be one of the run's (else an error naming the
// flag that sets the targets); text-encoder weights need `text_encoder_trained` (never dropped silently). Each
// adapter keeps the alpha the run gave it (--lora-alpha, or --conv-alpha for 3x3 convs); a different alpha of the
// file is folded into B, so the adapter computes the file's function. A file that does not say its alpha is read
// at `alpha_if_unknown`. Returns the number of modules loaded.
size_t init_lora_from_file(const std::string& file, const std::map<std::string, torch::nn::Module*>& models, double alpha_if_unknown,
                           bool text_encoder_trained, torch::Device device);

}  // namespace tl
