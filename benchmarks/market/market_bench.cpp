// market_bench: the devnet market under load, over the real meshtrain-market daemon.
//
//  * discovery: OfferFilter queries against 10,000 offers (several filters, sorts, a deep page),
//    each timed client-side through DevnetBackend (sign, send, ledger query, reply, decode);
//    the baseline is an account query (the smallest round trip) interleaved with them.
//  * redeem: voucher signed by the renter, redeemed by the provider (signature check, rules,
//    one fsynced transaction with the stored reply); the baseline is a heartbeat (the
//    smallest fsynced state-changing request), timed in the same run.
//
// One JSON object per line on stdout; progress on stderr.
#include <signal.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>
#include <thread>

#include "core/json.h"  // lib/checkpoint: JSON lines
#include "market/ledger.h"
#include "market/server.h"
#include "meshtrain/market.h"
#include "market/daemons.h"        // tests/market: waiting for the daemon's endpoint file
#include "support/child_process.h"  // tests/support: the daemon as a child process

using namespace meshtrain;
using namespace meshtrain::market;
using namespace std::chrono_literals;
namespace fs = std::filesystem;
namespace proto = meshtrain::market::protocol;
using SteadyClock = std::chrono::steady_clock;

namespace {

const char* const kUsage = R"(usage: market_bench [options]

options:
  --offers N     offers in the market (default 10000), from N/100 providers
  --queries N    timed queries per discovery case (default 300)
  --redeems N    timed redemptions (default 2000)
  --dir DIR      where the database lives (default: a fresh directory under /var/tmp, removed after)
  --help         this text

Records:
  {"op":"populate", "offers", "seconds", "per_s"}   offers created in-process, one transaction each
  {"op":"discover","case":C, "p50_ms","p99_ms","mean_ms", "baseline_p50_ms","baseline_p99_ms",
   "ratio_p50_vs_account", "results","total"}      client-side latency over the daemon
  {"op":"redeem", "count","per_s","p50_ms","p99_ms", "baseline_per_s","ratio_vs_heartbeat"}
  {"op":"voucher_sign_verify", "per_s"}              CPU only: Voucher::sign + Voucher::verify
  {"op":"audit","ok"}                                the ledger's conservation check afterwards
)";

struct Options {
  uint64_t offers = 10'000;
  uint64_t queries = 300;
  uint64_t redeems = 2'000;
  fs::path dir;
};

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) throw InvalidArgumentError(a + " needs a value");
      return argv[++i];
    };
    if (a == "--offers")
      o.offers = std::stoull(value());
    else if (a == "--queries")
      o.queries = std::stoull(value());
    else if (a == "--redeems")
      o.redeems = std::stoull(value());
    else if (a == "--dir")
      o.dir = value();
    else if (a == "--help" || a == "-h") {
      std::fputs(kUsage, stdout);
      std::exit(0);
    } else
      throw InvalidArgumentError("unknown argument " + a);
  }
  if (o.offers < 100 || o.queries < 10 || o.redeems < 10)
    throw InvalidArgumentError("--offers >= 100, --queries >= 10, --redeems >= 10");
  return o;
}

double ms(SteadyClock::duration d) { return std::chrono::duration<double, std::milli>(d).count(); }

double percentile(std::vector<double> v, double p) {
  std::sort(v.begin(), v.end());
  size_t i = std::min(v.size() - 1, static_cast<size_t>(p * static_cast<double>(v.size() - 1) + 0.5));
  return v[i];
}

double mean(const std::vector<double>& v) {
  double s = 0;
  for (double x : v) s += x;
  return s / static_cast<double>(v.size());
}

void emit(json::Writer& w) {
  std::string line = w.take();
  std::fprintf(stdout, "%s\n", line.c_str());
  std::fflush(stdout);
}

const char* const kModels[] = {"L4-24GB", "A100-40GB", "A100-80GB", "H100-80GB", "RTX4090-24GB"};
const uint32_t kVram[] = {24, 40, 80, 80, 24};
const char* const kRegions[] = {"eu-west", "eu-central", "us-east", "us-west", "ap-south"};

}  // namespace

