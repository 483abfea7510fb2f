#include "market/ledger.h"

#include <sqlite3.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "market/sqlite.h"

namespace meshtrain::market {
namespace {

using protocol::Reply;
using protocol::ReplyBody;
using protocol::Request;

constexpr std::string_view kSchema = R"sql(
CREATE TABLE accounts (
  key BLOB PRIMARY KEY CHECK (length(key) = 32),
  balance INTEGER NOT NULL DEFAULT 0 CHECK (balance >= 0),
  escrowed INTEGER NOT NULL DEFAULT 0 CHECK (escrowed >= 0),
  earned INTEGER NOT NULL DEFAULT 0 CHECK (earned >= 0),
  spent INTEGER NOT NULL DEFAULT 0 CHECK (spent >= 0),
  minted INTEGER NOT NULL DEFAULT 0 CHECK (minted >= 0),
  last_nonce INTEGER NOT NULL DEFAULT 0,
  last_request_hash BLOB,
  last_reply BLOB,
  created_ms INTEGER NOT NULL
) WITHOUT ROWID;

CREATE TABLE offers (
  id INTEGER PRIMARY KEY,
  provider BLOB NOT NULL REFERENCES accounts(key),
  gpu_model TEXT NOT NULL,
  gpu_count INTEGER NOT NULL,
  vram_gib INTEGER NOT NULL,
  cuda_capability TEXT NOT NULL,
  price_per_step INTEGER NOT NULL CHECK (price_per_step > 0),
  price_per_hour_idle INTEGER NOT NULL CHECK (price_per_hour_idle >= 0),
  region TEXT NOT NULL,
  endpoint TEXT NOT NULL,
  latency_hint_ms INTEGER NOT NULL,
  hardware_text TEXT NOT NULL,
  hardware_signature BLOB NOT NULL,
  active INTEGER NOT NULL,
  busy_lease INTEGER NOT NULL DEFAULT 0,
  created_ms INTEGER NOT NULL,
  -- A copy of provider_stats.last_heartbeat_ms, so the alive filter needs no join per offer.
  provider_heartbeat_ms INTEGER NOT NULL DEFAULT 0
);
-- Discovery walks these in sort order over the offers that can be leased now; the heartbeat
-- column makes the default (alive only) query and its count index-only.
CREATE INDEX offers_free_by_price ON offers(price_per_step, id, provider_heartbeat_ms)
  WHERE active = 1 AND busy_lease = 0;
CREATE INDEX offers_free_by_latency ON offers(latency_hint_ms, id, provider_heartbeat_ms)
  WHERE active = 1 AND busy_lease = 0;
CREATE INDEX offers_free_by_model ON offers(gpu_model, price_per_step, id) WHERE active = 1 AND busy_lease = 0;
CREATE INDEX offers_by_provider ON offers(provider, id);

CREATE TABLE orders (
  id INTEGER PRIMARY KEY,
  renter BLOB NOT NULL REFERENCES accounts(key),
  f_gpu_model TEXT NOT NULL,
  f_min_vram_gib INTEGER NOT NULL,
  f_min_gpu_count INTEGER NOT NULL,
  f_max_price_per_step INTEGER NOT NULL,
  f_region TEXT NOT NULL,
  f_min_reputation REAL NOT NULL,
  f_alive_only INTEGER NOT NULL,
  count INTEGER NOT NULL CHECK (count > 0),
  max_price_per_step INTEGER NOT NULL,
  escrow_per_lease INTEGER NOT NULL,
  lease_duration_s INTEGER NOT NULL,
  state INTEGER NOT NULL,
  leased INTEGER NOT NULL DEFAULT 0 CHECK (leased <= count),
  created_ms INTEGER NOT NULL
);
CREATE INDEX orders_by_renter ON orders(renter, id);
CREATE INDEX orders_by_state ON orders(state, id);

CREATE TABLE bids (
  id INTEGER PRIMARY KEY,
  order_id INTEGER NOT NULL REFERENCES orders(id),
  offer_id INTEGER NOT NULL REFERENCES offers(id),
  provider BLOB NOT NULL REFERENCES accounts(key),
  price_per_step INTEGER NOT NULL CHECK (price_per_step > 0),
  state INTEGER NOT NULL,
  created_ms INTEGER NOT NULL
);
CREATE INDEX bids_by_order ON bids(order_id, id);
CREATE INDEX bids_by_offer ON bids(offer_id, state);
CREATE UNIQUE INDEX bids_one_open_per_order_and_offer ON bids(order_id, offer_id) WHERE state = 0;

CREATE TABLE leases (
  id INTEGER PRIMARY KEY,
  order_id INTEGER NOT NULL REFERENCES orders(id),
  offer_id INTEGER NOT NULL REFERENCES offers(id),
  bid_id INTEGER NOT NULL REFERENCES bids(id),
  renter BLOB NOT NULL REFERENCES accounts(key),
  provider BLOB NOT NULL REFERENCES accounts(key),
  endpoint TEXT NOT NULL,
  price_per_step INTEGER NOT NULL CHECK (price_per_step > 0),
  escrow INTEGER NOT NULL CHECK (escrow >= 0),
  paid INTEGER NOT NULL DEFAULT 0 CHECK (paid >= 0 AND paid <= escrow),
  paid_step INTEGER NOT NULL DEFAULT 0,
  state INTEGER NOT NULL,
  close_reason INTEGER NOT NULL,
  started_ms INTEGER NOT NULL,
  expires_ms INTEGER NOT NULL,
  closed_ms INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX leases_open_by_expiry ON leases(expires_ms) WHERE state = 0;
CREATE INDEX leases_by_renter ON leases(renter, id);
CREATE INDEX leases_by_provider ON leases(provider, id);
CREATE UNIQUE INDEX leases_one_open_per_offer ON leases(offer_id) WHERE state = 0;

-- The latest redeemed voucher of each lease, signature included: the renter's own proof of
-- what the lease was paid.
CREATE TABLE redeemed_vouchers (
  lease_id INTEGER PRIMARY KEY REFERENCES leases(id),
  step INTEGER NOT NULL,
  cumulative_amount INTEGER NOT NULL,
  nonce INTEGER NOT NULL,
  signature BLOB NOT NULL CHECK (length(signature) = 64),
  redeemed_ms INTEGER NOT NULL
);

CREATE TABLE provider_stats (
  provider BLOB PRIMARY KEY REFERENCES accounts(key),
  first_seen_ms INTEGER NOT NULL DEFAULT 0,
  last_heartbeat_ms INTEGER NOT NULL DEFAULT 0,
  covered_ms INTEGER NOT NULL DEFAULT 0,
  completed_steps INTEGER NOT NULL DEFAULT 0,
  leases_clean INTEGER NOT NULL DEFAULT 0,
  leases_abandoned INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE INDEX provider_stats_by_heartbeat ON provider_stats(last_heartbeat_ms);

CREATE TABLE events (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  time_ms INTEGER NOT NULL,
  kind TEXT NOT NULL,
  account BLOB,
  lease INTEGER NOT NULL DEFAULT 0,
  amount INTEGER NOT NULL DEFAULT 0,
  detail TEXT NOT NULL DEFAULT ''
);
CREATE TRIGGER events_no_update BEFORE UPDATE ON events BEGIN SELECT RAISE(ABORT, 'events are append-only'); END;
CREATE TRIGGER events_no_delete BEFORE DELETE ON events BEGIN SELECT RAISE(ABORT, 'events are append-only'); END;
)sql";

constexpr uint64_t kMaxLeaseDurationS = 10ull * 365 * 24 * 3600;
constexpr uint32_t kMaxOrderCount = 1000;

[[noreturn]] void refuse(std::string reason, const std::string& message) {
  throw MarketError(std::move(reason), message);
}

void check_amount(Amount value, std::string_view field) {
  if (value > kMaxLedgerAmount)
    refuse("amount_overflow", fmt::format("{} = {} is above the ledger's limit {}", field, value, kMaxLedgerAmount));
}

Amount checked_add(Amount a, Amount b, std::string_view what) {
  if (a > kMaxLedgerAmount || b > kMaxLedgerAmount - a)
    refuse("amount_overflow", fmt::format("{}: {} + {} exceeds the ledger's limit {}", what, a, b, kMaxLedgerAmount));
  return a + b;
}

Amount checked_mul(uint64_t a, uint64_t b, std::string_view what) {
  if (a != 0 && b > kMaxLedgerAmount / a)
    refuse("amount_overflow", fmt::format("{}: {} x {} exceeds the ledger's limit {}", what, a, b, kMaxLedgerAmount));
  return a * b;
}

// Subtractions the rules already guarantee (escrow never goes negative); a failure is a bug.
Amount checked_sub(Amount a, Amount b, std::string_view what) {
  if (b > a) throw InternalError(fmt::format("ledger invariant broken: {}: {} - {} is negative", what, a, b));
  return a - b;
}

void check_text(std::string_view text, std::string_view field, bool required) {
  if (required && text.empty()) refuse("invalid_field", fmt::format("{} is empty", field));
  if (text.size() > protocol::kMaxTextBytes)
    refuse("invalid_field",
           fmt::format("{} is {} bytes, more than the limit {}", field, text.size(), protocol::kMaxTextBytes));
}

void check_limit(uint32_t limit) {
  if (limit < 1 || limit > protocol::kMaxPageSize)
    refuse("invalid_field", fmt::format("limit {} is outside 1..{}", limit, protocol::kMaxPageSize));
}

int64_t db_amount(Amount value) { return static_cast<int64_t>(value); }  // checked <= INT64_MAX before

AccountId key_from(const std::vector<uint8_t>& bytes, std::string_view what) {
  return AccountId::from_bytes(bytes, what);
}

std::string who(const AccountId& key) { return key.fingerprint(); }

// ---------------------------------------------------------------------------------------------
// Canonical request encoding for the replay digest.

class Canon {
 public:
  void u64(uint64_t v) {
    uint8_t b[8];
    for (int i = 0; i < 8; ++i) b[i] = static_cast<uint8_t>(v >> (8 * i));
    sha_.update(b);
  }
  void i64(int64_t v) { u64(static_cast<uint64_t>(v)); }
  void f64(double v) {
    uint64_t bits;
    std::memcpy(&bits, &v, sizeof bits);
    u64(bits);
  }
  void text(std::string_view s) {
    u64(s.size());
    sha_.update({reinterpret_cast<const uint8_t*>(s.data()), s.size()});
  }
  void key(const AccountId& k) { sha_.update(k.bytes); }
  void optional_key(const std::optional<AccountId>& k) {
    u64(k ? 1 : 0);
    if (k) key(*k);
  }
  void voucher(const Voucher& v) {
    u64(v.lease_id);
    u64(v.step);
    u64(v.cumulative_amount);
    u64(v.nonce);
    sha_.update(v.signature);
  }
  void filter(const OfferFilter& f) {
    text(f.gpu_model);
    u64(f.min_vram_gib);
    u64(f.min_gpu_count);
    u64(f.max_price_per_step);
    text(f.region);
    f64(f.min_reputation);
    u64(f.alive_only);
    u64(static_cast<uint64_t>(f.sort));
    u64(f.limit);
    u64(f.page_token);
  }
  crypto::Digest finish() { return sha_.finish(); }

 private:
  crypto::Sha256 sha_;
};

template <class... F>
struct Overloaded : F... {
  using F::operator()...;
};
template <class... F>
Overloaded(F...) -> Overloaded<F...>;

// ---------------------------------------------------------------------------------------------
// Row readers. Every SELECT lists its columns in the order these read them.

constexpr std::string_view kOfferSelect =
    "SELECT o.id, o.provider, o.gpu_model, o.gpu_count, o.vram_gib, o.cuda_capability, o.price_per_step, "
    "o.price_per_hour_idle, o.region, o.endpoint, o.latency_hint_ms, o.hardware_text, o.hardware_signature, "
    "o.active, o.created_ms, o.busy_lease, ifnull(s.first_seen_ms, 0), ifnull(s.last_heartbeat_ms, 0), "
    "ifnull(s.covered_ms, 0), ifnull(s.completed_steps, 0), ifnull(s.leases_clean, 0), ifnull(s.leases_abandoned, 0) "
    "FROM offers o LEFT JOIN provider_stats s ON s.provider = o.provider ";

ProviderStats read_stats(const sqlite::Statement& st, int c) {
  ProviderStats s;
  s.first_seen_ms = st.int64(c);
  s.last_heartbeat_ms = st.int64(c + 1);
  s.covered_ms = st.int64(c + 2);
  s.completed_steps = static_cast<uint64_t>(st.int64(c + 3));
  s.leases_clean = static_cast<uint32_t>(st.int64(c + 4));
  s.leases_abandoned = static_cast<uint32_t>(st.int64(c + 5));
  return s;
}

struct OfferRow {
  Offer offer;
  Id busy_lease = 0;
};

OfferRow read_offer(const sqlite::Statement& st, TimeMs now, std::chrono::milliseconds gap) {
  OfferRow row;
  Offer& o = row.offer;
  o.id = static_cast<Id>(st.int64(0));
  o.provider = key_from(st.blob(1), "offers.provider");
  o.spec.gpu.model = st.text(2);
  o.spec.gpu.count = static_cast<uint32_t>(st.int64(3));
  o.spec.gpu.vram_gib = static_cast<uint32_t>(st.int64(4));
  o.spec.gpu.cuda_capability = st.text(5);
  o.spec.price_per_step = static_cast<Amount>(st.int64(6));
  o.spec.price_per_hour_idle = static_cast<Amount>(st.int64(7));
  o.spec.region = st.text(8);
  o.spec.endpoint = st.text(9);
  o.spec.latency_hint_ms = static_cast<uint32_t>(st.int64(10));
  o.spec.hardware.text = st.text(11);
  auto sig = st.blob(12);
  if (sig.size() == o.spec.hardware.signature.size())
    std::copy(sig.begin(), sig.end(), o.spec.hardware.signature.begin());
  o.active = st.int64(13) != 0;
  o.created_ms = st.int64(14);
  row.busy_lease = static_cast<Id>(st.int64(15));
  ProviderStats stats = read_stats(st, 16);
  o.reputation = reputation_from_stats(stats, now, gap);
  o.last_heartbeat_ms = stats.last_heartbeat_ms;
  return row;
}

constexpr std::string_view kLeaseSelect =
    "SELECT l.id, l.order_id, l.offer_id, l.bid_id, l.renter, l.provider, l.endpoint, l.price_per_step, l.escrow, "
    "l.paid, l.paid_step, l.state, l.close_reason, l.started_ms, l.expires_ms, l.closed_ms, "
    "ifnull(s.last_heartbeat_ms, 0) FROM leases l LEFT JOIN provider_stats s ON s.provider = l.provider ";

Lease read_lease(const sqlite::Statement& st) {
  Lease l;
  l.id = static_cast<Id>(st.int64(0));
  l.order_id = static_cast<Id>(st.int64(1));
  l.offer_id = static_cast<Id>(st.int64(2));
  l.bid_id = static_cast<Id>(st.int64(3));
  l.renter = key_from(st.blob(4), "leases.renter");
  l.provider = key_from(st.blob(5), "leases.provider");
  l.endpoint = st.text(6);
  l.price_per_step = static_cast<Amount>(st.int64(7));
  l.escrow = static_cast<Amount>(st.int64(8));
  l.paid = static_cast<Amount>(st.int64(9));
  l.paid_step = static_cast<uint64_t>(st.int64(10));
  l.state = static_cast<LeaseState>(st.int64(11));
  l.close_reason = static_cast<CloseReason>(st.int64(12));
  l.started_ms = st.int64(13);
  l.expires_ms = st.int64(14);
  l.closed_ms = st.int64(15);
  l.provider_last_heartbeat_ms = st.int64(16);
  return l;
}

constexpr std::string_view kOrderSelect =
    "SELECT id, renter, f_gpu_model, f_min_vram_gib, f_min_gpu_count, f_max_price_per_step, f_region, "
    "f_min_reputation, f_alive_only, count, max_price_per_step, escrow_per_lease, lease_duration_s, state, leased, "
    "created_ms FROM orders ";

Order read_order(const sqlite::Statement& st) {
  Order o;
  o.id = static_cast<Id>(st.int64(0));
  o.renter = key_from(st.blob(1), "orders.renter");
  o.spec.filter.gpu_model = st.text(2);
  o.spec.filter.min_vram_gib = static_cast<uint32_t>(st.int64(3));
  o.spec.filter.min_gpu_count = static_cast<uint32_t>(st.int64(4));
  o.spec.filter.max_price_per_step = static_cast<Amount>(st.int64(5));
  o.spec.filter.region = st.text(6);
  o.spec.filter.min_reputation = st.real(7);
  o.spec.filter.alive_only = st.int64(8) != 0;
  o.spec.count = static_cast<uint32_t>(st.int64(9));
  o.spec.max_price_per_step = static_cast<Amount>(st.int64(10));
  o.spec.escrow_per_lease = static_cast<Amount>(st.int64(11));
  o.spec.lease_duration_s = static_cast<uint64_t>(st.int64(12));
  o.state = static_cast<OrderState>(st.int64(13));
  o.leased = static_cast<uint32_t>(st.int64(14));
  o.created_ms = st.int64(15);
  return o;
}

constexpr std::string_view kBidSelect =
    "SELECT id, order_id, offer_id, provider, price_per_step, state, created_ms FROM bids ";

Bid read_bid(const sqlite::Statement& st) {
  Bid b;
  b.id = static_cast<Id>(st.int64(0));
  b.order_id = static_cast<Id>(st.int64(1));
  b.offer_id = static_cast<Id>(st.int64(2));
  b.provider = key_from(st.blob(3), "bids.provider");
  b.price_per_step = static_cast<Amount>(st.int64(4));
  b.state = static_cast<BidState>(st.int64(5));
  b.created_ms = st.int64(6);
  return b;
}

AccountRow read_account_row(const sqlite::Statement& st) {
  AccountRow row;
  row.account.id = key_from(st.blob(0), "accounts.key");
  row.account.balance = static_cast<Amount>(st.int64(1));
  row.account.escrowed = static_cast<Amount>(st.int64(2));
  row.account.earned = static_cast<Amount>(st.int64(3));
  row.account.spent = static_cast<Amount>(st.int64(4));
  row.minted = static_cast<Amount>(st.int64(5));
  row.last_nonce = static_cast<uint64_t>(st.int64(6));
  row.last_request_hash = st.blob(7);
  row.last_reply = st.blob(8);
  return row;
}

constexpr std::string_view kAccountSelect =
    "SELECT key, balance, escrowed, earned, spent, minted, last_nonce, last_request_hash, last_reply FROM accounts ";

// Why `offer` does not satisfy `filter`, or empty when it does. Sort, limit and page fields are
// not part of a match.
std::string filter_mismatch(const Offer& offer, const OfferFilter& filter, bool check_alive, TimeMs now,
                            std::chrono::milliseconds alive_window) {
  const auto& s = offer.spec;
  if (!filter.gpu_model.empty() && s.gpu.model != filter.gpu_model)
    return fmt::format("gpu model '{}' is not '{}'", s.gpu.model, filter.gpu_model);
  if (s.gpu.vram_gib < filter.min_vram_gib)
    return fmt::format("{} GiB of VRAM is below {}", s.gpu.vram_gib, filter.min_vram_gib);
  if (s.gpu.count < filter.min_gpu_count)
    return fmt::format("{} GPUs are fewer than {}", s.gpu.count, filter.min_gpu_count);
  if (filter.max_price_per_step != 0 && s.price_per_step > filter.max_price_per_step)
    return fmt::format("price per step {} is above {}", s.price_per_step, filter.max_price_per_step);
  if (!filter.region.empty() && s.region != filter.region)
    return fmt::format("region '{}' is not '{}'", s.region, filter.region);
  if (offer.reputation.score < filter.min_reputation)
    return fmt::format("reputation score {:.3f} is below {:.3f}", offer.reputation.score, filter.min_reputation);
  if (check_alive && filter.alive_only && offer.last_heartbeat_ms < now - alive_window.count())
    return fmt::format("the provider was not heard from within {} ms", alive_window.count());
  return {};
}

void validate_filter(const OfferFilter& f, std::string_view what) {
  check_text(f.gpu_model, fmt::format("{}.gpu_model", what), false);
  check_text(f.region, fmt::format("{}.region", what), false);
  check_amount(f.max_price_per_step, fmt::format("{}.max_price_per_step", what));
  if (!std::isfinite(f.min_reputation) || f.min_reputation < 0 || f.min_reputation > 1)
    refuse("invalid_field", fmt::format("{}.min_reputation {} is outside 0..1", what, f.min_reputation));
}

// SQL: reputation_score(now, heartbeat_gap_ms, first_seen, last_heartbeat, covered, completed,
// clean, abandoned) -- the same function discovery results report, so sort and filter agree.
void sql_reputation_score(sqlite3_context* ctx, int argc, sqlite3_value** argv) {
  if (argc != 8) {
    sqlite3_result_error(ctx, "reputation_score takes 8 arguments", -1);
    return;
  }
  ProviderStats s;
  TimeMs now = sqlite3_value_int64(argv[0]);
  auto gap = std::chrono::milliseconds(sqlite3_value_int64(argv[1]));
  s.first_seen_ms = sqlite3_value_int64(argv[2]);
  s.last_heartbeat_ms = sqlite3_value_int64(argv[3]);
  s.covered_ms = sqlite3_value_int64(argv[4]);
  s.completed_steps = static_cast<uint64_t>(sqlite3_value_int64(argv[5]));
  s.leases_clean = static_cast<uint32_t>(sqlite3_value_int64(argv[6]));
  s.leases_abandoned = static_cast<uint32_t>(sqlite3_value_int64(argv[7]));
  sqlite3_result_double(ctx, reputation_from_stats(s, now, gap).score);
}

constexpr std::string_view kScoreExpr =
    "reputation_score(?1, ?2, ifnull(s.first_seen_ms, 0), ifnull(s.last_heartbeat_ms, 0), ifnull(s.covered_ms, 0), "
    "ifnull(s.completed_steps, 0), ifnull(s.leases_clean, 0), ifnull(s.leases_abandoned, 0))";

}  // namespace

// ---------------------------------------------------------------------------------------------

Reputation reputation_from_stats(const ProviderStats& s, TimeMs now, std::chrono::milliseconds heartbeat_gap) {
  Reputation r;
  r.completed_steps = s.completed_steps;
  r.leases_clean = s.leases_clean;
  r.leases_abandoned = s.leases_abandoned;
  if (s.first_seen_ms > 0) {
    // Time since the last heartbeat counts as up while it is within the gap.
    int64_t tail = now - s.last_heartbeat_ms;
    int64_t covered = s.covered_ms + (tail >= 0 && tail <= heartbeat_gap.count() ? tail : 0);
    int64_t span = now - s.first_seen_ms;
    r.uptime = span <= 0 ? 1.0 : std::clamp(static_cast<double>(covered) / static_cast<double>(span), 0.0, 1.0);
  }
  double reliability = (s.leases_clean + 1.0) / (s.leases_clean + s.leases_abandoned + 2.0);
  double experience = static_cast<double>(s.completed_steps) / (static_cast<double>(s.completed_steps) + 1000.0);
  r.score = r.uptime * reliability * (0.5 + 0.5 * experience);
  return r;
}

bool AccountRow::operator==(const AccountRow& o) const {
  return account.id == o.account.id && account.balance == o.account.balance && account.escrowed == o.account.escrowed &&
         account.earned == o.account.earned && account.spent == o.account.spent && minted == o.minted &&
         last_nonce == o.last_nonce && last_request_hash == o.last_request_hash && last_reply == o.last_reply;
}

crypto::Digest request_digest(const Request& request) {
  Canon c;
  c.text(protocol::kRequestDomain);
  c.key(request.account);
  c.u64(request.nonce);
  c.u64(request.body.index());
  std::visit(Overloaded{
                 [&](const protocol::Mint& m) {
                   c.key(m.to);
                   c.u64(m.amount);
                 },
                 [&](const protocol::AccountQuery& q) { c.key(q.who); },
                 [&](const OfferSpec& s) {
                   c.text(s.gpu.model);
                   c.u64(s.gpu.count);
                   c.u64(s.gpu.vram_gib);
                   c.text(s.gpu.cuda_capability);
                   c.u64(s.price_per_step);
                   c.u64(s.price_per_hour_idle);
                   c.text(s.region);
                   c.text(s.endpoint);
                   c.u64(s.latency_hint_ms);
                   c.text(s.hardware.text);
                   c.text({reinterpret_cast<const char*>(s.hardware.signature.data()), s.hardware.signature.size()});
                 },
                 [&](const protocol::WithdrawOffer& w) { c.u64(w.offer_id); },
                 [&](const protocol::PlaceBid& b) {
                   c.u64(b.order_id);
                   c.u64(b.offer_id);
                   c.u64(b.price_per_step);
                 },
                 [&](const protocol::Heartbeat&) {},
                 [&](const protocol::Redeem& r) { c.voucher(r.voucher); },
                 [&](const protocol::Discover& d) { c.filter(d.filter); },
                 [&](const protocol::PlaceOrder& o) {
                   c.filter(o.spec.filter);
                   c.u64(o.spec.count);
                   c.u64(o.spec.max_price_per_step);
                   c.u64(o.spec.escrow_per_lease);
                   c.u64(o.spec.lease_duration_s);
                 },
                 [&](const protocol::CancelOrder& o) { c.u64(o.order_id); },
                 [&](const protocol::BidsQuery& q) { c.u64(q.order_id); },
                 [&](const protocol::Accept& a) { c.u64(a.bid_id); },
                 [&](const protocol::Close& cl) {
                   c.u64(cl.lease_id);
                   c.u64(static_cast<uint64_t>(cl.reason));
                   c.u64(cl.voucher ? 1 : 0);
                   if (cl.voucher) c.voucher(*cl.voucher);
                 },
                 [&](const OrderQuery& q) {
                   c.optional_key(q.renter);
                   c.u64(q.open_only);
                   c.u64(q.matching_offer ? 1 : 0);
                   c.u64(q.matching_offer.value_or(0));
                   c.u64(q.limit);
                 },
                 [&](const LeaseQuery& q) {
                   c.optional_key(q.renter);
                   c.optional_key(q.provider);
                   c.u64(q.open_only);
                   c.u64(q.limit);
                 },
                 [&](const protocol::LeaseLookup& l) { c.u64(l.lease_id); },
                 [&](const protocol::ReputationQuery& q) { c.key(q.provider); },
             },
             request.body);
  return c.finish();
}

// ---------------------------------------------------------------------------------------------

struct Ledger::Impl {
  sqlite::Database db;
  LedgerOptions options;

