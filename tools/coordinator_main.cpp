// meshtrain-coordinator: the per-job coordinator daemon (membership, heartbeats, one quorum per
// step). State lives in memory only; after a restart the job is rebuilt from the members'
// heartbeats and requests (docs/step-protocol.md).
#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <charconv>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "meshtrain/coord.h"

using namespace meshtrain;
namespace fs = std::filesystem;

namespace {

constexpr int kUsageError = 2;

const char* const kUsage = R"(usage: meshtrain-coordinator (--allow FILE | --job-owner KEY | both) [options]

Serves one training job: admits the members on the allow-list and the peers holding a join
token of a job owner, tracks their heartbeats and hands out one quorum per optimizer step.

options:
  --bind tcp://HOST:PORT       control endpoint to bind (default tcp://0.0.0.0:7400; port 0 picks one)
  --key PEM                    the coordinator's Ed25519 identity (PKCS#8 PEM); created with mode
                               0600 when the file does not exist. Without --key a throwaway
                               identity is used (members must learn its key from the output).
  --allow FILE                 allow-list of member keys: one 64-hex-digit Ed25519 public key per
                               line, '#' starts a comment
  --job-owner KEY              admit peers that present a join token signed by KEY for this
                               coordinator's key (`meshtrain token`); KEY is 64 hex digits or a
                               file holding one key. May be repeated.
  --min-peers N                never form a quorum with fewer contributors (default 1)
  --quorum-timeout-ms MS       wait at most this long for stragglers after a step's first
                               request (default 10000)
  --heartbeat-timeout-ms MS    drop a member silent for this long (default 5000)
  --startup-grace-ms MS        after start, form no quorum before this unless every live peer
                               asked (default 2000)
  --status-json                print status changes as JSON lines on stdout (default: text)
  --print-endpoint-file FILE   once bound, write the endpoint (line 1) and the coordinator's
                               public key in hex (line 2) to FILE
  --help                       this text

Logs go to stderr (MESHTRAIN_LOG=debug for more). SIGINT / SIGTERM stop it cleanly (exit 0).
Exit codes: 0 stopped by a signal, 1 runtime failure, 2 usage error.
)";

struct UsageError {
  std::string message;
};

struct Args {
  std::string bind = "tcp://0.0.0.0:7400";
  std::optional<fs::path> key;
  std::optional<fs::path> allow;
  std::vector<std::string> job_owners;
  uint32_t min_peers = 1;
  long quorum_timeout_ms = 10000;
  long heartbeat_timeout_ms = 5000;
  long startup_grace_ms = 2000;
  bool status_json = false;
  std::optional<fs::path> endpoint_file;
  bool help = false;
};

long parse_number(std::string_view flag, std::string_view value, long min, long max) {
  long out = 0;
  auto [end, ec] = std::from_chars(value.data(), value.data() + value.size(), out);
  if (ec != std::errc() || end != value.data() + value.size() || value.empty())
    throw UsageError{fmt::format("{}: '{}' is not a whole number", flag, value)};
  if (out < min || out > max) throw UsageError{fmt::format("{}: {} is out of range ({}..{})", flag, out, min, max)};
  return out;
}

Args parse_args(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    std::optional<std::string> inline_value;
    if (arg.rfind("--", 0) == 0) {
      if (auto eq = arg.find('='); eq != std::string::npos) {
        inline_value = arg.substr(eq + 1);
        arg = arg.substr(0, eq);
      }
    }
    auto value = [&]() -> std::string {
      if (inline_value) return *inline_value;
      if (i + 1 >= argc) throw UsageError{fmt::format("{} needs a value", arg)};
      return argv[++i];
    };
    auto no_value = [&] {
      if (inline_value) throw UsageError{fmt::format("{} takes no value", arg)};
    };
    if (arg == "--help" || arg == "-h") {
      no_value();
      a.help = true;
    } else if (arg == "--bind") {
      a.bind = value();
      if (a.bind.rfind("tcp://", 0) != 0 || a.bind.find(':', 6) == std::string::npos)
        throw UsageError{fmt::format("--bind: '{}' is not of the form tcp://HOST:PORT", a.bind)};
    } else if (arg == "--key") {
      a.key = value();
    } else if (arg == "--allow") {
      a.allow = value();
    } else if (arg == "--job-owner") {
      a.job_owners.push_back(value());
    } else if (arg == "--min-peers") {
      a.min_peers = static_cast<uint32_t>(parse_number(arg, value(), 1, 1 << 20));
    } else if (arg == "--quorum-timeout-ms") {
      a.quorum_timeout_ms = parse_number(arg, value(), 1, 24L * 3600 * 1000);
    } else if (arg == "--heartbeat-timeout-ms") {
      a.heartbeat_timeout_ms = parse_number(arg, value(), 1, 24L * 3600 * 1000);
    } else if (arg == "--startup-grace-ms") {
      a.startup_grace_ms = parse_number(arg, value(), 0, 24L * 3600 * 1000);
    } else if (arg == "--status-json") {
      no_value();
      a.status_json = true;
    } else if (arg == "--print-endpoint-file") {
      a.endpoint_file = value();
    } else {
      throw UsageError{fmt::format("unknown argument '{}'", argv[i])};
    }
  }
  if (!a.help && !a.allow && a.job_owners.empty())
    throw UsageError{"--allow FILE or --job-owner KEY is required: without either no member can connect"};
  return a;
}

