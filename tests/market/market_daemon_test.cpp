// The real meshtrain-market process: SIGKILLed in the middle of a burst of redemptions and
// restarted on the same database, the client's resent request (same nonce, same bytes) is
// answered from the stored reply and nothing is paid twice or lost; malformed and oversized
// input is answered or dropped without harm; start-up, key creation and a clean stop.
#include <gtest/gtest.h>
#include <sqlite3.h>
#include <sys/stat.h>

#include <filesystem>
#include <fstream>
#include <thread>

#include "market/ledger.h"
#include "market/protocol.h"
#include "market/server.h"
#include "support/child_process.h"
#include "support/temp_dir.h"

using namespace meshtrain;
using namespace meshtrain::market;
using namespace std::chrono_literals;
namespace proto = meshtrain::market::protocol;
namespace fs = std::filesystem;
using meshtrain::test_support::ChildProcess;
using meshtrain::test_support::TempDir;

namespace {

struct Endpoint {
  std::string endpoint;
  AccountId key;
};

// meshtrain-market on a free loopback port; restartable on the same database and key.
class MarketProcess {
 public:
  explicit MarketProcess(const TempDir& dir, std::vector<std::string> extra_args = {})
      : dir_(dir), extra_args_(std::move(extra_args)) {
    start();
  }

  void start() {
    fs::remove(dir_ / "market.endpoint");
    std::vector<std::string> argv{MESHTRAIN_MARKET_BINARY,
                                  "--db",
                                  (dir_ / "market.db").string(),
                                  "--key",
                                  (dir_ / "market.pem").string(),
                                  "--bind",
                                  "tcp://127.0.0.1:0",
                                  "--faucet-limit",
                                  "1000000000",
                                  "--print-endpoint-file",
                                  (dir_ / "market.endpoint").string(),
                                  "--status-json"};
    argv.insert(argv.end(), extra_args_.begin(), extra_args_.end());
    child_ = std::make_unique<ChildProcess>(argv);
    auto until = std::chrono::steady_clock::now() + 20s;
    while (std::chrono::steady_clock::now() < until) {
      std::ifstream in(dir_ / "market.endpoint");
      std::string endpoint, key;
      if (in >> endpoint >> key && key.size() == 64) {
        endpoint_ = {endpoint, AccountId::from_hex(key, "market endpoint file")};
        return;
      }
      if (child_->wait(0ms)) throw std::runtime_error("meshtrain-market exited before printing its endpoint");
      std::this_thread::sleep_for(10ms);
    }
    throw std::runtime_error("meshtrain-market printed no endpoint within 20 s");
  }

  void kill() {
    child_->signal(SIGKILL);
    child_->wait(10s);
  }

  ChildProcess& child() { return *child_; }
  const Endpoint& endpoint() const { return endpoint_; }
  fs::path db() const { return dir_ / "market.db"; }

 private:
  const TempDir& dir_;
  std::vector<std::string> extra_args_;
  std::unique_ptr<ChildProcess> child_;
  Endpoint endpoint_;
};

// A raw control connection: sends exactly the bytes it is given.
class Connection {
 public:
  Connection(const crypto::Identity& self, const Endpoint& market)
      : self_(self), client_(self, market.key, market.endpoint) {}

  std::optional<proto::Reply> send(crypto::ByteSpan payload, std::chrono::milliseconds timeout,
                                   proto::MessageType type = proto::MessageType::Request) {
    net::MessageHeader header;
    header.type = static_cast<uint16_t>(type);
    header.op_seq = ++op_seq_;
    client_.send(header, payload);
    return await(header.op_seq, timeout);
  }

  std::optional<proto::Reply> await(uint64_t op_seq, std::chrono::milliseconds timeout) {
    auto deadline = Deadline::after(timeout);
    for (;;) {
      net::Message m;
      try {
        m = client_.recv(deadline);
      } catch (const TimeoutError&) {
        return std::nullopt;
      }
      if (m.header.type == static_cast<uint16_t>(proto::MessageType::Reply) && m.header.op_seq == op_seq)
        return proto::decode_reply(m.payload, "meshtrain-market");
    }
  }

