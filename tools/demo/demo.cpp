// `meshtrain demo`: trains a least-squares model data-parallel on loopback with real processes:
// one meshtrain-coordinator and N workers, each holding its own shard of the data. Gradients
// are averaged with Communicator::reduce_step over encrypted bulk streams. On the way one worker
// is SIGKILLed in the middle of a reduction (the others retry the step without it) and a new
// worker joins (it receives the parameters, then contributes). At the end the members'
// parameters are compared byte for byte.
#include "demo/demo.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "common/flags.h"
#include "demo/processes.h"
#include "meshtrain/collective.h"

namespace fs = std::filesystem;
using namespace std::chrono_literals;

namespace meshtrain::tools {
namespace {

const char* const kUsage = R"(usage: meshtrain demo [options]

Runs a small data-parallel job on this machine: a coordinator and N worker processes train a
linear least-squares model, averaging gradients every step over authenticated, encrypted
streams. One worker is killed mid-reduction and another joins later, to show that the job
goes on and that every member ends with identical parameters.

options:
  --workers N      workers at the start (default 4, at least 2)
  --steps N        optimizer steps (default 40)
  --kill-at STEP   SIGKILL one worker during that step's all-gather (default 15; 0: never)
  --join-at STEP   a new worker joins at that step (default 25; 0: never; not with --market,
                   where the replacement provider's worker is the joiner)
  --dim N          model size (default 1024 parameters)
  --step-ms MS     pause per step so the run can be followed (default 50; 200 with --market)
  --plain          unencrypted bulk streams (default: AES-256-GCM)
  --market         rent the workers' GPUs on a local devnet market and pay them per step
                   (see below)
  --cloud-price-per-gpu-hour C
                   with --market: also print what the same GPU time costs at C per GPU-hour
                   (a price you supply; meshtrain has no price list)
  --help           this text

With --market the job runs on rented providers: a meshtrain-market (SQLite ledger) and N+1
meshtrain-provider daemons start; the job owner rents N of them through a Fleet, tells each
daemon where the job's coordinator is, and the daemons start the workers. Every step the owner
pays each provider with a signed voucher. Instead of one worker dying, provider 1's host dies
(its worker and its daemon are SIGKILLed at --kill-at); the fleet closes that lease as failed,
rents the standby provider and attaches it, and its worker joins the job. At the end the ledger
is reconciled: what the owner spent is exactly what the providers earned.
)";

const std::initializer_list<Flags::Spec> kDemoFlags = {
    {"--workers"}, {"--steps"}, {"--kill-at"}, {"--join-at"}, {"--dim"}, {"--step-ms"}, {"--plain", false},
    {"--market", false}, {"--cloud-price-per-gpu-hour"}};
const std::initializer_list<Flags::Spec> kWorkerFlags = {
    {"--index"}, {"--steps"}, {"--die-at"}, {"--step-ms"}, {"--start-step"}, {"--dim"}, {"--dir"},
    {"--coordinator-endpoint"}, {"--coordinator"}, {"--plain", false}, {"--join", false}};
constexpr uint64_t kMaxNumber = 1ull << 40;

// The problem: y = X w* + noise, worker i holds rows [i*rows, (i+1)*rows) generated from seed i.
struct Shard {
  size_t rows = kRowsPerWorker;
  size_t dim;
  std::vector<float> x;  // rows x dim
  std::vector<float> y;

  Shard(uint64_t worker, size_t d) : dim(d), x(rows * d), y(rows) {
    std::mt19937_64 truth_rng(12345);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    std::vector<float> truth(d);
    for (auto& t : truth) t = normal(truth_rng);
    std::mt19937_64 rng(1000 + worker);
    for (size_t r = 0; r < rows; ++r) {
      double dot = 0;
      for (size_t c = 0; c < d; ++c) {
        x[r * d + c] = normal(rng) / std::sqrt(static_cast<float>(d));
        dot += x[r * d + c] * truth[c];
      }
      y[r] = static_cast<float>(dot) + 0.01f * normal(rng);
    }
  }

