// Argument checking and host-tensor conversion shared by the binding files (addon*.cpp). Everything here runs on
// the JS thread except to_host/host_to_tensor, which run on the torch thread.
#pragma once
#include <napi.h>

#include <torch/torch.h>

#include <map>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace tl {

// A tensor's bytes on the host, ready to become a JS Buffer.
struct HostTensor {
  std::string name, dtype;
  std::vector<int64_t> shape;
  std::shared_ptr<std::vector<uint8_t>> bytes;
};

std::string str_arg(const Napi::CallbackInfo& info, size_t i, const char* what);
Napi::Object obj_arg(const Napi::CallbackInfo& info, size_t i);
std::optional<std::string> opt_str(const Napi::Object& o, const char* key);
// o[key] as one of `table`'s names (the C++ enum behind it), `def` when absent; another name is a TypeError
// listing the accepted ones.
template <typename E>
E enum_opt(const Napi::Object& o, const char* key, E def, const std::vector<std::pair<std::string, E>>& table) {
  auto v = opt_str(o, key);
  if (!v) return def;
  std::string names;
  for (const auto& [name, value] : table) {
    if (name == *v) return value;
    names += (names.empty() ? "" : ", ") + name;
  }
  throw Napi::TypeError::New(o.Env(), std::string(key) + " must be one of " + names + ", got \"" + *v + "\"");
}
torch::ScalarType parse_dtype(Napi::Env env, const std::string& s);
Napi::Array shape_to_js(Napi::Env env, const std::vector<int64_t>& shape);
Napi::Object metadata_to_js(Napi::Env env, const std::map<std::string, std::string>& m);
HostTensor to_host(const std::string& name, const torch::Tensor& t0);
Napi::Object host_to_js(Napi::Env env, const HostTensor& h);
HostTensor host_from_js(Napi::Env env, const Napi::Value& v, size_t index);
torch::Tensor host_to_tensor(const HostTensor& h);
std::map<std::string, std::string> metadata_from_js(Napi::Env env, const Napi::Value& v);
torch::Device parse_device(Napi::Env env, const std::string& s);
std::vector<HostTensor> hosts_from_js(Napi::Env env, const Napi::Value& v, const char* what);
Napi::Value hosts_to_js(Napi::Env env, const std::vector<HostTensor>& hs);
double num_opt(const Napi::Object& o, const char* key, double def);
// f(key, value) for each enumerable property of o, in JS order.
template <class F>
void for_each_property(const Napi::Object& o, F&& f) {
  Napi::Array keys = o.GetPropertyNames();
  for (uint32_t i = 0; i < keys.Length(); ++i) {
    std::string k = keys.Get(i).As<Napi::String>().Utf8Value();
    f(k, o.Get(k));
  }
}
bool bool_opt(const Napi::Object& o, const char* key, bool def);
// Standard base64, both ways (RNG states travel to JSON this way).
std::string base64(const std::vector<uint8_t>& in);
std::vector<uint8_t> unbase64(Napi::Env env, const std::string& s);

}  // namespace tl
