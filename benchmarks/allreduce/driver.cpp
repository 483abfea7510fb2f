#include "driver.h"

#include <poll.h>
#include <signal.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <memory>
#include <thread>

#include "child.h"
#include "json.h"
#include "kernels/runtime.h"
#include "meshtrain/compress.h"
#include "meshtrain/crypto.h"
#include "netns.h"

namespace meshtrain::bench {

namespace fs = std::filesystem;
using namespace std::chrono_literals;

double median(std::vector<double> v) {
  if (v.empty()) return NAN;
  std::sort(v.begin(), v.end());
  size_t n = v.size();
  return n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

namespace {

template <typename... Args>
void progress(fmt::format_string<Args...> f, Args&&... args) {
  std::fprintf(stderr, "meshtrain-bench: %s\n", fmt::format(f, std::forward<Args>(args)...).c_str());
  std::fflush(stderr);
}

// A fresh private directory for the job's keys, allow-list and files; removed with its contents.
class TempDir {
 public:
  TempDir() {
    std::string pattern = (fs::temp_directory_path() / "meshtrain-bench-XXXXXX").string();
    if (!::mkdtemp(pattern.data())) throw_io_error("mkdtemp " + pattern, errno);
    path_ = pattern;
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  fs::path operator/(const std::string& name) const { return path_ / name; }

 private:
  fs::path path_;
};

struct Machine {
  std::string self_exe;
  std::string host;
  int64_t cores = 0;
};

Machine machine() {
  Machine m;
  std::error_code ec;
  m.self_exe = fs::read_symlink("/proc/self/exe", ec).string();
  if (ec) throw IoError("cannot read /proc/self/exe: " + ec.message());
  char name[256] = {};
  ::gethostname(name, sizeof name - 1);
  m.host = name;
  m.cores = ::sysconf(_SC_NPROCESSORS_ONLN);
  return m;
}

// A helper file: the flag, then $ENV, then next to the installed binary
// (<prefix>/share/meshtrain/benchmarks/NAME), then the source tree this was built from.
std::string find_resource(const std::optional<std::string>& given, const char* env, const std::string& name,
                          const std::string& source_path, const std::string& self_exe) {
  if (given) return *given;
  if (const char* e = std::getenv(env); e && *e) return e;
  fs::path installed = fs::path(self_exe).parent_path().parent_path() / "share" / "meshtrain" / "benchmarks" / name;
  if (fs::exists(installed)) return installed.string();
  return source_path;
}

struct WorkerResult {
  int index = 0;
  int rank = 0;
  bool verified = false;
  std::string verify_note;
  std::vector<double> seconds;
  std::vector<int64_t> start_ns, end_ns, attempts, members;
  int64_t wire_sent_bytes = -1;  // --codec: payload bytes this worker sent in its last iteration
  int64_t wire_received_bytes = -1;
  bool sparse_all_gather = false;
};

struct JobResult {
  std::vector<WorkerResult> workers;  // survivors only, in index order
  std::optional<int64_t> death_ns;    // --fault: when the victim killed itself
};

WorkerResult parse_worker(const std::string& who, const std::vector<std::string>& lines, size_t iterations) {
  for (auto it = lines.rbegin(); it != lines.rend(); ++it) {
    if (it->empty() || (*it)[0] != '{') continue;
    try {
      JsonObject o = parse_json_object(*it);
      WorkerResult r;
      r.index = static_cast<int>(field(o, "index").integer("index"));
      r.rank = static_cast<int>(field(o, "rank").integer("rank"));
      r.verified = field(o, "verified").boolean("verified");
      if (o.count("verify_note")) r.verify_note = o.at("verify_note").string("verify_note");
      r.seconds = number_array(o, "seconds");
      r.start_ns = integer_array(o, "start_ns");
      r.end_ns = integer_array(o, "end_ns");
      r.attempts = integer_array(o, "attempts");
      r.members = integer_array(o, "members");
      if (o.count("wire_sent_bytes")) {
        r.wire_sent_bytes = field(o, "wire_sent_bytes").integer("wire_sent_bytes");
        r.wire_received_bytes = field(o, "wire_received_bytes").integer("wire_received_bytes");
        r.sparse_all_gather = field(o, "sparse_all_gather").boolean("sparse_all_gather");
      }
      for (size_t n : {r.seconds.size(), r.start_ns.size(), r.end_ns.size(), r.attempts.size(), r.members.size()})
        if (n != iterations)
          throw std::runtime_error(fmt::format("{} values where {} iterations were run", n, iterations));
      return r;
    } catch (const std::runtime_error& e) {
      throw ProtocolError(fmt::format("{} printed an unusable result line: {}", who, e.what()));
    }
  }
  throw ProtocolError(fmt::format("{} exited without printing its result line", who));
}

std::string security_name(bool plain) { return plain ? "plain" : "encrypted"; }

// One job: coordinator + N workers with one bulk security setting.
JobResult run_job(const AllreduceOptions& o, const Machine& m, const NetnsHosts* net, bool plain) {
  TempDir dir;  // destroyed last: the children (declared below) die first
  const int n = o.peers;
  const int iterations = o.warmup + o.repeats;
  crypto::Identity coordinator_id = crypto::Identity::generate();
  coordinator_id.save_pem(dir / "coordinator.pem");
  {
    std::ofstream members(dir / "members.txt");
    for (int i = 0; i < n; ++i) {
      crypto::Identity id = crypto::Identity::generate();
      id.save_pem(dir / fmt::format("worker{}.pem", i));
      members << id.public_key().hex() << "\n";
    }
    if (!members) throw IoError(fmt::format("cannot write {}", (dir / "members.txt").string()));
  }

  std::vector<std::pair<std::string, std::string>> env;
  if (!std::getenv("MESHTRAIN_LOG")) env.emplace_back("MESHTRAIN_LOG", o.keep_logs ? "info" : "warn");
  auto host_of = [&](int worker) { return net ? worker % net->hosts() : 0; };
  auto in_host = [&](int host, std::vector<std::string> argv) {
    if (!net) return argv;
    std::vector<std::string> wrapped = {"ip", "netns", "exec", net->ns(host)};
    wrapped.insert(wrapped.end(), argv.begin(), argv.end());
    return wrapped;
  };
  auto address = [&](int host) { return net ? NetnsHosts::address(host) : std::string("127.0.0.1"); };

  // The coordinator (in host 0 under --wan).
  const std::string endpoint_file = (dir / "coordinator.endpoint").string();
  Child::Spec cs;
  cs.name = "coordinator";
  cs.argv = in_host(0, {m.self_exe, "allreduce-coordinator", "--bind", fmt::format("tcp://{}:0", address(0)), "--key",
                        (dir / "coordinator.pem").string(), "--allow", (dir / "members.txt").string(), "--min-peers",
                        std::to_string(o.fault ? n - 1 : n), "--heartbeat-timeout-ms",
                        std::to_string(o.effective_heartbeat_timeout_ms()), "--endpoint-file", endpoint_file});
  cs.env = env;
  cs.capture_stdout = false;
  cs.stdout_to_stderr = true;
  auto coordinator = std::make_unique<Child>(cs);
  std::string endpoint, coordinator_key;
  for (auto until = Clock::now() + 20s; endpoint.empty();) {
    std::ifstream in(endpoint_file);
    if (in >> endpoint >> coordinator_key) break;
    endpoint.clear();
    throw_if_interrupted();
    if (auto st = coordinator->poll_exit())
      throw Error(ErrorCode::Internal, fmt::format("the coordinator exited during start-up ({}); command: {}",
                                                   st->describe(), shell_join(cs.argv)));
    if (Clock::now() >= until) throw TimeoutError("the coordinator did not write its endpoint within 20 s");
    std::this_thread::sleep_for(10ms);
  }

  // The workers.
  const int victim = o.fault ? o.fault_victim() : -1;
  const std::string death_file = (dir / "victim.death_ns").string();
  std::vector<std::unique_ptr<Child>> workers;
  for (int i = 0; i < n; ++i) {
    std::vector<std::string> argv = {m.self_exe, "allreduce-worker", "--index", std::to_string(i), "--key",
                                     (dir / fmt::format("worker{}.pem", i)).string(), "--members",
                                     (dir / "members.txt").string(), "--coordinator-endpoint", endpoint,
                                     "--coordinator", coordinator_key, "--bytes", std::to_string(o.bytes),
                                     "--warmup", std::to_string(o.warmup), "--repeats", std::to_string(o.repeats),
                                     "--streams", std::to_string(o.streams), "--chunk-bytes",
                                     std::to_string(o.chunk_bytes), "--security", security_name(plain), "--host",
                                     address(host_of(i))};
    if (net && o.wan->delay.count() > 0) {
      argv.push_back("--relay-delay-us");
      argv.push_back(std::to_string(o.wan->delay.count()));
    }
    if (o.reduce_step) argv.push_back("--reduce-step");
    if (o.codec)
      argv.insert(argv.end(), {"--codec", *o.codec, "--sparse-gather", o.sparse_gather, "--exchange", o.exchange});
    if (o.shape) argv.insert(argv.end(), {"--shape", *o.shape});
    if (o.device != "cpu") argv.insert(argv.end(), {"--device", o.device});
    if (o.pageable_staging) argv.push_back("--pageable-staging");
    if (o.fault) {
      for (std::string s : {std::string("--fault-phase"), o.fault->phase, std::string("--fault-iteration"),
                            std::to_string(o.fault_iteration()), std::string("--fault-ring-step"),
                            std::to_string(o.fault->ring_step)})
        argv.push_back(s);
      if (i == victim) {
        argv.push_back("--death-file");
        argv.push_back(death_file);
      }
    }
    Child::Spec ws;
    ws.name = fmt::format("worker {}", i);
    ws.argv = in_host(host_of(i), argv);
    ws.env = env;
    ws.stdin_pipe = true;
    workers.push_back(std::make_unique<Child>(ws));
  }

  // Collect: every worker must exit 0 (the victim: killed by SIGKILL), within the timeout.
  const auto deadline = Clock::now() + std::chrono::seconds(o.timeout_s);
  for (;;) {
    std::vector<pollfd> fds;
    for (auto& w : workers)
      if (w->stdout_fd() >= 0) fds.push_back({w->stdout_fd(), POLLIN, 0});
    if (!fds.empty()) {
      ::poll(fds.data(), fds.size(), 100);
    } else {
      std::this_thread::sleep_for(20ms);
    }
    bool all_done = true;
    for (size_t i = 0; i < workers.size(); ++i) {
      auto& w = *workers[i];
      w.read_available();
      auto st = w.poll_exit();
      if (st && !st->ok()) {
        bool expected = static_cast<int>(i) == victim && st->signaled && st->code == SIGKILL;
        if (!expected)
          throw Error(ErrorCode::Internal,
                      fmt::format("{} failed ({}); its messages are above. Command: {}", w.name(), st->describe(),
                                  shell_join(w.argv())));
      }
      if (!st || w.stdout_fd() >= 0) all_done = false;
    }
    // Once every survivor printed its result line, let them exit (see worker.cpp).
    bool all_reported = true;
    for (size_t i = 0; i < workers.size(); ++i) {
      if (static_cast<int>(i) == victim) continue;
      const std::string& out = workers[i]->output();
      if (out.find('\n') == std::string::npos) all_reported = false;
    }
    if (all_reported)
      for (auto& w : workers) w->close_stdin();
    if (auto st = coordinator->poll_exit())
      throw Error(ErrorCode::Internal, fmt::format("the coordinator exited during the run ({})", st->describe()));
    if (all_done) break;
    throw_if_interrupted();
    if (Clock::now() >= deadline) {
      std::string running;
      for (auto& w : workers)
        if (!w->status()) running += (running.empty() ? "" : ", ") + w->name();
      throw TimeoutError(fmt::format("the job did not finish within {} s (--timeout-s); still running: {}",
                                     o.timeout_s, running));
    }
  }

  JobResult result;
  for (int i = 0; i < n; ++i) {
    if (i == victim) continue;
    result.workers.push_back(parse_worker(workers[i]->name(), workers[i]->lines(), static_cast<size_t>(iterations)));
  }
  if (o.fault) {
    std::ifstream in(death_file);
    int64_t ns = 0;
    if (!(in >> ns))
      throw Error(ErrorCode::Internal,
                  fmt::format("worker {} (the victim) was not killed: iteration {} never reached ring step {} of {}",
                              victim, o.fault_iteration(), o.fault->ring_step, o.fault->phase));
    result.death_ns = ns;
  }
  return result;
}

// Per timed iteration: the max over workers of their time (iterations [from, to)).
std::vector<double> iteration_times(const JobResult& r, int from, int to) {
  std::vector<double> out;
  for (int i = from; i < to; ++i) {
    double t = 0;
    for (const auto& w : r.workers) t = std::max(t, w.seconds[static_cast<size_t>(i)]);
    out.push_back(t);
  }
  return out;
}

JsonLine common_fields(const std::string& impl, const AllreduceOptions& o, const Machine& m, const std::string& security,
                       double seconds, int peers_for_bw) {
  JsonLine j;
  double algbw = static_cast<double>(o.bytes) / seconds / 1e9;
  j.add("impl", impl)
      .add("peers", o.peers)
      .add("bytes", o.bytes)
      .add("dtype", "float32")
      .add("security", security)
      .add("repeats", o.repeats)
      .add("warmup", o.warmup)
      .add("seconds", seconds)
      .add("algbw_GBps", algbw)
      .add("busbw_GBps", algbw * allreduce_bus_factor(peers_for_bw))
      .add("host", m.host)
      .add("cores", m.cores);
  return j;
}

// --wan's link baseline: every worker sends 2(n-1)/n x bytes (what a ring all-reduce sends per
// member) over one plain TCP connection to the next worker while receiving as much from the
// previous one, all starting at once. Returns the goodput per host in Mbit/s: bytes sent per
// worker / (last receive done - common start).
double run_tcp_ring(const AllreduceOptions& o, const Machine& m, const NetnsHosts& net) {
  const int n = o.peers;
  const uint64_t bytes = static_cast<uint64_t>(std::llround(static_cast<double>(o.bytes) * allreduce_bus_factor(n)));
  timespec ts{};
  ::clock_gettime(CLOCK_MONOTONIC, &ts);
  const int64_t start_ns = int64_t{ts.tv_sec} * 1000000000 + ts.tv_nsec + 1500000000;  // in 1.5 s
  auto port = [](int i) { return 29400 + i; };
  std::vector<std::unique_ptr<Child>> workers;
  for (int i = 0; i < n; ++i) {
    int next = (i + 1) % n;
    Child::Spec s;
    s.name = fmt::format("tcp ring worker {}", i);
    s.argv = {"ip", "netns", "exec", net.ns(i % net.hosts()), m.self_exe, "tcp-ring-worker", "--index",
              std::to_string(i), "--listen", fmt::format("{}:{}", NetnsHosts::address(i % net.hosts()), port(i)),
              "--next", fmt::format("{}:{}", NetnsHosts::address(next % net.hosts()), port(next)), "--bytes",
              std::to_string(bytes), "--start-ns", std::to_string(start_ns)};
    workers.push_back(std::make_unique<Child>(s));
  }
  int64_t done_ns = 0;
  const auto timeout = std::chrono::seconds(o.timeout_s);
  for (auto& w : workers) {
    auto st = w->wait(timeout);
    throw_if_interrupted();
    if (!st) throw TimeoutError(fmt::format("{} did not finish within {} s", w->name(), o.timeout_s));
    if (!st->ok()) throw Error(ErrorCode::Internal, fmt::format("{} failed ({}); command: {}", w->name(),
                                                                st->describe(), shell_join(w->argv())));
    auto lines = w->lines();
    if (lines.empty()) throw ProtocolError(fmt::format("{} printed no result", w->name()));
    JsonObject r = parse_json_object(lines.back());
    done_ns = std::max(done_ns, field(r, "done_ns").integer("done_ns"));
  }
  double seconds = (done_ns - start_ns) / 1e9;
  return static_cast<double>(bytes) * 8 / seconds / 1e6;
}

struct Baseline {
  double busbw_GBps = 0;
  std::string line;
};

std::optional<Baseline> run_gloo(const AllreduceOptions& o, const Machine& m) {
  auto [st, version] = run_command({o.python, "-c", "import torch, torch.distributed as d; "
                                                    "assert d.is_available() and d.is_gloo_available(); "
                                                    "print(torch.__version__)"},
                                   180s);
  if (!st.ok()) {
    progress("WARNING: --baseline gloo skipped: '{} -c \"import torch\"' failed ({}). Install PyTorch with "
             "`apt-get install python3-torch` (Debian) and run again.",
             o.python, st.describe());
    return std::nullopt;
  }
  while (!version.empty() && (version.back() == '\n' || version.back() == '\r')) version.pop_back();
  const std::string script = find_resource(o.gloo_script, "MESHTRAIN_GLOO_SCRIPT", "gloo_allreduce.py",
                                           MESHTRAIN_BENCH_SOURCE_DIR "/allreduce/gloo_allreduce.py", m.self_exe);
  std::vector<std::string> argv = {o.python,           script, "--peers", std::to_string(o.peers), "--bytes",
                                   std::to_string(o.bytes), "--warmup", std::to_string(o.warmup), "--repeats",
                                   std::to_string(o.repeats), "--timeout-s", std::to_string(o.timeout_s)};
  progress("baseline: torch {} gloo, {} ranks, {} bytes: {}", version, o.peers, o.bytes, shell_join(argv));
  auto [status, out] = run_command(argv, std::chrono::seconds(o.timeout_s + 30),
                                   {{"OMP_NUM_THREADS", "1"}, {"GLOO_SOCKET_IFNAME", "lo"}});
  if (!status.ok()) throw Error(ErrorCode::Internal, fmt::format("the gloo baseline failed ({})", status.describe()));
  std::string last;
  for (size_t start = 0, nl; (nl = out.find('\n', start)) != std::string::npos; start = nl + 1)
    if (out.compare(start, 1, "{") == 0) last = out.substr(start, nl - start);
  if (last.empty()) throw ProtocolError("the gloo baseline printed no JSON line");
  JsonObject g = parse_json_object(last);
  double seconds = field(g, "seconds").number("seconds");
  JsonLine j = common_fields("gloo", o, m, "plain", seconds, o.peers);
  j.add("streams", 1).add("verified", field(g, "verified").boolean("verified")).add("torch", version);
  j.add("iteration_seconds", number_array(g, "iteration_seconds"));
  Baseline b;
  b.busbw_GBps = static_cast<double>(o.bytes) / seconds / 1e9 * allreduce_bus_factor(o.peers);
  b.line = j.str();
  return b;
}

void emit(const std::string& line) {
  std::printf("%s\n", line.c_str());
  std::fflush(stdout);
}

}  // namespace

int run_allreduce(const AllreduceOptions& o) {
  install_interrupt_handlers();
  const Machine m = machine();
  if (o.device == "cuda" && cuda::device_count() == 0) {
    progress("--device cuda needs a CUDA device: {}", cuda::runtime_description());
    return 77;
  }
  std::unique_ptr<NetnsHosts> net;
  if (o.wan) {
    const std::string script = find_resource(o.netns_script, "MESHTRAIN_NETNS_SCRIPT", "netns.sh",
                                             MESHTRAIN_BENCH_SOURCE_DIR "/wan/netns.sh", m.self_exe);
    if (auto why = NetnsHosts::check(script)) {
      progress("--wan needs network namespaces: {}", *why);
      return 77;
    }
    if (o.peers % o.wan->hosts != 0 || o.peers < o.wan->hosts)
      progress("note: {} workers on {} hosts: worker i runs in host i % {}, so hosts carry unequal loads", o.peers,
               o.wan->hosts, o.wan->hosts);
    std::string prefix = fmt::format("mtb{}", ::getpid() % 1000000);
    progress("setting up {} hosts at {} Mbit/s (namespaces {}h0..), one-way delay per hop {} ms", o.wan->hosts,
             o.wan->rate_mbit, prefix, o.wan->delay.count() / 1000.0);
    net = std::make_unique<NetnsHosts>(script, o.wan->hosts, o.wan->rate_mbit, prefix);
  }

  std::optional<double> tcp_goodput_mbit;
  if (net) {
    progress("link baseline: plain TCP ring between the hosts, {:.0f} bytes per host (what the all-reduce sends)",
             static_cast<double>(o.bytes) * allreduce_bus_factor(o.peers));
    tcp_goodput_mbit = run_tcp_ring(o, m, *net);
    progress("link baseline: {:.1f} Mbit/s per host ({:.1f}% of the {} Mbit/s link rate)", *tcp_goodput_mbit,
             100 * *tcp_goodput_mbit / o.wan->rate_mbit, o.wan->rate_mbit);
  }

  std::optional<Baseline> baseline;
  if (o.baseline) {
    baseline = run_gloo(o, m);
    if (baseline) emit(baseline->line);
  }

  for (bool plain : {true, false}) {
    if ((plain && !o.plain) || (!plain && !o.encrypted)) continue;
    const std::string security = security_name(plain);
    progress("meshtrain {}: {} peers, {} bytes, {}, {} stream(s), chunk {} bytes, warmup {} + repeats {}{}{}{}",
             o.reduce_step ? "reduce_step" : "allreduce", o.peers, o.bytes, security, o.streams, o.chunk_bytes, o.warmup, o.repeats, o.wan ? ", wan " + o.wan->text : "",
             o.fault ? ", fault " + o.fault->text : "", o.codec ? ", codec " + *o.codec : "");
    JobResult r = run_job(o, m, net.get(), plain);
    bool verified = true;
    std::string note;
    for (const auto& w : r.workers)
      if (!w.verified) {
        verified = false;
        note = fmt::format("worker {}: {}", w.index, w.verify_note);
      }
    JsonLine j;
    double seconds = 0;
    if (!o.fault) {
      std::vector<double> times = iteration_times(r, o.warmup, o.warmup + o.repeats);
      seconds = median(times);
      j = common_fields("meshtrain", o, m, security, seconds, o.peers);
      j.add("op", o.reduce_step ? "reduce_step" : "allreduce");
      j.add("streams", o.streams).add("chunk_bytes", o.chunk_bytes).add("verified", verified);
      if (!verified) j.add("verify_note", note);
      if (baseline) j.add("ratio_vs_baseline", (static_cast<double>(o.bytes) / seconds / 1e9 *
                                                allreduce_bus_factor(o.peers)) / baseline->busbw_GBps);
      j.add("min_seconds", *std::min_element(times.begin(), times.end()))
          .add("max_seconds", *std::max_element(times.begin(), times.end()))
          .add("iteration_seconds", times);
    } else {
      const int k = o.fault_iteration();
      std::vector<double> before = iteration_times(r, o.warmup, k);
      std::vector<double> after = iteration_times(r, k + 1, o.warmup + o.repeats);
      seconds = median(before);
      double reduction_after = median(after);
      int64_t done_ns = 0, start_ns = INT64_MAX, attempts = 0, peers_after = 0, next_done_ns = 0;
      for (const auto& w : r.workers) {
        done_ns = std::max(done_ns, w.end_ns[static_cast<size_t>(k)]);
        next_done_ns = std::max(next_done_ns, w.end_ns[static_cast<size_t>(k + 1)]);
        start_ns = std::min(start_ns, w.start_ns[static_cast<size_t>(k)]);
        attempts = std::max(attempts, w.attempts[static_cast<size_t>(k)]);
        peers_after = std::max(peers_after, w.members[static_cast<size_t>(k + 1)]);
      }
      double recovery = (done_ns - *r.death_ns) / 1e9;
      double bound = o.effective_heartbeat_timeout_ms() / 1000.0 + reduction_after;
      j = common_fields("meshtrain", o, m, security, seconds, o.peers);
      j.add("op", "reduce_step");
      j.add("streams", o.streams).add("chunk_bytes", o.chunk_bytes).add("verified", verified);
      if (!verified) j.add("verify_note", note);
      j.add("fault", o.fault->text)
          .add("fault_iteration", k)
          .add("victim", o.fault_victim())
          .add("fault_ring_step", static_cast<uint64_t>(o.fault->ring_step))
          .add("recovery_seconds", recovery)
          .add("fault_iteration_seconds", (done_ns - start_ns) / 1e9)
          .add("attempts", attempts)
          .add("peers_after", peers_after)
          .add("heartbeat_timeout_ms", o.effective_heartbeat_timeout_ms())
          .add("reduction_seconds_before", seconds)
          .add("reduction_seconds", reduction_after)
          .add("recovery_bound_seconds", bound)
          .add("within_bound", recovery <= bound)
          // The step after the faulty one: the coordinator may still wait for the dead member
          // there (it is excused only for the step it was reported in) until heartbeat timeout.
          .add("next_iteration_seconds", iteration_times(r, k + 1, k + 2).front())
          .add("resume_seconds", (next_done_ns - *r.death_ns) / 1e9)
          .add("resume_bound_seconds", bound + reduction_after)
          .add("iteration_seconds", iteration_times(r, o.warmup, o.warmup + o.repeats));
    }
    {
      // Effective bandwidth: uncompressed gradient bytes per second. Wire: payload bytes one
      // member sends per all-reduce (the largest over members; the plain ring's is computed).
      const double plain_wire = static_cast<double>(o.bytes) * allreduce_bus_factor(o.peers);
      int64_t wire = -1;
      bool sparse_all_gather = false;
      for (const auto& w : r.workers) {
        wire = std::max(wire, w.wire_sent_bytes);
        sparse_all_gather = sparse_all_gather || w.sparse_all_gather;
      }
      j.add("codec", o.codec ? compress::make_codec(*o.codec)->describe() : std::string("plain"));
      j.add("device", o.device);
      if (o.device == "cuda") j.add("host_staging", o.pageable_staging ? "pageable" : "pinned");
      if (o.codec) j.add("exchange", o.exchange);
      if (o.codec && compress::make_codec(*o.codec)->id() == compress::CodecId::TopK)
        j.add("sparse_gather", o.sparse_gather).add("sparse_all_gather", sparse_all_gather);
      if (o.shape) j.add("shape", *o.shape);
      const double wire_bytes = o.codec ? static_cast<double>(wire) : plain_wire;
      j.add("effective_Mbps", static_cast<double>(o.bytes) * 8 / seconds / 1e6)
          .add("wire_sent_bytes", static_cast<int64_t>(std::llround(wire_bytes)))
          .add("wire_vs_plain", wire_bytes / plain_wire);
    }
    if (o.wan) {
      double busbw = static_cast<double>(o.bytes) / seconds / 1e9 * allreduce_bus_factor(o.peers);
      j.add("wan", o.wan->text)
          .add("wan_hosts", o.wan->hosts)
          .add("link_rate_Mbps", o.wan->rate_mbit)
          .add("delay_ms", o.wan->delay.count() / 1000.0)
          .add("busbw_vs_link", busbw * 8e9 / (o.wan->rate_mbit * 1e6));
      if (tcp_goodput_mbit)
        j.add("tcp_ring_Mbps", *tcp_goodput_mbit).add("busbw_vs_tcp_ring", busbw * 8e9 / (*tcp_goodput_mbit * 1e6));
    }
    emit(j.str());
    progress("meshtrain {}: median {:.4f} s, busbw {:.3f} GB/s{}", security, seconds,
             static_cast<double>(o.bytes) / seconds / 1e9 * allreduce_bus_factor(o.peers),
             verified ? "" : " (RESULT CHECK FAILED: " + note + ")");
    if (!verified) return 1;
  }
  return 0;
}

}  // namespace meshtrain::bench
