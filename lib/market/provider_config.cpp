// Provider settings from the config file, and GPU detection through nvidia-smi.
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <charconv>
#include <cmath>
#include <cstdlib>
#include <map>

#include "checkpoint/internal.h"
#include "core/json.h"
#include "market/provider.h"

namespace meshtrain::market {

namespace fs = std::filesystem;

namespace {

constexpr size_t kMaxConfigBytes = 1 << 20;
constexpr size_t kMaxNvidiaSmiBytes = 1 << 20;
constexpr uint64_t kMaxIntervalMs = 7ull * 24 * 3600 * 1000;

std::string_view trim(std::string_view s) {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t' || s.front() == '\r')) s.remove_prefix(1);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t' || s.back() == '\r')) s.remove_suffix(1);
  return s;
}

GpuSpec read_gpu(const json::Field& f) {
  f.only_keys({"model", "count", "vram_gib", "cuda_capability"});
  GpuSpec gpu;
  gpu.model = f.at("model").str();
  gpu.count = static_cast<uint32_t>(f.at("count").u64(1024));
  gpu.vram_gib = static_cast<uint32_t>(f.at("vram_gib").u64(1 << 20));
  gpu.cuda_capability = f.at("cuda_capability").str();
  if (gpu.model.empty()) f.at("model").fail("must not be empty");
  if (gpu.count == 0) f.at("count").fail("must be at least 1");
  return gpu;
}

// Finds `name` in $PATH like execvp would.
std::optional<fs::path> find_on_path(std::string_view name) {
  const char* path = std::getenv("PATH");
  if (!path) return std::nullopt;
  std::string_view rest = path;
  while (true) {
    size_t colon = rest.find(':');
    std::string_view dir = rest.substr(0, colon);
    fs::path candidate = fs::path(dir.empty() ? "." : std::string(dir)) / std::string(name);
    if (::access(candidate.c_str(), X_OK) == 0) return candidate;
    if (colon == std::string_view::npos) return std::nullopt;
    rest.remove_prefix(colon + 1);
  }
}

// Runs `program args...`, returns its stdout; IoError / TimeoutError naming it when it cannot be
// run, fails, or takes longer than `timeout` (it is killed then).
std::string run_capture(const fs::path& program, const std::vector<std::string>& args,
                        std::chrono::milliseconds timeout) {
  int fds[2];
  if (::pipe2(fds, O_CLOEXEC) != 0) throw_io_error("pipe for " + program.string(), errno);
  std::vector<std::string> argv_storage{program.string()};
  argv_storage.insert(argv_storage.end(), args.begin(), args.end());
  std::vector<char*> argv;
  for (auto& a : argv_storage) argv.push_back(a.data());
  argv.push_back(nullptr);
  pid_t pid = ::fork();
  if (pid < 0) {
    ::close(fds[0]);
    ::close(fds[1]);
    throw_io_error("fork for " + program.string(), errno);
  }
  if (pid == 0) {
    ::prctl(PR_SET_PDEATHSIG, SIGKILL);
    ::dup2(fds[1], STDOUT_FILENO);
    ::execv(argv[0], argv.data());
    _exit(127);
  }
  ::close(fds[1]);
  std::string out;
  Deadline deadline = Deadline::after(timeout);
  bool timed_out = false;
  while (true) {
    pollfd p{fds[0], POLLIN, 0};
    int r = ::poll(&p, 1, deadline.remaining_ms());
    if (r < 0 && errno == EINTR) continue;
    if (r == 0) {
      timed_out = true;
      break;
    }
    char buf[4096];
    ssize_t n = ::read(fds[0], buf, sizeof buf);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    out.append(buf, static_cast<size_t>(n));
    if (out.size() > kMaxNvidiaSmiBytes) {
      ::close(fds[0]);
      ::kill(pid, SIGKILL);
      ::waitpid(pid, nullptr, 0);
      throw ProtocolError(fmt::format("{}: output over {} bytes", program.string(), kMaxNvidiaSmiBytes));
    }
  }
  ::close(fds[0]);
  if (timed_out) ::kill(pid, SIGKILL);
  int status = 0;
  ::waitpid(pid, &status, 0);
  if (timed_out)
    throw TimeoutError(fmt::format("{} did not finish within {} ms (killed)", program.string(), timeout.count()));
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
    throw IoError(fmt::format("{} failed ({})", program.string(),
                              WIFEXITED(status) ? fmt::format("exit code {}", WEXITSTATUS(status))
                                                : fmt::format("signal {}", WTERMSIG(status))));
  return out;
}

