// Typed reads from a config.json with defaults for missing keys (older files have fewer keys) and errors that
// name the file, the key and what is accepted.
#pragma once
#include <algorithm>
#include <cctype>
#include <climits>
#include <cmath>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "runtime/engine.h"
#include "io/json.h"

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

// The one reader of config.json files (UNet, VAE, CLIP text encoder): typed values with defaults for missing keys
// (older files have fewer keys), the checks every model needs (integers, minimums, finite numbers, lists, choices,
// enums) and errors that name the file, the key and what is accepted.
class ConfigReader {
 public:
  static constexpr int64_t kNoMin = INT64_MIN;

  ConfigReader(const Json& j, std::string path) : j_(j), path_(std::move(path)) {
    if (!j_.is_object()) fail("", "the file must hold a JSON object");
  }
  [[noreturn]] void fail(const std::string& key, const std::string& what) const { config_error(path_, key, what); }
  bool present(const std::string& key) const { return tl::present(j_, key); }
  const Json& raw(const std::string& key) const { return j_[key]; }
  const std::string& path() const { return path_; }

  static bool is_integer(const Json& v) {
    return v.is_number() && v.as_number() == std::floor(v.as_number()) && std::fabs(v.as_number()) < 9.0e15;
  }

  int64_t integer(const std::string& key, int64_t def, int64_t min_value = kNoMin) const {
    if (!present(key)) return def;
    if (!is_integer(j_[key])) fail(key, "must be an integer, got " + json_brief(j_[key]));
    return at_least(key, j_[key].as_int(), min_value);
  }
  // A finite number (NaN and infinities are not JSON, but our parser accepts them from Python's json.dump).
  double number(const std::string& key, double def) const {
    if (!present(key)) return def;
    if (!j_[key].is_number() || !std::isfinite(j_[key].as_number())) fail(key, "must be a number, got " + json_brief(j_[key]));
    return j_[key].as_number();
  }
  double positive(const std::string& key, double def) const {
    double x = number(key, def);
    if (!(x > 0)) fail(key, "must be positive, got " + json_brief(Json(x)));
    return x;
  }
  bool boolean(const std::string& key, bool def) const {
    if (!present(key)) return def;
    if (!j_[key].is_bool()) fail(key, "must be true or false, got " + json_brief(j_[key]));
    return j_[key].as_bool();
  }
  std::string string(const std::string& key, const std::string& def) const {
    if (!present(key)) return def;
    if (!j_[key].is_string()) fail(key, "must be a string, got " + json_brief(j_[key]));
    return j_[key].as_string();
  }
  std::string choice(const std::string& key, const std::string& def, const std::vector<std::string>& accepted) const {
    std::string v = string(key, def);
    check_choice(key, v, accepted);
    return v;
  }
  // One of `table`'s names, as its enum value. `fold_case`: diffusers lower-cases some names (get_activation).
  template <typename E>
  E enumerated(const std::string& key, E def, const std::vector<std::pair<std::string, E>>& table, bool fold_case = false) const {
    if (!present(key)) return def;
    std::string v = string(key, "");
    if (fold_case)
      std::transform(v.begin(), v.end(), v.begin(), [](unsigned char ch) { return static_cast<char>(std::tolower(ch)); });
    for (const auto& [name, value] : table)
      if (name == v) return value;
    std::vector<std::string> names;
    for (const auto& entry : table) names.push_back(entry.first);
    fail(key, "\"" + j_[key].as_string() + "\" is not supported (supported: " + join(names) + ")");
  }
  std::vector<std::string> strings(const std::string& key, const std::vector<std::string>& def) const {
    if (!present(key)) return def;
    if (!j_[key].is_array()) fail(key, "must be a list of strings, got " + json_brief(j_[key]));
    std::vector<std::string> out;
    for (const auto& v : j_[key].as_array()) {
      if (!v.is_string()) fail(key, "must be a list of strings, got " + json_brief(j_[key]));
      out.push_back(v.as_string());
    }
    return out;
  }
  // A list of names, each one of `accepted` (block types).
  std::vector<std::string> choices(const std::string& key, const std::vector<std::string>& def, const std::vector<std::string>& accepted) const {
    std::vector<std::string> out = strings(key, def);
    for (const auto& v : out) check_choice(key, v, accepted);
    return out;
  }
  // A list of integers (no broadcasting), each at least min_value.
  std::vector<int64_t> int_list(const std::string& key, const std::vector<int64_t>& def, int64_t min_value = kNoMin) const {
    if (!present(key)) return def;
    if (!j_[key].is_array()) fail(key, "must be a list of integers, got " + json_brief(j_[key]));
    std::vector<int64_t> out;
    for (const auto& v : j_[key].as_array()) {
      if (!is_integer(v)) fail(key, "must be a list of integers, got " + json_brief(j_[key]));
      out.push_back(at_least(key, v.as_int(), min_value));
    }
    return out;
  }
  // A list of numbers, or nothing when the key is missing or null.
  std::optional<std::vector<double>> numbers_opt(const std::string& key) const {
    if (!present(key)) return std::nullopt;
    if (!j_[key].is_array()) fail(key, "must be null or a list of numbers, got " + json_brief(j_[key]));
    std::vector<double> out;
    for (const auto& v : j_[key].as_array()) {
      if (!v.is_number() || !std::isfinite(v.as_number())) fail(key, "must be null or a list of numbers, got " + json_brief(j_[key]));
      out.push_back(v.as_number());
    }
    return out;
  }
  // An int broadcast to n entries, or a list of exactly n ints (n = 0: any length), each at least min_value.
  std::vector<int64_t> ints(const std::string& key, std::vector<int64_t> def, size_t n, int64_t min_value = kNoMin) const {
    std::vector<int64_t> out;
    if (!present(key)) {
      out = def;
    } else if (j_[key].is_number()) {
      out.assign(n ? n : 1, integer(key, 0));
    } else if (j_[key].is_array()) {
      for (const auto& v : j_[key].as_array()) {
        if (!is_integer(v)) fail(key, "must be an integer or a list of integers, got " + json_brief(j_[key]));
        out.push_back(v.as_int());
      }
    } else {
      fail(key, "must be an integer or a list of integers, got " + json_brief(j_[key]));
    }
    if (n && out.size() == 1 && n > 1) out.assign(n, out[0]);
    if (n && out.size() != n) fail(key, "has " + std::to_string(out.size()) + " entries, expected " + std::to_string(n) + " (one per block)");
    for (int64_t x : out) at_least(key, x, min_value);
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
  // `_class_name` (diffusers) when present must be `expected`.
  void require_class(const std::string& expected) const {
    if (!present("_class_name")) return;
    std::string v = string("_class_name", "");
    if (v != expected) fail("_class_name", "\"" + v + "\" is not supported (supported: " + expected + ")");
  }

  static std::string join(const std::vector<std::string>& v) {
    std::string s;
    for (const auto& a : v) s += (s.empty() ? "" : ", ") + a;
    return s;
  }

 private:
  int64_t at_least(const std::string& key, int64_t x, int64_t min_value) const {
    if (x < min_value) fail(key, "must be at least " + std::to_string(min_value) + ", got " + std::to_string(x));
    return x;
  }
  void check_choice(const std::string& key, const std::string& v, const std::vector<std::string>& accepted) const {
    if (std::find(accepted.begin(), accepted.end(), v) == accepted.end())
      fail(key, "\"" + v + "\" is not supported (supported: " + join(accepted) + ")");
  }

  const Json& j_;
  std::string path_;
};

}  // namespace tl
