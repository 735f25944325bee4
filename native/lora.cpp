#include "lora.h"

#include <set>

#include "engine.h"
#include "json.h"
#include "safetensors.h"

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
    auto* lin = dynamic_cast<nn::Linear*>(item.value().get());
    if (lin && lora_target_matches(item.key(), targets)) out.push_back({item.key(), lin});
  }
  return out;
}

std::vector<LoraTarget> inject_lora(torch::nn::Module& model, const std::vector<std::string>& targets,
                                    const nn::LoraOptions& opts, torch::Device device) {
  auto found = find_lora_targets(model, targets);
  if (found.empty()) {
    std::string list;
    for (const auto& t : targets) list += (list.empty() ? "" : ", ") + t;
    throw UserError("ELORATARGET", "no Linear module matches the LoRA targets [" + list + "]");
  }
  for (auto& t : found) t.linear->add_lora(opts, device);
  return found;
}

std::vector<LoraTarget> lora_modules(torch::nn::Module& model) {
  std::vector<LoraTarget> out;
  for (const auto& item : model.named_modules("", false)) {
    auto* lin = dynamic_cast<nn::Linear*>(item.value().get());
    if (lin && lin->has_lora()) out.push_back({item.key(), lin});
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

std::vector<std::pair<std::string, torch::Tensor>> lora_tensors(torch::nn::Module& model, const std::string& component,
                                                                LoraFormat format) {
  std::vector<std::pair<std::string, torch::Tensor>> out;
  for (const auto& m : lora_modules(model)) {
    out.emplace_back(lora_key(component, m.path, true, format), m.linear->lora_A.detach());
    out.emplace_back(lora_key(component, m.path, false, format), m.linear->lora_B.detach());
    if (format == LoraFormat::Kohya)
      out.emplace_back(kohya_prefix(component) + "_" + underscored(m.path) + ".alpha",
                       torch::tensor(static_cast<float>(m.linear->lora.alpha)));
  }
  return out;
}

std::string lora_adapter_metadata_json(const std::map<std::string, std::vector<LoraTarget>>& components) {
  Json::Object o;
  for (const auto& [comp, mods] : components) {
    if (mods.empty()) continue;
    const auto& l = mods.front().linear->lora;
    std::set<std::string> names;
    for (const auto& m : mods) {
      auto dot = m.path.rfind('.');
      std::string leaf = m.path.substr(dot == std::string::npos ? 0 : dot + 1);
      // to_out.0 is targeted by its two-part name, as diffusers' scripts do.
      if (std::isdigit(static_cast<unsigned char>(leaf[0])) && dot != std::string::npos) {
        auto dot2 = m.path.rfind('.', dot - 1);
        leaf = m.path.substr(dot2 == std::string::npos ? 0 : dot2 + 1);
      }
      names.insert(leaf);
    }
    Json::Array targets;
    for (const auto& n : names) targets.emplace_back(n);
    o[comp + ".r"] = Json(l.rank);
    o[comp + ".lora_alpha"] = Json(l.alpha);
    o[comp + ".lora_dropout"] = Json(l.dropout);
    o[comp + ".target_modules"] = Json(targets);
    o[comp + ".init_lora_weights"] = Json(l.init == "kaiming" ? Json(true) : Json(l.init));
    o[comp + ".use_rslora"] = Json(false);
    o[comp + ".use_dora"] = Json(false);
    o[comp + ".rank_pattern"] = Json(Json::Object{});
    o[comp + ".alpha_pattern"] = Json(Json::Object{});
    o[comp + ".bias"] = Json("none");
    o[comp + ".peft_type"] = Json("LORA");
  }
  return Json(o).dump();
}

LoraFile read_lora_file(const std::string& path, const std::map<std::string, std::vector<std::string>>& module_paths) {
  st::File f(path);
  LoraFile out;
  out.metadata = f.header().metadata;
  const auto& tensors = f.header().tensors;
  bool any_kohya = false, any_peft = false, any_diffusers = false;
  for (const auto& t : tensors) {
    if (starts_with(t.name, "lora_unet_") || starts_with(t.name, "lora_te_")) any_kohya = true;
    else if (ends_with(t.name, ".lora_A.weight") || ends_with(t.name, ".lora_B.weight")) any_peft = true;
    else if (ends_with(t.name, ".lora.down.weight") || ends_with(t.name, ".lora.up.weight")) any_diffusers = true;
  }
  if (any_kohya + any_peft + any_diffusers != 1)
    throw UserError("ELORAFORMAT", path + ": " +
                                       (any_kohya + any_peft + any_diffusers == 0
                                            ? "no LoRA weights found (expected keys like unet.<module>.lora_A.weight, "
                                              "unet.<module>.lora.down.weight or lora_unet_<module>.lora_down.weight)"
                                            : "mixes several LoRA key formats; convert it to one format first"));
  out.format = any_kohya ? LoraFormat::Kohya : any_peft ? LoraFormat::Peft : LoraFormat::Diffusers;

  // Adapter-wide alpha from diffusers' metadata: {"unet.lora_alpha": 8, "unet.r": 4, ...}.
  std::map<std::string, double> meta_alpha;
  if (auto it = out.metadata.find("lora_adapter_metadata"); it != out.metadata.end()) {
    try {
      Json m = Json::parse(it->second);
      for (const auto& comp : {"unet", "text_encoder"}) {
        const Json& a = m[std::string(comp) + ".lora_alpha"];
        if (a.is_number()) meta_alpha[comp] = a.as_number();
      }
    } catch (const std::exception& e) {
      throw UserError("ELORAFORMAT", path + ": lora_adapter_metadata is not valid JSON: " + e.what());
    }
  }

  // kohya: map underscored names back through the model's real module paths.
  std::map<std::string, std::pair<std::string, std::string>> kohya_names;  // lora_unet_x_y -> (component, path)
  if (out.format == LoraFormat::Kohya)
    for (const auto& [comp, paths] : module_paths)
      for (const auto& p : paths) kohya_names[kohya_prefix(comp) + "_" + underscored(p)] = {comp, p};

  std::vector<std::string> unknown;
  std::map<std::string, std::map<std::string, double>> kohya_alpha;
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
      std::string key = starts_with(k, peft_prefix) ? "unet." + k.substr(peft_prefix.size()) : k;
      auto dot = key.find('.');
      comp = dot == std::string::npos ? "" : key.substr(0, dot);
      std::string rest = dot == std::string::npos ? key : key.substr(dot + 1);
      const char* sa = out.format == LoraFormat::Peft ? ".lora_A.weight" : ".lora.down.weight";
      const char* sb = out.format == LoraFormat::Peft ? ".lora_B.weight" : ".lora.up.weight";
      if (ends_with(rest, sa)) mpath = rest.substr(0, rest.size() - std::strlen(sa)), is_a = true;
      else if (ends_with(rest, sb)) mpath = rest.substr(0, rest.size() - std::strlen(sb));
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
  for (auto& [comp, w] : out.components) {
    if (meta_alpha.count(comp)) w.alpha = meta_alpha[comp];
    for (auto& [mpath, e] : w.modules) {
      if (!e.down.defined() || !e.up.defined())
        throw UserError("ELORAKEYS", path + ": module " + comp + "." + mpath + " has only one of its two LoRA matrices");
      if (e.down.dim() != 2 || e.up.dim() != 2 || e.up.size(1) != e.down.size(0))
        throw UserError("ELORAKEYS", path + ": module " + comp + "." + mpath + " has LoRA matrices of incompatible shapes");
    }
  }
  return out;
}

void apply_lora_weights(torch::nn::Module& model, const LoraWeights& w, torch::Device device, const std::string& what) {
  std::map<std::string, nn::Linear*> linears;
  for (const auto& item : model.named_modules("", false))
    if (auto* lin = dynamic_cast<nn::Linear*>(item.value().get())) linears[item.key()] = lin;
  torch::NoGradGuard ng;
  for (const auto& [mpath, e] : w.modules) {
    auto it = linears.find(mpath);
    if (it == linears.end()) throw UserError("ELORAKEYS", what + ": the model has no Linear module \"" + mpath + "\"");
    nn::Linear* lin = it->second;
    const int64_t r = e.down.size(0);
    if (e.down.size(1) != lin->in_features || e.up.size(0) != lin->out_features)
      throw UserError("ELORASHAPE", what + ": LoRA for \"" + mpath + "\" is [" + std::to_string(e.up.size(0)) + "x" +
                                        std::to_string(r) + "]·[" + std::to_string(r) + "x" + std::to_string(e.down.size(1)) +
                                        "] but the layer is " + std::to_string(lin->out_features) + "x" + std::to_string(lin->in_features));
    // Alpha precedence: per-module (kohya), then the file's adapter-wide value, then r (diffusers' default).
    const double alpha = e.alpha ? *e.alpha : (w.alpha ? *w.alpha : static_cast<double>(r));
    if (!lin->has_lora()) {
      nn::LoraOptions o;
      o.rank = r;
      o.alpha = alpha;
      o.init = "zeros";
      lin->add_lora(o, device);
    } else if (lin->lora.rank != r) {
      throw UserError("ELORASHAPE", what + ": LoRA rank " + std::to_string(r) + " for \"" + mpath + "\" differs from the adapter's rank " +
                                        std::to_string(lin->lora.rank));
    } else {
      lin->lora.alpha = alpha;
    }
    lin->lora_A.copy_(e.down.to(lin->lora_A.device(), torch::kFloat32));
    lin->lora_B.copy_(e.up.to(lin->lora_B.device(), torch::kFloat32));
  }
}

}  // namespace tl
