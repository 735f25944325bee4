#include "io/json.h"

#include <cmath>
#include <cstdio>
#include <cstdlib>

namespace tl {
namespace {

class Parser {
 public:
  explicit Parser(std::string_view s) : s_(s) {}

  Json parse_document() {
    Json v = parse_value(0);
    skip_ws();
    if (i_ != s_.size()) fail("unexpected trailing characters");
    return v;
  }

 private:
  std::string_view s_;
  size_t i_ = 0;

  [[noreturn]] void fail(const std::string& what) const {
    throw std::runtime_error("invalid JSON at byte " + std::to_string(i_) + ": " + what);
  }
  void skip_ws() {
    while (i_ < s_.size() && (s_[i_] == ' ' || s_[i_] == '\t' || s_[i_] == '\n' || s_[i_] == '\r')) ++i_;
  }
  char peek() {
    skip_ws();
    if (i_ >= s_.size()) fail("unexpected end of input");
    return s_[i_];
  }
  void expect(char c) {
    if (peek() != c) fail(std::string("expected '") + c + "'");
    ++i_;
  }
  bool literal(std::string_view word) {
    if (s_.substr(i_, word.size()) == word) {
      i_ += word.size();
      return true;
    }
    return false;
  }

  Json parse_value(int depth) {
    if (depth > 64) fail("nesting too deep");
    char c = peek();
    if (c == '{') return parse_object(depth);
    if (c == '[') return parse_array(depth);
    if (c == '"') return Json(parse_string());
    if (literal("true")) return Json(true);
    if (literal("false")) return Json(false);
    if (literal("null")) return Json(nullptr);
    // Python's json writes these for non-finite floats; accept them on read.
    if (literal("NaN")) return Json(std::nan(""));
    if (literal("Infinity")) return Json(INFINITY);
    if (literal("-Infinity")) return Json(-INFINITY);
    return Json(parse_number());
  }

  // The members of an object or the elements of an array: item() for each, separated by ',' up to `close`.
  template <class F>
  void parse_items(char open, char close, F&& item) {
    expect(open);
    if (peek() == close) {
      ++i_;
      return;
    }
    while (true) {
      item();
      char c = peek();
      ++i_;
      if (c == close) return;
      if (c != ',') fail(std::string("expected ',' or '") + close + "'");
    }
  }

  Json parse_object(int depth) {
    Json::Object o;
    parse_items('{', '}', [&] {
      if (peek() != '"') fail("expected a string key");
      std::string key = parse_string();
      if (o.count(key)) fail("duplicate key \"" + key + "\"");
      expect(':');
      o.emplace(std::move(key), parse_value(depth + 1));
    });
    return Json(std::move(o));
  }

  Json parse_array(int depth) {
    Json::Array a;
    parse_items('[', ']', [&] { a.push_back(parse_value(depth + 1)); });
    return Json(std::move(a));
  }

  static void put_utf8(std::string& out, uint32_t cp) {
    if (cp < 0x80) {
      out += static_cast<char>(cp);
    } else if (cp < 0x800) {
      out += static_cast<char>(0xC0 | (cp >> 6));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    } else if (cp < 0x10000) {
      out += static_cast<char>(0xE0 | (cp >> 12));
      out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    } else {
      out += static_cast<char>(0xF0 | (cp >> 18));
      out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
      out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    }
  }

  uint32_t hex4() {
    if (i_ + 4 > s_.size()) fail("truncated \\u escape");
    uint32_t v = 0;
    for (int k = 0; k < 4; ++k) {
      char h = s_[i_++];
      v <<= 4;
      if (h >= '0' && h <= '9') v |= h - '0';
      else if (h >= 'a' && h <= 'f') v |= h - 'a' + 10;
      else if (h >= 'A' && h <= 'F') v |= h - 'A' + 10;
      else fail("bad \\u escape");
    }
    return v;
  }

  // One UTF-8 encoded code point starting at i_, validated as RFC 3629 says (no overlong forms, no surrogates,
  // nothing above U+10FFFF), appended to out. JSON text must be UTF-8 (RFC 8259): other bytes are an error.
  void utf8_sequence(std::string& out) {
    const auto b0 = static_cast<unsigned char>(s_[i_]);
    int len = b0 >= 0xF0 ? 4 : b0 >= 0xE0 ? 3 : b0 >= 0xC0 ? 2 : 0;
    if (len == 0 || b0 > 0xF4 || b0 == 0xC0 || b0 == 0xC1) fail("invalid UTF-8");
    if (i_ + len > s_.size()) fail("truncated UTF-8 sequence");
    uint32_t cp = b0 & (0xFF >> (len + 1));
    for (int k = 1; k < len; ++k) {
      const auto b = static_cast<unsigned char>(s_[i_ + k]);
      if ((b & 0xC0) != 0x80) fail("invalid UTF-8");
      cp = (cp << 6) | (b & 0x3F);
    }
    const uint32_t min = len == 2 ? 0x80 : len == 3 ? 0x800 : 0x10000;
    if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp < 0xE000)) fail("invalid UTF-8");
    out.append(s_.data() + i_, len);
    i_ += len;
  }

