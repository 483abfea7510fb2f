// The checkpoint format does not depend on the torch version: a module and optimizer with fixed
// contents (written byte by byte, nothing from torch's RNG or arithmetic) saved by 2 writers give
// exactly the shard SHA-256s, tensor table, metadata and blobs written below, with torch 1.13 and
// with torch 2.x alike; so a checkpoint of either version loads in the other.
//
// The cross-version load for real (docs/checkpoints.md "Torch versions"): run the save with
// MESHTRAIN_COMPAT_SAVE_TO=DIR in one build, the load with MESHTRAIN_COMPAT_LOAD_FROM=DIR in the
// other.
#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/batchnorm.h>
#include <torch/nn/modules/linear.h>
#include <torch/optim/adam.h>
#include <torch/version.h>

#include <cstdlib>
#include <cstring>
#include <future>
#include <sstream>
#include <type_traits>

#include "checkpoint/helpers.h"
#include "meshtrain/crypto.h"
#include "meshtrain/torch.h"
#include "support/temp_dir.h"

using namespace meshtrain;
using namespace meshtrain::test_support;
namespace tg = meshtrain::torch_glue;

namespace {

// ---------------------------------------------------------------------------------------------
// The fixed state.

// Deterministic bytes for a tensor, from its name: the same in every torch version.
void fill(at::Tensor t, const std::string& name) {
  ASSERT_TRUE(t.is_contiguous()) << name;
  uint32_t h = 2166136261u;  // FNV-1a of the name
  for (char c : name) h = (h ^ static_cast<uint8_t>(c)) * 16777619u;
  auto* p = static_cast<uint8_t*>(t.data_ptr());
  for (size_t i = 0; i < t.nbytes(); ++i) {
    h = h * 1664525u + 1013904223u;
    p[i] = static_cast<uint8_t>(h >> 24);
  }
  // No NaN or infinity in floating point tensors (a byte pattern could make some): clear the
  // top exponent bit, so that values stay finite and the optimizer state looks like one.
  if (t.scalar_type() == at::kFloat)
    for (size_t i = 3; i < t.nbytes(); i += 4) p[i] &= 0xbf;
  if (t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16)
    for (size_t i = 1; i < t.nbytes(); i += 2) p[i] &= 0xbf;
}

struct CompatModel : torch::nn::Module {
  CompatModel() {
    fc = register_module("fc", torch::nn::Linear(6, 5));
    norm = register_module("norm", torch::nn::BatchNorm1d(5));
    half = register_buffer("half", at::empty({3, 4}, at::kHalf));
    brain = register_buffer("brain", at::empty({7}, at::kBFloat16));
  }
  torch::nn::Linear fc{nullptr};
  torch::nn::BatchNorm1d norm{nullptr};
  at::Tensor half, brain;
};

// Optimizer::state()'s key of a parameter (a TensorImpl* in torch 2.x, its printed form in 1.x).
template <typename Map>
typename Map::key_type key_of(const at::Tensor& p) {
  if constexpr (std::is_same_v<typename Map::key_type, std::string>) {
    std::ostringstream printed;
    printed << static_cast<const void*>(p.unsafeGetTensorImpl());
    return printed.str();
  } else {
    return p.unsafeGetTensorImpl();
  }
}

struct Fixed {
  std::shared_ptr<CompatModel> model = std::make_shared<CompatModel>();
  std::unique_ptr<torch::optim::Adam> adam;

