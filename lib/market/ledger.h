// The devnet market's state: registry (offers, orders, bids, leases) and ledger (accounts,
// escrow, redeemed vouchers, reputation, event log) in one SQLite file. docs/market.md has the
// model, the rules and the reason words of every refusal.
//
// execute() runs one request as one transaction: the expiry sweep, the nonce check, the state
// change and the stored reply commit together (WAL, synchronous=FULL), so after a crash a request
// either happened completely, with its reply stored for a retry, or not at all.
//
// Internal to meshtrain (not installed). Not thread-safe: one Ledger per thread (the market
// server runs one).
#pragma once

#include <chrono>
#include <filesystem>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "market/protocol.h"
#include "meshtrain/market.h"

namespace meshtrain::market {

// Amounts are stored as SQLite integers, so the ledger accepts up to 2^63 - 1 of anything;
// more is refused as "amount_overflow".
inline constexpr Amount kMaxLedgerAmount = static_cast<Amount>(INT64_MAX);

struct LedgerOptions {
  // May mint any amount to anyone. Unset: only the faucet exists.
  std::optional<AccountId> operator_key;
  // Every account may mint to itself up to this much in total (0: no faucet).
  Amount faucet_limit = 0;
  // Discovery with alive_only returns providers heard from within this window.
  std::chrono::milliseconds alive_window{10000};
  // A pause between two heartbeats longer than this counts as down time for uptime.
  std::chrono::milliseconds heartbeat_gap{5000};
};

// The reputation inputs of one provider and the score derived from them (docs/market.md).
struct ProviderStats {
  TimeMs first_seen_ms = 0;      // first heartbeat; 0 = never
  TimeMs last_heartbeat_ms = 0;
  int64_t covered_ms = 0;        // time between heartbeats no more than heartbeat_gap apart
  uint64_t completed_steps = 0;
  uint32_t leases_clean = 0;
  uint32_t leases_abandoned = 0;
};
Reputation reputation_from_stats(const ProviderStats& stats, TimeMs now, std::chrono::milliseconds heartbeat_gap);

// Everything stored for an account, for tests and the audit.
struct AccountRow {
  Account account;
  Amount minted = 0;
  uint64_t last_nonce = 0;
  std::vector<uint8_t> last_request_hash;
  std::vector<uint8_t> last_reply;
  bool operator==(const AccountRow&) const;
};

struct AuditReport {
  Amount total_minted = 0;
  Amount total_balance = 0;
  Amount total_escrowed = 0;
  Amount total_earned = 0;
  Amount total_spent = 0;
  std::vector<std::string> problems;  // empty: the books balance
  bool ok() const { return problems.empty(); }
};

class Ledger {
 public:
  // Opens or creates the database. Throws IoError / CorruptError naming the file, or
  // InvalidArgumentError for a schema version this build does not know.
  Ledger(const std::filesystem::path& db_path, LedgerOptions options = {});
  ~Ledger();
  Ledger(const Ledger&) = delete;
  Ledger& operator=(const Ledger&) = delete;

  // Runs one request whose signature the caller verified and whose account is the
  // authenticated sender. Refusals come back as a failed Reply, never as an exception; an
  // exception means the database itself failed (nothing was applied).
  protocol::Reply execute(const protocol::Request& request, TimeMs now);

  // Closes every open lease whose expiry passed as Expired, refunding unspent escrow. Returns
  // how many it closed.
  size_t sweep(TimeMs now);

  // Checks conservation: balances + escrow == minted, earned == spent, per lease paid <= escrow,
  // per account escrowed == the unspent escrow of its open leases, per lease paid == its
  // redeemed voucher.
  AuditReport audit();

  std::optional<AccountRow> account_row(const AccountId& who);
  std::vector<AccountRow> account_rows();
  uint64_t event_count();
  const std::filesystem::path& path() const;
  const LedgerOptions& options() const;

  static constexpr int kSchemaVersion = 1;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// SHA-256 over a canonical encoding of every field of the request (the replay check's "same
// request"): equal requests hash equal however they were framed on the wire.
crypto::Digest request_digest(const protocol::Request& request);

}  // namespace meshtrain::market
