// Live state transfer of a torch training state between real processes: a trainer sends its
// snapshot to a joiner over a bulk channel on loopback; both continue bit-identically to each
// other and to a run restored from a disk checkpoint of the same snapshot. A sender killed
// mid-transfer leaves the joiner's module untouched, with a named error.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <gtest/gtest.h>
#include <signal.h>

#include <cstring>
#include <thread>

#include "checkpoint/helpers.h"
#include "meshtrain/crypto.h"
#include "meshtrain/torch.h"
#include "support/child_process.h"
#include "support/temp_dir.h"
#include "training.h"

using namespace meshtrain;
using namespace meshtrain::test_support;
using namespace std::chrono_literals;
namespace tg = meshtrain::torch_glue;

namespace {

constexpr uint64_t kSeed = 11;
constexpr uint64_t kStepsBefore = 9;  // trained by the sender before the transfer
constexpr uint64_t kStepsAfter = 7;   // trained by both after it

class TorchEnvironment : public ::testing::Environment {
 public:
  void SetUp() override { at::set_num_threads(1); }  // as in the trainer processes
};
[[maybe_unused]] const auto* const environment = ::testing::AddGlobalTestEnvironment(new TorchEnvironment);

// A sender and a joiner process, each with its own identity, pinned to the other's key.
struct Pair {
  explicit Pair(const TempDir& dir) : dir(dir) {
    sender_id.save_pem(dir / "sender.pem");
    joiner_id.save_pem(dir / "joiner.pem");
  }

  void start_joiner() {
    joiner = std::make_unique<ChildProcess>(
        std::vector<std::string>{TORCH_TRAINER_BINARY, "--mode", "join", "--out", (dir / "joiner-final").string(),
                                 "--then", std::to_string(kStepsAfter), "--seed", std::to_string(kSeed), "--identity",
                                 (dir / "joiner.pem").string(), "--peer", sender_id.public_key().hex(), "--port-file",
                                 (dir / "port").string()},
        (dir / "joiner.log").string());
  }

  // Waits for the joiner's listening port, then starts the sender.
  void start_sender(std::vector<std::string> extra = {}) {
    const auto until = std::chrono::steady_clock::now() + 60s;
    while (!fs::exists(dir / "port")) {
      ASSERT_FALSE(joiner->wait(10ms).has_value()) << "the joiner exited early:\n" << log("joiner");
      ASSERT_LT(std::chrono::steady_clock::now(), until) << "the joiner wrote no port file in 60 s";
    }
    std::string port = read_text(dir / "port");
    std::vector<std::string> argv = {TORCH_TRAINER_BINARY, "--mode", "send", "--root", (dir / "sent").string(),
                                     "--out", (dir / "sender-final").string(), "--steps", std::to_string(kStepsBefore),
                                     "--then", std::to_string(kStepsAfter), "--seed", std::to_string(kSeed),
                                     "--identity", (dir / "sender.pem").string(), "--peer",
                                     joiner_id.public_key().hex(), "--port", port.substr(0, port.find('\n'))};
    argv.insert(argv.end(), extra.begin(), extra.end());
    sender = std::make_unique<ChildProcess>(argv, (dir / "sender.log").string());
  }

  std::string log(const std::string& who) const { return read_text(dir / (who + ".log")); }

