// A small JSON reader and writer (checkpoint manifests, provider configs, CLI and benchmark output).
//
// The reader builds a tree under explicit limits (input bytes, nesting depth, number of values)
// so that a hostile or damaged manifest can cost at most a bounded amount of memory and time.
// Numbers keep their source text, so 64-bit integers round-trip exactly. Strings must be valid
// UTF-8; duplicate object keys are rejected. Every error is a CorruptError that names the source
// and either the line/column (syntax) or the field path (e.g. `tensors[3].shape[1]`).
//
// Internal to meshtrain (not installed).
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace meshtrain::json {

struct ParseLimits {
  size_t max_bytes = 64u << 20;    // input size
  size_t max_depth = 32;           // nested arrays/objects
  size_t max_values = 4u << 20;    // values in the whole document (bounds the tree's memory)
};

class Value {
 public:
  enum class Kind : uint8_t { Null, Bool, Number, String, Array, Object };

  Kind kind = Kind::Null;
  bool boolean = false;
  std::string text;                 // String: the decoded string; Number: the literal's text
  std::vector<Value> items;         // Array elements, or Object member values
  std::vector<std::string> keys;    // Object member names, parallel to items

  const Value* find(std::string_view key) const;
};

std::string_view kind_name(Value::Kind kind);

// Parses one JSON document (surrounding whitespace allowed). Throws CorruptError
// "<source>: line L, column C: <problem>".
Value parse(std::string_view text, std::string_view source, const ParseLimits& limits = {});

// A value together with where it came from, for typed access with errors that name the field:
// "<source>: field tensors[3].dtype: expected a string, got a number".
class Field {
 public:
  Field(const Value& value, std::string_view source, std::string path = {})
      : value_(&value), source_(source), path_(std::move(path)) {}

  const Value& value() const { return *value_; }
  const std::string& path() const { return path_; }
  std::string_view source() const { return source_; }

  // Required object member; throws naming the missing field.
  Field at(std::string_view key) const;
  std::optional<Field> get(std::string_view key) const;
  // Array element.
  Field at(size_t index) const;

  const Value& object() const;                // checks the kind
  size_t array_size() const;                  // checks the kind
  uint64_t u64(uint64_t max = UINT64_MAX) const;  // non-negative integer literal, <= max
  int64_t i64() const;
  const std::string& str() const;
  bool boolean() const;
  // Rejects members other than `allowed` (a typo in a field name must not pass silently).
  void only_keys(std::initializer_list<std::string_view> allowed) const;

  [[noreturn]] void fail(std::string_view problem) const;

 private:
  void expect(Value::Kind kind) const;
  const Value* value_;
  std::string_view source_;
  std::string path_;
};

// Streaming writer. Pretty-prints with two-space indentation; containers opened with
// `inline_ = true` are written on one line (short arrays such as shapes).
class Writer {
 public:
  explicit Writer(bool pretty = true) : pretty_(pretty) {}

  Writer& begin_object(bool inline_ = false);
  Writer& end_object();
  Writer& begin_array(bool inline_ = false);
  Writer& end_array();
  Writer& key(std::string_view name);
  Writer& value(std::string_view s);
  Writer& value(const char* s) { return value(std::string_view(s)); }
  Writer& value(const std::string& s) { return value(std::string_view(s)); }
  Writer& value(uint64_t n);
  Writer& value(int64_t n);
  Writer& value(uint32_t n) { return value(static_cast<uint64_t>(n)); }
  Writer& value(int n) { return value(static_cast<int64_t>(n)); }
  Writer& value(double d);
  Writer& value(bool b);
  Writer& null();

  // The document so far (complete once every container is closed), with a final newline when
  // pretty-printing.
  std::string take();

 private:
  void before_value();
  void newline();
  struct Frame {
    bool inline_ = false;
    bool empty = true;
  };
  std::string out_;
  std::vector<Frame> stack_;
  bool pretty_;
  bool after_key_ = false;
};

// Appends `s` as a JSON string literal (quotes included).
void append_quoted(std::string& out, std::string_view s);

// True when `s` is valid UTF-8 (no overlong forms, no surrogates, at most U+10FFFF).
bool valid_utf8(std::string_view s);

// Standard base64 (RFC 4648, with padding). decode throws CorruptError naming `what`.
std::string base64_encode(const uint8_t* data, size_t size);
std::vector<uint8_t> base64_decode(std::string_view text, std::string_view what);

}  // namespace meshtrain::json
