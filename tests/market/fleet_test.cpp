// The renter's side end to end, with every process real: one meshtrain-market (SQLite ledger)
// and three meshtrain-provider daemons on loopback. A Fleet keeps two providers leased and pays
// them every step; one provider is SIGKILLed mid-lease, the fleet closes its lease as failed and
// rents the third; at the end every amount reconciles exactly.
#include <gtest/gtest.h>

#include <atomic>
#include <fstream>
#include <thread>

#include "market/protocol.h"
#include "meshtrain/market.h"
#include "meshtrain/net.h"
#include "market/market_world.h"

using namespace meshtrain;
using namespace meshtrain::market;
using namespace std::chrono_literals;
using test_support::Endpoint;
using test_support::MarketWorld;

namespace {

// Waits until discover() with `filter` sees `count` offers.
OfferPage wait_offers(MarketBackend& backend, const OfferFilter& filter, size_t count) {
  auto until = std::chrono::steady_clock::now() + 15s;
  OfferPage page;
  while (std::chrono::steady_clock::now() < until) {
    page = backend.discover(filter);
    if (page.offers.size() >= count) break;
    std::this_thread::sleep_for(50ms);
  }
  return page;
}

}  // namespace

TEST(MarketFleet, PaysEveryStepAndReplacesAKilledProvider) {
  MarketWorld world;
  const Amount prices[] = {100, 110, 120};
  std::vector<Endpoint> providers;
  for (size_t i = 0; i < 3; ++i) providers.push_back(world.start_provider(i, prices[i]));

  auto renter = crypto::Identity::generate();
  auto backend = connect_devnet(renter, world.market().key, world.market().endpoint);
  const Amount minted = 1'000'000;
  EXPECT_EQ(backend->mint(renter.public_key(), minted).balance, minted);

  // Discovery: all three by model, cheapest first; the price filter keeps one.
  OfferFilter filter;
  filter.gpu_model = "L4-24GB";
  OfferPage page = wait_offers(*backend, filter, 3);
  ASSERT_EQ(page.offers.size(), 3u) << world.logs();
  EXPECT_EQ(page.offers[0].spec.price_per_step, 100u);
  EXPECT_EQ(page.offers[2].spec.price_per_step, 120u);
  for (const Offer& o : page.offers) {
    EXPECT_EQ(o.spec.gpu.vram_gib, 24u);
    EXPECT_NO_THROW(o.spec.hardware.verify(o.provider));
  }
  OfferFilter cheap = filter;
  cheap.max_price_per_step = 105;
  EXPECT_EQ(backend->discover(cheap).offers.size(), 1u);
  OfferFilter nothing = filter;
  nothing.min_vram_gib = 80;
  EXPECT_TRUE(backend->discover(nothing).offers.empty());

  Budget budget;
  budget.spend_limit = 40'000;
  budget.escrow_per_lease = 15'000;
  budget.max_price_per_step = 200;
  MarketClient client(renter, *backend, budget);
  std::vector<FleetEvent> events;
  FleetOptions options;
  options.size = 2;
  options.filter = filter;
  options.rent_wait = 4s;
  options.heartbeat_timeout = 2500ms;
  options.on_event = [&](const FleetEvent& e) { events.push_back(e); };
  Fleet fleet(client, *backend, options);
  fleet.fill();
  auto held = fleet.leases();
  ASSERT_EQ(held.size(), 2u) << world.logs();
  std::set<Amount> held_prices;
  for (const Lease& l : held) held_prices.insert(l.price_per_step);
  EXPECT_EQ(held_prices, (std::set<Amount>{100, 110}));  // the two cheapest bids won

  // 100 paid steps; the cheapest provider dies at step 40.
  AccountId killed = providers[0].key;
  Id killed_lease = 0;
  for (const Lease& l : held)
    if (l.provider == killed) killed_lease = l.id;
  ASSERT_NE(killed_lease, 0u);
  std::optional<Voucher> killed_latest;
  for (uint64_t step = 1; step <= 100; ++step) {
    if (step == 40) {
      killed_latest = client.latest_voucher(killed_lease);
      world.provider(0).signal(SIGKILL);
      world.provider(0).wait(5s);
    }
    fleet.pay_step(step);
  }
  // The fleet noticed, closed the lease as failed and rented the third provider.
  bool failed_seen = false, replaced_seen = false;
  for (const auto& e : events) {
    failed_seen |= e.kind == FleetEvent::Kind::ProviderFailed && e.provider == killed;
    replaced_seen |= e.kind == FleetEvent::Kind::Replaced && e.provider == providers[2].key;
  }
  EXPECT_TRUE(failed_seen) << world.logs();
  EXPECT_TRUE(replaced_seen) << world.logs();
  held = fleet.leases();
  ASSERT_EQ(held.size(), 2u);
  for (const Lease& l : held) EXPECT_NE(l.provider, killed);

  Lease dead = backend->lease(killed_lease);
  EXPECT_EQ(dead.state, LeaseState::Closed);
  EXPECT_EQ(dead.close_reason, CloseReason::ProviderFailed);
  ASSERT_TRUE(killed_latest);
  // It was paid for the steps paid before it died (plus at most the voucher signed while it was
  // dying, which it may hold), never more.
  EXPECT_GE(dead.paid, killed_latest->cumulative_amount);
  EXPECT_LE(dead.paid, killed_latest->cumulative_amount + 100);
  EXPECT_EQ(backend->reputation(killed).leases_abandoned, 1u);

  Spend spend = client.spend();
  fleet.release_all();
  EXPECT_TRUE(fleet.leases().empty());

  // The killed provider comes back on the same database: its lease is closed, so it can redeem
  // nothing more, and its earnings stay what it was paid.
  Amount dead_earned = backend->account(killed).earned;
  world.start_provider(0, prices[0]);
  std::this_thread::sleep_for(1500ms);  // a few redeem intervals
  EXPECT_EQ(backend->account(killed).earned, dead_earned);

  // Reconciliation: what the renter signed is what it spent is what the providers earned.
  Account r = backend->account(renter.public_key());
  Amount earned = 0;
  for (const Endpoint& p : providers) earned += backend->account(p.key).earned;
  EXPECT_EQ(r.spent, spend.total) << world.logs();
  EXPECT_EQ(earned, r.spent);
  EXPECT_EQ(r.escrowed, 0u);
  EXPECT_EQ(r.balance + r.spent, minted);
  EXPECT_LE(spend.total, budget.spend_limit);
  LeaseQuery mine;
  mine.renter = renter.public_key();
  Amount paid = 0;
  for (const Lease& l : backend->leases(mine)) {
    EXPECT_EQ(l.state, LeaseState::Closed);
    EXPECT_EQ(l.paid, l.paid_step * l.price_per_step);
    paid += l.paid;
  }
  EXPECT_EQ(paid, r.spent);
}

