// The CUDA sampled top-k selection (kernels/compress/topk.cu, topk_select_sampled) step by step
// on the host, with the same plan, sample positions and candidate keys: the CPU tests check that
// its rule selects what the codec's radix select selects and that its bracket holds on
// gradient-like data; the CUDA tests check that the kernels reach the same bracket, the same
// candidate count and the same selection.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "compress/helpers.h"
#include "kernels/compress/api.h"
#include "kernels/compress/codec_math.h"

namespace meshtrain::compress::testing {

struct SampledOutcome {
  bool hit = false;            // the bracket held: the selection below is the result
  uint64_t above = 0;          // keys above the bracket
  uint64_t in_bracket = 0;     // keys in it (the candidates)
  bool single_key = false;     // more than the buffer holds, in a bracket of one key (lo == hi)
  std::vector<uint32_t> sent;  // when hit: the selected indices, ascending
};

inline SampledOutcome emulate_sampled_selection(const std::vector<float>& v, uint64_t k) {
  namespace kc = meshtrain::cuda::compress;
  namespace math = meshtrain::compress::math;
  const uint64_t n = v.size();
  const kc::TopKSamplePlan plan = kc::topk_sample_plan(n, k);
  std::vector<uint32_t> sample(plan.samples);
  for (uint64_t s = 0; s < plan.samples; ++s)
    sample[s] = math::magnitude_key(v[math::topk_sample_index(s, n, plan.samples)]);
  std::sort(sample.begin(), sample.end());
  const uint32_t lo = plan.lo_open ? 0u : sample[plan.lo_rank];
  const uint32_t hi = plan.hi_open ? 0xffffffffu : sample[plan.hi_rank];
  SampledOutcome out;
  std::vector<uint64_t> gathered;  // (~key << 32 | index): ascending is key descending, index ascending
  for (uint64_t i = 0; i < n; ++i) {
    const uint32_t key = math::magnitude_key(v[i]);
    if (key > hi) ++out.above;
    else if (key >= lo) gathered.push_back((uint64_t(~key) << 32) | i);
  }
  out.in_bracket = gathered.size();
  const bool counts_hold = out.above <= k && out.above + out.in_bracket >= k;
  out.single_key = counts_hold && out.in_bracket > plan.capacity && lo == hi;
  out.hit = counts_hold && (out.in_bracket <= plan.capacity || out.single_key);
  if (!out.hit) return out;
  const uint64_t taken = k - out.above;
  if (out.single_key) {  // threshold hi, its first `taken` ties in index order (topk_compact)
    uint64_t ties = taken;
    for (uint64_t i = 0; i < n; ++i) {
      const uint32_t key = math::magnitude_key(v[i]);
      if (key > hi || (key == hi && ties > 0)) {
        ties -= key == hi;
        out.sent.push_back(static_cast<uint32_t>(i));
      }
    }
    return out;
  }
  std::sort(gathered.begin(), gathered.end());
  uint32_t threshold = hi;
  uint64_t cutoff = 0;  // one past the last index sent with key == threshold
  if (taken > 0) {
    threshold = ~static_cast<uint32_t>(gathered[taken - 1] >> 32);
    cutoff = (gathered[taken - 1] & 0xffffffffu) + 1;
  }
  for (uint64_t i = 0; i < n; ++i) {
    const uint32_t key = math::magnitude_key(v[i]);
    if (key > threshold || (key == threshold && i < cutoff)) out.sent.push_back(static_cast<uint32_t>(i));
  }
  return out;
}

// What a run of the sampled selection left, against the emulation's outcome for the same data
// x and k: the same hit or miss and candidate count; on a hit, the emulation's indices, their
// values and the residual (x before the call) with them cleared; on a miss, nothing written
// (the indices still the 0xff poison the caller filled them with, the residual unchanged).
struct SampledRun {
  bool hit = false;
  uint64_t candidates = 0;
  std::vector<uint32_t> idx;  // k entries
  std::vector<float> val;     // k entries
  std::vector<float> residual;
};
inline void expect_like_the_emulation(const SampledRun& got, const SampledOutcome& expected,
                                      const std::vector<float>& x, const std::string& at) {
  ASSERT_EQ(got.hit, expected.hit) << at;
  EXPECT_EQ(got.candidates, expected.in_bracket) << at;
  std::vector<float> residual = x;
  if (got.hit) {
    ASSERT_EQ(got.idx, expected.sent) << at << (expected.single_key ? " (single-key bracket)" : "");
    for (size_t j = 0; j < got.idx.size(); ++j) {
      ASSERT_EQ(bits(got.val[j]), bits(x[got.idx[j]])) << at << " value " << j;
      residual[got.idx[j]] = 0.0f;
    }
  } else {
    for (size_t j = 0; j < got.idx.size(); ++j)
      ASSERT_EQ(got.idx[j], 0xffffffffu) << at << ": a miss wrote index " << j;
  }
  ASSERT_EQ(got.residual.size(), residual.size()) << at;
  for (size_t i = 0; i < residual.size(); ++i)
    ASSERT_EQ(bits(got.residual[i]), bits(residual[i])) << at << " residual " << i;
}

// Gradient-like data for both: normal with outliers, heavy-tailed, laid out in rows of different
// scales, sorted, bf16-valued, mostly zeros; and a coarse grid whose ties may overflow the
// candidates.
struct SampledTestData {
  const char* name;
  std::vector<float> x;
  bool must_hit = true;  // false: the bracket may miss (the selection must still be right if it holds)
};

inline std::vector<SampledTestData> sampled_test_data(size_t n) {
  std::vector<SampledTestData> out;
  out.push_back({"normal with outliers", random_gradient(n, 77 + n)});
  std::mt19937_64 rng(5);
  std::cauchy_distribution<float> cauchy(0.0f, 1e-3f);
  std::vector<float> heavy(n);
  for (auto& v : heavy) v = std::clamp(cauchy(rng), -1e30f, 1e30f);
  out.push_back({"cauchy", heavy});
  // Rows of 4096 whose scales span 2^-12 .. 2^11 (a weight matrix's gradient, layer by layer).
  std::vector<float> rows = random_gradient(n, 3);
  for (size_t i = 0; i < n; ++i) rows[i] *= std::ldexp(1.0f, static_cast<int>((i / 4096) % 24) - 12);
  out.push_back({"rows of different scales", rows});
  std::vector<float> sorted(n);
  for (size_t i = 0; i < n; ++i) sorted[i] = (i % 2 ? -1.0f : 1.0f) * static_cast<float>(i) * 1e-6f;
  out.push_back({"sorted magnitudes", sorted});
  // bf16 gradients widened to fp32: 8 significant bits, ties at every rank.
  std::vector<float> bf16 = random_gradient(n, 13);
  for (auto& v : bf16) {
    const uint32_t b = math::f2u(v);
    v = math::bf16_to_fp32(static_cast<uint16_t>((b + 0x7fffu + ((b >> 16) & 1u)) >> 16));  // nearest even
  }
  out.push_back({"bf16 values", bf16});
  // 95% zeros (unused embedding rows): beyond 5%, the bracket is the single key 0.
  std::vector<float> sparse = random_gradient(n, 17);
  for (size_t i = 0; i < n; ++i)
    if (math::mix32(static_cast<uint32_t>(i)) % 100 < 95) sparse[i] = 0.0f;
  out.push_back({"95% zeros", sparse});
  // A grid of 1/256 against sigma 1e-2: up to 9% of the elements tie at the threshold, which can
  // overflow the candidates' buffer in a bracket of several keys.
  std::vector<float> grid = random_gradient(n, 11);
  for (auto& v : grid) v = std::round(v * 256.0f) / 256.0f;
  out.push_back({"values on a grid of 1/256", grid, false});
  return out;
}

// Exactly k keys above the bracket, none of them in the sample (n > kTopKSamples, k < n / 4):
// nothing is taken from the candidates, the threshold is hi itself. The sample holds distinct
// values in [0.1, 0.11) and, in its top 400 strata, 0.75; k elements outside it hold 2.0.
inline std::vector<float> all_sent_above_the_bracket(size_t n, uint64_t k) {
  namespace kc = meshtrain::cuda::compress;
  const uint64_t m = kc::topk_sample_plan(n, k).samples;
  std::vector<float> x(n, 0.0f);
  std::vector<bool> sampled(n, false);
  for (uint64_t s = 0; s < m; ++s) {
    const uint64_t i = math::topk_sample_index(s, n, m);
    sampled[i] = true;
    x[i] = s + 400 >= m ? 0.75f : 0.1f + 0.01f * static_cast<float>(s) / static_cast<float>(m);
  }
  uint64_t placed = 0;
  for (uint64_t i = 0; i < n && placed < k; i += 3)
    if (!sampled[i]) {
      x[i] = 2.0f;
      ++placed;
    }
  return x;
}

}  // namespace meshtrain::compress::testing