  Impl(const std::filesystem::path& path, LedgerOptions opts) : db(path), options(std::move(opts)) {
    db.exec("PRAGMA journal_mode = WAL");
    db.exec("PRAGMA synchronous = FULL");
    db.exec("PRAGMA foreign_keys = ON");
    db.exec("PRAGMA cache_size = -65536");  // 64 MiB: a devnet ledger stays in memory
    int rc = sqlite3_create_function_v2(db.handle(), "reputation_score", 8, SQLITE_UTF8 | SQLITE_DETERMINISTIC, nullptr,
                                        sql_reputation_score, nullptr, nullptr, nullptr);
    if (rc != SQLITE_OK) db.fail(rc, "register reputation_score");
    sqlite::Transaction tx(db);
    auto& v = db.cached("PRAGMA user_version");
    int64_t version = v.step() ? v.int64(0) : 0;
    v.reset();
    if (version == 0) {
      db.exec(kSchema);
      db.exec(fmt::format("PRAGMA user_version = {}", kSchemaVersion));
    } else if (version != kSchemaVersion) {
      throw InvalidArgumentError(fmt::format("database {}: schema version {} is not the version {} this build knows",
                                             path.string(), version, kSchemaVersion));
    }
    tx.commit();
    refresh_statistics();
  }

