#include "json.h"

#include "core/json.h"
#include "meshtrain/core.h"

#include <cmath>
#include <stdexcept>

#include <fmt/format.h>

namespace meshtrain::bench {

std::string json_quote(const std::string& s) {
  json::Writer w(false);
  w.value(s);
  std::string out = w.take();
  while (!out.empty() && out.back() == '\n') out.pop_back();
  return out;
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

// meshtrain::json keeps a number's literal text: integers (no fraction, no exponent) stay exact.
JsonValue convert(const json::Value& v, int depth) {
  using Kind = json::Value::Kind;
  JsonValue out;
  switch (v.kind) {
    case Kind::Null: break;
    case Kind::Bool: out.v = v.boolean; break;
    case Kind::String: out.v = v.text; break;
    case Kind::Number:
      if (v.text.find_first_of(".eE") == std::string::npos) {
        out.v = static_cast<int64_t>(std::stoll(v.text));
      } else {
        out.v = std::stod(v.text);
      }
      break;
    case Kind::Array: {
      if (depth > 0) throw std::runtime_error("JSON: nested arrays are not part of a flat object");
      std::vector<JsonValue> items;
      for (const auto& item : v.items) items.push_back(convert(item, depth + 1));
      out.v = std::move(items);
      break;
    }
    case Kind::Object: throw std::runtime_error("JSON: nested objects are not part of a flat object");
  }
  return out;
}

}  // namespace

JsonObject parse_json_object(const std::string& text) {
  json::Value root;
  try {
    root = json::parse(text, "benchmark JSON line");
  } catch (const Error& e) {
    throw std::runtime_error(e.what());
  }
  if (root.kind != json::Value::Kind::Object) throw std::runtime_error("JSON: expected an object");
  JsonObject out;
  for (size_t i = 0; i < root.keys.size(); ++i) out[root.keys[i]] = convert(root.items[i], 0);
  return out;
}


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
