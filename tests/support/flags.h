// "--flag value" / "--switch" command lines of the test helper executables, as a map.
#pragma once

#include <map>
#include <string>

namespace meshtrain::test_support {

inline std::map<std::string, std::string> parse_flags(int argc, char** argv, int first) {
  std::map<std::string, std::string> flags;
  for (int i = first; i < argc; ++i) {
    std::string key = argv[i];
    if (i + 1 < argc && std::string(argv[i + 1]).rfind("--", 0) != 0) {
      flags[key] = argv[++i];
    } else {
      flags[key] = "";
    }
  }
  return flags;
}

}  // namespace meshtrain::test_support
