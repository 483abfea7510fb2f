#include "common/flags.h"

#include <cerrno>
#include <cstdlib>

#include "meshtrain/core.h"

namespace meshtrain::tools {

Flags::Flags(int argc, char** argv, int first, std::initializer_list<Spec> known, std::string_view usage)
    : usage_(usage) {
  for (int i = first; i < argc; ++i) {
    std::string arg = argv[i];
    if (arg == "--help" || arg == "-h") {
      help_ = true;
      continue;
    }
    if (arg.size() < 3 || arg.rfind("--", 0) != 0) {
      positional_.push_back(arg);
      continue;
    }
    std::string name = arg, value;
    bool inline_value = false;
    if (auto eq = arg.find('='); eq != std::string::npos) {
      name = arg.substr(0, eq);
      value = arg.substr(eq + 1);
      inline_value = true;
    }
    const Spec* spec = nullptr;
    for (const Spec& s : known)
      if (s.name == name) spec = &s;
    if (!spec) fail(fmt::format("unknown flag '{}'", name));
    if (!spec->takes_value) {
      if (inline_value) fail(fmt::format("{} takes no value", name));
    } else if (!inline_value) {
      if (i + 1 >= argc) fail(fmt::format("{} needs a value", name));
      value = argv[++i];
    }
    values_[name].push_back(value);
  }
}

bool Flags::has(std::string_view name) const { return values_.find(name) != values_.end(); }

std::optional<std::string> Flags::get(std::string_view name) const {
  auto it = values_.find(name);
  if (it == values_.end()) return std::nullopt;
  return it->second.back();
}

std::vector<std::string> Flags::all(std::string_view name) const {
  auto it = values_.find(name);
  return it == values_.end() ? std::vector<std::string>{} : it->second;
}

std::string Flags::get_or(std::string_view name, std::string_view fallback) const {
  auto v = get(name);
  return v ? *v : std::string(fallback);
}

std::string Flags::required(std::string_view name) const {
  auto v = get(name);
  if (!v || v->empty()) fail(fmt::format("{} is required", name));
  return *v;
}

uint64_t Flags::number(std::string_view name, uint64_t fallback, uint64_t min, uint64_t max) const {
  auto v = get(name);
  if (!v) return fallback;
  errno = 0;
  char* end = nullptr;
  unsigned long long parsed = std::strtoull(v->c_str(), &end, 10);
  if (v->empty() || (*v)[0] == '-' || *end != '\0' || errno == ERANGE || parsed < min || parsed > max)
    fail(fmt::format("{} must be an integer in [{}, {}], not '{}'", name, min, max, *v));
  return parsed;
}

double Flags::real(std::string_view name, double fallback, double min, double max) const {
  auto v = get(name);
  if (!v) return fallback;
  char* end = nullptr;
  double parsed = std::strtod(v->c_str(), &end);
  if (v->empty() || *end != '\0' || !(parsed >= min && parsed <= max))
    fail(fmt::format("{} must be a number in [{}, {}], not '{}'", name, min, max, *v));
  return parsed;
}

void Flags::fail(const std::string& message) const {
  if (usage_.empty()) throw InvalidArgumentError(message);
  throw InvalidArgumentError(fmt::format("{}\n\n{}", message, usage_));
}

}  // namespace meshtrain::tools
