// The provider daemon's logic (`meshtrain-provider`, docs/market.md "Provider daemon"): detect
// the GPUs, publish an offer, bid on matching orders, heartbeat, accept renters' vouchers into a
// durable store, redeem them, run one worker per lease and stop working for renters who stop
// paying. A class so that tests can drive it; tools/provider_main.cpp is the executable.
//
// Threads: run() serves the voucher endpoint on one thread and talks to the market on the
// caller's, so a slow or dead market never delays a voucher acknowledgement. Every market call
// goes through one mutex (the backend is not thread-safe) and has the backend's own timeout.
//
// Internal to meshtrain (not installed).
#pragma once

#include <sys/types.h>

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "market/protocol.h"
#include "meshtrain/core.h"
#include "meshtrain/crypto.h"
#include "meshtrain/market.h"

namespace meshtrain::market {

// ---------------------------------------------------------------------------------------------
// Settings: the config file (JSON, see docs/market.md) with command-line flags on top.

struct ProviderSettings {
  std::string market_endpoint;            // meshtrain-market's control endpoint
  std::optional<AccountId> market_key;    // its identity
  std::filesystem::path key_file;         // the provider's identity (created 0600 when missing)
  std::string bind_endpoint = "tcp://127.0.0.1:7600";  // the voucher server
  std::string advertise_endpoint;         // published in the offer; empty = the bound endpoint
  Amount price_per_step = 0;
  Amount price_per_hour_idle = 0;
  std::string region;
  uint32_t latency_hint_ms = 0;
  // Run with /bin/sh -c for each attached lease; the renter's values arrive only as environment
  // variables (MESHTRAIN_COORDINATOR, ..._KEY, MESHTRAIN_JOIN_TOKEN, MESHTRAIN_LEASE_ID), never
  // spliced into the command text. Empty: JobAttach is refused ("no_worker_command").
  std::string worker_command;
  std::chrono::milliseconds redeem_interval{10000};
  std::chrono::milliseconds unpaid_grace{30000};       // no voucher for this long -> close
  std::chrono::milliseconds worker_stop_grace{5000};   // SIGTERM -> SIGKILL
  std::chrono::milliseconds heartbeat_interval{1000};
  std::chrono::milliseconds poll_interval{1000};       // orders and leases
  std::chrono::milliseconds max_backoff{30000};        // market down: retry delay cap
  std::filesystem::path db_path;                       // the provider's own SQLite file
  std::optional<GpuSpec> declared_gpu;                 // config "gpu"
};

// Reads a provider config file (JSON object; unknown keys are errors). Relative paths are taken
// relative to the file's folder. Throws IoError / CorruptError / InvalidArgumentError naming the
// file and the field.
ProviderSettings load_provider_config(const std::filesystem::path& path);
// Missing or inconsistent required settings: InvalidArgumentError naming the setting.
void validate_provider_settings(const ProviderSettings& settings);

// ---------------------------------------------------------------------------------------------
// GPU detection.

struct NvidiaSmiGpu {
  std::string name;
  uint64_t memory_mib = 0;
  std::string compute_cap;
};

// Parses `nvidia-smi --query-gpu=name,memory.total,compute_cap --format=csv,noheader,nounits`.
// Throws ProtocolError naming `source` and the line on anything else.
std::vector<NvidiaSmiGpu> parse_nvidia_smi(std::string_view output, std::string_view source = "nvidia-smi");
// One offer describes one kind of GPU: identical cards are counted, different ones are an
// InvalidArgumentError naming both. vram_gib is memory.total rounded to the nearest GiB.
GpuSpec summarize_gpus(const std::vector<NvidiaSmiGpu>& gpus);

struct DetectedHardware {
  GpuSpec gpu;
  std::string source;       // "nvidia-smi" or "config"
  std::string report_json;  // what HardwareReport::sign signs
};

// nvidia-smi when it is on PATH (run with a timeout; its failure is an error naming it), else the
// declared GPU. A declaration that disagrees with nvidia-smi is an InvalidArgumentError unless
// trust_config (then the declaration wins and the report says so). Neither: InvalidArgumentError.
DetectedHardware detect_hardware(const std::optional<GpuSpec>& declared, bool trust_config,
                                 std::chrono::milliseconds timeout = std::chrono::milliseconds(10000));

// ---------------------------------------------------------------------------------------------
// Voucher acceptance (docs/market.md). Returns "" when `voucher`, sent by `sender`, may be
// accepted for `lease` given the latest voucher already accepted or redeemed (step, amount);
// otherwise the reason word: "not_my_lease", "wrong_sender", "bad_signature", "lease_closed",
// "lease_expired", "stale_voucher", "wrong_increment", "amount_overflow", "over_escrow".
std::string voucher_rejection(const Lease& lease, const AccountId& provider, const AccountId& sender,
                              const Voucher& voucher, uint64_t latest_step, Amount latest_amount, TimeMs now_ms);

// ---------------------------------------------------------------------------------------------
// The provider's own SQLite file (WAL, synchronous=FULL): the latest valid voucher per lease,
// the leases it has seen and its offer. A write returns only once it is durable.

struct StoredOffer {
  Id offer_id = 0;
  std::string spec_digest;  // hex SHA-256 of what was published; a changed spec is a new offer
};

class ProviderStore {
 public:
  // Creates the file and its tables when missing. Throws IoError / CorruptError naming the path.
  explicit ProviderStore(const std::filesystem::path& path);
  ~ProviderStore();
  ProviderStore(const ProviderStore&) = delete;
  ProviderStore& operator=(const ProviderStore&) = delete;

