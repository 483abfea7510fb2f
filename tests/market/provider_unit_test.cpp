// The provider daemon's logic at unit level (lib/market/provider.h): voucher acceptance rules,
// the durable voucher store, redemption bookkeeping, the unpaid grace, offers and bids, the
// config file and GPU detection. The market here is an in-test MarketBackend (unit level only);
// provider_daemon_test.cpp runs the real meshtrain-market and meshtrain-provider processes.
#include <gtest/gtest.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/stat.h>

#include <fstream>
#include <map>
#include <thread>

#include "market/provider.h"
#include "support/temp_dir.h"

using namespace meshtrain;
using namespace meshtrain::market;
using namespace std::chrono_literals;
using test_support::TempDir;

namespace {

TimeMs now_ms() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::system_clock::now().time_since_epoch())
      .count();
}

// A market in memory that behaves like the ledger where the provider depends on it, and records
// what the provider asked. `down` makes every call time out.
class FakeMarket : public MarketBackend {
 public:
  explicit FakeMarket(AccountId provider) : provider_(provider) {}

  bool down = false;
  std::map<Id, Lease> leases_by_id;
  std::map<Id, OfferSpec> offers;
  std::vector<Order> open_orders;
  std::vector<std::tuple<Id, Id, Amount>> bids_placed;  // order, offer, price
  std::vector<Voucher> redeemed;
  std::vector<std::pair<Id, std::optional<Voucher>>> closes;
  int heartbeats = 0;
  int offer_calls = 0;

  Lease& add_lease(Id id, const AccountId& renter, Amount price, Amount escrow) {
    Lease l;
    l.id = id;
    l.offer_id = offers.empty() ? 1 : offers.begin()->first;
    l.renter = renter;
    l.provider = provider_;
    l.price_per_step = price;
    l.escrow = escrow;
    l.started_ms = now_ms();
    l.expires_ms = now_ms() + 3600 * 1000;
    return leases_by_id[id] = l;
  }

  Account mint(const AccountId&, Amount) override { unused("mint"); }
  Account account(const AccountId&) override { unused("account"); }
  Id offer(const OfferSpec& spec) override {
    check();
    Id id = 100 + ++offer_calls;
    offers[id] = spec;
    return id;
  }
  void withdraw_offer(Id id) override {
    check();
    offers.erase(id);
  }
  Id bid(Id order_id, Id offer_id, Amount price) override {
    check();
    bids_placed.emplace_back(order_id, offer_id, price);
    return 500 + bids_placed.size();
  }
  void heartbeat() override {
    check();
    ++heartbeats;
  }
  RedeemResult redeem(const Voucher& v) override {
    check();
    Lease& l = find(v.lease_id);
    if (l.state == LeaseState::Closed) throw MarketError("lease_closed", "lease closed");
    if (v.cumulative_amount <= l.paid) throw MarketError("stale_voucher", "stale");
    v.verify(l.renter);
    RedeemResult r;
    r.paid_now = v.cumulative_amount - l.paid;
    l.paid = v.cumulative_amount;
    l.paid_step = v.step;
    redeemed.push_back(v);
    r.lease = l;
    return r;
  }
  OfferPage discover(const OfferFilter&) override {
    check();
    OfferPage page;
    for (const auto& [id, spec] : offers) {
      Offer o;
      o.id = id;
      o.provider = provider_;
      o.spec = spec;
      page.offers.push_back(o);
    }
    page.total = page.offers.size();
    return page;
  }
  Id order(const OrderSpec&) override { unused("order"); }
  void cancel_order(Id) override { unused("cancel_order"); }
  std::vector<Bid> bids(Id) override { unused("bids"); }
  Lease accept(Id) override { unused("accept"); }
  Lease close(Id lease_id, CloseReason reason, const std::optional<Voucher>& voucher) override {
    check();
    Lease& l = find(lease_id);
    if (l.state == LeaseState::Closed) throw MarketError("lease_closed", "lease closed");
    if (voucher && voucher->cumulative_amount > l.paid) {
      l.paid = voucher->cumulative_amount;
      l.paid_step = voucher->step;
    }
    l.state = LeaseState::Closed;
    l.close_reason = reason;
    closes.emplace_back(lease_id, voucher);
    return l;
  }
  std::vector<Order> orders(const OrderQuery& q) override {
    check();
    EXPECT_TRUE(q.matching_offer.has_value());
    return open_orders;
  }
  std::vector<Lease> leases(const LeaseQuery& q) override {
    check();
    std::vector<Lease> out;
    for (const auto& [id, l] : leases_by_id)
      if (!q.open_only || l.state == LeaseState::Open) out.push_back(l);
    return out;
  }
  Lease lease(Id id) override {
    check();
    return find(id);
  }
  Reputation reputation(const AccountId&) override { unused("reputation"); }