  std::vector<uint8_t> encode(proto::Body body) {
    proto::Request r{self_.public_key(), ++nonce_, std::move(body)};
    return proto::encode_signed(r, self_);
  }

  template <typename T>
  T call(proto::Body body) {
    auto reply = send(encode(std::move(body)), 10s);
    if (!reply) throw std::runtime_error("meshtrain-market did not answer within 10 s");
    if (!reply->ok) throw std::runtime_error("refused: " + reply->reason + ": " + reply->message);
    return std::get<T>(reply->body);
  }

  uint64_t nonce() const { return nonce_; }
  void set_nonce(uint64_t nonce) { nonce_ = nonce; }

 private:
  const crypto::Identity& self_;
  net::ControlClient client_;
  uint64_t op_seq_ = 0;
  uint64_t nonce_ = 0;
};

int64_t query_int(const fs::path& db, const std::string& sql) {
  sqlite3* handle = nullptr;
  if (sqlite3_open_v2(db.c_str(), &handle, SQLITE_OPEN_READONLY, nullptr) != SQLITE_OK)
    throw std::runtime_error("cannot open " + db.string());
  sqlite3_stmt* st = nullptr;
  int64_t out = -1;
  if (sqlite3_prepare_v2(handle, sql.c_str(), -1, &st, nullptr) == SQLITE_OK && sqlite3_step(st) == SQLITE_ROW)
    out = sqlite3_column_int64(st, 0);
  sqlite3_finalize(st);
  sqlite3_close(handle);
  return out;
}

}  // namespace

