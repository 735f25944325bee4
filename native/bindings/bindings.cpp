#include "bindings/bindings.h"

namespace tl {

void register_area_bindings(Napi::Env env, Napi::Object exports) {
  register_export(env, exports);
  register_distributed(env, exports);
  register_sampling(env, exports);
  register_models(env, exports);
}

}  // namespace tl