 private:
  void check() const {
    if (down) throw TimeoutError("fake market: no reply (down)");
  }
  Lease& find(Id id) {
    auto it = leases_by_id.find(id);
    if (it == leases_by_id.end()) throw MarketError("unknown_lease", fmt::format("no lease {}", id));
    return it->second;
  }
  [[noreturn]] static void unused(const char* what) {
    throw InternalError(fmt::format("the provider should not call {}", what));
  }
  AccountId provider_;
};

DetectedHardware test_hardware() {
  DetectedHardware hw;
  hw.gpu = GpuSpec{"L4-24GB", 2, 24, "8.9"};
  hw.source = "config";
  hw.report_json = R"({"source":"config"})";
  return hw;
}

class ProviderUnit : public ::testing::Test {
 protected:
  ProviderUnit() : provider_id(crypto::Identity::generate()), renter(crypto::Identity::generate()),
                   market(provider_id.public_key()) {
    settings.bind_endpoint = "tcp://127.0.0.1:0";
    settings.db_path = dir / "provider.db";
    settings.price_per_step = 10;
    settings.redeem_interval = 5000ms;
    settings.unpaid_grace = 3000ms;
    settings.worker_stop_grace = 500ms;
  }

  std::unique_ptr<Provider> start() {
    return std::make_unique<Provider>(provider_id, market, settings, test_hardware());
  }
  Voucher voucher(Id lease, uint64_t step, Amount price = 10, const crypto::Identity* signer = nullptr) {
    return Voucher::sign(signer ? *signer : renter, lease, step, step * price, ++nonce);
  }

  TempDir dir;
  crypto::Identity provider_id;
  crypto::Identity renter;
  FakeMarket market;
  ProviderSettings settings;
  uint64_t nonce = 0;
};

}  // namespace

// ---- voucher_rejection: one test per reason ---------------------------------------------------

TEST(ProviderVoucherRules, EachRejectionReason) {
  auto provider = crypto::Identity::generate();
  auto renter = crypto::Identity::generate();
  auto stranger = crypto::Identity::generate();
  Lease lease;
  lease.id = 7;
  lease.renter = renter.public_key();
  lease.provider = provider.public_key();
  lease.price_per_step = 10;
  lease.escrow = 1000;
  lease.expires_ms = now_ms() + 60000;
  const AccountId& me = provider.public_key();
  const AccountId& from = renter.public_key();
  TimeMs now = now_ms();
  auto check = [&](const Lease& l, const AccountId& sender, const Voucher& v, uint64_t step, Amount amount) {
    return voucher_rejection(l, me, sender, v, step, amount, now);
  };

  EXPECT_EQ(check(lease, from, Voucher::sign(renter, 7, 3, 30, 1), 2, 20), "");
  EXPECT_EQ(check(lease, from, Voucher::sign(renter, 7, 1, 10, 1), 0, 0), "");

  Lease foreign = lease;
  foreign.provider = stranger.public_key();
  EXPECT_EQ(check(foreign, from, Voucher::sign(renter, 7, 1, 10, 1), 0, 0), "not_my_lease");
  EXPECT_EQ(check(lease, stranger.public_key(), Voucher::sign(renter, 7, 1, 10, 1), 0, 0), "wrong_sender");
  // Sent by the renter, signed by someone else; and a tampered amount.
  EXPECT_EQ(check(lease, from, Voucher::sign(stranger, 7, 1, 10, 1), 0, 0), "bad_signature");
  Voucher tampered = Voucher::sign(renter, 7, 1, 10, 1);
  tampered.cumulative_amount = 20;
  tampered.step = 2;
  EXPECT_EQ(check(lease, from, tampered, 0, 0), "bad_signature");

  Lease closed = lease;
  closed.state = LeaseState::Closed;
  EXPECT_EQ(check(closed, from, Voucher::sign(renter, 7, 1, 10, 1), 0, 0), "lease_closed");
  Lease expired = lease;
  expired.expires_ms = now - 1;
  EXPECT_EQ(check(expired, from, Voucher::sign(renter, 7, 1, 10, 1), 0, 0), "lease_expired");

  // Replayed, decreasing, and equal step with a higher amount.
  EXPECT_EQ(check(lease, from, Voucher::sign(renter, 7, 3, 30, 1), 3, 30), "stale_voucher");
  EXPECT_EQ(check(lease, from, Voucher::sign(renter, 7, 2, 20, 1), 3, 30), "stale_voucher");
  EXPECT_EQ(check(lease, from, Voucher::sign(renter, 7, 3, 40, 1), 3, 30), "stale_voucher");

  EXPECT_EQ(check(lease, from, Voucher::sign(renter, 7, 4, 41, 1), 3, 30), "wrong_increment");
  EXPECT_EQ(check(lease, from, Voucher::sign(renter, 7, 4, 39, 1), 3, 30), "wrong_increment");
  Lease pricey = lease;
  pricey.price_per_step = UINT64_MAX / 2;
  EXPECT_EQ(check(pricey, from, Voucher::sign(renter, 7, 3, UINT64_MAX, 1), 0, 0), "amount_overflow");
  EXPECT_EQ(check(lease, from, Voucher::sign(renter, 7, 101, 1010, 1), 100, 1000), "over_escrow");
  EXPECT_EQ(check(lease, from, Voucher::sign(renter, 7, 100, 1000, 1), 99, 990), "");
}