  const TempDir& dir;
  crypto::Identity sender_id = crypto::Identity::generate();
  crypto::Identity joiner_id = crypto::Identity::generate();
  std::unique_ptr<ChildProcess> joiner, sender;
};

// A checkpoint on disk equals a snapshot byte for byte: every tensor, the metadata (optimizer
// options), the blobs (RNG state, cursor).
void expect_checkpoint_equals(const fs::path& root, const tg::Snapshot& expected, const std::string& who) {
  SCOPED_TRACE(who);
  checkpoint::LoadedState loaded = checkpoint::load(root);
  const checkpoint::State& s = expected.state();
  EXPECT_EQ(loaded.step(), s.step);
  EXPECT_EQ(loaded.manifest.metadata, s.metadata);
  EXPECT_EQ(loaded.manifest.blobs, s.blobs);
  ASSERT_EQ(loaded.tensors.size(), s.tensors.size());
  for (size_t i = 0; i < s.tensors.size(); ++i) {
    const auto& got = loaded.tensors[i];
    const auto& want = s.tensors[i];
    ASSERT_EQ(got.info.name, want.name);
    EXPECT_EQ(got.info.shape, want.shape) << want.name;
    EXPECT_EQ(got.info.dtype, want.buffer.dtype) << want.name;
    ASSERT_EQ(got.bytes.size(), want.buffer.bytes()) << want.name;
    EXPECT_EQ(std::memcmp(got.bytes.data(), want.buffer.data, got.bytes.size()), 0) << want.name << " differs";
  }
}

TEST(TorchTransfer, JoinerAndSenderContinueBitIdenticallyToADiskRestoreOfTheSameSnapshot) {
  TempDir dir;
  Pair pair(dir);
  pair.start_joiner();
  ASSERT_NO_FATAL_FAILURE(pair.start_sender());
  ASSERT_EQ(pair.sender->wait(120s), 0) << pair.log("sender");
  ASSERT_EQ(pair.joiner->wait(120s), 0) << pair.log("joiner");

  // The disk round trip: the sender saved the snapshot it sent; restore it here, train on.
  TrainingRun from_disk(kSeed + 2000, "adam");
  from_disk.step = tg::restore(checkpoint::Checkpoint::open(dir / "sent"), *from_disk.model, from_disk.optimizer.get());
  ASSERT_EQ(from_disk.step, kStepsBefore);
  from_disk.train(kStepsAfter);
  tg::Snapshot expected = tg::snapshot(*from_disk.model, from_disk.optimizer.get(), from_disk.step);
  expected.state().blobs["cursor"] = {static_cast<uint8_t>(from_disk.step)};

  expect_checkpoint_equals(dir / "sender-final", expected, "sender after the transfer");
  expect_checkpoint_equals(dir / "joiner-final", expected, "joiner");

  // Not vacuous: the runs moved on from the snapshot, and a run that did not receive it differs.
  checkpoint::LoadedState sent = checkpoint::load(dir / "sent");
  checkpoint::LoadedState final_state = checkpoint::load(dir / "joiner-final");
  ASSERT_EQ(sent.buffer.size(), final_state.buffer.size());
  EXPECT_NE(std::memcmp(sent.buffer.data(), final_state.buffer.data(), sent.buffer.size()), 0);
  TrainingRun fresh(kSeed + 1000, "adam");  // the joiner's own initial weights
  fresh.step = kStepsBefore;
  fresh.train(kStepsAfter);
  EXPECT_FALSE(at::equal(fresh.model->fc1->weight, from_disk.model->fc1->weight));
}

TEST(TorchTransfer, SenderKilledMidTransferLeavesTheJoinerUntouchedWithANamedError) {
  TempDir dir;
  Pair pair(dir);
  pair.start_joiner();
  ASSERT_NO_FATAL_FAILURE(pair.start_sender({"--die-after-blocks", "1"}));
  EXPECT_EQ(pair.sender->wait(120s), 128 + SIGKILL) << pair.log("sender");
  // Exit code 4: the transfer failed and the joiner checked that its module and optimizer are
  // as they were (6 if not).
  ASSERT_EQ(pair.joiner->wait(120s), 4) << pair.log("joiner");
  std::string log = pair.log("joiner");
  std::printf("joiner's log:\n%s", log.c_str());
  for (const char* part : {"transfer failed: PeerLost", "state transfer of step 9", "sender lost after",
                           "partial state is discarded", "module and optimizer untouched"})
    EXPECT_NE(log.find(part), std::string::npos) << "joiner log lacks \"" << part << "\":\n" << log;
  EXPECT_FALSE(fs::exists(dir / "joiner-final"));
  // The sender saved the snapshot to disk before sending: the joiner could still load it there.
  EXPECT_EQ(checkpoint::Checkpoint::open(dir / "sent").manifest().step, kStepsBefore);
}

}  // namespace
