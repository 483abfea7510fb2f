// `meshtrain demo --market`: the demo job on rented GPUs, paid per step.
//
// Processes (all real, on loopback): meshtrain-market (devnet ledger on SQLite), N+1
// meshtrain-provider daemons (declared GPUs; each daemon's worker command is the demo worker,
// which uses the provider's own key), and meshtrain-coordinator. This process is the job owner:
// it rents N providers through a Fleet, attaches each to the coordinator (the daemons start the
// workers), pays every lease each step the job completes, and when provider 1's host dies (its
// worker and daemon SIGKILLed) the fleet closes that lease as failed and rents the standby, whose
// worker joins the job. At the end the parameters are compared and the ledger is reconciled.
#include <cstdio>
#include <map>
#include <thread>

#include "demo/processes.h"
#include "meshtrain/market.h"

namespace fs = std::filesystem;
using namespace std::chrono_literals;

namespace meshtrain::tools {
namespace {

using namespace meshtrain::market;

constexpr Amount kPricePerStep = 10;
constexpr Amount kStandbyPricePerStep = 11;  // a little dearer, so the first rent leaves it out
constexpr Amount kEscrowPerLease = 10'000;

}  // namespace

int market_demo(const DemoSettings& s) {
  char pattern[] = "/tmp/meshtrain-market-demo-XXXXXX";
  if (!::mkdtemp(pattern)) throw_io_error("mkdtemp", errno);
  const fs::path dir = pattern;
  struct Cleanup {
    fs::path dir;
    bool keep = false;
    ~Cleanup() {
      std::error_code ec;
      if (!keep) fs::remove_all(dir, ec);
    }
  } cleanup{dir};

  const fs::path exe = self_exe();
  const fs::path market_exe = sibling(exe, "meshtrain-market");
  const fs::path provider_exe = sibling(exe, "meshtrain-provider");
  const fs::path coordinator_exe = sibling(exe, "meshtrain-coordinator");
  const uint64_t providers = s.workers + 1;  // one standby
  const uint64_t kill_at = s.kill_at;
  std::printf("meshtrain demo --market: %llu rented workers (+1 standby provider), %llu steps, %llu per step per "
              "provider\n",
              static_cast<unsigned long long>(s.workers), static_cast<unsigned long long>(s.steps),
              static_cast<unsigned long long>(kPricePerStep));
  std::fflush(stdout);
  ::setenv("MESHTRAIN_LOG", "warn", /*overwrite=*/0);

  // Keys: each provider's identity is also its worker's, so the job's allow-list names them.
  std::ofstream members(dir / "members.txt");
  for (uint64_t i = 0; i < providers; ++i) {
    auto id = crypto::Identity::generate();
    id.save_pem(dir / fmt::format("worker{}.pem", i));
    members << id.public_key().hex() << "\n";
  }
  members.close();
  crypto::Identity::generate().save_pem(dir / "coordinator.pem");
  auto owner = crypto::Identity::generate();

  auto market = spawn("market",
                      {market_exe.string(), "--db", (dir / "market.db").string(), "--key",
                       (dir / "market.pem").string(), "--bind", "tcp://127.0.0.1:0", "--faucet-limit", "1000000000",
                       "--print-endpoint-file", (dir / "market.endpoint").string()},
                      (dir / "market.log").c_str(), true);
  Endpoint market_at = wait_endpoint(dir / "market.endpoint", *market, "meshtrain-market");
  auto coordinator = spawn("coordinator",
                           {coordinator_exe.string(), "--bind", "tcp://127.0.0.1:0", "--key",
                            (dir / "coordinator.pem").string(), "--allow", (dir / "members.txt").string(),
                            "--min-peers", "2", "--heartbeat-timeout-ms", "2000", "--quorum-timeout-ms", "5000",
                            "--print-endpoint-file", (dir / "coordinator.endpoint").string()},
                           (dir / "coordinator.log").c_str(), true);
  Endpoint coordinator_at = wait_endpoint(dir / "coordinator.endpoint", *coordinator, "meshtrain-coordinator");

  std::vector<std::unique_ptr<Child>> daemons;
  std::map<AccountId, uint64_t> index_of;
  auto start_provider = [&](uint64_t i) {
    const bool standby = i == s.workers;
    std::string worker = fmt::format(
        "exec '{}' demo-worker --index {} --dir '{}' --coordinator-endpoint \"$MESHTRAIN_COORDINATOR\" "
        "--coordinator \"$MESHTRAIN_COORDINATOR_KEY\" --steps {} --dim {} --step-ms {}{}{}{}",
        exe.string(), i, dir.string(), s.steps, s.dim, s.step_ms, s.plain ? " --plain" : "",
        i == 1 && kill_at ? fmt::format(" --die-at {}", kill_at) : "", standby ? " --join" : "");
    auto name = fmt::format("provider{}", i);
    daemons.push_back(spawn(name,
                            {provider_exe.string(), "--market", market_at.endpoint, "--market-key",
                             market_at.key.hex(), "--key", (dir / fmt::format("worker{}.pem", i)).string(), "--bind",
                             "tcp://127.0.0.1:0", "--db", (dir / (name + ".db")).string(), "--gpu",
                             "DEMO-GPU:1:16:8.0", "--trust-config", "--price-per-step",
                             std::to_string(standby ? kStandbyPricePerStep : kPricePerStep), "--region", "local",
                             "--worker-command", worker, "--redeem-interval-ms", "2000", "--print-endpoint-file",
                             (dir / (name + ".endpoint")).string()},
                            (dir / (name + ".log")).c_str(), true));
    index_of[wait_endpoint(dir / (name + ".endpoint"), *daemons.back(), name).key] = i;
  };
  for (uint64_t i = 0; i < s.workers; ++i) start_provider(i);
  std::printf("  market, coordinator and %llu provider daemons are up (logs in %s)\n",
              static_cast<unsigned long long>(s.workers), dir.c_str());

  auto backend = connect_devnet(owner, market_at.key, market_at.endpoint);
  const Amount minted = 1'000'000;
  backend->mint(owner.public_key(), minted);
  Budget budget;
  budget.spend_limit = kStandbyPricePerStep * providers * (s.steps + 5);
  budget.escrow_per_lease = kEscrowPerLease;
  budget.max_price_per_step = kStandbyPricePerStep;
  MarketClient client(owner, *backend, budget);

  auto attach = [&](const Lease& lease) {
    client.attach_job(lease.id, coordinator_at.endpoint, coordinator_at.key);
    std::printf("  lease %llu: provider %llu (%s) at %llu per step, worker attached to the job\n",
                static_cast<unsigned long long>(lease.id), static_cast<unsigned long long>(index_of[lease.provider]),
                lease.provider.fingerprint().c_str(), static_cast<unsigned long long>(lease.price_per_step));
  };
  std::vector<Lease> to_attach;
  FleetOptions options;
  options.size = static_cast<uint32_t>(s.workers);
  options.filter.gpu_model = "DEMO-GPU";
  options.rent_wait = 4s;
  options.heartbeat_timeout = 3s;
  options.voucher_timeout = 500ms;  // loopback: a daemon that has not answered in 0.5 s is gone
  options.on_event = [&](const FleetEvent& e) {
    if (e.kind == FleetEvent::Kind::ProviderFailed)
      std::printf("  fleet: provider %llu failed (%s): lease %llu closed, paid for what it was paid for\n",
                  static_cast<unsigned long long>(index_of[e.provider]), e.detail.c_str(),
                  static_cast<unsigned long long>(e.lease_id));
    if (e.kind == FleetEvent::Kind::Replaced || e.kind == FleetEvent::Kind::Leased)
      for (const Lease& l : client.leases())
        if (l.id == e.lease_id) to_attach.push_back(l);
  };
  Fleet fleet(client, *backend, options);

  // The N cheapest bids win; the standby's dearer bid stays out until a replacement is needed.
  fleet.fill();
  if (fleet.leases().size() < s.workers)
    throw TimeoutError(fmt::format("rented only {} of {} providers", fleet.leases().size(), s.workers));
  for (const Lease& l : to_attach) attach(l);
  to_attach.clear();
  start_provider(s.workers);
  std::printf("  standby provider %llu is up, offering at %llu per step\n", static_cast<unsigned long long>(s.workers),
              static_cast<unsigned long long>(kStandbyPricePerStep));

  const auto job_started = Clock::now();
  // Pay each step the job finishes (as seen in the progress files of the rented workers).
  uint64_t paid_through = 0;
  auto deadline = Clock::now() + std::chrono::seconds(120 + s.steps * (s.step_ms / 100 + 2));
  bool killed = false;
  while (paid_through < s.steps) {
    if (Clock::now() > deadline) throw TimeoutError("the job made no progress for too long");
    uint64_t done = 0;
    std::vector<Progress> steps;
    for (const Lease& l : fleet.leases()) {
      auto p = read_progress(dir / fmt::format("worker{}.progress", index_of[l.provider]));
      if (!p.empty() && p.back().step > done) {
        done = p.back().step;
        steps = std::move(p);
      }
    }
    auto loss_at = [&](uint64_t step) {
      for (const Progress& p : steps)
        if (p.step == step) return p.loss;
      return 0.0;
    };
    if (kill_at && !killed && done >= kill_at) {
      // Provider 1's host dies: its worker already SIGKILLed itself mid-step (--die-at); now
      // its daemon goes too.
      for (auto& d : daemons)
        if (d->name == "provider1") ::kill(d->pid, SIGKILL);
      killed = true;
      std::printf("  provider 1's host died (worker and daemon SIGKILLed) during step %llu\n",
                  static_cast<unsigned long long>(kill_at));
    }
    while (paid_through < done) {
      ++paid_through;
      auto held = fleet.pay_step(paid_through);
      for (const Lease& l : to_attach) attach(l);
      to_attach.clear();
      if (paid_through % 5 == 0 || paid_through == s.steps) {
        // The job's cost line: spend so far, per step, per 1k samples (each worker's rows).
        Amount spent = client.spend().total;
        double per_step = static_cast<double>(spent) / static_cast<double>(paid_through);
        std::printf("step %3llu  loss %.6f  paid %zu lease(s)  spent %llu (%.1f per step, %.2f per 1k samples)\n",
                    static_cast<unsigned long long>(paid_through), loss_at(paid_through), held.size(),
                    static_cast<unsigned long long>(spent), per_step,
                    1000.0 * per_step / static_cast<double>(kRowsPerWorker * held.size()));
      }
      std::fflush(stdout);
    }
    std::this_thread::sleep_for(20ms);
  }

  const double job_seconds = std::chrono::duration<double>(Clock::now() - job_started).count();

  // The workers finish and write their parameter hashes.
  std::vector<std::string> hashes;
  auto wait_until = Clock::now() + 60s;
  for (const Lease& l : fleet.leases()) {
    fs::path result = dir / fmt::format("worker{}.result", index_of[l.provider]);
    while (!fs::exists(result) && Clock::now() < wait_until) std::this_thread::sleep_for(20ms);
    std::ifstream in(result);
    std::string hash;
    if (in >> hash) hashes.push_back(hash);
  }
  fleet.release_all();
  Spend spend = client.spend();
  Account renter = backend->account(owner.public_key());
  Amount earned = 0;
  std::printf("  settlement:\n");
  for (const auto& [key, i] : index_of) {
    Account a = backend->account(key);
    earned += a.earned;
    std::printf("    provider %llu earned %6llu%s\n", static_cast<unsigned long long>(i),
                static_cast<unsigned long long>(a.earned), i == 1 && kill_at ? "  (died mid-lease)" : "");
  }
  CostEstimate cost = estimate_cost(kPricePerStep, s.steps, static_cast<uint32_t>(s.workers),
                                    kRowsPerWorker * s.workers, s.cloud_price_per_gpu_hour,
                                    job_seconds / static_cast<double>(s.steps));
  std::printf("  cost: %llu spent over %llu steps (list price %llu per step for %llu providers, %.2f per 1k "
              "samples)\n",
              static_cast<unsigned long long>(spend.total), static_cast<unsigned long long>(s.steps),
              static_cast<unsigned long long>(cost.per_step), static_cast<unsigned long long>(s.workers),
              cost.per_1k_samples);
  if (s.cloud_price_per_gpu_hour > 0)
    std::printf("  the same %llu GPUs for %.1f s at %.3f per GPU-hour (your price): %.4f\n",
                static_cast<unsigned long long>(s.workers), job_seconds, s.cloud_price_per_gpu_hour,
                cost.cloud_total);
  bool identical = hashes.size() == s.workers;
  for (const auto& h : hashes) identical = identical && h == hashes[0];
  bool reconciled = renter.spent == spend.total && earned == renter.spent && renter.escrowed == 0 &&
                    renter.balance + renter.spent == minted;
  std::printf("meshtrain demo --market: %zu workers finished; parameters identical: %s; owner spent %llu = providers "
              "earned %llu: %s\n",
              hashes.size(), identical ? "yes" : "NO", static_cast<unsigned long long>(renter.spent),
              static_cast<unsigned long long>(earned), reconciled ? "yes" : "NO");
  ::kill(coordinator->pid, SIGTERM);
  coordinator->wait();
  for (auto& d : daemons)
    if (d->pid > 0) ::kill(d->pid, SIGTERM);
  for (auto& d : daemons)
    if (d->pid > 0) d->wait();
  ::kill(market->pid, SIGTERM);
  market->wait();
  if (!(identical && reconciled)) {
    cleanup.keep = true;
    std::printf("  logs kept in %s\n", dir.c_str());
    return 1;
  }
  return 0;
}

}  // namespace meshtrain::tools
