// CheckpointWriter: the snapshot is taken at the call, training continues during the write,
// saves are serialized, and background errors are reported, once, never lost.
#include <gtest/gtest.h>

#include <future>
#include <latch>
#include <thread>

#include "checkpoint/helpers.h"
#include "support/temp_dir.h"

using namespace meshtrain;
using namespace meshtrain::checkpoint;
using namespace meshtrain::test_support;
using namespace std::chrono_literals;

namespace {

// Holds the background writer inside its first block until released, so that the test can
// change the state while the save is provably still running.
struct Gate {
  std::promise<void> entered_promise;
  std::shared_future<void> entered = entered_promise.get_future().share();
  std::promise<void> release_promise;
  std::shared_future<void> release = release_promise.get_future().share();
  std::atomic<bool> armed{true};

  std::function<void(uint64_t, uint64_t)> hook() {
    return [this](uint64_t, uint64_t) {
      if (armed.exchange(false)) {
        entered_promise.set_value();
        release.wait();
      }
    };
  }
};

TEST(AsyncSave, SavesTheStateAsOfTheSnapshot) {
  TempDir dir;
  Gate gate;
  SaveOptions o = small_blocks();
  o.after_block = gate.hook();
  CheckpointWriter writer(dir.path(), o);

  TestState s = make_test_state(1, 10, 4);
  TestState snapshot10 = make_test_state(1, 10, 4);
  writer.save_async(s.view());
  gate.entered.wait();
  EXPECT_TRUE(writer.busy());
  // Training goes on while step 10 is being written.
  s.update(2);
  s.step = 11;
  s.metadata["lr"] = "0.0005";
  gate.release_promise.set_value();
  TestState snapshot11 = s;
  // The second save waits for the first, then snapshots step 11.
  writer.save_async(s.view());
  s.update(3);
  s.step = 12;
  auto result = writer.wait();
  ASSERT_TRUE(result);
  EXPECT_EQ(result->step, 11u);
  EXPECT_TRUE(result->finalized);
  EXPECT_FALSE(writer.busy());
  EXPECT_FALSE(writer.wait());  // nothing pending any more

  expect_equal(load(dir / "step-10"), snapshot10);
  expect_equal(load(dir / "step-11"), snapshot11);
  expect_equal(load(dir.path()), snapshot11);
}

TEST(AsyncSave, SecondSaveBlocksUntilTheFirstIsDone) {
  TempDir dir;
  Gate gate;
  SaveOptions o = small_blocks();
  o.after_block = gate.hook();
  CheckpointWriter writer(dir.path(), o);
  TestState s = make_test_state(4, 20);
  writer.save_async(s.view());
  gate.entered.wait();
  s.step = 21;
  auto second = std::async(std::launch::async, [&] { writer.save_async(s.view()); });
  EXPECT_EQ(second.wait_for(200ms), std::future_status::timeout) << "second save did not wait for the first";
  gate.release_promise.set_value();
  second.get();
  writer.wait();
  auto entries = list_checkpoints(dir.path());
  ASSERT_EQ(entries.size(), 2u);
  EXPECT_TRUE(entries[0].complete && entries[1].complete);
}

TEST(AsyncSave, BackgroundErrorsSurfaceOnWaitOnce) {
  TempDir dir;
  write_text(dir / "file", "x");
  CheckpointWriter writer(dir / "file" / "ckpt");
  TestState s = make_test_state(1, 1);
  writer.save_async(s.view());  // the failure happens in the background
  try {
    writer.wait();
    ADD_FAILURE() << "no error";
  } catch (const IoError& e) {
    EXPECT_EQ(e.errno_value(), ENOTDIR) << e.what();
  }
  EXPECT_FALSE(writer.wait());  // reported once
  TestState fresh = make_test_state(1, 1);
  for (size_t i = 0; i < s.tensors.size(); ++i) EXPECT_EQ(s.tensors[i].bytes, fresh.tensors[i].bytes);
}

TEST(AsyncSave, BackgroundErrorsSurfaceOnTheNextSave) {
  TempDir dir;
  TestState s1 = make_test_state(1, 1);
  save(dir.path(), s1.view());
  fs::create_directories(dir / "step-2");
  fs::create_symlink("/dev/full", dir / "step-2" / "shard-0-of-1.bin");  // ENOSPC
  CheckpointWriter writer(dir.path());
  TestState s = make_test_state(2, 2);
  writer.save_async(s.view());
  std::this_thread::sleep_for(50ms);
  s.step = 3;
  try {
    writer.save_async(s.view());
    ADD_FAILURE() << "no error";
  } catch (const IoError& e) {
    EXPECT_EQ(e.errno_value(), ENOSPC) << e.what();
    EXPECT_NE(std::string(e.what()).find("shard-0-of-1.bin"), std::string::npos) << e.what();
  }
  // The failed call did not start a save of step 3; the next one does.
  EXPECT_FALSE(writer.busy());
  EXPECT_FALSE(fs::exists(dir / "step-3"));
  writer.save_async(s.view());
  EXPECT_EQ(writer.wait()->step, 3u);
  expect_equal(load(dir / "step-1"), s1);
  EXPECT_EQ(Checkpoint::open(dir.path()).manifest().step, 3u);
}

TEST(AsyncSave, InvalidStateIsRefusedAtTheCall) {
  TempDir dir;
  CheckpointWriter writer(dir.path());
  TestState s = make_test_state(1, 1);
  State v = s.view();
  v.tensors[1].name = v.tensors[0].name;
  EXPECT_THROW(writer.save_async(v), InvalidArgumentError);
  EXPECT_FALSE(writer.busy());
  CheckpointWriter multi(dir.path(), small_blocks(0, 2));
  expect_error<InvalidArgumentError>([&] { multi.save_async(s.view()); }, {"save_id"});
}

TEST(AsyncSave, TwoAsyncWritersMakeOneCheckpoint) {
  TempDir dir;
  TestState s = make_test_state(6, 60, 2);
  CheckpointWriter w0(dir.path(), small_blocks(0, 2));
  CheckpointWriter w1(dir.path(), small_blocks(1, 2));
  w1.reserve(1 << 20);
  w0.save_async(s.view(), "async-60");
  w1.save_async(s.view(), "async-60");
  TestState snapshot = s;
  s.update(7);
  EXPECT_TRUE(w0.wait()->finalized);
  EXPECT_FALSE(w1.wait()->finalized);
  expect_equal(load(dir.path()), snapshot);
}

TEST(AsyncSave, DestructorWaitsForTheSave) {
  TempDir dir;
  TestState s = make_test_state(8, 80, 4);
  {
    CheckpointWriter writer(dir.path());
    writer.save_async(s.view());
  }
  expect_equal(load(dir.path()), s);
}

}  // namespace