// ---- the store -----------------------------------------------------------------------------

TEST(ProviderStore, SurvivesReopeningAndRefusesOlderVouchers) {
  TempDir dir;
  auto renter = crypto::Identity::generate();
  auto path = dir / "store.db";
  Lease lease;
  lease.id = 3;
  lease.renter = renter.public_key();
  lease.provider = crypto::Identity::generate().public_key();
  lease.endpoint = "tcp://127.0.0.1:9";
  lease.price_per_step = 7;
  lease.escrow = 700;
  lease.paid = 14;
  lease.paid_step = 2;
  lease.state = LeaseState::Closed;
  lease.close_reason = CloseReason::ProviderDone;
  lease.expires_ms = 123456789;
  Voucher v5 = Voucher::sign(renter, 3, 5, 35, 99);
  {
    ProviderStore store(path);
    EXPECT_FALSE(store.latest_voucher(3));
    EXPECT_FALSE(store.offer());
    store.put_voucher(Voucher::sign(renter, 3, 4, 28, 98));
    store.put_voucher(v5);
    EXPECT_THROW(store.put_voucher(Voucher::sign(renter, 3, 5, 35, 100)), InvalidArgumentError);
    EXPECT_THROW(store.put_voucher(Voucher::sign(renter, 3, 2, 14, 101)), InvalidArgumentError);
    store.put_lease(lease);
    store.put_offer(StoredOffer{42, "abc"});
  }
  ProviderStore reopened(path);
  ASSERT_TRUE(reopened.latest_voucher(3));
  EXPECT_EQ(*reopened.latest_voucher(3), v5);
  EXPECT_NO_THROW(reopened.latest_voucher(3)->verify(renter.public_key()));
  auto l = reopened.lease(3);
  ASSERT_TRUE(l);
  EXPECT_EQ(l->renter, lease.renter);
  EXPECT_EQ(l->provider, lease.provider);
  EXPECT_EQ(l->endpoint, lease.endpoint);
  EXPECT_EQ(l->paid, 14u);
  EXPECT_EQ(l->paid_step, 2u);
  EXPECT_EQ(l->state, LeaseState::Closed);
  EXPECT_EQ(l->close_reason, CloseReason::ProviderDone);
  EXPECT_EQ(l->expires_ms, 123456789);
  EXPECT_EQ(reopened.leases().size(), 1u);
  EXPECT_EQ(reopened.offer()->offer_id, 42u);
  EXPECT_EQ(reopened.offer()->spec_digest, "abc");
}

TEST(ProviderStore, NamesAnUnusableFile) {
  TempDir dir;
  std::filesystem::create_directories(dir / "not-a-file.db");
  try {
    ProviderStore store(dir / "not-a-file.db");
    FAIL() << "opened a directory as a database";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("not-a-file.db"), std::string::npos) << e.what();
  }
}

// ---- the daemon against the in-test market -----------------------------------------------------

