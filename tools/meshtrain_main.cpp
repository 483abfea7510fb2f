// meshtrain: the command-line tool. Each subcommand lives in its own folder under tools/ and
// registers here.
#include <cstdio>
#include <cstring>
#include <string_view>

#include "checkpoint/checkpoint_command.h"
#include "demo/demo.h"
#include "market/market_command.h"
#include "token/token_command.h"
#include "meshtrain/core.h"

using namespace meshtrain;

namespace {

struct Command {
  std::string_view name;
  int (*run)(int argc, char** argv);  // argv[1] is the command name
  std::string_view summary;           // empty: hidden (internal helpers)
};

const Command kCommands[] = {
    {"demo", tools::demo_command, "run a local data-parallel job with a failure and a join (see --help)"},
    {"demo-worker", tools::demo_worker_command, ""},
    {"checkpoint", tools::checkpoint_command, "inspect, verify or list checkpoints (see --help)"},
    {"token", tools::token_command, "mint or check a join token that admits one peer to a job (see --help)"},
    {"market", tools::market_command, "offers, orders, leases, balances, rent, close, cost (see --help)"},
    {"key", tools::key_command, "create an Ed25519 identity, or print its public key (see --help)"},
};

void usage(FILE* out) {
  std::fputs("usage: meshtrain COMMAND [options]\n\ncommands:\n", out);
  for (const auto& c : kCommands)
    if (!c.summary.empty()) std::fprintf(out, "  %-12.*s %.*s\n", int(c.name.size()), c.name.data(),
                                         int(c.summary.size()), c.summary.data());
  std::fputs("\n`meshtrain COMMAND --help` describes a command.\n", out);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2 || !std::strcmp(argv[1], "--help") || !std::strcmp(argv[1], "-h")) {
    usage(argc < 2 ? stderr : stdout);
    return argc < 2 ? 2 : 0;
  }
  for (const auto& c : kCommands) {
    if (c.name != argv[1]) continue;
    try {
      return c.run(argc, argv);
    } catch (const InvalidArgumentError& e) {
      std::fprintf(stderr, "meshtrain %s: %s\n", argv[1], e.what());
      return 2;
    } catch (const Error& e) {
      std::fprintf(stderr, "meshtrain %s: %s error: %s\n", argv[1], error_code_name(e.code()).data(), e.what());
      return 1;
    }
  }
  std::fprintf(stderr, "meshtrain: unknown command '%s'\n\n", argv[1]);
  usage(stderr);
  return 2;
}
