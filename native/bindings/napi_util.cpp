#include "bindings/napi_util.h"

#include <cstring>

#include "io/safetensors.h"

namespace tl {

std::string str_arg(const Napi::CallbackInfo& info, size_t i, const char* what) {
  if (info.Length() <= i || !info[i].IsString()) throw Napi::TypeError::New(info.Env(), std::string(what) + " must be a string");
  return info[i].As<Napi::String>().Utf8Value();
}

Napi::Object obj_arg(const Napi::CallbackInfo& info, size_t i) {
  if (info.Length() <= i || info[i].IsUndefined() || info[i].IsNull()) return Napi::Object::New(info.Env());
  if (!info[i].IsObject()) throw Napi::TypeError::New(info.Env(), "options must be an object");
  return info[i].As<Napi::Object>();
}

std::optional<std::string> opt_str(const Napi::Object& o, const char* key) {
  Napi::Value v = o.Get(key);
  if (v.IsUndefined() || v.IsNull()) return std::nullopt;
  if (!v.IsString()) throw Napi::TypeError::New(o.Env(), std::string(key) + " must be a string");
  return v.As<Napi::String>().Utf8Value();
}

// 'fp32' | 'fp16' | 'bf16' | 'fp64' or a safetensors dtype name.
torch::ScalarType parse_dtype(Napi::Env env, const std::string& s) {
  if (s == "fp32" || s == "float32") return torch::kFloat32;
  if (s == "fp16" || s == "float16") return torch::kFloat16;
  if (s == "bf16" || s == "bfloat16") return torch::kBFloat16;
  if (s == "fp64" || s == "float64") return torch::kFloat64;
  try {
    return st::dtype_from_name(s);
  } catch (const std::exception& e) {
    throw Napi::TypeError::New(env, std::string("unknown dtype \"") + s + "\" (use fp32, fp16, bf16 or a safetensors dtype name)");
  }
}

Napi::Array shape_to_js(Napi::Env env, const std::vector<int64_t>& shape) {
  Napi::Array a = Napi::Array::New(env, shape.size());
  for (size_t i = 0; i < shape.size(); ++i) a.Set(i, Napi::Number::New(env, static_cast<double>(shape[i])));
  return a;
}

Napi::Object metadata_to_js(Napi::Env env, const std::map<std::string, std::string>& m) {
  Napi::Object o = Napi::Object::New(env);
  for (const auto& [k, v] : m) o.Set(k, v);
  return o;
}



HostTensor to_host(const std::string& name, const torch::Tensor& t0) {
  torch::Tensor t = t0.detach().to(torch::kCPU).contiguous();
  HostTensor h;
  h.name = name;
  h.dtype = st::dtype_name(t.scalar_type());
  h.shape = t.sizes().vec();
  size_t n = static_cast<size_t>(t.numel()) * t.element_size();
  h.bytes = std::make_shared<std::vector<uint8_t>>(n);
  if (n) std::memcpy(h.bytes->data(), t.data_ptr(), n);
  return h;
}

Napi::Object host_to_js(Napi::Env env, const HostTensor& h) {
  Napi::Object o = Napi::Object::New(env);
  o.Set("name", h.name);
  o.Set("dtype", h.dtype);
  o.Set("shape", shape_to_js(env, h.shape));
  auto keep = new std::shared_ptr<std::vector<uint8_t>>(h.bytes);
  if (h.bytes->empty()) {
    o.Set("data", Napi::Buffer<uint8_t>::New(env, 0));
    delete keep;
  } else {
    o.Set("data", Napi::Buffer<uint8_t>::New(env, h.bytes->data(), h.bytes->size(),
                                               [](Napi::Env, uint8_t*, std::shared_ptr<std::vector<uint8_t>>* k) { delete k; }, keep));
  }
  return o;
}

// {name, dtype, shape, data} from JS, copied into host memory (no torch on the JS thread).
HostTensor host_from_js(Napi::Env env, const Napi::Value& v, size_t index) {
  if (!v.IsObject()) throw Napi::TypeError::New(env, "tensor #" + std::to_string(index) + " must be an object");
  Napi::Object o = v.As<Napi::Object>();
  HostTensor h;
  if (!o.Get("name").IsString()) throw Napi::TypeError::New(env, "tensor #" + std::to_string(index) + ": name must be a string");
  h.name = o.Get("name").As<Napi::String>().Utf8Value();
  if (!o.Get("dtype").IsString()) throw Napi::TypeError::New(env, "tensor \"" + h.name + "\": dtype must be a string");
  h.dtype = o.Get("dtype").As<Napi::String>().Utf8Value();
  size_t isz;
  try {
    isz = st::dtype_size(h.dtype);
  } catch (const std::exception& e) {
    throw Napi::TypeError::New(env, "tensor \"" + h.name + "\": " + e.what());
  }
  if (!o.Get("shape").IsArray()) throw Napi::TypeError::New(env, "tensor \"" + h.name + "\": shape must be an array");
  Napi::Array shape = o.Get("shape").As<Napi::Array>();
  size_t numel = 1;
  for (uint32_t i = 0; i < shape.Length(); ++i) {
    Napi::Value d = shape.Get(i);
    if (!d.IsNumber() || d.As<Napi::Number>().DoubleValue() < 0)
      throw Napi::TypeError::New(env, "tensor \"" + h.name + "\": shape entries must be non-negative integers");
    h.shape.push_back(d.As<Napi::Number>().Int64Value());
    numel *= static_cast<size_t>(h.shape.back());
  }
  Napi::Value data = o.Get("data");
  const uint8_t* ptr = nullptr;
  size_t len = 0;
  if (data.IsTypedArray()) {
    auto ta = data.As<Napi::TypedArray>();
    auto ab = ta.ArrayBuffer();
    ptr = static_cast<const uint8_t*>(ab.Data()) + ta.ByteOffset();
    len = ta.ByteLength();
  } else if (data.IsArrayBuffer()) {
    auto ab = data.As<Napi::ArrayBuffer>();
    ptr = static_cast<const uint8_t*>(ab.Data());
    len = ab.ByteLength();
  } else {
    throw Napi::TypeError::New(env, "tensor \"" + h.name + "\": data must be a Buffer, TypedArray or ArrayBuffer");
  }
  if (len != numel * isz)
    throw Napi::RangeError::New(env, "tensor \"" + h.name + "\": data has " + std::to_string(len) + " bytes, shape and dtype need " +
                                         std::to_string(numel * isz));
  h.bytes = std::make_shared<std::vector<uint8_t>>(ptr, ptr + len);
  return h;
}

torch::Tensor host_to_tensor(const HostTensor& h) {
  auto t = torch::empty(h.shape, torch::TensorOptions().dtype(st::dtype_from_name(h.dtype)));
  if (!h.bytes->empty()) std::memcpy(t.data_ptr(), h.bytes->data(), h.bytes->size());
  return t;
}

std::map<std::string, std::string> metadata_from_js(Napi::Env env, const Napi::Value& v) {
  std::map<std::string, std::string> m;
  if (v.IsUndefined() || v.IsNull()) return m;
  if (!v.IsObject()) throw Napi::TypeError::New(env, "metadata must be an object of strings");
  for_each_property(v.As<Napi::Object>(), [&](const std::string& k, const Napi::Value& val) {
    if (!val.IsString()) throw Napi::TypeError::New(env, "metadata[\"" + k + "\"] must be a string");
    m[k] = val.As<Napi::String>().Utf8Value();
  });
  return m;
}

torch::Device parse_device(Napi::Env env, const std::string& s) {
  try {
    return torch::Device(s);
  } catch (const std::exception&) {
    throw Napi::TypeError::New(env, "unknown device \"" + s + "\" (use cpu, cuda, cuda:N or mps)");
  }
}

std::vector<HostTensor> hosts_from_js(Napi::Env env, const Napi::Value& v, const char* what) {
  if (v.IsUndefined() || v.IsNull()) return {};
  if (!v.IsArray()) throw Napi::TypeError::New(env, std::string(what) + " must be an array of {name, dtype, shape, data}");
  Napi::Array arr = v.As<Napi::Array>();
  std::vector<HostTensor> out;
  for (uint32_t i = 0; i < arr.Length(); ++i) out.push_back(host_from_js(env, arr.Get(i), i));
  return out;
}

Napi::Value hosts_to_js(Napi::Env env, const std::vector<HostTensor>& hs) {
  Napi::Array a = Napi::Array::New(env, hs.size());
  for (size_t i = 0; i < hs.size(); ++i) a.Set(i, host_to_js(env, hs[i]));
  return a;
}

double num_opt(const Napi::Object& o, const char* key, double def) {
  Napi::Value v = o.Get(key);
  if (v.IsUndefined() || v.IsNull()) return def;
  if (!v.IsNumber()) throw Napi::TypeError::New(o.Env(), std::string(key) + " must be a number");
  return v.As<Napi::Number>().DoubleValue();
}

bool bool_opt(const Napi::Object& o, const char* key, bool def) {
  Napi::Value v = o.Get(key);
  if (v.IsUndefined() || v.IsNull()) return def;
  if (!v.IsBoolean()) throw Napi::TypeError::New(o.Env(), std::string(key) + " must be a boolean");
  return v.As<Napi::Boolean>().Value();
}

// Standard base64 (RNG states travel to JSON this way).
std::string base64(const std::vector<uint8_t>& in) {
  static const char* tbl = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  std::string out;
  size_t i = 0;
  for (; i + 2 < in.size(); i += 3) {
    uint32_t v = (in[i] << 16) | (in[i + 1] << 8) | in[i + 2];
    out += tbl[v >> 18], out += tbl[(v >> 12) & 63], out += tbl[(v >> 6) & 63], out += tbl[v & 63];
  }
  if (i + 1 == in.size()) {
    uint32_t v = in[i] << 16;
    out += tbl[v >> 18], out += tbl[(v >> 12) & 63], out += "==";
  } else if (i + 2 == in.size()) {
    uint32_t v = (in[i] << 16) | (in[i + 1] << 8);
    out += tbl[v >> 18], out += tbl[(v >> 12) & 63], out += tbl[(v >> 6) & 63], out += '=';
  }
  return out;
}

// Its inverse; anything else than base64 is an error.
std::vector<uint8_t> unbase64(Napi::Env env, const std::string& s) {
  auto val = [&](char c) -> int {
    if (c >= 'A' && c <= 'Z') return c - 'A';
    if (c >= 'a' && c <= 'z') return c - 'a' + 26;
    if (c >= '0' && c <= '9') return c - '0' + 52;
    if (c == '+') return 62;
    if (c == '/') return 63;
    return -1;
  };
  std::vector<uint8_t> out;
  uint32_t buf = 0;
  int bits = 0;
  for (char c : s) {
    if (c == '=') break;
    int v = val(c);
    if (v < 0) throw Napi::Error::New(env, "invalid base64 in an RNG state");
    buf = (buf << 6) | static_cast<uint32_t>(v);
    bits += 6;
    if (bits >= 8) {
      bits -= 8;
      out.push_back(static_cast<uint8_t>((buf >> bits) & 0xFF));
    }
  }
  return out;
}

}  // namespace tl
