#include "bindings.h"

namespace tl {

void register_area_bindings(Napi::Env, Napi::Object) {}

}  // namespace tl
