// Checkpoints written by real writer processes (tests/checkpoint/checkpoint_writer), one shard
// each, and a writer SIGKILLed in the middle of its shard.
#include <gtest/gtest.h>
#include <signal.h>

#include <thread>

#include "checkpoint/helpers.h"
#include "support/child_process.h"
#include "support/temp_dir.h"

using namespace meshtrain;
using namespace meshtrain::checkpoint;
using namespace meshtrain::test_support;
using namespace std::chrono_literals;

namespace {

std::vector<std::string> writer_args(const fs::path& root, uint32_t rank, uint32_t world, uint64_t step,
                                     uint64_t seed, const std::string& save_id, std::vector<std::string> extra = {}) {
  std::vector<std::string> a = {CHECKPOINT_WRITER_BINARY, "--root", root.string(), "--rank", std::to_string(rank),
                                "--world", std::to_string(world), "--step", std::to_string(step), "--seed",
                                std::to_string(seed), "--save-id", save_id, "--scale", "4"};
  a.insert(a.end(), extra.begin(), extra.end());
  return a;
}

void save_with_processes(const fs::path& root, uint32_t world, uint64_t step, uint64_t seed) {
  std::vector<std::unique_ptr<ChildProcess>> writers;
  for (uint32_t r = 0; r < world; ++r)
    writers.push_back(std::make_unique<ChildProcess>(writer_args(root, r, world, step, seed, "mp-" + std::to_string(step))));
  for (uint32_t r = 0; r < world; ++r) ASSERT_EQ(writers[r]->wait(60s), 0) << "writer " << r;
}

TEST(MultiProcess, FourWritersLoadWithOneThreeAndFourReaders) {
  TempDir dir;
  save_with_processes(dir.path(), 4, 100, 21);
  TestState expected = make_test_state(21, 100, 4);
  Checkpoint c = Checkpoint::open(dir.path());
  EXPECT_EQ(c.manifest().world_size, 4u);
  for (const auto& s : c.manifest().shards) EXPECT_EQ(s.range, partition(c.manifest().total_bytes, s.rank, 4));
  for (uint32_t readers : {1u, 3u, 4u}) {
    std::vector<LoadedState> loaded;
    for (uint32_t r = 0; r < readers; ++r) loaded.push_back(c.load(r, readers));
    expect_pieces_equal(loaded, expected);
    if (readers == 1) expect_equal(loaded[0], expected);
  }
  for (const auto& check : c.verify()) EXPECT_TRUE(check.ok) << check.error;
}

TEST(MultiProcess, WriterKilledMidSaveLeavesThePreviousCheckpoint) {
  TempDir dir;
  save_with_processes(dir.path(), 4, 100, 31);

  // Step 200: writer 2 writes 30 of its ~70 blocks and is killed there; rank 0 gives up waiting.
  fs::path ready = dir / "writer2.ready";
  std::vector<std::unique_ptr<ChildProcess>> writers;
  for (uint32_t r = 0; r < 4; ++r) {
    std::vector<std::string> extra;
    if (r == 0) extra = {"--finalize-timeout-ms", "1500"};
    if (r == 2) extra = {"--stall-after-blocks", "30", "--ready-file", ready.string()};
    writers.push_back(std::make_unique<ChildProcess>(writer_args(dir.path(), r, 4, 200, 32, "mp-200", extra)));
  }
  auto until = std::chrono::steady_clock::now() + 30s;
  while (!fs::exists(ready) && std::chrono::steady_clock::now() < until) std::this_thread::sleep_for(5ms);
  ASSERT_TRUE(fs::exists(ready)) << "writer 2 never reached the crash point";
  writers[2]->signal(SIGKILL);
  EXPECT_EQ(writers[2]->wait(10s), 128 + SIGKILL);
  EXPECT_EQ(writers[1]->wait(30s), 0);
  EXPECT_EQ(writers[3]->wait(30s), 0);
  EXPECT_EQ(writers[0]->wait(30s), 3) << "rank 0 should time out waiting for writer 2";

  // The partial shard is there, the checkpoint is not complete, and loading takes step 100.
  EXPECT_TRUE(fs::exists(dir / "step-200" / "shard-2-of-4.bin"));
  EXPECT_GT(fs::file_size(dir / "step-200" / "shard-2-of-4.bin"), 0u);
  EXPECT_FALSE(fs::exists(dir / "step-200" / "manifest.json"));
  EXPECT_EQ(read_text(dir / "latest"), "step-100\n");
  TestState previous = make_test_state(31, 100, 4);
  expect_equal(load(dir.path()), previous);
  auto entries = list_checkpoints(dir.path());
  ASSERT_EQ(entries.size(), 2u);
  EXPECT_FALSE(entries[1].complete);

  // The next save cleans the partial one up.
  save_with_processes(dir.path(), 4, 300, 33);
  EXPECT_FALSE(fs::exists(dir / "step-200"));
  expect_equal(load(dir.path()), make_test_state(33, 300, 4));
}

}  // namespace
