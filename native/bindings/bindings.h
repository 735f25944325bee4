// Binding files beyond addon.cpp register their functions here (one per area), so that areas stay in their own
// translation units: addon_<area>.cpp defines register_<area>(env, exports).
#pragma once
#include <napi.h>

#include <initializer_list>

namespace tl {

// Calls every area's register function (defined in bindings.cpp).
void register_area_bindings(Napi::Env env, Napi::Object exports);

// A JS-visible function: exports[name] = fn.
struct Binding {
  const char* name;
  Napi::Value (*fn)(const Napi::CallbackInfo&);
};
inline void export_bindings(Napi::Env env, Napi::Object exports, std::initializer_list<Binding> bindings) {
  for (const Binding& b : bindings) exports.Set(b.name, Napi::Function::New(env, b.fn, b.name));
}

// addon_export.cpp: loraSummary, loraExport, loraMergeComponent.
void register_export(Napi::Env env, Napi::Object exports);
// addon_distributed.cpp: distInit, distAllReduce, distBarrier, ...
void register_distributed(Napi::Env env, Napi::Object exports);
// addon_sampling.cpp: samplerCreate, samplerStep, samplerDecode, pipelineApplyLora.
void register_sampling(Napi::Env env, Napi::Object exports);
// addon_models.cpp: singleFileConfigs.
void register_models(Napi::Env env, Napi::Object exports);

}  // namespace tl
