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
  --join-at STEP   a new worker joins at that step (default 25; 0: never)
  --dim N          model size (default 1024 parameters)
  --step-ms MS     pause per step so the run can be followed (default 50)
  --plain          unencrypted bulk streams (default: AES-256-GCM)
  --help           this text
)";

using Flags = std::map<std::string, std::string>;

Flags parse(int argc, char** argv, int first) {
  Flags flags;
  for (int i = first; i < argc; ++i) {
    std::string key = argv[i];
    if (key.rfind("--", 0) != 0) throw InvalidArgumentError(fmt::format("unexpected argument '{}'", key));
    if (i + 1 < argc && std::string(argv[i + 1]).rfind("--", 0) != 0) {
      flags[key] = argv[++i];
    } else {
      flags[key] = "";
    }
  }
  return flags;
}

uint64_t number(const Flags& f, const std::string& key, uint64_t fallback) {
  auto it = f.find(key);
  if (it == f.end()) return fallback;
  try {
    size_t used = 0;
    uint64_t v = std::stoull(it->second, &used);
    if (used != it->second.size()) throw std::invalid_argument("trailing characters");
    return v;
  } catch (const std::exception&) {
    throw InvalidArgumentError(fmt::format("{} expects a number, got '{}'", key, it->second));
  }
}

std::string required(const Flags& f, const std::string& key) {
  auto it = f.find(key);
  if (it == f.end()) throw InvalidArgumentError(fmt::format("missing {}", key));
  return it->second;
}

fs::path self_exe() { return fs::read_symlink("/proc/self/exe"); }

// The problem: y = X w* + noise, worker i holds rows [i*rows, (i+1)*rows) generated from seed i.
struct Shard {
  size_t rows = 512;
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
  Flags f = parse(argc, argv, 2);
  const uint64_t index = number(f, "--index", 0);
  const uint64_t steps = number(f, "--steps", 40);
  const uint64_t die_at = number(f, "--die-at", 0);
  const uint64_t step_ms = number(f, "--step-ms", 50);
  uint64_t step = number(f, "--start-step", 1);
  const size_t dim = number(f, "--dim", 1024);
  const fs::path dir = required(f, "--dir");

  auto self = crypto::Identity::load_pem(dir / fmt::format("worker{}.pem", index));
  collective::CommunicatorOptions o;
  o.coordinator_endpoint = required(f, "--coordinator-endpoint");
  o.coordinator = crypto::PeerId::from_hex(required(f, "--coordinator"));
  o.members = net::AllowList::load(dir / "members.txt");
  if (f.count("--plain")) o.bulk.security = net::BulkSecurity::Plain;
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
  bool has_state = !f.count("--join");
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
    progress << step << std::endl;
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

namespace {

struct Child {
  pid_t pid = -1;
  std::string name;
  ~Child() {
    if (pid > 0) {
      ::kill(pid, SIGKILL);
      ::waitpid(pid, nullptr, 0);
    }
  }
  int wait() {
    int status = 0;
    ::waitpid(pid, &status, 0);
    pid = -1;
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  }
};

// Starts args[0]; its stdout goes to `stdout_path` when given.
std::unique_ptr<Child> spawn(const std::string& name, std::vector<std::string> args, const char* stdout_path = nullptr) {
  auto child = std::make_unique<Child>();
  child->name = name;
  child->pid = ::fork();
  if (child->pid < 0) throw_io_error("fork", errno);
  if (child->pid == 0) {
    if (stdout_path) {
      int fd = ::open(stdout_path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
      if (fd >= 0) ::dup2(fd, STDOUT_FILENO);
    }
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    ::execv(argv[0], argv.data());
    std::perror("execv");
    _exit(127);
  }
  return child;
}

uint64_t last_step(const fs::path& progress) {
  std::ifstream in(progress);
  uint64_t step = 0, s;
  while (in >> s) step = s;
  return step;
}

}  // namespace

int demo_command(int argc, char** argv) {
  Flags f = parse(argc, argv, 2);
  if (f.count("--help")) {
    std::fputs(kUsage, stdout);
    return 0;
  }
  const uint64_t workers = number(f, "--workers", 4);
  const uint64_t steps = number(f, "--steps", 40);
  const uint64_t kill_at = number(f, "--kill-at", 15);
  const uint64_t join_at = number(f, "--join-at", 25);
  const uint64_t dim = number(f, "--dim", 1024);
  const uint64_t step_ms = number(f, "--step-ms", 50);
  if (workers < 2) throw InvalidArgumentError("--workers must be at least 2");
  if (kill_at > steps || join_at > steps) throw InvalidArgumentError("--kill-at and --join-at must be <= --steps");

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
  const fs::path coordinator_exe = exe.parent_path() / "meshtrain-coordinator";
  if (!fs::exists(coordinator_exe))
    throw IoError(fmt::format("meshtrain-coordinator not found next to {} (expected {})", exe.string(),
                              coordinator_exe.string()));
  std::printf("meshtrain demo: %llu workers, %llu steps, %llu parameters, %s bulk streams\n",
              static_cast<unsigned long long>(workers), static_cast<unsigned long long>(steps),
              static_cast<unsigned long long>(dim), f.count("--plain") ? "plain" : "AES-256-GCM");
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
  std::string endpoint, key;
  for (int i = 0; i < 1000 && key.empty(); ++i) {
    std::ifstream in(dir / "endpoint");
    if (!(in >> endpoint >> key)) std::this_thread::sleep_for(10ms);
  }
  if (key.empty()) throw TimeoutError("meshtrain-coordinator did not start within 10 s");

  auto worker_args = [&](uint64_t i) {
    std::vector<std::string> a = {exe.string(), "demo-worker", "--index", std::to_string(i), "--dir", dir.string(),
                                  "--coordinator-endpoint", endpoint, "--coordinator", key, "--steps",
                                  std::to_string(steps), "--dim", std::to_string(dim), "--step-ms",
                                  std::to_string(step_ms)};
    if (f.count("--plain")) a.push_back("--plain");
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
    while (last_step(progress) + 3 < join_at && Clock::now() < until) std::this_thread::sleep_for(20ms);
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
