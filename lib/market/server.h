// meshtrain-market's request loop: a ControlServer that admits any key (each request is signed
// and bound to its connection's key), decodes signed requests under size limits, runs them on
// the Ledger and answers with the request's op_seq. Malformed input gets an error reply (or,
// when not even a request, is dropped) and is counted; it never stops the server.
//
// Internal to meshtrain (not installed). Not thread-safe: poll() from one thread.
#pragma once

#include <chrono>
#include <filesystem>
#include <memory>
#include <string>

#include "market/ledger.h"
#include "meshtrain/net.h"

namespace meshtrain::market {

struct MarketServerOptions {
  std::string bind_endpoint = "tcp://127.0.0.1:7700";
  LedgerOptions ledger;
  // How often open leases are checked for expiry between requests.
  std::chrono::milliseconds sweep_interval{1000};
};

struct MarketServerStats {
  uint64_t requests = 0;   // decoded, authenticated requests run on the ledger
  uint64_t ok = 0;         // ... answered with success
  uint64_t refused = 0;    // ... answered with a refusal (MarketError, AuthError, replayed nonce)
  uint64_t malformed = 0;  // undecodable, oversized, bad signature or foreign account: error reply
  uint64_t dropped = 0;    // not a market request, or the sender left before its reply
  uint64_t failed = 0;     // the database failed; nothing applied, error reply
  uint64_t expired = 0;    // leases closed by the expiry sweep
  uint64_t transport_rejected = 0;  // refused by the transport before decoding (net::RejectStats)
  std::string to_json() const;
  std::string to_text() const;
};

class MarketServer {
 public:
  // Opens (or creates) the ledger at `db` and binds. Throws what Ledger and ControlServer throw.
  MarketServer(const crypto::Identity& self, const std::filesystem::path& db, MarketServerOptions options = {});
  ~MarketServer();
  MarketServer(const MarketServer&) = delete;
  MarketServer& operator=(const MarketServer&) = delete;

  std::string endpoint() const;
  const crypto::PeerId& id() const;

  // Serves requests until `deadline`. Throws CancelledError when `cancel` fires.
  void poll(Deadline deadline, const CancelToken* cancel = nullptr);

  MarketServerStats stats() const;
  Ledger& ledger();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};


}  // namespace meshtrain::market
