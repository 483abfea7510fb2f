// meshtrain market: discover GPU providers, lease them, pay them per training step.
//
// Accounts are Ed25519 key pairs (crypto::Identity); amounts are integers of the smallest unit
// (never floating point). The flow (docs/market.md):
//
//   provider offer -> renter order -> provider bid -> renter accept = lease (escrow locked)
//   -> per step a Voucher {lease, step, cumulative amount} signed by the renter, sent to the
//   provider -> provider redeem (the ledger pays cumulative - already paid out of escrow)
//   -> close (either side, with the closer's latest voucher settled; unspent escrow returns to
//   the renter) or expiry.
//
// The market itself is reached through MarketBackend. DevnetBackend talks to
// `meshtrain-market` (the local devnet registry + SQLite ledger, the embedded default) over the
// control transport; an adapter for a real network implements the same interface.
//
// Every state-changing request is signed by the acting account and carries a nonce above the
// account's last accepted one; the market rejects bad signatures, replayed nonces, wrong owners
// and insufficient funds with AuthError / MarketError naming the request and the field at fault.
#pragma once

#include <array>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "meshtrain/core.h"
#include "meshtrain/crypto.h"

namespace meshtrain::market {

using AccountId = crypto::PublicKey;
using Amount = uint64_t;  // smallest unit
using Id = uint64_t;      // offer, order, bid and lease ids; 0 = none
using TimeMs = int64_t;   // milliseconds since the Unix epoch (the market's clock)

// This machine's wall clock as TimeMs (lease expiry, heartbeat ages).
TimeMs wall_clock_ms();

// A request the market understood and refused: insufficient funds, a closed lease, a voucher
// that does not increase, a filter out of range... `reason` is a stable machine-readable word.
class MarketError : public Error {
 public:
  MarketError(std::string reason, const std::string& message)
      : Error(ErrorCode::InvalidArgument, message), reason_(std::move(reason)) {}
  const std::string& reason() const noexcept { return reason_; }

 private:
  std::string reason_;  // e.g. "insufficient_funds", "lease_closed", "stale_voucher"
};

// ---------------------------------------------------------------------------------------------
// Records.

struct GpuSpec {
  std::string model;              // e.g. "H100-80GB"
  uint32_t count = 1;
  uint32_t vram_gib = 0;          // per GPU
  std::string cuda_capability;    // e.g. "9.0"
};

// A hardware report (free text, JSON by convention: driver, GPUs, CPU, memory) signed by the
// provider, so a renter can check who vouched for it independently of the market.
struct HardwareReport {
  std::string text;
  crypto::Signature signature{};  // Ed25519 over kHardwareReportDomain || text