// Signal handling: the handler only cancels the token (an atomic exchange and an eventfd
// write, both async-signal-safe).
CancelToken* g_stop = nullptr;
extern "C" void on_signal(int) {
  if (g_stop) g_stop->cancel();
}

void install_signal_handlers() {
  struct sigaction sa {};
  sa.sa_handler = on_signal;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = SA_RESTART;
  sigaction(SIGINT, &sa, nullptr);
  sigaction(SIGTERM, &sa, nullptr);
  signal(SIGPIPE, SIG_IGN);
}

crypto::Identity load_or_create_identity(const std::optional<fs::path>& key) {
  if (!key) {
    auto id = crypto::Identity::generate();
    log::warn("coord", "no --key given: using a throwaway identity {} (members must be given this key)",
              id.public_key().hex());
    return id;
  }
  std::error_code ec;
  if (fs::exists(*key, ec)) return crypto::Identity::load_pem(*key);
  auto id = crypto::Identity::generate();
  id.save_pem(*key);
  log::info("coord", "generated a new coordinator identity in {} (mode 0600); public key {}", key->string(),
            id.public_key().hex());
  return id;
}

// Written to a temporary name and renamed, so a reader never sees half a file.
void write_endpoint_file(const fs::path& path, const std::string& endpoint, const crypto::PeerId& key) {
  fs::path tmp = path;
  tmp += fmt::format(".tmp.{}", ::getpid());
  {
    std::ofstream out(tmp, std::ios::trunc);
    out << endpoint << '\n' << key.hex() << '\n';
    out.flush();
    if (!out) throw IoError(fmt::format("cannot write {}", tmp.string()));
  }
  std::error_code ec;
  fs::rename(tmp, path, ec);
  if (ec) throw IoError(fmt::format("cannot rename {} to {}: {}", tmp.string(), path.string(), ec.message()));
}

}  // namespace

int main(int argc, char** argv) {
  Args args;
  try {
    args = parse_args(argc, argv);
  } catch (const UsageError& e) {
    std::fprintf(stderr, "meshtrain-coordinator: %s\n(see meshtrain-coordinator --help)\n", e.message.c_str());
    return kUsageError;
  }
  if (args.help) {
    std::fputs(kUsage, stdout);
    return 0;
  }

  CancelToken stop;
  g_stop = &stop;
  install_signal_handlers();

  try {
    coord::CoordinatorOptions options;
    try {
      if (args.allow) options.allowed = net::AllowList::load(*args.allow);
    } catch (const InvalidArgumentError& e) {
      std::fprintf(stderr, "meshtrain-coordinator: --allow: %s\n", e.what());
      return kUsageError;
    }
    try {
      for (const auto& owner : args.job_owners) options.job_owners.add(coord::read_public_key(owner, "--job-owner"));
    } catch (const InvalidArgumentError& e) {
      std::fprintf(stderr, "meshtrain-coordinator: %s\n", e.what());
      return kUsageError;
    }
    if (options.allowed.peers().empty() && options.job_owners.peers().empty())
      log::warn("coord", "the allow-list {} is empty and there is no job owner: no member can connect",
                args.allow->string());
    crypto::Identity self = load_or_create_identity(args.key);
    options.bind_endpoint = args.bind;
    options.min_peers = args.min_peers;
    options.quorum_timeout = std::chrono::milliseconds(args.quorum_timeout_ms);
    options.heartbeat_timeout = std::chrono::milliseconds(args.heartbeat_timeout_ms);
    options.startup_grace = std::chrono::milliseconds(args.startup_grace_ms);

    coord::Coordinator coordinator(self, options);
    if (args.endpoint_file) write_endpoint_file(*args.endpoint_file, coordinator.endpoint(), self.public_key());
    log::info("coord", "serving on {} as {}", coordinator.endpoint(), self.public_key().hex());

    std::string last;
    auto print_status = [&](bool force) {
      auto st = coordinator.status();
      std::string line = args.status_json ? st.to_json() : st.to_text();
      if (!force && line == last) return;
      std::fprintf(stdout, "%s\n", line.c_str());
      std::fflush(stdout);
      last = std::move(line);
    };
    print_status(true);
    while (!stop.cancelled()) {
      try {
        coordinator.poll(Deadline::after(std::chrono::milliseconds(100)), &stop);
      } catch (const CancelledError&) {
        break;
      }
      print_status(false);
    }
    log::info("coord", "stopping: {}", coordinator.status().to_text());
  } catch (const Error& e) {
    std::fprintf(stderr, "meshtrain-coordinator: %s\n", e.what());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "meshtrain-coordinator: unexpected error: %s\n", e.what());
    return 1;
  }
  return 0;
}
