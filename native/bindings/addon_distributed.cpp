// Bindings of the distributed area (src/native.ts: distBackends, distInit, distAttachTrainer, distAllReduce,
// distBarrier, distDestroy, trainerRngState). A process group is an opaque handle; collectives run on the torch thread, in the
// order JS issues them, so every rank must issue the same sequence.
#include <napi.h>

#include "bindings/bindings.h"
#include "runtime/distributed.h"
#include "runtime/engine.h"
#include "bindings/napi_util.h"
#include "train/trainer.h"

namespace tl {
namespace {

std::chrono::milliseconds ms_arg(double v) { return std::chrono::milliseconds(static_cast<int64_t>(v)); }

Napi::Value DistBackends(const Napi::CallbackInfo& info) {
  auto names = dist_backends();
  Napi::Array a = Napi::Array::New(info.Env(), names.size());
  for (size_t i = 0; i < names.size(); ++i) a.Set(static_cast<uint32_t>(i), names[i]);
  return a;
}

// distInit({backend, masterAddr, masterPort, rank, worldSize, timeoutMs, device, bucketBytes})
Napi::Value DistInit(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Napi::Object o = obj_arg(info, 0);
  DistOptions d;
  if (auto v = opt_str(o, "backend")) d.backend = *v;
  if (auto v = opt_str(o, "masterAddr")) d.master_addr = *v;
  if (auto v = opt_str(o, "device")) d.device = *v;
  d.master_port = static_cast<int>(num_opt(o, "masterPort", 29500));
  d.rank = static_cast<int>(num_opt(o, "rank", 0));
  d.world_size = static_cast<int>(num_opt(o, "worldSize", 1));
  d.timeout = ms_arg(num_opt(o, "timeoutMs", 30 * 60 * 1000));
  d.bucket_bytes = static_cast<int64_t>(num_opt(o, "bucketBytes", static_cast<double>(d.bucket_bytes)));
  return Engine::of(env).run(env, [d] {
    auto g = std::make_shared<ProcessGroup>(d);
    return Completion([g](Napi::Env env) { return wrap_handle(env, g, "ProcessGroup"); });
  });
}

// distAttachTrainer(group, trainer): the trainer draws its rows of the global batch and averages gradients.
Napi::Value DistAttachTrainer(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto g = unwrap_handle<ProcessGroup>(info[0], "ProcessGroup");
  auto t = unwrap_handle<Trainer>(info[1], "Trainer");
  return Engine::of(env).run(env, [g, t] {
    t->data_parallel.rank = g->rank();
    t->data_parallel.world_size = g->world_size();
    std::weak_ptr<ProcessGroup> weak = g;
    t->data_parallel.reduce_grads = [weak](std::vector<torch::Tensor>& grads) {
      auto pg = weak.lock();
      if (!pg) throw UserError("EDIST", "the process group of this trainer was released");
      pg->average(grads);
    };
    return Completion([](Napi::Env env) { return env.Undefined(); });
  });
}

Napi::Value DistAllReduce(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto g = unwrap_handle<ProcessGroup>(info[0], "ProcessGroup");
  if (info.Length() < 2 || !info[1].IsArray()) throw Napi::TypeError::New(env, "distAllReduce(group, values: number[], op)");
  Napi::Array a = info[1].As<Napi::Array>();
  std::vector<double> values;
  for (uint32_t i = 0; i < a.Length(); ++i) {
    if (!a.Get(i).IsNumber()) throw Napi::TypeError::New(env, "distAllReduce: values must be numbers");
    values.push_back(a.Get(i).As<Napi::Number>().DoubleValue());
  }
  std::string op = info.Length() > 2 && info[2].IsString() ? info[2].As<Napi::String>().Utf8Value() : "sum";
  return Engine::of(env).run(env, [g, values, op] {
    auto out = g->all_reduce(values, op);
    return Completion([out](Napi::Env env) -> Napi::Value {
      Napi::Array r = Napi::Array::New(env, out.size());
      for (size_t i = 0; i < out.size(); ++i) r.Set(static_cast<uint32_t>(i), out[i]);
      return r;
    });
  });
}

Napi::Value DistBarrier(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto g = unwrap_handle<ProcessGroup>(info[0], "ProcessGroup");
  if (info.Length() < 2 || !info[1].IsNumber()) throw Napi::TypeError::New(env, "distBarrier(group, timeoutMs, what)");
  auto timeout = ms_arg(info[1].As<Napi::Number>().DoubleValue());
  std::string what = info.Length() > 2 && info[2].IsString() ? info[2].As<Napi::String>().Utf8Value() : "barrier";
  return Engine::of(env).run(env, [g, timeout, what] {
    g->barrier(timeout, what);
    return Completion([](Napi::Env env) { return env.Undefined(); });
  });
}

Napi::Value DistDestroy(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto g = unwrap_handle<ProcessGroup>(info[0], "ProcessGroup");
  return Engine::of(env).run(env, [g] {
    g->destroy();
    return Completion([](Napi::Env env) { return env.Undefined(); });
  });
}

// trainerRngState(trainer): {stream: base64} of the generator states, without writing anything (ranks > 0 save
// only this into a checkpoint).
Napi::Value TrainerRngState(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto t = unwrap_handle<Trainer>(info[0], "Trainer");
  return Engine::of(env).run(env, [t] {
    auto rng = t->rng_state();
    return Completion([rng](Napi::Env env) -> Napi::Value {
      Napi::Object o = Napi::Object::New(env);
      for (const auto& [name, bytes] : rng) o.Set(name, base64(bytes));
      return o;
    });
  });
}

}  // namespace

void register_distributed(Napi::Env env, Napi::Object exports) {
  export_bindings(env, exports, {
      {"distBackends", DistBackends}, {"distInit", DistInit}, {"distAttachTrainer", DistAttachTrainer},
      {"distAllReduce", DistAllReduce}, {"distBarrier", DistBarrier}, {"distDestroy", DistDestroy},
      {"trainerRngState", TrainerRngState}
  });
}

}  // namespace tl