TEST(MarketDaemon, SigkillDuringRedemptionsNeitherPaysTwiceNorLosesAPayment) {
  TempDir dir;
  MarketProcess market(dir);
  auto renter = crypto::Identity::generate();
  auto provider = crypto::Identity::generate();
  constexpr Amount kPrice = 10;
  Id lease_id = 0;
  uint64_t provider_nonce = 0, renter_nonce = 0;
  {
    Connection r(renter, market.endpoint());
    Connection p(provider, market.endpoint());
    r.call<Account>(proto::Mint{renter.public_key(), 1'000'000});
    p.call<std::monostate>(proto::Heartbeat{});
    OfferSpec offer{{"L4-24GB", 1, 24, "8.9"},           kPrice, 0, "test", "tcp://127.0.0.1:9", 3,
                    HardwareReport::sign(provider, "{}")};
    Id offer_id = p.call<Id>(offer);
    Id order_id = r.call<Id>(proto::PlaceOrder{OrderSpec{{}, 1, kPrice, 100'000, 3600}});
    Id bid_id = p.call<Id>(proto::PlaceBid{order_id, offer_id, kPrice});
    lease_id = r.call<Lease>(proto::Accept{bid_id}).id;
    provider_nonce = p.nonce();
    renter_nonce = r.nonce();
  }

  // Kill points: right after sending (the request may or may not have committed), shortly
  // after, and long after (committed for sure: checked in the database before resending).
  struct Kill {
    uint64_t step;
    std::chrono::milliseconds delay;
  };
  const std::vector<Kill> kills = {{40, 0ms}, {90, 2ms}, {140, 300ms}, {190, 0ms}};
  constexpr uint64_t kSteps = 240;
  auto p = std::make_unique<Connection>(provider, market.endpoint());
  p->set_nonce(provider_nonce);
  size_t next_kill = 0;
  int stored_replies_checked = 0;
  for (uint64_t step = 1; step <= kSteps; ++step) {
    Voucher v = Voucher::sign(renter, lease_id, step, step * kPrice, 7'000 + step);
    std::vector<uint8_t> bytes = p->encode(proto::Redeem{v});
    std::optional<proto::Reply> reply;
    if (next_kill < kills.size() && kills[next_kill].step == step) {
      p->send(bytes, 0ms);  // sent; its reply (if any) is never read
      std::this_thread::sleep_for(kills[next_kill].delay);
      market.kill();
      bool committed = query_int(market.db(), fmt::format("SELECT paid_step FROM leases WHERE id = {}", lease_id)) ==
                       static_cast<int64_t>(step);
      int64_t redeem_events = query_int(market.db(), "SELECT count(*) FROM events WHERE kind = 'redeem'");
      EXPECT_EQ(redeem_events, static_cast<int64_t>(committed ? step : step - 1));
      if (kills[next_kill].delay >= 300ms) EXPECT_TRUE(committed) << "step " << step;
      std::cerr << "SIGKILL after sending step " << step << " (+" << kills[next_kill].delay.count()
                << " ms): " << (committed ? "committed before the kill" : "not committed") << "\n";
      market.start();
      uint64_t nonce = p->nonce();
      p = std::make_unique<Connection>(provider, market.endpoint());
      p->set_nonce(nonce);
      reply = p->send(bytes, 10s);  // the very same bytes: same nonce, same signature
      if (committed) {
        ++stored_replies_checked;
        EXPECT_EQ(query_int(market.db(), "SELECT count(*) FROM events WHERE kind = 'redeem'"), redeem_events)
            << "the resent request was applied again";
      }
      ++next_kill;
    } else {
      reply = p->send(bytes, 10s);
    }
    ASSERT_TRUE(reply.has_value()) << "no reply for step " << step;
    ASSERT_TRUE(reply->ok) << "step " << step << ": " << reply->reason << ": " << reply->message;
    const auto& result = std::get<RedeemResult>(reply->body);
    EXPECT_EQ(result.paid_now, kPrice) << "step " << step;
    EXPECT_EQ(result.lease.paid, step * kPrice);
    EXPECT_EQ(result.lease.paid_step, step);
  }
  EXPECT_GE(stored_replies_checked, 1);

  Connection r(renter, market.endpoint());
  r.set_nonce(renter_nonce);
  Lease closed = r.call<Lease>(proto::Close{lease_id, CloseReason::RenterDone, std::nullopt});
  EXPECT_EQ(closed.paid, kSteps * kPrice);
  Account provider_account = r.call<Account>(proto::AccountQuery{provider.public_key()});
  Account renter_account = r.call<Account>(proto::AccountQuery{renter.public_key()});
  EXPECT_EQ(provider_account.earned, kSteps * kPrice);
  EXPECT_EQ(provider_account.balance, kSteps * kPrice);
  EXPECT_EQ(renter_account.spent, kSteps * kPrice);
  EXPECT_EQ(renter_account.balance, 1'000'000 - kSteps * kPrice);
  EXPECT_EQ(renter_account.escrowed, 0u);

  market.child().signal(SIGTERM);
  EXPECT_EQ(market.child().wait(10s), std::optional<int>(0));
  Ledger ledger(market.db());
  AuditReport audit = ledger.audit();
  EXPECT_TRUE(audit.ok()) << fmt::format("{}", fmt::join(audit.problems, "; "));
  EXPECT_EQ(query_int(market.db(), "SELECT count(*) FROM events WHERE kind = 'redeem'"), static_cast<int64_t>(kSteps));
  EXPECT_EQ(query_int(market.db(), "SELECT step FROM redeemed_vouchers"), static_cast<int64_t>(kSteps));
}

TEST(MarketDaemon, MalformedAndOversizedRequestsAreHarmless) {
  TempDir dir;
  MarketProcess market(dir);
  auto alice = crypto::Identity::generate();
  auto bob = crypto::Identity::generate();
  Connection a(alice, market.endpoint());
  a.call<Account>(proto::Mint{alice.public_key(), 500});

  auto expect_error = [&](std::optional<proto::Reply> reply, ErrorCode code, const char* what) {
    ASSERT_TRUE(reply.has_value()) << what << ": no reply";
    EXPECT_FALSE(reply->ok) << what;
    EXPECT_EQ(reply->code, code) << what << ": " << reply->message;
    EXPECT_FALSE(reply->message.empty()) << what;
  };
  std::vector<uint8_t> garbage(300);
  for (size_t i = 0; i < garbage.size(); ++i) garbage[i] = static_cast<uint8_t>(i * 37 + 11);
  expect_error(a.send(garbage, 10s), ErrorCode::Protocol, "garbage");
  expect_error(a.send({}, 10s), ErrorCode::Protocol, "empty payload");

  std::vector<uint8_t> good = a.encode(proto::Mint{alice.public_key(), 1});
  std::vector<uint8_t> truncated(good.begin(), good.begin() + static_cast<long>(good.size() / 2));
  expect_error(a.send(truncated, 10s), ErrorCode::Protocol, "truncated");
  std::vector<uint8_t> flipped = good;
  flipped[flipped.size() - 5] ^= 0x40;  // inside the signature
  auto reply = a.send(flipped, 10s);
  ASSERT_TRUE(reply.has_value());
  EXPECT_FALSE(reply->ok);

  std::vector<uint8_t> big(proto::kMaxRequestBytes + 4096, 0x5a);
  expect_error(a.send(big, 10s), ErrorCode::Protocol, "oversized");
  // Beyond what the transport accepts at all: dropped without a reply.
  std::vector<uint8_t> huge(proto::kMaxReplyBytes + 1024, 0x5a);
  EXPECT_FALSE(a.send(huge, 1500ms).has_value());
  // Not a market request: dropped.
  EXPECT_FALSE(a.send(good, 1500ms, proto::MessageType::VoucherAck).has_value());

  // Bob's signed request sent over Alice's connection: refused, Bob's account untouched.
  {
    proto::Request foreign{bob.public_key(), 1, proto::Mint{bob.public_key(), 100}};
    expect_error(a.send(proto::encode_signed(foreign, bob), 10s), ErrorCode::Auth, "foreign account");
  }

  // Still serving, nothing applied by any of the above; the pending good request applies once.
  EXPECT_EQ(a.call<Account>(proto::AccountQuery{bob.public_key()}).balance, 0u);
  auto applied = a.send(good, 10s);
  ASSERT_TRUE(applied && applied->ok) << (applied ? applied->message : "no reply");
  EXPECT_EQ(a.call<Account>(proto::AccountQuery{alice.public_key()}).balance, 501u);
  EXPECT_FALSE(market.child().wait(0ms).has_value()) << "the market died";
  market.child().signal(SIGTERM);
  EXPECT_EQ(market.child().wait(10s), std::optional<int>(0));
  EXPECT_TRUE(Ledger(market.db()).audit().ok());
}

TEST(MarketDaemon, CreatesItsKeyKeepsStateAcrossRestartsAndRefusesBadFlags) {
  TempDir dir;
  {
    MarketProcess market(dir);
    fs::path key = dir / "market.pem";
    ASSERT_TRUE(fs::exists(key));
    EXPECT_EQ(fs::status(key).permissions() & (fs::perms::group_all | fs::perms::others_all), fs::perms::none);
    EXPECT_EQ(crypto::Identity::load_pem(key).public_key(), market.endpoint().key);
    EXPECT_EQ(market.endpoint().endpoint.rfind("tcp://127.0.0.1:", 0), 0u);
    auto alice = crypto::Identity::generate();
    {
      Connection a(alice, market.endpoint());
      a.call<Account>(proto::Mint{alice.public_key(), 1234});
    }
    market.child().signal(SIGTERM);
    ASSERT_EQ(market.child().wait(10s), std::optional<int>(0));
    market.start();
    Connection a(alice, market.endpoint());
    EXPECT_EQ(a.call<Account>(proto::AccountQuery{alice.public_key()}).balance, 1234u);
  }
  auto run = [&](std::vector<std::string> args) {
    args.insert(args.begin(), MESHTRAIN_MARKET_BINARY);
    ChildProcess child(args);
    return child.wait(10s);
  };
  EXPECT_EQ(run({"--key", (dir / "k.pem").string()}), std::optional<int>(2));
  EXPECT_EQ(run({"--db", (dir / "x.db").string(), "--key", (dir / "k.pem").string(), "--bind", "127.0.0.1:1"}),
            std::optional<int>(2));
  EXPECT_EQ(run({"--db", (dir / "x.db").string(), "--key", (dir / "k.pem").string(), "--faucet-limit", "-1"}),
            std::optional<int>(2));
  EXPECT_EQ(run({"--help"}), std::optional<int>(0));
}

TEST(MarketDaemon, ThePeriodicSweepExpiresLeasesWithoutAnyRequest) {
  TempDir dir;
  MarketProcess market(dir, {"--sweep-interval-ms", "100"});
  auto renter = crypto::Identity::generate();
  auto provider = crypto::Identity::generate();
  Connection r(renter, market.endpoint());
  Connection p(provider, market.endpoint());
  r.call<Account>(proto::Mint{renter.public_key(), 1'000});
  p.call<std::monostate>(proto::Heartbeat{});
  Id offer_id = p.call<Id>(
      OfferSpec{{"L4-24GB", 1, 24, "8.9"}, 5, 0, "test", "tcp://127.0.0.1:9", 3, HardwareReport::sign(provider, "{}")});
  Id order_id = r.call<Id>(proto::PlaceOrder{OrderSpec{{}, 1, 5, 400, /*lease_duration_s=*/1}});
  Id bid_id = p.call<Id>(proto::PlaceBid{order_id, offer_id, 5});
  Lease lease = r.call<Lease>(proto::Accept{bid_id});
  p.call<RedeemResult>(proto::Redeem{Voucher::sign(renter, lease.id, 4, 20, 1)});

  // No request from here on: only the sweep can close the lease.
  std::string sql = fmt::format("SELECT close_reason FROM leases WHERE id = {}", lease.id);
  auto until = std::chrono::steady_clock::now() + 10s;
  while (query_int(market.db(), sql) != static_cast<int64_t>(CloseReason::Expired) &&
         std::chrono::steady_clock::now() < until)
    std::this_thread::sleep_for(50ms);
  EXPECT_EQ(query_int(market.db(), sql), static_cast<int64_t>(CloseReason::Expired));
  EXPECT_EQ(
      query_int(market.db(), fmt::format("SELECT balance FROM accounts WHERE key = x'{}'", renter.public_key().hex())),
      1'000 - 20);
  EXPECT_EQ(
      query_int(market.db(), fmt::format("SELECT escrowed FROM accounts WHERE key = x'{}'", renter.public_key().hex())),
      0);
  EXPECT_EQ(query_int(market.db(), "SELECT count(*) FROM events WHERE kind = 'expire'"), 1);
}

TEST(MarketDaemon, APageOverTheReplyLimitIsRefusedNotSent) {
  TempDir dir;
  {
    // 500 offers whose texts are all at the 4096-byte limit: ~10 MB for one page of all.
    Ledger ledger(dir / "market.db");
    auto provider = crypto::Identity::generate();
    std::string text(proto::kMaxTextBytes, 'x');
    for (uint64_t i = 1; i <= 500; ++i) {
      OfferSpec s{{text, 1, 24, text}, 5, 0, text, text, 3, HardwareReport::sign(provider, text)};
      ASSERT_TRUE(ledger.execute(proto::Request{provider.public_key(), i, s}, wall_clock_ms()).ok);
    }
  }
  MarketProcess market(dir);
  auto renter = crypto::Identity::generate();
  Connection r(renter, market.endpoint());
  OfferFilter filter;
  filter.alive_only = false;
  filter.limit = 1000;
  auto reply = r.send(r.encode(proto::Discover{filter}), 20s);
  ASSERT_TRUE(reply.has_value());
  EXPECT_FALSE(reply->ok);
  EXPECT_EQ(reply->reason, "reply_too_large") << reply->message;
  filter.limit = 100;
  EXPECT_EQ(r.call<OfferPage>(proto::Discover{filter}).offers.size(), 100u);
}
