// A deterministic training state for checkpoint tests: fp32, fp16, bf16, int64 tensors of odd
// sizes, an empty tensor and a scalar, plus metadata and blobs. Two processes given the same
// seed build byte-identical states (the multi-process writers rely on it).
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <map>
#include <string>
#include <vector>

#include "meshtrain/checkpoint.h"
#include "support/pattern.h"

namespace meshtrain::test_support {

struct OwnedTensor {
  std::string name;
  DType dtype;
  std::vector<int64_t> shape;
  std::vector<uint8_t> bytes;

  size_t count() const { return bytes.size() / dtype_size(dtype); }
};

struct TestState {
  uint64_t step = 0;
  std::vector<OwnedTensor> tensors;
  std::map<std::string, std::string> metadata;
  std::map<std::string, std::vector<uint8_t>> blobs;

  // Borrowing view for save(); valid while this object lives and its vectors are not resized.
  checkpoint::State view() {
    checkpoint::State s;
    s.step = step;
    for (auto& t : tensors) {
      BufferView b;
      b.data = t.bytes.data();
      b.count = t.count();
      b.dtype = t.dtype;
      s.tensors.push_back({t.name, t.shape, b});
    }
    s.metadata = metadata;
    s.blobs = blobs;
    return s;
  }

  // Changes every tensor byte (a training step, for the async tests).
  void update(uint64_t seed) {
    for (size_t i = 0; i < tensors.size(); ++i) fill_pattern(tensors[i].bytes, seed * 1000 + i);
  }

  uint64_t total_bytes() const {
    uint64_t n = 0;
    for (const auto& t : tensors) n += t.bytes.size();
    return n;
  }
};

// `scale` multiplies the size of the large tensor (about 256 KiB per unit).
inline TestState make_test_state(uint64_t seed, uint64_t step, int64_t scale = 1) {
  TestState s;
  s.step = step;
  auto add = [&](std::string name, DType dtype, std::vector<int64_t> shape) {
    int64_t n = 1;
    for (auto d : shape) n *= d;
    OwnedTensor t{std::move(name), dtype, std::move(shape), std::vector<uint8_t>(n * dtype_size(dtype))};
    fill_pattern(t.bytes, seed * 1000 + s.tensors.size());
    s.tensors.push_back(std::move(t));
  };
  add("model/embed.weight", DType::Float32, {37, 129});
  add("model/norm.bias", DType::Float16, {1001});
  add("model/proj.weight", DType::BFloat16, {3, 5, 77});
  add("model/empty", DType::Float32, {0, 5});
  add("optim/step", DType::Int64, {});
  add("optim/exp_avg", DType::Float32, {65537 * scale});
  add("optim/counts", DType::Int64, {999});
  add("model/head.weight", DType::BFloat16, {4099});
  add("codec/error_feedback/embed", DType::Float32, {4773});
  add("model/tail.empty", DType::Int64, {0});
  s.metadata = {{"model", "test-mlp"}, {"lr", "0.001"}, {"note", "ünïcode ✓"}};
  s.blobs["rng"] = std::vector<uint8_t>(16);
  fill_pattern(s.blobs["rng"], seed + 77);
  s.blobs["data_cursor"] = {1, 2, 3, 4, 5, 6, 7};
  s.blobs["empty"] = {};
  return s;
}

// Every tensor of `original` equals its loaded counterpart byte for byte (full loads).
inline void expect_equal(const checkpoint::LoadedState& loaded, const TestState& original) {
  EXPECT_EQ(loaded.step(), original.step);
  EXPECT_EQ(loaded.manifest.metadata, original.metadata);
  EXPECT_EQ(loaded.manifest.blobs, original.blobs);
  ASSERT_EQ(loaded.manifest.tensors.size(), original.tensors.size());
  for (size_t i = 0; i < original.tensors.size(); ++i) {
    const auto& o = original.tensors[i];
    const checkpoint::LoadedTensor* t = loaded.find(o.name);
    ASSERT_NE(t, nullptr) << o.name;
    EXPECT_TRUE(t->complete()) << o.name;
    EXPECT_EQ(t->info.dtype, o.dtype) << o.name;
    EXPECT_EQ(t->info.shape, o.shape) << o.name;
    ASSERT_EQ(t->bytes.size(), o.bytes.size()) << o.name;
    EXPECT_TRUE(std::equal(t->bytes.begin(), t->bytes.end(), o.bytes.begin())) << o.name << " differs";
  }
}

// Reassembles the tensors from the pieces that `readers` partial loads returned and compares
// them with `original`: every byte present exactly once and equal; every tensor seen.
inline void expect_pieces_equal(const std::vector<checkpoint::LoadedState>& readers, const TestState& original) {
  for (const auto& o : original.tensors) {
    std::vector<uint8_t> assembled(o.bytes.size());
    std::vector<int> covered(o.bytes.size(), 0);
    bool seen = false;
    for (const auto& r : readers) {
      const checkpoint::LoadedTensor* t = r.find(o.name);
      if (!t) continue;
      seen = true;
      EXPECT_EQ(t->info.shape, o.shape);
      ASSERT_LE(t->first_byte + t->bytes.size(), o.bytes.size()) << o.name;
      if (!t->bytes.empty()) std::memcpy(assembled.data() + t->first_byte, t->bytes.data(), t->bytes.size());
      for (size_t i = 0; i < t->bytes.size(); ++i) ++covered[t->first_byte + i];
    }
    EXPECT_TRUE(seen) << o.name << " is in no reader's range";
    EXPECT_TRUE(std::all_of(covered.begin(), covered.end(), [](int c) { return c == 1; }))
        << o.name << ": some byte is loaded by no reader or by several";
    EXPECT_EQ(assembled, o.bytes) << o.name << " differs";
  }
}

}  // namespace meshtrain::test_support