TEST_F(ProviderUnit, AcceptsStoresAndAcknowledgesVouchers) {
  auto p = start();
  market.add_lease(1, renter.public_key(), 10, 1000);
  EXPECT_EQ(p->handle_voucher(renter.public_key(), voucher(99, 1)).reason, "unknown_lease");
  for (uint64_t step = 1; step <= 3; ++step) {
    auto ack = p->handle_voucher(renter.public_key(), voucher(1, step));
    EXPECT_TRUE(ack.accepted) << ack.reason;
    EXPECT_EQ(ack.latest_step, step);
    EXPECT_EQ(ack.latest_amount, step * 10);
  }
  auto replay = p->handle_voucher(renter.public_key(), voucher(1, 2));
  EXPECT_FALSE(replay.accepted);
  EXPECT_EQ(replay.reason, "stale_voucher");
  EXPECT_EQ(replay.latest_step, 3u);
  EXPECT_EQ(replay.latest_amount, 30u);
  auto stranger = crypto::Identity::generate();
  EXPECT_EQ(p->handle_voucher(stranger.public_key(), voucher(1, 4, 10, &stranger)).reason, "wrong_sender");
  EXPECT_EQ(p->handle_voucher(renter.public_key(), voucher(1, 4, 10, &stranger)).reason, "bad_signature");
  EXPECT_EQ(p->handle_voucher(renter.public_key(), voucher(1, 4, 11)).reason, "wrong_increment");
  auto s = p->status();
  EXPECT_EQ(s.vouchers_accepted, 3u);
  EXPECT_EQ(s.vouchers_rejected, 5u);
  p.reset();

  // The acknowledged voucher is in the file, and a restarted provider knows it without the market.
  EXPECT_EQ(ProviderStore(settings.db_path).latest_voucher(1)->step, 3u);
  market.down = true;
  auto again = start();
  auto ack = again->handle_voucher(renter.public_key(), voucher(1, 3));
  EXPECT_EQ(ack.reason, "stale_voucher");
  EXPECT_EQ(ack.latest_step, 3u);
  EXPECT_TRUE(again->handle_voucher(renter.public_key(), voucher(1, 4)).accepted);
}

TEST_F(ProviderUnit, UnknownLeaseWhileTheMarketIsDownIsMarketUnavailable) {
  auto p = start();
  market.add_lease(1, renter.public_key(), 10, 1000);
  market.down = true;
  auto ack = p->handle_voucher(renter.public_key(), voucher(1, 1));
  EXPECT_FALSE(ack.accepted);
  EXPECT_EQ(ack.reason, "market_unavailable");
}

TEST_F(ProviderUnit, RedeemsOnlyAboveWhatIsPaidAndKeepsAcceptingWhileTheMarketIsDown) {
  settings.redeem_interval = 1000ms;
  settings.unpaid_grace = 600s;
  auto p = start();
  market.add_lease(1, renter.public_key(), 10, 1000);
  auto t = Clock::now();
  p->market_tick(t);  // publishes the offer, sees the lease
  EXPECT_EQ(market.offer_calls, 1);
  EXPECT_EQ(market.heartbeats, 1);
  for (uint64_t step = 1; step <= 4; ++step) ASSERT_TRUE(p->handle_voucher(renter.public_key(), voucher(1, step)).accepted);
  p->market_tick(t + 1100ms);
  ASSERT_EQ(market.redeemed.size(), 1u);
  EXPECT_EQ(market.redeemed[0].step, 4u);
  EXPECT_EQ(market.leases_by_id[1].paid, 40u);
  EXPECT_EQ(p->status().redeemed_total, 40u);
  p->market_tick(t + 2200ms);  // nothing new: no redemption
  EXPECT_EQ(market.redeemed.size(), 1u);

  market.down = true;
  p->market_tick(t + 3300ms);
  EXPECT_FALSE(p->status().market_up);
  for (uint64_t step = 5; step <= 7; ++step) ASSERT_TRUE(p->handle_voucher(renter.public_key(), voucher(1, step)).accepted);
  market.down = false;
  p->market_tick(t + 60s);  // past any backoff
  EXPECT_TRUE(p->status().market_up);
  ASSERT_EQ(market.redeemed.size(), 2u);
  EXPECT_EQ(market.redeemed[1].step, 7u);
  EXPECT_EQ(market.leases_by_id[1].paid, 70u);
  EXPECT_EQ(p->status().redeemed_total, 70u);
}