  // Table statistics let the planner tell a selective index from a scan (e.g. a region filter
  // is cheaper as a scan than through the price index). Bounded work; run at open and now and
  // then from the sweep.
  void refresh_statistics() {
    db.exec("PRAGMA analysis_limit = 1000");
    db.exec("ANALYZE");
    last_statistics = Clock::now();
  }
  Clock::time_point last_statistics;

  TimeMs alive_since(TimeMs now) const { return now - options.alive_window.count(); }

  void event(TimeMs now, std::string_view kind, const AccountId* account, Id lease, Amount amount,
             const std::string& detail) {
    auto& st = db.cached("INSERT INTO events(time_ms, kind, account, lease, amount, detail) VALUES (?,?,?,?,?,?)");
    st.bind(1, now).bind(2, kind);
    if (account)
      st.bind_blob(3, account->bytes);
    else
      st.bind_null(3);
    st.bind(4, lease).bind(5, db_amount(amount)).bind(6, detail).run();
  }

  // --- accounts --------------------------------------------------------------------------------

  std::optional<AccountRow> load_account(const AccountId& key) {
    auto& st = db.cached(std::string(kAccountSelect) + "WHERE key = ?");
    st.bind_blob(1, key.bytes);
    if (!st.step()) return std::nullopt;
    return read_account_row(st);
  }

