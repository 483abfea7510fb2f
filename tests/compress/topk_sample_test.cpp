// The sampled top-k selection's rule (the CUDA kernels' topk_select_sampled, emulated on the
// host with the same plan and sample positions): where its bracket holds it selects exactly what
// the codec's radix select sends (ties to the lower index), and on gradient-like data (normal,
// heavy-tailed, laid out in rows of different scales, sorted) the bracket holds with the
// candidates well inside their buffer. Where the sample cannot hold (huge ties at the threshold,
// data hidden from the sample) it reports a miss, which the codec answers with the radix select.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <memory>
#include <numeric>

#include "compress/helpers.h"
#include "compress/topk_sample_emulation.h"

using namespace meshtrain;
using namespace meshtrain::compress;
using namespace meshtrain::compress::testing;
namespace kc = meshtrain::cuda::compress;

namespace {

// The indices the CPU codec's radix select sends for x at this fraction.
std::vector<uint32_t> cpu_indices(const std::vector<float>& x, double fraction) {
  auto codec = make_topk_codec(
      {.fraction = fraction, .error_feedback = false, .selection = TopKOptions::Selection::Radix});
  auto state = codec->make_state(TensorSpec::flat(x.size()));
  const auto payload = encode(*codec, x, *state);
  const uint64_t k = topk_k_of(fraction, x.size());
  std::vector<uint32_t> idx(k);
  std::memcpy(idx.data(), payload.data() + kPayloadHeaderBytes, 4 * k);
  return idx;
}

TEST(TopKSampled, PlanBracketsTheRankWithinTheSample) {
  for (uint64_t n : {uint64_t(1), uint64_t(7), uint64_t(1000), uint64_t(1) << 18, (uint64_t(1) << 26) + 5,
                     uint64_t(UINT32_MAX)}) {
    for (double fraction : {1e-6, 0.001, 0.01, 0.5, 1.0}) {
      const uint64_t k = topk_k_of(fraction, n);
      const kc::TopKSamplePlan p = kc::topk_sample_plan(n, k);
      SCOPED_TRACE("n " + std::to_string(n) + " k " + std::to_string(k));
      EXPECT_EQ(p.samples, std::min<uint64_t>(n, kc::kTopKSamples));
      EXPECT_LE(p.lo_rank, p.hi_rank);
      EXPECT_LT(p.hi_rank, p.samples);
      EXPECT_GE(p.capacity, std::min<uint64_t>(n, 8192));
      EXPECT_LE(p.capacity, n);
      EXPECT_LT(p.capacity, uint64_t(INT32_MAX));  // the device sorts count in int
      // The sample's last position is inside the tensor.
      EXPECT_LT(math::topk_sample_index(p.samples - 1, n, p.samples), n);
    }
  }
  // 1% of 64M: about 0.3% of the elements are candidates, against k = 1%.
  const kc::TopKSamplePlan p = kc::topk_sample_plan(uint64_t(1) << 26, topk_k_of(0.01, size_t(1) << 26));
  EXPECT_LT(double(p.hi_rank - p.lo_rank + 1) / double(p.samples), 0.004);
}

// The strata tile [0, n) exactly, whatever n mod m (the tail is sampled too), and the offsets
// spread over a stratum (a fixed offset would alias with periodic data).
TEST(TopKSampled, SampleIndicesCoverTheTensorOnePerStratum) {
  const uint64_t m = 4096;
  for (uint64_t n : {m, m + 1, 2 * m, 2 * m - 1, 3 * m + 17, 255 * m + 254, (uint64_t(1) << 32) - 1}) {
    uint64_t end = 0;
    std::vector<uint64_t> offsets;
    for (uint64_t s = 0; s < m; ++s) {
      const uint64_t begin = s * n / m, next = (s + 1) * n / m, i = math::topk_sample_index(s, n, m);
      ASSERT_EQ(begin, end) << "n " << n << " stratum " << s;
      ASSERT_GE(i, begin);
      ASSERT_LT(i, next);
      offsets.push_back(i - begin);
      end = next;
    }
    EXPECT_EQ(end, n);
    if (n / m >= 2 && n / m <= 255) {
      std::sort(offsets.begin(), offsets.end());
      const auto used = std::unique(offsets.begin(), offsets.end()) - offsets.begin();
      EXPECT_GT(used, int64_t(n / m) / 2) << "n " << n;
    }
  }
}

TEST(TopKSampled, SelectsWhatTheRadixSelectSendsAndTheBracketHolds) {
  // 2^19 - 1 and the last size leave a remainder of strata: the tail of the tensor is sampled too.
  for (size_t n : {size_t(1), size_t(33), size_t(4097), (size_t(1) << 19) - 1, (size_t(1) << 20) + 3,
                   (size_t(1) << 22) + 5 * 4096 + 17}) {
    for (const SampledTestData& d : sampled_test_data(n)) {
      for (double fraction : {0.001, 0.01, 0.1, 0.5, 1.0}) {
        SCOPED_TRACE(std::string(d.name) + " n " + std::to_string(n) + " fraction " + std::to_string(fraction));
        const uint64_t k = topk_k_of(fraction, n);
        const SampledOutcome got = emulate_sampled_selection(d.x, k);
        if (d.must_hit) ASSERT_TRUE(got.hit) << "above " << got.above << " candidates " << got.in_bracket;
        if (got.hit) EXPECT_EQ(got.sent, cpu_indices(d.x, fraction));
        // Normal data keeps its candidates well inside the buffer (3x the expected number).
        if (std::string(d.name) == "normal with outliers" && n > kc::kTopKSamples)
          EXPECT_LT(got.in_bracket, kc::topk_sample_plan(n, k).capacity / 2);
        // Beyond 5% of a 95%-zero tensor the threshold is 0: one key, more ties than the buffer.
        if (std::string(d.name) == "95% zeros" && fraction >= 0.1 && n > kc::kTopKSamples)
          EXPECT_TRUE(got.single_key);
      }
    }
  }
}

TEST(TopKSampled, TiesOfOneKeyBeyondTheBufferHoldAndHiddenDataMisses) {
  const size_t n = size_t(1) << 20;
  const uint64_t k = topk_k_of(0.01, n);
  // All equal: every element is a candidate, more than the buffer holds, but the bracket is one
  // key: the threshold, with the first k of its ties.
  const std::vector<float> equal(n, 0.5f);
  SampledOutcome all_equal = emulate_sampled_selection(equal, k);
  EXPECT_TRUE(all_equal.hit);
  EXPECT_TRUE(all_equal.single_key);
  EXPECT_EQ(all_equal.in_bracket, n);
  EXPECT_EQ(all_equal.sent, cpu_indices(equal, 0.01));
  // Zeros where the sample looks, ones elsewhere: the sample sees a threshold of 0.
  const kc::TopKSamplePlan p = kc::topk_sample_plan(n, k);
  std::vector<float> hidden(n, 1.0f);
  for (uint64_t s = 0; s < p.samples; ++s) hidden[math::topk_sample_index(s, n, p.samples)] = 0.0f;
  SampledOutcome missed = emulate_sampled_selection(hidden, k);
  EXPECT_FALSE(missed.hit);
  EXPECT_GT(missed.above + missed.in_bracket, k);
  // Small tensors are their own sample: even all-equal ones hold.
  SampledOutcome small = emulate_sampled_selection(std::vector<float>(5000, 0.5f), 50);
  ASSERT_TRUE(small.hit);
  EXPECT_FALSE(small.single_key);
  EXPECT_EQ(small.sent, cpu_indices(std::vector<float>(5000, 0.5f), 0.01));
}

// Exactly k keys above the bracket: no candidate is taken and the threshold is the bracket's top.
TEST(TopKSampled, AllSentAboveTheBracketTakesNoCandidate) {
  const size_t n = size_t(1) << 20;
  const std::vector<float> x = all_sent_above_the_bracket(n, 1000);
  const SampledOutcome got = emulate_sampled_selection(x, 1000);
  ASSERT_TRUE(got.hit);
  EXPECT_EQ(got.above, 1000u);
  EXPECT_GT(got.in_bracket, 400u);
  EXPECT_EQ(got.sent, cpu_indices(x, 1000.0 / double(n)));
}

TEST(TopKSampled, SpecSelectsTheSelection) {
  EXPECT_EQ(make_codec("topk:fraction=0.01,selection=sampled")->describe(),
            "topk(fraction=0.01, error_feedback=on, selection=sampled)");
  EXPECT_EQ(make_codec("topk:selection=radix")->describe(), "topk(fraction=0.01, error_feedback=on, selection=radix)");
  EXPECT_EQ(make_codec("topk:selection=auto")->describe(), "topk(fraction=0.01, error_feedback=on)");
  EXPECT_EQ(make_codec("topk")->describe(), "topk(fraction=0.01, error_feedback=on)");
  try {
    make_codec("topk:selection=sort");
    FAIL() << "accepted selection=sort";
  } catch (const InvalidArgumentError& e) {
    EXPECT_NE(std::string(e.what()).find("selection"), std::string::npos) << e.what();
  }
}

// ---- The CPU's selections (lib/compress/topk.cpp): radix, sampled (a smaller sample than the
// GPU's, kTopKCpuSamples) and auto send the same bytes, what a full sort sends.

// Sort by (|v| descending, index ascending), keep k, in index order.
std::vector<uint32_t> sorted_indices(const std::vector<float>& x, uint64_t k) {
  std::vector<uint32_t> order(x.size());
  std::iota(order.begin(), order.end(), 0u);
  std::stable_sort(order.begin(), order.end(), [&](uint32_t a, uint32_t b) {
    return math::magnitude_key(x[a]) > math::magnitude_key(x[b]);
  });
  order.resize(k);
  std::sort(order.begin(), order.end());
  return order;
}

std::vector<uint32_t> payload_indices(const std::vector<uint8_t>& payload, uint64_t k) {
  std::vector<uint32_t> idx(k);
  std::memcpy(idx.data(), payload.data() + kPayloadHeaderBytes, 4 * k);
  return idx;
}

constexpr const char* kSelections[] = {"radix", "sampled", "auto"};

// A gradient with zeros exactly where the CPU's sample of n elements at this k looks: its
// bound is 0, every key is at or above it, and the sampled selection misses.
std::vector<float> hidden_from_the_cpu_sample(size_t n, uint64_t k, uint64_t seed) {
  const kc::TopKSamplePlan p = kc::topk_sample_plan(n, k, kc::kTopKCpuSamples);
  std::vector<float> x = random_gradient(n, seed);
  for (uint64_t s = 0; s < p.samples; ++s) x[math::topk_sample_index(s, n, p.samples)] = 0.0f;
  return x;
}

TEST(TopKCpuSelection, EveryWaySendsWhatAFullSortSends) {
  for (size_t n : {(size_t(1) << 17) + 17, (size_t(1) << 20) + 3}) {
    for (const SampledTestData& d : sampled_test_data(n)) {
      for (double fraction : {0.001, 0.01, 0.1, 0.5}) {
        const uint64_t k = topk_k_of(fraction, n);
        const std::vector<uint32_t> expected = sorted_indices(d.x, k);
        for (const char* selection : kSelections) {
          SCOPED_TRACE(std::string(d.name) + " n " + std::to_string(n) + " fraction " + std::to_string(fraction) +
                       " selection " + selection);
          auto codec = make_codec("topk:error_feedback=off,fraction=" + std::to_string(fraction) +
                                  ",selection=" + selection);
          auto state = codec->make_state(TensorSpec::flat(n));
          const auto payload = encode(*codec, d.x, *state);
          ASSERT_EQ(payload_indices(payload, k), expected);
          for (uint64_t j = 0; j < k; ++j) {
            float value;
            std::memcpy(&value, payload.data() + kPayloadHeaderBytes + 4 * k + 4 * j, 4);
            ASSERT_EQ(bits(value), bits(d.x[expected[j]])) << j;
          }
          // Where its sample can see the data (not ties filling the bracket: a grid, or zeros as
          // the threshold), the sampled selection holds on its first try. Fractions of 0.1 and
          // more are not sampled at all: the bound would cut too little.
          const bool ties_at_threshold =
              std::string(d.name) == "values on a grid of 1/256" || (std::string(d.name) == "95% zeros" && fraction > 0.04);
          if (!ties_at_threshold && std::string(selection) != "radix")
            EXPECT_EQ(state->stats().sampled_misses, 0u);
          if (std::string(selection) == "radix") EXPECT_EQ(state->stats().sampled_misses, 0u);
        }
      }
    }
  }
}

// With error feedback, over steps, staged or not: the same payloads and residuals, bit for bit.
TEST(TopKCpuSelection, ErrorFeedbackAndStagingGiveTheSameBitsEveryWay) {
  const size_t n = 300007;
  std::vector<std::unique_ptr<Codec>> codecs;
  std::vector<std::unique_ptr<CodecState>> states;
  for (const char* selection : kSelections) {
    codecs.push_back(make_codec(std::string("topk:fraction=0.01,selection=") + selection));
    states.push_back(codecs.back()->make_state(TensorSpec::flat(n)));
  }
  for (int step = 0; step < 5; ++step) {
    SCOPED_TRACE("step " + std::to_string(step));
    const auto x = random_gradient(n, 100 + step);
    std::vector<std::vector<uint8_t>> payloads;
    for (size_t c = 0; c < codecs.size(); ++c) {
      if (step == 2) {  // a discarded attempt, then the kept one
        states[c]->stage();
        encode(*codecs[c], random_gradient(n, 999), *states[c]);
        states[c]->discard_staged();
      }
      if (step >= 3) states[c]->stage();
      payloads.push_back(encode(*codecs[c], x, *states[c]));
      if (step >= 3) states[c]->commit_staged();
    }
    const std::vector<float> residual = states[0]->residual();
    for (size_t c = 1; c < codecs.size(); ++c) {
      SCOPED_TRACE(kSelections[c]);
      ASSERT_EQ(payloads[c], payloads[0]);
      const std::vector<float> r = states[c]->residual();
      ASSERT_EQ(r.size(), n);
      for (size_t i = 0; i < n; ++i) ASSERT_EQ(bits(r[i]), bits(residual[i])) << i;
      EXPECT_EQ(states[c]->stats().sampled_misses, 0u);
    }
  }
}

// Data the CPU's sample cannot see, and ties that overflow its candidates: the sampled selection
// misses, says so in the stats, and the radix select sends the right elements anyway.
TEST(TopKCpuSelection, AMissFallsBackToTheRadixSelect) {
  const size_t n = size_t(1) << 20;
  const uint64_t k = topk_k_of(0.01, n);
  const kc::TopKSamplePlan p = kc::topk_sample_plan(n, k, kc::kTopKCpuSamples);
  std::vector<float> hidden = hidden_from_the_cpu_sample(n, k, 21);
  std::vector<float> ties(n, 0.25f);  // a seventh of the keys tie at the threshold
  for (size_t i = 0; i < n; i += 7) ties[i] = 0.5f;
  // All equal: the radix select's threshold bin is all of v, which it then reads in place.
  std::vector<float> equal(n, 0.125f);
  // Too few keys at or above the bound: 600 large values exactly where the sample looks, tiny
  // ones elsewhere; the sample puts lo among the large ones.
  std::vector<float> few = random_gradient(n, 22, 1e-6f);
  for (uint64_t s = 0; s < 600; ++s) few[math::topk_sample_index(s, n, p.samples)] = 1.0f;
  for (const auto* x : {&hidden, &ties, &equal, &few}) {
    SCOPED_TRACE(x == &hidden ? "hidden" : x == &ties ? "ties" : x == &equal ? "equal" : "few");
    auto codec = make_codec("topk:fraction=0.01,selection=sampled");
    auto state = codec->make_state(TensorSpec::flat(n));
    const auto payload = encode(*codec, *x, *state);
    EXPECT_EQ(state->stats().sampled_misses, 1u);
    EXPECT_EQ(payload_indices(payload, k), sorted_indices(*x, k));
    // The residual is v with what was sent cleared, as on a hit.
    const std::vector<float> r = state->residual();
    const auto sent = payload_indices(payload, k);
    std::vector<float> expected = *x;
    for (uint32_t i : sent) expected[i] = 0.0f;
    for (size_t i = 0; i < n; ++i) ASSERT_EQ(bits(r[i]), bits(expected[i])) << i;
    // Now double-buffered: a NaN late in the gradient is found on this path too, state unchanged.
    std::vector<float> bad = *x;
    bad[n - 2] = std::nanf("");
    std::vector<uint8_t> out(codec->encoded_bytes(state->spec()));
    EXPECT_THROW(codec->encode(view(bad), *state, out), InvalidArgumentError);
    const std::vector<float> after = state->residual();
    for (size_t i = 0; i < n; ++i) ASSERT_EQ(bits(after[i]), bits(r[i])) << i;
  }
}

// selection=auto stops sampling a state that missed for its next 16 encodes, then tries again;
// selection=sampled tries every time. The payloads are the radix select's throughout.
TEST(TopKCpuSelection, AutoBacksOffAfterAMiss) {
  const size_t n = size_t(1) << 20;
  const uint64_t k = topk_k_of(0.01, n);
  const std::vector<float> hidden = hidden_from_the_cpu_sample(n, k, 23);
  const std::vector<uint32_t> expected = sorted_indices(hidden, k);
  auto automatic = make_codec("topk:fraction=0.01,error_feedback=off");
  auto always = make_codec("topk:fraction=0.01,error_feedback=off,selection=sampled");
  auto a = automatic->make_state(TensorSpec::flat(n));
  auto s = always->make_state(TensorSpec::flat(n));
  for (uint64_t step = 1; step <= 18; ++step) {
    SCOPED_TRACE("encode " + std::to_string(step));
    ASSERT_EQ(payload_indices(encode(*automatic, hidden, *a), k), expected);
    ASSERT_EQ(payload_indices(encode(*always, hidden, *s), k), expected);
    EXPECT_EQ(a->stats().sampled_misses, step < 18 ? 1u : 2u);  // encodes 2..17 took the radix way
    EXPECT_EQ(s->stats().sampled_misses, step);
  }
}

// The back-off is state like the residual: a discarded attempt, a refused gradient and reset()
// leave or put it back, so the next encode samples (and misses) again, as a fresh state would.
TEST(TopKCpuSelection, BackOffAfterADiscardedAttemptOrARefusedGradientIsUndone) {
  const size_t n = size_t(1) << 20;
  const uint64_t k = topk_k_of(0.01, n);
  const std::vector<float> hidden = hidden_from_the_cpu_sample(n, k, 23);
  auto codec = make_codec("topk:fraction=0.01");
  auto state = codec->make_state(TensorSpec::flat(n));
  state->stage();
  (void)encode(*codec, hidden, *state);  // misses: would skip sampling for the next 16 encodes
  state->discard_staged();
  EXPECT_EQ(state->stats().sampled_misses, 0u);
  (void)encode(*codec, hidden, *state);
  EXPECT_EQ(state->stats().sampled_misses, 1u) << "the discarded attempt's back-off was kept";
  state->reset();
  (void)encode(*codec, hidden, *state);
  EXPECT_EQ(state->stats().sampled_misses, 1u) << "reset() kept the back-off";
  // A gradient refused for a NaN (after the selection missed and found it) leaves it too.
  auto fresh = codec->make_state(TensorSpec::flat(n));
  (void)encode(*codec, std::vector<float>(n, 0.0f), *fresh);  // the next encode is double-buffered
  std::vector<float> bad = hidden;
  bad[n / 2] = std::nanf("");
  std::vector<uint8_t> out(codec->encoded_bytes(fresh->spec()));
  EXPECT_THROW(codec->encode(view(bad), *fresh, out), InvalidArgumentError);
  (void)encode(*codec, hidden, *fresh);
  EXPECT_EQ(fresh->stats().sampled_misses, 1u) << "the refused encode's back-off was kept";
}

// The radix way on v itself (its threshold bin is more than a quarter of v), with error
// feedback, over three encodes: the residual is v with what was sent cleared.
TEST(TopKCpuSelection, RadixInPlaceKeepsTheResidual) {
  const size_t n = 4099;
  const uint64_t k = topk_k_of(0.01, n);
  std::vector<float> x(n, 0.25f);
  for (size_t i = 0; i < n; i += 5) x[i] = 0.2578125f;  // same top-digit bin as 0.25
  auto codec = make_codec("topk:fraction=0.01,selection=radix");
  auto state = codec->make_state(TensorSpec::flat(n));
  std::vector<float> v = x;  // the residual starts at 0
  for (int step = 0; step < 3; ++step) {
    SCOPED_TRACE("step " + std::to_string(step));
    const auto sent = payload_indices(encode(*codec, x, *state), k);
    ASSERT_EQ(sent, sorted_indices(v, k));
    for (uint32_t i : sent) v[i] = 0.0f;
    const std::vector<float> r = state->residual();
    for (size_t i = 0; i < n; ++i) ASSERT_EQ(bits(r[i]), bits(v[i])) << i;
    for (size_t i = 0; i < n; ++i) v[i] += x[i];  // the next step's v
  }
}

}  // namespace
