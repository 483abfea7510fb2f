// pay_step_bench: what paying every training step costs the renter.
//
// Starts a real meshtrain-market and one real meshtrain-provider on loopback, rents the
// provider, then times MarketClient::pay_step (sign the voucher, deliver it, the daemon checks
// the signature and the amount, stores it durably in SQLite, acknowledges) over many steps.
// Prints one JSON object per line: latency median / p99 and the overhead as a fraction of a
// reference step time (default 100 ms; the target in issue 6 is under 1%).
//
//   pay_step_bench [--steps N] [--step-ms MS] [--warmup N] [--providers N] [--gap-ms MS]
//
// With --providers N > 1 it rents N providers with a Fleet and times Fleet::pay_step (every
// lease paid per step, vouchers sent together).
#include <unistd.h>

#include <algorithm>
#include <memory>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <thread>

#include "core/json.h"
#include "meshtrain/market.h"
#include "market/daemons.h"  // tests/market: waiting for a daemon's endpoint file
#include "support/child_process.h"

using namespace meshtrain;
using namespace meshtrain::market;
using namespace std::chrono_literals;
namespace fs = std::filesystem;

namespace {

uint64_t arg(int argc, char** argv, std::string_view name, uint64_t fallback) {
  for (int i = 1; i + 1 < argc; ++i)
    if (argv[i] == name) return std::stoull(argv[i + 1]);
  return fallback;
}

}  // namespace

int main(int argc, char** argv) {
  const uint64_t steps = arg(argc, argv, "--steps", 2000);
  const uint64_t warmup = arg(argc, argv, "--warmup", 50);
  const double step_ms = static_cast<double>(arg(argc, argv, "--step-ms", 100));
  const uint64_t provider_count = std::max<uint64_t>(1, arg(argc, argv, "--providers", 1));
  // The training step between two payments (not timed): with a Fleet, the acknowledgements of a
  // step's vouchers arrive during it, as they would in a real job.
  const uint64_t gap_ms = arg(argc, argv, "--gap-ms", 0);
  fs::path dir = fs::temp_directory_path() / fmt::format("meshtrain-pay-bench-{}", ::getpid());
  fs::create_directories(dir);
  try {
    test_support::ChildProcess market({MESHTRAIN_MARKET_BINARY, "--db", (dir / "market.db").string(), "--key",
                  (dir / "market.pem").string(), "--bind", "tcp://127.0.0.1:0", "--faucet-limit", "1000000000000",
                  "--print-endpoint-file", (dir / "market.endpoint").string()},
                 (dir / "market.log").string());
    auto [market_endpoint, market_key] = test_support::wait_endpoint(dir / "market.endpoint", market, "meshtrain-market");
    std::vector<std::unique_ptr<test_support::ChildProcess>> providers;
    for (uint64_t i = 0; i < provider_count; ++i) {
      std::string name = fmt::format("provider{}", i);
      providers.push_back(std::make_unique<test_support::ChildProcess>(
          std::vector<std::string>{MESHTRAIN_PROVIDER_BINARY, "--market", market_endpoint, "--market-key",
                                   market_key.hex(), "--key", (dir / (name + ".pem")).string(), "--bind",
                                   "tcp://127.0.0.1:0", "--db", (dir / (name + ".db")).string(), "--gpu",
                                   "L4-24GB:1:24:8.9", "--trust-config", "--price-per-step", "10",
                                   "--redeem-interval-ms", "5000", "--print-endpoint-file",
                                   (dir / (name + ".endpoint")).string()},
          (dir / (name + ".log")).string()));
      test_support::wait_endpoint(dir / (name + ".endpoint"), *providers.back(), name);
    }

    auto renter = crypto::Identity::generate();
    auto backend = connect_devnet(renter, market_key, market_endpoint);
    backend->mint(renter.public_key(), 1'000'000'000);
    Budget budget;
    budget.spend_limit = 1'000'000'000;
    budget.escrow_per_lease = 100'000'000;
    MarketClient client(renter, *backend, budget);
    // One provider: MarketClient::pay_step alone. Several: Fleet::pay_step, which pays them all.
    FleetOptions options;
    options.size = static_cast<uint32_t>(provider_count);
    options.rent_wait = 3s;
    options.heartbeat_timeout = 10s;
    Fleet fleet(client, *backend, options);
    for (int attempt = 0; attempt < 10 && fleet.leases().size() < provider_count; ++attempt) fleet.fill();
    if (fleet.leases().size() < provider_count)
      throw TimeoutError(fmt::format("only {} of {} providers leased within 30 s", fleet.leases().size(),
                                     provider_count));
    Id lease = fleet.leases()[0].id;

    std::vector<double> micros;
    micros.reserve(steps);
    for (uint64_t step = 1; step <= warmup + steps; ++step) {
      auto t0 = std::chrono::steady_clock::now();
      if (provider_count == 1) {
        client.pay_step(lease, step);
      } else {
        fleet.pay_step(step);
      }
      auto t1 = std::chrono::steady_clock::now();
      if (step > warmup) micros.push_back(std::chrono::duration<double, std::micro>(t1 - t0).count());
      if (gap_ms) std::this_thread::sleep_for(std::chrono::milliseconds(gap_ms));
    }
    fleet.release_all();
    std::sort(micros.begin(), micros.end());
    double median = micros[micros.size() / 2];
    double p99 = micros[std::min(micros.size() - 1, micros.size() * 99 / 100)];
    double total_s = 0;
    for (double m : micros) total_s += m / 1e6;
    json::Writer w(false);
    w.begin_object()
        .key("bench").value("pay_step")
        .key("steps").value(steps)
        .key("providers").value(provider_count)
        .key("gap_ms").value(gap_ms)
        .key("path").value(provider_count == 1 ? "MarketClient::pay_step" : "Fleet::pay_step")
        .key("median_us").value(median)
        .key("p99_us").value(p99)
        .key("vouchers_per_s").value(static_cast<double>(steps * provider_count) / total_s)
        .key("reference_step_ms").value(step_ms)
        .key("overhead_fraction").value(median / (step_ms * 1000.0))
        .key("target_fraction").value(0.01)
        .key("device").value("cpu")
        .end_object();
    std::printf("%s\n", w.take().c_str());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "pay_step_bench: %s (logs in %s)\n", e.what(), dir.c_str());
    return 1;
  }
  fs::remove_all(dir);
  return 0;
}