  Account account_or_zero(const AccountId& key) {
    auto row = load_account(key);
    if (row) return row->account;
    Account a;
    a.id = key;
    return a;
  }

  void ensure_account(const AccountId& key, TimeMs now) {
    db.cached("INSERT OR IGNORE INTO accounts(key, created_ms) VALUES (?, ?)")
        .bind_blob(1, key.bytes)
        .bind(2, now)
        .run();
  }

  void store_money(const Account& a) {
    db.cached("UPDATE accounts SET balance = ?, escrowed = ?, earned = ?, spent = ? WHERE key = ?")
        .bind(1, db_amount(a.balance))
        .bind(2, db_amount(a.escrowed))
        .bind(3, db_amount(a.earned))
        .bind(4, db_amount(a.spent))
        .bind_blob(5, a.id.bytes)
        .run();
    if (db.changes() != 1) throw InternalError(fmt::format("account {} vanished mid-request", who(a.id)));
  }

  // --- lookups ---------------------------------------------------------------------------------

  OfferRow offer_row(Id id, TimeMs now) {
    auto& st = db.cached(std::string(kOfferSelect) + "WHERE o.id = ?");
    st.bind(1, id);
    if (!st.step()) refuse("unknown_offer", fmt::format("offer {} does not exist", id));
    return read_offer(st, now, options.heartbeat_gap);
  }

  Order order_row(Id id) {
    auto& st = db.cached(std::string(kOrderSelect) + "WHERE id = ?");
    st.bind(1, id);
    if (!st.step()) refuse("unknown_order", fmt::format("order {} does not exist", id));
    return read_order(st);
  }

  Bid bid_row(Id id) {
    auto& st = db.cached(std::string(kBidSelect) + "WHERE id = ?");
    st.bind(1, id);
    if (!st.step()) refuse("unknown_bid", fmt::format("bid {} does not exist", id));
    return read_bid(st);
  }

  Lease lease_row(Id id) {
    auto& st = db.cached(std::string(kLeaseSelect) + "WHERE l.id = ?");
    st.bind(1, id);
    if (!st.step()) refuse("unknown_lease", fmt::format("lease {} does not exist", id));
    return read_lease(st);
  }

  ProviderStats stats_of(const AccountId& provider) {
    auto& st = db.cached(
        "SELECT first_seen_ms, last_heartbeat_ms, covered_ms, completed_steps, leases_clean, leases_abandoned "
        "FROM provider_stats WHERE provider = ?");
    st.bind_blob(1, provider.bytes);
    if (!st.step()) return {};
    return read_stats(st, 0);
  }

  void ensure_stats(const AccountId& provider) {
    db.cached("INSERT OR IGNORE INTO provider_stats(provider) VALUES (?)").bind_blob(1, provider.bytes).run();
  }

  void withdraw_open_bids(std::string_view column, Id id) {
    db.cached(fmt::format("UPDATE bids SET state = {} WHERE {} = ? AND state = {}",
                          static_cast<int>(BidState::Withdrawn), column, static_cast<int>(BidState::Open)))
        .bind(1, id)
        .run();
  }

  // --- requests --------------------------------------------------------------------------------

  ReplyBody mint(const AccountId& sender, const protocol::Mint& m, TimeMs now) {
    if (m.amount == 0) refuse("invalid_field", "mint amount is 0");
    check_amount(m.amount, "mint amount");
    bool by_operator = options.operator_key && sender == *options.operator_key;
    auto target = load_account(m.to);
    Amount minted_before = target ? target->minted : 0;
    if (!by_operator) {
      if (m.to != sender)
        throw AuthError(fmt::format("account {} may not mint to {}: only the market operator mints to others",
                                    who(sender), who(m.to)));
      if (options.faucet_limit == 0 || m.amount > options.faucet_limit ||
          minted_before > options.faucet_limit - m.amount)
        throw AuthError(fmt::format("account {} asked the faucet for {} with {} minted already: the faucet limit is {}",
                                    who(sender), m.amount, minted_before, options.faucet_limit));
    }
    auto& total = db.cached("SELECT ifnull(sum(minted), 0) FROM accounts");
    total.step();
    checked_add(static_cast<Amount>(total.int64(0)), m.amount, "total minted");
    ensure_account(m.to, now);
    Account a = account_or_zero(m.to);
    a.balance = checked_add(a.balance, m.amount, "balance");
    store_money(a);
    db.cached("UPDATE accounts SET minted = ? WHERE key = ?")
        .bind(1, db_amount(checked_add(minted_before, m.amount, "minted")))
        .bind_blob(2, m.to.bytes)
        .run();
    event(now, "mint", &m.to, 0, m.amount, by_operator ? "operator" : "faucet");
    return a;
  }