int main(int argc, char** argv) {
  Options opt;
  try {
    opt = parse(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "market_bench: %s\n%s", e.what(), kUsage);
    return 2;
  }
  bool own_dir = opt.dir.empty();
  if (own_dir) opt.dir = fs::path("/var/tmp") / fmt::format("meshtrain-market-bench-{}", ::getpid());
  fs::create_directories(opt.dir);
  fs::path db = opt.dir / "market.db";
  int status = 0;
  try {
    auto op = crypto::Identity::generate();
    auto renter = crypto::Identity::generate();
    auto lessor = crypto::Identity::generate();
    std::vector<crypto::Identity> providers;
    const uint64_t provider_count = std::max<uint64_t>(1, opt.offers / 100);
    for (uint64_t i = 0; i < provider_count; ++i) providers.push_back(crypto::Identity::generate());
    Id lease_id = 0;
    constexpr Amount kLeasePrice = 3;

    // --- populate, in-process ------------------------------------------------------------------
    {
      LedgerOptions lo;
      lo.operator_key = op.public_key();
      Ledger ledger(db, lo);
      std::mt19937_64 rng(42);
      std::map<AccountId, uint64_t> nonces;
      auto exec = [&](const crypto::Identity& who, proto::Body body) {
        proto::Request r{who.public_key(), ++nonces[who.public_key()], std::move(body)};
        proto::Reply reply = ledger.execute(r, wall_clock_ms());
        if (!reply.ok) throw InternalError("populate: " + reply.reason + ": " + reply.message);
        return reply;
      };
      std::fprintf(stderr, "populating %llu offers from %llu providers in %s\n",
                   static_cast<unsigned long long>(opt.offers), static_cast<unsigned long long>(provider_count),
                   db.c_str());
      auto t0 = SteadyClock::now();
      for (uint64_t i = 0; i < opt.offers; ++i) {
        const auto& p = providers[i % provider_count];
        if (i < provider_count) exec(p, proto::Heartbeat{});
        size_t m = rng() % 5;
        OfferSpec s;
        s.gpu = {kModels[m], static_cast<uint32_t>(1 + rng() % 8), kVram[m], "8.9"};
        s.price_per_step = 1 + rng() % 1000;
        s.region = kRegions[rng() % 5];
        s.endpoint = fmt::format("tcp://10.0.{}.{}:7600", (i / 250) % 250, i % 250);
        s.latency_hint_ms = static_cast<uint32_t>(1 + rng() % 200);
        s.hardware = HardwareReport::sign(p, fmt::format(R"({{"driver":"550.54","gpus":{}}})", s.gpu.count));
        exec(p, s);
      }
      double seconds = std::chrono::duration<double>(SteadyClock::now() - t0).count();
      json::Writer w(false);
      w.begin_object().key("op").value("populate").key("offers").value(opt.offers).key("seconds").value(seconds);
      w.key("per_s").value(static_cast<double>(opt.offers) / seconds).end_object();
      emit(w);

      // The lease that the redemptions pay: a separate provider, escrow for every redemption.
      exec(op, proto::Mint{renter.public_key(), 1'000'000'000'000});
      exec(lessor, proto::Heartbeat{});
      OfferSpec s{{"L4-24GB", 1, 24, "8.9"},         kLeasePrice, 0, "bench", "tcp://127.0.0.1:9", 1,
                  HardwareReport::sign(lessor, "{}")};
      Id offer = std::get<Id>(exec(lessor, s).body);
      OrderSpec order_spec{{}, 1, kLeasePrice, kLeasePrice * (opt.redeems + 10), 24 * 3600};
      order_spec.filter.alive_only = false;
      Id order = std::get<Id>(exec(renter, proto::PlaceOrder{order_spec}).body);
      Id bid = std::get<Id>(exec(lessor, proto::PlaceBid{order, offer, kLeasePrice}).body);
      lease_id = std::get<Lease>(exec(renter, proto::Accept{bid}).body).id;
    }

    // --- the daemon ----------------------------------------------------------------------------
    fs::path endpoint_file = opt.dir / "market.endpoint";
    ::setenv("MESHTRAIN_LOG", "warn", 1);
    // Through a shell only to send the daemon's output to a log instead of our stdout.
    test_support::ChildProcess daemon(
        {"/bin/sh", "-c", "exec \"$0\" \"$@\" >>" + (opt.dir / "market.log").string() + " 2>&1",
         MESHTRAIN_MARKET_BINARY, "--db", db.string(), "--key", (opt.dir / "market.pem").string(), "--bind",
         "tcp://127.0.0.1:0", "--alive-window-ms", "86400000", "--operator-key", op.public_key().hex(),
         "--print-endpoint-file", endpoint_file.string()});
    auto [endpoint, market_key] = test_support::wait_endpoint(endpoint_file, daemon, "meshtrain-market");

    // --- discovery -----------------------------------------------------------------------------
    {
      auto client = connect_devnet(renter, market_key, endpoint);
      struct Case {
        const char* name;
        OfferFilter filter;
      };
      std::vector<Case> cases;
      cases.push_back({"price_first_page", {}});
      {
        OfferFilter f;
        f.gpu_model = "H100-80GB";
        f.min_vram_gib = 80;
        f.max_price_per_step = 500;
        cases.push_back({"model_vram_price_filter", f});
      }
      {
        OfferFilter f;
        f.region = "eu-west";
        f.min_gpu_count = 4;
        f.sort = OfferSort::Latency;
        cases.push_back({"region_count_by_latency", f});
      }
      {
        OfferFilter f;
        f.sort = OfferSort::Reputation;
        cases.push_back({"by_reputation", f});
      }
      {
        OfferFilter f;
        f.limit = 1000;
        cases.push_back({"price_page_of_1000", f});
      }
      {
        OfferFilter f;
        f.page_token = opt.offers - 100;
        cases.push_back({"price_last_page", f});
      }
      for (int i = 0; i < 20; ++i) client->discover(OfferFilter{});  // warm-up
      for (const auto& c : cases) {
        std::vector<double> lat, base;
        OfferPage last;
        for (uint64_t i = 0; i < opt.queries; ++i) {
          auto t0 = SteadyClock::now();
          client->account(renter.public_key());
          auto t1 = SteadyClock::now();
          last = client->discover(c.filter);
          auto t2 = SteadyClock::now();
          base.push_back(ms(t1 - t0));
          lat.push_back(ms(t2 - t1));
        }
        json::Writer w(false);
        w.begin_object().key("op").value("discover").key("case").value(c.name).key("offers").value(opt.offers);
        w.key("queries").value(opt.queries).key("results").value(static_cast<uint64_t>(last.offers.size()));
        w.key("total")
            .value(last.total)
            .key("p50_ms")
            .value(percentile(lat, 0.5))
            .key("p99_ms")
            .value(percentile(lat, 0.99));
        w.key("mean_ms").value(mean(lat)).key("baseline").value("account_query");
        w.key("baseline_p50_ms").value(percentile(base, 0.5)).key("baseline_p99_ms").value(percentile(base, 0.99));
        w.key("ratio_p50_vs_account").value(percentile(lat, 0.5) / percentile(base, 0.5)).end_object();
        emit(w);
      }
    }

    // --- redemption ----------------------------------------------------------------------------
    {
      auto provider = connect_devnet(lessor, market_key, endpoint);
      std::vector<double> heartbeat, redeem;
      double heartbeat_s = 0, redeem_s = 0;
      // Interleaved, so both see the same disk and the same load.
      for (uint64_t step = 1; step <= opt.redeems; ++step) {
        auto t0 = SteadyClock::now();
        provider->heartbeat();
        auto t1 = SteadyClock::now();
        Voucher v = Voucher::sign(renter, lease_id, step, step * kLeasePrice, step);
        RedeemResult r = provider->redeem(v);
        auto t2 = SteadyClock::now();
        if (r.paid_now != kLeasePrice || r.lease.paid_step != step)
          throw InternalError(fmt::format("redeem {} paid {} (lease step {})", step, r.paid_now, r.lease.paid_step));
        heartbeat.push_back(ms(t1 - t0));
        redeem.push_back(ms(t2 - t1));
        heartbeat_s += std::chrono::duration<double>(t1 - t0).count();
        redeem_s += std::chrono::duration<double>(t2 - t1).count();
      }
      double per_s = static_cast<double>(opt.redeems) / redeem_s;
      double base_per_s = static_cast<double>(opt.redeems) / heartbeat_s;
      json::Writer w(false);
      w.begin_object().key("op").value("redeem").key("count").value(opt.redeems).key("per_s").value(per_s);
      w.key("p50_ms").value(percentile(redeem, 0.5)).key("p99_ms").value(percentile(redeem, 0.99));
      w.key("baseline").value("heartbeat").key("baseline_per_s").value(base_per_s);
      w.key("baseline_p50_ms").value(percentile(heartbeat, 0.5));
      w.key("ratio_vs_heartbeat").value(per_s / base_per_s).end_object();
      emit(w);
    }
    {
      // CPU only: what a voucher costs before any storage.
      const uint64_t n = 5'000;
      auto t0 = SteadyClock::now();
      for (uint64_t i = 1; i <= n; ++i) Voucher::sign(renter, lease_id, i, i, i).verify(renter.public_key());
      double s = std::chrono::duration<double>(SteadyClock::now() - t0).count();
      json::Writer w(false);
      w.begin_object().key("op").value("voucher_sign_verify").key("count").value(n);
      w.key("per_s").value(static_cast<double>(n) / s).end_object();
      emit(w);
    }

    daemon.signal(SIGTERM);
    if (daemon.wait(10s) != std::optional<int>(0)) throw InternalError("meshtrain-market did not stop cleanly");
    Ledger ledger(db);
    AuditReport audit = ledger.audit();
    json::Writer w(false);
    w.begin_object()
        .key("op")
        .value("audit")
        .key("ok")
        .value(audit.ok())
        .key("problems")
        .value(static_cast<uint64_t>(audit.problems.size()));
    w.end_object();
    emit(w);
    if (!audit.ok()) status = 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "market_bench: %s\n", e.what());
    status = 1;
  }
  if (own_dir) {
    std::error_code ec;
    fs::remove_all(opt.dir, ec);
  }
  return status;
}
