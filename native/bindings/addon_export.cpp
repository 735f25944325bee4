// Bindings of the export area (src/export/lora-export.ts): LoRA files in every format and merged components,
// from a live Trainer / Pipeline or from a checkpoint's model.safetensors.
#include <napi.h>

#include <memory>

#include "bindings/bindings.h"
#include "runtime/engine.h"
#include "lora/lora_export.h"
#include "bindings/napi_util.h"
#include "io/safetensors.h"
#include "io/single_file.h"
#include "train/trainer.h"

namespace tl {
namespace {

// Where the adapters come from: {trainer} | {pipeline} | {checkpoint: model.safetensors path, alpha}.
struct LoraSource {
  std::shared_ptr<Trainer> trainer;
  std::shared_ptr<Pipeline> pipeline;
  std::string checkpoint;
  double alpha = 0;
  std::optional<double> conv_alpha;
  LoraSet resolve() const {  // torch thread
    if (trainer) return lora_set_from_modules(lora_models(trainer->pipeline()));
    if (pipeline) return lora_set_from_modules(lora_models(*pipeline));
    return lora_set_from_checkpoint(checkpoint, alpha, conv_alpha);
  }
};

LoraSource source_arg(const Napi::CallbackInfo& info, size_t i) {
  Napi::Env env = info.Env();
  if (info.Length() <= i || !info[i].IsObject())
    throw Napi::TypeError::New(env, "source must be {trainer}, {pipeline} or {checkpoint, alpha}");
  Napi::Object o = info[i].As<Napi::Object>();
  LoraSource s;
  if (o.Has("trainer")) s.trainer = unwrap_handle<Trainer>(o.Get("trainer"), "Trainer");
  else if (o.Has("pipeline")) s.pipeline = unwrap_handle<Pipeline>(o.Get("pipeline"), "Pipeline");
  else if (auto c = opt_str(o, "checkpoint")) {
    s.checkpoint = *c;
    if (!o.Get("alpha").IsNumber()) throw Napi::TypeError::New(env, "a checkpoint source needs its LoRA alpha");
    s.alpha = o.Get("alpha").As<Napi::Number>().DoubleValue();
    if (o.Get("convAlpha").IsNumber()) s.conv_alpha = o.Get("convAlpha").As<Napi::Number>().DoubleValue();
  } else {
    throw Napi::TypeError::New(env, "source must be {trainer}, {pipeline} or {checkpoint, alpha}");
  }
  return s;
}

// A component's adapter config: r / lora_alpha of its Linear and 1x1-conv modules (--rank / --lora-alpha), and the
// modules that differ (3x3 conv adapters: --conv-rank / --conv-alpha) by full path, as peft's rank_pattern /
// alpha_pattern hold them.
struct ComponentSummary {
  std::string name;
  int64_t rank = 0;
  double alpha = 0;
  std::vector<std::string> paths;
  std::map<std::string, int64_t> rank_pattern;
  std::map<std::string, double> alpha_pattern;
};

std::vector<ComponentSummary> summarize(const LoraSet& set) {
  std::vector<ComponentSummary> out;
  for (const auto& [comp, w] : set) {
    ComponentSummary c;
    c.name = comp;
    auto alpha_of = [&](const LoraWeights::Entry& e) { return e.alpha ? *e.alpha : (w.alpha ? *w.alpha : static_cast<double>(e.down.size(0))); };
    const LoraWeights::Entry* main = nullptr;
    for (const auto& [p, e] : w.modules)
      if (!main && !(e.down.dim() == 4 && e.down.size(2) > 1)) main = &e;
    if (!main && !w.modules.empty()) main = &w.modules.begin()->second;
    if (main) {
      c.rank = main->down.size(0);
      c.alpha = alpha_of(*main);
    }
    for (const auto& [p, e] : w.modules) {
      if (e.down.size(0) != c.rank) c.rank_pattern[p] = e.down.size(0);
      if (alpha_of(e) != c.alpha) c.alpha_pattern[p] = alpha_of(e);
      c.paths.push_back(p);
    }
    out.push_back(std::move(c));
  }
  return out;
}

Napi::Object summary_to_js(Napi::Env env, const std::vector<ComponentSummary>& cs) {
  Napi::Object o = Napi::Object::New(env);
  for (const auto& c : cs) {
    Napi::Object e = Napi::Object::New(env);
    e.Set("rank", static_cast<double>(c.rank));
    e.Set("alpha", c.alpha);
    Napi::Array paths = Napi::Array::New(env, c.paths.size());
    for (size_t i = 0; i < c.paths.size(); ++i) paths.Set(i, c.paths[i]);
    e.Set("modules", paths);
    Napi::Object rp = Napi::Object::New(env), ap = Napi::Object::New(env);
    for (const auto& [p, r] : c.rank_pattern) rp.Set(p, static_cast<double>(r));
    for (const auto& [p, a] : c.alpha_pattern) ap.Set(p, a);
    e.Set("rankPattern", rp);
    e.Set("alphaPattern", ap);
    o.Set(c.name, e);
  }
  return o;
}

std::vector<std::string> str_list(Napi::Env env, const Napi::Value& v, const char* what) {
  std::vector<std::string> out;
  if (v.IsUndefined() || v.IsNull()) return out;
  if (!v.IsArray()) throw Napi::TypeError::New(env, std::string(what) + " must be an array of strings");
  Napi::Array a = v.As<Napi::Array>();
  for (uint32_t i = 0; i < a.Length(); ++i) out.push_back(a.Get(i).ToString().Utf8Value());
  return out;
}

// loraSummary(source) -> {unet: {rank, alpha, modules: [path...]}, text_encoder?: ...}
Napi::Value LoraSummary(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  LoraSource src = source_arg(info, 0);
  return Engine::of(env).run(env, [src] {
    auto cs = summarize(src.resolve());
    return Completion([cs](Napi::Env env) -> Napi::Value { return summary_to_js(env, cs); });
  });
}

// loraExport(source, path, format, {metadata, prefix, components}) -> {tensors, components: summary}
Napi::Value LoraExport(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  LoraSource src = source_arg(info, 0);
  std::string path = str_arg(info, 1, "path");
  LoraFormat format;
  try {
    format = lora_format_from_name(str_arg(info, 2, "format"));
  } catch (const std::invalid_argument& e) {
    throw Napi::TypeError::New(env, e.what());
  }
  Napi::Object o = obj_arg(info, 3);
  auto meta = metadata_from_js(env, o.Get("metadata"));
  std::string prefix = opt_str(o, "prefix").value_or("");
  auto components = str_list(env, o.Get("components"), "components");
  return Engine::of(env).run(env, [src, path, format, meta, prefix, components] {
    LoraSet set = src.resolve();
    auto cs = summarize(set);
    auto tensors = lora_set_tensors(set, format, components, prefix);
    if (tensors.empty()) throw UserError("ENOLORA", path + ": nothing to write: no LoRA adapters in the requested components");
    st::save(path, tensors, meta);
    const double n = static_cast<double>(tensors.size());
    return Completion([n, cs](Napi::Env env) -> Napi::Value {
      Napi::Object r = Napi::Object::New(env);
      r.Set("tensors", n);
      r.Set("components", summary_to_js(env, cs));
      return r;
    });
  });
}

// loraMergeComponent(source, component, baseComponentDir, outComponentDir, {variant}) -> {file, merged, tensors, dtype}.
// baseComponentDir may be a single-file checkpoint (then component may also be "vae", converted without a LoRA).
Napi::Value LoraMergeComponent(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  LoraSource src = source_arg(info, 0);
  std::string kind = str_arg(info, 1, "component");
  if (kind != "unet" && kind != "text_encoder" && kind != "vae") throw Napi::TypeError::New(env, "component must be unet, text_encoder or vae");
  std::string base = str_arg(info, 2, "base component folder");
  std::string out = str_arg(info, 3, "output folder");
  Napi::Object o = obj_arg(info, 4);
  std::string variant = opt_str(o, "variant").value_or("");
  return Engine::of(env).run(env, [src, kind, base, out, variant] {
    LoraSet set = src.resolve();
    auto it = set.find(kind);
    // From a single-file base, a component without adapters (the VAE) is written converted to diffusers names.
    const LoraWeights none;
    if (it == set.end() && !is_single_file_checkpoint(base)) throw UserError("ENOLORA", "no LoRA adapters on the " + kind + " to merge");
    MergeStats s = merge_lora_component(it == set.end() ? none : it->second, kind, base, variant, out);
    return Completion([s](Napi::Env env) -> Napi::Value {
      Napi::Object r = Napi::Object::New(env);
      r.Set("file", s.file);
      r.Set("merged", static_cast<double>(s.merged));
      r.Set("tensors", static_cast<double>(s.tensors));
      r.Set("dtype", s.dtype);
      return r;
    });
  });
}

}  // namespace

void register_export(Napi::Env env, Napi::Object exports) {
  export_bindings(env, exports, {
      {"loraSummary", LoraSummary}, {"loraExport", LoraExport}, {"loraMergeComponent", LoraMergeComponent}
  });
}

}  // namespace tl
