#include "core/json.h"

#include <charconv>
#include <cmath>
#include <cstring>

#include "meshtrain/core.h"

namespace meshtrain::json {

const Value* Value::find(std::string_view key) const {
  for (size_t i = 0; i < keys.size(); ++i)
    if (keys[i] == key) return &items[i];
  return nullptr;
}

std::string_view kind_name(Value::Kind kind) {
  switch (kind) {
    case Value::Kind::Null: return "null";
    case Value::Kind::Bool: return "a boolean";
    case Value::Kind::Number: return "a number";
    case Value::Kind::String: return "a string";
    case Value::Kind::Array: return "an array";
    case Value::Kind::Object: return "an object";
  }
  return "?";
}

bool valid_utf8(std::string_view s) {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  const auto* end = p + s.size();
  while (p < end) {
    unsigned char c = *p;
    if (c < 0x80) {
      ++p;
      continue;
    }
    int extra;
    uint32_t cp;
    if ((c & 0xE0) == 0xC0) {
      extra = 1;
      cp = c & 0x1F;
    } else if ((c & 0xF0) == 0xE0) {
      extra = 2;
      cp = c & 0x0F;
    } else if ((c & 0xF8) == 0xF0) {
      extra = 3;
      cp = c & 0x07;
    } else {
      return false;
    }
    if (end - p <= extra) return false;
    for (int i = 1; i <= extra; ++i) {
      if ((p[i] & 0xC0) != 0x80) return false;
      cp = (cp << 6) | (p[i] & 0x3F);
    }
    static constexpr uint32_t kMin[] = {0, 0x80, 0x800, 0x10000};
    if (cp < kMin[extra] || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return false;
    p += extra + 1;
  }
  return true;
}

// ---------------------------------------------------------------------------------------------
// Reader

namespace {

class Parser {
 public:
  Parser(std::string_view text, std::string_view source, const ParseLimits& limits)
      : s_(text), source_(source), limits_(limits) {}

  Value document() {
    if (s_.size() > limits_.max_bytes)
      throw CorruptError(fmt::format("{}: {} bytes is over the limit of {} bytes", source_, s_.size(),
                                     limits_.max_bytes));
    skip_ws();
    if (pos_ == s_.size()) fail("empty document");
    Value v;
    parse_value(v, 0);
    skip_ws();
    if (pos_ != s_.size()) fail("unexpected data after the end of the document");
    return v;
  }

 private:
  [[noreturn]] void fail(std::string_view what) {
    size_t line = 1, column = 1;
    for (size_t i = 0; i < pos_ && i < s_.size(); ++i) {
      if (s_[i] == '\n') {
        ++line;
        column = 1;
      } else {
        ++column;
      }
    }
    throw CorruptError(fmt::format("{}: line {}, column {}: {}", source_, line, column, what));
  }

  void skip_ws() {
    while (pos_ < s_.size() && (s_[pos_] == ' ' || s_[pos_] == '\t' || s_[pos_] == '\n' || s_[pos_] == '\r')) ++pos_;
  }

  char peek() {
    if (pos_ >= s_.size()) fail("unexpected end of document");
    return s_[pos_];
  }

  void expect_literal(std::string_view lit) {
    if (s_.substr(pos_, lit.size()) != lit) fail(fmt::format("invalid literal (expected '{}')", lit));
    pos_ += lit.size();
  }

  void count_value() {
    if (++values_ > limits_.max_values)
      fail(fmt::format("more than {} values (limit)", limits_.max_values));
  }

  void parse_value(Value& v, size_t depth) {
    count_value();
    char c = peek();
    switch (c) {
      case '{': parse_object(v, depth + 1); return;
      case '[': parse_array(v, depth + 1); return;
      case '"':
        v.kind = Value::Kind::String;
        parse_string(v.text);
        return;
      case 't':
        expect_literal("true");
        v.kind = Value::Kind::Bool;
        v.boolean = true;
        return;
      case 'f':
        expect_literal("false");
        v.kind = Value::Kind::Bool;
        v.boolean = false;
        return;
      case 'n':
        expect_literal("null");
        v.kind = Value::Kind::Null;
        return;
      default:
        if (c == '-' || (c >= '0' && c <= '9')) {
          parse_number(v);
          return;
        }
        fail(fmt::format("unexpected character '{}'", printable(c)));
    }
  }

  static std::string printable(char c) {
    if (c >= 0x20 && c < 0x7f) return std::string(1, c);
    return fmt::format("\\x{:02x}", static_cast<unsigned char>(c));
  }

  void parse_object(Value& v, size_t depth) {
    if (depth > limits_.max_depth) fail(fmt::format("nested deeper than {} levels (limit)", limits_.max_depth));
    v.kind = Value::Kind::Object;
    ++pos_;  // '{'
    skip_ws();
    if (peek() == '}') {
      ++pos_;
      return;
    }
    while (true) {
      skip_ws();
      if (peek() != '"') fail("expected a member name in double quotes");
      std::string key;
      size_t key_pos = pos_;
      parse_string(key);
      for (const auto& k : v.keys) {
        if (k == key) {
          pos_ = key_pos;
          fail(fmt::format("duplicate member \"{}\"", key));
        }
      }
      skip_ws();
      if (peek() != ':') fail("expected ':' after a member name");
      ++pos_;
      skip_ws();
      v.keys.push_back(std::move(key));
      v.items.emplace_back();
      parse_value(v.items.back(), depth);
      skip_ws();
      char c = peek();
      ++pos_;
      if (c == '}') return;
      if (c != ',') {
        --pos_;
        fail("expected ',' or '}' in an object");
      }
    }
  }

  void parse_array(Value& v, size_t depth) {
    if (depth > limits_.max_depth) fail(fmt::format("nested deeper than {} levels (limit)", limits_.max_depth));
    v.kind = Value::Kind::Array;
    ++pos_;  // '['
    skip_ws();
    if (peek() == ']') {
      ++pos_;
      return;
    }
    while (true) {
      skip_ws();
      v.items.emplace_back();
      parse_value(v.items.back(), depth);
      skip_ws();
      char c = peek();
      ++pos_;
      if (c == ']') return;
      if (c != ',') {
        --pos_;
        fail("expected ',' or ']' in an array");
      }
    }
  }

  void parse_number(Value& v) {
    size_t start = pos_;
    auto digit = [&] { return pos_ < s_.size() && s_[pos_] >= '0' && s_[pos_] <= '9'; };
    if (s_[pos_] == '-') ++pos_;
    if (!digit()) fail("invalid number");
    if (s_[pos_] == '0') {
      ++pos_;
      if (digit()) fail("invalid number (leading zero)");
    } else {
      while (digit()) ++pos_;
    }
    if (pos_ < s_.size() && s_[pos_] == '.') {
      ++pos_;
      if (!digit()) fail("invalid number (no digit after '.')");
      while (digit()) ++pos_;
    }
    if (pos_ < s_.size() && (s_[pos_] == 'e' || s_[pos_] == 'E')) {
      ++pos_;
      if (pos_ < s_.size() && (s_[pos_] == '+' || s_[pos_] == '-')) ++pos_;
      if (!digit()) fail("invalid number (no digit in the exponent)");
      while (digit()) ++pos_;
    }
    v.kind = Value::Kind::Number;
    v.text.assign(s_.substr(start, pos_ - start));
  }

  unsigned hex4() {
    if (s_.size() - pos_ < 4) fail("truncated \\u escape");
    unsigned value = 0;
    for (int i = 0; i < 4; ++i) {
      char c = s_[pos_++];
      value <<= 4;
      if (c >= '0' && c <= '9') value |= c - '0';
      else if (c >= 'a' && c <= 'f') value |= c - 'a' + 10;
      else if (c >= 'A' && c <= 'F') value |= c - 'A' + 10;
      else fail("invalid hex digit in a \\u escape");
    }
    return value;
  }

  static void append_utf8(std::string& out, uint32_t cp) {
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

  void parse_string(std::string& out) {
    size_t start = pos_;
    ++pos_;  // opening quote
    out.clear();
    while (true) {
      if (pos_ >= s_.size()) {
        pos_ = start;
        fail("unterminated string");
      }
      // Copy a run of plain characters at once.
      size_t run = pos_;
      while (run < s_.size() && s_[run] != '"' && s_[run] != '\\' && static_cast<unsigned char>(s_[run]) >= 0x20) ++run;
      out.append(s_.data() + pos_, run - pos_);
      pos_ = run;
      if (pos_ >= s_.size()) continue;
      char c = s_[pos_];
      if (c == '"') {
        ++pos_;
        break;
      }
      if (static_cast<unsigned char>(c) < 0x20) fail("control character in a string (must be escaped)");
      ++pos_;  // backslash
      if (pos_ >= s_.size()) fail("truncated escape");
      char e = s_[pos_++];
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
          if (cp >= 0xD800 && cp <= 0xDBFF) {
            if (s_.substr(pos_, 2) != "\\u") fail("unpaired surrogate in a \\u escape");
            pos_ += 2;
            uint32_t low = hex4();
            if (low < 0xDC00 || low > 0xDFFF) fail("invalid low surrogate in a \\u escape");
            cp = 0x10000 + ((cp - 0xD800) << 10) + (low - 0xDC00);
          } else if (cp >= 0xDC00 && cp <= 0xDFFF) {
            fail("unpaired surrogate in a \\u escape");
          }
          append_utf8(out, cp);
          break;
        }
        default: fail(fmt::format("invalid escape '\\{}'", printable(e)));
      }
    }
    if (!valid_utf8(out)) {
      pos_ = start;
      fail("string is not valid UTF-8");
    }
  }

  std::string_view s_;
  std::string_view source_;
  const ParseLimits& limits_;
  size_t pos_ = 0;
  size_t values_ = 0;
};

}  // namespace

Value parse(std::string_view text, std::string_view source, const ParseLimits& limits) {
  return Parser(text, source, limits).document();
}

// ---------------------------------------------------------------------------------------------
// Field

void Field::fail(std::string_view problem) const {
  if (path_.empty()) throw CorruptError(fmt::format("{}: {}", source_, problem));
  throw CorruptError(fmt::format("{}: field {}: {}", source_, path_, problem));
}

void Field::expect(Value::Kind kind) const {
  if (value_->kind != kind) fail(fmt::format("expected {}, got {}", kind_name(kind), kind_name(value_->kind)));
}

Field Field::at(std::string_view key) const {
  expect(Value::Kind::Object);
  const Value* v = value_->find(key);
  std::string path = path_.empty() ? std::string(key) : fmt::format("{}.{}", path_, key);
  if (!v) throw CorruptError(fmt::format("{}: field {} is missing", source_, path));
  return Field(*v, source_, std::move(path));
}

std::optional<Field> Field::get(std::string_view key) const {
  expect(Value::Kind::Object);
  const Value* v = value_->find(key);
  if (!v) return std::nullopt;
  return Field(*v, source_, path_.empty() ? std::string(key) : fmt::format("{}.{}", path_, key));
}

Field Field::at(size_t index) const {
  expect(Value::Kind::Array);
  if (index >= value_->items.size()) fail(fmt::format("has no element {}", index));
  return Field(value_->items[index], source_, fmt::format("{}[{}]", path_, index));
}

const Value& Field::object() const {
  expect(Value::Kind::Object);
  return *value_;
}

size_t Field::array_size() const {
  expect(Value::Kind::Array);
  return value_->items.size();
}

uint64_t Field::u64(uint64_t max) const {
  expect(Value::Kind::Number);
  const std::string& t = value_->text;
  uint64_t out = 0;
  auto [end, ec] = std::from_chars(t.data(), t.data() + t.size(), out);
  if (ec == std::errc::result_out_of_range || (ec == std::errc() && end == t.data() + t.size() && out > max))
    fail(fmt::format("{} is out of range (at most {})", t, max));
  if (ec != std::errc() || end != t.data() + t.size()) fail(fmt::format("expected a non-negative integer, got {}", t));
  return out;
}

int64_t Field::i64() const {
  expect(Value::Kind::Number);
  const std::string& t = value_->text;
  int64_t out = 0;
  auto [end, ec] = std::from_chars(t.data(), t.data() + t.size(), out);
  if (ec == std::errc::result_out_of_range) fail(fmt::format("{} is out of the 64-bit range", t));
  if (ec != std::errc() || end != t.data() + t.size()) fail(fmt::format("expected an integer, got {}", t));
  return out;
}

const std::string& Field::str() const {
  expect(Value::Kind::String);
  return value_->text;
}

bool Field::boolean() const {
  expect(Value::Kind::Bool);
  return value_->boolean;
}

void Field::only_keys(std::initializer_list<std::string_view> allowed) const {
  expect(Value::Kind::Object);
  for (const auto& k : value_->keys) {
    bool ok = false;
    for (auto a : allowed) ok = ok || a == k;
    if (!ok) fail(fmt::format("unknown member \"{}\"", k));
  }
}

// ---------------------------------------------------------------------------------------------
// Writer

void append_quoted(std::string& out, std::string_view s) {
  out += '"';
  for (char c : s) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      case '\b': out += "\\b"; break;
      case '\f': out += "\\f"; break;
      default:
        if (static_cast<unsigned char>(c) < 0x20) {
          out += fmt::format("\\u{:04x}", static_cast<unsigned>(c));
        } else {
          out += c;
        }
    }
  }
  out += '"';
}

