#include "io/weights.h"

#include <sys/stat.h>

#include <fstream>
#include <set>
#include <sstream>

#include "runtime/engine.h"

namespace tl {
namespace {

bool file_exists(const std::string& p) {
  struct stat sb;
  return ::stat(p.c_str(), &sb) == 0 && S_ISREG(sb.st_mode);
}

std::string shape_str(const std::vector<int64_t>& s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

std::string dirname_of(const std::string& p) {
  auto s = p.find_last_of('/');
  return s == std::string::npos ? "." : p.substr(0, s);
}

}  // namespace

bool is_lora_param(const std::string& name) {
  return name.find(".lora_A.") != std::string::npos || name.find(".lora_B.") != std::string::npos;
}

Json read_json_file(const std::string& path) {
  std::ifstream f(path);
  if (!f) throw UserError("ENOENT", path + ": file not found");
  std::stringstream ss;
  ss << f.rdbuf();
  try {
    return Json::parse(ss.str());
  } catch (const std::exception& e) {
    throw UserError("EBADCONFIG", path + ": " + e.what());
  }
}

WeightSource WeightSource::open_file(const std::string& path) {
  WeightSource s;
  auto f = std::make_shared<st::File>(path);
  for (const auto& t : f->header().tensors) s.where_[t.name] = 0;
  s.files_.push_back(std::move(f));
  return s;
}

WeightSource WeightSource::open_component(const std::string& dir, const std::string& stem, const std::string& variant) {
  const std::string suffix = variant.empty() ? "" : "." + variant;
  const std::string single = dir + "/" + stem + suffix + ".safetensors";
  const std::string index = dir + "/" + stem + ".safetensors.index" + suffix + ".json";
  const std::string index_alt = dir + "/" + stem + suffix + ".safetensors.index.json";
  if (file_exists(single)) return open_file(single);
  for (const auto& idx : {index, index_alt}) {
    if (!file_exists(idx)) continue;
    Json j = read_json_file(idx);
    if (!j["weight_map"].is_object()) throw UserError("EBADCONFIG", idx + ": missing \"weight_map\" object");
    WeightSource s;
    std::map<std::string, size_t> file_index;
    for (const auto& [key, file] : j["weight_map"].as_object()) {
      if (!file.is_string()) throw UserError("EBADCONFIG", idx + ": weight_map[\"" + key + "\"] must be a file name");
      const std::string& fname = file.as_string();
      if (fname.find('/') != std::string::npos || fname.find("..") != std::string::npos)
        throw UserError("EBADCONFIG", idx + ": shard name \"" + fname + "\" must be a plain file name");
      auto it = file_index.find(fname);
      if (it == file_index.end()) {
        s.files_.push_back(std::make_shared<st::File>(dir + "/" + fname));
        it = file_index.emplace(fname, s.files_.size() - 1).first;
      }
      if (!s.files_[it->second]->header().find(key))
        throw UserError("EBADWEIGHTS", idx + ": lists \"" + key + "\" in " + fname + ", but that shard has no such tensor");
      s.where_[key] = it->second;
    }
    return s;
  }
  for (const char* ext : {".bin", ".ckpt", ".pt", ".pth"}) {
    std::string pickle = dir + "/" + (stem == "model" ? std::string("pytorch_model") : stem) + suffix + ext;
    if (file_exists(pickle))
      throw UserError("EPICKLE", pickle + ": pickle checkpoints are never loaded (they can run arbitrary code). Convert the "
                                 "folder to safetensors once, e.g. in Python: `Pipeline.from_pretrained(dir).save_pretrained(dir, "
                                 "safe_serialization=True)`, then try again.");
  }
  if (!variant.empty() && file_exists(dir + "/" + stem + ".safetensors"))
    throw UserError("ENOENT", single + ": not found (this folder has no \"" + variant + "\" variant; drop --variant to load " + stem +
                                  ".safetensors)");
  throw UserError("ENOENT", single + ": not found (expected " + stem + suffix + ".safetensors or a sharded " + stem +
                                ".safetensors.index.json in " + dir + ")");
}

std::vector<std::string> WeightSource::keys() const {
  std::vector<std::string> k;
  for (const auto& [name, _] : where_) k.push_back(name);
  return k;
}

std::vector<int64_t> WeightSource::shape(const std::string& key) const {
  auto it = where_.find(key);
  if (it == where_.end()) throw std::out_of_range(key);
  return files_[it->second]->header().find(key)->shape;
}

torch::Tensor WeightSource::get(const std::string& key, std::optional<torch::ScalarType> dtype,
                                std::optional<torch::Device> device) const {
  auto it = where_.find(key);
  if (it == where_.end()) throw UserError("EBADWEIGHTS", describe() + ": has no tensor \"" + key + "\"");
  const auto& f = *files_[it->second];
  torch::Tensor t = f.get(key);
  if (dtype && t.is_floating_point() && t.scalar_type() != *dtype) t = t.to(*dtype);
  if (device && t.device() != *device) t = t.to(*device);
  return t;
}

std::string WeightSource::describe() const {
  if (files_.size() == 1) return files_[0]->path();
  if (files_.empty()) return "(no weights)";
  return dirname_of(files_[0]->path()) + " (" + std::to_string(files_.size()) + " shards)";
}

void load_module(torch::nn::Module& m, const WeightSource& src, const LoadOptions& opts, const std::string& component) {
  torch::NoGradGuard ng;
  auto params = m.named_parameters(true);
  std::map<std::string, torch::Tensor> wanted;
  for (auto& p : params) {
    if (is_lora_param(p.key())) continue;  // LoRA parameters are not part of the base checkpoint
    wanted[p.key()] = p.value();
  }
  std::vector<std::string> unexpected, mismatched;
  std::set<std::string> found;
  std::map<std::string, std::string> key_for;  // module name -> file key
  for (const auto& key : src.keys()) {
    std::string name = opts.rename ? opts.rename(key) : key;
    if (name.empty()) continue;
    auto it = wanted.find(name);
    if (it == wanted.end()) {
      unexpected.push_back(key);
      continue;
    }
    auto fs = src.shape(key);
    auto ms = it->second.sizes().vec();
    if (fs != ms) {
      mismatched.push_back(key + ": checkpoint " + shape_str(fs) + " vs model " + shape_str(ms));
      continue;
    }
    found.insert(name);
    key_for[name] = key;
  }
  std::vector<std::string> missing;
  for (const auto& [name, _] : wanted)
    if (!found.count(name)) missing.push_back(name);
  if (!missing.empty() || !unexpected.empty() || !mismatched.empty()) {
    std::string msg = src.describe() + " does not match the " + component + " built from its config.json:";
    auto list = [&](const char* what, const std::vector<std::string>& v) {
      if (v.empty()) return;
      msg += std::string("\n  ") + what + " (" + std::to_string(v.size()) + "):";
      for (size_t i = 0; i < v.size() && i < 20; ++i) msg += "\n    " + v[i];
      if (v.size() > 20) msg += "\n    ... and " + std::to_string(v.size() - 20) + " more";
    };
    list("shape mismatches", mismatched);
    list("missing keys", missing);
    list("unexpected keys", unexpected);
    msg += "\n  Check that config.json belongs to these weights (same model and version).";
    throw UserError("EWEIGHTMISMATCH", msg);
  }
  for (auto& [name, param] : wanted) {
    torch::Tensor t = src.get(key_for[name], opts.dtype, opts.device);
    if (!t.is_floating_point() && param.is_floating_point()) t = t.to(param.scalar_type());
    param.set_data(t);
  }
}

}  // namespace tl
