// Shared by the compress tests: random gradients, one-call encode, and the codec list.
#pragma once

#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "meshtrain/compress.h"

namespace meshtrain::compress::testing {

// Gradient-like values: normal(0, sigma) with a few large outliers, fresh per seed.
inline std::vector<float> random_gradient(size_t n, uint64_t seed, float sigma = 1e-2f) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.0f, sigma);
  std::uniform_int_distribution<int> outlier(0, 99);
  std::vector<float> g(n);
  for (auto& v : g) v = normal(rng) * (outlier(rng) == 0 ? 20.0f : 1.0f);
  return g;
}

inline BufferView view(std::vector<float>& v) { return BufferView{v.data(), v.size(), DType::Float32}; }
inline BufferView view(const std::vector<float>& v) {
  return BufferView{const_cast<float*>(v.data()), v.size(), DType::Float32};
}

inline std::vector<uint8_t> encode(const Codec& codec, const std::vector<float>& grad, CodecState& state) {
  std::vector<uint8_t> out(codec.encoded_bytes(state.spec()));
  size_t n = codec.encode(view(grad), state, out);
  out.resize(n);
  return out;
}

inline std::vector<float> decode(const Codec& codec, const std::vector<uint8_t>& payload, size_t n) {
  std::vector<float> out(n, -7.0f);  // poison: decode must overwrite every element
  codec.decode(payload, view(out));
  return out;
}

// The k a top-k codec of this fraction sends for n elements, read off its payload size.
inline uint64_t topk_k_of(double fraction, size_t n) {
  return (make_topk_codec({.fraction = fraction})->encoded_bytes(n) - kPayloadHeaderBytes) / 8;
}

// Codec specs the parameterised tests run over (make_codec syntax).
inline std::vector<std::string> all_codec_specs() {
  return {"none",
          "fp16",
          "bf16",
          "int8",
          "int8:block_size=64,rounding=stochastic,seed=3",
          "int8:block_size=1000,error_feedback=off",
          "topk:fraction=0.1",
          "topk:fraction=0.001,error_feedback=off",
          "powersgd:rank=2"};
}

inline std::string test_name(std::string spec) {
  for (auto& c : spec)
    if (!std::isalnum(static_cast<unsigned char>(c))) c = '_';
  return spec;
}

inline uint32_t bits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return b;
}

}  // namespace meshtrain::compress::testing
