// meshtrain-provider: the daemon a GPU owner runs to rent out GPUs on the market
// (docs/market.md "Provider daemon"). The logic is market::Provider (lib/market/provider.h).
#include <charconv>
#include <cstdio>
#include <filesystem>
#include <optional>
#include <string>
#include <string_view>

#include "common/daemon.h"
#include "common/flags.h"
#include "market/provider.h"

using namespace meshtrain;
namespace fs = std::filesystem;

namespace {

constexpr int kUsageError = 2;

const char* const kUsage = R"(usage: meshtrain-provider [--config FILE] [options]

Rents this machine's GPUs out on the market: publishes an offer, bids on matching orders,
heartbeats, accepts the renter's per-step vouchers (stored durably before they are
acknowledged), redeems them, and runs one worker per lease that joins the renter's job.
Settings come from the config file (JSON, see docs/market.md); flags override it.

options:
  --config FILE                JSON config file (keys as in docs/market.md)
  --market tcp://HOST:PORT     the market's endpoint                     (market_endpoint)
  --market-key HEX             the market's Ed25519 public key           (market_key)
  --key PEM                    this provider's identity; created 0600 when missing (key_file)
  --bind tcp://HOST:PORT       the voucher server's endpoint (default tcp://127.0.0.1:7600) (bind)
  --advertise tcp://HOST:PORT  the endpoint published in the offer (default: the bound one) (advertise)
  --price-per-step N           price per paid step, smallest unit, > 0  (price_per_step)
  --idle-price N               price per idle hour (default 0: none)    (price_per_hour_idle)
  --region TEXT                e.g. eu-west                              (region)
  --latency-hint-ms N          own latency estimate, a sort key          (latency_hint_ms)
  --worker-command CMD         run with /bin/sh -c per attached lease; it gets MESHTRAIN_COORDINATOR,
                               MESHTRAIN_COORDINATOR_KEY, MESHTRAIN_JOIN_TOKEN, MESHTRAIN_LEASE_ID
                               in its environment                        (worker_command)
  --redeem-interval-ms MS      redeem the latest voucher this often (default 10000) (redeem_interval_ms)
  --unpaid-grace-ms MS         close a lease whose renter sent no voucher for this long
                               (default 30000)                           (unpaid_grace_ms)
  --worker-stop-grace-ms MS    SIGTERM, then SIGKILL after this (default 5000) (worker_stop_grace_ms)
  --db FILE                    the provider's own SQLite file            (db)
  --gpu MODEL:COUNT:VRAM_GIB:CAP  declare the GPUs (used when nvidia-smi is not on PATH) (gpu)
  --trust-config               offer the declared GPUs even when nvidia-smi reports others
  --market-timeout-ms MS       per market request (default 2000; one retry)
  --status-json                print the state as one JSON line per heartbeat interval on stdout
                               (default: a text line when it changes)
  --print-endpoint-file FILE   once bound, write the voucher endpoint (line 1) and the provider's
                               public key in hex (line 2) to FILE
  --help                       this text

Logs go to stderr (MESHTRAIN_LOG=debug for more). SIGINT / SIGTERM stop it cleanly (exit 0) after a
last redemption; the workers are stopped. Exit codes: 0 stopped by a signal, 1 runtime failure,
2 usage or configuration error.
)";

const std::initializer_list<tools::Flags::Spec> kFlags = {
    {"--config"},           {"--market"},           {"--market-key"},         {"--key"},
    {"--bind"},             {"--advertise"},        {"--price-per-step"},     {"--idle-price"},
    {"--region"},           {"--latency-hint-ms"},  {"--worker-command"},     {"--redeem-interval-ms"},
    {"--unpaid-grace-ms"},  {"--worker-stop-grace-ms"}, {"--db"},             {"--gpu"},
    {"--trust-config", false}, {"--market-timeout-ms"}, {"--status-json", false}, {"--print-endpoint-file"},
};

constexpr uint64_t kMaxMs = 7ull * 24 * 3600 * 1000;

market::GpuSpec parse_gpu(const tools::Flags& flags, std::string_view value) {
  std::vector<std::string> parts;
  size_t start = 0;
  for (size_t i = 0; i <= value.size(); ++i)
    if (i == value.size() || value[i] == ':') {
      parts.emplace_back(value.substr(start, i - start));
      start = i + 1;
    }
  auto number = [&](const std::string& text, uint64_t max) {
    uint64_t out = 0;
    auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), out);
    if (ec != std::errc() || end != text.data() + text.size() || text.empty() || out > max) return UINT64_MAX;
    return out;
  };
  if (parts.size() != 4 || parts[0].empty() || parts[3].empty() || number(parts[1], 1024) == UINT64_MAX ||
      number(parts[1], 1024) == 0 || number(parts[2], 1 << 20) == UINT64_MAX)
    flags.fail(fmt::format("--gpu: '{}' is not MODEL:COUNT:VRAM_GIB:CAP (e.g. H100-80GB:8:80:9.0)", value));
  return market::GpuSpec{parts[0], static_cast<uint32_t>(number(parts[1], 1024)),
                         static_cast<uint32_t>(number(parts[2], 1 << 20)), parts[3]};
}

