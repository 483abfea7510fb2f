// meshtrain-provider end to end, every process real: a meshtrain-market (SQLite ledger) and
// meshtrain-provider daemons on loopback. The renter here speaks the wire protocol itself
// (DevnetBackend for the market, a ControlClient for the provider's voucher endpoint), so it can
// also send the vouchers a well-behaved client never would.
#include <gtest/gtest.h>
#include <signal.h>

#include <fstream>
#include <sstream>
#include <thread>

#include "market/daemons.h"
#include "market/protocol.h"
#include "meshtrain/market.h"
#include "meshtrain/net.h"

using namespace meshtrain;
using namespace meshtrain::market;
using namespace std::chrono_literals;
using test_support::ChildProcess;
using test_support::DaemonEndpoint;
using test_support::TempDir;

namespace {

constexpr Amount kPrice = 10;
constexpr Amount kMinted = 1'000'000;
constexpr Amount kEscrow = 1'000;
const char* const kGpuModel = "L4-24GB";

template <typename F>
bool eventually(F&& done, std::chrono::milliseconds timeout = 15s) {
  auto until = std::chrono::steady_clock::now() + timeout;
  while (std::chrono::steady_clock::now() < until) {
    if (done()) return true;
    std::this_thread::sleep_for(50ms);
  }
  return done();
}

// One provider daemon: a config file (GPU declared, as this machine has none) plus flags; a
// fixed port so a restart on the same database is reachable at the lease's endpoint.
class ProviderProcess {
 public:
  ProviderProcess(const std::filesystem::path& dir, const DaemonEndpoint& market, std::chrono::milliseconds redeem,
                  std::chrono::milliseconds unpaid_grace)
      : dir_(dir), bind_(fmt::format("tcp://127.0.0.1:{}", test_support::free_port())) {
    std::ofstream(dir_ / "provider.json")
        << fmt::format(R"({{"market_endpoint": "{}", "market_key": "{}", "key_file": "provider.pem",
  "bind": "{}", "db": "provider.db", "price_per_step": {}, "region": "test-region", "latency_hint_ms": 7,
  "redeem_interval_ms": {}, "unpaid_grace_ms": {}, "worker_stop_grace_ms": 1000,
  "worker_command": "printf '%s %s %s %s' \"$MESHTRAIN_LEASE_ID\" $$ \"$MESHTRAIN_COORDINATOR\" \"$MESHTRAIN_JOIN_TOKEN\" > \"{}/worker-$MESHTRAIN_LEASE_ID.tmp\" && mv \"{}/worker-$MESHTRAIN_LEASE_ID.tmp\" \"{}/worker-$MESHTRAIN_LEASE_ID.txt\" && exec sleep 600",
  "gpu": {{"model": "{}", "count": 2, "vram_gib": 24, "cuda_capability": "8.9"}}}})",
                       market.endpoint, market.key.hex(), bind_, kPrice, redeem.count(), unpaid_grace.count(),
                       dir_.string(), dir_.string(), dir_.string(), kGpuModel);
  }

  DaemonEndpoint start(std::vector<std::string> extra_flags = {}) {
    std::filesystem::remove(dir_ / "provider.endpoint");
    std::vector<std::string> argv{MESHTRAIN_PROVIDER_BINARY, "--config", (dir_ / "provider.json").string(),
                                  "--trust-config", "--status-json", "--print-endpoint-file",
                                  (dir_ / "provider.endpoint").string()};
    argv.insert(argv.end(), extra_flags.begin(), extra_flags.end());
    process_ = std::make_unique<ChildProcess>(argv, (dir_ / fmt::format("provider-{}.log", ++starts_)).string());
    return test_support::wait_endpoint(dir_ / "provider.endpoint", *process_, "meshtrain-provider");
  }
  ChildProcess& process() { return *process_; }

 private:
  std::filesystem::path dir_;
  std::string bind_;
  int starts_ = 0;
  std::unique_ptr<ChildProcess> process_;
};

// The renter: an account at the market and a control connection to the provider's daemon.
class Renter {
 public:
  Renter(const DaemonEndpoint& market)
      : id_(crypto::Identity::generate()), market_(connect_devnet(id_, market.key, market.endpoint)) {
    market_->mint(id_.public_key(), kMinted);
  }

  MarketBackend& market() { return *market_; }
  const AccountId& key() const { return id_.public_key(); }