TEST_F(ProviderUnit, ClosesTheLeaseAndStopsTheWorkerWhenTheRenterStopsPaying) {
  auto marker = dir / "worker.pid";
  settings.worker_command = "echo $$ > " + marker.string() + "; exec sleep 30";
  auto p = start();
  market.add_lease(1, renter.public_key(), 10, 1000);
  p->market_tick(Clock::now());
  protocol::JobAttach attach{1, "tcp://127.0.0.1:7400", crypto::Identity::generate().public_key(), "token"};
  ASSERT_TRUE(p->handle_attach(renter.public_key(), attach).accepted);
  auto before = Clock::now();
  ASSERT_TRUE(p->handle_voucher(renter.public_key(), voucher(1, 1)).accepted);
  ASSERT_TRUE(p->handle_voucher(renter.public_key(), voucher(1, 2)).accepted);
  auto after = Clock::now();

  // Within the grace: nothing happens.
  p->market_tick(before + settings.unpaid_grace / 2);
  EXPECT_TRUE(market.closes.empty());
  pid_t worker = p->status().leases.at(0).worker_pid;
  ASSERT_GT(worker, 0);

  // Past it: closed as ProviderDone carrying the latest voucher, worker stopped.
  p->market_tick(after + settings.unpaid_grace + 1ms);
  ASSERT_EQ(market.closes.size(), 1u);
  ASSERT_TRUE(market.closes[0].second);
  EXPECT_EQ(market.closes[0].second->step, 2u);
  EXPECT_EQ(market.leases_by_id[1].close_reason, CloseReason::ProviderDone);
  EXPECT_EQ(market.leases_by_id[1].paid, 20u);
  EXPECT_EQ(p->status().redeemed_total, 20u);
  auto until = Clock::now() + 5s;
  while (Clock::now() < until && ::kill(worker, 0) == 0) {
    p->market_tick(Clock::now() + settings.unpaid_grace * 3);
    std::this_thread::sleep_for(20ms);
  }
  EXPECT_NE(::kill(worker, 0), 0) << "worker " << worker << " still running";
  EXPECT_EQ(p->handle_voucher(renter.public_key(), voucher(1, 3)).reason, "lease_closed");
  EXPECT_EQ(market.closes.size(), 1u);
}

TEST_F(ProviderUnit, StartsTheWorkerWithTheJobInItsEnvironment) {
  auto out = dir / "worker.env";
  settings.worker_command = "env | grep ^MESHTRAIN_ | sort > " + out.string() + ".tmp && mv " + out.string() +
                            ".tmp " + out.string();
  auto coordinator = crypto::Identity::generate().public_key();
  protocol::JobAttach attach{1, "tcp://127.0.0.1:7400", coordinator, "tok'; rm -rf /"};
  {
    ProviderSettings no_command = settings;
    no_command.worker_command.clear();
    Provider p(provider_id, market, no_command, test_hardware());
    market.add_lease(1, renter.public_key(), 10, 1000);
    EXPECT_EQ(p.handle_attach(renter.public_key(), attach).reason, "no_worker_command");
  }
  auto p = start();
  auto stranger = crypto::Identity::generate();
  EXPECT_EQ(p->handle_attach(stranger.public_key(), attach).reason, "wrong_sender");
  protocol::JobAttach bad = attach;
  bad.coordinator_endpoint = "ipc:///tmp/x";
  EXPECT_EQ(p->handle_attach(renter.public_key(), bad).reason, "bad_attach");
  ASSERT_TRUE(p->handle_attach(renter.public_key(), attach).accepted);
  auto until = Clock::now() + 5s;
  while (Clock::now() < until && !std::filesystem::exists(out)) std::this_thread::sleep_for(10ms);
  std::ifstream in(out);
  std::string env((std::istreambuf_iterator<char>(in)), {});
  EXPECT_NE(env.find("MESHTRAIN_COORDINATOR=tcp://127.0.0.1:7400\n"), std::string::npos) << env;
  EXPECT_NE(env.find("MESHTRAIN_COORDINATOR_KEY=" + coordinator.hex() + "\n"), std::string::npos) << env;
  EXPECT_NE(env.find("MESHTRAIN_JOIN_TOKEN=tok'; rm -rf /\n"), std::string::npos) << env;
  EXPECT_NE(env.find("MESHTRAIN_LEASE_ID=1\n"), std::string::npos) << env;
  market.leases_by_id[1].state = LeaseState::Closed;
  p->market_tick(Clock::now());
  EXPECT_EQ(p->handle_attach(renter.public_key(), attach).reason, "lease_closed");
}

