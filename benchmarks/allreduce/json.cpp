#include "json.h"

#include <cmath>
#include <stdexcept>

#include <fmt/format.h>

namespace meshtrain::bench {

std::string json_quote(const std::string& s) {
  std::string out = "\"";
  for (unsigned char c : s) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      default:
        if (c < 0x20) {
          out += fmt::format("\\u{:04x}", c);
        } else {
          out += static_cast<char>(c);
        }
    }
  }
  return out + "\"";
}

namespace {

std::string encode_double(double v) {
  if (!std::isfinite(v)) return "null";
  return fmt::format("{:.6g}", v);
}

}  // namespace

JsonLine& JsonLine::raw(const std::string& key, const std::string& encoded) {
  fields_.emplace_back(key, encoded);
  return *this;
}
JsonLine& JsonLine::add(const std::string& key, const std::string& value) { return raw(key, json_quote(value)); }
JsonLine& JsonLine::add(const std::string& key, double value) { return raw(key, encode_double(value)); }
JsonLine& JsonLine::add(const std::string& key, int64_t value) { return raw(key, std::to_string(value)); }
JsonLine& JsonLine::add(const std::string& key, uint64_t value) { return raw(key, std::to_string(value)); }
JsonLine& JsonLine::add(const std::string& key, bool value) { return raw(key, value ? "true" : "false"); }
JsonLine& JsonLine::add(const std::string& key, const std::vector<double>& values) {
  std::string s = "[";
  for (size_t i = 0; i < values.size(); ++i) s += (i ? "," : "") + encode_double(values[i]);
  return raw(key, s + "]");
}
JsonLine& JsonLine::add(const std::string& key, const std::vector<int64_t>& values) {
  std::string s = "[";
  for (size_t i = 0; i < values.size(); ++i) s += (i ? "," : "") + std::to_string(values[i]);
  return raw(key, s + "]");
}
JsonLine& JsonLine::merge(const JsonLine& other) {
  for (const auto& f : other.fields_) fields_.push_back(f);
  return *this;
}
std::string JsonLine::str() const {
  std::string s = "{";
  for (size_t i = 0; i < fields_.size(); ++i) s += (i ? "," : "") + json_quote(fields_[i].first) + ":" + fields_[i].second;
  return s + "}";
}

double JsonValue::number(const std::string& what) const {
  if (auto* d = std::get_if<double>(&v)) return *d;
  if (auto* i = std::get_if<int64_t>(&v)) return static_cast<double>(*i);
  throw std::runtime_error(fmt::format("JSON field '{}' is not a number", what));
}
int64_t JsonValue::integer(const std::string& what) const {
  if (auto* i = std::get_if<int64_t>(&v)) return *i;
  throw std::runtime_error(fmt::format("JSON field '{}' is not an integer", what));
}
const std::string& JsonValue::string(const std::string& what) const {
  if (auto* s = std::get_if<std::string>(&v)) return *s;
  throw std::runtime_error(fmt::format("JSON field '{}' is not a string", what));
}
bool JsonValue::boolean(const std::string& what) const {
  if (auto* b = std::get_if<bool>(&v)) return *b;
  throw std::runtime_error(fmt::format("JSON field '{}' is not a boolean", what));
}
const std::vector<JsonValue>& JsonValue::array(const std::string& what) const {
  if (auto* a = std::get_if<std::vector<JsonValue>>(&v)) return *a;
  throw std::runtime_error(fmt::format("JSON field '{}' is not an array", what));
}

namespace {

class Parser {
 public:
  explicit Parser(const std::string& s) : s_(s) {}

  JsonObject object() {
    JsonObject out;
    expect('{');
    if (peek() == '}') {
      ++i_;
      return out;
    }
    for (;;) {
      std::string key = string();
      expect(':');
      out[key] = value(0);
      char c = next();
      if (c == '}') break;
      if (c != ',') fail("expected ',' or '}'");
    }
    skip_ws();
    if (i_ != s_.size()) fail("trailing characters after the object");
    return out;
  }

