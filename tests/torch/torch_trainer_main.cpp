// torch_trainer: the real processes of the torch glue's multi-process tests. Each trains the test
// run (tests/torch/training.h) from --seed, as the test process does, then, by --mode:
//
//   save   (default) saves its own shard of the snapshot as writer --rank of --world.
//   send   saves the snapshot as one writer under --root (the disk round trip to compare with),
//          sends the same snapshot to the joiner listening on 127.0.0.1:--port over a bulk
//          channel (checkpoint::send_state), then trains --then more steps and saves the final
//          state under --out. --die-after-blocks K SIGKILLs itself after sending block K.
//   join   builds a fresh run (other initial weights: --seed + 1000), listens on a free loopback
//          port (written to --port-file), receives the state (checkpoint::receive_state),
//          restores it (torch_glue::restore), trains --then steps and saves the final state
//          under --out. A failed transfer must leave the module and optimizer as they were.
//
//   torch_trainer --root DIR --rank R --world W --steps N --seed X --save-id ID [--optimizer KIND]
//   torch_trainer --mode send --root DIR --out DIR --steps N --then M --seed X --identity PEM
//                 --peer HEX --port P [--die-after-blocks K]
//   torch_trainer --mode join --out DIR --then M --seed X --identity PEM --peer HEX --port-file F
//
// Exit codes: 0 done, 2 usage, 3 timeout (rank 0: writers missing), 4 transfer failed (join:
// the module is unchanged), 5 other error, 6 a failed transfer changed the joiner's module.
#include <ATen/Parallel.h>
#include <signal.h>

#include <cstdio>
#include <fstream>
#include <future>
#include <map>
#include <string>

#include "meshtrain/checkpoint.h"
#include "meshtrain/net.h"
#include "meshtrain/torch.h"
#include "training.h"

using namespace meshtrain;
using namespace std::chrono_literals;

