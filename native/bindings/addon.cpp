// The N-API surface: thin, typed (see src/native.ts), and asynchronous. Arguments are checked and copied
// on the JS thread; all torch work happens in Engine jobs on the torch thread.
#include <napi.h>

#include <torch/torch.h>
#include <torch/version.h>

#include "runtime/devices.h"
#include "bindings/bindings.h"
#include "runtime/engine.h"
#include "bindings/napi_util.h"
#include "pipeline/pipeline.h"
#include "io/safetensors.h"
#include "train/latent_cache.h"
#include "train/trainer.h"
#include "io/weights.h"

namespace tl {
namespace {

// ---- bindings ----

Napi::Value Version(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Napi::Object o = Napi::Object::New(env);
  o.Set("torch", TORCH_VERSION);
#ifdef TRAIN_LORA_CUDA
  o.Set("cuda", true);
#else
  o.Set("cuda", false);
#endif
  o.Set("napi", NAPI_VERSION);
  return o;
}

Napi::Value Devices(const Napi::CallbackInfo& info) {
  return Engine::of(info.Env()).run(info.Env(), [] {
    auto devs = list_devices();
    return Completion([devs](Napi::Env env) -> Napi::Value {
      Napi::Array a = Napi::Array::New(env, devs.size());
      for (size_t i = 0; i < devs.size(); ++i) {
        const auto& d = devs[i];
        Napi::Object o = Napi::Object::New(env);
        o.Set("type", d.type);
        o.Set("index", d.index);
        o.Set("available", d.available);
        if (!d.name.empty()) o.Set("name", d.name);
        if (!d.reason.empty()) o.Set("reason", d.reason);
        if (d.total_memory > 0) o.Set("totalMemory", d.total_memory);
        if (d.threads > 0) o.Set("threads", d.threads);
        if (!d.compute_capability.empty()) o.Set("computeCapability", d.compute_capability);
        if (d.available) o.Set("bf16", d.bf16);
        a.Set(i, o);
      }
      return a;
    });
  });
}

// liveHandles() -> {Pipeline: n, Trainer: n, ...}: native objects JS holds that were neither disposed nor collected.
Napi::Value LiveHandles(const Napi::CallbackInfo& info) {
  Napi::Object o = Napi::Object::New(info.Env());
  for (const auto& [kind, n] : live_handles()) o.Set(kind, static_cast<double>(n));
  return o;
}

// shutdown(): finish queued work and stop the addon's threads (later calls reject with code ESHUTDOWN).
Napi::Value Shutdown(const Napi::CallbackInfo& info) {
  Engine::of(info.Env()).shutdown();
  return info.Env().Undefined();
}

// setAllowTf32(allow) -> {cublas, cudnn}: what libtorch reports after setting both.
Napi::Value SetAllowTf32(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 1 || !info[0].IsBoolean()) throw Napi::TypeError::New(env, "setAllowTf32(allow: boolean)");
  bool allow = info[0].As<Napi::Boolean>().Value();
  return Engine::of(env).run(env, [allow] {
    MathMode m = set_allow_tf32(allow);
    return Completion([m](Napi::Env env) -> Napi::Value {
      Napi::Object o = Napi::Object::New(env);
      o.Set("cublas", m.tf32_cublas);
      o.Set("cudnn", m.tf32_cudnn);
      return o;
    });
  });
}

Napi::Value SafetensorsHeader(const Napi::CallbackInfo& info) {
  std::string path = str_arg(info, 0, "path");
  return Engine::of(info.Env()).run(info.Env(), [path] {
    auto h = std::make_shared<st::Header>(st::read_header(path));
    return Completion([h](Napi::Env env) -> Napi::Value {
      Napi::Object o = Napi::Object::New(env);
      Napi::Array ts = Napi::Array::New(env, h->tensors.size());
      for (size_t i = 0; i < h->tensors.size(); ++i) {
        const auto& t = h->tensors[i];
        Napi::Object e = Napi::Object::New(env);
        e.Set("name", t.name);
        e.Set("dtype", t.dtype);
        e.Set("shape", shape_to_js(env, t.shape));
        Napi::Array off = Napi::Array::New(env, 2);
        off.Set(0u, static_cast<double>(t.begin));
        off.Set(1u, static_cast<double>(t.end));
        e.Set("dataOffsets", off);
        ts.Set(i, e);
      }
      o.Set("tensors", ts);
      o.Set("metadata", metadata_to_js(env, h->metadata));
      o.Set("dataStart", static_cast<double>(h->data_start));
      o.Set("fileSize", static_cast<double>(h->file_size));
      return o;
    });
  });
}

Napi::Value SafetensorsRead(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::string path = str_arg(info, 0, "path");
  Napi::Object opts = obj_arg(info, 1);
  std::optional<torch::ScalarType> dtype;
  if (auto d = opt_str(opts, "dtype")) dtype = parse_dtype(env, *d);
  return Engine::of(env).run(env, [path, dtype] {
    st::File f(path);
    auto tensors = std::make_shared<std::vector<HostTensor>>();
    for (const auto& t : f.header().tensors) {
      torch::Tensor x = f.get(t.name);
      if (dtype && x.is_floating_point()) x = x.to(*dtype);
      tensors->push_back(to_host(t.name, x));
    }
    auto meta = f.header().metadata;
    return Completion([tensors, meta](Napi::Env env) -> Napi::Value {
      Napi::Object o = Napi::Object::New(env);
      Napi::Array a = Napi::Array::New(env, tensors->size());
      for (size_t i = 0; i < tensors->size(); ++i) a.Set(i, host_to_js(env, (*tensors)[i]));
      o.Set("tensors", a);
      o.Set("metadata", metadata_to_js(env, meta));
      return o;
    });
  });
}

Napi::Value SafetensorsWrite(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::string path = str_arg(info, 0, "path");
  if (info.Length() < 2 || !info[1].IsArray()) throw Napi::TypeError::New(env, "tensors must be an array of {name, dtype, shape, data}");
  Napi::Array arr = info[1].As<Napi::Array>();
  auto host = std::make_shared<std::vector<HostTensor>>();
  for (uint32_t i = 0; i < arr.Length(); ++i) host->push_back(host_from_js(env, arr.Get(i), i));
  auto meta = metadata_from_js(env, info.Length() > 2 ? info[2] : env.Undefined());
  return Engine::of(env).run(env, [path, host, meta] {
    std::vector<std::pair<std::string, torch::Tensor>> ts;
    for (const auto& h : *host) ts.emplace_back(h.name, host_to_tensor(h));
    st::save(path, ts, meta);
    return Completion();
  });
}

// loadPipeline(dir, {device, dtype, variant, components}) -> Pipeline handle
Napi::Value LoadPipeline(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::string dir = str_arg(info, 0, "model folder");
  Napi::Object o = obj_arg(info, 1);
  PipelineOptions opts;
  if (auto d = opt_str(o, "device")) opts.device = parse_device(env, *d);
  if (auto d = opt_str(o, "dtype")) opts.dtype = parse_dtype(env, *d);
  if (auto v = opt_str(o, "variant")) opts.variant = *v;
  if (o.Get("components").IsArray()) {
    opts.components.clear();
    Napi::Array c = o.Get("components").As<Napi::Array>();
    for (uint32_t i = 0; i < c.Length(); ++i) opts.components.insert(c.Get(i).As<Napi::String>().Utf8Value());
  }
  return Engine::of(env).run(env, [dir, opts] {
    auto p = load_pipeline(dir, opts);
    return Completion([p](Napi::Env env) { return wrap_handle(env, p, "Pipeline"); });
  });
}

// forward(pipeline, inputs: HostTensor[], {lora, loraScale, loraAlpha, backward}) -> HostTensor[]
Napi::Value Forward(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto p = unwrap_handle<Pipeline>(info[0], "Pipeline");
  auto inputs = std::make_shared<std::vector<HostTensor>>(hosts_from_js(env, info.Length() > 1 ? info[1] : env.Undefined(), "inputs"));
  Napi::Object o = obj_arg(info, 2);
  ForwardOptions opts;
  if (auto l = opt_str(o, "lora")) opts.lora_path = *l;
  if (o.Get("loraScale").IsNumber()) opts.lora_scale = o.Get("loraScale").As<Napi::Number>().DoubleValue();
  if (o.Get("loraAlpha").IsNumber()) opts.lora_alpha = o.Get("loraAlpha").As<Napi::Number>().DoubleValue();
  if (o.Get("backward").IsBoolean()) opts.backward = o.Get("backward").As<Napi::Boolean>().Value();
  if (o.Get("gradientCheckpointing").IsBoolean()) opts.gradient_checkpointing = o.Get("gradientCheckpointing").As<Napi::Boolean>().Value();
  return Engine::of(env).run(env, [p, inputs, opts] {
    NamedTensors in;
    for (const auto& h : *inputs) in.emplace_back(h.name, host_to_tensor(h));
    auto outs = run_forward(*p, in, opts);
    auto hosts = std::make_shared<std::vector<HostTensor>>();
    for (const auto& [k, t] : outs) hosts->push_back(to_host(k, t));
    return Completion([hosts](Napi::Env env) { return hosts_to_js(env, *hosts); });
  });
}

// writeRandomWeights(componentDir, kind, seed)
Napi::Value WriteRandomWeights(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::string dir = str_arg(info, 0, "component folder");
  std::string kind = str_arg(info, 1, "component kind");
  if (info.Length() < 3 || !info[2].IsNumber()) throw Napi::TypeError::New(env, "seed must be a number");
  auto seed = static_cast<uint64_t>(info[2].As<Napi::Number>().Int64Value());
  return Engine::of(env).run(env, [dir, kind, seed] {
    write_random_weights(dir, kind, seed);
    return Completion();
  });
}

// ---- training ----

// Item indices as int64 (a JS array of whole numbers).
std::vector<int64_t> items_from_js(Napi::Env env, const Napi::Value& v, const char* what) {
  if (!v.IsArray()) throw Napi::TypeError::New(env, std::string(what) + " must be an array of item indices");
  Napi::Array a = v.As<Napi::Array>();
  std::vector<int64_t> out;
  for (uint32_t i = 0; i < a.Length(); ++i) {
    Napi::Value x = a.Get(i);
    if (!x.IsNumber()) throw Napi::TypeError::New(env, std::string(what) + " must be an array of item indices");
    out.push_back(x.As<Napi::Number>().Int64Value());
  }
  return out;
}

// A micro-batch argument (src/native.ts TrainBatch): {name: HostTensor, ..., cached?: {cache, items}}. The tensors
// are copied on the JS thread; build() makes the MicroBatch in the job, gathering the cached items' latents there.
class BatchArg {
 public:
  BatchArg(Napi::Env env, const Napi::Value& v) {
    if (!v.IsObject()) throw Napi::TypeError::New(env, "batch must be an object of tensors");
    uint32_t i = 0;
    for_each_property(v.As<Napi::Object>(), [&](const std::string& k, const Napi::Value& t) {
      ++i;
      if (t.IsUndefined() || t.IsNull()) return;
      if (k != "cached") {
        tensors_[k] = host_from_js(env, t, i - 1);
        return;
      }
      if (!t.IsObject()) throw Napi::TypeError::New(env, "batch.cached must be {cache, items}");
      cache_ = unwrap_handle<LatentCache>(t.As<Napi::Object>().Get("cache"), "LatentCache");
      items_ = items_from_js(env, t.As<Napi::Object>().Get("items"), "batch.cached.items");
    });
  }
  MicroBatch build(double divisor) const {
    MicroBatch b;
    auto get = [&](const char* k) { auto it = tensors_.find(k); return it == tensors_.end() ? torch::Tensor() : host_to_tensor(it->second); };
    b.pixel_values = get("pixelValues");
    b.latent_mean = get("latentMean");
    b.latent_std = get("latentStd");
    b.input_ids = get("inputIds");
    b.encoder_hidden_states = get("encoderHiddenStates");
    b.latents = get("latents");
    b.noise = get("noise");
    b.timesteps = get("timesteps");
    b.loss_mask = get("lossMask");
    b.loss_divisor = divisor;
    if (cache_) cache_->fill(b, items_);
    return b;
  }