  ReplyBody offer(const AccountId& sender, const OfferSpec& s, TimeMs now) {
    check_text(s.gpu.model, "offer.gpu.model", true);
    check_text(s.gpu.cuda_capability, "offer.gpu.cuda_capability", false);
    check_text(s.region, "offer.region", false);
    check_text(s.endpoint, "offer.endpoint", true);
    check_text(s.hardware.text, "offer.hardware.text", false);
    if (s.gpu.count == 0) refuse("invalid_field", "offer.gpu.count is 0");
    if (s.gpu.vram_gib == 0) refuse("invalid_field", "offer.gpu.vram_gib is 0");
    if (s.price_per_step == 0) refuse("invalid_field", "offer.price_per_step is 0 (vouchers need a positive price)");
    check_amount(s.price_per_step, "offer.price_per_step");
    check_amount(s.price_per_hour_idle, "offer.price_per_hour_idle");
    s.hardware.verify(sender);
    db.cached(
          "INSERT INTO offers(provider, gpu_model, gpu_count, vram_gib, cuda_capability, price_per_step, "
          "price_per_hour_idle, region, endpoint, latency_hint_ms, hardware_text, hardware_signature, active, "
          "created_ms, provider_heartbeat_ms) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,1,?,?)")
        .bind_blob(1, sender.bytes)
        .bind(2, s.gpu.model)
        .bind(3, s.gpu.count)
        .bind(4, s.gpu.vram_gib)
        .bind(5, s.gpu.cuda_capability)
        .bind(6, db_amount(s.price_per_step))
        .bind(7, db_amount(s.price_per_hour_idle))
        .bind(8, s.region)
        .bind(9, s.endpoint)
        .bind(10, s.latency_hint_ms)
        .bind(11, s.hardware.text)
        .bind_blob(12, s.hardware.signature)
        .bind(13, now)
        .bind(14, stats_of(sender).last_heartbeat_ms)
        .run();
    Id id = static_cast<Id>(db.last_insert_id());
    event(now, "offer", &sender, 0, s.price_per_step, fmt::format("offer {} {}x{}", id, s.gpu.count, s.gpu.model));
    return id;
  }

  ReplyBody withdraw_offer(const AccountId& sender, const protocol::WithdrawOffer& w, TimeMs now) {
    Offer o = offer_row(w.offer_id, now).offer;
    if (o.provider != sender)
      refuse("not_owner", fmt::format("offer {} belongs to {}, not {}", o.id, who(o.provider), who(sender)));
    if (!o.active) refuse("offer_inactive", fmt::format("offer {} is already withdrawn", o.id));
    db.cached("UPDATE offers SET active = 0 WHERE id = ?").bind(1, o.id).run();
    withdraw_open_bids("offer_id", o.id);
    event(now, "withdraw_offer", &sender, 0, 0, fmt::format("offer {}", o.id));
    return std::monostate{};
  }

  ReplyBody bid(const AccountId& sender, const protocol::PlaceBid& b, TimeMs now) {
    Order order = order_row(b.order_id);
    if (order.state != OrderState::Open)
      refuse("order_closed", fmt::format("order {} is {}", order.id, order_state_name(order.state)));
    OfferRow offer = offer_row(b.offer_id, now);
    if (offer.offer.provider != sender)
      refuse("not_owner",
             fmt::format("offer {} belongs to {}, not {}", offer.offer.id, who(offer.offer.provider), who(sender)));
    if (!offer.offer.active) refuse("offer_inactive", fmt::format("offer {} is withdrawn", offer.offer.id));
    if (offer.busy_lease != 0)
      refuse("offer_busy", fmt::format("offer {} is leased (lease {})", offer.offer.id, offer.busy_lease));
    if (b.price_per_step == 0) refuse("invalid_field", "bid price_per_step is 0");
    if (b.price_per_step > order.spec.max_price_per_step)
      refuse("price_above_max", fmt::format("bid price {} is above order {}'s max price per step {}", b.price_per_step,
                                            order.id, order.spec.max_price_per_step));
    // The bid itself shows the provider is alive, so alive_only is not checked here.
    if (auto why = filter_mismatch(offer.offer, order.spec.filter, false, now, options.alive_window); !why.empty())
      refuse("filter_mismatch",
             fmt::format("offer {} does not satisfy order {}'s filter: {}", offer.offer.id, order.id, why));
    auto& dup = db.cached("SELECT id FROM bids WHERE order_id = ? AND offer_id = ? AND state = ?");
    dup.bind(1, order.id).bind(2, offer.offer.id).bind(3, static_cast<int>(BidState::Open));
    if (dup.step())
      refuse("duplicate_bid",
             fmt::format("offer {} already has open bid {} on order {}", offer.offer.id, dup.int64(0), order.id));
    db.cached("INSERT INTO bids(order_id, offer_id, provider, price_per_step, state, created_ms) VALUES (?,?,?,?,?,?)")
        .bind(1, order.id)
        .bind(2, offer.offer.id)
        .bind_blob(3, sender.bytes)
        .bind(4, db_amount(b.price_per_step))
        .bind(5, static_cast<int>(BidState::Open))
        .bind(6, now)
        .run();
    Id id = static_cast<Id>(db.last_insert_id());
    event(now, "bid", &sender, 0, b.price_per_step,
          fmt::format("bid {} order {} offer {}", id, order.id, offer.offer.id));
    return id;
  }

  ReplyBody order(const AccountId& sender, const OrderSpec& s, TimeMs now) {
    validate_filter(s.filter, "order.filter");
    if (s.count == 0 || s.count > kMaxOrderCount)
      refuse("invalid_field", fmt::format("order.count {} is outside 1..{}", s.count, kMaxOrderCount));
    if (s.max_price_per_step == 0) refuse("invalid_field", "order.max_price_per_step is 0");
    check_amount(s.max_price_per_step, "order.max_price_per_step");
    if (s.escrow_per_lease == 0) refuse("invalid_field", "order.escrow_per_lease is 0");
    check_amount(s.escrow_per_lease, "order.escrow_per_lease");
    if (s.lease_duration_s == 0 || s.lease_duration_s > kMaxLeaseDurationS)
      refuse("invalid_field",
             fmt::format("order.lease_duration_s {} is outside 1..{}", s.lease_duration_s, kMaxLeaseDurationS));
    Amount needed = checked_mul(s.escrow_per_lease, s.count, "order escrow (escrow_per_lease x count)");
    Account renter = account_or_zero(sender);
    if (renter.balance < needed)
      refuse("insufficient_funds", fmt::format("account {} has {} but the order needs {} ({} leases x {} escrow)",
                                               who(sender), renter.balance, needed, s.count, s.escrow_per_lease));
    const auto& f = s.filter;
    db.cached(
          "INSERT INTO orders(renter, f_gpu_model, f_min_vram_gib, f_min_gpu_count, f_max_price_per_step, f_region, "
          "f_min_reputation, f_alive_only, count, max_price_per_step, escrow_per_lease, lease_duration_s, state, "
          "created_ms) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)")
        .bind_blob(1, sender.bytes)
        .bind(2, f.gpu_model)
        .bind(3, f.min_vram_gib)
        .bind(4, f.min_gpu_count)
        .bind(5, db_amount(f.max_price_per_step))
        .bind(6, f.region)
        .bind(7, f.min_reputation)
        .bind(8, f.alive_only ? 1 : 0)
        .bind(9, s.count)
        .bind(10, db_amount(s.max_price_per_step))
        .bind(11, db_amount(s.escrow_per_lease))
        .bind(12, s.lease_duration_s)
        .bind(13, static_cast<int>(OrderState::Open))
        .bind(14, now)
        .run();
    Id id = static_cast<Id>(db.last_insert_id());
    event(now, "order", &sender, 0, needed,
          fmt::format("order {} count {} max price {}", id, s.count, s.max_price_per_step));
    return id;
  }

  ReplyBody cancel_order(const AccountId& sender, const protocol::CancelOrder& c, TimeMs now) {
    Order o = order_row(c.order_id);
    if (o.renter != sender)
      refuse("not_owner", fmt::format("order {} belongs to {}, not {}", o.id, who(o.renter), who(sender)));
    if (o.state != OrderState::Open)
      refuse("order_closed", fmt::format("order {} is {}", o.id, order_state_name(o.state)));
    db.cached("UPDATE orders SET state = ? WHERE id = ?")
        .bind(1, static_cast<int>(OrderState::Cancelled))
        .bind(2, o.id)
        .run();
    withdraw_open_bids("order_id", o.id);
    event(now, "cancel_order", &sender, 0, 0, fmt::format("order {}", o.id));
    return std::monostate{};
  }