  static HardwareReport sign(const crypto::Identity& provider, std::string text);
  // Throws AuthError naming the provider when the signature does not match.
  void verify(const AccountId& provider) const;
};

struct OfferSpec {
  GpuSpec gpu;
  Amount price_per_step = 0;
  Amount price_per_hour_idle = 0;  // 0: no idle charge
  std::string region;              // free text, e.g. "eu-west"
  std::string endpoint;            // provider daemon's control endpoint, e.g. "tcp://10.0.0.5:7600"
  uint32_t latency_hint_ms = 0;    // provider's own estimate; a sort key, not a promise
  HardwareReport hardware;
};

struct Reputation {
  uint64_t completed_steps = 0;   // steps paid through redeemed vouchers
  uint32_t leases_clean = 0;      // closed normally (by either side, not for failure)
  uint32_t leases_abandoned = 0;  // closed by the renter because the provider failed
  double uptime = 0;              // 0..1: heartbeat coverage since first seen
  double score = 0;               // 0..1, see docs/market.md (sort key)
};

struct Offer {
  Id id = 0;
  AccountId provider;
  OfferSpec spec;
  Reputation reputation;
  bool active = true;             // false once withdrawn
  TimeMs created_ms = 0;
  TimeMs last_heartbeat_ms = 0;   // provider's latest heartbeat; 0 = never
};

enum class OfferSort : uint8_t { Price, Reputation, Latency };

struct OfferFilter {
  std::string gpu_model;          // exact match; empty = any
  uint32_t min_vram_gib = 0;
  uint32_t min_gpu_count = 0;
  Amount max_price_per_step = 0;  // 0 = any
  std::string region;             // exact match; empty = any
  double min_reputation = 0;      // on Reputation::score
  bool alive_only = true;         // only providers heard from within the market's alive window
  OfferSort sort = OfferSort::Price;  // ties: lower id first
  uint32_t limit = 50;            // page size, 1..1000
  uint64_t page_token = 0;        // from OfferPage::next_page_token; 0 = first page
};

struct OfferPage {
  std::vector<Offer> offers;
  uint64_t next_page_token = 0;   // 0: no more pages
  uint64_t total = 0;             // matches over all pages
};

struct OrderSpec {
  OfferFilter filter;             // sort/limit/page fields are ignored
  uint32_t count = 1;             // leases wanted
  Amount max_price_per_step = 0;
  Amount escrow_per_lease = 0;    // locked from the renter's balance at accept
  uint64_t lease_duration_s = 3600;
};

enum class OrderState : uint8_t { Open, Filled, Cancelled };

struct Order {
  Id id = 0;
  AccountId renter;
  OrderSpec spec;
  OrderState state = OrderState::Open;
  uint32_t leased = 0;            // leases accepted so far
  TimeMs created_ms = 0;
};

enum class BidState : uint8_t { Open, Accepted, Withdrawn };

struct Bid {
  Id id = 0;
  Id order_id = 0;
  Id offer_id = 0;
  AccountId provider;
  Amount price_per_step = 0;      // <= the order's max_price_per_step
  BidState state = BidState::Open;
  TimeMs created_ms = 0;
};

enum class LeaseState : uint8_t { Open, Closed };

enum class CloseReason : uint8_t {
  None,             // still open
  RenterDone,       // renter released it normally
  ProviderDone,     // provider closed it (e.g. renter stopped paying)
  ProviderFailed,   // renter closed it: provider missed heartbeats / left the quorum
  Expired,          // lease_duration passed
};

struct Lease {
  Id id = 0;
  Id order_id = 0;
  Id offer_id = 0;
  Id bid_id = 0;
  AccountId renter;
  AccountId provider;
  std::string endpoint;           // provider daemon's endpoint (from the offer)
  Amount price_per_step = 0;
  Amount escrow = 0;              // locked at accept
  Amount paid = 0;                // redeemed so far (cumulative amount of the last redeemed voucher)
  uint64_t paid_step = 0;         // step of the last redeemed voucher
  LeaseState state = LeaseState::Open;
  CloseReason close_reason = CloseReason::None;
  TimeMs started_ms = 0;
  TimeMs expires_ms = 0;
  TimeMs closed_ms = 0;
  TimeMs provider_last_heartbeat_ms = 0;
};

struct Account {
  AccountId id;
  Amount balance = 0;             // spendable
  Amount escrowed = 0;            // locked in open leases
  Amount earned = 0;              // total received through redemptions
  Amount spent = 0;               // total paid through redemptions
};

// ---------------------------------------------------------------------------------------------
// Vouchers: the renter's promise "for the first `step` steps of `lease`, I owe
// `cumulative_amount` in total". `step` counts the lease's paid steps (1, 2, ...), so a valid
// voucher has cumulative_amount == step x the lease's price_per_step; the provider daemon and the
// ledger both check that, and that step and amount only increase.

inline constexpr std::string_view kVoucherDomain = "meshtrain-voucher-v1";
inline constexpr std::string_view kHardwareReportDomain = "meshtrain-hardware-report-v1";

struct Voucher {
  Id lease_id = 0;
  uint64_t step = 0;
  Amount cumulative_amount = 0;
  uint64_t nonce = 0;             // fresh per voucher; makes equal (lease, step, amount) distinct
  crypto::Signature signature{};  // renter's Ed25519 over signed_bytes()

