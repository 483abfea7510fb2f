// meshtrain-market: the devnet market daemon, registry and ledger in one SQLite file
// (docs/market.md). Every request is signed by its account and runs as one transaction, so the
// daemon can be killed at any moment and restarted on the same database.
#include <cstdio>
#include <filesystem>
#include <optional>
#include <string>

#include "common/daemon.h"
#include "common/flags.h"
#include "market/server.h"

using namespace meshtrain;
namespace fs = std::filesystem;

namespace {

constexpr int kUsageError = 2;

const char* const kUsage = R"(usage: meshtrain-market --db FILE --key PEM [options]

The devnet market: providers offer GPUs, renters order and accept bids, leases lock escrow,
providers redeem the renters' signed per-step vouchers. State lives in a SQLite database (WAL,
synchronous=FULL); killing the daemon loses nothing that was answered.

options:
  --db FILE                  the ledger database; created with the schema when missing (required)
  --key PEM                  the market's Ed25519 identity (PKCS#8 PEM); created with mode 0600
                             when the file does not exist (required). Clients need its public key.
  --bind tcp://HOST:PORT     control endpoint (default tcp://127.0.0.1:7700; port 0 picks one)
  --operator-key HEX         the account that may mint any amount to anyone (default: the
                             market's own key)
  --faucet-limit N           any account may mint to itself while its total minted stays <= N
                             (default 0: no faucet)
  --alive-window-ms MS       discovery's alive_only keeps providers heard within MS (default 10000)
  --heartbeat-gap-ms MS      a pause between heartbeats longer than MS counts as down time in
                             the uptime (default 5000)
  --sweep-interval-ms MS     how often expired leases are closed between requests (default 1000)
  --status-json              print the request counters as JSON lines on stdout (default: text)
  --print-endpoint-file FILE once bound, write the endpoint (line 1) and the market's public
                             key in hex (line 2) to FILE
  --help                     this text

Logs go to stderr (MESHTRAIN_LOG=debug for every query). SIGINT / SIGTERM stop it cleanly (exit 0).
Exit codes: 0 stopped by a signal, 1 runtime failure, 2 usage error.
)";

const std::initializer_list<tools::Flags::Spec> kFlags = {
    {"--db"},
    {"--key"},
    {"--bind"},
    {"--operator-key"},
    {"--faucet-limit"},
    {"--alive-window-ms"},
    {"--heartbeat-gap-ms"},
    {"--sweep-interval-ms"},
    {"--status-json", false},
    {"--print-endpoint-file"},
};

constexpr uint64_t kDayMs = 24ull * 3600 * 1000;

}  // namespace

int main(int argc, char** argv) {
  std::optional<tools::Flags> flags;
  market::MarketServerOptions options;
  fs::path db, key;
  std::optional<crypto::PublicKey> operator_key;
  try {
    flags.emplace(argc, argv, 1, kFlags, kUsage);
    if (flags->help()) {
      std::fputs(kUsage, stdout);
      return 0;
    }
    if (!flags->positional().empty()) flags->fail(fmt::format("unexpected argument '{}'", flags->positional()[0]));
    db = flags->required("--db");
    key = flags->required("--key");
    options.bind_endpoint = flags->get_or("--bind", "tcp://127.0.0.1:7700");
    if (options.bind_endpoint.rfind("tcp://", 0) != 0 || options.bind_endpoint.find(':', 6) == std::string::npos)
      flags->fail(fmt::format("--bind: '{}' is not of the form tcp://HOST:PORT", options.bind_endpoint));
    if (auto hex = flags->get("--operator-key")) operator_key = crypto::PublicKey::from_hex(*hex, "--operator-key");
    options.ledger.faucet_limit = flags->number("--faucet-limit", 0, 0, market::kMaxLedgerAmount);
    options.ledger.alive_window = std::chrono::milliseconds(flags->number("--alive-window-ms", 10000, 1, kDayMs));
    options.ledger.heartbeat_gap = std::chrono::milliseconds(flags->number("--heartbeat-gap-ms", 5000, 1, kDayMs));
    options.sweep_interval = std::chrono::milliseconds(flags->number("--sweep-interval-ms", 1000, 1, kDayMs));
  } catch (const Error& e) {
    std::fprintf(stderr, "meshtrain-market: %s\n", e.what());
    return kUsageError;
  }

  CancelToken stop;
  tools::cancel_on_stop_signals(stop);

  try {
    crypto::Identity self = tools::load_or_create_identity(key, "market", "market identity");
    options.ledger.operator_key = operator_key.value_or(self.public_key());
    market::MarketServer server(self, db, options);
    if (auto file = flags->get("--print-endpoint-file"))
      tools::write_endpoint_file(*file, server.endpoint(), self.public_key());
    log::info("market", "serving on {} as {}; ledger {}; operator {}; faucet limit {}", server.endpoint(),
              self.public_key().hex(), db.string(), options.ledger.operator_key->fingerprint(),
              options.ledger.faucet_limit);

    bool json = flags->has("--status-json");
    std::string last;
    auto print_status = [&] {
      auto stats = server.stats();
      std::string line = json ? stats.to_json() : stats.to_text();
      if (line == last) return;
      std::fprintf(stdout, "%s\n", line.c_str());
      std::fflush(stdout);
      last = std::move(line);
    };
    print_status();
    while (!stop.cancelled()) {
      try {
        server.poll(Deadline::after(std::chrono::milliseconds(1000)), &stop);
      } catch (const CancelledError&) {
        break;
      }
      print_status();
    }
    print_status();
    log::info("market", "stopping: {}", server.stats().to_text());
  } catch (const Error& e) {
    std::fprintf(stderr, "meshtrain-market: %s\n", e.what());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "meshtrain-market: unexpected error: %s\n", e.what());
    return 1;
  }
  return 0;
}
