// The torch glue: tensors as buffer views, a module and optimizer saved by 4 writer processes and
// resumed on 1 and 3 readers bit-identically, every supported optimizer, dtype round trips, the
// errors a wrong module gets, and CUDA tensors (skipped without a GPU).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <gtest/gtest.h>
#include <torch/cuda.h>

#include <algorithm>
#include <cstring>

#include "checkpoint/helpers.h"
#include "meshtrain/torch.h"
#include "support/child_process.h"
#include "support/temp_dir.h"
#include "training.h"

using namespace meshtrain;
using namespace meshtrain::test_support;
using namespace std::chrono_literals;
namespace tg = meshtrain::torch_glue;

namespace {

constexpr uint64_t kSeed = 7;
constexpr uint64_t kSteps = 12;  // before the checkpoint, and again after it

class TorchEnvironment : public ::testing::Environment {
 public:
  // One intra-op thread, as in the writer processes: the same arithmetic in the same order.
  void SetUp() override { at::set_num_threads(1); }
};
[[maybe_unused]] const auto* const environment = ::testing::AddGlobalTestEnvironment(new TorchEnvironment);

// An OrderedDict's entries as pairs (its items cannot be decomposed by structured bindings).
std::vector<std::pair<std::string, at::Tensor>> items(const torch::OrderedDict<std::string, at::Tensor>& dict) {
  std::vector<std::pair<std::string, at::Tensor>> out;
  for (const auto& item : dict) out.emplace_back(item.key(), item.value());
  return out;
}

void expect_bitwise_equal(const at::Tensor& expected, const at::Tensor& actual, const std::string& what) {
  ASSERT_TRUE(actual.defined()) << what;
  ASSERT_EQ(expected.scalar_type(), actual.scalar_type()) << what;
  ASSERT_EQ(expected.sizes(), actual.sizes()) << what;
  at::Tensor a = expected.detach().cpu().contiguous(), b = actual.detach().cpu().contiguous();
  EXPECT_EQ(std::memcmp(a.data_ptr(), b.data_ptr(), a.nbytes()), 0) << what << " differs";
}

// Everything a resumed run depends on, compared byte for byte: the snapshots' tensors (module and
// optimizer state, step counters), metadata (optimizer options, exactly) and blobs (RNG state).
void expect_same_snapshot(const tg::Snapshot& e, const tg::Snapshot& a) {
  ASSERT_EQ(e.state().tensors.size(), a.state().tensors.size());
  for (size_t i = 0; i < e.state().tensors.size(); ++i) {
    const auto& et = e.state().tensors[i];
    const auto& at = a.state().tensors[i];
    ASSERT_EQ(et.name, at.name);
    EXPECT_EQ(et.shape, at.shape) << et.name;
    ASSERT_EQ(et.buffer.dtype, at.buffer.dtype) << et.name;
    ASSERT_EQ(et.buffer.bytes(), at.buffer.bytes()) << et.name;
    EXPECT_EQ(std::memcmp(et.buffer.data, at.buffer.data, et.buffer.bytes()), 0) << et.name << " differs";
  }
  EXPECT_EQ(e.state().metadata, a.state().metadata);
  EXPECT_EQ(e.state().blobs, a.state().blobs);
}

void expect_same_training_state(const TrainingRun& expected, const TrainingRun& actual) {
  expect_same_snapshot(tg::snapshot(*expected.model, expected.optimizer.get(), expected.step),
                       tg::snapshot(*actual.model, actual.optimizer.get(), actual.step));
  for (const auto& [name, p] : items(expected.model->named_parameters()))
    expect_bitwise_equal(p, actual.model->named_parameters()[name], name);
}

bool same_parameters(const TrainingRun& x, const TrainingRun& y) {
  for (const auto& [name, p] : items(x.model->named_parameters()))
    if (!at::equal(p, y.model->named_parameters()[name])) return false;
  return true;
}

std::map<std::string, at::Tensor> clone_parameters(const TrainingRun& run) {
  std::map<std::string, at::Tensor> out;
  for (const auto& [name, p] : items(run.model->named_parameters())) out[name] = p.detach().clone();
  for (const auto& [name, b] : items(run.model->named_buffers())) out[name] = b.detach().clone();
  return out;
}
void expect_unchanged(const std::map<std::string, at::Tensor>& before, const TrainingRun& run) {
  for (const auto& [name, p] : items(run.model->named_parameters())) expect_bitwise_equal(before.at(name), p, name);
  for (const auto& [name, b] : items(run.model->named_buffers())) expect_bitwise_equal(before.at(name), b, name);
}

// Saves `run` as one writer (world size 1), through the asynchronous writer.
void save_async(const fs::path& root, const TrainingRun& run) {
  checkpoint::CheckpointWriter writer(root, small_blocks());
  tg::Snapshot snap = tg::snapshot(*run.model, run.optimizer.get(), run.step);
  writer.save_async(snap.state());
  ASSERT_TRUE(writer.wait().has_value());
}

// ---------------------------------------------------------------------------------------------

TEST(TorchTensor, DtypesMapAndOthersAreRefusedByName) {
  EXPECT_EQ(tg::dtype_of(at::zeros({2}, at::kFloat), "t"), DType::Float32);
  EXPECT_EQ(tg::dtype_of(at::zeros({2}, at::kHalf), "t"), DType::Float16);
  EXPECT_EQ(tg::dtype_of(at::zeros({2}, at::kBFloat16), "t"), DType::BFloat16);
  EXPECT_EQ(tg::dtype_of(at::zeros({2}, at::kLong), "t"), DType::Int64);
  EXPECT_EQ(tg::dtype_of(at::zeros({2}, at::kByte), "t"), DType::UInt8);
  EXPECT_EQ(tg::dtype_of(at::zeros({2}, at::kInt), "t"), DType::Int32);
  expect_error<InvalidArgumentError>([] { tg::dtype_of(at::zeros({2}, at::kDouble), "encoder.scale"); },
                                     {"encoder.scale", "Double"});
  expect_error<InvalidArgumentError>([] { tg::to_buffer_view(at::zeros({2}, at::kBool), "mask"); }, {"mask", "Bool"});
}

TEST(TorchTensor, BufferViewsShareMemoryAndNonContiguousTensorsAreRefused) {
  at::Tensor t = at::arange(12, at::kFloat).reshape({3, 4});
  BufferView v = tg::to_buffer_view(t, "t");
  EXPECT_EQ(v.data, t.data_ptr());
  EXPECT_EQ(v.count, 12u);
  EXPECT_EQ(v.dtype, DType::Float32);
  EXPECT_EQ(v.device, DeviceKind::Cpu);

  std::vector<int64_t> shape = {4, 3};
  at::Tensor back = tg::from_buffer_view(v, shape);
  EXPECT_EQ(back.data_ptr(), t.data_ptr());
  EXPECT_EQ(back.sizes(), at::IntArrayRef(shape));
  back.index_put_({0, 0}, 100.0);
  EXPECT_EQ(t.index({0, 0}).item<float>(), 100.0f);

  std::vector<int64_t> wrong = {5, 3};
  expect_error<InvalidArgumentError>([&] { tg::from_buffer_view(v, wrong); }, {"12 elements", "[5, 3]"});
  expect_error<InvalidArgumentError>([&] { tg::to_buffer_view(t.t(), "fc.weight"); }, {"fc.weight", "not contiguous"});
  expect_error<InvalidArgumentError>([&] { tg::to_buffer_view(at::Tensor(), "ghost"); }, {"ghost", "undefined"});

  checkpoint::TensorView tv = tg::to_tensor_view(t, "t");
  EXPECT_EQ(tv.shape, (std::vector<int64_t>{3, 4}));
  EXPECT_EQ(tv.buffer.data, t.data_ptr());
}

// The test: 4 writer processes train and save; 1 and 3 readers resume; the continued
// training equals an uninterrupted run bit for bit.
TEST(TorchResume, FourWriterProcessesThenOneAndThreeReadersContinueBitIdentically) {
  TempDir dir;
  std::vector<std::unique_ptr<ChildProcess>> writers;
  for (uint32_t r = 0; r < 4; ++r)
    writers.push_back(std::make_unique<ChildProcess>(std::vector<std::string>{
        TORCH_TRAINER_BINARY, "--root", dir.path().string(), "--rank", std::to_string(r), "--world", "4", "--steps",
        std::to_string(kSteps), "--seed", std::to_string(kSeed), "--save-id", "torch-mp"}));
  for (uint32_t r = 0; r < 4; ++r) ASSERT_EQ(writers[r]->wait(120s), 0) << "writer " << r;

  TrainingRun uninterrupted(kSeed, "adam");
  uninterrupted.train(2 * kSteps);

  checkpoint::Checkpoint c = checkpoint::Checkpoint::open(dir.path());
  ASSERT_EQ(c.manifest().world_size, 4u);
  EXPECT_EQ(c.manifest().step, kSteps);
  EXPECT_EQ(c.manifest().metadata.at("torch.optimizer"), "adam");
  EXPECT_EQ(c.manifest().blobs.at("cursor"), std::vector<uint8_t>{kSteps});
  ASSERT_NE(c.manifest().find_tensor("optimizer/fc1.weight/exp_avg_sq"), nullptr);
  ASSERT_NE(c.manifest().find_tensor("model/norm.num_batches_tracked"), nullptr);

  for (uint32_t readers : {1u, 3u}) {
    SCOPED_TRACE(::testing::Message() << readers << " reader(s)");
    TrainingRun resumed(kSeed + 1000, "adam");  // other initial weights: the checkpoint must replace them
    ASSERT_FALSE(same_parameters(resumed, uninterrupted));
    if (readers == 1) {
      resumed.step = tg::restore(c, *resumed.model, resumed.optimizer.get());
    } else {
      std::vector<checkpoint::LoadedState> pieces;
      for (uint32_t r = 0; r < readers; ++r) pieces.push_back(c.load(r, readers));
      for (const auto& piece : pieces) EXPECT_LT(piece.range.size(), c.manifest().total_bytes);
      resumed.step = tg::restore(pieces, *resumed.model, resumed.optimizer.get());
    }
    EXPECT_EQ(resumed.step, kSteps);
    resumed.train(kSteps);
    expect_same_training_state(uninterrupted, resumed);
  }
}

// The comparison above can fail: without the RNG state the batches differ, and so does the run.
TEST(TorchResume, WithoutTheRngStateTheRunDiverges) {
  TempDir dir;
  TrainingRun first(kSeed, "adam");
  first.train(kSteps);
  save_async(dir.path(), first);
  TrainingRun uninterrupted(kSeed, "adam");
  uninterrupted.train(2 * kSteps);

  TrainingRun resumed(kSeed + 1, "adam");
  tg::RestoreOptions no_rng;
  no_rng.rng = false;
  resumed.step = tg::restore(checkpoint::Checkpoint::open(dir.path()), *resumed.model, resumed.optimizer.get(), no_rng);
  resumed.train(kSteps);
  EXPECT_FALSE(same_parameters(uninterrupted, resumed));
}

// save_async() copies the borrowed tensors before it returns: training on right away does not
// change what is saved.
TEST(TorchResume, AsyncSaveKeepsTheSnapshotStepWhileTrainingGoesOn) {
  TempDir dir;
  TrainingRun run(kSeed, "adam");
  run.train(5);
  {
    checkpoint::CheckpointWriter writer(dir.path(), small_blocks());
    writer.save_async(tg::snapshot(*run.model, run.optimizer.get(), run.step).state());
    run.train(5);  // in place, while the writer thread writes
    ASSERT_TRUE(writer.wait().has_value());
  }
  TrainingRun at_five(kSeed, "adam");
  at_five.train(5);
  TrainingRun restored(kSeed + 1, "adam");
  restored.step = tg::restore(checkpoint::Checkpoint::open(dir.path()), *restored.model, restored.optimizer.get());
  EXPECT_EQ(restored.step, 5u);
  expect_same_training_state(at_five, restored);
  EXPECT_FALSE(same_parameters(run, restored));
}

class TorchOptimizers : public ::testing::TestWithParam<std::string> {};

TEST_P(TorchOptimizers, ResumeBitIdentically) {
  TempDir dir;
  TrainingRun first(kSeed, GetParam());
  first.train(5);
  save_async(dir.path(), first);
  TrainingRun uninterrupted(kSeed, GetParam());
  uninterrupted.train(10);

  TrainingRun resumed(kSeed + 1, GetParam());
  resumed.step = tg::restore(checkpoint::Checkpoint::open(dir.path()), *resumed.model, resumed.optimizer.get());
  ASSERT_EQ(resumed.step, 5u);
  resumed.train(5);
  expect_same_training_state(uninterrupted, resumed);
}

INSTANTIATE_TEST_SUITE_P(Kinds, TorchOptimizers,
                         ::testing::Values("sgd", "adam", "adam-amsgrad", "adamw", "adagrad", "rmsprop"),
                         [](const auto& info) {
                           std::string name = info.param;
                           std::replace(name.begin(), name.end(), '-', '_');
                           return name;
                         });

// A module of every supported dtype: parameters in float16, buffers in bfloat16, int64, uint8
// and int32; values that are not round in any of them.
struct MixedImpl : torch::nn::Module {
  MixedImpl() {
    half = register_parameter("half", at::randn({5, 7}).to(at::kHalf));
    brain = register_buffer("brain", at::randn({3, 2, 4}).to(at::kBFloat16));
    counts = register_buffer("counts", at::randint(-(1LL << 40), 1LL << 40, {9}, at::kLong));
    bytes = register_buffer("bytes", at::randint(0, 256, {13}, at::kByte));
    ints = register_buffer("ints", at::randint(-(1 << 30), 1 << 30, {2, 3}, at::kInt));
    scalar = register_buffer("scalar", at::scalar_tensor(1.0f / 3.0f));
    empty = register_buffer("empty", at::zeros({0, 4}));
  }
  at::Tensor half, brain, counts, bytes, ints, scalar, empty;
};
TORCH_MODULE(Mixed);

TEST(TorchRoundTrip, Fp16Bf16Int64Uint8Int32ScalarAndEmptyTensors) {
  TempDir dir;
  at::manual_seed(3);
  Mixed saved;
  checkpoint::save(dir.path(), tg::snapshot(*saved, nullptr, 1).state(), small_blocks());
  auto c = checkpoint::Checkpoint::open(dir.path());
  EXPECT_EQ(c.manifest().find_tensor("model/half")->dtype, DType::Float16);
  EXPECT_EQ(c.manifest().find_tensor("model/brain")->dtype, DType::BFloat16);
  EXPECT_EQ(c.manifest().find_tensor("model/counts")->dtype, DType::Int64);

  at::manual_seed(4);
  Mixed loaded;
  ASSERT_FALSE(at::equal(saved->half, loaded->half));
  EXPECT_EQ(tg::restore(c, *loaded, nullptr), 1u);
  for (const auto& [name, t] : items(saved->named_parameters())) expect_bitwise_equal(t, loaded->named_parameters()[name], name);
  for (const auto& [name, t] : items(saved->named_buffers())) expect_bitwise_equal(t, loaded->named_buffers()[name], name);
}

TEST(TorchRoundTrip, NonContiguousTensorsAreCopiedForTheSnapshot) {
  TempDir dir;
  torch::nn::Module saved;
  at::Tensor base = at::randn({4, 6});
  saved.register_buffer("transposed", base.t());
  checkpoint::save(dir.path(), tg::snapshot(saved, nullptr, 1).state(), small_blocks());
  torch::nn::Module loaded;
  loaded.register_buffer("transposed", at::zeros({6, 4}));
  tg::restore(checkpoint::Checkpoint::open(dir.path()), loaded, nullptr);
  expect_bitwise_equal(base.t().contiguous(), loaded.named_buffers()["transposed"], "transposed");
}

// ---------------------------------------------------------------------------------------------
// A wrong target: the error names the tensor, and the module and optimizer are left as they were.

class TorchRestoreErrors : public ::testing::Test {
 protected:
  void SetUp() override {
    TrainingRun run(kSeed, "adam");
    run.train(3);
    save_async(dir.path(), run);
  }
  checkpoint::Checkpoint open() { return checkpoint::Checkpoint::open(dir.path()); }
  TempDir dir;
};

TEST_F(TorchRestoreErrors, WrongShapeNamesTheTensor) {
  TrainingRun other(1, "adam", /*hidden=*/12);
  auto before = clone_parameters(other);
  expect_error<InvalidArgumentError>([&] { tg::restore(open(), *other.model, other.optimizer.get()); },
                                     {"model/fc1.weight", "[64, 8]", "[12, 8]"});
  expect_unchanged(before, other);
  EXPECT_TRUE(other.optimizer->state().empty());
}

TEST_F(TorchRestoreErrors, WrongDtypeNamesTheTensor) {
  TrainingRun other(1, "adam");
  other.model->fc2->to(at::kHalf);
  auto before = clone_parameters(other);
  expect_error<InvalidArgumentError>([&] { tg::restore(open(), *other.model, nullptr); },
                                     {"model/fc2.", "float32 in the checkpoint", "float16"});
  expect_unchanged(before, other);
}

TEST_F(TorchRestoreErrors, MissingTensorNamesIt) {
  TrainingRun bigger(1, "adam", 64, /*with_head=*/true);
  auto before = clone_parameters(bigger);
  expect_error<InvalidArgumentError>([&] { tg::restore(open(), *bigger.model, bigger.optimizer.get()); },
                                     {"no tensor model/head."});
  expect_unchanged(before, bigger);
}

TEST_F(TorchRestoreErrors, TensorWithoutPlaceIsRefusedUnlessNotStrict) {
  torch::nn::Module trunk;  // fc1 only
  trunk.register_module("fc1", torch::nn::Linear(kInputs, 64));
  expect_error<InvalidArgumentError>([&] { tg::restore(open(), trunk, nullptr); }, {"the module has no tensor model/"});
  tg::RestoreOptions lenient;
  lenient.strict = false;
  tg::restore(open(), trunk, nullptr, lenient);
  auto c = open();
  checkpoint::LoadedState all = c.load();
  at::Tensor saved = tg::from_buffer_view(all.find("model/fc1.weight")->view(), all.find("model/fc1.weight")->info.shape);
  expect_bitwise_equal(saved, trunk.named_parameters()["fc1.weight"], "fc1.weight");
}

TEST_F(TorchRestoreErrors, OtherOptimizerOrGroupsAreRefused) {
  TrainingRun sgd(1, "sgd");
  expect_error<InvalidArgumentError>([&] { tg::restore(open(), *sgd.model, sgd.optimizer.get()); },
                                     {"optimizer is adam, this one is sgd"});
  TrainingRun one_group(1, "adam-amsgrad");  // Adam too, but one parameter group
  expect_error<InvalidArgumentError>([&] { tg::restore(open(), *one_group.model, one_group.optimizer.get()); },
                                     {"2 parameter groups, this one 1"});
}

TEST_F(TorchRestoreErrors, DamagedShardIsNamedAndNothingChanges) {
  flip_byte(dir / "step-3" / "shard-0-of-1.bin", 100);
  TrainingRun other(1, "adam");
  auto before = clone_parameters(other);
  expect_error<CorruptError>([&] { tg::restore(open(), *other.model, other.optimizer.get()); }, {"shard-0-of-1.bin"});
  expect_unchanged(before, other);
  EXPECT_TRUE(other.optimizer->state().empty());
}

TEST_F(TorchRestoreErrors, MissingPieceNamesAnIncompleteTensor) {
  auto c = open();
  std::vector<checkpoint::LoadedState> pieces;
  pieces.push_back(c.load(0, 3));
  pieces.push_back(c.load(2, 3));
  TrainingRun other(1, "adam");
  auto before = clone_parameters(other);
  expect_error<InvalidArgumentError>([&] { tg::restore(pieces, *other.model, other.optimizer.get()); },
                                     {"is not complete in the 2 loaded piece(s)"});
  expect_unchanged(before, other);
}

// ---------------------------------------------------------------------------------------------

TEST(TorchCuda, SnapshotCopiesToPinnedMemoryAndRestoresOnGpuAndCpu) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device: torch::cuda::is_available() is false";
  TempDir dir;
  TrainingRun gpu(kSeed, "adam");
  gpu.model->to(at::Device(at::kCUDA, 0));
  gpu.optimizer = make_optimizer("adam", gpu.model);  // over the moved parameters
  for (int i = 0; i < 3; ++i) {
    at::Tensor x = at::randn({kBatch, kInputs}).cuda();
    at::Tensor loss = gpu.model->forward(x).pow(2).mean();
    gpu.optimizer->zero_grad();
    loss.backward();
    gpu.optimizer->step();
  }
  tg::Snapshot snap = tg::snapshot(*gpu.model, gpu.optimizer.get(), 3);
  EXPECT_TRUE(snap.state().blobs.count("torch.rng.cuda0"));
  for (const auto& t : snap.state().tensors)  // all but the optimizer's step counters were on the GPU
    if (t.buffer.count && !t.name.ends_with("/step"))
      EXPECT_TRUE(at::globalContext().isPinnedPtr(t.buffer.data)) << t.name << " is not in pinned memory";
  auto at_snapshot = clone_parameters(gpu);
  // Training goes on on the GPU; the snapshot keeps the values of the moment it was taken.
  gpu.model->fc1->weight.data().add_(1.0);
  checkpoint::save(dir.path(), snap.state(), small_blocks());