TEST_F(ProviderUnit, BidsOnOrdersAtOrAboveItsPriceAndReusesItsOffer) {
  // The endpoint is part of the offer: a restart on the same port keeps the offer.
  auto first = start();
  settings.bind_endpoint = first->endpoint();
  first.reset();
  auto p = start();
  Order cheap, fine;
  cheap.id = 1;
  cheap.spec.max_price_per_step = 9;
  fine.id = 2;
  fine.spec.max_price_per_step = 10;
  market.open_orders = {cheap, fine};
  p->market_tick(Clock::now());
  ASSERT_EQ(market.offers.size(), 1u);
  Id offer = market.offers.begin()->first;
  const OfferSpec& spec = market.offers.begin()->second;
  EXPECT_EQ(spec.gpu.model, "L4-24GB");
  EXPECT_EQ(spec.gpu.count, 2u);
  EXPECT_EQ(spec.price_per_step, 10u);
  EXPECT_EQ(spec.endpoint, p->endpoint());
  EXPECT_NO_THROW(spec.hardware.verify(provider_id.public_key()));
  ASSERT_EQ(market.bids_placed.size(), 1u);
  EXPECT_EQ(market.bids_placed[0], std::make_tuple(Id(2), offer, Amount(10)));
  p->market_tick(Clock::now() + 10s);  // the same orders again: no second bid
  EXPECT_EQ(market.bids_placed.size(), 1u);

  // While leased, the offer is busy: no bids.
  Order later;
  later.id = 3;
  later.spec.max_price_per_step = 100;
  market.open_orders = {later};
  market.add_lease(1, renter.public_key(), 10, 1000).offer_id = offer;
  p->market_tick(Clock::now() + 20s);
  EXPECT_EQ(market.bids_placed.size(), 1u);
  p.reset();

  // A restart re-uses the stored offer while it is active, publishes anew when it is not.
  auto again = start();
  again->market_tick(Clock::now());
  EXPECT_EQ(market.offer_calls, 1);
  EXPECT_EQ(again->status().offer_id, offer);
  again.reset();
  // Gone from the market (withdrawn, or the market lost it): published anew.
  market.leases_by_id.clear();
  market.offers.clear();
  auto third = start();
  third->market_tick(Clock::now());
  EXPECT_EQ(market.offer_calls, 2);
  EXPECT_NE(third->status().offer_id, offer);
  third.reset();
  // A changed price is a new offer; the old one is withdrawn.
  settings.price_per_step = 12;
  Id before = market.offers.begin()->first;
  auto repriced = start();
  repriced->market_tick(Clock::now());
  EXPECT_EQ(market.offer_calls, 3);
  ASSERT_EQ(market.offers.size(), 1u);
  EXPECT_NE(market.offers.begin()->first, before);
  EXPECT_EQ(market.offers.begin()->second.price_per_step, 12u);
}

// ---- config and GPU detection -------------------------------------------------------------------