  // Orders one lease of the test GPU, waits for the provider's automatic bid and accepts it.
  Lease rent() {
    OrderSpec spec;
    spec.filter.gpu_model = kGpuModel;
    spec.max_price_per_step = 2 * kPrice;
    spec.escrow_per_lease = kEscrow;
    Id order = market_->order(spec);
    std::vector<Bid> bids;
    if (!eventually([&] { return !(bids = market_->bids(order)).empty(); }))
      throw std::runtime_error("the provider placed no bid");
    if (bids[0].price_per_step != kPrice) throw std::runtime_error("the bid is not at the provider's price");
    return market_->accept(bids[0].id);
  }

  void connect(const DaemonEndpoint& provider, const Lease& lease) {
    provider_ = std::make_unique<net::ControlClient>(id_, provider.key, lease.endpoint);
  }

  protocol::JobAttachAck attach(Id lease) {
    protocol::JobAttach a{lease, "tcp://127.0.0.1:7400", crypto::Identity::generate().public_key(), "join-token-1"};
    auto reply = exchange(protocol::MessageType::JobAttach, protocol::encode(a), protocol::MessageType::JobAttachAck);
    return protocol::decode_job_attach_ack(reply.payload, "provider");
  }

  Voucher voucher(Id lease, uint64_t step, Amount amount = 0) {
    return Voucher::sign(id_, lease, step, amount ? amount : step * kPrice, ++nonce_);
  }
  protocol::VoucherAck send(const Voucher& v) {
    auto reply =
        exchange(protocol::MessageType::VoucherDelivery, protocol::encode(v), protocol::MessageType::VoucherAck);
    return protocol::decode_voucher_ack(reply.payload, "provider");
  }
  protocol::VoucherAck pay(Id lease, uint64_t step) { return send(voucher(lease, step)); }

 private:
  net::Message exchange(protocol::MessageType type, const std::vector<uint8_t>& payload,
                        protocol::MessageType reply_type) {
    net::MessageHeader h;
    h.type = static_cast<uint16_t>(type);
    h.op_seq = ++request_;
    provider_->send(h, payload);
    Deadline deadline = Deadline::after(10s);
    while (true) {
      net::Message m = provider_->recv(deadline);
      if (m.header.type == static_cast<uint16_t>(reply_type) && m.header.op_seq == h.op_seq) return m;
    }
  }

  crypto::Identity id_;
  std::unique_ptr<MarketBackend> market_;
  std::unique_ptr<net::ControlClient> provider_;
  uint64_t nonce_ = 0;
  uint64_t request_ = 0;
};

struct WorkerInfo {
  Id lease = 0;
  pid_t pid = 0;
  std::string coordinator, token;
};

std::optional<WorkerInfo> read_worker(const std::filesystem::path& dir, Id lease) {
  std::ifstream in(dir / fmt::format("worker-{}.txt", lease));
  WorkerInfo w;
  if (!(in >> w.lease >> w.pid >> w.coordinator >> w.token)) return std::nullopt;
  return w;
}

bool process_gone(pid_t pid) { return ::kill(pid, 0) != 0 && errno == ESRCH; }

// A market, one provider (redeeming every `redeem`, closing after `unpaid_grace` without a
// voucher) and a renter with funds.
class ProviderDaemon : public ::testing::Test {
 protected:
  void start(std::chrono::milliseconds redeem, std::chrono::milliseconds unpaid_grace) {
    market = std::make_unique<test_support::MarketProcess>(MESHTRAIN_MARKET_BINARY, dir.path());
    provider = std::make_unique<ProviderProcess>(dir.path(), market->endpoint(), redeem, unpaid_grace);
    p = provider->start();
    renter = std::make_unique<Renter>(market->endpoint());
  }

  // Rents the provider's GPUs, attaches a job and waits for its worker.
  Lease rent_and_attach(std::optional<WorkerInfo>& worker) {
    Lease lease = renter->rent();
    renter->connect(p, lease);
    auto attached = renter->attach(lease.id);
    EXPECT_TRUE(attached.accepted) << attached.reason << logs();
    EXPECT_TRUE(eventually([&] { return (worker = read_worker(dir.path(), lease.id)).has_value(); })) << logs();
    return lease;
  }

  std::string logs() const { return test_support::daemon_logs(dir.path()); }

  TempDir dir;
  std::unique_ptr<test_support::MarketProcess> market;
  std::unique_ptr<ProviderProcess> provider;
  DaemonEndpoint p;
  std::unique_ptr<Renter> renter;
};

}  // namespace