  TrainingRun cpu(1, "adam");
  tg::restore(checkpoint::Checkpoint::open(dir.path()), *cpu.model, cpu.optimizer.get());
  for (const auto& [name, p] : items(cpu.model->named_parameters())) expect_bitwise_equal(at_snapshot.at(name), p, name);

  TrainingRun gpu2(1, "adam");
  gpu2.model->to(at::Device(at::kCUDA, 0));
  gpu2.optimizer = make_optimizer("adam", gpu2.model);
  tg::restore(checkpoint::Checkpoint::open(dir.path()), *gpu2.model, gpu2.optimizer.get());
  for (const auto& [name, p] : items(gpu2.model->named_parameters())) {
    EXPECT_TRUE(p.is_cuda()) << name;
    expect_bitwise_equal(at_snapshot.at(name), p, name);
  }
  ASSERT_EQ(gpu2.optimizer->state().size(), gpu2.model->parameters().size());
  for (const auto& [key, state] : gpu2.optimizer->state()) {
    auto* adam = dynamic_cast<torch::optim::AdamParamState*>(state.get());
    ASSERT_NE(adam, nullptr);
    EXPECT_TRUE(adam->exp_avg().is_cuda());
    EXPECT_EQ(adam->step(), 3);
  }
  // Everything restored (moments, buffers, options) snapshots to the same bytes again, through
  // the CUDA snapshot path a second time; RNG blobs aside (restored, then drawn from).
  tg::Snapshot again = tg::snapshot(*gpu2.model, gpu2.optimizer.get(), 3, tg::SnapshotOptions{.rng = false});
  tg::Snapshot first = tg::snapshot(*cpu.model, cpu.optimizer.get(), 3, tg::SnapshotOptions{.rng = false});
  expect_same_snapshot(first, again);
  BufferView v = tg::to_buffer_view(gpu2.model->fc1->weight, "fc1.weight");
  EXPECT_EQ(v.device, DeviceKind::Cuda);
  EXPECT_EQ(v.device_index, 0);
}

// The snapshot waits for the work queued before it: 50 adds over 256 MiB (~20 ms on an H100)
// are still running when snapshot() is called; every value must be the final one. (Read the
// pinned bytes directly: a blocking .cpu() would wait for the stream and hide a missing sync.)
TEST(TorchCuda, SnapshotWaitsForQueuedWorkAndItsCopies) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device: torch::cuda::is_available() is false";
  torch::nn::Module m;
  at::Tensor b = m.register_buffer("b", at::zeros({int64_t{1} << 26}, at::TensorOptions().device(at::kCUDA, 0)));
  for (int i = 0; i < 50; ++i) b.add_(1.0);
  tg::Snapshot snap = tg::snapshot(m, nullptr, 0, tg::SnapshotOptions{.rng = false});
  ASSERT_EQ(snap.state().tensors.size(), 1u);
  const auto* host = static_cast<const float*>(snap.state().tensors[0].buffer.data);
  const size_t n = snap.state().tensors[0].buffer.count;
  size_t wrong = 0;
  for (size_t i = 0; i < n; ++i) wrong += host[i] != 50.0f;
  EXPECT_EQ(wrong, 0u) << "of " << n << " values";
}

}  // namespace
