// Bindings of the sampling area (native/sampling.h): samplerCreate / samplerStep / samplerDecode / samplerLatents
// and pipelineApplyLora. Typed in src/native.ts; the scheduler math lives in src/inference/schedulers.ts.
#include <napi.h>

#include "bindings/bindings.h"
#include "runtime/engine.h"
#include "bindings/napi_util.h"
#include "pipeline/sampling.h"

namespace tl {
namespace {

std::shared_ptr<HostTensor> opt_host(Napi::Env env, const Napi::Object& o, const char* key) {
  Napi::Value v = o.Get(key);
  if (v.IsUndefined() || v.IsNull()) return nullptr;
  return std::make_shared<HostTensor>(host_from_js(env, v, 0));
}

double req_num(Napi::Env env, const Napi::Object& o, const char* key) {
  Napi::Value v = o.Get(key);
  if (!v.IsNumber()) throw Napi::TypeError::New(env, std::string(key) + " must be a number");
  return v.As<Napi::Number>().DoubleValue();
}

// samplerCreate(pipeline | null, {inputIds, negativeInputIds, guidanceScale, height, width, numImagesPerPrompt, seed,
//   initNoiseSigma, latents?, fakeModel?: {base, inputScale}}) -> Sampler handle
Napi::Value SamplerCreate(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::shared_ptr<Pipeline> p;
  if (info.Length() > 0 && !info[0].IsNull() && !info[0].IsUndefined()) p = unwrap_handle<Pipeline>(info[0], "Pipeline");
  Napi::Object o = obj_arg(info, 1);
  auto ids = opt_host(env, o, "inputIds");
  auto neg = opt_host(env, o, "negativeInputIds");
  auto lat = opt_host(env, o, "latents");
  std::shared_ptr<HostTensor> fake_base;
  double fake_scale = 0;
  if (o.Get("fakeModel").IsObject()) {
    Napi::Object f = o.Get("fakeModel").As<Napi::Object>();
    fake_base = std::make_shared<HostTensor>(host_from_js(env, f.Get("base"), 0));
    fake_scale = req_num(env, f, "inputScale");
  }
  SamplerOptions so;
  so.guidance_scale = num_opt(o, "guidanceScale", 7.5);
  so.height = static_cast<int64_t>(num_opt(o, "height", 512));
  so.width = static_cast<int64_t>(num_opt(o, "width", 512));
  so.images_per_prompt = static_cast<int64_t>(num_opt(o, "numImagesPerPrompt", 1));
  so.seed = static_cast<uint64_t>(num_opt(o, "seed", 0));
  so.init_noise_sigma = num_opt(o, "initNoiseSigma", 1.0);
  so.fake_input_scale = fake_scale;
  return Engine::of(env).run(env, [p, so, ids, neg, lat, fake_base]() mutable {
    if (ids) so.input_ids = host_to_tensor(*ids);
    if (neg) so.negative_input_ids = host_to_tensor(*neg);
    if (lat) so.latents = host_to_tensor(*lat);
    if (fake_base) so.fake_base = host_to_tensor(*fake_base);
    auto s = std::make_shared<Sampler>(p, so);
    double batch = static_cast<double>(s->batch());
    return Completion([s, batch](Napi::Env env) -> Napi::Value {
      Napi::Object r = Napi::Object::New(env);
      r.Set("sampler", wrap_handle(env, s, "Sampler"));
      r.Set("batch", batch);
      return r;
    });
  });
}

std::vector<SamplerOp> ops_from_js(Napi::Env env, const Napi::Value& v) {
  std::vector<SamplerOp> ops;
  if (v.IsUndefined()) return ops;
  if (!v.IsArray()) throw Napi::TypeError::New(env, "ops must be an array of {target, terms, noise?, clamp?}");
  Napi::Array a = v.As<Napi::Array>();
  for (uint32_t i = 0; i < a.Length(); ++i) {
    if (!a.Get(i).IsObject()) throw Napi::TypeError::New(env, "ops[" + std::to_string(i) + "] must be an object");
    Napi::Object o = a.Get(i).As<Napi::Object>();
    SamplerOp op;
    auto target = opt_str(o, "target");
    if (!target) throw Napi::TypeError::New(env, "ops[" + std::to_string(i) + "].target must be a string");
    op.target = *target;
    if (o.Get("terms").IsArray()) {
      Napi::Array ts = o.Get("terms").As<Napi::Array>();
      for (uint32_t k = 0; k < ts.Length(); ++k) {
        Napi::Value t = ts.Get(k);
        if (!t.IsArray() || t.As<Napi::Array>().Length() != 2 || !t.As<Napi::Array>().Get(0u).IsString() || !t.As<Napi::Array>().Get(1u).IsNumber())
          throw Napi::TypeError::New(env, "ops[" + std::to_string(i) + "].terms entries must be [slot, coef]");
        op.terms.emplace_back(t.As<Napi::Array>().Get(0u).As<Napi::String>().Utf8Value(), t.As<Napi::Array>().Get(1u).As<Napi::Number>().DoubleValue());
      }
    }
    if (o.Get("noise").IsNumber()) op.noise = o.Get("noise").As<Napi::Number>().DoubleValue();
    if (o.Get("clamp").IsArray()) {
      Napi::Array c = o.Get("clamp").As<Napi::Array>();
      op.clamp = std::make_pair(c.Get(0u).As<Napi::Number>().DoubleValue(), c.Get(1u).As<Napi::Number>().DoubleValue());
    }
    ops.push_back(std::move(op));
  }
  return ops;
}

// samplerStep(sampler, {timestep, modelInputScale, ops})
Napi::Value SamplerStep(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto s = unwrap_handle<Sampler>(info[0], "Sampler");
  Napi::Object o = obj_arg(info, 1);
  double t = req_num(env, o, "timestep");
  double scale = num_opt(o, "modelInputScale", 1.0);
  auto ops = std::make_shared<std::vector<SamplerOp>>(ops_from_js(env, o.Get("ops")));
  return Engine::of(env).run(env, [s, t, scale, ops] {
    s->step(t, scale, *ops);
    return Completion();
  });
}

// samplerDecode(sampler, {output: 'uint8' | 'float'}) -> HostTensor [B, H, W, 3]
Napi::Value SamplerDecode(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto s = unwrap_handle<Sampler>(info[0], "Sampler");
  Napi::Object o = obj_arg(info, 1);
  std::string output = opt_str(o, "output").value_or("uint8");
  if (output != "uint8" && output != "float") throw Napi::TypeError::New(env, "output must be 'uint8' or 'float'");
  return Engine::of(env).run(env, [s, output] {
    torch::Tensor img = s->decode_images();
    // diffusers' numpy_to_pil: (images * 255).round().astype("uint8")
    if (output == "uint8") img = (img * 255).round().to(torch::kUInt8);
    auto h = std::make_shared<HostTensor>(to_host("images", img));
    return Completion([h](Napi::Env env) -> Napi::Value { return host_to_js(env, *h); });
  });
}

// samplerLatents(sampler) -> HostTensor float32 (tests)
Napi::Value SamplerLatents(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto s = unwrap_handle<Sampler>(info[0], "Sampler");
  return Engine::of(env).run(env, [s] {
    auto h = std::make_shared<HostTensor>(to_host("latents", s->latents()));
    return Completion([h](Napi::Env env) -> Napi::Value { return host_to_js(env, *h); });
  });
}

// pipelineApplyLora(pipeline, file, scale, alphaIfUnknown?) -> number of adapted modules. `file` may be a PEFT adapter
// or checkpoint folder; alphaIfUnknown (--lora-alpha) is used only for a LoRA that does not carry its alpha.
Napi::Value PipelineApplyLora(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto p = unwrap_handle<Pipeline>(info[0], "Pipeline");
  std::string file = str_arg(info, 1, "LoRA file");
  double scale = info.Length() > 2 && info[2].IsNumber() ? info[2].As<Napi::Number>().DoubleValue() : 1.0;
  std::optional<double> alpha;
  if (info.Length() > 3 && info[3].IsNumber()) alpha = info[3].As<Napi::Number>().DoubleValue();
  return Engine::of(env).run(env, [p, file, scale, alpha] {
    size_t n = pipeline_apply_lora(*p, file, scale, nullptr, alpha);
    return Completion([n](Napi::Env env) { return Napi::Number::New(env, static_cast<double>(n)); });
  });
}

}  // namespace

void register_sampling(Napi::Env env, Napi::Object exports) {
  export_bindings(env, exports, {
      {"samplerCreate", SamplerCreate}, {"samplerStep", SamplerStep}, {"samplerDecode", SamplerDecode},
      {"samplerLatents", SamplerLatents}, {"pipelineApplyLora", PipelineApplyLora}
  });
}

}  // namespace tl