std::string gpu_text(const GpuSpec& g) {
  return fmt::format("{} x {} ({} GiB, compute {})", g.count, g.model, g.vram_gib, g.cuda_capability);
}

std::string hardware_report(const GpuSpec& gpu, std::string_view source, const std::vector<NvidiaSmiGpu>& detected) {
  json::Writer w(false);
  w.begin_object();
  w.key("source").value(source);
  w.key("gpu").begin_object();
  w.key("model").value(gpu.model).key("count").value(gpu.count).key("vram_gib").value(gpu.vram_gib);
  w.key("cuda_capability").value(gpu.cuda_capability);
  w.end_object();
  w.key("nvidia_smi").begin_array();
  for (const auto& d : detected) {
    w.begin_object().key("name").value(d.name).key("memory_mib").value(d.memory_mib);
    w.key("compute_cap").value(d.compute_cap).end_object();
  }
  w.end_array();
  w.key("cpu_count").value(static_cast<uint64_t>(::sysconf(_SC_NPROCESSORS_ONLN)));
  long pages = ::sysconf(_SC_PHYS_PAGES), page_size = ::sysconf(_SC_PAGE_SIZE);
  w.key("memory_mib").value(pages > 0 && page_size > 0 ? static_cast<uint64_t>(pages) * page_size / (1 << 20) : 0);
  w.end_object();
  return w.take();
}

}  // namespace

ProviderSettings load_provider_config(const fs::path& path) {
  std::string text = *checkpoint::detail::read_small_file(path, kMaxConfigBytes, false);
  std::string source = path.string();
  json::Value root = json::parse(text, source);
  json::Field f(root, source);
  f.only_keys({"market_endpoint", "market_key", "key_file", "bind", "advertise", "price_per_step",
               "price_per_hour_idle", "region", "latency_hint_ms", "worker_command", "redeem_interval_ms",
               "unpaid_grace_ms", "worker_stop_grace_ms", "heartbeat_interval_ms", "poll_interval_ms", "db", "gpu"});
  fs::path base = path.parent_path();
  auto resolve = [&](const std::string& p) { return fs::path(p).is_absolute() || base.empty() ? fs::path(p) : base / p; };
  auto ms = [&](std::string_view key, std::chrono::milliseconds& out) {
    if (auto v = f.get(key)) {
      uint64_t n = v->u64(kMaxIntervalMs);
      if (n == 0) v->fail("must be at least 1");
      out = std::chrono::milliseconds(n);
    }
  };

  ProviderSettings s;
  if (auto v = f.get("market_endpoint")) s.market_endpoint = v->str();
  if (auto v = f.get("market_key")) {
    try {
      s.market_key = AccountId::from_hex(v->str(), "market_key");
    } catch (const Error& e) {
      v->fail(e.what());
    }
  }
  if (auto v = f.get("key_file")) s.key_file = resolve(v->str());
  if (auto v = f.get("bind")) s.bind_endpoint = v->str();
  if (auto v = f.get("advertise")) s.advertise_endpoint = v->str();
  if (auto v = f.get("price_per_step")) s.price_per_step = v->u64();
  if (auto v = f.get("price_per_hour_idle")) s.price_per_hour_idle = v->u64();
  if (auto v = f.get("region")) s.region = v->str();
  if (auto v = f.get("latency_hint_ms")) s.latency_hint_ms = static_cast<uint32_t>(v->u64(UINT32_MAX));
  if (auto v = f.get("worker_command")) s.worker_command = v->str();
  ms("redeem_interval_ms", s.redeem_interval);
  ms("unpaid_grace_ms", s.unpaid_grace);
  ms("worker_stop_grace_ms", s.worker_stop_grace);
  ms("heartbeat_interval_ms", s.heartbeat_interval);
  ms("poll_interval_ms", s.poll_interval);
  if (auto v = f.get("db")) s.db_path = resolve(v->str());
  if (auto v = f.get("gpu")) s.declared_gpu = read_gpu(*v);
  return s;
}

