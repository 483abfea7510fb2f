// Just enough JSON for meshtrain-bench: writing one flat object per line (keys in insertion
// order) and reading back the flat objects the worker processes and gloo_allreduce.py print
// (numbers, strings, booleans, null and arrays of numbers; no nesting beyond that).
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <variant>
#include <vector>

namespace meshtrain::bench {

// One JSON object on one line. Doubles are written with 6 significant digits (NaN and
// infinities as null); keys are not checked for duplicates.
class JsonLine {
 public:
  JsonLine& add(const std::string& key, const std::string& value);
  JsonLine& add(const std::string& key, const char* value) { return add(key, std::string(value)); }
  JsonLine& add(const std::string& key, double value);
  JsonLine& add(const std::string& key, int64_t value);
  JsonLine& add(const std::string& key, uint64_t value);
  JsonLine& add(const std::string& key, int value) { return add(key, static_cast<int64_t>(value)); }
  JsonLine& add(const std::string& key, uint32_t value) { return add(key, static_cast<uint64_t>(value)); }
  JsonLine& add(const std::string& key, bool value);
  JsonLine& add(const std::string& key, const std::vector<double>& values);
  JsonLine& add(const std::string& key, const std::vector<int64_t>& values);
  // Appends every field of `other` (already encoded).
  JsonLine& merge(const JsonLine& other);
  std::string str() const;  // "{...}" without a newline

 private:
  JsonLine& raw(const std::string& key, const std::string& encoded);
  std::vector<std::pair<std::string, std::string>> fields_;
};

std::string json_quote(const std::string& s);

// A value of a flat object. Integers are kept exactly (int64) when they have no fraction or
// exponent, so nanosecond timestamps survive the round trip.
struct JsonValue {
  std::variant<std::monostate, bool, double, int64_t, std::string, std::vector<JsonValue>> v;

  bool is_null() const { return std::holds_alternative<std::monostate>(v); }
  // Number as double (int64 converted); throws std::runtime_error naming `what` otherwise.
  double number(const std::string& what) const;
  int64_t integer(const std::string& what) const;
  const std::string& string(const std::string& what) const;
  bool boolean(const std::string& what) const;
  const std::vector<JsonValue>& array(const std::string& what) const;
};

using JsonObject = std::map<std::string, JsonValue>;

// Parses one object. Throws std::runtime_error naming the offset of the first error.
JsonObject parse_json_object(const std::string& text);

// Field access with errors naming the field: throws std::runtime_error when missing.
const JsonValue& field(const JsonObject& o, const std::string& key);
std::vector<double> number_array(const JsonObject& o, const std::string& key);
std::vector<int64_t> integer_array(const JsonObject& o, const std::string& key);

}  // namespace meshtrain::bench