// The config file's settings with the flags given on top.
market::ProviderSettings settings_from(const tools::Flags& flags) {
  market::ProviderSettings s;
  if (auto config = flags.get("--config")) s = market::load_provider_config(*config);
  auto text = [&](std::string_view flag, auto& field) {
    if (auto v = flags.get(flag)) field = *v;
  };
  auto ms = [&](std::string_view flag, std::chrono::milliseconds& field) {
    if (flags.has(flag)) field = std::chrono::milliseconds(flags.number(flag, 0, 1, kMaxMs));
  };
  text("--market", s.market_endpoint);
  if (auto v = flags.get("--market-key")) {
    try {
      s.market_key = market::AccountId::from_hex(*v, "--market-key");
    } catch (const Error& e) {
      flags.fail(e.what());
    }
  }
  text("--key", s.key_file);
  text("--bind", s.bind_endpoint);
  text("--advertise", s.advertise_endpoint);
  s.price_per_step = flags.number("--price-per-step", s.price_per_step, 1, UINT64_MAX);
  s.price_per_hour_idle = flags.number("--idle-price", s.price_per_hour_idle, 0, UINT64_MAX);
  text("--region", s.region);
  s.latency_hint_ms = static_cast<uint32_t>(flags.number("--latency-hint-ms", s.latency_hint_ms, 0, UINT32_MAX));
  text("--worker-command", s.worker_command);
  ms("--redeem-interval-ms", s.redeem_interval);
  ms("--unpaid-grace-ms", s.unpaid_grace);
  ms("--worker-stop-grace-ms", s.worker_stop_grace);
  text("--db", s.db_path);
  if (auto v = flags.get("--gpu")) s.declared_gpu = parse_gpu(flags, *v);
  return s;
}

}  // namespace

int main(int argc, char** argv) {
  std::optional<tools::Flags> flags;
  market::ProviderSettings settings;
  market::DetectedHardware hardware;
  try {
    flags.emplace(argc, argv, 1, kFlags, kUsage);
    if (flags->help()) {
      std::fputs(kUsage, stdout);
      return 0;
    }
    if (!flags->positional().empty()) flags->fail(fmt::format("unexpected argument '{}'", flags->positional()[0]));
    settings = settings_from(*flags);
    market::validate_provider_settings(settings);
    hardware = market::detect_hardware(settings.declared_gpu, flags->has("--trust-config"));
  } catch (const Error& e) {
    std::fprintf(stderr, "meshtrain-provider: %s\n", e.what());
    return kUsageError;
  }

  CancelToken stop;
  tools::cancel_on_stop_signals(stop);
  try {
    crypto::Identity self = tools::load_or_create_identity(settings.key_file, "provider", "provider identity");
    market::DevnetOptions market_options;
    market_options.request_timeout = std::chrono::milliseconds(flags->number("--market-timeout-ms", 2000, 1, 600000));
    market_options.retries = 1;
    auto backend = market::connect_devnet(self, *settings.market_key, settings.market_endpoint, market_options);
    market::Provider provider(self, *backend, settings, hardware);
    if (auto file = flags->get("--print-endpoint-file"))
      tools::write_endpoint_file(*file, provider.endpoint(), self.public_key());
    log::info("provider", "serving vouchers on {} as {}; {} x {} from {}; market {}", provider.endpoint(),
              self.public_key().hex(), hardware.gpu.count, hardware.gpu.model, hardware.source,
              settings.market_endpoint);
    bool status_json = flags->has("--status-json");
    std::string last;
    provider.run(stop, [&](const market::ProviderStatus& status) {
      std::string line = status_json ? status.to_json() : status.to_text();
      if (!status_json && line == last) return;
      std::fprintf(stdout, "%s\n", line.c_str());
      std::fflush(stdout);
      last = std::move(line);
    });
    log::info("provider", "stopped: {}", provider.status().to_text());
  } catch (const Error& e) {
    std::fprintf(stderr, "meshtrain-provider: %s\n", e.what());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "meshtrain-provider: unexpected error: %s\n", e.what());
    return 1;
  }
  return 0;
}