  std::string parse_string() {
    ++i_;  // opening quote
    std::string out;
    while (true) {
      if (i_ >= s_.size()) fail("unterminated string");
      char c = s_[i_++];
      if (c == '"') break;
      if (static_cast<unsigned char>(c) < 0x20) fail("control character in string");
      if (static_cast<unsigned char>(c) >= 0x80) {
        --i_;
        utf8_sequence(out);
        continue;
      }
      if (c != '\\') {
        out += c;
        continue;
      }
      if (i_ >= s_.size()) fail("unterminated escape");
      char e = s_[i_++];
      switch (e) {
        case '"': out += '"'; break;
        case '\\': out += '\\'; break;
        case '/': out += '/'; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'n': out += '\n'; break;
        case 'r': out += '\r'; break;
        case 't': out += '\t'; break;
        case 'u': {
          uint32_t cp = hex4();
          if (cp >= 0xDC00 && cp < 0xE000) fail("lone low surrogate");
          if (cp >= 0xD800 && cp < 0xDC00) {
            if (!(literal("\\u"))) fail("lone surrogate");
            uint32_t lo = hex4();
            if (lo < 0xDC00 || lo >= 0xE000) fail("bad surrogate pair");
            cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
          }
          put_utf8(out, cp);
          break;
        }
        default: fail("bad escape");
      }
    }
    return out;
  }

  double parse_number() {
    size_t start = i_;
    if (i_ < s_.size() && s_[i_] == '-') ++i_;
    if (i_ >= s_.size() || !(s_[i_] >= '0' && s_[i_] <= '9')) fail("unexpected character");
    while (i_ < s_.size() && ((s_[i_] >= '0' && s_[i_] <= '9') || s_[i_] == '.' || s_[i_] == 'e' || s_[i_] == 'E' ||
                              s_[i_] == '+' || s_[i_] == '-'))
      ++i_;
    std::string num(s_.substr(start, i_ - start));
    char* end = nullptr;
    double d = std::strtod(num.c_str(), &end);
    if (end != num.c_str() + num.size()) fail("bad number \"" + num + "\"");
    return d;
  }
};

void dump_string(std::string& out, const std::string& s) {
  out += '"';
  for (unsigned char c : s) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      default:
        if (c < 0x20) {
          char buf[8];
          std::snprintf(buf, sizeof buf, "\\u%04x", c);
          out += buf;
        } else {
          out += static_cast<char>(c);
        }
    }
  }
  out += '"';
}

void dump_value(std::string& out, const Json& j) {
  if (j.is_null()) {
    out += "null";
  } else if (j.is_bool()) {
    out += j.as_bool() ? "true" : "false";
  } else if (j.is_number()) {
    double d = j.as_number();
    if (std::isnan(d)) out += "NaN";
    else if (std::isinf(d)) out += d > 0 ? "Infinity" : "-Infinity";
    else if (d == std::floor(d) && std::fabs(d) < 9.007199254740992e15) out += std::to_string(static_cast<int64_t>(d));
    else {
      char buf[32];
      std::snprintf(buf, sizeof buf, "%.17g", d);
      out += buf;
    }
  } else if (j.is_string()) {
    dump_string(out, j.as_string());
  } else if (j.is_array()) {
    out += '[';
    bool first = true;
    for (const auto& v : j.as_array()) {
      if (!first) out += ',';
      first = false;
      dump_value(out, v);
    }
    out += ']';
  } else {
    out += '{';
    bool first = true;
    for (const auto& [k, v] : j.as_object()) {
      if (!first) out += ',';
      first = false;
      dump_string(out, k);
      out += ':';
      dump_value(out, v);
    }
    out += '}';
  }
}

}  // namespace

Json Json::parse(std::string_view text) { return Parser(text).parse_document(); }

std::string Json::dump() const {
  std::string out;
  dump_value(out, *this);
  return out;
}

std::string Json::type_name() const {
  if (is_null()) return "null";
  if (is_bool()) return "boolean";
  if (is_number()) return "number";
  if (is_string()) return "string";
  if (is_array()) return "array";
  return "object";
}

#define TL_JSON_EXPECT(cond, want) \
  if (!(cond)) throw std::runtime_error(std::string("expected a JSON ") + want + ", got " + type_name())

bool Json::as_bool() const {
  TL_JSON_EXPECT(is_bool(), "boolean");
  return std::get<bool>(v_);
}
double Json::as_number() const {
  TL_JSON_EXPECT(is_number(), "number");
  return std::get<double>(v_);
}
int64_t Json::as_int() const {
  double d = as_number();
  if (d != std::floor(d) || std::fabs(d) > 9.007199254740992e15)
    throw std::runtime_error("expected an integer, got " + std::to_string(d));
  return static_cast<int64_t>(d);
}
const std::string& Json::as_string() const {
  TL_JSON_EXPECT(is_string(), "string");
  return std::get<std::string>(v_);
}
const Json::Array& Json::as_array() const {
  TL_JSON_EXPECT(is_array(), "array");
  return *std::get<std::shared_ptr<Array>>(v_);
}
const Json::Object& Json::as_object() const {
  TL_JSON_EXPECT(is_object(), "object");
  return *std::get<std::shared_ptr<Object>>(v_);
}
Json::Object& Json::as_object_mut() {
  TL_JSON_EXPECT(is_object(), "object");
  return *std::get<std::shared_ptr<Object>>(v_);
}
const Json& Json::operator[](const std::string& key) const {
  static const Json null_json;
  if (!is_object()) return null_json;
  const auto& o = as_object();
  auto it = o.find(key);
  return it == o.end() ? null_json : it->second;
}

}  // namespace tl
