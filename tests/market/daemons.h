// Real market daemons for multi-process tests: a meshtrain-market on loopback with its own
// SQLite file, the endpoint files the daemons write, free ports for daemons that must come back
// on the same endpoint, and the daemons' logs for a failing test's output.
#pragma once

#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "meshtrain/market.h"
#include "support/child_process.h"
#include "support/temp_dir.h"

namespace meshtrain::test_support {

struct DaemonEndpoint {
  std::string endpoint;
  market::AccountId key;
};

// Waits for a daemon's --print-endpoint-file (endpoint on line 1, public key on line 2).
inline DaemonEndpoint wait_endpoint(const std::filesystem::path& file, ChildProcess& child, std::string_view who) {
  using namespace std::chrono_literals;
  auto until = std::chrono::steady_clock::now() + 20s;
  while (std::chrono::steady_clock::now() < until) {
    std::ifstream in(file);
    std::string endpoint, key;
    if (in >> endpoint >> key && key.size() == 64)
      return {endpoint, market::AccountId::from_hex(key, "endpoint file")};
    if (child.wait(0ms)) throw std::runtime_error(std::string(who) + " exited before printing its endpoint");
    std::this_thread::sleep_for(20ms);
  }
  throw std::runtime_error(std::string(who) + " printed no endpoint within 20 s");
}

// A loopback TCP port that was free a moment ago (for a daemon that must restart on it).
inline uint16_t free_port() {
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) throw std::runtime_error("socket failed");
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof addr;
  if (::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0 ||
      ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
    ::close(fd);
    throw std::runtime_error("bind to a free port failed");
  }
  ::close(fd);
  return ntohs(addr.sin_port);
}

// The last `max_bytes` of every *.log file in `dir`.
inline std::string daemon_logs(const std::filesystem::path& dir, size_t max_bytes = 6000) {
  std::string out;
  for (const auto& entry : std::filesystem::directory_iterator(dir))
    if (entry.path().extension() == ".log") {
      std::ifstream in(entry.path());
      std::string text((std::istreambuf_iterator<char>(in)), {});
      if (text.size() > max_bytes) text = "..." + text.substr(text.size() - max_bytes);
      out += "--- " + entry.path().filename().string() + "\n" + text;
    }
  return out;
}

// meshtrain-market (`binary`) in `dir`, on a fixed loopback port so it can be killed and
// restarted on the same database and endpoint.
class MarketProcess {
 public:
  MarketProcess(std::string binary, std::filesystem::path dir)
      : binary_(std::move(binary)), dir_(std::move(dir)), bind_(fmt::format("tcp://127.0.0.1:{}", free_port())) {
    start();
  }

  void start() {
    std::filesystem::remove(dir_ / "market.endpoint");
    process_ = std::make_unique<ChildProcess>(
        std::vector<std::string>{binary_, "--db", (dir_ / "market.db").string(), "--key", (dir_ / "market.pem").string(),
                                 "--bind", bind_, "--faucet-limit", "100000000", "--alive-window-ms", "3000",
                                 "--print-endpoint-file", (dir_ / "market.endpoint").string()},
        (dir_ / fmt::format("market-{}.log", ++starts_)).string());
    endpoint_ = wait_endpoint(dir_ / "market.endpoint", *process_, "meshtrain-market");
  }
  void kill() {
    process_->signal(SIGKILL);
    process_->wait(std::chrono::seconds(5));
  }
  const DaemonEndpoint& endpoint() const { return endpoint_; }

 private:
  std::string binary_;
  std::filesystem::path dir_;
  std::string bind_;
  int starts_ = 0;
  std::unique_ptr<ChildProcess> process_;
  DaemonEndpoint endpoint_;
};

}  // namespace meshtrain::test_support