// Offer, automatic bid, attach, ten vouchers; the provider is SIGKILLed holding unredeemed
// vouchers and restarted on its database: it redeems exactly what it was paid, then more.
TEST_F(ProviderDaemon, OffersBidsStoresAndRedeemsAcrossASigkill) {
  // Redeeming only every ten minutes: whatever is paid before the SIGKILL stays in its store.
  start(600s, 60s);
  OfferFilter filter;
  filter.gpu_model = kGpuModel;
  OfferPage page;
  ASSERT_TRUE(eventually([&] { return !(page = renter->market().discover(filter)).offers.empty(); })) << logs();
  ASSERT_EQ(page.offers.size(), 1u);
  const Offer& offer = page.offers[0];
  EXPECT_EQ(offer.provider, p.key);
  EXPECT_EQ(offer.spec.gpu.model, kGpuModel);
  EXPECT_EQ(offer.spec.gpu.count, 2u);
  EXPECT_EQ(offer.spec.gpu.vram_gib, 24u);
  EXPECT_EQ(offer.spec.gpu.cuda_capability, "8.9");
  EXPECT_EQ(offer.spec.price_per_step, kPrice);
  EXPECT_EQ(offer.spec.region, "test-region");
  EXPECT_EQ(offer.spec.latency_hint_ms, 7u);
  EXPECT_EQ(offer.spec.endpoint, p.endpoint);
  EXPECT_NO_THROW(offer.spec.hardware.verify(p.key));
  EXPECT_NE(offer.spec.hardware.text.find("\"source\":\"config\""), std::string::npos) << offer.spec.hardware.text;
  filter.min_vram_gib = 40;
  EXPECT_TRUE(renter->market().discover(filter).offers.empty());

  std::optional<WorkerInfo> worker;
  Lease lease = rent_and_attach(worker);
  EXPECT_EQ(lease.provider, p.key);
  EXPECT_EQ(lease.price_per_step, kPrice);
  EXPECT_EQ(lease.endpoint, p.endpoint);
  ASSERT_TRUE(worker);
  EXPECT_EQ(worker->lease, lease.id);
  EXPECT_EQ(worker->coordinator, "tcp://127.0.0.1:7400");
  EXPECT_EQ(worker->token, "join-token-1");

  for (uint64_t step = 1; step <= 10; ++step) {
    auto ack = renter->pay(lease.id, step);
    ASSERT_TRUE(ack.accepted) << "step " << step << ": " << ack.reason;
    EXPECT_EQ(ack.latest_step, step);
    EXPECT_EQ(ack.latest_amount, step * kPrice);
  }
  // What a provider must refuse: a replay, a wrong amount, a voucher over the escrow.
  EXPECT_EQ(renter->pay(lease.id, 10).reason, "stale_voucher");
  EXPECT_EQ(renter->send(renter->voucher(lease.id, 11, 11 * kPrice + 1)).reason, "wrong_increment");
  EXPECT_EQ(renter->pay(lease.id, kEscrow / kPrice + 1).reason, "over_escrow");
  EXPECT_EQ(renter->market().lease(lease.id).paid, 0u);  // nothing redeemed yet

  provider->process().signal(SIGKILL);
  provider->process().wait(5s);
  // The worker dies with its daemon.
  EXPECT_TRUE(eventually([&] { return process_gone(worker->pid); })) << "worker " << worker->pid;

  // Back on the same database, redeeming every 300 ms: it still holds step 10 and redeems it.
  p = provider->start({"--redeem-interval-ms", "300"});
  ASSERT_TRUE(eventually([&] { return renter->market().lease(lease.id).paid == 10 * kPrice; }))
      << logs();
  auto replay = renter->pay(lease.id, 10);
  EXPECT_EQ(replay.reason, "stale_voucher");
  EXPECT_EQ(replay.latest_step, 10u);
  EXPECT_EQ(replay.latest_amount, 10 * kPrice);
  EXPECT_EQ(renter->market().account(p.key).earned, 10 * kPrice);
  EXPECT_EQ(renter->market().account(renter->key()).spent, 10 * kPrice);

  // The lease goes on: a new worker, five more steps.
  ASSERT_TRUE(renter->attach(lease.id).accepted);
  ASSERT_TRUE(eventually([&] {
    auto w = read_worker(dir.path(), lease.id);
    return w && w->pid != worker->pid && (worker = w);
  }));
  for (uint64_t step = 11; step <= 15; ++step) ASSERT_TRUE(renter->pay(lease.id, step).accepted) << step;
  ASSERT_TRUE(eventually([&] { return renter->market().lease(lease.id).paid == 15 * kPrice; }))
      << logs();

  // The renter closes; the provider stops the worker.
  Lease closed = renter->market().close(lease.id, CloseReason::RenterDone, renter->voucher(lease.id, 15));
  EXPECT_EQ(closed.state, LeaseState::Closed);
  EXPECT_TRUE(eventually([&] { return process_gone(worker->pid); })) << logs();
  EXPECT_EQ(renter->pay(lease.id, 16).reason, "lease_closed");

  // Balances reconcile exactly.
  Account r = renter->market().account(renter->key());
  Account prov = renter->market().account(p.key);
  EXPECT_EQ(r.spent, 15 * kPrice);
  EXPECT_EQ(prov.earned, 15 * kPrice);
  EXPECT_EQ(r.escrowed, 0u);
  EXPECT_EQ(r.balance, kMinted - 15 * kPrice);
  EXPECT_EQ(renter->market().lease(lease.id).paid, 15 * kPrice);
}