TEST(ProviderConfig, ReadsEveryKeyAndNamesMistakes) {
  TempDir dir;
  auto path = dir / "provider.json";
  std::string key = crypto::Identity::generate().public_key().hex();
  std::ofstream(path) << R"({"market_endpoint": "tcp://127.0.0.1:7700", "market_key": ")" << key << R"(",
    "key_file": "provider.pem", "bind": "tcp://127.0.0.1:7601", "advertise": "tcp://10.0.0.5:7601",
    "price_per_step": 25, "price_per_hour_idle": 3, "region": "eu-west", "latency_hint_ms": 12,
    "worker_command": "exec my-worker", "redeem_interval_ms": 2000, "unpaid_grace_ms": 9000,
    "worker_stop_grace_ms": 700, "heartbeat_interval_ms": 500, "poll_interval_ms": 800, "db": "/var/p.db",
    "gpu": {"model": "H100-80GB", "count": 8, "vram_gib": 80, "cuda_capability": "9.0"}})";
  ProviderSettings s = load_provider_config(path);
  EXPECT_EQ(s.market_endpoint, "tcp://127.0.0.1:7700");
  EXPECT_EQ(s.market_key->hex(), key);
  EXPECT_EQ(s.key_file, dir / "provider.pem");
  EXPECT_EQ(s.bind_endpoint, "tcp://127.0.0.1:7601");
  EXPECT_EQ(s.advertise_endpoint, "tcp://10.0.0.5:7601");
  EXPECT_EQ(s.price_per_step, 25u);
  EXPECT_EQ(s.price_per_hour_idle, 3u);
  EXPECT_EQ(s.region, "eu-west");
  EXPECT_EQ(s.latency_hint_ms, 12u);
  EXPECT_EQ(s.worker_command, "exec my-worker");
  EXPECT_EQ(s.redeem_interval, 2000ms);
  EXPECT_EQ(s.unpaid_grace, 9000ms);
  EXPECT_EQ(s.worker_stop_grace, 700ms);
  EXPECT_EQ(s.heartbeat_interval, 500ms);
  EXPECT_EQ(s.poll_interval, 800ms);
  EXPECT_EQ(s.db_path, "/var/p.db");
  ASSERT_TRUE(s.declared_gpu);
  EXPECT_EQ(s.declared_gpu->model, "H100-80GB");
  EXPECT_EQ(s.declared_gpu->count, 8u);
  EXPECT_NO_THROW(validate_provider_settings(s));

  auto expect_error = [&](const std::string& text, const std::string& needle) {
    std::ofstream(path, std::ios::trunc) << text;
    try {
      load_provider_config(path);
      ADD_FAILURE() << "accepted " << text;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find("provider.json"), std::string::npos) << e.what();
    }
  };
  expect_error(R"({"price_per_stp": 3})", "price_per_stp");
  expect_error(R"({"price_per_step": -3})", "price_per_step");
  expect_error(R"({"market_key": "abc"})", "market_key");
  expect_error(R"({"gpu": {"model": "x", "count": 0, "vram_gib": 1, "cuda_capability": "8.0"}})", "gpu.count");
  expect_error(R"({"redeem_interval_ms": 0})", "redeem_interval_ms");
  expect_error("{", "line 1");

  ProviderSettings missing = s;
  missing.price_per_step = 0;
  EXPECT_THROW(validate_provider_settings(missing), InvalidArgumentError);
  missing = s;
  missing.advertise_endpoint.clear();
  missing.bind_endpoint = "tcp://0.0.0.0:7600";
  EXPECT_THROW(validate_provider_settings(missing), InvalidArgumentError);
  missing = s;
  missing.market_key.reset();
  EXPECT_THROW(validate_provider_settings(missing), InvalidArgumentError);
}

TEST(ProviderGpus, ParsesNvidiaSmiAndCountsIdenticalCards) {
  auto gpus = parse_nvidia_smi("NVIDIA H100 80GB HBM3, 81559, 9.0\nNVIDIA H100 80GB HBM3, 81559, 9.0\n");
  ASSERT_EQ(gpus.size(), 2u);
  EXPECT_EQ(gpus[0].name, "NVIDIA H100 80GB HBM3");
  EXPECT_EQ(gpus[0].memory_mib, 81559u);
  EXPECT_EQ(gpus[0].compute_cap, "9.0");
  GpuSpec spec = summarize_gpus(gpus);
  EXPECT_EQ(spec.model, "NVIDIA H100 80GB HBM3");
  EXPECT_EQ(spec.count, 2u);
  EXPECT_EQ(spec.vram_gib, 80u);
  EXPECT_EQ(spec.cuda_capability, "9.0");
  EXPECT_EQ(parse_nvidia_smi("Weird, GPU, Name, 1024, 8.6")[0].name, "Weird, GPU, Name");

  EXPECT_THROW(parse_nvidia_smi(""), ProtocolError);
  EXPECT_THROW(parse_nvidia_smi("NVIDIA L4, [N/A], 8.9"), ProtocolError);
  EXPECT_THROW(parse_nvidia_smi("NVIDIA L4, 23034"), ProtocolError);
  EXPECT_THROW(parse_nvidia_smi("NVIDIA L4, 23034, eight"), ProtocolError);
  try {
    parse_nvidia_smi("NVIDIA L4, 23034, 8.9\nNVIDIA L4, x, 8.9\n", "nvidia-smi");
    FAIL();
  } catch (const ProtocolError& e) {
    EXPECT_NE(std::string(e.what()).find("line 2"), std::string::npos) << e.what();
  }
  EXPECT_THROW(summarize_gpus(parse_nvidia_smi("NVIDIA L4, 23034, 8.9\nNVIDIA A100, 40960, 8.0\n")),
               InvalidArgumentError);
}

