// A market world for multi-process tests: a real meshtrain-market on a fresh SQLite file and
// real meshtrain-provider daemons (declared GPUs), each with its own key, database and log in
// a temporary directory; every process is killed when the world goes away.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "market/daemons.h"

namespace meshtrain::test_support {

using Endpoint = DaemonEndpoint;

class MarketWorld {
 public:
  MarketWorld() : market_(MESHTRAIN_MARKET_BINARY, dir_.path()) {}

  // Starts provider `index` (price per step `price`); restarting keeps its key and database.
  Endpoint start_provider(size_t index, market::Amount price) {
    std::string name = "provider" + std::to_string(index);
    std::filesystem::remove(dir_ / (name + ".endpoint"));
    auto child = std::make_unique<ChildProcess>(
        std::vector<std::string>{MESHTRAIN_PROVIDER_BINARY, "--market", market().endpoint, "--market-key",
                                 market().key.hex(), "--key", (dir_ / (name + ".pem")).string(), "--bind",
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
  const Endpoint& market() const { return market_.endpoint(); }
  // A renter (or any account) key saved as PEM in the world's directory, for the CLI.
  std::filesystem::path save_key(const crypto::Identity& id, const std::string& name) const {
    auto path = dir_.path() / (name + ".pem");
    id.save_pem(path);
    return path;
  }
  const std::filesystem::path& dir() const { return dir_.path(); }
  // The daemons' logs, for a failing test's output.
  std::string logs() const { return daemon_logs(dir_.path(), 4000); }

 private:
  TempDir dir_;
  MarketProcess market_;
  std::vector<std::unique_ptr<ChildProcess>> providers_;
};

}  // namespace meshtrain::test_support
