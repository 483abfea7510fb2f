// Sharded checkpoints in one process: layout and partition, save with several writers and
// load with any number of readers, damage detection, latest/pruning, failures while saving.
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/resource.h>

#include <cstring>
#include <thread>

#include "checkpoint/helpers.h"
#include "checkpoint/internal.h"
#include "support/temp_dir.h"

using namespace meshtrain;
using namespace meshtrain::checkpoint;
using namespace meshtrain::test_support;
using namespace std::chrono_literals;

namespace {

// ---- partition -----------------------------------------------------------------------------

class PartitionTest : public ::testing::TestWithParam<std::tuple<uint64_t, uint32_t>> {};

TEST_P(PartitionTest, ContiguousAlignedBalanced) {
  auto [total, world] = GetParam();
  uint64_t pos = 0, smallest = UINT64_MAX, largest = 0;
  for (uint32_t r = 0; r < world; ++r) {
    ByteRange range = partition(total, r, world);
    EXPECT_EQ(range.begin, pos);
    EXPECT_LE(range.begin, range.end);
    if (r + 1 < world) EXPECT_EQ(range.end % kAlignmentBytes, 0u);
    smallest = std::min(smallest, range.size());
    largest = std::max(largest, range.size());
    pos = range.end;
  }
  EXPECT_EQ(pos, total);
  EXPECT_LE(largest - smallest, kAlignmentBytes * 2);
}

INSTANTIATE_TEST_SUITE_P(Sizes, PartitionTest,
                         ::testing::Combine(::testing::Values(0, 1, 63, 64, 65, 1000, 3 * 4096 + 7, 1 << 20,
                                                              (1ull << 40) + 12345),
                                            ::testing::Values(1u, 2u, 3u, 4u, 7u, 64u)));

TEST(Partition, RejectsBadRanks) {
  EXPECT_THROW(partition(100, 4, 4), InvalidArgumentError);
  EXPECT_THROW(partition(100, 0, 0), InvalidArgumentError);
}

TEST(Layout, AlignedOffsetsInStateOrder) {
  TestState s = make_test_state(1, 1);
  uint64_t total = 0;
  auto tensors = plan_layout(s.view(), &total);
  ASSERT_EQ(tensors.size(), s.tensors.size());
  uint64_t end = 0;
  for (size_t i = 0; i < tensors.size(); ++i) {
    EXPECT_EQ(tensors[i].name, s.tensors[i].name);
    EXPECT_EQ(tensors[i].offset % kAlignmentBytes, 0u);
    EXPECT_GE(tensors[i].offset, end);
    EXPECT_LT(tensors[i].offset - end, kAlignmentBytes);
    EXPECT_EQ(tensors[i].bytes, s.tensors[i].bytes.size());
    end = tensors[i].offset + tensors[i].bytes;
  }
  EXPECT_EQ(total, end);
}

TEST(Layout, RejectsBadStates) {
  TestState s = make_test_state(1, 1);
  {
    State v = s.view();
    v.tensors[1].name = v.tensors[0].name;
    expect_error<InvalidArgumentError>([&] { plan_layout(v); }, {"model/embed.weight", "twice"});
  }
  {
    State v = s.view();
    v.tensors[2].shape = {3, 5, 78};
    expect_error<InvalidArgumentError>([&] { plan_layout(v); }, {"model/proj.weight", "1155 elements"});
  }
  {
    State v = s.view();
    v.tensors[0].buffer.device = DeviceKind::Cuda;
    expect_error<InvalidArgumentError>([&] { plan_layout(v); }, {"model/embed.weight", "GPU"});
  }
  {
    State v = s.view();
    v.tensors[0].name = "bad\nname";
    expect_error<InvalidArgumentError>([&] { plan_layout(v); }, {"control character"});
  }
  {
    State v = s.view();
    v.tensors[0].shape = {-1, 4773};
    expect_error<InvalidArgumentError>([&] { plan_layout(v); }, {"negative"});
  }
}

// ---- round trips ---------------------------------------------------------------------------

class RoundTripTest : public ::testing::TestWithParam<std::tuple<uint32_t, uint32_t>> {};

TEST_P(RoundTripTest, ReadersGetByteIdenticalTensors) {
  auto [writers, readers] = GetParam();
  TempDir dir;
  TestState s = make_test_state(42, 100 + writers);
  auto result = save_with_writers(dir.path(), s, writers);
  EXPECT_TRUE(result.finalized);
  EXPECT_EQ(result.dir, dir.path() / ("step-" + std::to_string(s.step)));

  Checkpoint c = Checkpoint::open(dir.path());
  EXPECT_EQ(c.manifest().world_size, writers);
  EXPECT_EQ(c.manifest().step, s.step);
  std::vector<LoadedState> loaded;
  for (uint32_t r = 0; r < readers; ++r) {
    loaded.push_back(c.load(r, readers));
    EXPECT_EQ(loaded.back().range, partition(c.manifest().total_bytes, r, readers));
  }
  expect_pieces_equal(loaded, s);
  if (readers == 1) expect_equal(loaded[0], s);
}

INSTANTIATE_TEST_SUITE_P(WritersReaders, RoundTripTest,
                         ::testing::Combine(::testing::Values(1u, 2u, 4u, 7u), ::testing::Values(1u, 3u, 4u, 5u)));

TEST(RoundTrip, LargeBlocksAndManyThreads) {
  TempDir dir;
  TestState s = make_test_state(7, 3, 8);  // ~2 MiB
  SaveOptions o;
  o.block_bytes = 1 << 20;
  o.io_threads = 4;
  save(dir.path(), s.view(), o);
  LoadOptions lo;
  lo.io_threads = 3;
  expect_equal(load(dir.path(), 0, 1, lo), s);
}

TEST(RoundTrip, EmptyState) {
  TempDir dir;
  TestState s;
  s.step = 5;
  s.metadata["only"] = "metadata";
  save(dir.path(), s.view());
  LoadedState l = load(dir.path());
  EXPECT_EQ(l.step(), 5u);
  EXPECT_EQ(l.manifest.total_bytes, 0u);
  EXPECT_EQ(l.manifest.metadata, s.metadata);
  EXPECT_TRUE(l.tensors.empty());
}

TEST(RoundTrip, OnlyEmptyTensorsWithManyWriters) {
  TempDir dir;
  TestState s;
  s.step = 6;
  s.tensors.push_back({"a", DType::Float32, {0}, {}});
  s.tensors.push_back({"b", DType::Int64, {4, 0}, {}});
  save_with_writers(dir.path(), s, 3);
  expect_equal(load(dir.path()), s);
}

TEST(RoundTrip, LoadIntoCallerBuffers) {
  TempDir dir;
  TestState s = make_test_state(3, 9);
  save_with_writers(dir.path(), s, 4);
  TestState dest = make_test_state(99, 0);  // same shapes, other bytes
  State view = dest.view();
  Checkpoint::open(dir.path()).load_into(view.tensors);
  for (size_t i = 0; i < s.tensors.size(); ++i) EXPECT_EQ(dest.tensors[i].bytes, s.tensors[i].bytes) << s.tensors[i].name;

  // A subset, and mismatches refused before anything is read.
  TestState other = make_test_state(98, 0);
  State sub = other.view();
  sub.tensors.erase(sub.tensors.begin(), sub.tensors.begin() + 5);
  Checkpoint::open(dir.path()).load_into(sub.tensors);
  for (size_t i = 5; i < s.tensors.size(); ++i) EXPECT_EQ(other.tensors[i].bytes, s.tensors[i].bytes);
  EXPECT_NE(other.tensors[0].bytes, s.tensors[0].bytes);

  State wrong = other.view();
  wrong.tensors[0].shape = {129, 37};
  expect_error<InvalidArgumentError>([&] { Checkpoint::open(dir.path()).load_into(wrong.tensors); },
                                     {"model/embed.weight", "37x129"});
  wrong = other.view();
  wrong.tensors[0].name = "no/such/tensor";
  expect_error<InvalidArgumentError>([&] { Checkpoint::open(dir.path()).load_into(wrong.tensors); },
                                     {"no/such/tensor"});
}

TEST(RoundTrip, ReadRangeMatchesLayout) {
  TempDir dir;
  TestState s = make_test_state(5, 2);
  save_with_writers(dir.path(), s, 3);
  Checkpoint c = Checkpoint::open(dir.path());
  const TensorInfo* t = c.manifest().find_tensor("optim/exp_avg");
  ASSERT_NE(t, nullptr);
  // An odd window inside one tensor, crossing shard and block boundaries.
  ByteRange r{t->offset + 4097, t->offset + t->bytes - 5};
  std::vector<uint8_t> out(r.size());
  c.read_range(r, out);
  const auto& src = s.tensors[5].bytes;
  EXPECT_TRUE(std::equal(out.begin(), out.end(), src.begin() + 4097));
  EXPECT_THROW(c.read_range({0, c.manifest().total_bytes + 1}, std::span<uint8_t>()), InvalidArgumentError);
}

// One reader of a multi-writer checkpoint: shards 1.. land at 64-byte (not 4 KiB) cuts of the
// result buffer, so their blocks are read with O_DIRECT through a bounce buffer. Blocks larger
// than one bounce chunk, a block size that is not a multiple of 4 KiB (later blocks start at
// unaligned file offsets) and shards that end inside a page.
class BounceTest : public ::testing::TestWithParam<uint64_t> {};

TEST_P(BounceTest, OneReaderOfThreeWritersGetsByteIdenticalTensorsAndDamageIsNamed) {
  TempDir dir;
  TestState s = make_test_state(21, 400, 64);  // ~17 MiB: ~5.6 MiB shards
  SaveOptions o = small_blocks();
  o.block_bytes = GetParam();
  fs::path step_dir = save_with_writers(dir.path(), s, 3, o).dir;
  Checkpoint c = Checkpoint::open(dir.path());
  bool misaligned_shard = false;
  for (const auto& sh : c.manifest().shards) misaligned_shard |= sh.range.begin % 4096 != 0;
  ASSERT_TRUE(misaligned_shard) << "no shard starts at an unaligned cut: the bounce path is not exercised";
  expect_equal(c.load(0, 1), s);

  uint64_t off = (9u << 19);  // 4.5 MiB: past the first 4 MiB bounce chunk
  flip_byte(step_dir / "shard-1-of-3.bin", off);
  expect_error<CorruptError>([&] { c.load(0, 1); },
                             {"shard-1-of-3.bin", "block " + std::to_string(off / GetParam()) + " ", "SHA-256"});
}

INSTANTIATE_TEST_SUITE_P(BlockBytes, BounceTest, ::testing::Values(uint64_t{8} << 20, (uint64_t{1} << 20) + 64));

// tmpfs refuses O_DIRECT: loads fall back to the page cache there.
TEST(RoundTrip, SaveAndLoadOnTmpfs) {
  std::error_code ec;
  if (!fs::is_directory("/dev/shm", ec)) GTEST_SKIP() << "/dev/shm is not available on this machine";
  std::string pattern = "/dev/shm/meshtrain-test-XXXXXX";
  if (!::mkdtemp(pattern.data())) GTEST_SKIP() << "cannot create a directory under /dev/shm: " << std::strerror(errno);
  struct Remove {
    fs::path p;
    ~Remove() {
      std::error_code e;
      fs::remove_all(p, e);
    }
  } tmp{pattern};
  TestState s = make_test_state(23, 500, 4);
  fs::path step_dir = save_with_writers(tmp.p, s, 4).dir;
  Checkpoint c = Checkpoint::open(tmp.p);
  expect_equal(c.load(0, 1), s);
  std::vector<LoadedState> pieces;
  for (uint32_t r = 0; r < 4; ++r) pieces.push_back(c.load(r, 4));
  expect_pieces_equal(pieces, s);
  flip_byte(step_dir / "shard-2-of-4.bin", 100);
  expect_error<CorruptError>([&] { c.load(0, 1); }, {"shard-2-of-4.bin", "block 0", "SHA-256"});
}

// ---- damage --------------------------------------------------------------------------------

struct Damaged {
  TempDir dir;
  TestState s = make_test_state(11, 300);
  fs::path step_dir;
  Damaged() { step_dir = save_with_writers(dir.path(), s, 4).dir; }
  fs::path shard(int r) const { return step_dir / ("shard-" + std::to_string(r) + "-of-4.bin"); }
};

TEST(Damage, FlippedByteNamesTheShard) {
  Damaged d;
  flip_byte(d.shard(2), 5000);
  expect_error<CorruptError>([&] { load(d.dir.path()); }, {"shard-2-of-4.bin", "block 1", "SHA-256"});
  // Readers whose range does not touch shard 2 are not affected (partial, verified reads).
  Checkpoint c = Checkpoint::open(d.dir.path());
  EXPECT_NO_THROW(c.load(0, 4));
  EXPECT_NO_THROW(c.load(3, 4));
  expect_error<CorruptError>([&] { c.load(2, 4); }, {"shard-2-of-4.bin"});
  auto checks = c.verify();
  ASSERT_EQ(checks.size(), 4u);
  for (const auto& ch : checks) {
    EXPECT_EQ(ch.ok, ch.rank != 2) << ch.file << ": " << ch.error;
    if (ch.rank == 2) EXPECT_NE(ch.error.find("shard-2-of-4.bin"), std::string::npos);
  }
}

TEST(Damage, TruncatedShardNamesTheShard) {
  Damaged d;
  fs::resize_file(d.shard(1), fs::file_size(d.shard(1)) - 1);
  expect_error<CorruptError>([&] { load(d.dir.path()); }, {"shard-1-of-4.bin", "truncated"});
}

TEST(Damage, ExtendedShardNamesTheShard) {
  Damaged d;
  fs::resize_file(d.shard(3), fs::file_size(d.shard(3)) + 10);
  expect_error<CorruptError>([&] { load(d.dir.path()); }, {"shard-3-of-4.bin", "bytes"});
}

TEST(Damage, MissingShardNamesTheShard) {
  Damaged d;
  fs::remove(d.shard(0));
  expect_error<CorruptError>([&] { load(d.dir.path()); }, {"shard-0-of-4.bin", "missing"});
  auto checks = Checkpoint::open(d.dir.path()).verify();
  EXPECT_FALSE(checks[0].ok);
  EXPECT_TRUE(checks[1].ok && checks[2].ok && checks[3].ok);
}

// A FIFO where a shard or `latest` should be: refused (a shard) or ignored (`latest`, as any
// unreadable one: the newest complete checkpoint loads) at once, not an open() that waits for a
// writer forever.
TEST(Damage, FifoInPlaceOfAFileIsRefusedWithoutBlocking) {
  Damaged d;
  fs::remove(d.shard(1));
  ASSERT_EQ(::mkfifo(d.shard(1).c_str(), 0600), 0);
  expect_error<CorruptError>([&] { load(d.dir.path()); }, {"shard-1-of-4.bin", "not a regular file"});
  Damaged e;
  fs::remove(e.dir / "latest");
  ASSERT_EQ(::mkfifo((e.dir / "latest").c_str(), 0600), 0);
  expect_equal(load(e.dir.path()), e.s);
}

// A reader opens a shard only while it reads it: loading and verifying a checkpoint of 120
// writers (two descriptors per open shard) works within 40 free file descriptors. All shards
// open at once ran out of descriptors from about 500 writers under the usual limit of 1024.
TEST(Load, ManyShardsNeedFewFileDescriptors) {
  TempDir dir;
  TestState s = make_test_state(31, 9, 20);
  save_with_writers(dir.path(), s, 120);
  size_t open_now = 0;
  for ([[maybe_unused]] const auto& e : fs::directory_iterator("/proc/self/fd")) ++open_now;
  rlimit saved{};
  ASSERT_EQ(getrlimit(RLIMIT_NOFILE, &saved), 0);
  rlimit tight = saved;
  tight.rlim_cur = open_now + 40;
  ASSERT_EQ(setrlimit(RLIMIT_NOFILE, &tight), 0);
  LoadOptions o;
  o.io_threads = 4;
  Checkpoint c = Checkpoint::open(dir.path(), o);
  LoadedState loaded = c.load(0, 1);
  const auto checks = c.verify();
  setrlimit(RLIMIT_NOFILE, &saved);
  expect_equal(loaded, s);
  for (const auto& ch : checks) EXPECT_TRUE(ch.ok) << ch.file << ": " << ch.error;
}

TEST(Damage, EveryByteOfEveryShardIsCovered) {
  // Flip each byte position class (first, last, block edges) of a small shard: always caught.
  Damaged d;
  uint64_t size = fs::file_size(d.shard(1));
  for (uint64_t off : {uint64_t{0}, uint64_t{4095}, uint64_t{4096}, size / 2, size - 1}) {
    flip_byte(d.shard(1), off);
    EXPECT_THROW(load(d.dir.path()), CorruptError) << "offset " << off;
    flip_byte(d.shard(1), off);  // restore
    EXPECT_NO_THROW(load(d.dir.path())) << "offset " << off;
  }
}

TEST(Damage, AlteredManifestDigestIsCaught) {
  Damaged d;
  fs::path mp = d.step_dir / "manifest.json";
  std::string m = read_text(mp);
  // Change one block digest: the shard digest no longer matches its list.
  auto pos = m.find("\"block_sha256\": [");
  ASSERT_NE(pos, std::string::npos);
  pos = m.find('"', pos + 18) + 1;
  m[pos] = m[pos] == 'a' ? 'b' : 'a';
  write_text(mp, m);
  expect_error<CorruptError>([&] { Checkpoint::open(d.dir.path()); }, {"shards[0].sha256", "block_sha256"});
}

// ---- latest, incomplete directories, pruning ------------------------------------------------

TEST(Latest, PointsAtTheNewestCompleteCheckpoint) {
  TempDir dir;
  for (uint64_t step : {10, 20, 30}) {
    TestState s = make_test_state(step, step);
    save(dir.path(), s.view(), small_blocks());
  }
  EXPECT_EQ(read_text(dir / "latest"), "step-30\n");
  EXPECT_EQ(Checkpoint::open(dir.path()).manifest().step, 30u);

  // A crash between the manifest and the pointer update leaves `latest` one behind: the newer
  // complete checkpoint wins.
  write_text(dir / "latest", "step-20\n");
  EXPECT_EQ(Checkpoint::open(dir.path()).manifest().step, 30u);
  // Missing or garbage pointer: same.
  fs::remove(dir / "latest");
  EXPECT_EQ(Checkpoint::open(dir.path()).manifest().step, 30u);
  write_text(dir / "latest", "../../etc\n");
  EXPECT_EQ(Checkpoint::open(dir.path()).manifest().step, 30u);

  // Saving an older step does not move `latest` back.
  write_text(dir / "latest", "step-30\n");
  TestState old = make_test_state(5, 5);
  save(dir.path(), old.view(), small_blocks());
  EXPECT_EQ(read_text(dir / "latest"), "step-30\n");
  // An explicit directory loads that checkpoint.
  expect_equal(load(dir / "step-5"), old);
  expect_equal(load(dir.path().string() + "/step-5/"), old);
}

TEST(Latest, IncompleteDirectoriesAreIgnoredThenRemoved) {
  TempDir dir;
  TestState s10 = make_test_state(10, 10);
  save(dir.path(), s10.view(), small_blocks());
  // An interrupted save of step 20: a shard, no manifest.
  fs::create_directories(dir / "step-20");
  write_text(dir / "step-20" / "shard-0-of-2.bin", "partial");
  write_text(dir / "step-20" / "manifest.json.tmp", "{\"half\":");
  expect_equal(load(dir.path()), s10);
  expect_error<IoError>([&] { load(dir / "step-20"); }, {"incomplete"});
  auto entries = list_checkpoints(dir.path());
  ASSERT_EQ(entries.size(), 2u);
  EXPECT_TRUE(entries[0].complete);
  EXPECT_FALSE(entries[1].complete);
  // The next complete save removes it.
  TestState s30 = make_test_state(30, 30);
  save(dir.path(), s30.view(), small_blocks());
  EXPECT_FALSE(fs::exists(dir / "step-20"));
  EXPECT_TRUE(fs::exists(dir / "step-10"));
}

TEST(Latest, NothingToLoad) {
  TempDir dir;
  auto e = expect_error<IoError>([&] { load(dir.path()); }, {"no complete checkpoint"});
  fs::create_directories(dir / "step-3");
  expect_error<IoError>([&] { load(dir.path()); }, {"no complete checkpoint", "step-3"});
  expect_error<IoError>([&] { load(dir / "nope"); }, {"not a directory"});
  try {
    load(dir.path());
  } catch (const IoError& err) {
    EXPECT_EQ(err.errno_value(), ENOENT);
  }
}

TEST(Prune, KeepsTheLastN) {
  TempDir dir;
  SaveOptions o = small_blocks();
  o.keep_last = 2;
  for (uint64_t step = 1; step <= 5; ++step) {
    TestState s = make_test_state(step, step);
    save(dir.path(), s.view(), o);
  }
  auto entries = list_checkpoints(dir.path());
  ASSERT_EQ(entries.size(), 2u);
  EXPECT_EQ(entries[0].step, 4u);
  EXPECT_EQ(entries[1].step, 5u);
  EXPECT_EQ(read_text(dir / "latest"), "step-5\n");
  TestState s5 = make_test_state(5, 5);
  expect_equal(load(dir.path()), s5);

  // prune() directly; `latest` is protected even when older than the kept ones.
  write_text(dir / "latest", "step-4\n");
  auto removed = prune(dir.path(), 1);
  EXPECT_TRUE(removed.empty());
  write_text(dir / "latest", "step-5\n");
  removed = prune(dir.path(), 1);
  ASSERT_EQ(removed.size(), 1u);
  EXPECT_EQ(removed[0].filename(), "step-4");
}

// A run resumed from an older checkpoint saves steps below the newest complete one: the save's
// prune keeps what it just committed, and leaves the incomplete directory of a later step
// (other writers may be writing it meanwhile); prune() without a committed step works as before.
TEST(Prune, ASaveBelowTheNewestKeepsItsCheckpointAndLaterIncompleteOnes) {
  TempDir dir;
  SaveOptions o = small_blocks();
  o.keep_last = 2;
  for (uint64_t step = 5; step <= 7; ++step) save(dir.path(), make_test_state(step, step).view(), o);
  fs::create_directories(dir / "step-4");
  write_text(dir / "step-4" / "shard-0-of-1.bin", "being written");
  TestState s3 = make_test_state(3, 3);
  save(dir.path(), s3.view(), o);
  std::vector<uint64_t> steps;
  for (const auto& e : list_checkpoints(dir.path())) steps.push_back(e.step);
  EXPECT_EQ(steps, (std::vector<uint64_t>{3, 4, 6, 7}));
  expect_equal(Checkpoint::open(dir / "step-3").load(0, 1), s3);
  EXPECT_EQ(read_text(dir / "latest"), "step-7\n");  // not moved back
  auto removed = prune(dir.path(), 2);
  ASSERT_EQ(removed.size(), 2u);
  EXPECT_EQ(removed[0].filename(), "step-3");
  EXPECT_EQ(removed[1].filename(), "step-4");
}

TEST(Prune, ZeroKeepsEverything) {
  TempDir dir;
  for (uint64_t step = 1; step <= 3; ++step) {
    TestState s = make_test_state(step, step);
    save(dir.path(), s.view(), small_blocks());
  }
  EXPECT_EQ(list_checkpoints(dir.path()).size(), 3u);
}

// ---- failures while saving ------------------------------------------------------------------

// The state a failed save was given is unchanged.
void expect_unharmed(TestState& s, uint64_t seed) {
  TestState fresh = make_test_state(seed, s.step);
  for (size_t i = 0; i < s.tensors.size(); ++i) EXPECT_EQ(s.tensors[i].bytes, fresh.tensors[i].bytes);
}

TEST(SaveFailure, RootUnderARegularFile) {
  TempDir dir;
  write_text(dir / "file", "x");
  TestState s = make_test_state(1, 1);
  auto m = expect_error<IoError>([&] { save(dir / "file" / "ckpt", s.view()); }, {"file"});
  try {
    save(dir / "file" / "ckpt", s.view());
  } catch (const IoError& e) {
    EXPECT_EQ(e.errno_value(), ENOTDIR);
  }
  expect_unharmed(s, 1);
}

TEST(SaveFailure, ReadOnlyLocation) {
  // /proc refuses new directories even to root.
  TestState s = make_test_state(1, 1);
  EXPECT_THROW(save("/proc/meshtrain-checkpoint-test", s.view()), IoError);
  expect_unharmed(s, 1);
}

TEST(SaveFailure, ShardPathIsADirectory) {
  TempDir dir;
  fs::create_directories(dir / "step-1" / "shard-0-of-1.bin");
  TestState s = make_test_state(1, 1);
  try {
    save(dir.path(), s.view());
    ADD_FAILURE() << "no error";
  } catch (const IoError& e) {
    EXPECT_EQ(e.errno_value(), EISDIR);
    EXPECT_NE(std::string(e.what()).find("shard-0-of-1.bin"), std::string::npos) << e.what();
  }
  expect_unharmed(s, 1);
}

TEST(SaveFailure, DiskFullKeepsThePreviousCheckpoint) {
  TempDir dir;
  TestState s1 = make_test_state(1, 1);
  save(dir.path(), s1.view(), small_blocks());
  // The next shard "file" is /dev/full: every write fails with ENOSPC, as on a full disk.
  fs::create_directories(dir / "step-2");
  fs::create_symlink("/dev/full", dir / "step-2" / "shard-0-of-1.bin");
  TestState s2 = make_test_state(2, 2);
  try {
    save(dir.path(), s2.view(), small_blocks());
    ADD_FAILURE() << "no error";
  } catch (const IoError& e) {
    EXPECT_EQ(e.errno_value(), ENOSPC) << e.what();
    EXPECT_NE(std::string(e.what()).find("shard-0-of-1.bin"), std::string::npos) << e.what();
  }
  expect_unharmed(s2, 2);
  EXPECT_EQ(read_text(dir / "latest"), "step-1\n");
  expect_equal(load(dir.path()), s1);
}

TEST(SaveFailure, FileSizeLimitIsReported) {
  // RLIMIT_FSIZE makes writes past the limit fail with EFBIG (like a quota).
  TempDir dir;
  TestState s = make_test_state(1, 1);
  struct sigaction ignore {}, old {};
  ignore.sa_handler = SIG_IGN;
  sigaction(SIGXFSZ, &ignore, &old);
  rlimit saved{};
  getrlimit(RLIMIT_FSIZE, &saved);
  rlimit small = saved;
  small.rlim_cur = 64 << 10;
  setrlimit(RLIMIT_FSIZE, &small);
  int err = 0;
  std::string what;
  try {
    save(dir.path(), s.view(), small_blocks());
  } catch (const IoError& e) {
    err = e.errno_value();
    what = e.what();
  }
  setrlimit(RLIMIT_FSIZE, &saved);
  sigaction(SIGXFSZ, &old, nullptr);
  EXPECT_EQ(err, EFBIG) << what;
  EXPECT_NE(what.find("shard-0-of-1.bin"), std::string::npos) << what;
  expect_unharmed(s, 1);
  EXPECT_THROW(load(dir.path()), IoError);  // nothing complete
}

TEST(SaveFailure, RefusesToOverwriteACompleteCheckpoint) {
  TempDir dir;
  TestState s = make_test_state(1, 1);
  save(dir.path(), s.view());
  expect_error<InvalidArgumentError>([&] { save(dir.path(), s.view()); }, {"step-1", "already"});
  expect_equal(load(dir.path()), s);
}

TEST(SaveFailure, Cancelled) {
  TempDir dir;
  TestState s = make_test_state(1, 1);
  CancelToken cancel;
  cancel.cancel();
  SaveOptions o = small_blocks();
  o.cancel = &cancel;
  EXPECT_THROW(save(dir.path(), s.view(), o), CancelledError);
}

TEST(SaveFailure, BadOptionsAndMetadata) {
  TempDir dir;
  TestState s = make_test_state(1, 1);
  SaveOptions o;
  o.world_size = 2;
  expect_error<InvalidArgumentError>([&] { save(dir.path(), s.view(), o); }, {"save_id"});
  o.save_id = "x";
  o.rank = 2;
  EXPECT_THROW(save(dir.path(), s.view(), o), InvalidArgumentError);
  SaveOptions b;
  b.block_bytes = 1000;
  expect_error<InvalidArgumentError>([&] { save(dir.path(), s.view(), b); }, {"block_bytes"});
  State v = s.view();
  v.metadata["bin"] = std::string("\xff\xfe", 2);
  expect_error<InvalidArgumentError>([&] { save(dir.path(), v); }, {"bin", "UTF-8"});
  v = s.view();
  v.blobs["huge"] = std::vector<uint8_t>(17u << 20);
  expect_error<InvalidArgumentError>([&] { save(dir.path(), v); }, {"blobs"});
}

// A state whose manifest readers would refuse (here 8 GiB in 4 KiB blocks: 2 Mi block digests,
// a manifest of over 64 MiB) fails before anything is written, and says which block size fits;
// it used to be saved, published as `latest`, and older checkpoints pruned, with no way to load
// it. The tensor's memory is reserved but inaccessible: reading it would crash the test.
TEST(SaveFailure, AManifestReadersWouldRefuseFailsBeforeAnythingIsWritten) {
  TempDir dir;
  const size_t count = size_t{1} << 31;
  void* huge = ::mmap(nullptr, count * 4, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  ASSERT_NE(huge, MAP_FAILED);
  State v;
  v.step = 3;
  v.tensors.push_back(TensorView{"huge", {static_cast<int64_t>(count)}, BufferView{huge, count, DType::Float32}});
  SaveOptions o;
  o.block_bytes = 4096;
  expect_error<InvalidArgumentError>([&] { save(dir.path(), v, o); },
                                     {"8589934592 bytes in blocks of 4096", "use larger blocks", "block_bytes >= "});
  CheckpointWriter writer(dir.path(), o);
  expect_error<InvalidArgumentError>([&] { writer.save_async(v); }, {"use larger blocks"});
  EXPECT_TRUE(fs::is_empty(dir.path())) << "something was written";
  ::munmap(huge, count * 4);
}

// ---- rank 0 waiting for the others -----------------------------------------------------------

TEST(Finalize, TimesOutNamingTheMissingWriters) {
  TempDir dir;
  TestState s = make_test_state(1, 7);
  SaveOptions o = small_blocks(0, 3);
  o.save_id = "attempt";
  o.finalize_timeout = 300ms;
  auto start = std::chrono::steady_clock::now();
  expect_error<TimeoutError>([&] { save(dir.path(), s.view(), o); },
                             {"step-7", "shard-1-of-3.bin", "shard-2-of-3.bin", "incomplete"});
  EXPECT_LT(std::chrono::steady_clock::now() - start, 5s);
  EXPECT_THROW(load(dir.path()), IoError);
}

TEST(Finalize, IgnoresSidecarsOfAnotherAttempt) {
  TempDir dir;
  TestState s = make_test_state(1, 8);
  // A crashed earlier attempt of the same step left writer 1's shard and sidecar.
  SaveOptions stale = small_blocks(1, 2);
  stale.save_id = "attempt-1";
  save(dir.path(), s.view(), stale);
  // Attempt 2: rank 0 must not take attempt 1's sidecar for its own...
  SaveOptions o0 = small_blocks(0, 2);
  o0.save_id = "attempt-2";
  o0.finalize_timeout = 300ms;
  EXPECT_THROW(save(dir.path(), s.view(), o0), TimeoutError);
  // ...and completes once writer 1 of attempt 2 is done.
  o0.finalize_timeout = 20s;
  auto rank0 = std::async(std::launch::async, [&] { return save(dir.path(), s.view(), o0); });
  std::this_thread::sleep_for(100ms);
  SaveOptions o1 = small_blocks(1, 2);
  o1.save_id = "attempt-2";
  save(dir.path(), s.view(), o1);
  EXPECT_TRUE(rank0.get().finalized);
  EXPECT_EQ(Checkpoint::open(dir.path()).manifest().save_id, "attempt-2");
  expect_equal(load(dir.path()), s);
}

TEST(Finalize, WritersThatDisagreeOnTheLayoutAreRefused) {
  TempDir dir;
  TestState s = make_test_state(1, 9);
  TestState other = make_test_state(1, 9);
  other.tensors.pop_back();
  SaveOptions o1 = small_blocks(1, 2);
  o1.save_id = "a";
  save(dir.path(), other.view(), o1);
  SaveOptions o0 = small_blocks(0, 2);
  o0.save_id = "a";
  expect_error<CorruptError>([&] { save(dir.path(), s.view(), o0); }, {"shard-1-of-2.json", "tensor"});
}

TEST(Finalize, RecordsPassedInsteadOfSidecars) {
  TempDir dir;
  TestState s = make_test_state(1, 10);
  std::vector<ShardRecord> records;
  for (uint32_t r = 0; r < 3; ++r) {
    SaveOptions o = small_blocks(r, 3);
    o.save_id = "net";
    o.finalize = false;
    auto res = save(dir.path(), s.view(), o);
    EXPECT_FALSE(res.finalized);
    // A record survives a JSON round trip (as it would over the network).
    records.push_back(parse_shard_record(shard_record_to_json(res.record), "record"));
  }
  SaveOptions o = small_blocks(0, 3);
  o.save_id = "net";
  Manifest m = finalize(dir.path(), s.view(), o, records);
  EXPECT_EQ(m.world_size, 3u);
  expect_equal(load(dir.path()), s);
}

}  // namespace

namespace {

TEST(Progress, LongWritesAreLogged) {
  TempDir dir;
  TestState s = make_test_state(1, 1);
  SaveOptions o = small_blocks();
  o.io_threads = 1;
  o.progress_interval = std::chrono::milliseconds(2);
  o.after_block = [](uint64_t done, uint64_t) {
    if (done <= 5) std::this_thread::sleep_for(std::chrono::milliseconds(5));
  };
  log::configure("info");
  ::testing::internal::CaptureStderr();
  save(dir.path(), s.view(), o);
  std::string err = ::testing::internal::GetCapturedStderr();
  EXPECT_NE(err.find("shard-0-of-1.bin: "), std::string::npos) << err;
  EXPECT_NE(err.find(" written ("), std::string::npos) << err;
  EXPECT_NE(err.find("step-1: complete"), std::string::npos) << err;
}

}  // namespace
