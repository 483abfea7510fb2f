// meshtrain-wan-relay: a delaying TCP relay for WAN emulation (see relay.h and README.md).
//
//   meshtrain-wan-relay --listen 127.0.0.1:0 --target 127.0.0.1:9000 --delay-ms 40
//       [--jitter-ms 5] [--rate-mbps 100] [--cut-after-bytes N] [--port-file FILE]
//       [--max-connections N] [--max-queue-mib 64] [--seed S]
//
// Runs until SIGINT or SIGTERM. Exit status: 0 after a clean stop, 2 for bad arguments, 1 when
// the relay cannot start.
#include <signal.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <string>

#include <meshtrain/core.h>

#include "relay.h"

namespace {

constexpr const char* kUsage = R"(usage: meshtrain-wan-relay --listen HOST:PORT --target HOST:PORT [options]

A TCP relay that adds WAN latency (this host has tc/tbf but no netem).

  --listen HOST:PORT       where to listen; port 0 picks a free port (see --port-file)
  --target HOST:PORT       where each accepted connection is relayed to
  --delay-ms D             one-way latency added in each direction (default 0; fractions ok)
  --jitter-ms J            extra uniform 0..J ms per chunk, never reordering bytes (default 0)
  --rate-mbps R            pacing cap per direction in Mbit/s, 0 = none (default 0)
  --cut-after-bytes N      after N client->server bytes on a connection, reset both sides (RST)
  --port-file FILE         write the listening port (decimal, newline) to FILE once listening
  --max-connections N      concurrent connections; more are reset at accept (default 0 = no cap)
  --max-queue-mib M        queued bytes per direction before reads pause (default 64)
  --seed S                 jitter RNG seed (default random)
  --help                   this text

Logs go to stderr; MESHTRAIN_LOG=wan=debug shows more.
)";

[[noreturn]] void usage_error(const std::string& msg) {
  std::fprintf(stderr, "meshtrain-wan-relay: %s\n(--help for usage)\n", msg.c_str());
  std::exit(2);
}

double parse_number(const std::string& flag, const std::string& value) {
  char* end = nullptr;
  errno = 0;
  double v = std::strtod(value.c_str(), &end);
  if (value.empty() || errno != 0 || *end != '\0' || v < 0) {
    usage_error(fmt::format("{}: '{}' is not a non-negative number", flag, value));
  }
  return v;
}

uint64_t parse_count(const std::string& flag, const std::string& value) {
  char* end = nullptr;
  errno = 0;
  unsigned long long v = std::strtoull(value.c_str(), &end, 10);
  if (value.empty() || value[0] == '-' || errno != 0 || *end != '\0') {
    usage_error(fmt::format("{}: '{}' is not a non-negative integer", flag, value));
  }
  return v;
}

std::chrono::microseconds ms_to_us(double ms) {
  return std::chrono::microseconds(static_cast<int64_t>(ms * 1000.0 + 0.5));
}

void write_port_file(const std::string& path, uint16_t port) {
  // Write then rename, so a reader polling for the file never sees it half written.
  std::string tmp = path + ".tmp." + std::to_string(::getpid());
  {
    std::ofstream out(tmp, std::ios::trunc);
    out << port << "\n";
    if (!out.flush()) throw meshtrain::IoError(fmt::format("cannot write port file {}", tmp));
  }
  std::error_code ec;
  std::filesystem::rename(tmp, path, ec);
  if (ec) throw meshtrain::IoError(fmt::format("cannot rename {} to {}: {}", tmp, path, ec.message()));
}

}  // namespace

int main(int argc, char** argv) {
  using meshtrain::wan::RelayOptions;
  RelayOptions opts;
  bool have_listen = false, have_target = false;
  std::string port_file;

  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    std::string value;
    bool inline_value = false;
    if (auto eq = arg.find('='); arg.rfind("--", 0) == 0 && eq != std::string::npos) {
      value = arg.substr(eq + 1);
      arg = arg.substr(0, eq);
      inline_value = true;
    }
    if (arg == "--help" || arg == "-h") {
      std::fputs(kUsage, stdout);
      return 0;
    }
    auto next = [&]() -> std::string {
      if (inline_value) return value;
      if (i + 1 >= argc) usage_error(arg + " needs a value");
      return argv[++i];
    };
    try {
      if (arg == "--listen") {
        auto [h, p] = meshtrain::wan::parse_host_port(next());
        opts.listen_host = h;
        opts.listen_port = p;
        have_listen = true;
      } else if (arg == "--target") {
        auto [h, p] = meshtrain::wan::parse_host_port(next());
        if (p == 0) usage_error("--target: port must not be 0");
        opts.target_host = h;
        opts.target_port = p;
        have_target = true;
      } else if (arg == "--delay-ms") {
        opts.delay = ms_to_us(parse_number(arg, next()));
      } else if (arg == "--jitter-ms") {
        opts.jitter = ms_to_us(parse_number(arg, next()));
      } else if (arg == "--rate-mbps") {
        opts.rate_mbps = parse_number(arg, next());
      } else if (arg == "--cut-after-bytes") {
        opts.cut_after_bytes = parse_count(arg, next());
      } else if (arg == "--port-file") {
        port_file = next();
      } else if (arg == "--max-connections") {
        opts.max_connections = parse_count(arg, next());
      } else if (arg == "--max-queue-mib") {
        double mib = parse_number(arg, next());
        if (mib <= 0) usage_error("--max-queue-mib must be > 0");
        opts.max_queued_bytes = static_cast<size_t>(mib * 1024 * 1024);
      } else if (arg == "--seed") {
        opts.seed = parse_count(arg, next());
      } else {
        usage_error(fmt::format("unknown argument '{}'", arg));
      }
    } catch (const meshtrain::InvalidArgumentError& e) {
      usage_error(fmt::format("{}: {}", arg, e.what()));
    }
  }
  if (!have_listen) usage_error("--listen HOST:PORT is required");
  if (!have_target) usage_error("--target HOST:PORT is required");

  // Block the stop signals in every thread (threads inherit the mask), then wait for them here.
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGINT);
  sigaddset(&stop_signals, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);
  ::signal(SIGPIPE, SIG_IGN);

  meshtrain::wan::WanRelay relay(opts);
  try {
    relay.start();
    if (!port_file.empty()) write_port_file(port_file, relay.port());
  } catch (const std::exception& e) {
    meshtrain::log::error("wan", "relay cannot start: {}", e.what());
    return 1;
  }

  int sig = 0;
  while (sigwait(&stop_signals, &sig) != 0) {
  }
  meshtrain::log::info("wan", "relay got {}, stopping", sig == SIGINT ? "SIGINT" : "SIGTERM");
  relay.stop();
  if (!port_file.empty()) {
    std::error_code ec;
    std::filesystem::remove(port_file, ec);
  }
  return 0;
}
