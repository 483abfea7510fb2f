#include <cerrno>
#include <fstream>

#include "meshtrain/net.h"

namespace meshtrain::net {

AllowList AllowList::load(const std::filesystem::path& path) {
  std::ifstream in(path);
  if (!in) throw_io_error(fmt::format("allow-list {}: cannot open", path.string()), errno);
  AllowList list;
  std::string line;
  for (int number = 1; std::getline(in, line); ++number) {
    auto hash = line.find('#');
    if (hash != std::string::npos) line.resize(hash);
    auto first = line.find_first_not_of(" \t\r");
    if (first == std::string::npos) continue;
    auto last = line.find_last_not_of(" \t\r");
    std::string key = line.substr(first, last - first + 1);
    try {
      list.add(PeerId::from_hex(key, "public key"));
    } catch (const Error& e) {
      throw InvalidArgumentError(fmt::format("allow-list {} line {}: {}", path.string(), number, e.what()));
    }
  }
  return list;
}

}  // namespace meshtrain::net
