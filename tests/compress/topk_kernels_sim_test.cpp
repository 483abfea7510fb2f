// The top-k kernels (kernels/compress/topk_kernels.cuh) run on the CPU through
// tests/support/cuda_sim.h: their indexing, ranks, barriers and warp-synchronous logic against
// the host's answers, on a host without a GPU. The histogram and compaction kernels have run on
// an H100 (CudaTopK.*), so they also check the simulator; the warp-aggregated histogram, the
// device tile scan and the sampled selection's kernels had not when these tests were written.
// Small launches only (a fiber per CUDA thread), each case in both schedule orders; the CUDA
// tests remain the reference.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>

#include "compress/helpers.h"
#include "compress/topk_sample_emulation.h"
#include "support/cuda_sim.h"

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunknown-pragmas"  // #pragma unroll
#include "kernels/compress/topk_kernels.cuh"
#pragma GCC diagnostic pop

using namespace meshtrain::compress::testing;
namespace kc = meshtrain::cuda::compress;
namespace math = meshtrain::compress::math;

namespace {

using kc::tiles_for;
using kc::detail::blocks_covering;
using kc::detail::grid_for;

TEST(SimTopK, HistogramKernelsPlainAndWarpAggregatedCountLikeTheHost) {
  for (size_t n : {size_t(1), size_t(31), size_t(33), size_t(4097)}) {
    std::vector<float> x = random_gradient(n, 900 + n);
    for (size_t i = 0; i < n; i += 7) x[i] = 0.0f;
    for (size_t i = 3; i < n; i += 11) x[i] = -0.015625f;
    const uint32_t some_key = math::magnitude_key(-0.015625f);
    for (auto [shift, bits] : {std::pair{20u, 11u}, std::pair{9u, 11u}, std::pair{0u, 9u}}) {
      const uint32_t above = shift + bits, prefix = above >= 31 ? 0u : some_key >> above;
      std::vector<unsigned long long> expected(size_t(1) << bits, 0);
      for (float v : x) {
        const uint32_t key = math::magnitude_key(v);
        if ((above >= 31 ? 0u : key >> above) == prefix) ++expected[(key >> shift) & ((1u << bits) - 1)];
      }
      for (bool aggregated : {false, true}) {
        cuda_sim::for_each_order([&](const char* order) {
          std::vector<unsigned long long> got(expected.size(), 0);
          // Three blocks: the grid-stride loop goes round for the larger sizes.
          cuda_sim::launch(3, kc::kThreads, (size_t(1) << bits) * 4,
                           aggregated ? kc::histogram_aggregated_kernel : kc::histogram_kernel, x.data(), n, shift,
                           bits, prefix, got.data());
          EXPECT_EQ(got, expected) << "n " << n << " shift " << shift << (aggregated ? " aggregated " : " plain ")
                                   << order;
        });
      }
    }
  }
  EXPECT_EQ(cuda_sim::violations(), 0);
}

// One block sums the tiles' counts kScanThreads at a time: exclusive prefixes and totals, with
// and without the second (eq) array, across several rounds.
TEST(SimTopK, TileScanCarriesAcrossRounds) {
  for (size_t tiles : {size_t(1), size_t(1023), size_t(1024), size_t(2500)}) {
    std::vector<uint32_t> gt(tiles), eq(tiles);
    for (size_t t = 0; t < tiles; ++t) {
      gt[t] = math::mix32(static_cast<uint32_t>(t)) % 4097;
      eq[t] = math::mix32(static_cast<uint32_t>(t) + 77) % 5;
    }
    for (bool with_eq : {true, false}) {
      cuda_sim::for_each_order([&](const char* order) {
        std::vector<unsigned long long> before(2 * tiles + 2, ~0ull);
        cuda_sim::launch(1, kc::kScanThreads, 0, kc::tile_scan_kernel, gt.data(), with_eq ? eq.data() : nullptr,
                         tiles, before.data(), before.data() + 2 * tiles);
        unsigned long long g = 0, e = 0;
        for (size_t t = 0; t < tiles; ++t) {
          ASSERT_EQ(before[t], g) << "tiles " << tiles << " gt prefix " << t << ", " << order;
          ASSERT_EQ(before[tiles + t], e) << "tiles " << tiles << " eq prefix " << t << ", " << order;
          g += gt[t];
          e += with_eq ? eq[t] : 0;
        }
        EXPECT_EQ(before[2 * tiles], g);
        EXPECT_EQ(before[2 * tiles + 1], e);
      });
    }
  }
  EXPECT_EQ(cuda_sim::violations(), 0);
}

// topk_compact: count, the tiles' prefixes (on the host, as the codec's default, or by the
// device scan), write; threshold and ties from the host.
SampledRun compact_on_sim(std::vector<float> v, uint32_t threshold, uint64_t ties, uint64_t k, bool device_scan) {
  const size_t n = v.size(), tiles = tiles_for(n);
  std::vector<uint32_t> gt(tiles), eq(tiles);
  std::vector<unsigned long long> before(2 * tiles + 2);
  cuda_sim::launch(static_cast<unsigned>(tiles), kc::kThreads, 0, kc::tile_count_kernel, v.data(), n, threshold,
                   gt.data(), eq.data());
  if (device_scan) {
    cuda_sim::launch(1, kc::kScanThreads, 0, kc::tile_scan_kernel, gt.data(), eq.data(), tiles, before.data(),
                     before.data() + 2 * tiles);
  } else {
    for (size_t t = 0; t + 1 < tiles; ++t) {
      before[t + 1] = before[t] + gt[t];
      before[tiles + t + 1] = before[tiles + t] + eq[t];
    }
  }
  SampledRun r{true, 0, std::vector<uint32_t>(k, 0xffffffffu), std::vector<float>(k), {}};
  cuda_sim::launch(static_cast<unsigned>(tiles), kc::kThreads, 0, kc::tile_write_kernel, v.data(), v.data(), n,
                   threshold, static_cast<unsigned long long>(ties), before.data(), before.data() + tiles, r.idx.data(),
                   r.val.data(), static_cast<unsigned long long>(k), device_scan ? before.data() + 2 * tiles : nullptr);
  r.residual = std::move(v);
  return r;
}

// topk_select_sampled's sequence with std::sort for CUB's sorts. The sample kernel runs when the
// sample is small (SimTopK.SampleKernelReadsOneElementPerStratum runs it on strata of several
// elements); larger samples are read on the host with the same positions.
SampledRun sampled_on_sim(std::vector<float> v, uint64_t k) {
  const size_t n = v.size(), tiles = tiles_for(n);
  const kc::TopKSamplePlan plan = kc::topk_sample_plan(n, k);
  std::vector<uint32_t> sample(plan.samples);
  if (plan.samples <= 8192) {
    cuda_sim::launch(blocks_covering(plan.samples), kc::kThreads, 0, kc::sample_keys_kernel,
                     v.data(), static_cast<unsigned long long>(n), static_cast<unsigned long long>(plan.samples),
                     sample.data());
  } else {
    for (uint64_t s = 0; s < plan.samples; ++s)
      sample[s] = math::magnitude_key(v[math::topk_sample_index(s, n, plan.samples)]);
  }
  std::sort(sample.begin(), sample.end());
  const uint32_t* lo = plan.lo_open ? nullptr : &sample[plan.lo_rank];
  const uint32_t* hi = plan.hi_open ? nullptr : &sample[plan.hi_rank];
  std::vector<unsigned long long> counters(4, 0), gathered(plan.capacity);
  std::vector<uint32_t> tile_counts(tiles, 0xdeadbeefu);
  cuda_sim::launch(static_cast<unsigned>(tiles), kc::kThreads, 0, kc::sampled_count_kernel, v.data(), n, lo, hi,
                   tile_counts.data(), counters.data(), gathered.data(),
                   static_cast<unsigned long long>(plan.capacity));
  const uint64_t above = counters[0], in_bracket = counters[1];
  EXPECT_EQ(counters[2], lo ? *lo : 0u);
  EXPECT_EQ(counters[3], hi ? *hi : 0xffffffffu);
  // A miss returns the untouched output and residual.
  const auto miss = [&] { return SampledRun{false, in_bracket, std::vector<uint32_t>(k, 0xffffffffu), {}, v}; };
  if (above > k || above + in_bracket < k) return miss();
  if (in_bracket > plan.capacity) {
    if (counters[2] != counters[3]) return miss();
    SampledRun r = compact_on_sim(std::move(v), static_cast<uint32_t>(counters[3]), k - above, k, false);
    r.candidates = in_bracket;
    return r;
  }
  const uint64_t taken = k - above;
  std::sort(gathered.begin(), gathered.begin() + static_cast<std::ptrdiff_t>(in_bracket));
  kc::SampledThreshold threshold{};
  cuda_sim::launch(grid_for(taken), kc::kThreads, 0, kc::sampled_take_kernel, gathered.data(),
                   static_cast<unsigned long long>(taken), hi, tile_counts.data(), &threshold);
  std::vector<unsigned long long> before(2 * tiles + 2);
  cuda_sim::launch(1, kc::kScanThreads, 0, kc::tile_scan_kernel, tile_counts.data(), nullptr, tiles, before.data(),
                   before.data() + 2 * tiles);
  SampledRun r{true, in_bracket, std::vector<uint32_t>(k, 0xffffffffu), std::vector<float>(k), {}};
  cuda_sim::launch(static_cast<unsigned>(tiles), kc::kThreads, 0, kc::sampled_write_kernel, v.data(), v.data(), n,
                   &threshold, before.data(), before.data() + 2 * tiles, static_cast<unsigned long long>(k),
                   r.idx.data(), r.val.data());
  r.residual = std::move(v);
  return r;
}

void expect_sim_like_the_emulation(const std::vector<float>& x, uint64_t k, const std::string& at) {
  const SampledOutcome expected = emulate_sampled_selection(x, k);
  cuda_sim::for_each_order(
      [&](const char* order) { expect_like_the_emulation(sampled_on_sim(x, k), expected, x, at + ", " + order); });
}

// The sampled selection's kernels against its emulation: sample within one tile and across
// several, k from 1 to all, ties (including a single-key bracket beyond the buffer, through
// the compaction kernels), and, above 2^18 elements, a sample of strata and a case where no
// candidate is taken.
TEST(SimTopK, SampledKernelsDoWhatTheEmulationDoes) {
  for (size_t n : {size_t(1), size_t(33), size_t(3 * 4096 + 17)}) {
    std::vector<SampledTestData> data = sampled_test_data(n);
    data.push_back({"all equal", std::vector<float>(n, 0.5f), false});
    for (double fraction : {0.0, 0.01, 0.3, 1.0}) {
      const uint64_t k = std::max<uint64_t>(1, static_cast<uint64_t>(std::ceil(fraction * double(n))));
      for (const SampledTestData& d : data)
        expect_sim_like_the_emulation(d.x, k,
                                      std::string(d.name) + " n " + std::to_string(n) + " k " + std::to_string(k));
    }
  }
  const size_t n = kc::kTopKSamples + 5 * 4096 + 17;  // 70 tiles
  const std::vector<SampledTestData> data = sampled_test_data(n);
  for (const SampledTestData& d : data) {
    if (std::string(d.name) != "normal with outliers" && std::string(d.name) != "95% zeros") continue;
    for (double fraction : {0.01, 0.3}) {
      const uint64_t k = static_cast<uint64_t>(std::ceil(fraction * double(n)));
      expect_sim_like_the_emulation(d.x, k,
                                    std::string(d.name) + " n " + std::to_string(n) + " k " + std::to_string(k));
    }
  }
  expect_sim_like_the_emulation(all_sent_above_the_bracket(n, 1000), 1000, "k above the bracket");
  EXPECT_EQ(cuda_sim::violations(), 0);
}

// The compaction for a threshold from the host, with the tiles' prefixes from the host (the
// codec's default) and from the device scan: the radix select's selection, in index order.
TEST(SimTopK, CompactionWithHostOrDeviceScanSendsTheRadixSelection) {
  for (size_t n : {size_t(33), size_t(3 * 4096 + 17)}) {
    std::vector<float> x = random_gradient(n, 1300 + n);
    for (size_t i = 0; i < n; i += 5) x[i] = 0.03125f;  // ties at many ranks
    for (double fraction : {0.0, 0.01, 0.3, 1.0}) {
      const uint64_t k = std::max<uint64_t>(1, static_cast<uint64_t>(std::ceil(fraction * double(n))));
      std::vector<uint32_t> keys(n);
      for (size_t i = 0; i < n; ++i) keys[i] = math::magnitude_key(x[i]);
      std::vector<uint32_t> sorted = keys;
      std::nth_element(sorted.begin(), sorted.begin() + static_cast<std::ptrdiff_t>(k - 1), sorted.end(),
                       std::greater<>());
      const uint32_t threshold = sorted[k - 1];
      uint64_t above = 0;
      for (uint32_t key : keys) above += key > threshold;
      SampledOutcome expected;  // the radix select's rule: everything above, then the first ties
      expected.hit = true;
      for (size_t i = 0, ties = k - above; i < n; ++i)
        if (keys[i] > threshold || (keys[i] == threshold && ties > 0)) {
          ties -= keys[i] == threshold;
          expected.sent.push_back(static_cast<uint32_t>(i));
        }
      for (bool device_scan : {false, true})
        cuda_sim::for_each_order([&](const char* order) {
          expect_like_the_emulation(compact_on_sim(x, threshold, k - above, k, device_scan), expected, x,
                                    "n " + std::to_string(n) + " k " + std::to_string(k) +
                                        (device_scan ? " device scan, " : " host scan, ") + order);
        });
    }
  }
  EXPECT_EQ(cuda_sim::violations(), 0);
}

// The sample kernel reads element topk_sample_index(s, n, m) for strata of several elements.
TEST(SimTopK, SampleKernelReadsOneElementPerStratum) {
  for (auto [n, m] : {std::pair<size_t, size_t>{3333, 1000}, std::pair<size_t, size_t>{3 * 4096 + 17, 4096}}) {
    const std::vector<float> x = random_gradient(n, 8);
    std::vector<uint32_t> expected(m);
    for (size_t s = 0; s < m; ++s) expected[s] = math::magnitude_key(x[math::topk_sample_index(s, n, m)]);
    cuda_sim::for_each_order([&](const char* order) {
      std::vector<uint32_t> got(m, 0xffffffffu);
      cuda_sim::launch(blocks_covering(m), kc::kThreads, 0, kc::sample_keys_kernel, x.data(),
                       static_cast<unsigned long long>(n), static_cast<unsigned long long>(m), got.data());
      EXPECT_EQ(got, expected) << "n " << n << " m " << m << ", " << order;
    });
  }
}

// The decoder's scatter-add: out[idx[j]] += val[j], rounded like the CPU.
TEST(SimTopK, ScatterAddAddsEveryPair) {
  const size_t n = 5000, k = 700;
  std::vector<uint32_t> idx(k);
  for (size_t j = 0; j < k; ++j) idx[j] = static_cast<uint32_t>(j * 7 + j % 3);
  const std::vector<float> val = random_gradient(k, 21), base = random_gradient(n, 22);
  std::vector<float> expected = base;
  for (size_t j = 0; j < k; ++j) expected[idx[j]] = math::add_rn(expected[idx[j]], val[j]);
  cuda_sim::for_each_order([&](const char* order) {
    std::vector<float> out = base;
    cuda_sim::launch(2, kc::kThreads, 0, kc::scatter_add_kernel, idx.data(), val.data(),
                     static_cast<unsigned long long>(k), out.data());
    for (size_t i = 0; i < n; ++i) ASSERT_EQ(bits(out[i]), bits(expected[i])) << i << ", " << order;
  });
}

}  // namespace