TEST(MarketFleet, SpendLimitIsNeverExceeded) {
  MarketWorld world;
  Endpoint p = world.start_provider(0, 100);
  auto renter = crypto::Identity::generate();
  auto backend = connect_devnet(renter, world.market().key, world.market().endpoint);
  backend->mint(renter.public_key(), 100'000);
  OfferFilter filter;
  ASSERT_EQ(wait_offers(*backend, filter, 1).offers.size(), 1u) << world.logs();
  Budget budget;
  budget.spend_limit = 1'050;  // ten steps and a half
  budget.escrow_per_lease = 10'000;
  MarketClient client(renter, *backend, budget);
  auto leases = client.rent(1, filter, 4s);
  ASSERT_EQ(leases.size(), 1u) << world.logs();
  for (uint64_t step = 1; step <= 10; ++step) client.pay_step(leases[0].id, step);
  try {
    client.pay_step(leases[0].id, 11);
    FAIL() << "the eleventh step went over the spend limit";
  } catch (const MarketError& e) {
    EXPECT_EQ(e.reason(), "spend_limit");
  }
  EXPECT_THROW(client.pay_step(leases[0].id, 10), InvalidArgumentError);  // already paid
  EXPECT_EQ(client.spend().total, 1'000u);
  Lease closed = client.release(leases[0].id);
  EXPECT_EQ(closed.paid, 1'000u);
  EXPECT_EQ(backend->account(p.key).earned, 1'000u);
  EXPECT_EQ(backend->account(renter.public_key()).balance, 99'000u);
}

TEST(MarketFleet, AsyncPaymentChecksThePreviousAcknowledgementBeforeSigningAgain) {
  MarketWorld world;
  Endpoint p = world.start_provider(0, 100);
  auto renter = crypto::Identity::generate();
  auto backend = connect_devnet(renter, world.market().key, world.market().endpoint);
  backend->mint(renter.public_key(), 100'000);
  ASSERT_EQ(wait_offers(*backend, {}, 1).offers.size(), 1u) << world.logs();
  Budget budget;
  budget.spend_limit = 10'000;
  budget.escrow_per_lease = 10'000;
  MarketClient client(renter, *backend, budget);
  auto leases = client.rent(1, {}, 4s);
  ASSERT_EQ(leases.size(), 1u) << world.logs();
  Id lease = leases[0].id;
  client.pay_step_async(lease, 1);
  client.confirm(lease);
  world.provider(0).signal(SIGKILL);
  world.provider(0).wait(5s);
  // Step 2's voucher is signed (and may even be queued); step 3's is never signed, because the
  // dead daemon never acknowledges step 2.
  bool lost = false;
  for (uint64_t step = 2; step <= 3 && !lost; ++step) {
    try {
      client.pay_step_async(lease, step, 500ms);
    } catch (const PeerLostError& e) {
      lost = true;
      EXPECT_NE(std::string(e.what()).find(p.key.fingerprint()), std::string::npos) << e.what();
    }
  }
  EXPECT_TRUE(lost);
  EXPECT_EQ(client.spend().total, 200u);
  ASSERT_TRUE(client.latest_voucher(lease));
  EXPECT_EQ(client.latest_voucher(lease)->step, 2u);
  Lease closed = client.release(lease, CloseReason::ProviderFailed);
  EXPECT_EQ(closed.paid, 200u);  // what the renter signed, settled by its close
  EXPECT_EQ(backend->account(p.key).earned, 200u);
}

// A provider daemon that answers a voucher with bytes that do not decode (here a stand-in:
// a ControlServer under the provider's key, which offers and bids through the real market):
// that is the provider's loss, the PeerLostError a Fleet replaces a provider for, not a
// ProtocolError that would fail the renter's step for every lease, step after step.
TEST(MarketFleet, AMalformedVoucherAcknowledgementIsTheProvidersLoss) {
  MarketWorld world;
  auto fake = crypto::Identity::generate();
  auto renter = crypto::Identity::generate();
  net::ControlServer daemon(fake, net::AllowList{renter.public_key()}, "tcp://127.0.0.1:0");
  auto provider_side = connect_devnet(fake, world.market().key, world.market().endpoint);
  provider_side->heartbeat();
  OfferSpec spec;
  spec.gpu.model = "H100-80GB";
  spec.gpu.vram_gib = 80;
  spec.price_per_step = 100;
  spec.endpoint = daemon.endpoint();
  spec.hardware = HardwareReport::sign(fake, "{}");
  const Id offer = provider_side->offer(spec);
  std::atomic<bool> stop{false};
  std::thread bidder([&] {  // bids on the renter's order while rent() collects bids
    while (!stop) {
      OrderQuery q;
      q.matching_offer = offer;
      for (const Order& o : provider_side->orders(q)) {
        try {
          provider_side->bid(o.id, offer, 100);
          stop = true;
        } catch (const MarketError&) {
        }
      }
      std::this_thread::sleep_for(50ms);
    }
  });
  auto backend = connect_devnet(renter, world.market().key, world.market().endpoint);
  backend->mint(renter.public_key(), 100'000);
  Budget budget;
  budget.spend_limit = 10'000;
  budget.escrow_per_lease = 10'000;
  MarketClient client(renter, *backend, budget);
  auto leases = client.rent(1, {}, 5s);
  stop = true;
  bidder.join();
  ASSERT_EQ(leases.size(), 1u) << world.logs();
  std::thread answer([&] {
    std::optional<net::Message> m = daemon.recv(Deadline::after(10s));
    if (!m) return;
    net::MessageHeader h = m->header;
    h.type = static_cast<uint16_t>(protocol::MessageType::VoucherAck);
    const std::vector<uint8_t> garbage(40, 0xab);
    daemon.send(m->header.sender, h, garbage);
  });
  try {
    client.pay_step(leases[0].id, 1, 5s);
    ADD_FAILURE() << "a malformed acknowledgement was taken";
  } catch (const PeerLostError& e) {
    EXPECT_NE(std::string(e.what()).find(fake.public_key().fingerprint()), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("malformed voucher acknowledgement"), std::string::npos) << e.what();
  } catch (const Error& e) {
    ADD_FAILURE() << "not reported as the provider's loss: " << e.what();
  }
  answer.join();
  EXPECT_EQ(client.spend().total, 100u);  // signed and sent: the provider may hold it
  Lease closed = client.release(leases[0].id, CloseReason::ProviderFailed);
  EXPECT_EQ(closed.paid, 100u);
}
