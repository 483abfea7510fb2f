// Command-line flags for meshtrain's tools: "--name value", "--name=value" and switches
// ("--json"), positionals in order. Every mistake is an InvalidArgumentError that names the flag
// and ends with the command's usage text, so the tools print one clear message and exit 2.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace meshtrain::tools {

class Flags {
 public:
  struct Spec {
    std::string_view name;  // with the dashes, e.g. "--market"
    bool takes_value = true;
  };

  // Parses argv[first..argc). "--help" / "-h" are always known (help()). An empty `usage`
  // leaves error messages without it (for callers that add their own hint).
  Flags(int argc, char** argv, int first, std::initializer_list<Spec> known, std::string_view usage);

  bool help() const { return help_; }
  bool has(std::string_view name) const;
  // The last value of a flag given more than once; all() returns every value in order.
  std::optional<std::string> get(std::string_view name) const;
  std::vector<std::string> all(std::string_view name) const;
  std::string get_or(std::string_view name, std::string_view fallback) const;
  std::string required(std::string_view name) const;
  // Integers and reals in [min, max]; `fallback` when the flag is absent.
  uint64_t number(std::string_view name, uint64_t fallback, uint64_t min, uint64_t max) const;
  double real(std::string_view name, double fallback, double min, double max) const;
  const std::vector<std::string>& positional() const { return positional_; }
  // InvalidArgumentError "<message>" followed by the usage text.
  [[noreturn]] void fail(const std::string& message) const;

 private:
  std::string usage_;
  bool help_ = false;
  std::map<std::string, std::vector<std::string>, std::less<>> values_;
  std::vector<std::string> positional_;
};

}  // namespace meshtrain::tools