namespace {

using Args = std::map<std::string, std::string>;

torch_glue::Snapshot snapshot_of(const test_support::TrainingRun& run) {
  torch_glue::Snapshot snap = torch_glue::snapshot(*run.model, run.optimizer.get(), run.step);
  snap.state().blobs["cursor"] = {static_cast<uint8_t>(run.step)};
  return snap;
}

// One writer, small blocks (several per state even for this small model).
void save_alone(const std::string& root, const checkpoint::State& state) {
  checkpoint::SaveOptions o;
  o.block_bytes = 4096;
  o.io_threads = 1;
  checkpoint::save(root, state, o);
}

net::BulkOptions bulk_options() {
  net::BulkOptions o;
  o.peer_timeout = 30s;
  return o;
}

int save_shard(Args& a) {
  test_support::TrainingRun run(std::stoull(a["--seed"]), a.count("--optimizer") ? a["--optimizer"] : "adam");
  run.train(std::stoull(a["--steps"]));
  torch_glue::Snapshot snap = snapshot_of(run);
  checkpoint::SaveOptions o;
  o.rank = static_cast<uint32_t>(std::stoul(a["--rank"]));
  o.world_size = static_cast<uint32_t>(std::stoul(a["--world"]));
  o.save_id = a["--save-id"];
  o.block_bytes = 4096;
  o.io_threads = 1;
  o.finalize_timeout = std::chrono::seconds(60);
  checkpoint::save(a["--root"], snap.state(), o);
  return 0;
}

int send(Args& a) {
  test_support::TrainingRun run(std::stoull(a["--seed"]), "adam");
  run.train(std::stoull(a["--steps"]));
  {
    torch_glue::Snapshot snap = snapshot_of(run);  // borrows the live tensors: no step until sent
    save_alone(a["--root"], snap.state());
    crypto::Identity self = crypto::Identity::load_pem(a["--identity"]);
    net::BulkChannel channel =
        net::BulkChannel::connect(self, crypto::PublicKey::from_hex(a["--peer"], "--peer"), "127.0.0.1",
                                  static_cast<uint16_t>(std::stoul(a["--port"])), 2, bulk_options(), Deadline::after(30s));
    checkpoint::TransferOptions o;
    o.block_bytes = 4096;
    o.timeout = 60s;
    if (a.count("--die-after-blocks")) {
      uint64_t die_after = std::stoull(a["--die-after-blocks"]);
      o.after_block = [die_after](uint64_t sent, uint64_t) {
        if (sent == die_after) ::raise(SIGKILL);
      };
    }
    checkpoint::send_state(channel, snap.state(), o);
  }
  run.train(std::stoull(a["--then"]));
  save_alone(a["--out"], snapshot_of(run).state());
  return 0;
}

int join(Args& a) {
  test_support::TrainingRun run(std::stoull(a["--seed"]) + 1000, "adam");
  std::map<std::string, at::Tensor> before;
  for (const auto& item : run.model->named_parameters()) before[item.key()] = item.value().detach().clone();
  for (const auto& item : run.model->named_buffers()) before[item.key()] = item.value().detach().clone();

  crypto::Identity self = crypto::Identity::load_pem(a["--identity"]);
  const crypto::PublicKey peer = crypto::PublicKey::from_hex(a["--peer"], "--peer");
  net::BulkListener listener(self, net::AllowList{peer}, "127.0.0.1", 0, bulk_options());
  {
    std::string tmp = a["--port-file"] + ".tmp";
    std::ofstream(tmp) << listener.port() << "\n";
    std::rename(tmp.c_str(), a["--port-file"].c_str());
  }
  net::BulkChannel channel = net::BulkChannel::accept(listener, peer, 2, Deadline::after(60s));
  checkpoint::TransferOptions o;
  o.timeout = 60s;
  std::optional<checkpoint::LoadedState> received;
  try {
    received = checkpoint::receive_state(channel, o);
  } catch (const Error& e) {
    std::fprintf(stderr, "torch_trainer join: transfer failed: %s: %s\n", std::string(error_code_name(e.code())).c_str(), e.what());
    bool untouched = run.optimizer->state().empty();
    for (const auto& item : run.model->named_parameters())
      untouched = untouched && at::equal(before.at(item.key()), item.value());
    for (const auto& item : run.model->named_buffers())
      untouched = untouched && at::equal(before.at(item.key()), item.value());
    std::fprintf(stderr, "torch_trainer join: module and optimizer %s\n", untouched ? "untouched" : "CHANGED");
    return untouched ? 4 : 6;
  }
  run.step = torch_glue::restore({&*received, 1}, *run.model, run.optimizer.get());
  run.train(std::stoull(a["--then"]));
  save_alone(a["--out"], snapshot_of(run).state());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  Args a;
  for (int i = 1; i + 1 < argc; i += 2) a[argv[i]] = argv[i + 1];
  const std::string mode = a.count("--mode") ? a["--mode"] : "save";
  std::map<std::string, std::vector<const char*>> required = {
      {"save", {"--root", "--rank", "--world", "--steps", "--seed", "--save-id"}},
      {"send", {"--root", "--out", "--steps", "--then", "--seed", "--identity", "--peer", "--port"}},
      {"join", {"--out", "--then", "--seed", "--identity", "--peer", "--port-file"}},
  };
  bool usage = !required.count(mode);
  if (!usage)
    for (const char* r : required[mode]) usage = usage || !a.count(r);
  if (usage) {
    std::fprintf(stderr, "usage: torch_trainer [--mode save|send|join] ... (see tests/torch/torch_trainer_main.cpp)\n");
    return 2;
  }
  const std::string who = mode == "save" ? "rank " + a["--rank"] : mode;
  try {
    at::set_num_threads(1);  // the same arithmetic, in the same order, as the test process
    if (mode == "send") return send(a);
    if (mode == "join") return join(a);
    return save_shard(a);
  } catch (const Error& e) {
    std::fprintf(stderr, "torch_trainer %s: %s\n", who.c_str(), e.what());
    return e.code() == ErrorCode::Timeout ? 3 : 5;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "torch_trainer %s: %s\n", who.c_str(), e.what());
    return 5;
  }
}