void validate_provider_settings(const ProviderSettings& s) {
  auto missing = [](std::string_view what, std::string_view how) {
    throw InvalidArgumentError(fmt::format("provider settings: {} is required ({})", what, how));
  };
  if (s.market_endpoint.empty()) missing("the market endpoint", "config market_endpoint or --market");
  if (!s.market_key) missing("the market's public key", "config market_key or --market-key");
  if (s.key_file.empty()) missing("the provider key file", "config key_file or --key");
  if (s.db_path.empty()) missing("the provider database path", "config db or --db");
  if (s.price_per_step == 0)
    missing("a price per step above 0", "config price_per_step or --price-per-step; a voucher must increase");
  for (auto [name, endpoint] : {std::pair<std::string_view, const std::string&>{"bind", s.bind_endpoint},
                                {"advertise", s.advertise_endpoint}}) {
    if (endpoint.empty() && name == "advertise") continue;
    if (endpoint.rfind("tcp://", 0) != 0 || endpoint.find(':', 6) == std::string::npos)
      throw InvalidArgumentError(fmt::format("provider settings: {}: '{}' is not of the form tcp://HOST:PORT", name,
                                             endpoint));
  }
  if (s.advertise_endpoint.empty() &&
      (s.bind_endpoint.rfind("tcp://0.0.0.0:", 0) == 0 || s.bind_endpoint.rfind("tcp://*:", 0) == 0))
    throw InvalidArgumentError(fmt::format(
        "provider settings: bind {} is not an address renters can reach; set advertise (--advertise)",
        s.bind_endpoint));
}

std::vector<NvidiaSmiGpu> parse_nvidia_smi(std::string_view output, std::string_view source) {
  std::vector<NvidiaSmiGpu> gpus;
  size_t line_no = 0;
  while (!output.empty()) {
    size_t nl = output.find('\n');
    std::string_view line = trim(output.substr(0, nl));
    output.remove_prefix(nl == std::string_view::npos ? output.size() : nl + 1);
    ++line_no;
    if (line.empty()) continue;
    auto bad = [&](std::string_view why) {
      throw ProtocolError(fmt::format("{}: line {} '{}': {} (expected 'name, memory.total MiB, compute_cap')", source,
                                      line_no, line.substr(0, 200), why));
    };
    // The name may itself hold commas; the last two fields never do.
    size_t c2 = line.rfind(',');
    if (c2 == std::string_view::npos) bad("not three comma-separated fields");
    size_t c1 = line.rfind(',', c2 == 0 ? 0 : c2 - 1);
    if (c1 == std::string_view::npos || c1 == c2) bad("not three comma-separated fields");
    NvidiaSmiGpu gpu;
    gpu.name = std::string(trim(line.substr(0, c1)));
    std::string_view memory = trim(line.substr(c1 + 1, c2 - c1 - 1));
    gpu.compute_cap = std::string(trim(line.substr(c2 + 1)));
    if (gpu.name.empty()) bad("empty GPU name");
    auto [end, ec] = std::from_chars(memory.data(), memory.data() + memory.size(), gpu.memory_mib);
    if (ec != std::errc() || end != memory.data() + memory.size() || memory.empty() || gpu.memory_mib == 0)
      bad(fmt::format("memory.total '{}' is not a positive whole number of MiB", memory));
    bool cap_ok = !gpu.compute_cap.empty() && gpu.compute_cap.find_first_not_of("0123456789.") == std::string::npos;
    if (!cap_ok) bad(fmt::format("compute_cap '{}' is not a version like 9.0", gpu.compute_cap));
    gpus.push_back(std::move(gpu));
  }
  if (gpus.empty()) throw ProtocolError(fmt::format("{}: reported no GPU", source));
  return gpus;
}

