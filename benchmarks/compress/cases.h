// The codec configurations both compress benchmarks run, and their shared setup.
#pragma once

#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "meshtrain/compress.h"

namespace meshtrain::compress::bench {

struct CodecCase {
  std::string spec;  // make_codec syntax; also the record's "codec"
};

inline std::vector<CodecCase> codec_cases() {
  return {{"none"},
          {"fp16"},
          {"bf16"},
          {"int8"},                                // block 256, nearest, error feedback
          {"int8:error_feedback=off"},
          {"int8:rounding=stochastic"},
          {"topk:fraction=0.01"},
          {"topk:fraction=0.001"},
          {"powersgd:rank=4"}};
}

// A square-ish matrix view for PowerSGD (rows x cols = count when count is a power of two).
inline TensorSpec spec_for(const std::string& codec, size_t count) {
  if (codec.rfind("powersgd", 0) != 0) return TensorSpec::flat(count);
  size_t rows = 1;
  while (rows * rows < count) rows <<= 1;
  if (count % rows != 0) return TensorSpec::flat(count);
  return TensorSpec{{rows, count / rows}};
}

// Gradient-like values (normal, sigma 1e-2, 1% outliers x20), generated once per run.
inline std::vector<float> gradient(size_t count, uint64_t seed = 1) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1e-2f);
  std::vector<float> g(count);
  for (size_t i = 0; i < count; ++i) g[i] = normal(rng) * ((rng() % 100) == 0 ? 20.0f : 1.0f);
  return g;
}

// Touches every page so that first-touch faults are not timed.
template <typename T>
void prefault(std::vector<T>& v) {
  if (!v.empty()) std::memset(static_cast<void*>(v.data()), 0, v.size() * sizeof(T));
}

}  // namespace meshtrain::compress::bench