  std::optional<Voucher> latest_voucher(Id lease_id) const;
  // Replaces the lease's voucher; throws InvalidArgumentError when it does not increase.
  void put_voucher(const Voucher& voucher);

  std::optional<Lease> lease(Id lease_id) const;
  std::vector<Lease> leases() const;
  void put_lease(const Lease& lease);

  std::optional<StoredOffer> offer() const;
  void put_offer(const StoredOffer& offer);

  const std::filesystem::path& path() const { return path_; }

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
  std::filesystem::path path_;
};

// ---------------------------------------------------------------------------------------------
// The daemon.

struct ProviderLeaseStatus {
  Lease lease;                  // as last heard from the market
  uint64_t latest_step = 0;     // latest accepted voucher
  Amount latest_amount = 0;
  pid_t worker_pid = 0;         // 0: none running
};

struct ProviderStatus {
  std::string endpoint;
  AccountId provider;
  Id offer_id = 0;
  bool market_up = false;
  std::string market_error;     // the latest market failure while down
  uint64_t vouchers_accepted = 0;
  uint64_t vouchers_rejected = 0;
  uint64_t bids_placed = 0;
  Amount redeemed_total = 0;    // paid to us through this process's redemptions and closes
  std::vector<ProviderLeaseStatus> leases;

  std::string to_json() const;  // one line
  std::string to_text() const;  // one line
};

class Provider {
 public:
  // Opens the store and binds the voucher server; the market is first contacted by run() /
  // market_tick(), so a market that is down does not stop the daemon from starting.
  Provider(const crypto::Identity& self, MarketBackend& backend, ProviderSettings settings,
           DetectedHardware hardware);
  ~Provider();  // stops every worker
  Provider(const Provider&) = delete;
  Provider& operator=(const Provider&) = delete;

  std::string endpoint() const;  // the bound voucher endpoint
  const OfferSpec& offer_spec() const;

  // Serves vouchers on a second thread and runs the market loop here until `stop` fires;
  // `on_interval` (may be empty) gets the status once per heartbeat interval. Returns normally
  // on stop (a last redemption is tried, workers are stopped).
  void run(const CancelToken& stop, const std::function<void(const ProviderStatus&)>& on_interval = {});

  ProviderStatus status() const;

  // The pieces run() is made of, public so unit tests can drive them without threads.
  protocol::VoucherAck handle_voucher(const AccountId& sender, const Voucher& voucher);
  protocol::JobAttachAck handle_attach(const AccountId& sender, const protocol::JobAttach& attach);
  // Receives and answers control messages until `deadline`.
  void serve(Deadline deadline, const CancelToken* cancel = nullptr);
  // One pass of the market loop at `now`: publish the offer if needed, heartbeat, bid, refresh
  // leases, redeem, close leases whose renter stopped paying, supervise workers. Market failures
  // are logged and retried with backoff, never thrown.
  void market_tick(Clock::time_point now);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace meshtrain::market
