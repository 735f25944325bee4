#include "lora/lora.h"

#include <sys/stat.h>

#include <cmath>
#include <cstdlib>
#include <set>

#include "runtime/engine.h"
#include "io/json.h"
#include "io/safetensors.h"
#include "io/weights.h"

namespace tl {
namespace {

bool ends_with(const std::string& s, const std::string& suf) {
  return s.size() >= suf.size() && s.compare(s.size() - suf.size(), suf.size(), suf) == 0;
}
bool starts_with(const std::string& s, const std::string& pre) { return s.rfind(pre, 0) == 0; }

std::string kohya_prefix(const std::string& component) { return component == "unet" ? "lora_unet" : "lora_te"; }

std::string underscored(const std::string& path) {
  std::string s = path;
  for (auto& c : s)
    if (c == '.') c = '_';
  return s;
}

bool is_file(const std::string& p) {
  struct stat sb;
  return ::stat(p.c_str(), &sb) == 0 && S_ISREG(sb.st_mode);
}
bool is_directory(const std::string& p) {
  struct stat sb;
  return ::stat(p.c_str(), &sb) == 0 && S_ISDIR(sb.st_mode);
}
std::string dir_of(const std::string& p) {
  auto s = p.find_last_of('/');
  return s == std::string::npos ? "." : (s == 0 ? "/" : p.substr(0, s));
}
std::string base_of(const std::string& p) {
  auto s = p.find_last_of('/');
  return s == std::string::npos ? p : p.substr(s + 1);
}

// Where a LoRA's weights and its rank/alpha live: the safetensors file, and the PEFT adapter_config.json or
// train-lora trainer_state.json that describes it ("" when none).
struct LoraLocation {
  std::string file, adapter_config, trainer_state;
};

LoraLocation locate_lora(const std::string& p) {
  LoraLocation loc;
  std::string dir;
  if (is_directory(p)) {
    dir = p;
    while (dir.size() > 1 && dir.back() == '/') dir.pop_back();
    for (const char* name : {"adapter_model.safetensors", "model.safetensors", "pytorch_lora_weights.safetensors"})
      if (is_file(dir + "/" + name)) {
        loc.file = dir + "/" + name;
        break;
      }
    if (loc.file.empty()) {
      for (const char* name : {"adapter_model.bin", "pytorch_lora_weights.bin"})
        if (is_file(dir + "/" + name))
          throw UserError("EPICKLE", dir + "/" + name + ": pickle files are never loaded (they can run arbitrary code); convert it "
                                                        "to safetensors first, e.g. PeftModel.from_pretrained(...).save_pretrained(dir, safe_serialization=True)");
      throw UserError("ENOENT", p + ": a folder without a LoRA: expected a PEFT adapter folder (adapter_config.json + "
                                    "adapter_model.safetensors), a train-lora checkpoint folder (model.safetensors + trainer_state.json) "
                                    "or a folder with pytorch_lora_weights.safetensors");
    }
  } else {
    loc.file = p;
    dir = dir_of(p);
  }
  const std::string base = base_of(loc.file);
  if (base == "adapter_model.safetensors" && is_file(dir + "/adapter_config.json")) loc.adapter_config = dir + "/adapter_config.json";
  if (base == "model.safetensors" && is_file(dir + "/trainer_state.json")) loc.trainer_state = dir + "/trainer_state.json";
  return loc;
}

// A component's adapter-wide alpha as one source gives it.
struct Strength {
  std::optional<double> alpha;
  bool rslora = false;
  std::string source;
  std::map<std::string, double> alpha_pattern;  // peft's per-module alpha: module path (or its last parts) -> alpha
  std::optional<double> conv_alpha;             // train-lora checkpoints: the alpha of 3x3 conv adapters (--conv-alpha)
};

// A 3x3 (kxk, k > 1) conv adapter: A [r, in, k, k].
bool spatial_conv_entry(const LoraWeights::Entry& e) { return e.down.dim() == 4 && (e.down.size(2) > 1 || e.down.size(3) > 1); }

// A finite number from metadata, or an error naming the file and key.
double metadata_number(const std::string& path, const std::string& key, const std::string& v) {
  char* end = nullptr;
  const double a = std::strtod(v.c_str(), &end);
  if (v.empty() || *end != '\0' || !std::isfinite(a))
    throw UserError("ELORAFORMAT", path + ": metadata " + key + " \"" + v + "\" is not a number");
  return a;
}

// The alpha_pattern entry for a module: peft matches a key against the end of the module path at a "." boundary.
std::optional<double> pattern_alpha(const Strength& s, const std::string& mpath) {
  for (const auto& [k, a] : s.alpha_pattern)
    if (mpath == k || ends_with(mpath, "." + k)) return a;
  return std::nullopt;
}

// peft config keys (`prefix` is "" for adapter_config.json, "unet." for lora_adapter_metadata) -> Strength.
std::optional<Strength> peft_strength(const Json& j, const std::string& prefix, const std::string& where) {
  const Json& a = j[prefix + "lora_alpha"];
  if (!a.is_number()) return std::nullopt;
  const Json& type = j[prefix + "peft_type"];
  if (type.is_string() && type.as_string() != "LORA")
    throw UserError("ELORAFORMAT", where + ": a " + type.as_string() + " adapter; only LoRA (peft_type LORA) is supported");
  if (j[prefix + "use_dora"].is_bool() && j[prefix + "use_dora"].as_bool())
    throw UserError("ELORAFORMAT", where + ": a DoRA adapter (use_dora); only plain LoRA is supported");
  Strength s;
  const Json& pat = j[prefix + "alpha_pattern"];
  if (pat.is_object())
    for (const auto& [k, v] : pat.as_object()) {
      // peft reads keys as regular expressions; literal module paths (what peft and train-lora write) are supported.
      if (!v.is_number() || k.find_first_of("*+?()[]{}|^$\\") != std::string::npos)
        throw UserError("ELORAFORMAT", where + ": alpha_pattern entry \"" + k + "\" is not a module path with a number; only literal module paths are supported");
      s.alpha_pattern[k] = v.as_number();
    }
  s.alpha = a.as_number();
  s.rslora = j[prefix + "use_rslora"].is_bool() && j[prefix + "use_rslora"].as_bool();
  s.source = where;
  return s;
}

}  // namespace

LoraFormat lora_format_from_name(const std::string& s) {
  if (s == "peft") return LoraFormat::Peft;
  if (s == "diffusers") return LoraFormat::Diffusers;
  if (s == "kohya") return LoraFormat::Kohya;
  throw std::invalid_argument("unknown LoRA format \"" + s + "\" (diffusers, peft, kohya)");
}

std::string lora_format_name(LoraFormat f) {
  switch (f) {
    case LoraFormat::Peft: return "peft";
    case LoraFormat::Diffusers: return "diffusers";
    case LoraFormat::Kohya: return "kohya";
  }
  return "?";
}

bool lora_target_matches(const std::string& path, const std::vector<std::string>& targets) {
  for (const auto& t : targets)
    if (path == t || ends_with(path, "." + t)) return true;
  return false;
}

std::vector<LoraTarget> find_lora_targets(torch::nn::Module& model, const std::vector<std::string>& targets) {
  std::vector<LoraTarget> out;
  for (const auto& item : model.named_modules("", false)) {
    auto* layer = dynamic_cast<nn::LoraLayer*>(item.value().get());
    if (layer && lora_target_matches(item.key(), targets)) out.push_back({item.key(), layer});
  }
  return out;
}

std::vector<std::string> lora_layer_paths(torch::nn::Module& model) {
  std::vector<std::string> out;
  for (const auto& item : model.named_modules("", false))
    if (dynamic_cast<nn::LoraLayer*>(item.value().get())) out.push_back(item.key());
  return out;
}

namespace {
// kohya's split: a conv with a kernel larger than 1x1 takes conv_dim/conv_alpha; Linear and 1x1 conv the network's.
bool is_spatial_conv(const nn::LoraLayer* l) {
  auto* c = dynamic_cast<const nn::Conv2d*>(l);
  return c && c->kernel > 1;
}
}  // namespace

std::vector<LoraTarget> inject_lora(torch::nn::Module& model, const std::vector<std::string>& targets,
                                    const nn::LoraOptions& opts, torch::Device device,
                                    const std::optional<nn::LoraOptions>& conv_opts) {
  // Every requested target must select at least one Linear or Conv2d: a target that matches nothing, or only modules
  // LoRA cannot adapt (norms, embeddings, containers), is an error that names it, never a silent skip (which would
  // also list it in adapter_config.json without weights).
  std::vector<std::string> problems;
  for (const auto& t : targets) {
    int64_t layers = 0;
    std::set<std::string> others;
    std::string example;
    for (const auto& item : model.named_modules("", false)) {
      if (!lora_target_matches(item.key(), {t})) continue;
      if (dynamic_cast<nn::LoraLayer*>(item.value().get())) ++layers;
      else {
        std::string kind = item.value()->name();  // "tl::nn::LayerNorm", "torch::nn::Module" (a container)
        if (kind == "torch::nn::Module" || kind.find("ModuleList") != std::string::npos) kind = "container";
        else if (auto c = kind.rfind("::"); c != std::string::npos) kind = kind.substr(c + 2);
        others.insert(kind);
        if (example.empty()) example = item.key();
      }
    }
    if (layers > 0) continue;
    if (others.empty()) {
      problems.push_back("\"" + t + "\" matches no module of this model");
    } else {
      std::string kinds;
      for (const auto& k : others) kinds += (kinds.empty() ? "" : ", ") + k;
      problems.push_back("\"" + t + "\" matches only " + kinds + " modules (e.g. " + example + "); LoRA adapts Linear and Conv2d layers only");
    }
  }
  if (!problems.empty()) {
    std::string msg = "--lora-target-modules / --lora-target-preset: ";
    for (size_t i = 0; i < problems.size(); ++i) msg += (i ? "; " : "") + problems[i];
    throw UserError("ELORATARGET", msg + ". Modules of an SD 1.x UNet that take LoRA: to_q, to_k, to_v, to_out.0, ff.net.0.proj, ff.net.2, "
                                         "proj_in, proj_out, time_emb_proj, conv_shortcut and (with --conv-rank) conv1, conv2, "
                                         "downsamplers.0.conv, upsamplers.0.conv");
  }
  auto found = find_lora_targets(model, targets);
  std::string spatial_example;
  for (const auto& t : found)
    if (is_spatial_conv(t.layer) && spatial_example.empty()) spatial_example = t.path;
  if (!spatial_example.empty() && !conv_opts)
    throw UserError("ELORATARGET", "the LoRA targets include convolutions with a 3x3 kernel (e.g. " + spatial_example +
                                       "): give their rank with --conv-rank (and optionally --conv-alpha), as kohya's conv_dim/conv_alpha");
  if (spatial_example.empty() && conv_opts)
    throw UserError("ELORATARGET", "--conv-rank is given but no LoRA target is a 3x3 convolution: use --lora-target-preset full, or add "
                                   "conv1, conv2, downsamplers.0.conv or upsamplers.0.conv to --lora-target-modules");
  for (auto& t : found) t.layer->add_lora(is_spatial_conv(t.layer) ? *conv_opts : opts, device);
  return found;
}

std::vector<LoraTarget> lora_modules(torch::nn::Module& model) {
  std::vector<LoraTarget> out;
  for (const auto& item : model.named_modules("", false)) {
    auto* layer = dynamic_cast<nn::LoraLayer*>(item.value().get());
    if (layer && layer->has_lora()) out.push_back({item.key(), layer});
  }
  return out;
}

int64_t LoraWeights::rank() const { return modules.empty() ? 0 : modules.begin()->second.down.size(0); }

std::string lora_key(const std::string& component, const std::string& path, bool is_a, LoraFormat format) {
  switch (format) {
    case LoraFormat::Peft: return component + "." + path + (is_a ? ".lora_A.weight" : ".lora_B.weight");
    case LoraFormat::Diffusers: return component + "." + path + (is_a ? ".lora.down.weight" : ".lora.up.weight");
    case LoraFormat::Kohya: return kohya_prefix(component) + "_" + underscored(path) + (is_a ? ".lora_down.weight" : ".lora_up.weight");
  }
  return "";
}

namespace {

// Kinds of file this reader does not load, told apart by their keys, refused with what is supported.
void refuse_unsupported(const std::string& path, const std::vector<st::TensorInfo>& tensors) {
  for (const auto& t : tensors) {
    const std::string& k = t.name;
    std::string kind;
    if (k.find(".hada_w1_") != std::string::npos || k.find(".hada_w2_") != std::string::npos) kind = "a LyCORIS LoHa file (keys *.hada_w1_a)";
    else if (k.find(".lokr_w1") != std::string::npos || k.find(".lokr_w2") != std::string::npos) kind = "a LyCORIS LoKr file (keys *.lokr_w1)";
    else if (k.find(".oft_") != std::string::npos || ends_with(k, ".oft_blocks")) kind = "a LyCORIS OFT file";
    else if (starts_with(k, "lora_te1_") || starts_with(k, "lora_te2_")) kind = "a LoRA for SDXL (two text encoders: keys lora_te1_* / lora_te2_*)";
    else if (starts_with(k, "lora_unet_input_blocks_") || starts_with(k, "lora_unet_middle_block_") || starts_with(k, "lora_unet_output_blocks_"))
      kind = "a LoRA with the original LDM/SGM module names (lora_unet_input_blocks_*), as SDXL LoRAs have";
    if (!kind.empty())
      throw UserError("ELORAFORMAT", path + ": " + kind + " (e.g. " + k + "). Supported: plain LoRA for SD 1.x/2.x UNets and CLIP text "
                                            "encoders in the diffusers, PEFT or kohya format (kohya: lora_unet_<diffusers module>.lora_down/"
                                            "lora_up/alpha, LoCon conv modules included)");
  }
}

// Which of the three formats the keys are in (exactly one).
LoraFormat detect_format(const std::string& path, const std::vector<st::TensorInfo>& tensors) {
  bool any_kohya = false, any_peft = false, any_diffusers = false;
  for (const auto& t : tensors) {
    if (starts_with(t.name, "lora_unet_") || starts_with(t.name, "lora_te_")) any_kohya = true;
    else if (ends_with(t.name, ".lora_A.weight") || ends_with(t.name, ".lora_B.weight")) any_peft = true;
    else if (ends_with(t.name, ".lora.down.weight") || ends_with(t.name, ".lora.up.weight")) any_diffusers = true;
    // diffusers' text-encoder spelling (convert_state_dict_to_diffusers): <module>.lora_linear_layer.down.weight
    else if (ends_with(t.name, ".lora_linear_layer.down.weight") || ends_with(t.name, ".lora_linear_layer.up.weight")) any_diffusers = true;
  }
  if (any_kohya + any_peft + any_diffusers != 1)
    throw UserError("ELORAFORMAT", path + ": " +
                                       (any_kohya + any_peft + any_diffusers == 0
                                            ? "no LoRA weights found (expected keys like unet.<module>.lora_A.weight, "
                                              "unet.<module>.lora.down.weight or lora_unet_<module>.lora_down.weight)"
                                            : "mixes several LoRA key formats; convert it to one format first"));
  return any_kohya ? LoraFormat::Kohya : any_peft ? LoraFormat::Peft : LoraFormat::Diffusers;

}

// Adapter-wide alpha per component, from the first source that gives one (see read_lora_file in lora.h): the file's
// metadata, then an adapter_config.json or a checkpoint's trainer_state.json beside it.
std::map<std::string, Strength> strength_sources(const LoraFile& out, const LoraLocation& loc) {
  const std::string& path = out.file;
  std::map<std::string, Strength> strength;
  if (auto it = out.metadata.find("lora_adapter_metadata"); it != out.metadata.end()) {
    Json m;
    try {
      m = Json::parse(it->second);
    } catch (const std::exception& e) {
      throw UserError("ELORAFORMAT", path + ": lora_adapter_metadata is not valid JSON: " + e.what());
    }
    for (const std::string comp : {"unet", "text_encoder"})
      if (auto s = peft_strength(m, comp + ".", path + " (lora_adapter_metadata)")) strength.emplace(comp, *s);
  }
  for (const char* key : {"lora_alpha", "train_lora.alpha"}) {
    auto it = out.metadata.find(key);
    if (it == out.metadata.end()) continue;
    char* end = nullptr;
    const double a = std::strtod(it->second.c_str(), &end);
    if (it->second.empty() || *end != '\0' || !std::isfinite(a))
      throw UserError("ELORAFORMAT", path + ": metadata " + key + " \"" + it->second + "\" is not a number");
    Strength s{a, false, path + " (metadata " + key + ")"};
    if (auto c = out.metadata.find("conv_alpha"); c != out.metadata.end()) s.conv_alpha = metadata_number(path, "conv_alpha", c->second);
    for (const std::string comp : {"unet", "text_encoder"}) strength.emplace(comp, s);
    break;
  }
  if (!loc.adapter_config.empty()) {
    Json c = read_json_file(loc.adapter_config);
    auto s = peft_strength(c, "", loc.adapter_config);
    if (!s) throw UserError("EBADCONFIG", loc.adapter_config + ": has no numeric \"lora_alpha\"");
    // A peft adapter folder is one model: its keys (base_model.model.*) are read as the UNet's below.
    for (const std::string comp : {"unet", "text_encoder"}) strength.emplace(comp, *s);
  }
  if (!loc.trainer_state.empty()) {
    Json t = read_json_file(loc.trainer_state);
    const Json& cfg = t["config"];
    if (cfg["train_mode"].is_string() && cfg["train_mode"].as_string() != "lora")
      throw UserError("ECKPTLORA", loc.trainer_state + ": a --train-mode " + cfg["train_mode"].as_string() +
                                       " checkpoint holds no LoRA (its model.safetensors is a full UNet state dict)");
    // train-lora's config: lora_alpha, or (when it was not given) the rank.
    const Json& a = cfg["lora_alpha"].is_number() ? cfg["lora_alpha"] : cfg["rank"];
    // 3x3 conv adapters: conv_alpha, or (when it was not given) conv_rank.
    const Json& ca = cfg["conv_alpha"].is_number() ? cfg["conv_alpha"] : cfg["conv_rank"];
    if (a.is_number()) {
      Strength s{a.as_number(), false, loc.trainer_state + (cfg["lora_alpha"].is_number() ? " (config.lora_alpha)" : " (config.rank: no lora_alpha)")};
      if (ca.is_number()) s.conv_alpha = ca.as_number();
      for (const std::string comp : {"unet", "text_encoder"}) strength.emplace(comp, s);
    }
  }
  return strength;
}

// Every tensor to its component and module: kohya's underscored names through the model's module paths, peft's and
// diffusers' by their suffixes. Keys that name no module of this model are an error listing them.
void read_modules(const st::File& f, const std::map<std::string, std::vector<std::string>>& module_paths, LoraFile& out) {
  const std::string& path = out.file;
  const auto& tensors = f.header().tensors;
  // kohya: map underscored names back through the model's real module paths.
  std::map<std::string, std::pair<std::string, std::string>> kohya_names;  // lora_unet_x_y -> (component, path)
  if (out.format == LoraFormat::Kohya)
    for (const auto& [comp, paths] : module_paths)
      for (const auto& p : paths) kohya_names[kohya_prefix(comp) + "_" + underscored(p)] = {comp, p};

  std::vector<std::string> unknown;
  for (const auto& t : tensors) {
    std::string comp, mpath;
    bool is_a = false, is_alpha = false;
    const std::string& k = t.name;
    if (out.format == LoraFormat::Kohya) {
      std::string base;
      if (ends_with(k, ".lora_down.weight")) base = k.substr(0, k.size() - 17), is_a = true;
      else if (ends_with(k, ".lora_up.weight")) base = k.substr(0, k.size() - 15);
      else if (ends_with(k, ".alpha")) base = k.substr(0, k.size() - 6), is_alpha = true;
      else {
        unknown.push_back(k);
        continue;
      }
      auto it = kohya_names.find(base);
      if (it == kohya_names.end()) {
        unknown.push_back(k);
        continue;
      }
      comp = it->second.first;
      mpath = it->second.second;
    } else {
      // PEFT's own adapter files (PeftModel.save_pretrained) prefix keys with "base_model.model.": a UNet adapter.
      static const std::string peft_prefix = "base_model.model.";
      // A CLIPTextModel adapter (text_model.* in transformers 4, encoder.layers.* in 5) is the text encoder's.
      std::string key = k;
      if (starts_with(k, peft_prefix)) {
        const std::string rest = k.substr(peft_prefix.size());
        key = (starts_with(rest, "text_model.") || starts_with(rest, "encoder.layers.") ? "text_encoder." : "unet.") + rest;
      }
      auto dot = key.find('.');
      comp = dot == std::string::npos ? "" : key.substr(0, dot);
      std::string rest = dot == std::string::npos ? key : key.substr(dot + 1);
      const char* sa = out.format == LoraFormat::Peft ? ".lora_A.weight" : ".lora.down.weight";
      const char* sb = out.format == LoraFormat::Peft ? ".lora_B.weight" : ".lora.up.weight";
      if (ends_with(rest, sa)) mpath = rest.substr(0, rest.size() - std::strlen(sa)), is_a = true;
      else if (ends_with(rest, sb)) mpath = rest.substr(0, rest.size() - std::strlen(sb));
      else if (out.format == LoraFormat::Diffusers && ends_with(rest, ".lora_linear_layer.down.weight"))
        mpath = rest.substr(0, rest.size() - 30), is_a = true;
      else if (out.format == LoraFormat::Diffusers && ends_with(rest, ".lora_linear_layer.up.weight"))
        mpath = rest.substr(0, rest.size() - 28);
      else {
        unknown.push_back(k);
        continue;
      }
      if (comp != "unet" && comp != "text_encoder") {
        unknown.push_back(k);
        continue;
      }
      // Text-encoder LoRAs from transformers 5 lack the "text_model." level that real SD files have.
      if (comp == "text_encoder" && !starts_with(mpath, "text_model.")) mpath = "text_model." + mpath;
    }
    auto& w = out.components[comp];
    torch::Tensor v = f.get(k, torch::kFloat32);
    if (is_alpha) {
      w.modules[mpath].alpha = v.item<double>();
      continue;
    }
    auto& e = w.modules[mpath];
    (is_a ? e.down : e.up) = v;
  }
  if (!unknown.empty()) {
    std::string msg = path + ": " + std::to_string(unknown.size()) + " keys do not name a LoRA module of this model:";
    for (size_t i = 0; i < unknown.size() && i < 10; ++i) msg += "\n    " + unknown[i];
    msg += "\n  Is this LoRA for a different base model (e.g. SDXL, SD 2.x), or a LyCORIS/LoHa file?";
    throw UserError("ELORAKEYS", msg);
  }
}

// Every module has both matrices of compatible shapes, and every component an alpha: per module, adapter-wide from
// `strength`, the format's convention, or --lora-alpha; a PEFT file with none is an error.
void resolve_alphas(LoraFile& out, const std::map<std::string, Strength>& strength, const std::string& given, std::optional<double> alpha_if_unknown) {
  const std::string& path = out.file;
  for (auto& [comp, w] : out.components) {
    for (auto& [mpath, e] : w.modules) {
      if (!e.down.defined() || !e.up.defined())
        throw UserError("ELORAKEYS", path + ": module " + comp + "." + mpath + " has only one of its two LoRA matrices");
      // Linear: [r, in] / [out, r]; conv (LoCon): [r, in, k, k] / [out, r, 1, 1].
      const bool lin = e.down.dim() == 2 && e.up.dim() == 2;
      const bool conv = e.down.dim() == 4 && e.up.dim() == 4 && e.up.size(2) == 1 && e.up.size(3) == 1;
      if ((!lin && !conv) || e.up.size(1) != e.down.size(0))
        throw UserError("ELORAKEYS", path + ": module " + comp + "." + mpath + " has LoRA matrices of incompatible shapes " +
                                         c10::str(e.down.sizes()) + " and " + c10::str(e.up.sizes()));
    }
    auto st = strength.find(comp);
    if (st != strength.end()) {
      out.alpha_source = st->second.source;
      for (auto& [mpath, e] : w.modules) {
        if (e.alpha) continue;
        if (auto a = pattern_alpha(st->second, mpath)) e.alpha = st->second.rslora ? *a * std::sqrt(static_cast<double>(e.down.size(0))) : *a;
        else if (st->second.conv_alpha && spatial_conv_entry(e)) e.alpha = *st->second.conv_alpha;
      }
      if (!st->second.rslora) {
        w.alpha = st->second.alpha;
      } else {
        // rsLoRA scales by alpha / sqrt(r): the same as alpha * sqrt(r) / r for each module's own rank.
        for (auto& [mpath, e] : w.modules)
          if (!e.alpha) e.alpha = *st->second.alpha * std::sqrt(static_cast<double>(e.down.size(0)));
      }
      continue;
    }
    bool all_have_alpha = true;
    for (const auto& [mpath, e] : w.modules) all_have_alpha = all_have_alpha && e.alpha.has_value();
    if (all_have_alpha) {
      out.alpha_source = path + " (kohya .alpha tensors)";
      continue;
    }
    // The formats' own conventions: diffusers loads a file without network alphas at scale 1 (alpha = r), and
    // kohya's sd-scripts takes a missing .alpha as the rank.
    if (out.format != LoraFormat::Peft) {
      out.alpha_source = path + " (no alpha in the file: alpha = rank, the " + lora_format_name(out.format) + " convention)";
      continue;
    }
    if (alpha_if_unknown) {
      w.alpha = *alpha_if_unknown;
      out.alpha_source = "--lora-alpha";
      continue;
    }
    throw UserError("ELORAALPHA",
                    given + ": the LoRA's strength cannot be known: a PEFT-format file (keys <module>.lora_A.weight) carries no "
                            "alpha (no lora_adapter_metadata or lora_alpha metadata, no adapter_config.json beside an "
                            "adapter_model.safetensors, no trainer_state.json beside a checkpoint's model.safetensors). Pass the "
                            "adapter or checkpoint folder instead, or give the alpha with --lora-alpha (the scale is alpha / rank; "
                            "this file's rank is " + std::to_string(w.rank()) + ").");
  }
}

}  // namespace

LoraFile read_lora_file(const std::string& given, const std::map<std::string, std::vector<std::string>>& module_paths,
                        std::optional<double> alpha_if_unknown) {
  const LoraLocation loc = locate_lora(given);
  const std::string& path = loc.file;
  st::File f(path);
  LoraFile out;
  out.file = path;
  out.metadata = f.header().metadata;
  refuse_unsupported(path, f.header().tensors);
  out.format = detect_format(path, f.header().tensors);
  const std::map<std::string, Strength> strength = strength_sources(out, loc);
  read_modules(f, module_paths, out);
  resolve_alphas(out, strength, given, alpha_if_unknown);
  // A PEFT export folder (train-lora's lora_weights/): the text encoder's adapter lives in text_encoder/ beside the
  // UNet's; it is read too, never dropped.
  if (base_of(path) == "adapter_model.safetensors" && !out.components.count("text_encoder")) {
    const std::string te_dir = dir_of(path) + "/text_encoder";
    if (is_file(te_dir + "/adapter_model.safetensors")) {
      LoraFile te = read_lora_file(te_dir, module_paths, alpha_if_unknown);
      if (te.format != LoraFormat::Peft || !te.components.count("text_encoder") || te.components.size() != 1)
        throw UserError("ELORAKEYS", te_dir + "/adapter_model.safetensors: expected the text encoder's PEFT adapter (keys base_model.model.text_model.*.lora_A.weight)");
      out.components["text_encoder"] = te.components.at("text_encoder");
    }
  }
  return out;
}

void apply_lora_weights(torch::nn::Module& model, const LoraWeights& w, torch::Device device, const std::string& what) {
  std::map<std::string, nn::LoraLayer*> layers;
  for (const auto& item : model.named_modules("", false))
    if (auto* l = dynamic_cast<nn::LoraLayer*>(item.value().get())) layers[item.key()] = l;
  torch::NoGradGuard ng;
  for (const auto& [mpath, e] : w.modules) {
    auto it = layers.find(mpath);
    if (it == layers.end()) throw UserError("ELORAKEYS", what + ": the model has no Linear or Conv2d module \"" + mpath + "\"");
    nn::LoraLayer* layer = it->second;
    const int64_t r = e.down.size(0);
    const auto want_a = layer->lora_A_shape(r), want_b = layer->lora_B_shape(r);
    if (e.down.sizes() != c10::IntArrayRef(want_a) || e.up.sizes() != c10::IntArrayRef(want_b))
      throw UserError("ELORASHAPE", what + ": LoRA for \"" + mpath + "\" has down " + c10::str(e.down.sizes()) + " and up " + c10::str(e.up.sizes()) +
                                        " but the " + layer->kind() + " layer (weight " + c10::str(layer->base_weight().sizes()) + ") takes " +
                                        c10::str(c10::IntArrayRef(want_a)) + " and " + c10::str(c10::IntArrayRef(want_b)) +
                                        ": is this LoRA for another base model (e.g. SD 2.x vs SD 1.x, or SDXL)?");
    // Alpha precedence: per-module (kohya), then the file's adapter-wide value, then r (diffusers' default).
    const double alpha = e.alpha ? *e.alpha : (w.alpha ? *w.alpha : static_cast<double>(r));
    if (!layer->has_lora()) {
      nn::LoraOptions o;
      o.rank = r;
      o.alpha = alpha;
      o.init = "zeros";
      layer->add_lora(o, device);
    } else if (layer->lora.rank != r) {
      throw UserError("ELORASHAPE", what + ": LoRA rank " + std::to_string(r) + " for \"" + mpath + "\" differs from the adapter's rank " +
                                        std::to_string(layer->lora.rank));
    } else {
      layer->lora.alpha = alpha;
    }
    layer->lora_A.copy_(e.down.to(layer->lora_A.device(), torch::kFloat32));
    layer->lora_B.copy_(e.up.to(layer->lora_B.device(), torch::kFloat32));
  }
}

LoraFile read_lora_for(const std::string& file, const std::map<std::string, torch::nn::Module*>& models, std::optional<double> alpha_if_unknown) {
  std::map<std::string, std::vector<std::string>> module_paths;
  for (const auto& [comp, m] : models)
    if (m) module_paths[comp] = lora_layer_paths(*m);
  LoraFile lf = read_lora_file(file, module_paths, alpha_if_unknown);
  if (lf.components.empty()) throw UserError("ELORAKEYS", file + ": has no LoRA weights for the UNet or the text encoder");
  for (const auto& [comp, w] : lf.components)
    if (!module_paths.count(comp)) throw UserError("ELORAKEYS", file + ": has " + comp + " weights but the " + comp + " is not loaded");
  return lf;
}

size_t init_lora_from_file(const std::string& file, const std::map<std::string, torch::nn::Module*>& models, double alpha_if_unknown,
                           bool text_encoder_trained, torch::Device device) {
  LoraFile lf = read_lora_for(file, models, alpha_if_unknown);
  if (lf.components.count("text_encoder") && !text_encoder_trained)
    throw UserError("ELORAKEYS", file + ": has text-encoder LoRA weights (" + std::to_string(lf.components.at("text_encoder").modules.size()) +
                                     " modules), which this run would ignore: add --train-text-encoder to start the text encoder's adapters from "
                                     "them (with --text-encoder-target-modules covering them), or use a LoRA file without them");
  size_t n = 0;
  for (const auto& [comp, w] : lf.components) {
    torch::nn::Module& m = *models.at(comp);
    const char* flags = comp == "unet" ? "--lora-target-preset and --lora-target-modules" : "--text-encoder-target-modules";
    const auto have = lora_modules(m);
    std::map<std::string, double> run_alpha;
    for (const auto& h : have) run_alpha[h.path] = h.layer->lora.alpha;
    for (const auto& [mpath, e] : w.modules)
      if (!run_alpha.count(mpath))
        throw UserError("ELORAKEYS", file + ": has an adapter for " + comp + " \"" + mpath + "\", which is not a LoRA target of this run (see " + flags + ")");
    apply_lora_weights(m, w, device, file);
    torch::NoGradGuard ng;
    for (auto& h : lora_modules(m)) {
      const double want = run_alpha.at(h.path);
      if (h.layer->lora.alpha != want) {
        h.layer->lora_B.mul_(h.layer->lora.alpha / want);
        h.layer->lora.alpha = want;
      }
    }
    n += w.modules.size();
  }
  return n;
}

}  // namespace tl
