// Emulated WAN hosts for the benchmark: K network namespaces made by benchmarks/wan/netns.sh
// (upload of each shaped with tbf), removed again when the object dies, even on failure.
#pragma once

#include <optional>
#include <string>

namespace meshtrain::bench {

class NetnsHosts {
 public:
  // Runs `script check`; nullopt when namespaces work here, else the reason (the script also
  // prints it on stderr).
  static std::optional<std::string> check(const std::string& script);

  // `script up hosts rate prefix`. Throws Error when it fails (the script cleans up after itself).
  NetnsHosts(std::string script, int hosts, double rate_mbit, std::string prefix);
  ~NetnsHosts();  // `script down hosts prefix`; failures are logged, never thrown
  NetnsHosts(const NetnsHosts&) = delete;
  NetnsHosts& operator=(const NetnsHosts&) = delete;

  int hosts() const { return hosts_; }
  std::string ns(int host) const { return prefix_ + "h" + std::to_string(host); }
  // netns.sh's addressing: host I is 10.77.0.(I+1).
  static std::string address(int host) { return "10.77.0." + std::to_string(host + 1); }

 private:
  std::string script_;
  int hosts_;
  std::string prefix_;
};

}  // namespace meshtrain::bench
