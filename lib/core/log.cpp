#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <map>
#include <mutex>
#include <shared_mutex>

#include "meshtrain/core.h"

namespace meshtrain::log {
namespace {

struct Settings {
  Level default_level = Level::Info;
  std::map<std::string, Level, std::less<>> per_component;
};

std::shared_mutex settings_mutex;
std::mutex write_mutex;

Level parse_level(std::string_view name, std::string_view spec) {
  if (name == "trace") return Level::Trace;
  if (name == "debug") return Level::Debug;
  if (name == "info") return Level::Info;
  if (name == "warn" || name == "warning") return Level::Warn;
  if (name == "error") return Level::Error;
  if (name == "off") return Level::Off;
  throw InvalidArgumentError(fmt::format(
      "MESHTRAIN_LOG '{}': unknown level '{}' (trace, debug, info, warn, error, off)", spec, name));
}

Settings parse(std::string_view spec) {
  Settings s;
  size_t pos = 0;
  while (pos <= spec.size()) {
    size_t comma = spec.find(',', pos);
    std::string_view token = spec.substr(pos, comma == std::string_view::npos ? spec.npos : comma - pos);
    if (!token.empty()) {
      size_t eq = token.find('=');
      if (eq == std::string_view::npos) {
        s.default_level = parse_level(token, spec);
      } else {
        std::string_view component = token.substr(0, eq);
        if (component.empty())
          throw InvalidArgumentError(fmt::format("MESHTRAIN_LOG '{}': empty component name", spec));
        s.per_component[std::string(component)] = parse_level(token.substr(eq + 1), spec);
      }
    }
    if (comma == std::string_view::npos) break;
    pos = comma + 1;
  }
  return s;
}

Settings& settings() {
  static Settings s = [] {
    const char* env = std::getenv("MESHTRAIN_LOG");
    if (!env) return Settings{};
    try {
      return parse(env);
    } catch (const Error& e) {
      std::fprintf(stderr, "meshtrain: %s; using level info\n", e.what());
      return Settings{};
    }
  }();
  return s;
}

char level_letter(Level level) {
  switch (level) {
    case Level::Trace: return 'T';
    case Level::Debug: return 'D';
    case Level::Info: return 'I';
    case Level::Warn: return 'W';
    case Level::Error: return 'E';
    case Level::Off: break;
  }
  return '?';
}

}  // namespace

void configure(std::string_view spec) {
  Settings parsed = parse(spec);
  std::unique_lock lock(settings_mutex);
  settings() = std::move(parsed);
}

bool enabled(Level level, std::string_view component) noexcept {
  std::shared_lock lock(settings_mutex);
  const Settings& s = settings();
  auto it = s.per_component.find(component);
  Level threshold = it == s.per_component.end() ? s.default_level : it->second;
  return level != Level::Off && level >= threshold;
}

void write(Level level, std::string_view component, std::string_view message) noexcept {
  try {
    timespec ts{};
    clock_gettime(CLOCK_REALTIME, &ts);
    tm utc{};
    gmtime_r(&ts.tv_sec, &utc);
    char when[32];
    std::strftime(when, sizeof when, "%Y-%m-%dT%H:%M:%S", &utc);
    std::string line = fmt::format("{}.{:03d}Z {} {}[{}] {}\n", when, ts.tv_nsec / 1000000,
                                   level_letter(level), component, ::getpid(), message);
    std::lock_guard lock(write_mutex);
    std::fwrite(line.data(), 1, line.size(), stderr);
  } catch (...) {
    // Logging must never throw into the caller.
  }
}

}  // namespace meshtrain::log
