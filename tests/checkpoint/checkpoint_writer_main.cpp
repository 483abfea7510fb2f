// checkpoint_writer: one writer process of a multi-process checkpoint save.
//
//   checkpoint_writer --root DIR --rank R --world W --step S --seed X --save-id ID
//                     [--scale N] [--finalize-timeout-ms T] [--keep-last N]
//                     [--stall-after-blocks K --ready-file F]
//
// Builds the deterministic test state of `seed` (tests/checkpoint/test_state.h) and saves its
// shard. With --stall-after-blocks it writes K blocks of its shard, creates F and then waits to
// be killed (the crash test SIGKILLs it there).
//
// Exit codes: 0 saved, 2 usage, 3 timeout (rank 0: writers missing), 4 corrupt, 5 other error.
#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <map>
#include <string>

#include "checkpoint/test_state.h"
#include "meshtrain/checkpoint.h"

using namespace meshtrain;

int main(int argc, char** argv) {
  std::map<std::string, std::string> a;
  for (int i = 1; i + 1 < argc; i += 2) a[argv[i]] = argv[i + 1];
  if (!a.count("--root") || !a.count("--rank") || !a.count("--world") || !a.count("--step") || !a.count("--seed") ||
      !a.count("--save-id")) {
    std::fprintf(stderr, "usage: checkpoint_writer --root DIR --rank R --world W --step S --seed X --save-id ID ...\n");
    return 2;
  }
  try {
    auto state = test_support::make_test_state(std::stoull(a["--seed"]), std::stoull(a["--step"]),
                                               a.count("--scale") ? std::stoll(a["--scale"]) : 1);
    checkpoint::SaveOptions o;
    o.rank = static_cast<uint32_t>(std::stoul(a["--rank"]));
    o.world_size = static_cast<uint32_t>(std::stoul(a["--world"]));
    o.save_id = a["--save-id"];
    o.block_bytes = 4096;
    o.io_threads = 1;
    if (a.count("--finalize-timeout-ms")) o.finalize_timeout = std::chrono::milliseconds(std::stoll(a["--finalize-timeout-ms"]));
    if (a.count("--keep-last")) o.keep_last = static_cast<uint32_t>(std::stoul(a["--keep-last"]));
    if (a.count("--stall-after-blocks")) {
      uint64_t stall = std::stoull(a["--stall-after-blocks"]);
      std::string ready = a["--ready-file"];
      o.after_block = [stall, ready](uint64_t done, uint64_t total) {
        if (done != stall) return;
        std::fprintf(stderr, "checkpoint_writer: wrote %llu of %llu blocks, waiting to be killed\n",
                     static_cast<unsigned long long>(done), static_cast<unsigned long long>(total));
        std::ofstream(ready) << done << "\n";
        while (true) ::pause();
      };
    }
    checkpoint::save(a["--root"], state.view(), o);
    return 0;
  } catch (const Error& e) {
    std::fprintf(stderr, "checkpoint_writer rank %s: %s\n", a["--rank"].c_str(), e.what());
    switch (e.code()) {
      case ErrorCode::Timeout: return 3;
      case ErrorCode::Corrupt: return 4;
      default: return 5;
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "checkpoint_writer: %s\n", e.what());
    return 5;
  }
}