// A renter that stops paying: after the grace the provider closes the lease with the latest
// voucher settled and stops the worker; the unspent escrow goes back to the renter->
TEST_F(ProviderDaemon, ClosesTheLeaseOfARenterWhoStopsPaying) {
  start(600s, 4000ms);
  std::optional<WorkerInfo> worker;
  Lease lease = rent_and_attach(worker);
  ASSERT_TRUE(worker);
  for (uint64_t step = 1; step <= 3; ++step) ASSERT_TRUE(renter->pay(lease.id, step).accepted);

  // No more vouchers.
  Lease after;
  ASSERT_TRUE(eventually([&] { return (after = renter->market().lease(lease.id)).state == LeaseState::Closed; }))
      << logs();
  EXPECT_EQ(after.close_reason, CloseReason::ProviderDone);
  EXPECT_EQ(after.paid, 3 * kPrice);
  EXPECT_EQ(after.paid_step, 3u);
  EXPECT_TRUE(eventually([&] { return process_gone(worker->pid); })) << logs();
  EXPECT_EQ(renter->pay(lease.id, 4).reason, "lease_closed");
  Account r = renter->market().account(renter->key());
  EXPECT_EQ(r.spent, 3 * kPrice);
  EXPECT_EQ(r.escrowed, 0u);
  EXPECT_EQ(r.balance, kMinted - 3 * kPrice);
  EXPECT_EQ(renter->market().account(p.key).earned, 3 * kPrice);
  EXPECT_EQ(renter->market().reputation(p.key).leases_clean, 1u);
}

// The market dies mid-lease: the provider keeps accepting and storing vouchers, and redeems them
// once the market is back on the same database.
TEST_F(ProviderDaemon, KeepsAcceptingVouchersWhileTheMarketIsDown) {
  start(300ms, 60s);
  Lease lease = renter->rent();
  renter->connect(p, lease);
  for (uint64_t step = 1; step <= 2; ++step) ASSERT_TRUE(renter->pay(lease.id, step).accepted);
  ASSERT_TRUE(eventually([&] { return renter->market().lease(lease.id).paid == 2 * kPrice; }));

  market->kill();
  // Wait until the provider has noticed (its status line says so), then pay on.
  auto provider_log = [&] {
    std::ifstream in(dir / "provider-1.log");
    return std::string((std::istreambuf_iterator<char>(in)), {});
  };
  ASSERT_TRUE(eventually([&] { return provider_log().find("\"market_up\":false") != std::string::npos; }, 30s))
      << logs();
  for (uint64_t step = 3; step <= 8; ++step) {
    auto ack = renter->pay(lease.id, step);
    ASSERT_TRUE(ack.accepted) << "step " << step << " while the market is down: " << ack.reason
                              << logs();
  }
  market->start();
  ASSERT_TRUE(eventually([&] { return renter->market().lease(lease.id).paid == 8 * kPrice; }, 40s))
      << logs();
  EXPECT_EQ(renter->market().account(p.key).earned, 8 * kPrice);
}

// Configuration mistakes stop the daemon at once with exit code 2 and a message naming them.
TEST_F(ProviderDaemon, RefusesAnUnusableConfiguration) {
  std::ofstream(dir / "bad.json") << R"({"price_per_step": 5, "colour": "blue"})";
  ChildProcess bad({MESHTRAIN_PROVIDER_BINARY, "--config", (dir / "bad.json").string()},
                   (dir / "bad.log").string());
  EXPECT_EQ(bad.wait(20s), 2);
  ChildProcess no_market({MESHTRAIN_PROVIDER_BINARY, "--gpu", "L4:1:24:8.9", "--price-per-step", "5"},
                         (dir / "no-market.log").string());
  EXPECT_EQ(no_market.wait(20s), 2);
  std::string output = logs();
  EXPECT_NE(output.find("colour"), std::string::npos) << output;
  EXPECT_NE(output.find("market endpoint is required"), std::string::npos) << output;
}
