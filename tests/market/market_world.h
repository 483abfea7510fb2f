// A market world for multi-process tests: a real meshtrain-market on a fresh SQLite file and
// real meshtrain-provider daemons (declared GPUs), each with its own key, database and log in
// a temporary directory; every process is killed when the world goes away.
#pragma once

#include <fstream>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "meshtrain/market.h"
#include "support/child_process.h"
#include "support/temp_dir.h"

namespace meshtrain::test_support {

using namespace std::chrono_literals;

struct Endpoint {
  std::string endpoint;
  market::AccountId key;
};

// Waits for a daemon's --print-endpoint-file (endpoint on line 1, public key on line 2).
inline Endpoint wait_endpoint(const std::filesystem::path& file, ChildProcess& child, std::string_view who) {
  auto until = std::chrono::steady_clock::now() + 20s;
  while (std::chrono::steady_clock::now() < until) {
    std::ifstream in(file);
    std::string endpoint, key;
    if (in >> endpoint >> key && key.size() == 64) return {endpoint, market::AccountId::from_hex(key, "endpoint file")};
    if (child.wait(0ms)) throw std::runtime_error(std::string(who) + " exited before printing its endpoint");
    std::this_thread::sleep_for(20ms);
  }
  throw std::runtime_error(std::string(who) + " printed no endpoint within 20 s");
}

class MarketWorld {
 public:
  MarketWorld() {
    market_ = std::make_unique<ChildProcess>(
        std::vector<std::string>{MESHTRAIN_MARKET_BINARY, "--db", (dir_ / "market.db").string(), "--key",
                                 (dir_ / "market.pem").string(), "--bind", "tcp://127.0.0.1:0", "--faucet-limit",
                                 "100000000", "--alive-window-ms", "3000", "--print-endpoint-file",
                                 (dir_ / "market.endpoint").string()},
        (dir_ / "market.log").string());
    market_endpoint_ = wait_endpoint(dir_ / "market.endpoint", *market_, "meshtrain-market");
  }

  // Starts provider `index` (price per step `price`); restarting keeps its key and database.
  Endpoint start_provider(size_t index, market::Amount price) {
    std::string name = "provider" + std::to_string(index);
    std::filesystem::remove(dir_ / (name + ".endpoint"));
    auto child = std::make_unique<ChildProcess>(
        std::vector<std::string>{MESHTRAIN_PROVIDER_BINARY, "--market", market_endpoint_.endpoint, "--market-key",
                                 market_endpoint_.key.hex(), "--key", (dir_ / (name + ".pem")).string(), "--bind",
                                 "tcp://127.0.0.1:0", "--db", (dir_ / (name + ".db")).string(), "--gpu",
                                 "L4-24GB:1:24:8.9", "--trust-config", "--price-per-step", std::to_string(price),
                                 "--region", "test", "--redeem-interval-ms", "500", "--unpaid-grace-ms", "60000",
                                 "--print-endpoint-file", (dir_ / (name + ".endpoint")).string()},
        (dir_ / (name + ".log")).string());
    Endpoint e = wait_endpoint(dir_ / (name + ".endpoint"), *child, name);
    if (providers_.size() <= index) providers_.resize(index + 1);
    providers_[index] = std::move(child);
    return e;
  }

  ChildProcess& provider(size_t index) { return *providers_.at(index); }
  const Endpoint& market() const { return market_endpoint_; }
  // A renter (or any account) key saved as PEM in the world's directory, for the CLI.
  std::filesystem::path save_key(const crypto::Identity& id, const std::string& name) const {
    auto path = dir_.path() / (name + ".pem");
    id.save_pem(path);
    return path;
  }
  const std::filesystem::path& dir() const { return dir_.path(); }

  // The daemons' logs, for a failing test's output.
  std::string logs() const {
    std::string out;
    for (const auto& entry : std::filesystem::directory_iterator(dir_.path()))
      if (entry.path().extension() == ".log") {
        std::ifstream in(entry.path());
        std::string text((std::istreambuf_iterator<char>(in)), {});
        if (text.size() > 4000) text = "..." + text.substr(text.size() - 4000);
        out += "--- " + entry.path().filename().string() + "\n" + text;
      }
    return out;
  }

 private:
  TempDir dir_;
  std::unique_ptr<ChildProcess> market_;
  Endpoint market_endpoint_;
  std::vector<std::unique_ptr<ChildProcess>> providers_;
};

}  // namespace meshtrain::test_support