  // filled: every tensor, optimizer moment and counter set to the fixed values (else zeros and
  // no optimizer state: the target of a restore).
  explicit Fixed(bool filled) {
    namespace optim = torch::optim;
    std::vector<optim::OptimizerParamGroup> groups;
    // Every option of a group away from AdamOptions' defaults: torch 2.x replaces a group's options
    // that are at their default value by the optimizer's (1.13 keeps them), so a group left at
    // the defaults would differ between versions before any checkpoint is involved.
    groups.emplace_back(model->fc->parameters(),
                        std::make_unique<optim::AdamOptions>(
                            optim::AdamOptions(0.01).betas({0.85, 0.995}).eps(1e-6).weight_decay(1e-4).amsgrad(true)));
    groups.emplace_back(model->norm->parameters());
    adam = std::make_unique<optim::Adam>(std::move(groups),
                                         optim::AdamOptions(1e-3).betas({0.8, 0.99}).eps(1e-7).amsgrad(true));
    at::NoGradGuard no_grad;
    for (const auto& item : model->named_parameters()) filled ? fill(item.value(), item.key()) : void(item.value().zero_());
    for (const auto& item : model->named_buffers()) filled ? fill(item.value(), item.key()) : void(item.value().zero_());
    if (!filled) return;
    auto& state = adam->state();
    int64_t counter = 3;
    for (const auto& item : model->named_parameters()) {
      auto s = std::make_unique<optim::AdamParamState>();
      s->step(counter++);
      for (auto [field, tensor] : {std::pair{"exp_avg", &s->exp_avg()}, std::pair{"exp_avg_sq", &s->exp_avg_sq()},
                                   std::pair{"max_exp_avg_sq", &s->max_exp_avg_sq()}}) {
        *tensor = at::empty_like(item.value());
        fill(*tensor, item.key() + "/" + field);
      }
      state[key_of<std::remove_reference_t<decltype(state)>>(item.value())] = std::move(s);
    }
    at::manual_seed(20261127);  // the RNG blob: torch's CPU generator seeded so
  }
};

// ---------------------------------------------------------------------------------------------
// What torch 1.13 and 2.x must both produce.

constexpr const char* kTensorTable =
    "model/fc.weight float32 [5, 6] @0 120\n"
    "model/fc.bias float32 [5] @128 20\n"
    "model/norm.weight float32 [5] @192 20\n"
    "model/norm.bias float32 [5] @256 20\n"
    "model/half float16 [3, 4] @320 24\n"
    "model/brain bfloat16 [7] @384 14\n"
    "model/norm.running_mean float32 [5] @448 20\n"
    "model/norm.running_var float32 [5] @512 20\n"
    "model/norm.num_batches_tracked int64 [] @576 8\n"
    "optimizer/fc.weight/step int64 [] @640 8\n"
    "optimizer/fc.weight/exp_avg float32 [5, 6] @704 120\n"
    "optimizer/fc.weight/exp_avg_sq float32 [5, 6] @832 120\n"
    "optimizer/fc.weight/max_exp_avg_sq float32 [5, 6] @960 120\n"
    "optimizer/fc.bias/step int64 [] @1088 8\n"
    "optimizer/fc.bias/exp_avg float32 [5] @1152 20\n"
    "optimizer/fc.bias/exp_avg_sq float32 [5] @1216 20\n"
    "optimizer/fc.bias/max_exp_avg_sq float32 [5] @1280 20\n"
    "optimizer/norm.weight/step int64 [] @1344 8\n"
    "optimizer/norm.weight/exp_avg float32 [5] @1408 20\n"
    "optimizer/norm.weight/exp_avg_sq float32 [5] @1472 20\n"
    "optimizer/norm.weight/max_exp_avg_sq float32 [5] @1536 20\n"
    "optimizer/norm.bias/step int64 [] @1600 8\n"
    "optimizer/norm.bias/exp_avg float32 [5] @1664 20\n"
    "optimizer/norm.bias/exp_avg_sq float32 [5] @1728 20\n"
    "optimizer/norm.bias/max_exp_avg_sq float32 [5] @1792 20\n";
constexpr const char* kShardSha256[2] = {"53e32e86c35d1cbe285bd1eb3f54ccf43aa3dc15a98885dd40aefa06b2bf7057",
                                         "99fa7af49ccce94782a8e5f5b9cca8b9285d349648fac9571679c971dc9d9d48"};
constexpr const char* kMetadata =
    "torch.optimizer=adam\n"
    "torch.optimizer.group0.amsgrad=true\n"
    "torch.optimizer.group0.beta1=0x1.b333333333333p-1\n"
    "torch.optimizer.group0.beta2=0x1.fd70a3d70a3d7p-1\n"
    "torch.optimizer.group0.eps=0x1.0c6f7a0b5ed8dp-20\n"
    "torch.optimizer.group0.lr=0x1.47ae147ae147bp-7\n"
    "torch.optimizer.group0.params=fc.weight\n"
    "fc.bias\n"
    "torch.optimizer.group0.weight_decay=0x1.a36e2eb1c432dp-14\n"
    "torch.optimizer.group1.amsgrad=true\n"
    "torch.optimizer.group1.beta1=0x1.999999999999ap-1\n"
    "torch.optimizer.group1.beta2=0x1.fae147ae147aep-1\n"
    "torch.optimizer.group1.eps=0x1.ad7f29abcaf48p-24\n"
    "torch.optimizer.group1.lr=0x1.0624dd2f1a9fcp-10\n"
    "torch.optimizer.group1.params=norm.weight\n"
    "norm.bias\n"
    "torch.optimizer.group1.weight_decay=0x0p+0\n"
    "torch.optimizer.groups=2\n";
// torch's CPU generator (mt19937 and the normal-sample cache) after manual_seed(20261127).
constexpr const char* kRngBlobSha256 = "e8a7178cf6a098fed69dca5d1df74d9e6b264f16a03e76217b32facdba36459c";

std::string tensor_table(const checkpoint::Manifest& m) {
  std::string out;
  for (const auto& t : m.tensors) {
    std::string shape;
    for (size_t i = 0; i < t.shape.size(); ++i) shape += (i ? ", " : "") + std::to_string(t.shape[i]);
    out += t.name + " " + std::string(dtype_name(t.dtype)) + " [" + shape + "] @" + std::to_string(t.offset) + " " +
           std::to_string(t.bytes) + "\n";
  }
  return out;
}

// The metadata without torch.version (which says which torch saved it).
std::string metadata_text(const checkpoint::Manifest& m) {
  std::string out;
  for (const auto& [key, value] : m.metadata)
    if (key != "torch.version") out += key + "=" + value + "\n";
  return out;
}

std::string hex(const crypto::Digest& d) { return crypto::to_hex(d); }

// Saves the fixed state with 2 writers under root.
checkpoint::Manifest save_fixed(const fs::path& root) {
  Fixed fixed(true);
  tg::Snapshot snap = tg::snapshot(*fixed.model, fixed.adam.get(), 42);
  std::vector<std::future<checkpoint::SaveResult>> writers;
  for (uint32_t r = 0; r < 2; ++r) {
    checkpoint::SaveOptions o = small_blocks(r, 2);
    o.block_bytes = 1024 * 4;
    o.save_id = "compat";
    writers.push_back(std::async(std::launch::async, [&, o] { return checkpoint::save(root, snap.state(), o); }));
  }
  for (auto& w : writers) w.get();
  return checkpoint::Checkpoint::open(root).manifest();
}

void expect_restored_equals_fixed(const fs::path& root) {
  Fixed expected(true);
  Fixed restored(false);
  at::manual_seed(1);
  EXPECT_EQ(tg::restore(checkpoint::Checkpoint::open(root), *restored.model, restored.adam.get()), 42u);
  auto same = [](const at::Tensor& a, const at::Tensor& b, const std::string& what) {
    ASSERT_EQ(a.scalar_type(), b.scalar_type()) << what;
    ASSERT_EQ(a.sizes(), b.sizes()) << what;
    EXPECT_EQ(std::memcmp(a.data_ptr(), b.data_ptr(), a.nbytes()), 0) << what << " differs";
  };
  for (const auto& item : expected.model->named_parameters())
    same(item.value(), restored.model->named_parameters()[item.key()], item.key());
  for (const auto& item : expected.model->named_buffers())
    same(item.value(), restored.model->named_buffers()[item.key()], item.key());
  auto& want = expected.adam->state();
  auto& got = restored.adam->state();
  ASSERT_EQ(want.size(), got.size());
  using Map = std::remove_reference_t<decltype(want)>;
  auto restored_params = restored.model->named_parameters();
  for (const auto& item : expected.model->named_parameters()) {
    auto& w = static_cast<torch::optim::AdamParamState&>(*want.at(key_of<Map>(item.value())));
    auto& g = static_cast<torch::optim::AdamParamState&>(*got.at(key_of<Map>(restored_params[item.key()])));
    EXPECT_EQ(w.step(), g.step()) << item.key();
    same(w.exp_avg(), g.exp_avg(), item.key() + "/exp_avg");
    same(w.exp_avg_sq(), g.exp_avg_sq(), item.key() + "/exp_avg_sq");
    same(w.max_exp_avg_sq(), g.max_exp_avg_sq(), item.key() + "/max_exp_avg_sq");
  }
  for (size_t g = 0; g < 2; ++g) {
    auto& w = static_cast<torch::optim::AdamOptions&>(expected.adam->param_groups()[g].options());
    auto& r = static_cast<torch::optim::AdamOptions&>(restored.adam->param_groups()[g].options());
    EXPECT_EQ(w.lr(), r.lr());
    EXPECT_EQ(w.betas(), r.betas());
    EXPECT_EQ(w.eps(), r.eps());
    EXPECT_EQ(w.weight_decay(), r.weight_decay());
    EXPECT_EQ(w.amsgrad(), r.amsgrad());
  }
  // The CPU generator's state came back: the next draw is the fixed seed's.
  at::Tensor drawn = at::randn({4});
  at::manual_seed(20261127);
  same(at::randn({4}), drawn, "a draw after restoring the RNG state");
}

TEST(TorchCompat, FixedStateSavesToTheSameBytesInEveryTorchVersion) {
  TempDir dir;
  const char* save_to = std::getenv("MESHTRAIN_COMPAT_SAVE_TO");
  fs::path root = save_to && *save_to ? fs::path(save_to) : dir.path();
  checkpoint::Manifest m = save_fixed(root);
  std::printf("saved with torch %s under %s\n", m.metadata.at("torch.version").c_str(), root.c_str());
  EXPECT_EQ(m.metadata.at("torch.version"),
            fmt::format("{}.{}.{}", TORCH_VERSION_MAJOR, TORCH_VERSION_MINOR, TORCH_VERSION_PATCH));
  EXPECT_EQ(tensor_table(m), kTensorTable);
  ASSERT_EQ(m.shards.size(), 2u);
  for (uint32_t r = 0; r < 2; ++r) EXPECT_EQ(hex(m.shards[r].sha256), kShardSha256[r]) << "shard " << r;
  EXPECT_EQ(metadata_text(m), kMetadata);
  ASSERT_EQ(m.blobs.size(), 1u);
  EXPECT_EQ(hex(crypto::sha256(m.blobs.at(std::string(tg::kCpuRngBlob)))), kRngBlobSha256);
}

TEST(TorchCompat, FixedStateRestoresExactly) {
  TempDir dir;
  const char* load_from = std::getenv("MESHTRAIN_COMPAT_LOAD_FROM");
  fs::path root = dir.path();
  if (load_from && *load_from) {
    root = load_from;
  } else {
    save_fixed(root);
  }
  std::printf("restoring a checkpoint of torch %s with torch %d.%d.%d\n",
              checkpoint::Checkpoint::open(root).manifest().metadata.at("torch.version").c_str(), TORCH_VERSION_MAJOR,
              TORCH_VERSION_MINOR, TORCH_VERSION_PATCH);
  expect_restored_equals_fixed(root);
}

}  // namespace