  static Voucher sign(const crypto::Identity& renter, Id lease_id, uint64_t step, Amount cumulative_amount,
                      uint64_t nonce);
  // kVoucherDomain || lease_id || step || cumulative_amount || nonce (little-endian u64s).
  std::vector<uint8_t> signed_bytes() const;
  // Throws AuthError naming the lease and the expected renter when the signature is not theirs.
  void verify(const AccountId& renter) const;
  bool operator==(const Voucher&) const = default;
};

// ---------------------------------------------------------------------------------------------
// The market, as a client sees it. Every call signs with `self` where it changes state.
// Throws MarketError (refused), AuthError (signature / nonce), TimeoutError (no answer),
// ProtocolError (malformed answer).

struct LeaseQuery {
  std::optional<AccountId> renter;
  std::optional<AccountId> provider;
  bool open_only = false;
  uint32_t limit = 100;           // 1..1000, newest first
};

struct OrderQuery {
  std::optional<AccountId> renter;
  bool open_only = true;
  // For providers looking for work: only orders whose filter the offer satisfies.
  std::optional<Id> matching_offer;
  uint32_t limit = 100;
};

struct RedeemResult {
  Amount paid_now = 0;            // this redemption's increment
  Lease lease;                    // after the redemption
};

class MarketBackend {
 public:
  virtual ~MarketBackend() = default;

  // Devnet faucet: credits `amount` to `to` (the market decides who may mint: its operator key,
  // or anyone up to a per-account faucet limit).
  virtual Account mint(const AccountId& to, Amount amount) = 0;
  virtual Account account(const AccountId& who) = 0;

  // Provider side.
  virtual Id offer(const OfferSpec& spec) = 0;
  virtual void withdraw_offer(Id offer_id) = 0;
  virtual Id bid(Id order_id, Id offer_id, Amount price_per_step) = 0;
  virtual void heartbeat() = 0;
  virtual RedeemResult redeem(const Voucher& voucher) = 0;

  // Renter side.
  virtual OfferPage discover(const OfferFilter& filter) = 0;
  virtual Id order(const OrderSpec& spec) = 0;
  virtual void cancel_order(Id order_id) = 0;
  virtual std::vector<Bid> bids(Id order_id) = 0;
  virtual Lease accept(Id bid_id) = 0;

  // Either side. `final_voucher` (the closer's latest voucher, if any) is settled first.
  virtual Lease close(Id lease_id, CloseReason reason, const std::optional<Voucher>& final_voucher) = 0;

  virtual std::vector<Order> orders(const OrderQuery& query) = 0;
  virtual std::vector<Lease> leases(const LeaseQuery& query) = 0;
  virtual Lease lease(Id lease_id) = 0;
  virtual Reputation reputation(const AccountId& provider) = 0;
};

struct DevnetOptions {
  std::chrono::milliseconds request_timeout{5000};  // per request (TimeoutError naming the market)
  uint32_t retries = 2;           // resend after a timeout (requests are idempotent by nonce)
};

// Talks to `meshtrain-market` at `endpoint`, whose identity is `market_key`.
std::unique_ptr<MarketBackend> connect_devnet(const crypto::Identity& self, const AccountId& market_key,
                                              const std::string& endpoint, DevnetOptions options = {});

// ---------------------------------------------------------------------------------------------
// Renter: leases, per-step payment and a fleet that replaces failed providers.

struct Budget {
  Amount spend_limit = 0;         // total of all vouchers this client may ever sign (never exceeded)
  Amount escrow_per_lease = 0;
  Amount max_price_per_step = 0;  // 0: up to escrow_per_lease (a dearer step could not be paid once)
  uint64_t lease_duration_s = 3600;
};

struct Spend {
  Amount total = 0;               // sum of cumulative amounts signed, over all leases
  uint64_t steps_paid = 0;        // step vouchers signed (one per lease and step)
};

// Thread-safe: payments to different leases may run at the same time (each waits for its own
// daemon's acknowledgement); calls on one lease are serialized.
class MarketClient {
 public:
  MarketClient(const crypto::Identity& self, MarketBackend& backend, Budget budget);
  ~MarketClient();
  MarketClient(const MarketClient&) = delete;
  MarketClient& operator=(const MarketClient&) = delete;

