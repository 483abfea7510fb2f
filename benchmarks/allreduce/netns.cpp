#include "netns.h"

#include "child.h"
#include "meshtrain/core.h"

namespace meshtrain::bench {

using namespace std::chrono_literals;

std::optional<std::string> NetnsHosts::check(const std::string& script) {
  auto [status, out] = run_command({script, "check"}, 60s, {}, /*stdout_to_stderr=*/true);
  if (status.ok()) return std::nullopt;
  return fmt::format("'{} check' failed ({}); see its message above", script, status.describe());
}

NetnsHosts::NetnsHosts(std::string script, int hosts, double rate_mbit, std::string prefix)
    : script_(std::move(script)), hosts_(hosts), prefix_(std::move(prefix)) {
  std::vector<std::string> argv = {script_, "up", std::to_string(hosts_), fmt::format("{}", rate_mbit), prefix_};
  auto [status, out] = run_command(argv, 120s, {}, /*stdout_to_stderr=*/true);
  if (!status.ok()) throw IoError(fmt::format("'{}' failed ({})", shell_join(argv), status.describe()));
}

NetnsHosts::~NetnsHosts() {
  std::vector<std::string> argv = {script_, "down", std::to_string(hosts_), prefix_};
  try {
    auto [status, out] = run_command(argv, 120s, {}, /*stdout_to_stderr=*/true, /*interruptible=*/false);
    if (!status.ok())
      log::error("bench", "'{}' failed ({}); remove the namespaces by hand (ip netns list)", shell_join(argv),
                 status.describe());
  } catch (const std::exception& e) {
    log::error("bench", "'{}': {}; remove the namespaces by hand (ip netns list)", shell_join(argv), e.what());
  }
}

}  // namespace meshtrain::bench