void Writer::newline() {
  if (!pretty_) return;
  out_ += '\n';
  out_.append(stack_.size() * 2, ' ');
}

void Writer::before_value() {
  if (after_key_) {
    after_key_ = false;
    return;
  }
  if (stack_.empty()) return;
  Frame& f = stack_.back();
  if (!f.empty) out_ += f.inline_ && pretty_ ? ", " : ",";
  if (!f.inline_) newline();
  f.empty = false;
}

Writer& Writer::begin_object(bool inline_) {
  before_value();
  out_ += '{';
  stack_.push_back({inline_ || (!stack_.empty() && stack_.back().inline_), true});
  return *this;
}

Writer& Writer::end_object() {
  Frame f = stack_.back();
  stack_.pop_back();
  if (!f.empty && !f.inline_) newline();
  out_ += '}';
  return *this;
}

Writer& Writer::begin_array(bool inline_) {
  before_value();
  out_ += '[';
  stack_.push_back({inline_ || (!stack_.empty() && stack_.back().inline_), true});
  return *this;
}

Writer& Writer::end_array() {
  Frame f = stack_.back();
  stack_.pop_back();
  if (!f.empty && !f.inline_) newline();
  out_ += ']';
  return *this;
}

Writer& Writer::key(std::string_view name) {
  before_value();
  append_quoted(out_, name);
  out_ += pretty_ ? ": " : ":";
  after_key_ = true;
  return *this;
}

