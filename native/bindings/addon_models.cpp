// Bindings of the model-loading area: singleFileConfigs (native/single_file.h). Typed in src/native.ts.
#include <napi.h>

#include "bindings/bindings.h"
#include "runtime/engine.h"
#include "bindings/napi_util.h"
#include "pipeline/pipeline.h"

namespace tl {
namespace {

// singleFileConfigs(file) -> JSON text {"unet": {...}, "vae": {...}, "text_encoder": {...}}: the configs inferred from
// a single-file SD 1.x checkpoint's tensors (header only; no weights are read). Rejects EMODELFILE for other families.
Napi::Value SingleFileConfigs(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::string file = str_arg(info, 0, "checkpoint file");
  return Engine::of(env).run(env, [file] {
    auto text = std::make_shared<std::string>(single_file_configs_json(file));
    return Completion([text](Napi::Env env) { return Napi::String::New(env, *text); });
  });
}

}  // namespace

void register_models(Napi::Env env, Napi::Object exports) { export_bindings(env, exports, {{"singleFileConfigs", SingleFileConfigs}}); }

}  // namespace tl