// detect_hardware runs whatever nvidia-smi is first on PATH: a script here plays it.
class ProviderDetect : public ::testing::Test {
 protected:
  ProviderDetect() : old_path(std::getenv("PATH") ? std::getenv("PATH") : "") {}
  ~ProviderDetect() override { ::setenv("PATH", old_path.c_str(), 1); }

  void fake_nvidia_smi(const std::string& body) {
    auto script = dir / "nvidia-smi";
    std::ofstream(script) << "#!/bin/sh\n" << body << "\n";
    ::chmod(script.c_str(), 0755);
    ::setenv("PATH", (dir.path().string() + ":" + old_path).c_str(), 1);
  }
  void no_nvidia_smi() { ::setenv("PATH", (dir / "empty").c_str(), 1); }

  TempDir dir;
  std::string old_path;
};

TEST_F(ProviderDetect, UsesNvidiaSmiAndChecksTheDeclaration) {
  fake_nvidia_smi(R"(test "$1" = "--query-gpu=name,memory.total,compute_cap" || exit 3
printf 'NVIDIA L4, 23034, 8.9\nNVIDIA L4, 23034, 8.9\n')");
  DetectedHardware hw = detect_hardware(std::nullopt, false);
  EXPECT_EQ(hw.source, "nvidia-smi");
  EXPECT_EQ(hw.gpu.model, "NVIDIA L4");
  EXPECT_EQ(hw.gpu.count, 2u);
  EXPECT_EQ(hw.gpu.vram_gib, 22u);
  EXPECT_NE(hw.report_json.find("\"nvidia_smi\""), std::string::npos) << hw.report_json;

  GpuSpec same{"NVIDIA L4", 2, 22, "8.9"};
  EXPECT_EQ(detect_hardware(same, false).source, "nvidia-smi");
  GpuSpec other{"H100-80GB", 8, 80, "9.0"};
  try {
    detect_hardware(other, false);
    FAIL() << "a declaration that disagrees with nvidia-smi was accepted";
  } catch (const InvalidArgumentError& e) {
    EXPECT_NE(std::string(e.what()).find("--trust-config"), std::string::npos) << e.what();
  }
  DetectedHardware trusted = detect_hardware(other, true);
  EXPECT_EQ(trusted.source, "config");
  EXPECT_EQ(trusted.gpu.model, "H100-80GB");
}

TEST_F(ProviderDetect, NamesAFailingOrHangingNvidiaSmi) {
  fake_nvidia_smi("echo 'NVIDIA-SMI has failed' >&2; exit 9");
  try {
    detect_hardware(std::nullopt, false);
    FAIL();
  } catch (const InvalidArgumentError& e) {
    EXPECT_NE(std::string(e.what()).find("exit code 9"), std::string::npos) << e.what();
  }
  GpuSpec declared{"L4", 1, 24, "8.9"};
  EXPECT_EQ(detect_hardware(declared, true).source, "config");

  fake_nvidia_smi("exec sleep 30");
  try {
    detect_hardware(std::nullopt, false, 300ms);
    FAIL();
  } catch (const InvalidArgumentError& e) {
    EXPECT_NE(std::string(e.what()).find("did not finish"), std::string::npos) << e.what();
  }

  fake_nvidia_smi("echo 'garbage'");
  EXPECT_THROW(detect_hardware(std::nullopt, false), InvalidArgumentError);
}

TEST_F(ProviderDetect, WithoutNvidiaSmiUsesTheDeclarationOrFailsClearly) {
  no_nvidia_smi();
  GpuSpec declared{"L4-24GB", 1, 24, "8.9"};
  DetectedHardware hw = detect_hardware(declared, false);
  EXPECT_EQ(hw.source, "config");
  EXPECT_EQ(hw.gpu.model, "L4-24GB");
  try {
    detect_hardware(std::nullopt, false);
    FAIL();
  } catch (const InvalidArgumentError& e) {
    EXPECT_NE(std::string(e.what()).find("nvidia-smi is not on PATH"), std::string::npos) << e.what();
  }
}