  ReplyBody accept(const AccountId& sender, const protocol::Accept& a, TimeMs now) {
    Bid b = bid_row(a.bid_id);
    Order order = order_row(b.order_id);
    if (order.renter != sender)
      refuse("not_owner",
             fmt::format("bid {} is on order {} of {}, not {}", b.id, order.id, who(order.renter), who(sender)));
    if (b.state != BidState::Open) refuse("bid_closed", fmt::format("bid {} is {}", b.id, bid_state_name(b.state)));
    if (order.state != OrderState::Open)
      refuse("order_closed", fmt::format("order {} is {}", order.id, order_state_name(order.state)));
    OfferRow offer = offer_row(b.offer_id, now);
    if (!offer.offer.active) refuse("offer_inactive", fmt::format("offer {} is withdrawn", offer.offer.id));
    if (offer.busy_lease != 0)
      refuse("offer_busy", fmt::format("offer {} is leased (lease {})", offer.offer.id, offer.busy_lease));
    Amount escrow = order.spec.escrow_per_lease;
    Account renter = account_or_zero(sender);
    if (renter.balance < escrow)
      refuse("insufficient_funds",
             fmt::format("account {} has {} but the lease's escrow is {}", who(sender), renter.balance, escrow));
    renter.balance -= escrow;
    renter.escrowed = checked_add(renter.escrowed, escrow, "escrowed");
    store_money(renter);
    TimeMs expires = now + static_cast<TimeMs>(order.spec.lease_duration_s) * 1000;  // duration <= 10 years
    db.cached(
          "INSERT INTO leases(order_id, offer_id, bid_id, renter, provider, endpoint, price_per_step, escrow, state, "
          "close_reason, started_ms, expires_ms) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)")
        .bind(1, order.id)
        .bind(2, offer.offer.id)
        .bind(3, b.id)
        .bind_blob(4, sender.bytes)
        .bind_blob(5, b.provider.bytes)
        .bind(6, offer.offer.spec.endpoint)
        .bind(7, db_amount(b.price_per_step))
        .bind(8, db_amount(escrow))
        .bind(9, static_cast<int>(LeaseState::Open))
        .bind(10, static_cast<int>(CloseReason::None))
        .bind(11, now)
        .bind(12, expires)
        .run();
    Id lease_id = static_cast<Id>(db.last_insert_id());
    db.cached("UPDATE offers SET busy_lease = ? WHERE id = ?").bind(1, lease_id).bind(2, offer.offer.id).run();
    db.cached("UPDATE bids SET state = ? WHERE id = ?")
        .bind(1, static_cast<int>(BidState::Accepted))
        .bind(2, b.id)
        .run();
    withdraw_open_bids("offer_id", offer.offer.id);
    uint32_t leased = order.leased + 1;
    OrderState state = leased >= order.spec.count ? OrderState::Filled : OrderState::Open;
    db.cached("UPDATE orders SET leased = ?, state = ? WHERE id = ?")
        .bind(1, leased)
        .bind(2, static_cast<int>(state))
        .bind(3, order.id)
        .run();
    if (state == OrderState::Filled) withdraw_open_bids("order_id", order.id);
    event(now, "accept", &sender, lease_id, escrow,
          fmt::format("bid {} offer {} provider {} price {}", b.id, offer.offer.id, who(b.provider), b.price_per_step));
    return lease_row(lease_id);
  }

  // Checks `v` against the open lease and pays what it adds; returns the increment. With
  // `allow_settled`, a genuine voucher at or below what is already paid pays nothing instead of
  // being refused (a close may carry a voucher the provider already redeemed).
  Amount settle(Lease& lease, const Voucher& v, TimeMs now, bool allow_settled) {
    if (lease.state != LeaseState::Open)
      refuse("lease_closed", fmt::format("lease {} is closed ({})", lease.id, close_reason_name(lease.close_reason)));
    if (v.lease_id != lease.id)
      refuse("invalid_field", fmt::format("the voucher is for lease {}, not lease {}", v.lease_id, lease.id));
    v.verify(lease.renter);
    if (v.step == 0) refuse("invalid_field", fmt::format("lease {}: voucher step 0 (steps count from 1)", lease.id));
    Amount expected = checked_mul(v.step, lease.price_per_step, "voucher step x price");
    if (v.cumulative_amount != expected)
      refuse("wrong_increment",
             fmt::format("lease {}: voucher for step {} says {}, but {} steps at {} are {}", lease.id, v.step,
                         v.cumulative_amount, v.step, lease.price_per_step, expected));
    if (v.step <= lease.paid_step) {
      if (allow_settled) return 0;
      refuse("stale_voucher", fmt::format("lease {}: voucher step {} is not above the redeemed step {}", lease.id,
                                          v.step, lease.paid_step));
    }
    if (v.cumulative_amount > lease.escrow)
      refuse("over_escrow", fmt::format("lease {}: voucher amount {} is above the escrow {}", lease.id,
                                        v.cumulative_amount, lease.escrow));
    Amount increment = v.cumulative_amount - lease.paid;
    uint64_t steps = v.step - lease.paid_step;
    Account provider = account_or_zero(lease.provider);
    provider.balance = checked_add(provider.balance, increment, "provider balance");
    provider.earned = checked_add(provider.earned, increment, "provider earned");
    Account renter = account_or_zero(lease.renter);
    renter.escrowed = checked_sub(renter.escrowed, increment, "renter escrowed");
    renter.spent = checked_add(renter.spent, increment, "renter spent");
    if (provider.id == renter.id) {  // leasing from yourself moves nothing but the totals
      provider.escrowed = renter.escrowed;
      provider.spent = renter.spent;
    }
    store_money(provider);
    if (provider.id != renter.id) store_money(renter);
    lease.paid = v.cumulative_amount;
    lease.paid_step = v.step;
    db.cached("UPDATE leases SET paid = ?, paid_step = ? WHERE id = ?")
        .bind(1, db_amount(lease.paid))
        .bind(2, lease.paid_step)
        .bind(3, lease.id)
        .run();
    db.cached(
          "INSERT INTO redeemed_vouchers(lease_id, step, cumulative_amount, nonce, signature, redeemed_ms) "
          "VALUES (?,?,?,?,?,?) ON CONFLICT(lease_id) DO UPDATE SET step = excluded.step, "
          "cumulative_amount = excluded.cumulative_amount, nonce = excluded.nonce, signature = excluded.signature, "
          "redeemed_ms = excluded.redeemed_ms")
        .bind(1, lease.id)
        .bind(2, v.step)
        .bind(3, db_amount(v.cumulative_amount))
        .bind(4, v.nonce)
        .bind_blob(5, v.signature)
        .bind(6, now)
        .run();
    ensure_stats(lease.provider);
    db.cached("UPDATE provider_stats SET completed_steps = completed_steps + ? WHERE provider = ?")
        .bind(1, steps)
        .bind_blob(2, lease.provider.bytes)
        .run();
    event(now, "redeem", &lease.provider, lease.id, increment,
          fmt::format("step {} cumulative {}", v.step, v.cumulative_amount));
    return increment;
  }

  ReplyBody redeem(const AccountId& sender, const protocol::Redeem& r, TimeMs now) {
    Lease lease = lease_row(r.voucher.lease_id);
    if (lease.provider != sender)
      refuse("not_owner",
             fmt::format("lease {} is provided by {}, not {}", lease.id, who(lease.provider), who(sender)));
    RedeemResult result;
    result.paid_now = settle(lease, r.voucher, now, false);
    result.lease = lease_row(lease.id);
    return result;
  }

  // Ends an open lease: unspent escrow back to the renter, the offer free again, reputation.
  void finish_lease(Lease& lease, CloseReason reason, TimeMs now, const AccountId* closer) {
    Amount refund = checked_sub(lease.escrow, lease.paid, "lease unspent escrow");
    Account renter = account_or_zero(lease.renter);
    renter.escrowed = checked_sub(renter.escrowed, refund, "renter escrowed");
    renter.balance = checked_add(renter.balance, refund, "renter balance");
    store_money(renter);
    db.cached("UPDATE leases SET state = ?, close_reason = ?, closed_ms = ? WHERE id = ?")
        .bind(1, static_cast<int>(LeaseState::Closed))
        .bind(2, static_cast<int>(reason))
        .bind(3, now)
        .bind(4, lease.id)
        .run();
    db.cached("UPDATE offers SET busy_lease = 0 WHERE id = ? AND busy_lease = ?")
        .bind(1, lease.offer_id)
        .bind(2, lease.id)
        .run();
    ensure_stats(lease.provider);
    const char* column = reason == CloseReason::ProviderFailed ? "leases_abandoned" : "leases_clean";
    db.cached(fmt::format("UPDATE provider_stats SET {0} = {0} + 1 WHERE provider = ?", column))
        .bind_blob(1, lease.provider.bytes)
        .run();
    event(now, reason == CloseReason::Expired ? "expire" : "close", closer ? closer : &lease.renter, lease.id, refund,
          fmt::format("{} paid {} of {} through step {}", close_reason_name(reason), lease.paid, lease.escrow,
                      lease.paid_step));
  }

