// The provider daemon's SQLite file: latest voucher per lease, leases seen, the published offer.
// WAL + synchronous=FULL: a committed write survives SIGKILL and power loss, which is what lets
// the daemon acknowledge a voucher only after storing it.
#include <algorithm>
#include <bit>

#include "market/provider.h"
#include "market/sqlite.h"

namespace meshtrain::market {

namespace {

int64_t to_db(uint64_t v) { return std::bit_cast<int64_t>(v); }
uint64_t from_db(int64_t v) { return std::bit_cast<uint64_t>(v); }

constexpr std::string_view kSchema = R"sql(
PRAGMA journal_mode=WAL;
PRAGMA synchronous=FULL;
CREATE TABLE IF NOT EXISTS vouchers(
  lease_id INTEGER PRIMARY KEY, step INTEGER NOT NULL, cumulative INTEGER NOT NULL,
  nonce INTEGER NOT NULL, signature BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS leases(
  lease_id INTEGER PRIMARY KEY, order_id INTEGER NOT NULL, offer_id INTEGER NOT NULL, bid_id INTEGER NOT NULL,
  renter BLOB NOT NULL, provider BLOB NOT NULL, endpoint TEXT NOT NULL, price_per_step INTEGER NOT NULL,
  escrow INTEGER NOT NULL, paid INTEGER NOT NULL, paid_step INTEGER NOT NULL, state INTEGER NOT NULL,
  close_reason INTEGER NOT NULL, started_ms INTEGER NOT NULL, expires_ms INTEGER NOT NULL,
  closed_ms INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS offer(
  singleton INTEGER PRIMARY KEY CHECK (singleton = 1), offer_id INTEGER NOT NULL, spec_digest TEXT NOT NULL);
)sql";

constexpr std::string_view kSelectLease =
    "SELECT lease_id, order_id, offer_id, bid_id, renter, provider, endpoint, price_per_step, escrow, paid, "
    "paid_step, state, close_reason, started_ms, expires_ms, closed_ms FROM leases";

template <size_t N>
std::array<uint8_t, N> fixed_blob(const sqlite::Statement& s, int column, const std::filesystem::path& path,
                                  std::string_view what) {
  std::vector<uint8_t> bytes = s.blob(column);
  if (bytes.size() != N)
    throw CorruptError(fmt::format("provider store {}: {} is {} bytes, expected {}", path.string(), what,
                                   bytes.size(), N));
  std::array<uint8_t, N> out{};
  std::copy(bytes.begin(), bytes.end(), out.begin());
  return out;
}

Lease read_lease(const sqlite::Statement& s, const std::filesystem::path& path) {
  Lease l;
  l.id = from_db(s.int64(0));
  l.order_id = from_db(s.int64(1));
  l.offer_id = from_db(s.int64(2));
  l.bid_id = from_db(s.int64(3));
  l.renter.bytes = fixed_blob<crypto::kEd25519PublicKeyBytes>(s, 4, path, "leases.renter");
  l.provider.bytes = fixed_blob<crypto::kEd25519PublicKeyBytes>(s, 5, path, "leases.provider");
  l.endpoint = s.text(6);
  l.price_per_step = from_db(s.int64(7));
  l.escrow = from_db(s.int64(8));
  l.paid = from_db(s.int64(9));
  l.paid_step = from_db(s.int64(10));
  l.state = s.int64(11) == static_cast<int64_t>(LeaseState::Closed) ? LeaseState::Closed : LeaseState::Open;
  int64_t reason = s.int64(12);
  if (reason < 0 || reason > static_cast<int64_t>(CloseReason::Expired))
    throw CorruptError(fmt::format("provider store {}: lease {} has close reason {}", path.string(), l.id, reason));
  l.close_reason = static_cast<CloseReason>(reason);
  l.started_ms = s.int64(13);
  l.expires_ms = s.int64(14);
  l.closed_ms = s.int64(15);
  return l;
}

}  // namespace

struct ProviderStore::Impl {
  explicit Impl(const std::filesystem::path& path) : db(path) {}
  sqlite::Database db;
};

ProviderStore::ProviderStore(const std::filesystem::path& path)
    : impl_(std::make_unique<Impl>(path)), path_(path) {
  impl_->db.exec(kSchema);
}

ProviderStore::~ProviderStore() = default;

std::optional<Voucher> ProviderStore::latest_voucher(Id lease_id) const {
  auto& s = impl_->db.cached("SELECT step, cumulative, nonce, signature FROM vouchers WHERE lease_id = ?");
  s.bind(1, to_db(lease_id));
  if (!s.step()) return std::nullopt;
  Voucher v;
  v.lease_id = lease_id;
  v.step = from_db(s.int64(0));
  v.cumulative_amount = from_db(s.int64(1));
  v.nonce = from_db(s.int64(2));
  v.signature = fixed_blob<crypto::kEd25519SignatureBytes>(s, 3, path_, "vouchers.signature");
  return v;
}

void ProviderStore::put_voucher(const Voucher& voucher) {
  // The WHERE clause keeps a late writer from replacing a newer voucher. Unsigned comparison
  // is not needed: steps and amounts of accepted vouchers stay below 2^63 (checked by the caller).
  auto& s = impl_->db.cached(
      "INSERT INTO vouchers(lease_id, step, cumulative, nonce, signature) VALUES(?, ?, ?, ?, ?) "
      "ON CONFLICT(lease_id) DO UPDATE SET step = excluded.step, cumulative = excluded.cumulative, "
      "nonce = excluded.nonce, signature = excluded.signature "
      "WHERE excluded.step > vouchers.step AND excluded.cumulative > vouchers.cumulative");
  s.bind(1, to_db(voucher.lease_id)).bind(2, to_db(voucher.step)).bind(3, to_db(voucher.cumulative_amount));
  s.bind(4, to_db(voucher.nonce)).bind_blob(5, voucher.signature);
  s.run();
  if (impl_->db.changes() != 1)
    throw InvalidArgumentError(fmt::format("provider store {}: voucher for lease {} step {} is not above the stored one",
                                           path_.string(), voucher.lease_id, voucher.step));
}

std::optional<Lease> ProviderStore::lease(Id lease_id) const {
  auto& s = impl_->db.cached(std::string(kSelectLease) + " WHERE lease_id = ?");
  s.bind(1, to_db(lease_id));
  if (!s.step()) return std::nullopt;
  return read_lease(s, path_);
}

std::vector<Lease> ProviderStore::leases() const {
  auto& s = impl_->db.cached(std::string(kSelectLease) + " ORDER BY lease_id");
  std::vector<Lease> out;
  while (s.step()) out.push_back(read_lease(s, path_));
  return out;
}

void ProviderStore::put_lease(const Lease& l) {
  auto& s = impl_->db.cached(
      "INSERT OR REPLACE INTO leases(lease_id, order_id, offer_id, bid_id, renter, provider, endpoint, "
      "price_per_step, escrow, paid, paid_step, state, close_reason, started_ms, expires_ms, closed_ms) "
      "VALUES(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)");
  s.bind(1, to_db(l.id)).bind(2, to_db(l.order_id)).bind(3, to_db(l.offer_id)).bind(4, to_db(l.bid_id));
  s.bind_blob(5, l.renter.bytes).bind_blob(6, l.provider.bytes).bind(7, std::string_view(l.endpoint));
  s.bind(8, to_db(l.price_per_step)).bind(9, to_db(l.escrow)).bind(10, to_db(l.paid)).bind(11, to_db(l.paid_step));
  s.bind(12, static_cast<int64_t>(l.state)).bind(13, static_cast<int64_t>(l.close_reason));
  s.bind(14, l.started_ms).bind(15, l.expires_ms).bind(16, l.closed_ms);
  s.run();
}

std::optional<StoredOffer> ProviderStore::offer() const {
  auto& s = impl_->db.cached("SELECT offer_id, spec_digest FROM offer WHERE singleton = 1");
  if (!s.step()) return std::nullopt;
  return StoredOffer{from_db(s.int64(0)), s.text(1)};
}

void ProviderStore::put_offer(const StoredOffer& offer) {
  auto& s = impl_->db.cached("INSERT OR REPLACE INTO offer(singleton, offer_id, spec_digest) VALUES(1, ?, ?)");
  s.bind(1, to_db(offer.offer_id)).bind(2, std::string_view(offer.spec_digest));
  s.run();
}

}  // namespace meshtrain::market