 private:
  std::map<std::string, HostTensor> tensors_;
  std::shared_ptr<LatentCache> cache_;  // with items_: batch.cached
  std::vector<int64_t> items_;
};

Napi::Value CreateTrainer(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto p = unwrap_handle<Pipeline>(info[0], "Pipeline");
  Napi::Object o = obj_arg(info, 1);
  TrainerConfig c;
  c.mode = enum_opt(o, "mode", c.mode, kTrainModes);
  c.lora.rank = static_cast<int64_t>(num_opt(o, "rank", 4));
  c.lora.alpha = num_opt(o, "alpha", static_cast<double>(c.lora.rank));
  c.lora.dropout = num_opt(o, "dropout", 0);
  if (auto v = opt_str(o, "init")) c.lora.init = *v;
  if (o.Get("convRank").IsNumber()) {
    nn::LoraOptions conv = c.lora;
    conv.rank = static_cast<int64_t>(o.Get("convRank").As<Napi::Number>().DoubleValue());
    conv.alpha = num_opt(o, "convAlpha", static_cast<double>(conv.rank));
    c.conv_lora = conv;
  }
  if (o.Get("targets").IsArray()) {
    c.lora_targets.clear();
    Napi::Array a = o.Get("targets").As<Napi::Array>();
    for (uint32_t i = 0; i < a.Length(); ++i) c.lora_targets.push_back(a.Get(i).As<Napi::String>().Utf8Value());
  }
  c.train_text_encoder = bool_opt(o, "trainTextEncoder", false);
  if (o.Get("textEncoderTargets").IsArray()) {
    c.text_encoder_targets.clear();
    Napi::Array a = o.Get("textEncoderTargets").As<Napi::Array>();
    for (uint32_t i = 0; i < a.Length(); ++i) c.text_encoder_targets.push_back(a.Get(i).As<Napi::String>().Utf8Value());
  }
  c.mixed_precision = enum_opt(o, "mixedPrecision", c.mixed_precision, kMixedPrecisions);
  c.gradient_checkpointing = bool_opt(o, "gradientCheckpointing", false);
  c.prediction_type = enum_opt(o, "predictionType", c.prediction_type, kPredictionTypes);
  c.noise_offset = num_opt(o, "noiseOffset", 0);
  if (o.Get("snrGamma").IsNumber()) c.snr_gamma = o.Get("snrGamma").As<Napi::Number>().DoubleValue();
  if (!o.Get("alphasCumprod").IsArray()) throw Napi::TypeError::New(env, "alphasCumprod must be an array of numbers");
  Napi::Array ac = o.Get("alphasCumprod").As<Napi::Array>();
  for (uint32_t i = 0; i < ac.Length(); ++i) c.alphas_cumprod.push_back(static_cast<float>(ac.Get(i).As<Napi::Number>().DoubleValue()));
  c.adam_beta1 = num_opt(o, "adamBeta1", 0.9);
  c.adam_beta2 = num_opt(o, "adamBeta2", 0.999);
  c.adam_weight_decay = num_opt(o, "adamWeightDecay", 1e-2);
  c.adam_epsilon = num_opt(o, "adamEpsilon", 1e-8);
  c.max_grad_norm = num_opt(o, "maxGradNorm", 1.0);
  c.seed = static_cast<uint64_t>(num_opt(o, "seed", 0));
  if (o.Get("textEmbeddingCacheMb").IsNumber())
    c.text_embedding_cache_bytes = static_cast<int64_t>(o.Get("textEmbeddingCacheMb").As<Napi::Number>().DoubleValue() * 1024 * 1024);
  c.cuda_graphs = bool_opt(o, "cudaGraphs", false);
  if (o.Get("lossScaling").IsObject()) {
    Napi::Object ls = o.Get("lossScaling").As<Napi::Object>();
    c.init_loss_scale = num_opt(ls, "initScale", c.init_loss_scale);
    c.growth_factor = num_opt(ls, "growthFactor", c.growth_factor);
    c.backoff_factor = num_opt(ls, "backoffFactor", c.backoff_factor);
    c.growth_interval = static_cast<int64_t>(num_opt(ls, "growthInterval", static_cast<double>(c.growth_interval)));
  }
  return Engine::of(env).run(env, [p, c] {
    auto t = std::make_shared<Trainer>(p, c);
    double trainable = static_cast<double>(t->trainable_count()), total = static_cast<double>(t->total_count());
    return Completion([t, trainable, total](Napi::Env env) -> Napi::Value {
      Napi::Object r = Napi::Object::New(env);
      r.Set("trainer", wrap_handle(env, t, "Trainer"));
      r.Set("trainableParams", trainable);
      r.Set("totalParams", total);
      return r;
    });
  });
}

Napi::Value TrainerMicroStep(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto t = unwrap_handle<Trainer>(info[0], "Trainer");
  auto batch = std::make_shared<BatchArg>(env, info[1]);
  double divisor = info.Length() > 2 && info[2].IsNumber() ? info[2].As<Napi::Number>().DoubleValue() : 1.0;
  return Engine::of(env).run(env, [t, batch, divisor] {
    double loss = t->micro_step(batch->build(divisor));
    return Completion([loss](Napi::Env env) { return Napi::Number::New(env, loss); });
  });
}

Napi::Value TrainerGraphStatus(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto t = unwrap_handle<Trainer>(info[0], "Trainer");
  return Engine::of(env).run(env, [t] {
    StepGraphStatus s = t->graph_status();
    return Completion([s](Napi::Env env) -> Napi::Value {
      Napi::Object r = Napi::Object::New(env);
      r.Set("requested", s.requested);
      r.Set("active", s.active);
      r.Set("reason", s.reason);
      r.Set("graphs", static_cast<double>(s.graphs));
      r.Set("replays", static_cast<double>(s.replays));
      r.Set("eager", static_cast<double>(s.eager));
      return r;
    });
  });
}

Napi::Value TrainerEvalLoss(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto t = unwrap_handle<Trainer>(info[0], "Trainer");
  auto batch = std::make_shared<BatchArg>(env, info[1]);
  return Engine::of(env).run(env, [t, batch] {
    double loss = t->eval_loss(batch->build(1.0));
    return Completion([loss](Napi::Env env) { return Napi::Number::New(env, loss); });
  });
}

Napi::Value TrainerOptimizerStep(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto t = unwrap_handle<Trainer>(info[0], "Trainer");
  if (info.Length() < 2 || !info[1].IsNumber()) throw Napi::TypeError::New(env, "lr must be a number");
  double lr = info[1].As<Napi::Number>().DoubleValue();
  // Optional third argument: the text encoder's lr (--text-encoder-lr through the schedule); default lr.
  std::optional<double> te_lr;
  if (info.Length() > 2 && info[2].IsNumber()) te_lr = info[2].As<Napi::Number>().DoubleValue();
  return Engine::of(env).run(env, [t, lr, te_lr] {
    StepResult r = t->optimizer_step(lr, te_lr);
    return Completion([r](Napi::Env env) -> Napi::Value {
      Napi::Object o = Napi::Object::New(env);
      o.Set("gradNorm", r.grad_norm);
      o.Set("skipped", r.skipped);
      o.Set("nonFinite", r.non_finite);
      o.Set("lossScale", r.loss_scale);
      o.Set("optimizerSteps", static_cast<double>(r.optimizer_steps));
      return o;
    });
  });
}


// trainerSaveState(trainer, dir): writes dir/model.safetensors + dir/optimizer.safetensors (fsynced, atomic per
// file) and returns the JSON-able rest: optimizer step counts, loss scaler, RNG streams.
Napi::Value TrainerSaveState(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto t = unwrap_handle<Trainer>(info[0], "Trainer");
  std::string dir = str_arg(info, 1, "checkpoint folder");
  auto meta = metadata_from_js(env, info.Length() > 2 ? info[2] : env.Undefined());
  // Snapshot on the torch thread (host copies, consistent with the training jobs queued around it), then write on
  // the I/O thread while training goes on.
  return Engine::of(env).run_then_io(env, [t, dir, meta]() -> std::function<Completion()> {
    auto host_copy = [](NamedTensors ts) {
      for (auto& [_, x] : ts) x = x.detach().to(torch::kCPU, /*non_blocking=*/false, /*copy=*/true).contiguous();
      return ts;
    };
    auto model = std::make_shared<NamedTensors>(host_copy(t->trainable_state()));
    auto optim = std::make_shared<NamedTensors>(host_copy(t->optimizer_tensors()));
    auto steps = t->optimizer_steps();
    auto scaler = t->scaler();
    auto rng = t->rng_state();
    return [dir, meta, model, optim, steps, scaler, rng]() -> Completion {
    std::vector<std::pair<std::string, st::Written>> files;
    files.emplace_back("model.safetensors", st::save(dir + "/model.safetensors", *model, meta));
    files.emplace_back("optimizer.safetensors", st::save(dir + "/optimizer.safetensors", *optim, {{"format", "pt"}}));
    return Completion([steps, scaler, rng, files](Napi::Env env) -> Napi::Value {
      Napi::Object o = Napi::Object::New(env);
      Napi::Object fo = Napi::Object::New(env);
      for (const auto& [name, w] : files) {
        Napi::Object e = Napi::Object::New(env);
        e.Set("size", static_cast<double>(w.size));
        e.Set("sha256", w.sha256);
        fo.Set(name, e);
      }
      o.Set("files", fo);
      Napi::Object s = Napi::Object::New(env);
      for (const auto& [k, v] : steps) s.Set(k, static_cast<double>(v));
      o.Set("optimizerSteps", s);
      Napi::Object sc = Napi::Object::New(env);
      sc.Set("enabled", scaler.enabled);
      sc.Set("scale", scaler.scale);
      sc.Set("growthTracker", static_cast<double>(scaler.growth_tracker));
      o.Set("scaler", sc);
      Napi::Object r = Napi::Object::New(env);
      for (const auto& [k, v] : rng) r.Set(k, base64(v));
      o.Set("rng", r);
      return o;
    });
    };
  });
}


// trainerLoadState(trainer, dir, {optimizerSteps?, scaler?, rng?}): model weights always; optimizer when
// optimizerSteps is given; scaler and RNG when given.
Napi::Value TrainerLoadState(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto t = unwrap_handle<Trainer>(info[0], "Trainer");
  std::string dir = str_arg(info, 1, "checkpoint folder");
  Napi::Object o = obj_arg(info, 2);
  std::optional<std::map<std::string, int64_t>> steps;
  if (o.Get("optimizerSteps").IsObject()) {
    steps.emplace();
    for_each_property(o.Get("optimizerSteps").As<Napi::Object>(), [&](const std::string& k, const Napi::Value& v) { (*steps)[k] = v.As<Napi::Number>().Int64Value(); });
  }
  std::optional<Trainer::ScalerState> scaler;
  if (o.Get("scaler").IsObject()) {
    Napi::Object so = o.Get("scaler").As<Napi::Object>();
    scaler = Trainer::ScalerState{num_opt(so, "scale", 1), static_cast<int64_t>(num_opt(so, "growthTracker", 0)), bool_opt(so, "enabled", false)};
  }
  std::vector<std::pair<std::string, std::vector<uint8_t>>> rng;
  if (o.Get("rng").IsObject()) {
    for_each_property(o.Get("rng").As<Napi::Object>(), [&](const std::string& k, const Napi::Value& v) { rng.emplace_back(k, unbase64(env, v.As<Napi::String>().Utf8Value())); });
  }
  return Engine::of(env).run(env, [t, dir, steps, scaler, rng] {
    t->load_trainable_state(st::load(dir + "/model.safetensors"), dir + "/model.safetensors");
    if (steps) t->load_optimizer(st::load(dir + "/optimizer.safetensors"), *steps, dir + "/optimizer.safetensors");
    if (scaler) t->set_scaler(*scaler);
    if (!rng.empty()) t->set_rng_state(rng);
    return Completion();
  });
}

// vaeEncode(pipeline, pixelValues [B,3,H,W]) -> [mean, std] of the latent distribution (before scaling_factor)
Napi::Value VaeEncode(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto p = unwrap_handle<Pipeline>(info[0], "Pipeline");
  auto px = std::make_shared<HostTensor>(host_from_js(env, info[1], 0));
  return Engine::of(env).run(env, [p, px] {
    if (!p->vae) throw UserError("EINPUT", "the VAE is not loaded");
    torch::NoGradGuard ng;
    auto post = p->vae->encode(host_to_tensor(*px).to(p->device));  // encode converts to the VAE's own dtype
    auto hosts = std::make_shared<std::vector<HostTensor>>();
    hosts->push_back(to_host("mean", post.mean.to(torch::kFloat32)));
    hosts->push_back(to_host("std", post.std.to(torch::kFloat32)));
    return Completion([hosts](Napi::Env env) { return hosts_to_js(env, *hosts); });
  });
}

// latentCacheCreate(pipeline) -> an empty latent cache on the pipeline's VAE (train/latent_cache.h).
Napi::Value LatentCacheCreate(const Napi::CallbackInfo& info) {
  auto p = unwrap_handle<Pipeline>(info[0], "Pipeline");
  return wrap_handle(info.Env(), std::make_shared<LatentCache>(p), "LatentCache");
}

// latentCacheEncode(cache, items, pixelValues [B,3,H,W], lossMask? [B,1,h,w]) -> the latent shape [C,h,w]
Napi::Value LatentCacheEncode(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto c = unwrap_handle<LatentCache>(info[0], "LatentCache");
  auto items = items_from_js(env, info[1], "items");
  auto px = std::make_shared<HostTensor>(host_from_js(env, info[2], 2));
  std::shared_ptr<HostTensor> mask;
  if (info.Length() > 3 && !info[3].IsUndefined() && !info[3].IsNull()) mask = std::make_shared<HostTensor>(host_from_js(env, info[3], 3));
  return Engine::of(env).run(env, [c, items, px, mask] {
    auto shape = c->encode(items, host_to_tensor(*px), mask ? host_to_tensor(*mask) : torch::Tensor());
    return Completion([shape](Napi::Env env) -> Napi::Value { return shape_to_js(env, shape); });
  });
}

// latentCacheFix(cache, items, z, noise): the validation loss's fixed latents and noise (LatentCache::fix).
Napi::Value LatentCacheFix(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto c = unwrap_handle<LatentCache>(info[0], "LatentCache");
  auto items = items_from_js(env, info[1], "items");
  auto z = std::make_shared<HostTensor>(host_from_js(env, info[2], 2));
  auto noise = std::make_shared<HostTensor>(host_from_js(env, info[3], 3));
  return Engine::of(env).run(env, [c, items, z, noise] {
    c->fix(items, host_to_tensor(*z), host_to_tensor(*noise));
    return Completion();
  });
}

// trainerLoadLora(trainer, file): initial adapter weights from a LoRA file (diffusers, PEFT or kohya keys); the rules
// are init_lora_from_file's (lora/lora.h).
Napi::Value TrainerLoadLora(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto t = unwrap_handle<Trainer>(info[0], "Trainer");
  std::string file = str_arg(info, 1, "LoRA file");
  return Engine::of(env).run(env, [t, file] {
    Pipeline& p = t->pipeline();
    std::map<std::string, torch::nn::Module*> models{{"unet", p.unet.get()}};
    if (p.text_encoder) models["text_encoder"] = p.text_encoder.get();
    const size_t n = init_lora_from_file(file, models, t->config().lora.alpha, t->config().train_text_encoder, p.device);
    return Completion([n](Napi::Env env) { return Napi::Number::New(env, static_cast<double>(n)); });
  });
}

Napi::Value Dispose(const Napi::CallbackInfo& info) {
  if (info.Length() < 1) throw Napi::TypeError::New(info.Env(), "dispose(handle)");
  dispose_handle(info.Env(), info[0]);
  return info.Env().Undefined();
}

Napi::Object Init(Napi::Env env, Napi::Object exports) {
  register_area_bindings(env, exports);
  env.SetInstanceData<Engine>(new Engine(env));
  export_bindings(env, exports, {
      {"version", Version}, {"devices", Devices}, {"safetensorsHeader", SafetensorsHeader},
      {"safetensorsRead", SafetensorsRead}, {"safetensorsWrite", SafetensorsWrite}, {"dispose", Dispose},
      {"loadPipeline", LoadPipeline}, {"setAllowTf32", SetAllowTf32}, {"shutdown", Shutdown},
      {"liveHandles", LiveHandles}, {"forward", Forward}, {"writeRandomWeights", WriteRandomWeights},
      {"createTrainer", CreateTrainer},
      {"trainerMicroStep", TrainerMicroStep}, {"trainerGraphStatus", TrainerGraphStatus},
      {"trainerEvalLoss", TrainerEvalLoss}, {"trainerOptimizerStep", TrainerOptimizerStep},
      {"trainerSaveState", TrainerSaveState}, {"trainerLoadState", TrainerLoadState},
      {"trainerLoadLora", TrainerLoadLora}, {"vaeEncode", VaeEncode}, {"latentCacheCreate", LatentCacheCreate},
      {"latentCacheEncode", LatentCacheEncode}, {"latentCacheFix", LatentCacheFix}
  });
  return exports;
}

}  // namespace
}  // namespace tl

static Napi::Object InitTrainLora(Napi::Env env, Napi::Object exports) { return tl::Init(env, exports); }
NODE_API_MODULE(train_lora, InitTrainLora)