  ReplyBody close(const AccountId& sender, const protocol::Close& c, TimeMs now) {
    Lease lease = lease_row(c.lease_id);
    bool is_renter = sender == lease.renter;
    bool is_provider = sender == lease.provider;
    if (!is_renter && !is_provider)
      refuse("not_owner", fmt::format("lease {} is between {} and {}; {} may not close it", lease.id, who(lease.renter),
                                      who(lease.provider), who(sender)));
    if (lease.state != LeaseState::Open)
      refuse("lease_closed",
             fmt::format("lease {} is already closed ({})", lease.id, close_reason_name(lease.close_reason)));
    bool allowed = (is_renter && (c.reason == CloseReason::RenterDone || c.reason == CloseReason::ProviderFailed)) ||
                   (is_provider && c.reason == CloseReason::ProviderDone);
    if (!allowed)
      refuse("invalid_close_reason",
             fmt::format("the {} of lease {} may not close it as {}", is_renter ? "renter" : "provider", lease.id,
                         close_reason_name(c.reason)));
    if (c.voucher) settle(lease, *c.voucher, now, true);
    finish_lease(lease, c.reason, now, &sender);
    return lease_row(lease.id);
  }

  ReplyBody heartbeat(const AccountId& sender, TimeMs now) {
    ensure_stats(sender);
    ProviderStats s = stats_of(sender);
    if (s.first_seen_ms == 0) {
      s.first_seen_ms = now;
    } else if (now > s.last_heartbeat_ms) {
      int64_t gap = now - s.last_heartbeat_ms;
      if (gap <= options.heartbeat_gap.count()) s.covered_ms += gap;
    }
    s.last_heartbeat_ms = std::max(now, s.last_heartbeat_ms);
    db.cached("UPDATE provider_stats SET first_seen_ms = ?, last_heartbeat_ms = ?, covered_ms = ? WHERE provider = ?")
        .bind(1, s.first_seen_ms)
        .bind(2, s.last_heartbeat_ms)
        .bind(3, s.covered_ms)
        .bind_blob(4, sender.bytes)
        .run();
    db.cached("UPDATE offers SET provider_heartbeat_ms = ? WHERE provider = ? AND active = 1")
        .bind(1, s.last_heartbeat_ms)
        .bind_blob(2, sender.bytes)
        .run();
    return std::monostate{};
  }

  // --- queries ---------------------------------------------------------------------------------

  ReplyBody discover(const OfferFilter& f, TimeMs now) {
    validate_filter(f, "filter");
    check_limit(f.limit);
    if (f.sort != OfferSort::Price && f.sort != OfferSort::Reputation && f.sort != OfferSort::Latency)
      refuse("invalid_field", fmt::format("filter.sort {} is not a known sort", static_cast<int>(f.sort)));
    // ?1 now, ?2 heartbeat gap (for the score), then the filter values in order.
    std::string where = "WHERE o.active = 1 AND o.busy_lease = 0";
    int next = 3;
    struct Param {
      int index;
      std::variant<int64_t, double, std::string> value;
    };
    std::vector<Param> params;
    auto add = [&](std::string condition, std::variant<int64_t, double, std::string> value) {
      where += fmt::format(" AND {} ?{}", condition, next);
      params.push_back({next++, std::move(value)});
    };
    if (!f.gpu_model.empty()) add("o.gpu_model =", f.gpu_model);
    if (f.min_vram_gib) add("o.vram_gib >=", int64_t{f.min_vram_gib});
    if (f.min_gpu_count) add("o.gpu_count >=", int64_t{f.min_gpu_count});
    if (f.max_price_per_step) add("o.price_per_step <=", db_amount(f.max_price_per_step));
    if (!f.region.empty()) add("o.region =", f.region);
    if (f.alive_only) add("o.provider_heartbeat_ms >=", int64_t{alive_since(now)});
    // The score depends on the provider only: computed once per provider, not once per offer.
    bool scored = f.sort == OfferSort::Reputation || f.min_reputation > 0;
    std::string with, join;
    if (scored) {
      with = fmt::format("WITH scores AS MATERIALIZED (SELECT s.provider, {} AS score FROM provider_stats s) ",
                         kScoreExpr);
      join = "LEFT JOIN scores sc ON sc.provider = o.provider ";
    }
    if (f.min_reputation > 0) add("ifnull(sc.score, 0) >=", f.min_reputation);
    const char* sort_key = f.sort == OfferSort::Price     ? "o.price_per_step"
                           : f.sort == OfferSort::Latency ? "o.latency_hint_ms"
                                                          : "ifnull(sc.score, 0)";
    const char* direction = f.sort == OfferSort::Reputation ? "DESC" : "ASC";
    auto bind_all = [&](sqlite::Statement& st) {
      // ?1 and ?2 feed the score; a statement without a score or filter has no parameters.
      if (st.parameter_count() >= 2) st.bind(1, now).bind(2, static_cast<int64_t>(options.heartbeat_gap.count()));
      for (const auto& p : params)
        std::visit(
            [&](const auto& v) {
              if constexpr (std::is_same_v<std::decay_t<decltype(v)>, std::string>)
                st.bind(p.index, std::string_view(v));
              else
                st.bind(p.index, v);
            },
            p.value);
    };
    OfferPage page;
    auto& count = db.cached(fmt::format("{}SELECT count(*) FROM offers o {}{}", with, join, where));
    bind_all(count);
    count.step();
    page.total = static_cast<uint64_t>(count.int64(0));
    if (f.page_token >= page.total) return page;
    // Sort narrow (key, id) rows, then read the page's offers: sorting whole offer rows (reports
    // and all) costs far more than the few rows a page returns.
    auto& st = db.cached(fmt::format(
        "{}{} JOIN (SELECT o.id AS page_id, {} AS page_key FROM offers o {}{} ORDER BY page_key {}, o.id LIMIT ?{} "
        "OFFSET ?{}) p ON p.page_id = o.id ORDER BY p.page_key {}, o.id",
        with, kOfferSelect, sort_key, join, where, direction, next, next + 1, direction));
    bind_all(st);
    st.bind(next, f.limit).bind(next + 1, static_cast<int64_t>(f.page_token));
    while (st.step()) page.offers.push_back(read_offer(st, now, options.heartbeat_gap).offer);
    uint64_t seen = f.page_token + page.offers.size();
    page.next_page_token = seen < page.total ? seen : 0;
    return page;
  }

  ReplyBody orders(const OrderQuery& q, TimeMs now) {
    check_limit(q.limit);
    std::optional<Offer> offer;
    if (q.matching_offer) offer = offer_row(*q.matching_offer, now).offer;
    std::string where = "WHERE 1";
    if (q.renter) where += " AND renter = ?1";
    if (q.open_only) where += fmt::format(" AND state = {}", static_cast<int>(OrderState::Open));
    auto& st = db.cached(fmt::format("{}{} ORDER BY id DESC", kOrderSelect, where));
    if (q.renter) st.bind_blob(1, q.renter->bytes);
    std::vector<Order> out;
    while (out.size() < q.limit && st.step()) {
      Order o = read_order(st);
      if (offer && !filter_mismatch(*offer, o.spec.filter, false, now, options.alive_window).empty()) continue;
      out.push_back(std::move(o));
    }
    return out;
  }

  ReplyBody bids(const protocol::BidsQuery& q) {
    Order o = order_row(q.order_id);
    auto& st = db.cached(std::string(kBidSelect) + "WHERE order_id = ? ORDER BY id LIMIT ?");
    st.bind(1, o.id).bind(2, protocol::kMaxPageSize);
    std::vector<Bid> out;
    while (st.step()) out.push_back(read_bid(st));
    return out;
  }

  ReplyBody leases(const LeaseQuery& q) {
    check_limit(q.limit);
    std::string where = "WHERE 1";
    if (q.renter) where += " AND l.renter = ?1";
    if (q.provider) where += " AND l.provider = ?2";
    if (q.open_only) where += fmt::format(" AND l.state = {}", static_cast<int>(LeaseState::Open));
    auto& st = db.cached(fmt::format("{}{} ORDER BY l.id DESC LIMIT ?3", kLeaseSelect, where));
    if (q.renter) st.bind_blob(1, q.renter->bytes);
    if (q.provider) st.bind_blob(2, q.provider->bytes);
    st.bind(3, q.limit);
    std::vector<Lease> out;
    while (st.step()) out.push_back(read_lease(st));
    return out;
  }

  // --- dispatch --------------------------------------------------------------------------------