 private:
  [[noreturn]] void fail(const std::string& what) const {
    throw std::runtime_error(fmt::format("bad JSON at offset {}: {} (in: {:.120})", i_, what, s_));
  }
  void skip_ws() {
    while (i_ < s_.size() && (s_[i_] == ' ' || s_[i_] == '\t' || s_[i_] == '\n' || s_[i_] == '\r')) ++i_;
  }
  char peek() {
    skip_ws();
    if (i_ >= s_.size()) fail("unexpected end");
    return s_[i_];
  }
  char next() {
    char c = peek();
    ++i_;
    return c;
  }
  void expect(char c) {
    if (next() != c) fail(fmt::format("expected '{}'", c));
  }
  std::string string() {
    expect('"');
    std::string out;
    while (i_ < s_.size() && s_[i_] != '"') {
      char c = s_[i_++];
      if (c != '\\') {
        out += c;
        continue;
      }
      if (i_ >= s_.size()) fail("unterminated escape");
      char e = s_[i_++];
      switch (e) {
        case 'n': out += '\n'; break;
        case 't': out += '\t'; break;
        case 'r': out += '\r'; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'u': {
          if (i_ + 4 > s_.size()) fail("short \\u escape");
          unsigned code = std::stoul(s_.substr(i_, 4), nullptr, 16);
          i_ += 4;
          out += code < 0x80 ? static_cast<char>(code) : '?';  // only ASCII is expected here
          break;
        }
        default: out += e;
      }
    }
    if (i_ >= s_.size()) fail("unterminated string");
    ++i_;
    return out;
  }
  JsonValue value(int depth) {
    char c = peek();
    JsonValue out;
    if (c == '"') {
      out.v = string();
    } else if (c == '[') {
      if (depth > 0) fail("nested arrays are not supported");
      ++i_;
      std::vector<JsonValue> items;
      if (peek() == ']') {
        ++i_;
      } else {
        for (;;) {
          items.push_back(value(depth + 1));
          char d = next();
          if (d == ']') break;
          if (d != ',') fail("expected ',' or ']'");
        }
      }
      out.v = std::move(items);
    } else if (s_.compare(i_, 4, "true") == 0) {
      i_ += 4;
      out.v = true;
    } else if (s_.compare(i_, 5, "false") == 0) {
      i_ += 5;
      out.v = false;
    } else if (s_.compare(i_, 4, "null") == 0) {
      i_ += 4;
    } else if (c == '-' || (c >= '0' && c <= '9')) {
      size_t start = i_;
      bool integral = true;
      while (i_ < s_.size() && std::string_view("+-0123456789.eE").find(s_[i_]) != std::string_view::npos) {
        if (s_[i_] == '.' || s_[i_] == 'e' || s_[i_] == 'E') integral = false;
        ++i_;
      }
      std::string text = s_.substr(start, i_ - start);
      try {
        if (integral) {
          out.v = static_cast<int64_t>(std::stoll(text));
        } else {
          out.v = std::stod(text);
        }
      } catch (const std::exception&) {
        fail(fmt::format("bad number '{}'", text));
      }
    } else {
      fail("unexpected character");
    }
    return out;
  }

  const std::string& s_;
  size_t i_ = 0;
};

}  // namespace

JsonObject parse_json_object(const std::string& text) { return Parser(text).object(); }

const JsonValue& field(const JsonObject& o, const std::string& key) {
  auto it = o.find(key);
  if (it == o.end()) throw std::runtime_error(fmt::format("JSON field '{}' is missing", key));
  return it->second;
}
std::vector<double> number_array(const JsonObject& o, const std::string& key) {
  std::vector<double> out;
  for (const auto& v : field(o, key).array(key)) out.push_back(v.number(key));
  return out;
}
std::vector<int64_t> integer_array(const JsonObject& o, const std::string& key) {
  std::vector<int64_t> out;
  for (const auto& v : field(o, key).array(key)) out.push_back(v.integer(key));
  return out;
}

}  // namespace meshtrain::bench