GpuSpec summarize_gpus(const std::vector<NvidiaSmiGpu>& gpus) {
  if (gpus.empty()) throw InvalidArgumentError("no GPU detected");
  GpuSpec spec;
  spec.model = gpus[0].name;
  spec.vram_gib = static_cast<uint32_t>(std::llround(static_cast<double>(gpus[0].memory_mib) / 1024.0));
  spec.cuda_capability = gpus[0].compute_cap;
  spec.count = 0;
  for (const auto& g : gpus) {
    uint32_t vram = static_cast<uint32_t>(std::llround(static_cast<double>(g.memory_mib) / 1024.0));
    if (g.name != spec.model || vram != spec.vram_gib || g.compute_cap != spec.cuda_capability)
      throw InvalidArgumentError(fmt::format(
          "GPUs differ ({} GiB {} and {} GiB {}): one offer describes one kind of GPU; hide the others with "
          "CUDA_VISIBLE_DEVICES or run one provider per kind",
          spec.vram_gib, spec.model, vram, g.name));
    ++spec.count;
  }
  return spec;
}

DetectedHardware detect_hardware(const std::optional<GpuSpec>& declared, bool trust_config,
                                 std::chrono::milliseconds timeout) {
  DetectedHardware hw;
  std::vector<NvidiaSmiGpu> detected;
  if (auto smi = find_on_path("nvidia-smi")) {
    std::vector<std::string> args{"--query-gpu=name,memory.total,compute_cap", "--format=csv,noheader,nounits"};
    std::string output;
    try {
      output = run_capture(*smi, args, timeout);
      detected = parse_nvidia_smi(output, smi->string());
    } catch (const Error& e) {
      if (!declared || !trust_config)
        throw InvalidArgumentError(fmt::format("GPU detection: {}{}", e.what(),
                                               declared ? " (--trust-config uses the config's gpu instead)" : ""));
      log::warn("provider", "GPU detection failed ({}); using the config's gpu (--trust-config)", e.what());
    }
    if (!detected.empty()) {
      GpuSpec found = summarize_gpus(detected);
      if (declared && (declared->model != found.model || declared->count != found.count ||
                       declared->vram_gib != found.vram_gib || declared->cuda_capability != found.cuda_capability)) {
        if (!trust_config)
          throw InvalidArgumentError(fmt::format(
              "GPU detection: the config declares {} but nvidia-smi reports {}; fix the config or pass --trust-config",
              gpu_text(*declared), gpu_text(found)));
        log::warn("provider", "the config declares {} but nvidia-smi reports {}; offering the config's (--trust-config)",
                  gpu_text(*declared), gpu_text(found));
        hw.gpu = *declared;
        hw.source = "config";
      } else {
        hw.gpu = found;
        hw.source = "nvidia-smi";
      }
    } else {
      hw.gpu = *declared;
      hw.source = "config";
    }
  } else if (declared) {
    hw.gpu = *declared;
    hw.source = "config";
  } else {
    throw InvalidArgumentError(
        "GPU detection: nvidia-smi is not on PATH and the config declares no gpu; add "
        "\"gpu\": {\"model\": ..., \"count\": ..., \"vram_gib\": ..., \"cuda_capability\": ...}");
  }
  hw.report_json = hardware_report(hw.gpu, hw.source, detected);
  return hw;
}

}  // namespace meshtrain::market