  ReplyBody apply(const Request& r, TimeMs now) {
    const AccountId& sender = r.account;
    return std::visit(Overloaded{
                          [&](const protocol::Mint& m) -> ReplyBody { return mint(sender, m, now); },
                          [&](const protocol::AccountQuery& q) -> ReplyBody { return account_or_zero(q.who); },
                          [&](const OfferSpec& s) -> ReplyBody { return offer(sender, s, now); },
                          [&](const protocol::WithdrawOffer& w) -> ReplyBody { return withdraw_offer(sender, w, now); },
                          [&](const protocol::PlaceBid& b) -> ReplyBody { return bid(sender, b, now); },
                          [&](const protocol::Heartbeat&) -> ReplyBody { return heartbeat(sender, now); },
                          [&](const protocol::Redeem& rd) -> ReplyBody { return redeem(sender, rd, now); },
                          [&](const protocol::Discover& d) -> ReplyBody { return discover(d.filter, now); },
                          [&](const protocol::PlaceOrder& o) -> ReplyBody { return order(sender, o.spec, now); },
                          [&](const protocol::CancelOrder& c) -> ReplyBody { return cancel_order(sender, c, now); },
                          [&](const protocol::BidsQuery& q) -> ReplyBody { return bids(q); },
                          [&](const protocol::Accept& a) -> ReplyBody { return accept(sender, a, now); },
                          [&](const protocol::Close& c) -> ReplyBody { return close(sender, c, now); },
                          [&](const OrderQuery& q) -> ReplyBody { return orders(q, now); },
                          [&](const LeaseQuery& q) -> ReplyBody { return leases(q); },
                          [&](const protocol::LeaseLookup& l) -> ReplyBody { return lease_row(l.lease_id); },
                          [&](const protocol::ReputationQuery& q) -> ReplyBody {
                            return reputation_from_stats(stats_of(q.provider), now, options.heartbeat_gap);
                          },
                      },
                      r.body);
  }

  size_t expire_leases(TimeMs now) {
    std::vector<Lease> due;
    {
      auto& st = db.cached(std::string(kLeaseSelect) + "WHERE l.state = ? AND l.expires_ms <= ? ORDER BY l.id");
      st.bind(1, static_cast<int>(LeaseState::Open)).bind(2, now);
      while (st.step()) due.push_back(read_lease(st));
    }
    for (auto& lease : due) finish_lease(lease, CloseReason::Expired, now, nullptr);
    return due.size();
  }

  // Requests that the market refuses (their reply is stored like any other); every other
  // exception is the database failing.
  static bool is_refusal(const std::exception& e) {
    return dynamic_cast<const MarketError*>(&e) || dynamic_cast<const AuthError*>(&e);
  }

  void store_reply(const AccountId& account, uint64_t nonce, const crypto::Digest& digest, const Reply& reply) {
    auto bytes = protocol::encode(reply);
    db.cached("UPDATE accounts SET last_nonce = ?, last_request_hash = ?, last_reply = ? WHERE key = ?")
        .bind(1, nonce)
        .bind_blob(2, digest)
        .bind_blob(3, bytes)
        .bind_blob(4, account.bytes)
        .run();
  }
};

Ledger::Ledger(const std::filesystem::path& db_path, LedgerOptions options)
    : impl_(std::make_unique<Impl>(db_path, std::move(options))) {}
Ledger::~Ledger() = default;

const std::filesystem::path& Ledger::path() const { return impl_->db.path(); }
const LedgerOptions& Ledger::options() const { return impl_->options; }

Reply Ledger::execute(const Request& request, TimeMs now) {
  auto& impl = *impl_;
  sqlite::Transaction tx(impl.db);
  impl.expire_leases(now);
  Reply reply;
  if (!protocol::changes_state(request.body)) {
    try {
      reply.body = impl.apply(request, now);
    } catch (const std::exception& e) {
      if (!Impl::is_refusal(e)) throw;
      reply = protocol::error_reply(e);
    }
    tx.commit();
    return reply;
  }

  crypto::Digest digest = request_digest(request);
  auto row = impl.load_account(request.account);
  uint64_t last_nonce = row ? row->last_nonce : 0;
  if (request.nonce <= last_nonce) {
    bool same_request =
        row && request.nonce == last_nonce && !row->last_reply.empty() &&
        std::equal(digest.begin(), digest.end(), row->last_request_hash.begin(), row->last_request_hash.end());
    tx.commit();  // the expiry sweep
    if (same_request) return protocol::decode_reply(row->last_reply, "the ledger's stored reply");
    return protocol::error_reply(AuthError(
        fmt::format("replayed nonce: {} request from {} carries nonce {}, not above the account's last nonce {}",
                    protocol::request_name(request.body), who(request.account), request.nonce, last_nonce)));
  }

  impl.ensure_account(request.account, now);
  {
    sqlite::Savepoint body(impl.db, "request_body");
    try {
      reply.body = impl.apply(request, now);
      body.release();
    } catch (const std::exception& e) {
      if (!Impl::is_refusal(e)) throw;
      body.rollback();
      reply = protocol::error_reply(e);
    }
  }
  impl.store_reply(request.account, request.nonce, digest, reply);
  tx.commit();
  return reply;
}

size_t Ledger::sweep(TimeMs now) {
  sqlite::Transaction tx(impl_->db);
  size_t n = impl_->expire_leases(now);
  tx.commit();
  if (Clock::now() - impl_->last_statistics > std::chrono::minutes(1)) impl_->refresh_statistics();
  return n;
}

std::optional<AccountRow> Ledger::account_row(const AccountId& who_) { return impl_->load_account(who_); }

std::vector<AccountRow> Ledger::account_rows() {
  auto& st = impl_->db.cached(std::string(kAccountSelect) + "ORDER BY key");
  std::vector<AccountRow> out;
  while (st.step()) out.push_back(read_account_row(st));
  return out;
}

uint64_t Ledger::event_count() {
  auto& st = impl_->db.cached("SELECT count(*) FROM events");
  st.step();
  return static_cast<uint64_t>(st.int64(0));
}

AuditReport Ledger::audit() {
  auto& db = impl_->db;
  AuditReport report;
  // Sums in SQL use 64-bit integers and fail on overflow; that is itself a finding.
  auto& totals = db.cached(
      "SELECT ifnull(sum(minted),0), ifnull(sum(balance),0), ifnull(sum(escrowed),0), "
      "ifnull(sum(earned),0), ifnull(sum(spent),0) FROM accounts");
  try {
    totals.step();
    report.total_minted = static_cast<Amount>(totals.int64(0));
    report.total_balance = static_cast<Amount>(totals.int64(1));
    report.total_escrowed = static_cast<Amount>(totals.int64(2));
    report.total_earned = static_cast<Amount>(totals.int64(3));
    report.total_spent = static_cast<Amount>(totals.int64(4));
  } catch (const Error& e) {
    report.problems.push_back(fmt::format("account totals cannot be summed: {}", e.what()));
    return report;
  }
  if (report.total_balance + report.total_escrowed != report.total_minted)
    report.problems.push_back(fmt::format("balances {} + escrowed {} != minted {}", report.total_balance,
                                          report.total_escrowed, report.total_minted));
  if (report.total_earned != report.total_spent)
    report.problems.push_back(fmt::format("earned {} != spent {}", report.total_earned, report.total_spent));
  auto& leases = db.cached(
      "SELECT l.id, l.paid, l.escrow, l.paid_step, ifnull(v.cumulative_amount, 0), ifnull(v.step, 0) FROM leases l "
      "LEFT JOIN redeemed_vouchers v ON v.lease_id = l.id WHERE l.paid > l.escrow OR l.paid != "
      "ifnull(v.cumulative_amount, 0) "
      "OR l.paid_step != ifnull(v.step, 0)");
  while (leases.step())
    report.problems.push_back(fmt::format("lease {}: paid {} (step {}) vs escrow {} and redeemed voucher {} (step {})",
                                          leases.int64(0), leases.int64(1), leases.int64(3), leases.int64(2),
                                          leases.int64(4), leases.int64(5)));
  auto& escrow = db.cached(
      "SELECT a.key, a.escrowed, ifnull((SELECT sum(l.escrow - l.paid) FROM leases l WHERE l.renter = a.key AND "
      "l.state = ?), 0) AS held FROM accounts a WHERE a.escrowed != held");
  escrow.bind(1, static_cast<int>(LeaseState::Open));
  while (escrow.step())
    report.problems.push_back(fmt::format("account {}: escrowed {} but its open leases hold {}",
                                          key_from(escrow.blob(0), "accounts.key").fingerprint(), escrow.int64(1),
                                          escrow.int64(2)));
  auto& earned = db.cached(
      "SELECT a.key, a.earned, ifnull((SELECT sum(l.paid) FROM leases l WHERE l.provider = a.key), 0) AS got "
      "FROM accounts a WHERE a.earned != got");
  while (earned.step())
    report.problems.push_back(fmt::format("account {}: earned {} but its leases paid it {}",
                                          key_from(earned.blob(0), "accounts.key").fingerprint(), earned.int64(1),
                                          earned.int64(2)));
  return report;
}

}  // namespace meshtrain::market