  // Mean squared error and its gradient at w (the gradient goes into grad[0..dim)).
  double loss_and_gradient(const std::vector<float>& w, std::vector<float>& grad) const {
    std::fill(grad.begin(), grad.begin() + dim, 0.0f);
    double loss = 0;
    for (size_t r = 0; r < rows; ++r) {
      double pred = 0;
      for (size_t c = 0; c < dim; ++c) pred += x[r * dim + c] * w[c];
      double err = pred - y[r];
      loss += err * err;
      for (size_t c = 0; c < dim; ++c) grad[c] += static_cast<float>(2.0 * err / rows) * x[r * dim + c];
    }
    return loss / rows;
  }
};

}  // namespace

int demo_worker_command(int argc, char** argv) {
  Flags f(argc, argv, 2, kWorkerFlags, "usage: meshtrain demo-worker (started by `meshtrain demo`)");
  const uint64_t index = f.number("--index", 0, 0, 1 << 20);
  const uint64_t steps = f.number("--steps", 40, 1, kMaxNumber);
  const uint64_t die_at = f.number("--die-at", 0, 0, kMaxNumber);
  const uint64_t step_ms = f.number("--step-ms", 50, 0, 3600000);
  uint64_t step = f.number("--start-step", 1, 1, kMaxNumber);
  const size_t dim = f.number("--dim", 1024, 1, 1 << 26);
  const fs::path dir = f.required("--dir");

  auto self = crypto::Identity::load_pem(dir / fmt::format("worker{}.pem", index));
  collective::CommunicatorOptions o;
  o.coordinator_endpoint = f.required("--coordinator-endpoint");
  o.coordinator = crypto::PeerId::from_hex(f.required("--coordinator"), "--coordinator");
  o.members = net::AllowList::load(dir / "members.txt");
  if (f.has("--plain")) o.bulk.security = net::BulkSecurity::Plain;
  o.bulk.peer_timeout = 3s;
  uint64_t current = 0;
  if (die_at)
    o.fault_hook = [&](std::string_view phase, size_t ring_step) {
      if (current == die_at && phase == "all_gather" && ring_step == 0) {
        std::printf("  worker %llu: dying now (SIGKILL) in the middle of step %llu's all-gather\n",
                    static_cast<unsigned long long>(index), static_cast<unsigned long long>(current));
        std::fflush(stdout);
        ::raise(SIGKILL);
      }
    };
  collective::Communicator comm(self, o);

  Shard shard(index, dim);
  std::vector<float> w(dim, 0.0f);
  std::vector<float> grad(dim + 1);  // the last slot carries the loss, so it is averaged too
  bool has_state = !f.has("--join");
  std::ofstream progress(dir / fmt::format("worker{}.progress", index), std::ios::app);
  // x ~ N(0, 1/dim): the Hessian's largest eigenvalue is about 6/dim with twice as many rows
  // as parameters, so this step size converges without overshooting.
  const float lr = 0.25f * static_cast<float>(dim);
  while (step <= steps) {
    current = step;
    std::this_thread::sleep_for(std::chrono::milliseconds(step_ms));
    const coord::Quorum* q;
    try {
      q = &comm.next_quorum(step, has_state);
    } catch (const collective::StepMissedError& e) {
      step = e.next_step;
      has_state = false;
      continue;
    }
    if (q->state_source_rank >= 0) {
      comm.broadcast(BufferView{w.data(), w.size(), DType::Float32}, q->state_source_rank);
      if (!has_state)
        std::printf("  worker %llu: joined at step %llu, parameters received from rank %d\n",
                    static_cast<unsigned long long>(index), static_cast<unsigned long long>(step),
                    q->state_source_rank);
      has_state = true;
    }
    grad[dim] = static_cast<float>(shard.loss_and_gradient(w, grad));
    collective::StepResult r = comm.reduce_step(step, BufferView{grad.data(), grad.size(), DType::Float32});
    for (size_t c = 0; c < dim; ++c) w[c] -= lr * grad[c];
    progress << step << " " << grad[dim] << std::endl;
    if (comm.rank() == 0)
      std::printf("step %3llu  loss %.6f  members %zu  contributors %zu  attempts %u\n",
                  static_cast<unsigned long long>(step), grad[dim], r.quorum.members.size(), r.contributors.size(),
                  r.attempts);
    std::fflush(stdout);
    ++step;
  }
  std::ofstream(dir / fmt::format("worker{}.result", index))
      << crypto::to_hex(crypto::sha256(crypto::ByteSpan(reinterpret_cast<const uint8_t*>(w.data()), w.size() * 4)))
      << "\n";
  comm.leave();
  return 0;
}

int demo_command(int argc, char** argv) {
  Flags f(argc, argv, 2, kDemoFlags, kUsage);
  if (f.help()) {
    std::fputs(kUsage, stdout);
    return 0;
  }
  if (!f.positional().empty()) f.fail(fmt::format("unexpected argument '{}'", f.positional()[0]));
  DemoSettings settings;
  settings.workers = f.number("--workers", 4, 2, 64);
  settings.steps = f.number("--steps", 40, 1, kMaxNumber);
  settings.kill_at = f.number("--kill-at", 15, 0, kMaxNumber);
  settings.join_at = f.number("--join-at", 25, 0, kMaxNumber);
  settings.dim = f.number("--dim", 1024, 1, 1 << 26);
  // On the market the replacement of a failed provider takes about a second to rent and attach:
  // slower steps leave it time to join before the job ends.
  settings.step_ms = f.number("--step-ms", f.has("--market") ? 200 : 50, 0, 3600000);
  settings.plain = f.has("--plain");
  settings.cloud_price_per_gpu_hour = f.real("--cloud-price-per-gpu-hour", 0, 0, 1e12);
  if (settings.cloud_price_per_gpu_hour > 0 && !f.has("--market"))
    f.fail("--cloud-price-per-gpu-hour goes with --market");
  if (settings.kill_at > settings.steps || settings.join_at > settings.steps)
    f.fail("--kill-at and --join-at must be <= --steps");
  if (f.has("--market")) {
    if (settings.kill_at && settings.kill_at + 10 > settings.steps)
      f.fail("with --market, --kill-at must leave at least 10 steps for the replacement to join");
    return market_demo(settings);
  }
  const uint64_t workers = settings.workers, steps = settings.steps, kill_at = settings.kill_at,
                 join_at = settings.join_at, dim = settings.dim, step_ms = settings.step_ms;

  char pattern[] = "/tmp/meshtrain-demo-XXXXXX";
  if (!::mkdtemp(pattern)) throw_io_error("mkdtemp", errno);
  const fs::path dir = pattern;
  struct Cleanup {
    fs::path dir;
    ~Cleanup() {
      std::error_code ec;
      fs::remove_all(dir, ec);
    }
  } cleanup{dir};

  const uint64_t total = workers + (join_at ? 1 : 0);
  std::ofstream members(dir / "members.txt");
  for (uint64_t i = 0; i < total; ++i) {
    auto id = crypto::Identity::generate();
    id.save_pem(dir / fmt::format("worker{}.pem", i));
    members << id.public_key().hex() << "\n";
  }
  members.close();
  auto coordinator_id = crypto::Identity::generate();
  coordinator_id.save_pem(dir / "coordinator.pem");

  const fs::path exe = self_exe();
  const fs::path coordinator_exe = sibling(exe, "meshtrain-coordinator");
  std::printf("meshtrain demo: %llu workers, %llu steps, %llu parameters, %s bulk streams\n",
              static_cast<unsigned long long>(workers), static_cast<unsigned long long>(steps),
              static_cast<unsigned long long>(dim), settings.plain ? "plain" : "AES-256-GCM");
  if (kill_at) std::printf("  worker 1 will be killed (SIGKILL) during step %llu\n", static_cast<unsigned long long>(kill_at));
  if (join_at)
    std::printf("  worker %llu will join at step %llu\n", static_cast<unsigned long long>(workers),
                static_cast<unsigned long long>(join_at));
  std::fflush(stdout);

  // The processes log warnings only, unless the user asked for more.
  ::setenv("MESHTRAIN_LOG", "warn", /*overwrite=*/0);
  std::vector<std::unique_ptr<Child>> children;
  auto coordinator = spawn("coordinator", {coordinator_exe.string(), "--bind", "tcp://127.0.0.1:0", "--key",
                                           (dir / "coordinator.pem").string(), "--allow",
                                           (dir / "members.txt").string(), "--min-peers", "2",
                                           "--heartbeat-timeout-ms", "2000", "--quorum-timeout-ms", "5000",
                                           "--print-endpoint-file", (dir / "endpoint").string()},
                           "/dev/null");  // its status lines would interleave with the workers'; warnings still show
  auto [endpoint, coordinator_key] = wait_endpoint(dir / "endpoint", *coordinator, "meshtrain-coordinator", 10s);
  const std::string key = coordinator_key.hex();

  auto worker_args = [&](uint64_t i) {
    std::vector<std::string> a = {exe.string(), "demo-worker", "--index", std::to_string(i), "--dir", dir.string(),
                                  "--coordinator-endpoint", endpoint, "--coordinator", key, "--steps",
                                  std::to_string(steps), "--dim", std::to_string(dim), "--step-ms",
                                  std::to_string(step_ms)};
    if (settings.plain) a.push_back("--plain");
    return a;
  };
  for (uint64_t i = 0; i < workers; ++i) {
    auto a = worker_args(i);
    if (kill_at && i == 1) {
      a.push_back("--die-at");
      a.push_back(std::to_string(kill_at));
    }
    children.push_back(spawn(fmt::format("worker {}", i), a));
  }
  if (join_at) {
    // Start the joiner a few steps ahead so that it is waiting when the job reaches join_at.
    const fs::path progress = dir / "worker0.progress";
    auto until = Clock::now() + std::chrono::seconds(120);
    while (last_progress(progress).step + 3 < join_at && Clock::now() < until) std::this_thread::sleep_for(20ms);
    auto a = worker_args(workers);
    a.insert(a.end(), {"--join", "--start-step", std::to_string(join_at)});
    children.push_back(spawn(fmt::format("worker {}", workers), a));
  }

  int failures = 0;
  std::vector<std::string> results;
  for (uint64_t i = 0; i < children.size(); ++i) {
    int code = children[i]->wait();
    bool killed_on_purpose = kill_at && i == 1;
    if (killed_on_purpose) {
      std::printf("  %s ended with %s, as planned\n", children[i]->name.c_str(),
                  code == 128 + SIGKILL ? "SIGKILL" : fmt::format("exit code {}", code).c_str());
      continue;
    }
    if (code != 0) {
      std::printf("  %s failed (exit code %d)\n", children[i]->name.c_str(), code);
      ++failures;
      continue;
    }
    std::ifstream in(dir / fmt::format("worker{}.result", i));
    std::string hash;
    in >> hash;
    results.push_back(hash);
  }
  coordinator->pid > 0 ? (void)::kill(coordinator->pid, SIGTERM) : (void)0;
  coordinator->wait();
  bool identical = !results.empty();
  for (const auto& r : results) identical = identical && r == results[0];
  std::printf("meshtrain demo: %zu workers finished; parameters identical on all of them: %s%s\n", results.size(),
              identical ? "yes (sha256 " : "NO", identical ? (results[0].substr(0, 16) + "...)").c_str() : "");
  return failures == 0 && identical ? 0 : 1;
}

}  // namespace meshtrain::tools