Writer& Writer::value(std::string_view s) {
  before_value();
  append_quoted(out_, s);
  return *this;
}

Writer& Writer::value(uint64_t n) {
  before_value();
  out_ += std::to_string(n);
  return *this;
}

Writer& Writer::value(int64_t n) {
  before_value();
  out_ += std::to_string(n);
  return *this;
}

Writer& Writer::value(double d) {
  before_value();
  if (!std::isfinite(d)) {
    out_ += "null";
  } else {
    out_ += fmt::format("{}", d);
  }
  return *this;
}

Writer& Writer::value(bool b) {
  before_value();
  out_ += b ? "true" : "false";
  return *this;
}

Writer& Writer::null() {
  before_value();
  out_ += "null";
  return *this;
}

std::string Writer::take() {
  if (pretty_ && stack_.empty() && !out_.empty() && out_.back() != '\n') out_ += '\n';
  return std::move(out_);
}

// ---------------------------------------------------------------------------------------------
// base64

namespace {
constexpr char kAlphabet[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
}

std::string base64_encode(const uint8_t* data, size_t size) {
  std::string out;
  out.reserve((size + 2) / 3 * 4);
  size_t i = 0;
  for (; i + 3 <= size; i += 3) {
    uint32_t v = (uint32_t(data[i]) << 16) | (uint32_t(data[i + 1]) << 8) | data[i + 2];
    out += kAlphabet[v >> 18];
    out += kAlphabet[(v >> 12) & 63];
    out += kAlphabet[(v >> 6) & 63];
    out += kAlphabet[v & 63];
  }
  if (size - i == 1) {
    uint32_t v = uint32_t(data[i]) << 16;
    out += kAlphabet[v >> 18];
    out += kAlphabet[(v >> 12) & 63];
    out += "==";
  } else if (size - i == 2) {
    uint32_t v = (uint32_t(data[i]) << 16) | (uint32_t(data[i + 1]) << 8);
    out += kAlphabet[v >> 18];
    out += kAlphabet[(v >> 12) & 63];
    out += kAlphabet[(v >> 6) & 63];
    out += '=';
  }
  return out;
}

std::vector<uint8_t> base64_decode(std::string_view text, std::string_view what) {
  if (text.size() % 4 != 0)
    throw CorruptError(fmt::format("{}: base64 text of {} characters (not a multiple of 4)", what, text.size()));
  auto sextet = [&](char c, size_t pos) -> uint32_t {
    if (c >= 'A' && c <= 'Z') return c - 'A';
    if (c >= 'a' && c <= 'z') return c - 'a' + 26;
    if (c >= '0' && c <= '9') return c - '0' + 52;
    if (c == '+') return 62;
    if (c == '/') return 63;
    throw CorruptError(fmt::format("{}: invalid base64 character at position {}", what, pos));
  };
  std::vector<uint8_t> out;
  out.reserve(text.size() / 4 * 3);
  for (size_t i = 0; i < text.size(); i += 4) {
    bool last = i + 4 == text.size();
    size_t pad = 0;
    if (last && text[i + 3] == '=') pad = text[i + 2] == '=' ? 2 : 1;
    uint32_t v = 0;
    for (size_t j = 0; j < 4 - pad; ++j) v = (v << 6) | sextet(text[i + j], i + j);
    v <<= 6 * pad;
    out.push_back(static_cast<uint8_t>(v >> 16));
    if (pad < 2) out.push_back(static_cast<uint8_t>(v >> 8));
    if (pad < 1) out.push_back(static_cast<uint8_t>(v));
    // Non-canonical padding bits would let two texts decode to the same bytes; reject them.
    if ((pad == 1 && (v & 0xFF) != 0) || (pad == 2 && (v & 0xFFFF) != 0))
      throw CorruptError(fmt::format("{}: non-canonical base64 padding", what));
  }
  return out;
}

}  // namespace meshtrain::json
