// Typed reads from a config.json with defaults for missing keys (older files have fewer keys) and errors that
// name the file, the key and what is accepted.
#pragma once
#include <string>
#include <vector>

#include "engine.h"
#include "json.h"

namespace tl {

// An error in a config.json: names the file, the key (when there is one) and what is wrong or accepted.
[[noreturn]] inline void config_error(const std::string& path, const std::string& key, const std::string& what) {
  throw UserError("EBADCONFIG", path + (key.empty() ? "" : ": \"" + key + "\"") + ": " + what);
}

// A value shortened for messages.
inline std::string json_brief(const Json& v) {
  std::string s = v.dump();
  if (s.size() > 60) {
    s.resize(57);
    s += "...";
  }
  return s;
}

// Missing and null keys both mean "use the default" (older files have fewer keys).
inline bool present(const Json& j, const std::string& key) { return j.has(key) && !j[key].is_null(); }

class ConfigReader {
 public:
  ConfigReader(const Json& j, std::string path) : j_(j), path_(std::move(path)) {
    if (!j_.is_object()) fail("", "the file must hold a JSON object");
  }
  [[noreturn]] void fail(const std::string& key, const std::string& what) const { config_error(path_, key, what); }
  bool present(const std::string& key) const { return tl::present(j_, key); }
  const Json& raw(const std::string& key) const { return j_[key]; }

  int64_t integer(const std::string& key, int64_t def) const {
    if (!present(key)) return def;
    try {
      return j_[key].as_int();
    } catch (const std::exception& e) {
      fail(key, std::string("must be an integer (") + e.what() + ")");
    }
  }
  double number(const std::string& key, double def) const {
    if (!present(key)) return def;
    if (!j_[key].is_number()) fail(key, "must be a number, got " + j_[key].type_name());
    return j_[key].as_number();
  }
  bool boolean(const std::string& key, bool def) const {
    if (!present(key)) return def;
    if (!j_[key].is_bool()) fail(key, "must be true or false, got " + j_[key].type_name());
    return j_[key].as_bool();
  }
  std::string string(const std::string& key, const std::string& def) const {
    if (!present(key)) return def;
    if (!j_[key].is_string()) fail(key, "must be a string, got " + j_[key].type_name());
    return j_[key].as_string();
  }
  std::string choice(const std::string& key, const std::string& def, const std::vector<std::string>& accepted) const {
    std::string v = string(key, def);
    for (const auto& a : accepted)
      if (a == v) return v;
    std::string list;
    for (const auto& a : accepted) list += (list.empty() ? "" : ", ") + a;
    fail(key, "\"" + v + "\" is not supported (supported: " + list + ")");
  }
  std::vector<std::string> strings(const std::string& key, const std::vector<std::string>& def) const {
    if (!present(key)) return def;
    if (!j_[key].is_array()) fail(key, "must be a list of strings");
    std::vector<std::string> out;
    for (const auto& v : j_[key].as_array()) {
      if (!v.is_string()) fail(key, "must be a list of strings");
      out.push_back(v.as_string());
    }
    return out;
  }
  // An int broadcast to n entries, or a list of exactly n ints.
  std::vector<int64_t> ints(const std::string& key, std::vector<int64_t> def, size_t n) const {
    std::vector<int64_t> out;
    if (!present(key)) {
      out = def;
    } else if (j_[key].is_number()) {
      out.assign(n ? n : 1, integer(key, 0));
    } else if (j_[key].is_array()) {
      for (const auto& v : j_[key].as_array()) {
        if (!v.is_number()) fail(key, "must be an integer or a list of integers");
        out.push_back(v.as_int());
      }
    } else {
      fail(key, "must be an integer or a list of integers");
    }
    if (n && out.size() == 1 && n > 1) out.assign(n, out[0]);
    if (n && out.size() != n) fail(key, "has " + std::to_string(out.size()) + " entries, expected " + std::to_string(n) + " (one per block)");
    return out;
  }
  std::vector<bool> bools(const std::string& key, bool def, size_t n) const {
    if (!present(key)) return std::vector<bool>(n, def);
    if (j_[key].is_bool()) return std::vector<bool>(n, j_[key].as_bool());
    if (!j_[key].is_array() || j_[key].as_array().size() != n) fail(key, "must be true/false or a list of one per block");
    std::vector<bool> out;
    for (const auto& v : j_[key].as_array()) {
      if (!v.is_bool()) fail(key, "must be true/false or a list of booleans");
      out.push_back(v.as_bool());
    }
    return out;
  }
  // Keys whose presence with a non-default value means a model variant this implementation does not have.
  void require_null(const std::string& key, const std::string& why = "") const {
    if (present(key)) fail(key, "is " + j_[key].dump() + "; only null is supported" + (why.empty() ? "" : " (" + why + ")"));
  }
  void require_value(const std::string& key, const Json& expected) const {
    if (present(key) && j_[key].dump() != expected.dump())
      fail(key, "is " + j_[key].dump() + "; only " + expected.dump() + " is supported");
  }

 private:
  const Json& j_;
  std::string path_;
};

}  // namespace tl
