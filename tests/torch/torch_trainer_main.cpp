// torch_trainer: one writer process of the torch glue's multi-process test. Trains the test run
// (tests/torch/training.h) from --seed for --steps steps, as every other writer does, then saves
// its own shard of the snapshot.
//
//   torch_trainer --root DIR --rank R --world W --steps N --seed X --save-id ID [--optimizer KIND]
//
// Exit codes: 0 saved, 2 usage, 3 timeout (rank 0: writers missing), 5 other error.
#include <ATen/Parallel.h>

#include <cstdio>
#include <map>
#include <string>

#include "meshtrain/checkpoint.h"
#include "meshtrain/torch.h"
#include "training.h"

using namespace meshtrain;

int main(int argc, char** argv) {
  std::map<std::string, std::string> a;
  for (int i = 1; i + 1 < argc; i += 2) a[argv[i]] = argv[i + 1];
  for (const char* required : {"--root", "--rank", "--world", "--steps", "--seed", "--save-id"})
    if (!a.count(required)) {
      std::fprintf(stderr, "usage: torch_trainer --root DIR --rank R --world W --steps N --seed X --save-id ID "
                           "[--optimizer KIND]\n");
      return 2;
    }
  try {
    at::set_num_threads(1);  // the same arithmetic, in the same order, as the test process
    test_support::TrainingRun run(std::stoull(a["--seed"]), a.count("--optimizer") ? a["--optimizer"] : "adam");
    run.train(std::stoull(a["--steps"]));
    torch_glue::Snapshot snap = torch_glue::snapshot(*run.model, run.optimizer.get(), run.step);
    snap.state().blobs["cursor"] = {static_cast<uint8_t>(run.step)};
    checkpoint::SaveOptions o;
    o.rank = static_cast<uint32_t>(std::stoul(a["--rank"]));
    o.world_size = static_cast<uint32_t>(std::stoul(a["--world"]));
    o.save_id = a["--save-id"];
    o.block_bytes = 4096;  // several blocks per shard even for this small model
    o.io_threads = 1;
    o.finalize_timeout = std::chrono::seconds(60);
    checkpoint::save(a["--root"], snap.state(), o);
    return 0;
  } catch (const Error& e) {
    std::fprintf(stderr, "torch_trainer rank %s: %s\n", a["--rank"].c_str(), e.what());
    return e.code() == ErrorCode::Timeout ? 3 : 5;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "torch_trainer rank %s: %s\n", a["--rank"].c_str(), e.what());
    return 5;
  }
}
