// `meshtrain market ...`: the renter's and the GPU owner's view of a market, from the shell.
#include "market/market_command.h"

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>

#include "core/json.h"
#include "common/flags.h"
#include "meshtrain/market.h"

namespace meshtrain::tools {
namespace {

using namespace meshtrain::market;
namespace json = meshtrain::json;

const char* const kUsage = R"(usage: meshtrain market COMMAND [options]

commands:
  offers    list offers (filters below), cheapest first (--sort price|reputation|latency)
  orders    list orders (--all: not only open ones; --mine: only this key's)
  leases    list this key's leases as renter or provider (--open: only open ones)
  balance   show an account (default: this key's): balance, escrowed, earned, spent
  mint      AMOUNT [--to KEY]: devnet faucet (the market's operator key, or to yourself up to
            the market's faucet limit)
  rent      --count N --escrow E --spend-limit S [filters] [--wait-ms MS]: order, collect bids,
            accept the cheapest; prints the leases
  close     LEASE_ID [--reason renter_done|provider_failed|provider_done]
  cost      --price-per-step P --steps N --peers K [--samples-per-step S]
            [--cloud-price-per-gpu-hour C --step-seconds T]: what a job costs (no market needed)

connection (every command but cost):
  --market ENDPOINT     meshtrain-market's endpoint (or $MESHTRAIN_MARKET), e.g. tcp://127.0.0.1:7700
  --market-key KEY      its public key: 64 hex digits or a file holding them (or $MESHTRAIN_MARKET_KEY)
  --key PEM             this account's Ed25519 identity (or $MESHTRAIN_KEY; `meshtrain key generate`)
  --timeout-ms MS       per request (default 5000)

filters (offers, rent): --gpu MODEL --min-vram GIB --min-gpus N --max-price P --region R
                        --min-reputation X (0..1) --all (include providers not heard from lately)
                        --limit N --page TOKEN
--json prints JSON on stdout instead of tables. Amounts are integers of the smallest unit.
)";

const std::initializer_list<Flags::Spec> kFlags = {
    {"--market"}, {"--market-key"}, {"--key"}, {"--timeout-ms"}, {"--json", false}, {"--gpu"}, {"--min-vram"},
    {"--min-gpus"}, {"--max-price"}, {"--region"}, {"--min-reputation"}, {"--all", false}, {"--limit"}, {"--page"},
    {"--sort"}, {"--mine", false}, {"--open", false}, {"--to"}, {"--count"}, {"--escrow"}, {"--spend-limit"},
    {"--duration-s"}, {"--wait-ms"}, {"--reason"}, {"--price-per-step"}, {"--steps"}, {"--peers"},
    {"--samples-per-step"}, {"--cloud-price-per-gpu-hour"}, {"--step-seconds"}};

// A key given as 64 hex digits or as a file that holds them.
AccountId parse_key(const std::string& text, std::string_view what) {
  std::string hex = text;
  if (text.size() != 64 && std::filesystem::exists(text)) {
    std::ifstream in(text);
    in >> hex;
  }
  return AccountId::from_hex(hex, what);
}

std::string setting(const Flags& f, std::string_view flag, const char* env) {
  if (auto v = f.get(flag)) return *v;
  if (const char* e = std::getenv(env); e && *e) return e;
  f.fail(fmt::format("{} (or ${}) is required", flag, env));
}

struct Session {
  crypto::Identity self;
  std::unique_ptr<MarketBackend> backend;
};

Session connect(const Flags& f) {
  Session s{crypto::Identity::load_pem(setting(f, "--key", "MESHTRAIN_KEY")), nullptr};
  DevnetOptions options;
  options.request_timeout = std::chrono::milliseconds(f.number("--timeout-ms", 5000, 1, 3600000));
  s.backend = connect_devnet(s.self, parse_key(setting(f, "--market-key", "MESHTRAIN_MARKET_KEY"), "--market-key"),
                             setting(f, "--market", "MESHTRAIN_MARKET"), options);
  return s;
}

OfferFilter filter_of(const Flags& f) {
  OfferFilter filter;
  filter.gpu_model = f.get_or("--gpu", "");
  filter.min_vram_gib = static_cast<uint32_t>(f.number("--min-vram", 0, 0, 1 << 20));
  filter.min_gpu_count = static_cast<uint32_t>(f.number("--min-gpus", 0, 0, 1 << 20));
  filter.max_price_per_step = f.number("--max-price", 0, 0, UINT64_MAX);
  filter.region = f.get_or("--region", "");
  filter.min_reputation = f.real("--min-reputation", 0, 0, 1);
  filter.alive_only = !f.has("--all");
  filter.limit = static_cast<uint32_t>(f.number("--limit", 50, 1, 1000));
  filter.page_token = f.number("--page", 0, 0, UINT64_MAX);
  std::string sort = f.get_or("--sort", "price");
  if (sort == "price") filter.sort = OfferSort::Price;
  else if (sort == "reputation") filter.sort = OfferSort::Reputation;
  else if (sort == "latency") filter.sort = OfferSort::Latency;
  else f.fail(fmt::format("--sort must be price, reputation or latency, not '{}'", sort));
  return filter;
}

std::string ago(TimeMs then) {
  if (then == 0) return "never";
  double s = static_cast<double>(wall_clock_ms() - then) / 1000.0;
  return s < 120 ? fmt::format("{:.1f}s ago", s) : fmt::format("{:.0f}m ago", s / 60);
}

void write_lease(json::Writer& w, const Lease& l) {
  w.begin_object()
      .key("id").value(l.id).key("order").value(l.order_id).key("offer").value(l.offer_id)
      .key("renter").value(l.renter.hex()).key("provider").value(l.provider.hex())
      .key("endpoint").value(l.endpoint).key("price_per_step").value(l.price_per_step)
      .key("escrow").value(l.escrow).key("paid").value(l.paid).key("paid_step").value(l.paid_step)
      .key("state").value(lease_state_name(l.state)).key("close_reason").value(close_reason_name(l.close_reason))
      .key("started_ms").value(l.started_ms).key("expires_ms").value(l.expires_ms)
      .key("closed_ms").value(l.closed_ms).key("provider_last_heartbeat_ms").value(l.provider_last_heartbeat_ms)
      .end_object();
}

void print_leases(const std::vector<Lease>& leases, bool as_json) {
  if (as_json) {
    json::Writer w;
    w.begin_array();
    for (const auto& l : leases) write_lease(w, l);
    w.end_array();
    std::fputs(w.take().c_str(), stdout);
    return;
  }
  std::printf("%-6s %-16s %-16s %-8s %10s %12s %12s %8s %-16s %s\n", "LEASE", "RENTER", "PROVIDER", "STATE",
              "PRICE", "ESCROW", "PAID", "STEPS", "CLOSE", "PROVIDER SEEN");
  for (const auto& l : leases)
    std::printf("%-6lu %-16s %-16s %-8s %10lu %12lu %12lu %8lu %-16s %s\n", static_cast<unsigned long>(l.id),
                l.renter.fingerprint().c_str(), l.provider.fingerprint().c_str(), lease_state_name(l.state).data(),
                static_cast<unsigned long>(l.price_per_step), static_cast<unsigned long>(l.escrow),
                static_cast<unsigned long>(l.paid), static_cast<unsigned long>(l.paid_step),
                close_reason_name(l.close_reason).data(), ago(l.provider_last_heartbeat_ms).c_str());
  if (leases.empty()) std::printf("(no leases)\n");
}

void print_account(const Account& a, bool as_json) {
  if (as_json) {
    json::Writer w;
    w.begin_object().key("account").value(a.id.hex()).key("balance").value(a.balance)
        .key("escrowed").value(a.escrowed).key("earned").value(a.earned).key("spent").value(a.spent).end_object();
    std::fputs(w.take().c_str(), stdout);
    return;
  }
  std::printf("account  %s\nbalance  %lu\nescrowed %lu\nearned   %lu\nspent    %lu\n", a.id.hex().c_str(),
              static_cast<unsigned long>(a.balance), static_cast<unsigned long>(a.escrowed),
              static_cast<unsigned long>(a.earned), static_cast<unsigned long>(a.spent));
}

int offers(const Flags& f) {
  Session s = connect(f);
  OfferPage page = s.backend->discover(filter_of(f));
  if (f.has("--json")) {
    json::Writer w;
    w.begin_object().key("total").value(page.total).key("next_page_token").value(page.next_page_token);
    w.key("offers").begin_array();
    for (const auto& o : page.offers) {
      w.begin_object()
          .key("id").value(o.id).key("provider").value(o.provider.hex()).key("gpu_model").value(o.spec.gpu.model)
          .key("gpu_count").value(o.spec.gpu.count).key("vram_gib").value(o.spec.gpu.vram_gib)
          .key("cuda_capability").value(o.spec.gpu.cuda_capability)
          .key("price_per_step").value(o.spec.price_per_step)
          .key("price_per_hour_idle").value(o.spec.price_per_hour_idle).key("region").value(o.spec.region)
          .key("endpoint").value(o.spec.endpoint).key("latency_hint_ms").value(o.spec.latency_hint_ms)
          .key("hardware_report").value(o.spec.hardware.text)
          .key("reputation").begin_object()
          .key("score").value(o.reputation.score).key("uptime").value(o.reputation.uptime)
          .key("completed_steps").value(o.reputation.completed_steps)
          .key("leases_clean").value(o.reputation.leases_clean)
          .key("leases_abandoned").value(o.reputation.leases_abandoned).end_object()
          .key("last_heartbeat_ms").value(o.last_heartbeat_ms)
          .end_object();
    }
    w.end_array().end_object();
    std::fputs(w.take().c_str(), stdout);
    return 0;
  }
  std::printf("%-6s %-16s %-14s %4s %5s %5s %10s %-10s %6s %6s %s\n", "OFFER", "PROVIDER", "GPU", "N", "VRAM", "CC",
              "PRICE", "REGION", "REP", "LAT", "SEEN");
  for (const auto& o : page.offers)
    std::printf("%-6lu %-16s %-14s %4u %5u %5s %10lu %-10s %6.3f %6u %s\n", static_cast<unsigned long>(o.id),
                o.provider.fingerprint().c_str(), o.spec.gpu.model.c_str(), o.spec.gpu.count, o.spec.gpu.vram_gib,
                o.spec.gpu.cuda_capability.c_str(), static_cast<unsigned long>(o.spec.price_per_step),
                o.spec.region.c_str(), o.reputation.score, o.spec.latency_hint_ms, ago(o.last_heartbeat_ms).c_str());
  std::printf("%zu of %lu offer(s)%s\n", page.offers.size(), static_cast<unsigned long>(page.total),
              page.next_page_token ? fmt::format("; next page: --page {}", page.next_page_token).c_str() : "");
  return 0;
}

int orders(const Flags& f) {
  Session s = connect(f);
  OrderQuery q;
  if (f.has("--mine")) q.renter = s.self.public_key();
  q.open_only = !f.has("--all");
  q.limit = static_cast<uint32_t>(f.number("--limit", 100, 1, 1000));
  auto list = s.backend->orders(q);
  if (f.has("--json")) {
    json::Writer w;
    w.begin_array();
    for (const auto& o : list)
      w.begin_object().key("id").value(o.id).key("renter").value(o.renter.hex()).key("state").value(order_state_name(o.state))
          .key("count").value(o.spec.count).key("leased").value(o.leased)
          .key("max_price_per_step").value(o.spec.max_price_per_step).key("escrow_per_lease").value(o.spec.escrow_per_lease)
          .key("gpu_model").value(o.spec.filter.gpu_model).key("created_ms").value(o.created_ms).end_object();
    w.end_array();
    std::fputs(w.take().c_str(), stdout);
    return 0;
  }
  std::printf("%-6s %-16s %-10s %6s %6s %10s %12s %s\n", "ORDER", "RENTER", "STATE", "COUNT", "LEASED", "MAXPRICE",
              "ESCROW/LEASE", "GPU");
  for (const auto& o : list)
    std::printf("%-6lu %-16s %-10s %6u %6u %10lu %12lu %s\n", static_cast<unsigned long>(o.id),
                o.renter.fingerprint().c_str(), order_state_name(o.state).data(), o.spec.count, o.leased,
                static_cast<unsigned long>(o.spec.max_price_per_step),
                static_cast<unsigned long>(o.spec.escrow_per_lease),
                o.spec.filter.gpu_model.empty() ? "any" : o.spec.filter.gpu_model.c_str());
  if (list.empty()) std::printf("(no orders)\n");
  return 0;
}

int leases(const Flags& f) {
  Session s = connect(f);
  LeaseQuery as_renter, as_provider;
  as_renter.renter = s.self.public_key();
  as_provider.provider = s.self.public_key();
  as_renter.open_only = as_provider.open_only = f.has("--open");
  as_renter.limit = as_provider.limit = static_cast<uint32_t>(f.number("--limit", 100, 1, 1000));
  auto list = s.backend->leases(as_renter);
  for (auto& l : s.backend->leases(as_provider))
    if (l.renter != s.self.public_key()) list.push_back(l);
  print_leases(list, f.has("--json"));
  return 0;
}

int balance(const Flags& f) {
  Session s = connect(f);
  AccountId who = f.positional().size() > 1 ? parse_key(f.positional()[1], "account") : s.self.public_key();
  print_account(s.backend->account(who), f.has("--json"));
  return 0;
}

int mint(const Flags& f) {
  if (f.positional().size() != 2) f.fail("mint takes one AMOUNT");
  Session s = connect(f);
  char* end = nullptr;
  const std::string& text = f.positional()[1];
  uint64_t amount = std::strtoull(text.c_str(), &end, 10);
  if (text.empty() || *end != '\0' || text[0] == '-' || amount == 0)
    f.fail(fmt::format("AMOUNT must be a positive integer, not '{}'", text));
  AccountId to = f.has("--to") ? parse_key(*f.get("--to"), "--to") : s.self.public_key();
  print_account(s.backend->mint(to, amount), f.has("--json"));
  return 0;
}

int rent(const Flags& f) {
  Session s = connect(f);
  Budget budget;
  budget.spend_limit = f.number("--spend-limit", 0, 1, UINT64_MAX);
  if (!f.has("--spend-limit")) f.fail("--spend-limit is required (the most this client may ever pay)");
  budget.escrow_per_lease = f.number("--escrow", 0, 1, UINT64_MAX);
  if (!f.has("--escrow")) f.fail("--escrow is required (locked per lease, refunded unspent at close)");
  budget.max_price_per_step = f.number("--max-price", 0, 0, UINT64_MAX);
  budget.lease_duration_s = f.number("--duration-s", 3600, 1, 366ull * 24 * 3600);
  MarketClient client(s.self, *s.backend, budget);
  uint32_t count = static_cast<uint32_t>(f.number("--count", 1, 1, 1000));
  auto got = client.rent(count, filter_of(f), std::chrono::milliseconds(f.number("--wait-ms", 3000, 0, 3600000)));
  print_leases(got, f.has("--json"));
  if (!f.has("--json")) std::printf("%zu of %u lease(s)\n", got.size(), count);
  return got.size() == count ? 0 : 1;
}

int close(const Flags& f) {
  if (f.positional().size() != 2) f.fail("close takes one LEASE_ID");
  Session s = connect(f);
  char* end = nullptr;
  Id id = std::strtoull(f.positional()[1].c_str(), &end, 10);
  if (*end != '\0' || id == 0) f.fail(fmt::format("LEASE_ID must be a positive integer, not '{}'", f.positional()[1]));
  std::string reason_text = f.get_or("--reason", "renter_done");
  CloseReason reason = CloseReason::RenterDone;
  if (reason_text == "provider_failed") reason = CloseReason::ProviderFailed;
  else if (reason_text == "provider_done") reason = CloseReason::ProviderDone;
  else if (reason_text != "renter_done") f.fail(fmt::format("unknown --reason '{}'", reason_text));
  // The CLI holds no vouchers: the provider's daemon redeems what it was paid before closing.
  print_leases({s.backend->close(id, reason, std::nullopt)}, f.has("--json"));
  return 0;
}

int cost(const Flags& f) {
  if (!f.has("--price-per-step") || !f.has("--steps") || !f.has("--peers"))
    f.fail("cost needs --price-per-step, --steps and --peers");
  Amount price = f.number("--price-per-step", 0, 0, UINT64_MAX);
  uint64_t steps = f.number("--steps", 0, 0, UINT64_MAX);
  uint32_t peers = static_cast<uint32_t>(f.number("--peers", 1, 1, 1 << 20));
  uint64_t samples = f.number("--samples-per-step", 0, 0, UINT64_MAX);
  double cloud = f.real("--cloud-price-per-gpu-hour", 0, 0, 1e15);
  double step_s = f.real("--step-seconds", 0, 0, 1e9);
  if ((cloud > 0) != (step_s > 0)) f.fail("--cloud-price-per-gpu-hour and --step-seconds go together");
  CostEstimate e = estimate_cost(price, steps, peers, samples, cloud, step_s);
  if (f.has("--json")) {
    json::Writer w;
    w.begin_object().key("price_per_step").value(price).key("steps").value(steps).key("peers").value(peers)
        .key("per_step").value(e.per_step).key("total").value(e.total);
    if (samples) w.key("per_1k_samples").value(e.per_1k_samples);
    if (cloud > 0) w.key("cloud_total").value(e.cloud_total).key("ratio_vs_cloud").value(
        e.cloud_total > 0 ? static_cast<double>(e.total) / e.cloud_total : 0.0);
    w.end_object();
    std::fputs(w.take().c_str(), stdout);
    return 0;
  }
  std::printf("per step (all %u peers)  %lu\n", peers, static_cast<unsigned long>(e.per_step));
  std::printf("total (%lu steps)      %lu\n", static_cast<unsigned long>(steps), static_cast<unsigned long>(e.total));
  if (samples) std::printf("per 1k samples         %.3f\n", e.per_1k_samples);
  if (cloud > 0)
    std::printf("cloud at %.3f/GPU-hour  %.3f (%.2fx of the market)\n", cloud, e.cloud_total,
                e.total > 0 ? e.cloud_total / static_cast<double>(e.total) : 0.0);
  return 0;
}

}  // namespace

int market_command(int argc, char** argv) {
  Flags f(argc, argv, 2, kFlags, kUsage);
  if (f.help() || f.positional().empty()) {
    std::fputs(kUsage, f.help() ? stdout : stderr);
    return f.help() ? 0 : 2;
  }
  const std::string& command = f.positional()[0];
  if (command != "balance" && command != "mint" && command != "close" && f.positional().size() > 1)
    f.fail(fmt::format("unexpected argument '{}'", f.positional()[1]));
  if (command == "offers") return offers(f);
  if (command == "orders") return orders(f);
  if (command == "leases") return leases(f);
  if (command == "balance") return balance(f);
  if (command == "mint") return mint(f);
  if (command == "rent") return rent(f);
  if (command == "close") return close(f);
  if (command == "cost") return cost(f);
  f.fail(fmt::format("unknown market command '{}'", command));
}

}  // namespace meshtrain::tools
