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

#include "common/daemon.h"
#include "common/flags.h"
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

const std::initializer_list<tools::Flags::Spec> kFlags = {
    {"--bind"}, {"--key"}, {"--allow"}, {"--job-owner"}, {"--min-peers"}, {"--quorum-timeout-ms"},
    {"--heartbeat-timeout-ms"}, {"--startup-grace-ms"}, {"--status-json", false}, {"--print-endpoint-file"}};
constexpr uint64_t kDayMs = 24ull * 3600 * 1000;

}  // namespace

int main(int argc, char** argv) {
  std::optional<tools::Flags> flags;
  coord::CoordinatorOptions options;
  std::optional<fs::path> allow, key;
  try {
    flags.emplace(argc, argv, 1, kFlags, "(see meshtrain-coordinator --help)");
    if (flags->help()) {
      std::fputs(kUsage, stdout);
      return 0;
    }
    if (!flags->positional().empty()) flags->fail(fmt::format("unexpected argument '{}'", flags->positional()[0]));
    options.bind_endpoint = flags->get_or("--bind", "tcp://0.0.0.0:7400");
    if (options.bind_endpoint.rfind("tcp://", 0) != 0 || options.bind_endpoint.find(':', 6) == std::string::npos)
      flags->fail(fmt::format("--bind: '{}' is not of the form tcp://HOST:PORT", options.bind_endpoint));
    if (auto k = flags->get("--key")) key = *k;
    if (auto a = flags->get("--allow")) allow = *a;
    if (!allow && !flags->has("--job-owner"))
      flags->fail("--allow FILE or --job-owner KEY is required: without either no member can connect");
    options.min_peers = static_cast<uint32_t>(flags->number("--min-peers", 1, 1, 1 << 20));
    options.quorum_timeout = std::chrono::milliseconds(flags->number("--quorum-timeout-ms", 10000, 1, kDayMs));
    options.heartbeat_timeout = std::chrono::milliseconds(flags->number("--heartbeat-timeout-ms", 5000, 1, kDayMs));
    options.startup_grace = std::chrono::milliseconds(flags->number("--startup-grace-ms", 2000, 0, kDayMs));
    if (allow) options.allowed = net::AllowList::load(*allow);
    for (const auto& owner : flags->all("--job-owner"))
      options.job_owners.add(coord::read_public_key(owner, "--job-owner"));
  } catch (const InvalidArgumentError& e) {
    std::fprintf(stderr, "meshtrain-coordinator: %s\n", e.what());
    return kUsageError;
  }
  const bool status_json = flags->has("--status-json");

  CancelToken stop;
  tools::cancel_on_stop_signals(stop);

  try {
    if (options.allowed.peers().empty() && options.job_owners.peers().empty())
      log::warn("coord", "the allow-list {} is empty and there is no job owner: no member can connect",
                allow->string());
    crypto::Identity self = [&] {
      if (key) return tools::load_or_create_identity(*key, "coord", "coordinator identity");
      auto id = crypto::Identity::generate();
      log::warn("coord", "no --key given: using a throwaway identity {} (members must be given this key)",
                id.public_key().hex());
      return id;
    }();

    coord::Coordinator coordinator(self, options);
    if (auto file = flags->get("--print-endpoint-file"))
      tools::write_endpoint_file(*file, coordinator.endpoint(), self.public_key());
    log::info("coord", "serving on {} as {}", coordinator.endpoint(), self.public_key().hex());

    std::string last;
    auto print_status = [&](bool force) {
      auto st = coordinator.status();
      std::string line = status_json ? st.to_json() : st.to_text();
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
