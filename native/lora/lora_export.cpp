#include "lora/lora_export.h"

#include <algorithm>
#include <set>

#include "runtime/engine.h"
#include "io/safetensors.h"
#include "io/single_file.h"
#include "io/weights.h"

namespace tl {
namespace {

std::string underscored(const std::string& path) {
  std::string s = path;
  std::replace(s.begin(), s.end(), '.', '_');
  return s;
}

bool starts_with(const std::string& s, const std::string& pre) { return s.rfind(pre, 0) == 0; }

double module_alpha(const LoraWeights& w, const LoraWeights::Entry& e) {
  return e.alpha ? *e.alpha : (w.alpha ? *w.alpha : static_cast<double>(e.down.size(0)));
}

void add_modules(LoraSet& set, const std::string& component, torch::nn::Module* m) {
  if (!m) return;
  auto mods = lora_modules(*m);
  if (mods.empty()) return;
  auto& w = set[component];
  for (const auto& t : mods) {
    auto& e = w.modules[t.path];
    e.down = t.layer->lora_A.detach().to(torch::kCPU, torch::kFloat32, false, true);
    e.up = t.layer->lora_B.detach().to(torch::kCPU, torch::kFloat32, false, true);
    e.alpha = t.layer->lora.alpha * t.layer->lora_multiplier;
  }
}

}  // namespace

LoraSet lora_set_from_modules(const std::map<std::string, torch::nn::Module*>& models) {
  LoraSet set;
  for (const auto& [component, m] : models) add_modules(set, component, m);
  if (set.empty()) throw UserError("ENOLORA", "the model has no LoRA adapters to export");
  return set;
}

LoraSet lora_set_from_checkpoint(const std::string& model_file, double alpha, std::optional<double> conv_alpha) {
  const st::Header h = st::read_header(model_file);
  bool any_lora = false;
  for (const auto& t : h.tensors) any_lora = any_lora || t.name.find(".lora_A.weight") != std::string::npos;
  if (!any_lora)
    throw UserError("ECKPTLORA", model_file + ": holds no LoRA weights (keys like unet.<module>.lora_A.weight); is it a --train-mode full checkpoint? "
                                              "Its model.safetensors is already a full UNet state dict: use it as unet/diffusion_pytorch_model.safetensors");
  LoraFile f = read_lora_file(model_file, {}, alpha);
  if (f.format != LoraFormat::Peft) throw UserError("ECKPTLORA", model_file + ": expected peft keys (unet.<module>.lora_A.weight)");
  for (auto& [_, w] : f.components) {
    w.alpha = alpha;
    for (auto& [mpath, e] : w.modules) {
      const bool spatial_conv = e.down.dim() == 4 && e.down.size(2) > 1;
      if (spatial_conv && !conv_alpha)
        throw UserError("ECKPTLORA", model_file + ": module " + mpath + " is a 3x3 conv adapter but the run's --conv-alpha is not known");
      e.alpha = spatial_conv ? *conv_alpha : alpha;
    }
  }
  return f.components;
}

std::vector<std::pair<std::string, torch::Tensor>> lora_set_tensors(const LoraSet& set, LoraFormat format,
                                                                    const std::vector<std::string>& components,
                                                                    const std::string& prefix) {
  std::vector<std::pair<std::string, torch::Tensor>> out;
  for (const auto& [comp, w] : set) {
    if (!components.empty() && std::find(components.begin(), components.end(), comp) == components.end()) continue;
    const std::string pre = prefix.empty() ? comp : prefix;
    for (const auto& [full_path, e] : w.modules) {
      // A peft adapter folder of the text encoder holds the keys of transformers 5's CLIPTextModel, which has no
      // "text_model." level (PeftModel.from_pretrained(CLIPTextModel...) loads nothing from keys that have it).
      const std::string path = format == LoraFormat::Peft && comp == "text_encoder" && prefix == "base_model.model" && starts_with(full_path, "text_model.")
                                   ? full_path.substr(11) : full_path;
      const torch::Tensor a = e.down.contiguous(), b = e.up.contiguous();
      switch (format) {
        case LoraFormat::Peft:
          out.emplace_back(pre + "." + path + ".lora_A.weight", a);
          out.emplace_back(pre + "." + path + ".lora_B.weight", b);
          break;
        case LoraFormat::Diffusers: {
          // What diffusers' training scripts save: convert_state_dict_to_diffusers(get_peft_model_state_dict(m)).
          const char* mid = comp == "text_encoder" ? ".lora_linear_layer." : ".lora.";
          out.emplace_back(pre + "." + path + mid + "down.weight", a);
          out.emplace_back(pre + "." + path + mid + "up.weight", b);
          break;
        }
        case LoraFormat::Kohya: {
          const std::string k = (comp == "unet" ? "lora_unet_" : "lora_te_") + underscored(path);
          out.emplace_back(k + ".lora_down.weight", a);
          out.emplace_back(k + ".lora_up.weight", b);
          out.emplace_back(k + ".alpha", torch::tensor(static_cast<float>(module_alpha(w, e))));
          break;
        }
      }
    }
  }
  std::sort(out.begin(), out.end(), [](const auto& x, const auto& y) { return x.first < y.first; });
  return out;
}

MergeStats merge_lora_component(const LoraWeights& w, const std::string& kind, const std::string& base_dir,
                                const std::string& variant, const std::string& out_dir) {
  const std::string stem = kind == "text_encoder" ? "model" : "diffusion_pytorch_model";
  // A single-file base checkpoint: this component's tensors under their diffusers names (the file's LDM names mapped as
  // when loading; the VAE's 1x1-conv attention weights as the Linear weights diffusers stores).
  const bool single = is_single_file_checkpoint(base_dir);
  if (single && !variant.empty()) throw UserError("EINPUT", base_dir + ": --variant selects a file inside a model folder; a single file has none");
  WeightSource src = single ? WeightSource::open_file(base_dir) : WeightSource::open_component(base_dir, stem, variant);
  KeyMap name_of = [](const std::string& k) { return k; };
  if (single) {
    SingleFileModel sf = describe_single_file(src);
    name_of = kind == "unet" ? sf.unet_key : kind == "vae" ? sf.vae_key : sf.text_encoder_key;
  }
  // File key -> module path. The text encoder's file may lack the "text_model." level (transformers 5 layout).
  auto module_of = [&](const std::string& key) -> std::string {
    static const std::string suffix = ".weight";
    if (key.size() <= suffix.size() || key.compare(key.size() - suffix.size(), suffix.size(), suffix) != 0) return "";
    std::string path = key.substr(0, key.size() - suffix.size());
    if (w.modules.count(path)) return path;
    if (kind == "text_encoder" && !starts_with(path, "text_model.") && w.modules.count("text_model." + path)) return "text_model." + path;
    return "";
  };
  MergeStats stats;
  std::set<std::string> done;
  NamedTensors out;
  torch::NoGradGuard ng;
  for (const auto& file_key : src.keys()) {
    const std::string key = name_of(file_key);
    if (key.empty()) continue;  // another component's tensor (single file)
    torch::Tensor t = src.get(file_key, std::nullopt, torch::Device(torch::kCPU));
    if (single && kind == "vae" && key.find(".attentions.") != std::string::npos && t.dim() == 4 && t.size(2) == 1 && t.size(3) == 1)
      t = t.reshape({t.size(0), t.size(1)});
    const std::string path = module_of(key);
    if (!path.empty()) {
      const auto& e = w.modules.at(path);
      // The weight the adapter's update has: [out, in] (Linear) or [out, in, k, k] (conv: A [r, in, k, k], B [out, r, 1, 1]).
      std::vector<int64_t> want{e.up.size(0), e.down.size(1)};
      if (e.down.dim() == 4) want.insert(want.end(), {e.down.size(2), e.down.size(3)});
      if (t.sizes() != c10::IntArrayRef(want))
        throw UserError("ELORASHAPE", src.describe() + ": " + key + " is " + c10::str(t.sizes()) + " but the LoRA for it is " +
                                          c10::str(c10::IntArrayRef(want)) + ": the LoRA was trained on another base model");
      const double scale = module_alpha(w, e) / static_cast<double>(e.down.size(0));
      torch::Tensor merged = t.to(torch::kFloat32) + nn::lora_delta(e.up, e.down, scale);
      t = merged.to(t.scalar_type());
      stats.dtype = st::dtype_name(t.scalar_type());
      done.insert(path);
      ++stats.merged;
    }
    out.emplace_back(key, t);
  }
  std::vector<std::string> missing;
  for (const auto& [path, _] : w.modules)
    if (!done.count(path)) missing.push_back(path);
  if (!missing.empty())
    throw UserError("ELORAKEYS", src.describe() + ": has no weight for " + std::to_string(missing.size()) + " LoRA module(s), e.g. \"" + missing[0] +
                                     "\": the LoRA was trained on another base model");
  stats.tensors = static_cast<int64_t>(out.size());
  stats.file = out_dir + "/" + stem + ".safetensors";
  st::save(stats.file, out, {{"format", "pt"}});
  return stats;
}

}  // namespace tl
