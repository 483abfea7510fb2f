// The devnet ledger on real SQLite files: the whole flow with one renter and three providers,
// every refusal leaving the books untouched, idempotent retries, expiry, discovery.
#include "market/ledger.h"

#include <gtest/gtest.h>
#include <sqlite3.h>

#include <functional>
#include <map>

#include "support/temp_dir.h"

using namespace meshtrain;
using namespace meshtrain::market;
namespace proto = meshtrain::market::protocol;
using meshtrain::test_support::TempDir;

namespace {

constexpr TimeMs kStart = 1'800'000'000'000;

// One ledger file and the accounts that act on it, each with its own nonce counter.
class World {
 public:
  explicit World(LedgerOptions options = default_options()) : ledger_(dir_ / "market.db", with_operator(options)) {}

  static LedgerOptions default_options() {
    LedgerOptions o;
    o.faucet_limit = 1'000'000;
    o.alive_window = std::chrono::milliseconds(10'000);
    o.heartbeat_gap = std::chrono::milliseconds(5'000);
    return o;
  }

  Ledger& ledger() { return ledger_; }
  const crypto::Identity& op() const { return operator_; }
  const TempDir& dir() const { return dir_; }
  TimeMs now = kStart;

  proto::Request request(const crypto::Identity& who, proto::Body body) {
    proto::Request r;
    r.account = who.public_key();
    r.nonce = ++nonces_[who.public_key()];
    r.body = std::move(body);
    return r;
  }

  proto::Reply exec(const crypto::Identity& who, proto::Body body) {
    return ledger_.execute(request(who, std::move(body)), now);
  }

  template <typename T>
  T ok(const crypto::Identity& who, proto::Body body) {
    std::string name(proto::request_name(body));
    proto::Reply reply = exec(who, std::move(body));
    if (!reply.ok) throw std::runtime_error(name + " refused: " + reply.reason + ": " + reply.message);
    if (!std::holds_alternative<T>(reply.body)) throw std::runtime_error(name + ": unexpected reply body");
    return std::get<T>(reply.body);
  }

  void ok_none(const crypto::Identity& who, proto::Body body) { ok<std::monostate>(who, std::move(body)); }

  // Mints, heartbeats and offers: returns the offer id.
  Id offer(const crypto::Identity& provider, Amount price, std::string model = "L4-24GB", uint32_t vram = 24,
           std::string region = "eu-west", uint32_t latency = 10, uint32_t count = 1) {
    OfferSpec s;
    s.gpu = {model, count, vram, "8.9"};
    s.price_per_step = price;
    s.region = region;
    s.endpoint = "tcp://127.0.0.1:9";
    s.latency_hint_ms = latency;
    s.hardware = HardwareReport::sign(provider, R"({"driver":"550.54"})");
    return ok<Id>(provider, s);
  }

  void heartbeat(const crypto::Identity& who) { ok_none(who, proto::Heartbeat{}); }

  Id order(const crypto::Identity& renter, uint32_t count, Amount max_price, Amount escrow, uint64_t duration_s = 3600,
           OfferFilter filter = {}) {
    OrderSpec s;
    s.filter = filter;
    s.count = count;
    s.max_price_per_step = max_price;
    s.escrow_per_lease = escrow;
    s.lease_duration_s = duration_s;
    return ok<Id>(renter, proto::PlaceOrder{s});
  }

  // A lease of `provider`'s new offer at `price` for `renter`, escrow `escrow`.
  Lease lease(const crypto::Identity& renter, const crypto::Identity& provider, Amount price, Amount escrow,
              uint64_t duration_s = 3600) {
    heartbeat(provider);
    Id offer_id = offer(provider, price);
    Id order_id = order(renter, 1, price, escrow, duration_s);
    Id bid_id = ok<Id>(provider, proto::PlaceBid{order_id, offer_id, price});
    return ok<Lease>(renter, proto::Accept{bid_id});
  }

  void fund(const crypto::Identity& who, Amount amount) {
    ok<Account>(operator_, proto::Mint{who.public_key(), amount});
  }

  Account account(const crypto::Identity& who) { return ok<Account>(who, proto::AccountQuery{who.public_key()}); }

 private:
  LedgerOptions with_operator(LedgerOptions o) {
    o.operator_key = operator_.public_key();
    return o;
  }

  TempDir dir_;
  crypto::Identity operator_ = crypto::Identity::generate();
  Ledger ledger_;
  std::map<AccountId, uint64_t> nonces_;
};

// Every account row equal, except the bookkeeping of `requester`'s own nonce and stored reply.
void expect_books_unchanged(const std::vector<AccountRow>& before, const std::vector<AccountRow>& after,
                            const AccountId& requester) {
  ASSERT_EQ(before.size(), after.size());
  for (size_t i = 0; i < before.size(); ++i) {
    AccountRow a = before[i], b = after[i];
    if (a.account.id == requester) {
      b.last_nonce = a.last_nonce;
      b.last_request_hash = a.last_request_hash;
      b.last_reply = a.last_reply;
    }
    EXPECT_TRUE(a == b) << "account " << a.account.id.fingerprint() << " changed: balance " << a.account.balance
                        << " -> " << b.account.balance << ", escrowed " << a.account.escrowed << " -> "
                        << b.account.escrowed << ", earned " << a.account.earned << " -> " << b.account.earned;
  }
}

}  // namespace

TEST(Ledger, FullFlowOneRenterThreeProvidersReconciles) {
  World w;
  auto renter = crypto::Identity::generate();
  std::vector<crypto::Identity> providers;
  for (int i = 0; i < 3; ++i) providers.push_back(crypto::Identity::generate());
  w.fund(renter, 100'000);

  const Amount prices[3] = {7, 8, 9};
  std::vector<Id> offers;
  for (int i = 0; i < 3; ++i) {
    w.heartbeat(providers[i]);
    offers.push_back(w.offer(providers[i], prices[i], "A100-80GB", 80, "eu-west", 5 + i));
  }
  // A decoy that the renter's filter excludes.
  auto other = crypto::Identity::generate();
  w.heartbeat(other);
  w.offer(other, 1, "T4-16GB", 16, "us-east");

  OfferFilter filter;
  filter.gpu_model = "A100-80GB";
  filter.min_vram_gib = 40;
  auto page = w.ok<OfferPage>(renter, proto::Discover{filter});
  ASSERT_EQ(page.total, 3u);
  ASSERT_EQ(page.offers.size(), 3u);
  EXPECT_EQ(page.offers[0].id, offers[0]);
  EXPECT_EQ(page.offers[0].spec.price_per_step, 7u);
  EXPECT_EQ(page.offers[0].provider, providers[0].public_key());
  EXPECT_GT(page.offers[0].reputation.uptime, 0.99);

  Id order_id = w.order(renter, 3, 10, 2'000, 3600, filter);
  for (int i = 0; i < 3; ++i) {
    OrderQuery q;
    q.matching_offer = offers[i];
    auto orders = w.ok<std::vector<Order>>(providers[i], q);
    ASSERT_EQ(orders.size(), 1u);
    EXPECT_EQ(orders[0].id, order_id);
    w.ok<Id>(providers[i], proto::PlaceBid{order_id, offers[i], prices[i]});
  }
  {
    OrderQuery decoy_query;
    decoy_query.matching_offer = offers[0] + 3;  // the T4 offer: does not satisfy the filter
    EXPECT_TRUE(w.ok<std::vector<Order>>(other, decoy_query).empty());
  }
  auto bids = w.ok<std::vector<Bid>>(renter, proto::BidsQuery{order_id});
  ASSERT_EQ(bids.size(), 3u);
  std::vector<Lease> leases;
  for (const auto& b : bids) leases.push_back(w.ok<Lease>(renter, proto::Accept{b.id}));
  EXPECT_EQ(w.ok<std::vector<Order>>(renter, OrderQuery{renter.public_key(), false, std::nullopt, 10})[0].state,
            OrderState::Filled);
  EXPECT_EQ(w.account(renter).escrowed, 6'000u);
  EXPECT_EQ(w.account(renter).balance, 94'000u);
  // Leased offers are busy: discovery no longer shows them.
  EXPECT_EQ(w.ok<OfferPage>(renter, proto::Discover{filter}).total, 0u);

  // 100 paid steps per lease; provider 0 redeems every 10 steps, provider 1 at step 50 only
  // (the renter settles the rest at close), provider 2 every step.
  std::vector<Voucher> latest(3);
  for (uint64_t step = 1; step <= 100; ++step) {
    w.now += 100;
    for (int i = 0; i < 3; ++i) {
      latest[i] = Voucher::sign(renter, leases[i].id, step, step * leases[i].price_per_step, step * 1000 + i);
      bool redeem = (i == 0 && step % 10 == 0) || (i == 1 && step == 50) || i == 2;
      if (redeem) {
        auto r = w.ok<RedeemResult>(providers[i], proto::Redeem{latest[i]});
        EXPECT_EQ(r.lease.paid, step * leases[i].price_per_step);
        EXPECT_EQ(r.lease.paid_step, step);
      }
    }
    if (step % 10 == 0)
      for (const auto& p : providers) w.heartbeat(p);
  }
  auto closed0 = w.ok<Lease>(providers[0], proto::Close{leases[0].id, CloseReason::ProviderDone, std::nullopt});
  auto closed1 = w.ok<Lease>(renter, proto::Close{leases[1].id, CloseReason::RenterDone, latest[1]});
  auto closed2 = w.ok<Lease>(renter, proto::Close{leases[2].id, CloseReason::RenterDone, latest[2]});  // already paid
  EXPECT_EQ(closed0.state, LeaseState::Closed);
  EXPECT_EQ(closed0.close_reason, CloseReason::ProviderDone);
  EXPECT_EQ(closed1.paid, 800u);
  EXPECT_EQ(closed2.paid, 900u);

  Amount earned = 0;
  for (int i = 0; i < 3; ++i) {
    Account a = w.account(providers[i]);
    EXPECT_EQ(a.earned, 100 * prices[i]) << "provider " << i;
    EXPECT_EQ(a.balance, 100 * prices[i]);
    earned += a.earned;
    auto rep = w.ok<Reputation>(renter, proto::ReputationQuery{providers[i].public_key()});
    EXPECT_EQ(rep.completed_steps, 100u);
    EXPECT_EQ(rep.leases_clean, 1u);
    EXPECT_EQ(rep.leases_abandoned, 0u);
  }
  Account r = w.account(renter);
  EXPECT_EQ(r.spent, earned);
  EXPECT_EQ(r.spent, 2'400u);
  EXPECT_EQ(r.escrowed, 0u);
  EXPECT_EQ(r.balance, 100'000u - 2'400u);
  AuditReport audit = w.ledger().audit();
  EXPECT_TRUE(audit.ok()) << fmt::format("{}", fmt::join(audit.problems, "; "));
  EXPECT_EQ(audit.total_minted, 100'000u);
  EXPECT_GT(w.ledger().event_count(), 300u / 10);

  // The closed leases free their offers again.
  EXPECT_EQ(w.ok<OfferPage>(renter, proto::Discover{filter}).total, 3u);
}

TEST(Ledger, RefusalsLeaveTheBooksUnchanged) {
  World w;
  auto renter = crypto::Identity::generate();
  auto renter2 = crypto::Identity::generate();
  auto provider = crypto::Identity::generate();
  auto provider2 = crypto::Identity::generate();
  auto mallory = crypto::Identity::generate();
  w.fund(renter, 10'000);
  w.fund(renter2, 10'000);
  Lease lease = w.lease(renter, provider, 10, 1'000);
  Lease lease2 = w.lease(renter2, provider2, 10, 1'000);
  w.ok<RedeemResult>(provider, proto::Redeem{Voucher::sign(renter, lease.id, 5, 50, 1)});
  Id other_offer = w.offer(provider2, 10);
  Id renter2_order = w.order(renter2, 1, 20, 100);

  struct Case {
    std::string name;
    const crypto::Identity* who;
    proto::Body body;
    std::string reason;  // empty: an AuthError
  };
  Voucher tampered = Voucher::sign(renter, lease.id, 6, 60, 2);
  tampered.cumulative_amount = 100;
  std::vector<Case> cases = {
      {"forged voucher", &provider, proto::Redeem{Voucher::sign(mallory, lease.id, 6, 60, 2)}, ""},
      {"tampered voucher", &provider, proto::Redeem{tampered}, ""},
      {"voucher of another renter", &provider, proto::Redeem{Voucher::sign(renter2, lease.id, 6, 60, 2)}, ""},
      {"another renter's lease", &provider, proto::Redeem{Voucher::sign(renter2, lease2.id, 6, 60, 2)}, "not_owner"},
      {"replayed voucher", &provider, proto::Redeem{Voucher::sign(renter, lease.id, 5, 50, 1)}, "stale_voucher"},
      {"decreasing voucher", &provider, proto::Redeem{Voucher::sign(renter, lease.id, 3, 30, 3)}, "stale_voucher"},
      {"wrong amount", &provider, proto::Redeem{Voucher::sign(renter, lease.id, 7, 71, 4)}, "wrong_increment"},
      {"over escrow", &provider, proto::Redeem{Voucher::sign(renter, lease.id, 101, 1010, 5)}, "over_escrow"},
      {"amount overflow", &provider,
       proto::Redeem{Voucher::sign(renter, lease.id, UINT64_MAX / 4, UINT64_MAX / 4 * 10, 5)}, "amount_overflow"},
      {"foreign lease", &provider2, proto::Redeem{Voucher::sign(renter, lease.id, 6, 60, 6)}, "not_owner"},
      {"unknown lease", &provider, proto::Redeem{Voucher::sign(renter, 999, 1, 10, 6)}, "unknown_lease"},
      {"insufficient funds", &mallory, proto::PlaceOrder{OrderSpec{{}, 1, 10, 5, 60}}, "insufficient_funds"},
      {"escrow x count over funds", &renter, proto::PlaceOrder{OrderSpec{{}, 10, 10, 1'000, 60}}, "insufficient_funds"},
      {"withdraw someone else's offer", &provider, proto::WithdrawOffer{other_offer}, "not_owner"},
      {"cancel someone else's order", &renter, proto::CancelOrder{renter2_order}, "not_owner"},
      {"bid with someone else's offer", &provider, proto::PlaceBid{renter2_order, other_offer, 10}, "not_owner"},
      {"bid above the order's max", &provider2, proto::PlaceBid{renter2_order, other_offer, 21}, "price_above_max"},
      {"close someone else's lease", &mallory, proto::Close{lease.id, CloseReason::RenterDone, std::nullopt},
       "not_owner"},
      {"provider closing as failed", &provider, proto::Close{lease.id, CloseReason::ProviderFailed, std::nullopt},
       "invalid_close_reason"},
      {"mint over the faucet limit", &mallory, proto::Mint{mallory.public_key(), 2'000'000}, ""},
      {"mint to someone else", &renter, proto::Mint{renter2.public_key(), 1}, ""},
      {"offer with a forged hardware report", &mallory,
       OfferSpec{{"H100", 1, 80, "9.0"}, 10, 0, "x", "tcp://1.2.3.4:5", 1, HardwareReport::sign(provider, "{}")}, ""},
      {"offer with price 0", &provider,
       OfferSpec{{"H100", 1, 80, "9.0"}, 0, 0, "x", "tcp://1.2.3.4:5", 1, HardwareReport::sign(provider, "{}")},
       "invalid_field"},
      {"offer with an oversized report", &provider,
       OfferSpec{{"H100", 1, 80, "9.0"},
                 1,
                 0,
                 "x",
                 "tcp://1.2.3.4:5",
                 1,
                 HardwareReport::sign(provider, std::string(proto::kMaxTextBytes + 1, 'x'))},
       "invalid_field"},
  };
  for (auto& c : cases) {
    SCOPED_TRACE(c.name);
    auto before = w.ledger().account_rows();
    uint64_t events_before = w.ledger().event_count();
    proto::Reply reply = w.exec(*c.who, c.body);
    EXPECT_FALSE(reply.ok);
    if (c.reason.empty()) {
      EXPECT_EQ(reply.code, ErrorCode::Auth) << reply.message;
    } else {
      EXPECT_EQ(reply.reason, c.reason) << reply.message;
    }
    EXPECT_FALSE(reply.message.empty());
    auto after = w.ledger().account_rows();
    if (before.size() + 1 == after.size()) {  // the requester's first request made its row
      after.erase(std::find_if(after.begin(), after.end(),
                               [&](const AccountRow& r) { return r.account.id == c.who->public_key(); }));
    }
    expect_books_unchanged(before, after, c.who->public_key());
    EXPECT_EQ(w.ledger().event_count(), events_before);
  }
  EXPECT_EQ(w.ledger().account_row(provider.public_key())->account.earned, 50u);

  // A stale nonce: not even looked at.
  {
    auto before = w.ledger().account_rows();
    proto::Request r = w.request(renter, proto::Heartbeat{});
    r.nonce -= 2;
    proto::Reply reply = w.ledger().execute(r, w.now);
    EXPECT_FALSE(reply.ok);
    EXPECT_EQ(reply.code, ErrorCode::Auth);
    EXPECT_NE(reply.message.find("replayed nonce"), std::string::npos) << reply.message;
    EXPECT_EQ(before, w.ledger().account_rows());
  }

  // Closed lease: redeem refused, books unchanged.
  w.ok<Lease>(renter, proto::Close{lease.id, CloseReason::RenterDone, std::nullopt});
  auto before = w.ledger().account_rows();
  proto::Reply reply = w.exec(provider, proto::Redeem{Voucher::sign(renter, lease.id, 6, 60, 7)});
  EXPECT_EQ(reply.reason, "lease_closed");
  expect_books_unchanged(before, w.ledger().account_rows(), provider.public_key());
  // Escrow 1000 - 50 paid came back.
  EXPECT_EQ(w.account(renter).balance, 10'000u - 50u);
  EXPECT_EQ(w.account(renter).escrowed, 0u);
  auto audit = w.ledger().audit();
  EXPECT_TRUE(audit.ok()) << fmt::format("{}", fmt::join(audit.problems, "; "));
}

TEST(Ledger, RetryWithTheSameNonceAndBytesGetsTheStoredReply) {
  World w;
  auto renter = crypto::Identity::generate();
  auto provider = crypto::Identity::generate();
  w.fund(renter, 10'000);
  Lease lease = w.lease(renter, provider, 10, 1'000);

  proto::Request redeem = w.request(provider, proto::Redeem{Voucher::sign(renter, lease.id, 3, 30, 1)});
  proto::Reply first = w.ledger().execute(redeem, w.now);
  ASSERT_TRUE(first.ok) << first.message;
  auto rows = w.ledger().account_rows();
  w.now += 5'000;
  proto::Reply again = w.ledger().execute(redeem, w.now);
  ASSERT_TRUE(again.ok) << again.message;
  EXPECT_EQ(proto::encode(again), proto::encode(first));
  EXPECT_EQ(std::get<RedeemResult>(again.body).paid_now, 30u);
  EXPECT_EQ(rows, w.ledger().account_rows());  // nothing applied twice
  EXPECT_EQ(w.ledger().account_row(provider.public_key())->account.earned, 30u);

  // Same nonce, different bytes: a replay, not a retry.
  proto::Request forged = redeem;
  std::get<proto::Redeem>(forged.body).voucher = Voucher::sign(renter, lease.id, 4, 40, 2);
  proto::Reply replay = w.ledger().execute(forged, w.now);
  EXPECT_FALSE(replay.ok);
  EXPECT_EQ(replay.code, ErrorCode::Auth);
  EXPECT_EQ(rows, w.ledger().account_rows());

  // A refusal is stored too: its retry is refused the same way even after the state changed.
  proto::Request over = w.request(provider, proto::Redeem{Voucher::sign(renter, lease.id, 200, 2'000, 3)});
  proto::Reply refused = w.ledger().execute(over, w.now);
  EXPECT_EQ(refused.reason, "over_escrow");
  EXPECT_EQ(proto::encode(w.ledger().execute(over, w.now)), proto::encode(refused));

  // An older request (nonce below the last) is a replay even with its original bytes.
  proto::Reply old = w.ledger().execute(redeem, w.now);
  EXPECT_FALSE(old.ok);
  EXPECT_EQ(old.code, ErrorCode::Auth);

  // The stored reply survives reopening the database.
  std::filesystem::path path = w.ledger().path();
  {
    Ledger reopened(path, w.ledger().options());
    EXPECT_EQ(proto::encode(reopened.execute(over, w.now)), proto::encode(refused));
    EXPECT_TRUE(reopened.audit().ok());
  }
}

TEST(Ledger, ExpiredLeasesAreClosedAndRefunded) {
  World w;
  auto renter = crypto::Identity::generate();
  auto provider = crypto::Identity::generate();
  w.fund(renter, 10'000);
  Lease lease = w.lease(renter, provider, 10, 1'000, /*duration_s=*/60);
  EXPECT_EQ(lease.expires_ms, w.now + 60'000);
  w.ok<RedeemResult>(provider, proto::Redeem{Voucher::sign(renter, lease.id, 12, 120, 1)});

  EXPECT_EQ(w.ledger().sweep(w.now + 59'999), 0u);
  w.now += 60'000;
  // Any request runs the sweep first: the redeem finds the lease closed.
  proto::Reply late = w.exec(provider, proto::Redeem{Voucher::sign(renter, lease.id, 13, 130, 2)});
  EXPECT_EQ(late.reason, "lease_closed");
  Lease after = w.ok<Lease>(renter, proto::LeaseLookup{lease.id});
  EXPECT_EQ(after.state, LeaseState::Closed);
  EXPECT_EQ(after.close_reason, CloseReason::Expired);
  EXPECT_EQ(after.closed_ms, w.now);
  Account r = w.account(renter);
  EXPECT_EQ(r.balance, 10'000u - 120u);
  EXPECT_EQ(r.escrowed, 0u);
  EXPECT_EQ(w.ok<Reputation>(renter, proto::ReputationQuery{provider.public_key()}).leases_clean, 1u);

  // sweep() on its own.
  Lease second = w.lease(renter, provider, 10, 500, 1);
  EXPECT_EQ(w.ledger().sweep(w.now + 1'000), 1u);
  EXPECT_EQ(w.ok<Lease>(renter, proto::LeaseLookup{second.id}).close_reason, CloseReason::Expired);
  EXPECT_TRUE(w.ledger().audit().ok());
}

TEST(Ledger, FaucetAndOperatorMinting) {
  World w;
  auto alice = crypto::Identity::generate();
  EXPECT_EQ(w.ok<Account>(alice, proto::Mint{alice.public_key(), 600'000}).balance, 600'000u);
  EXPECT_EQ(w.ok<Account>(alice, proto::Mint{alice.public_key(), 400'000}).balance, 1'000'000u);
  proto::Reply over = w.exec(alice, proto::Mint{alice.public_key(), 1});
  EXPECT_EQ(over.code, ErrorCode::Auth);
  EXPECT_NE(over.message.find("faucet limit"), std::string::npos) << over.message;
  // The operator mints to anyone, any amount within the ledger's range.
  EXPECT_EQ(w.ok<Account>(w.op(), proto::Mint{alice.public_key(), 5'000'000}).balance, 6'000'000u);
  EXPECT_EQ(w.exec(w.op(), proto::Mint{alice.public_key(), kMaxLedgerAmount}).reason, "amount_overflow");
  EXPECT_EQ(w.exec(w.op(), proto::Mint{alice.public_key(), 0}).reason, "invalid_field");
  EXPECT_EQ(w.ledger().audit().total_minted, 6'000'000u);
  EXPECT_TRUE(w.ledger().audit().ok());
}

TEST(Ledger, ProviderFailedCountsAsAbandonedAndOffersAreLeasedOnce) {
  World w;
  auto renter = crypto::Identity::generate();
  auto provider = crypto::Identity::generate();
  w.fund(renter, 10'000);
  w.heartbeat(provider);
  Id offer = w.offer(provider, 10);
  Id o1 = w.order(renter, 1, 10, 100);
  Id o2 = w.order(renter, 1, 10, 100);
  Id b1 = w.ok<Id>(provider, proto::PlaceBid{o1, offer, 10});
  Id b2 = w.ok<Id>(provider, proto::PlaceBid{o2, offer, 10});
  EXPECT_EQ(w.exec(provider, proto::PlaceBid{o1, offer, 9}).reason, "duplicate_bid");
  Lease lease = w.ok<Lease>(renter, proto::Accept{b1});
  // The other bid on the same offer was withdrawn; the offer is busy.
  EXPECT_EQ(w.exec(renter, proto::Accept{b2}).reason, "bid_closed");
  EXPECT_EQ(w.exec(provider, proto::PlaceBid{o2, offer, 10}).reason, "offer_busy");
  EXPECT_EQ(w.exec(renter, proto::Accept{b1}).reason, "bid_closed");
  w.ok<Lease>(renter, proto::Close{lease.id, CloseReason::ProviderFailed, std::nullopt});
  auto rep = w.ok<Reputation>(renter, proto::ReputationQuery{provider.public_key()});
  EXPECT_EQ(rep.leases_abandoned, 1u);
  EXPECT_EQ(rep.leases_clean, 0u);
  EXPECT_EQ(w.exec(renter, proto::Close{lease.id, CloseReason::RenterDone, std::nullopt}).reason, "lease_closed");
  // Free again: a new bid on the second order works.
  w.ok<Id>(provider, proto::PlaceBid{o2, offer, 10});
  w.ok_none(renter, proto::CancelOrder{o2});
  EXPECT_EQ(w.exec(renter, proto::CancelOrder{o2}).reason, "order_closed");
  w.ok_none(provider, proto::WithdrawOffer{offer});
  EXPECT_EQ(w.exec(provider, proto::WithdrawOffer{offer}).reason, "offer_inactive");
  EXPECT_TRUE(w.ledger().audit().ok());
}

TEST(Ledger, DiscoveryFiltersSortsAndPages) {
  World w;
  auto renter = crypto::Identity::generate();
  std::vector<crypto::Identity> providers;
  for (int i = 0; i < 4; ++i) providers.push_back(crypto::Identity::generate());
  // Provider 3 is never heard from again after its first heartbeat.
  w.heartbeat(providers[3]);
  struct Made {
    Id id;
    int provider;
    Amount price;
    std::string model;
    uint32_t vram;
    std::string region;
    uint32_t latency;
  };
  std::vector<Made> made;
  const char* models[] = {"L4-24GB", "A100-80GB", "H100-80GB"};
  const uint32_t vrams[] = {24, 80, 80};
  for (int i = 0; i < 40; ++i) {
    int p = i % 4;
    Amount price = 5 + (i * 7) % 11;  // repeats, so the id tie-break matters
    std::string region = i % 3 == 0 ? "us-east" : "eu-west";
    uint32_t latency = static_cast<uint32_t>((i * 13) % 17);
    Id id = w.offer(providers[p], price, models[i % 3], vrams[i % 3], region, latency);
    made.push_back({id, p, price, models[i % 3], vrams[i % 3], region, latency});
  }
  w.now += 20'000;  // past provider 3's alive window
  for (int p = 0; p < 3; ++p) w.heartbeat(providers[p]);
  // Provider 1 gets a better record: a completed lease with steps.
  {
    w.fund(renter, 100'000);
    Id order = w.order(renter, 1, 100, 1'000);
    Id extra = w.offer(providers[1], 50, "X", 1, "nowhere", 1);
    Id bid = w.ok<Id>(providers[1], proto::PlaceBid{order, extra, 50});
    Lease l = w.ok<Lease>(renter, proto::Accept{bid});
    w.ok<RedeemResult>(providers[1], proto::Redeem{Voucher::sign(renter, l.id, 20, 1'000, 1)});
    w.ok<Lease>(providers[1], proto::Close{l.id, CloseReason::ProviderDone, std::nullopt});
    w.ok_none(providers[1], proto::WithdrawOffer{extra});
  }

  auto expect_ids = [&](OfferFilter f, std::function<bool(const Made&)> keep,
                        std::function<bool(const Made&, const Made&)> less) {
    std::vector<Made> want;
    for (const auto& m : made)
      if (keep(m)) want.push_back(m);
    std::stable_sort(want.begin(), want.end(), [&](const Made& a, const Made& b) {
      if (less(a, b)) return true;
      if (less(b, a)) return false;
      return a.id < b.id;
    });
    // Page through in pages of 3.
    f.limit = 3;
    std::vector<Id> got;
    uint64_t total = 0;
    for (int pages = 0; pages < 100; ++pages) {
      auto page = w.ok<OfferPage>(renter, proto::Discover{f});
      total = page.total;
      EXPECT_LE(page.offers.size(), 3u);
      for (const auto& o : page.offers) got.push_back(o.id);
      if (page.next_page_token == 0) break;
      f.page_token = page.next_page_token;
    }
    std::vector<Id> want_ids;
    for (const auto& m : want) want_ids.push_back(m.id);
    EXPECT_EQ(got, want_ids);
    EXPECT_EQ(total, want_ids.size());
  };
  auto alive = [](const Made& m) { return m.provider != 3; };
  auto by_price = [](const Made& a, const Made& b) { return a.price < b.price; };

  OfferFilter f;
  expect_ids(f, alive, by_price);
  f.alive_only = false;
  expect_ids(
      f, [](const Made&) { return true; }, by_price);
  f = {};
  f.gpu_model = "H100-80GB";
  expect_ids(
      f, [&](const Made& m) { return alive(m) && m.model == "H100-80GB"; }, by_price);
  f = {};
  f.min_vram_gib = 40;
  f.region = "eu-west";
  f.max_price_per_step = 10;
  expect_ids(
      f, [&](const Made& m) { return alive(m) && m.vram >= 40 && m.region == "eu-west" && m.price <= 10; }, by_price);
  f = {};
  f.sort = OfferSort::Latency;
  expect_ids(f, alive, [](const Made& a, const Made& b) { return a.latency < b.latency; });
  f = {};
  f.min_gpu_count = 2;
  expect_ids(
      f, [](const Made&) { return false; }, by_price);

  // Reputation: provider 1 (a clean lease, 20 steps) first, then 0 and 2 by id.
  f = {};
  f.sort = OfferSort::Reputation;
  f.limit = 1000;
  auto page = w.ok<OfferPage>(renter, proto::Discover{f});
  ASSERT_EQ(page.offers.size(), 30u);
  for (size_t i = 0; i < 10; ++i) EXPECT_EQ(page.offers[i].provider, providers[1].public_key()) << i;
  for (size_t i = 1; i < page.offers.size(); ++i) {
    EXPECT_GE(page.offers[i - 1].reputation.score, page.offers[i].reputation.score);
    if (page.offers[i - 1].reputation.score == page.offers[i].reputation.score)
      EXPECT_LT(page.offers[i - 1].id, page.offers[i].id);
  }
  f.min_reputation = page.offers[0].reputation.score;
  EXPECT_EQ(w.ok<OfferPage>(renter, proto::Discover{f}).total, 10u);

  // Out-of-range filters.
  f = {};
  f.limit = 0;
  EXPECT_EQ(w.exec(renter, proto::Discover{f}).reason, "invalid_field");
  f.limit = 1001;
  EXPECT_EQ(w.exec(renter, proto::Discover{f}).reason, "invalid_field");
  f.limit = 10;
  f.min_reputation = 1.5;
  EXPECT_EQ(w.exec(renter, proto::Discover{f}).reason, "invalid_field");
  f = {};
  f.page_token = 1'000'000;
  page = w.ok<OfferPage>(renter, proto::Discover{f});
  EXPECT_TRUE(page.offers.empty());
  EXPECT_EQ(page.next_page_token, 0u);
}

TEST(Ledger, ReputationUptimeCountsGapsAsDown) {
  ProviderStats s;
  s.first_seen_ms = 1'000;
  s.last_heartbeat_ms = 11'000;
  s.covered_ms = 5'000;  // half of the first 10 s
  auto gap = std::chrono::milliseconds(2'000);
  EXPECT_DOUBLE_EQ(reputation_from_stats(s, 11'000, gap).uptime, 0.5);
  // 1 s after the last heartbeat: still within the gap, counted as up.
  EXPECT_DOUBLE_EQ(reputation_from_stats(s, 12'000, gap).uptime, 6'000.0 / 11'000.0);
  // 9 s after: down.
  EXPECT_DOUBLE_EQ(reputation_from_stats(s, 20'000, gap).uptime, 5'000.0 / 19'000.0);
  EXPECT_EQ(reputation_from_stats(ProviderStats{}, 20'000, gap).score, 0.0);
  // Fresh, always-up provider: 1 x 1/2 x 1/2.
  ProviderStats fresh;
  fresh.first_seen_ms = fresh.last_heartbeat_ms = 5'000;
  EXPECT_DOUBLE_EQ(reputation_from_stats(fresh, 5'000, gap).score, 0.25);

  World w;
  auto p = crypto::Identity::generate();
  w.heartbeat(p);
  for (int i = 0; i < 5; ++i) {
    w.now += 1'000;
    w.heartbeat(p);
  }
  w.now += 20'000;  // a long silence
  w.heartbeat(p);
  auto rep = w.ok<Reputation>(p, proto::ReputationQuery{p.public_key()});
  EXPECT_NEAR(rep.uptime, 5'000.0 / 25'000.0, 1e-9);
}

TEST(Ledger, RefusesAnUnknownSchemaVersion) {
  TempDir dir;
  { Ledger ledger(dir / "m.db"); }
  sqlite3* db = nullptr;
  ASSERT_EQ(sqlite3_open((dir / "m.db").c_str(), &db), SQLITE_OK);
  ASSERT_EQ(sqlite3_exec(db, "PRAGMA user_version = 99", nullptr, nullptr, nullptr), SQLITE_OK);
  sqlite3_close(db);
  try {
    Ledger ledger(dir / "m.db");
    FAIL() << "opened a version-99 database";
  } catch (const InvalidArgumentError& e) {
    EXPECT_NE(std::string(e.what()).find("schema version 99"), std::string::npos) << e.what();
  }
}

TEST(Ledger, RequestDigestCoversEveryField) {
  auto a = crypto::Identity::generate();
  proto::Request r{a.public_key(), 7, proto::PlaceBid{1, 2, 3}};
  auto base = request_digest(r);
  EXPECT_EQ(base, request_digest(r));
  proto::Request changed = r;
  std::get<proto::PlaceBid>(changed.body).price_per_step = 4;
  EXPECT_NE(base, request_digest(changed));
  changed = r;
  changed.nonce = 8;
  EXPECT_NE(base, request_digest(changed));
  changed = r;
  changed.body = proto::Accept{1};
  EXPECT_NE(request_digest(proto::Request{a.public_key(), 7, proto::Accept{1}}),
            request_digest(proto::Request{a.public_key(), 7, proto::CancelOrder{1}}));
}