  OfferPage discover(const OfferFilter& filter);
  // Orders `count` leases matching `filter`, waits up to `wait` for bids, accepts the cheapest
  // (then best reputation). Returns what it got (possibly fewer than `count`: the caller decides).
  std::vector<Lease> rent(uint32_t count, const OfferFilter& filter, std::chrono::milliseconds wait);
  // Signs the voucher for `step` (cumulative = price x steps since the lease's first paid step)
  // and delivers it to the provider's daemon; returns it. Throws MarketError("spend_limit") before
  // signing anything that would exceed the budget, PeerLostError naming the provider when the
  // daemon does not acknowledge within `timeout`.
  Voucher pay_step(Id lease_id, uint64_t step, std::chrono::milliseconds timeout = std::chrono::milliseconds(2000));
  // pay_step without the wait: first waits for the acknowledgement of the lease's previous
  // voucher (up to `timeout`; normally it arrived during the step, so no wait; its failures are
  // thrown here, before anything new is signed), then signs and sends this step's voucher and
  // returns. confirm() waits for the last one. Same budget rules as pay_step.
  Voucher pay_step_async(Id lease_id, uint64_t step,
                         std::chrono::milliseconds timeout = std::chrono::milliseconds(2000));
  void confirm(Id lease_id, std::chrono::milliseconds timeout = std::chrono::milliseconds(2000));
  // Closes the lease with the latest voucher settled.
  Lease release(Id lease_id, CloseReason reason = CloseReason::RenterDone);
  // Tells the provider's daemon where its worker joins the job. Throws MarketError(reason) when
  // the daemon refuses, PeerLostError naming the provider when it does not answer in `timeout`.
  void attach_job(Id lease_id, const std::string& coordinator_endpoint, const AccountId& coordinator_key,
                  const std::string& join_token = {},
                  std::chrono::milliseconds timeout = std::chrono::milliseconds(5000));
  // Forgets a lease the market already closed (e.g. by the provider or by expiry).
  void forget(Id lease_id);
  std::vector<Lease> leases() const;  // the leases this client holds (as last seen)

  std::optional<Voucher> latest_voucher(Id lease_id) const;
  Spend spend() const;
  const Budget& budget() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

struct FleetEvent {
  enum class Kind : uint8_t { Leased, ProviderFailed, Replaced, Released, BudgetExhausted } kind;
  Id lease_id = 0;
  AccountId provider;
  std::string detail;
};

struct FleetOptions {
  uint32_t size = 1;              // providers to keep leased
  OfferFilter filter;
  std::chrono::milliseconds rent_wait{3000};
  // A provider whose latest heartbeat at the market is older than this is failed.
  std::chrono::milliseconds heartbeat_timeout{3000};
  // A provider's daemon that has not acknowledged a voucher this long after it was sent (checked
  // when the next step is paid) has failed.
  std::chrono::milliseconds voucher_timeout{2000};
  std::function<void(const FleetEvent&)> on_event;  // progress output; may be empty
};

// Keeps `size` providers leased within the client's budget: pays each lease every step; when a
// provider misses heartbeats, does not acknowledge a voucher, or is reported gone by the caller
// (e.g. its worker left the quorum), closes its lease (ProviderFailed) and rents a replacement.
class Fleet {
 public:
  Fleet(MarketClient& client, MarketBackend& backend, FleetOptions options);
  ~Fleet();
  // Rents up to size leases now.
  void fill();
  // Pays every lease for `step` with pay_step_async: each lease's previous voucher must have
  // been acknowledged (a provider that did not is failed before it is paid again), this step's
  // voucher is sent without waiting. Handles failures as above. Returns the open leases after.
  std::vector<Lease> pay_step(uint64_t step);
  void report_failed(const AccountId& provider, const std::string& why);
  std::vector<Lease> leases() const;
  void release_all();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// ---------------------------------------------------------------------------------------------
// Economics: `meshtrain market cost` and the cost line in job status.

struct CostEstimate {
  Amount per_step = 0;            // all peers together
  Amount total = 0;               // steps x per_step
  double per_1k_samples = 0;      // when samples_per_step > 0
  // The same job at a cloud price the user supplies (units per GPU-hour) and a measured or
  // assumed step time; 0 when not supplied.
  double cloud_total = 0;
};

CostEstimate estimate_cost(Amount price_per_step, uint64_t steps, uint32_t peers, uint64_t samples_per_step = 0,
                           double cloud_price_per_gpu_hour = 0, double step_seconds = 0);

std::string_view close_reason_name(CloseReason reason) noexcept;
std::string_view lease_state_name(LeaseState state) noexcept;
std::string_view order_state_name(OrderState state) noexcept;
std::string_view bid_state_name(BidState state) noexcept;

}  // namespace meshtrain::market
