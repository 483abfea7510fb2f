// The codecs' CPU paths (the reference implementation): round trips and error bounds per codec
// over shapes (empty, one element, smaller than a block, odd, 2-D and 3-D), fp16/bf16 bit
// equality with collective/half.h and clamp counting, NaN/Inf rejection that leaves the state
// alone, determinism, error feedback over many steps, stochastic rounding, PowerSGD on a
// low-rank matrix, and argument errors.
#include <gtest/gtest.h>

#include <algorithm>
#include <numeric>

#include "collective/half.h"
#include "compress/helpers.h"
#include "kernels/runtime.h"

using namespace meshtrain;
using namespace meshtrain::compress;
using namespace meshtrain::compress::testing;

namespace {

// ---------------------------------------------------------------------------------------------
// Round trips over codecs x shapes.
struct Case {
  std::string spec;
  std::vector<size_t> shape;
};
void PrintTo(const Case& c, std::ostream* os) {
  *os << c.spec << " shape {";
  for (size_t i = 0; i < c.shape.size(); ++i) *os << (i ? ", " : "") << c.shape[i];
  *os << "}";
}

std::vector<Case> round_trip_cases() {
  std::vector<std::vector<size_t>> shapes = {{0}, {1}, {7}, {255}, {256}, {257}, {4097}, {65537},
                                             {64, 48}, {33, 31}, {3, 5, 7}, {1, 300}};
  std::vector<Case> cases;
  for (const auto& spec : all_codec_specs())
    for (const auto& shape : shapes) cases.push_back({spec, shape});
  return cases;
}

class RoundTrip : public ::testing::TestWithParam<Case> {};

// The expected decoded value of each element after one encode from a zero residual, and the
// bound on |decoded - input| the codec promises, checked in double.
TEST_P(RoundTrip, SizeHeaderAndErrorBound) {
  const Case& c = GetParam();
  auto codec = make_codec(c.spec);
  TensorSpec spec{c.shape};
  auto state = codec->make_state(spec);
  const size_t n = spec.count();
  auto grad = random_gradient(n, 1000 + n);

  auto payload = encode(*codec, grad, *state);
  EXPECT_EQ(payload.size(), codec->encoded_bytes(spec));
  PayloadInfo info = inspect_payload(payload);
  EXPECT_EQ(info.codec, codec->id());
  EXPECT_EQ(info.count, n);
  EXPECT_EQ(info.bytes, payload.size());
  EXPECT_EQ(state->stats().encodes, 1u);
  EXPECT_EQ(state->stats().last_payload_bytes, payload.size());

  auto out = decode(*codec, payload, n);
  switch (codec->id()) {
    case CodecId::None:
      for (size_t i = 0; i < n; ++i) ASSERT_EQ(bits(out[i]), bits(grad[i])) << i;
      break;
    case CodecId::Fp16:
      for (size_t i = 0; i < n; ++i)
        ASSERT_EQ(bits(out[i]), bits(collective::half_to_float(collective::float_to_half(grad[i])))) << i;
      break;
    case CodecId::Bf16:
      for (size_t i = 0; i < n; ++i)
        ASSERT_EQ(bits(out[i]), bits(collective::bf16_to_float(collective::float_to_bf16(grad[i])))) << i;
      break;
    case CodecId::Int8: {
      const size_t block = info.param_a;
      const bool stochastic = info.flags == 1;
      for (size_t b = 0; b * block < n; ++b) {
        double absmax = 0;
        for (size_t i = b * block; i < std::min(n, (b + 1) * block); ++i)
          absmax = std::max(absmax, std::fabs(double(grad[i])));
        const double scale = absmax / 127.0;
        const double bound = (stochastic ? 1.0 : 0.5) * scale * (1 + 1e-5) + 1e-30;
        for (size_t i = b * block; i < std::min(n, (b + 1) * block); ++i)
          ASSERT_LE(std::fabs(double(out[i]) - grad[i]), bound) << "element " << i << " block " << b;
      }
      break;
    }
    case CodecId::TopK: {
      // Reference: sort by (|v| descending, index ascending), keep k.
      const size_t k = info.param_a;
      std::vector<size_t> order(n);
      std::iota(order.begin(), order.end(), 0);
      std::stable_sort(order.begin(), order.end(),
                       [&](size_t a, size_t b) { return std::fabs(grad[a]) > std::fabs(grad[b]); });
      std::vector<float> expected(n, 0.0f);
      for (size_t j = 0; j < k; ++j) expected[order[j]] = grad[order[j]];
      for (size_t i = 0; i < n; ++i) ASSERT_EQ(out[i], expected[i]) << i;
      if (n > 0) {
        EXPECT_GE(k, 1u);
        EXPECT_LE(k, n);
      }
      break;
    }
    case CodecId::PowerSgd: {
      if (info.flags == 1) {  // uncompressed fallback
        for (size_t i = 0; i < n; ++i) ASSERT_EQ(bits(out[i]), bits(grad[i])) << i;
        EXPECT_TRUE(state->residual().empty());
        break;
      }
      // Rank-r approximation of noise: no elementwise bound, but the error feedback makes
      // decoded + residual = grad (up to the rounding of one subtraction per element).
      auto r = state->residual();
      ASSERT_EQ(r.size(), n);
      for (size_t i = 0; i < n; ++i) ASSERT_NEAR(double(out[i]) + r[i], grad[i], 1e-6) << i;
      break;
    }
  }

  // decode_accumulate adds exactly what decode produced.
  auto base = random_gradient(n, 7);
  auto acc = base;
  codec->decode_accumulate(payload, view(acc));
  for (size_t i = 0; i < n; ++i) ASSERT_EQ(bits(acc[i]), bits(base[i] + out[i])) << i;

  // Error feedback: decoded + residual == grad + 0 (the first step's residual starts at zero),
  // up to the rounding of the residual's subtraction (at most half an ulp of a block's scale).
  auto r = state->residual();
  double absmax = 0;
  for (float v : grad) absmax = std::max(absmax, std::fabs(double(v)));
  if (!r.empty() && codec->id() != CodecId::PowerSgd)
    for (size_t i = 0; i < n; ++i) ASSERT_NEAR(double(out[i]) + r[i], grad[i], 1e-7 * absmax) << i;
}

// Same inputs, fresh states: identical bytes (what a compressed all-reduce relies on).
TEST_P(RoundTrip, EncodingIsDeterministic) {
  const Case& c = GetParam();
  auto codec = make_codec(c.spec);
  TensorSpec spec{c.shape};
  auto s1 = codec->make_state(spec), s2 = codec->make_state(spec);
  for (uint64_t step = 0; step < 3; ++step) {
    auto grad = random_gradient(spec.count(), 50 + step);
    EXPECT_EQ(encode(*codec, grad, *s1), encode(*codec, grad, *s2)) << "step " << step;
  }
}

// A clone is a snapshot: encoding from it repeats the original's bytes and residual, and the
// two states no longer share anything (the compressed all-reduce's retry relies on this).
TEST_P(RoundTrip, CloneReplaysTheSameEncodeAndIsIndependent) {
  const Case& c = GetParam();
  auto codec = make_codec(c.spec);
  TensorSpec spec{c.shape};
  auto state = codec->make_state(spec);
  encode(*codec, random_gradient(spec.count(), 70), *state);  // some residual, Q, counter
  auto snapshot = state->clone();
  EXPECT_EQ(snapshot->residual(), state->residual());
  EXPECT_EQ(snapshot->stats().encodes, state->stats().encodes);
  auto grad = random_gradient(spec.count(), 71);
  auto first = encode(*codec, grad, *state);
  EXPECT_EQ(encode(*codec, grad, *snapshot), first) << "the clone encodes differently";
  EXPECT_EQ(snapshot->residual(), state->residual());
  // Advancing one leaves the other as it was.
  auto before = snapshot->residual();
  encode(*codec, random_gradient(spec.count(), 72), *state);
  EXPECT_EQ(snapshot->residual(), before);
}

INSTANTIATE_TEST_SUITE_P(Codecs, RoundTrip, ::testing::ValuesIn(round_trip_cases()),
                         [](const ::testing::TestParamInfo<Case>& info) {
                           std::string name = test_name(info.param.spec);
                           for (size_t d : info.param.shape) name += "_" + std::to_string(d);
                           return name;
                         });

// ---------------------------------------------------------------------------------------------
// fp16 / bf16 conversions and clamping.

TEST(Fp16, EveryFiniteHalfDecodesLikeTheReference) {
  auto codec = make_fp16_codec();
  std::vector<uint8_t> payload(codec->encoded_bytes(65536));
  // Build a payload holding every 16-bit pattern by encoding, then overwrite the body.
  auto state = codec->make_state(TensorSpec::flat(65536));
  std::vector<float> zeros(65536, 0.0f);
  codec->encode(view(zeros), *state, payload);
  std::vector<uint16_t> all;
  for (uint32_t h = 0; h < 65536; ++h)
    if ((h & 0x7c00u) != 0x7c00u) all.push_back(static_cast<uint16_t>(h));
  payload.resize(kPayloadHeaderBytes + 2 * all.size());
  uint64_t count = all.size();
  std::memcpy(payload.data() + 8, &count, 8);
  std::memcpy(payload.data() + kPayloadHeaderBytes, all.data(), 2 * all.size());
  auto out = decode(*codec, payload, all.size());
  for (size_t i = 0; i < all.size(); ++i)
    ASSERT_EQ(bits(out[i]), bits(collective::half_to_float(all[i]))) << std::hex << all[i];
}

// Random bit patterns over the whole finite float range (normal, subnormal in fp16, tiny,
// huge): the vectorised encoder equals half.h's scalar one wherever no clamp happens.
TEST(Fp16, RandomFloatsEncodeLikeTheReference) {
  std::mt19937 rng(11);
  const size_t n = 1 << 20;
  std::vector<float> x(n);
  for (size_t i = 0; i < n; ++i) {
    uint32_t b = rng();
    if (i % 2 == 0) b = (b & 0x807fffffu) | ((100u + rng() % 45u) << 23);  // near fp16's range
    if ((b & 0x7f800000u) == 0x7f800000u) b ^= 0x40000000u;                 // keep it finite
    x[i] = collective::bits_to_float(b);
  }
  auto codec = make_fp16_codec();
  auto state = codec->make_state(TensorSpec::flat(n));
  auto payload = encode(*codec, x, *state);
  uint64_t clamped = 0, flushed = 0;
  for (size_t i = 0; i < n; ++i) {
    uint16_t got;
    std::memcpy(&got, payload.data() + kPayloadHeaderBytes + 2 * i, 2);
    uint16_t expected = collective::float_to_half(x[i]);
    if (std::fabs(x[i]) >= 65520.0f) {
      expected = static_cast<uint16_t>((expected & 0x8000u) | 0x7bffu);
      ++clamped;
    } else if (x[i] != 0.0f && (expected & 0x7fffu) == 0) {
      ++flushed;
    }
    ASSERT_EQ(got, expected) << std::hexfloat << x[i];
  }
  EXPECT_EQ(state->stats().last_clamped, clamped);
  EXPECT_EQ(state->stats().last_flushed, flushed);
  EXPECT_GT(clamped, 0u);
  EXPECT_GT(flushed, 0u);
}

TEST(Fp16, OutOfRangeValuesAreClampedAndCounted) {
  auto codec = make_fp16_codec();
  std::vector<float> x = {70000.0f, -1e10f, 65519.0f, 65520.0f, 1e-9f, 0.0f, -0.0f, 1.0f, -65504.0f};
  auto state = codec->make_state(TensorSpec::flat(x.size()));
  auto out = decode(*codec, encode(*codec, x, *state), x.size());
  EXPECT_EQ(out[0], 65504.0f);
  EXPECT_EQ(out[1], -65504.0f);
  EXPECT_EQ(out[2], 65504.0f);  // rounds to the largest value: not a clamp
  EXPECT_EQ(out[3], 65504.0f);  // would round to Inf: clamped
  EXPECT_EQ(out[4], 0.0f);
  EXPECT_EQ(out[7], 1.0f);
  EXPECT_EQ(out[8], -65504.0f);
  EXPECT_EQ(state->stats().last_clamped, 3u);
  EXPECT_EQ(state->stats().last_flushed, 1u);
  encode(*codec, x, *state);
  EXPECT_EQ(state->stats().total_clamped, 6u);
  EXPECT_EQ(state->stats().total_flushed, 2u);
  EXPECT_EQ(state->stats().encodes, 2u);
}

TEST(Bf16, OutOfRangeValuesAreClampedAndCounted) {
  auto codec = make_bf16_codec();
  const float max = std::numeric_limits<float>::max();
  const float bf16_max = collective::bf16_to_float(0x7f7f);
  std::vector<float> x = {max, -max, bf16_max, 1e-45f, 1.0f, 3.0e38f, 0.0f};
  auto state = codec->make_state(TensorSpec::flat(x.size()));
  auto out = decode(*codec, encode(*codec, x, *state), x.size());
  EXPECT_EQ(out[0], bf16_max);
  EXPECT_EQ(out[1], -bf16_max);
  EXPECT_EQ(out[2], bf16_max);
  EXPECT_EQ(out[3], 0.0f);
  EXPECT_EQ(out[4], 1.0f);
  EXPECT_EQ(state->stats().last_clamped, 2u);
  EXPECT_EQ(state->stats().last_flushed, 1u);
}

// ---------------------------------------------------------------------------------------------
// NaN / Inf: rejected with the element's index, state untouched.

class NonFinite : public ::testing::TestWithParam<std::string> {};

TEST_P(NonFinite, RejectedNamingTheElementAndStateUnchanged) {
  auto codec = make_codec(GetParam());
  TensorSpec spec{{40, 25}};
  auto state = codec->make_state(spec);
  auto grad = random_gradient(spec.count(), 3);
  auto first = encode(*codec, grad, *state);  // a non-zero residual to protect
  const auto residual = state->residual();
  const auto stats = state->stats();
  for (float bad : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity(),
                    -std::numeric_limits<float>::infinity()}) {
    auto g = grad;
    g[517] = bad;
    g[900] = bad;
    std::vector<uint8_t> out(codec->encoded_bytes(spec));
    try {
      codec->encode(view(g), *state, out);
      FAIL() << "no error for " << bad;
    } catch (const InvalidArgumentError& e) {
      EXPECT_NE(std::string(e.what()).find("element 517 of 1000"), std::string::npos) << e.what();
    }
    EXPECT_EQ(state->residual(), residual);
    EXPECT_EQ(state->stats().encodes, stats.encodes);
  }
  // The state still works and continues where it was.
  auto s2 = codec->make_state(spec);
  encode(*codec, grad, *s2);
  auto grad2 = random_gradient(spec.count(), 4);
  EXPECT_EQ(encode(*codec, grad2, *state), encode(*codec, grad2, *s2));
}

INSTANTIATE_TEST_SUITE_P(Codecs, NonFinite, ::testing::ValuesIn(all_codec_specs()),
                         [](const auto& info) { return test_name(info.param); });

// ---------------------------------------------------------------------------------------------
// Error feedback: the sum of what was decoded over T steps converges to the sum of the inputs;
// the difference is the final residual, which stays bounded. Without error feedback the
// difference grows with T (checked, so that this test can fail).

struct FeedbackRun {
  double max_residual = 0;       // max |residual| at the end
  double max_sum_error = 0;      // max |sum decoded - sum inputs|
  double max_telescope_gap = 0;  // max |sum decoded + residual - sum inputs|
};

FeedbackRun run_feedback(const std::string& spec_text, size_t n, int steps) {
  auto codec = make_codec(spec_text);
  auto state = codec->make_state(TensorSpec::flat(n));
  std::vector<double> sum_in(n, 0), sum_out(n, 0);
  std::mt19937_64 rng(99);
  std::normal_distribution<float> noise(0.0f, 1.0f);
  std::vector<float> bias(n);
  for (auto& b : bias) b = noise(rng) * 0.5f;  // a persistent direction, as real gradients have
  for (int t = 0; t < steps; ++t) {
    std::vector<float> g(n);
    for (size_t i = 0; i < n; ++i) g[i] = bias[i] + noise(rng);
    auto out = decode(*codec, encode(*codec, g, *state), n);
    for (size_t i = 0; i < n; ++i) {
      sum_in[i] += g[i];
      sum_out[i] += out[i];
    }
  }
  FeedbackRun run;
  auto r = state->residual();
  for (size_t i = 0; i < n; ++i) {
    const double res = r.empty() ? 0.0 : r[i];
    run.max_residual = std::max(run.max_residual, std::fabs(res));
    run.max_sum_error = std::max(run.max_sum_error, std::fabs(sum_out[i] - sum_in[i]));
    run.max_telescope_gap = std::max(run.max_telescope_gap, std::fabs(sum_out[i] + res - sum_in[i]));
  }
  return run;
}

TEST(ErrorFeedback, Int8SumOfDecodedConvergesToSumOfInputs) {
  const size_t n = 3000;
  auto with = run_feedback("int8:block_size=256", n, 400);
  auto without = run_feedback("int8:block_size=256,error_feedback=off", n, 400);
  // Residual: at most half a quantum, a quantum being max|v| / 127 (|v| < ~6 here).
  EXPECT_LT(with.max_residual, 6.0 / 127);
  EXPECT_LT(with.max_sum_error, 6.0 / 127);
  EXPECT_LT(with.max_telescope_gap, 1e-3);
  // Without feedback the rounding errors accumulate (a random walk, ~sqrt(T) quanta).
  EXPECT_GT(without.max_sum_error, 5 * with.max_sum_error);
}

TEST(ErrorFeedback, Int8StochasticSumConverges) {
  auto with = run_feedback("int8:block_size=128,rounding=stochastic,seed=5", 2000, 300);
  EXPECT_LT(with.max_residual, 2 * 6.0 / 127);
  EXPECT_LT(with.max_telescope_gap, 1e-3);
}

TEST(ErrorFeedback, TopKSumOfDecodedConvergesToSumOfInputs) {
  const size_t n = 2000;
  const int steps = 600;
  auto with = run_feedback("topk:fraction=0.05", n, steps);
  auto without = run_feedback("topk:fraction=0.05,error_feedback=off", n, steps);
  EXPECT_LT(with.max_telescope_gap, 1e-3);
  // Every element is eventually sent: the residual stays bounded (here ~ the magnitude that
  // makes an element reach the top 5%), far below what 600 steps of bias add up to.
  EXPECT_LT(with.max_residual, 40.0);
  EXPECT_LT(with.max_sum_error, 40.0);
  EXPECT_GT(without.max_sum_error, 5 * with.max_sum_error);
  // The mean over steps converges: error of the mean = residual / T.
  EXPECT_LT(with.max_sum_error / steps, 0.07);
}

// ---------------------------------------------------------------------------------------------
// Top-k ties and selection details.

TEST(TopK, TiesGoToTheLowerIndexAndIndicesAscend) {
  auto codec = make_topk_codec({.fraction = 0.3, .error_feedback = false});
  std::vector<float> x = {1, -2, 2, 0, -2, 2, 1, 0.5f, -0.0f, 2};  // k = 3 of 10
  auto state = codec->make_state(TensorSpec::flat(x.size()));
  auto payload = encode(*codec, x, *state);
  ASSERT_EQ(inspect_payload(payload).param_a, 3u);
  std::vector<uint32_t> idx(3);
  std::memcpy(idx.data(), payload.data() + kPayloadHeaderBytes, 12);
  EXPECT_EQ(idx, (std::vector<uint32_t>{1, 2, 4}));  // five ties at |2|: the first three
  auto out = decode(*codec, payload, x.size());
  EXPECT_EQ(out, (std::vector<float>{0, -2, 2, 0, -2, 0, 0, 0, 0, 0}));
}

TEST(TopK, AllEqualAndAllZeroInputs) {
  for (float v : {0.0f, 1.5f}) {
    auto codec = make_topk_codec({.fraction = 0.01});
    std::vector<float> x(1000, v);
    auto state = codec->make_state(TensorSpec::flat(x.size()));
    auto out = decode(*codec, encode(*codec, x, *state), x.size());
    for (size_t i = 0; i < 10; ++i) EXPECT_EQ(out[i], v);
    for (size_t i = 10; i < x.size(); ++i) ASSERT_EQ(out[i], 0.0f);
  }
}

TEST(TopK, KIsTheCeilingOfFractionTimesCount) {
  EXPECT_EQ(topk_k_of(0.07, 100), 7u);  // 0.07 * 100 is 7.000000000000001 in double: still 7
  EXPECT_EQ(topk_k_of(0.01, 1), 1u);
  EXPECT_EQ(topk_k_of(0.5, 3), 2u);
  EXPECT_EQ(topk_k_of(1.0, 5), 5u);
  EXPECT_EQ(topk_k_of(0.001, 1000001), 1001u);
  EXPECT_EQ(topk_k_of(0.01, 0), 0u);
  // 3221225471.25: a ceiling, however large the product (a tolerance relative to it rounded).
  EXPECT_EQ(topk_k_of(0.75, 4294967295), 3221225472u);
  EXPECT_EQ(topk_k_of(0.5, 1000000001), 500000001u);
}

// ---------------------------------------------------------------------------------------------
// Stochastic rounding: reproducible from the seed, unbiased without error feedback.

TEST(Int8, StochasticRoundingIsSeededAndUnbiased) {
  const size_t n = 512;
  auto grad = random_gradient(n, 21, 1.0f);
  auto a = make_int8_codec({.rounding = Rounding::Stochastic, .seed = 1, .error_feedback = false});
  auto b = make_int8_codec({.rounding = Rounding::Stochastic, .seed = 2, .error_feedback = false});
  auto sa = a->make_state(TensorSpec::flat(n)), sa2 = a->make_state(TensorSpec::flat(n));
  auto sb = b->make_state(TensorSpec::flat(n));
  EXPECT_EQ(encode(*a, grad, *sa), encode(*a, grad, *sa2));
  EXPECT_NE(encode(*a, grad, *sa), encode(*b, grad, *sb));
  // The noise changes with every encode (step counter), so the mean converges to the input.
  std::vector<double> mean(n, 0);
  const int steps = 4000;
  auto s = a->make_state(TensorSpec::flat(n));
  for (int t = 0; t < steps; ++t) {
    auto out = decode(*a, encode(*a, grad, *s), n);
    for (size_t i = 0; i < n; ++i) mean[i] += out[i] / steps;
  }
  double absmax = 0;
  for (float v : grad) absmax = std::max(absmax, std::fabs(double(v)));
  const double quantum = absmax / 127;
  size_t outside = 0;
  for (size_t i = 0; i < n; ++i)  // std of one draw <= quantum / 2; of the mean / sqrt(steps)
    outside += std::fabs(mean[i] - grad[i]) > 4 * 0.5 * quantum / std::sqrt(double(steps));
  EXPECT_LE(outside, 2u);
  // Nearest rounding, by contrast, is biased by up to half a quantum.
  auto nearest = make_int8_codec({.error_feedback = false});
  auto sn = nearest->make_state(TensorSpec::flat(n));
  auto out = decode(*nearest, encode(*nearest, grad, *sn), n);
  double max_bias = 0;
  for (size_t i = 0; i < n; ++i) max_bias = std::max(max_bias, std::fabs(double(out[i]) - grad[i]));
  EXPECT_GT(max_bias, 0.3 * quantum);
}

// A block whose absmax is FLT_MAX: its scale is the largest whose 127 quanta stay finite, so
// the decoded values and the residual stay finite (FLT_MAX / 127 rounds up; 127 x it is Inf).
TEST(Int8, LargestFiniteValuesDecodeFinite) {
  const float max = std::numeric_limits<float>::max();
  for (const char* spec : {"int8", "int8:rounding=stochastic", "int8:error_feedback=off"}) {
    auto codec = make_codec(spec);
    std::vector<float> x(300, 1.0f);
    x[3] = max;
    x[200] = -max;
    x[299] = max;  // a block of its own (44 elements)
    auto state = codec->make_state(TensorSpec::flat(x.size()));
    std::vector<float> out = decode(*codec, encode(*codec, x, *state), x.size());
    for (size_t i = 0; i < out.size(); ++i) ASSERT_TRUE(std::isfinite(out[i])) << spec << " element " << i;
    EXPECT_EQ(out[3], 3.4028233e38f) << spec;
    EXPECT_EQ(out[200], -3.4028233e38f) << spec;
    for (float r : state->residual()) ASSERT_TRUE(std::isfinite(r)) << spec;
    // The next step sends what the residual kept (FLT_MAX - 3.4028233e38 = 2^104).
    const std::vector<float> ones(x.size(), 1.0f);
    out = decode(*codec, encode(*codec, ones, *state), x.size());
    for (size_t i = 0; i < out.size(); ++i) ASSERT_TRUE(std::isfinite(out[i])) << spec << " element " << i;
  }
}

TEST(Int8, AllZeroBlockAndSingleElementBlocks) {
  auto codec = make_int8_codec({.block_size = 1});
  std::vector<float> x = {0.0f, 3.0f, -1e-30f, 5e20f};
  auto state = codec->make_state(TensorSpec::flat(x.size()));
  auto out = decode(*codec, encode(*codec, x, *state), x.size());
  for (size_t i = 0; i < x.size(); ++i) EXPECT_NEAR(out[i], x[i], std::fabs(x[i]) * 1e-6) << i;
}

// A block whose absmax is below 2^-120 (where 127 / absmax overflows) is sent as zeros and its
// residual keeps the values, exactly. Before, non-zero elements went out as +-127 quanta and
// zeros became NaN residuals, after which the block decoded to 0 forever: what a block left
// without gradient decays to under error feedback.
TEST(Int8, TinyBlocksAreSentAsZerosAndKeptInTheResidual) {
  for (const char* spec : {"int8:block_size=4", "int8:block_size=4,rounding=stochastic,seed=2"}) {
    SCOPED_TRACE(spec);
    auto codec = make_codec(spec);
    const std::vector<float> tiny = {1e-37f, 0.0f, 5e-38f, -2e-38f, 0x1p-121f, -0x1p-122f, 0.0f, 0.0f};
    auto state = codec->make_state(TensorSpec::flat(tiny.size()));
    EXPECT_EQ(decode(*codec, encode(*codec, tiny, *state), tiny.size()), std::vector<float>(tiny.size(), 0.0f));
    EXPECT_EQ(state->residual(), tiny);
  }
  // Decay: one gradient, then none for 40 steps; the residual shrinks ~254x a step but stays
  // finite, and the block still carries a later gradient.
  auto codec = make_codec("int8");
  const size_t n = 1024;
  auto state = codec->make_state(TensorSpec::flat(n));
  std::vector<float> grad(n);
  for (size_t i = 0; i < n; ++i) grad[i] = 1e-3f * std::sin(0.37f * static_cast<float>(i));
  encode(*codec, grad, *state);
  const std::vector<float> zeros(n, 0.0f);
  for (int step = 0; step < 40; ++step) {
    encode(*codec, zeros, *state);
    for (float r : state->residual()) ASSERT_TRUE(std::isfinite(r)) << "step " << step;
  }
  std::vector<float> one(n, 0.0f);
  one[0] = 1.0f;
  EXPECT_NEAR(decode(*codec, encode(*codec, one, *state), n)[0], 1.0f, 1.0f / 254);
}

// A state encoded before writes its next residual into a second buffer (double buffering,
// lib/compress/int8.cpp) and a state's first encode updates it in place after a scan: both
// must give the same bytes. A state kept across steps is compared with a fresh clone of a
// twin per step (the compressed all-reduce's pattern, always the first-encode path), over
// odd sizes up to 4 MiB and a block over the 4096-element chunk (in place every time).
class Int8Paths : public ::testing::TestWithParam<std::string> {};

TEST_P(Int8Paths, KeptStateAndFreshClonesEncodeTheSameBytes) {
  auto codec = make_codec(GetParam());
  for (size_t n : {size_t(1), size_t(1000), size_t(100003), (size_t(1) << 20) + 3}) {
    auto kept = codec->make_state(TensorSpec::flat(n));
    auto twin = codec->make_state(TensorSpec::flat(n));
    for (uint64_t step = 0; step < 4; ++step) {
      auto grad = random_gradient(n, 100 + step);
      auto clone = twin->clone();
      ASSERT_EQ(encode(*codec, grad, *kept), encode(*codec, grad, *clone)) << "n " << n << " step " << step;
      twin = std::move(clone);
      ASSERT_EQ(kept->residual(), twin->residual()) << "n " << n << " step " << step;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Int8, Int8Paths,
                         ::testing::Values("int8", "int8:block_size=64,rounding=stochastic,seed=3",
                                           "int8:block_size=1000", "int8:block_size=5000"),
                         [](const auto& info) { return test_name(info.param); });

// Staged encodes (CodecState::stage, what the compressed all-reduce's attempts use): a failed
// attempt (staged encode, discarded) and a retry that encodes twice before committing give
// the bytes, residual and counters of a single encode on a plain state, step after step; the
// committed state does not move while staged; a staged encode that throws leaves nothing to
// commit. Sizes cover the double-buffered and (block_size=5000) the in-place int8 loops.
class Staged : public ::testing::TestWithParam<std::string> {};

TEST_P(Staged, FailedAttemptThenRetryEqualsOneEncode) {
  auto codec = make_codec(GetParam());
  for (size_t n : {size_t(1), size_t(1000), size_t(100003)}) {
    auto staged = codec->make_state(TensorSpec::flat(n));
    auto plain = codec->make_state(TensorSpec::flat(n));
    for (uint64_t step = 0; step < 4; ++step) {
      auto grad = random_gradient(n, 300 + step);
      const auto expected = encode(*codec, grad, *plain);
      const auto committed = staged->residual();
      const uint64_t encodes = staged->stats().encodes;
      // The failed attempt: encoded, then discarded.
      staged->stage();
      encode(*codec, random_gradient(n, 900 + step), *staged);
      EXPECT_EQ(staged->residual(), committed) << "a staged encode changed the committed residual";
      staged->discard_staged();
      EXPECT_FALSE(staged->staging());
      // The retry: a first try replaced by a second, a rejected gradient, then committed.
      staged->stage();
      encode(*codec, random_gradient(n, 1900 + step), *staged);
      ASSERT_EQ(encode(*codec, grad, *staged), expected) << "n " << n << " step " << step;
      EXPECT_EQ(staged->stats().encodes, encodes);
      staged->commit_staged();
      ASSERT_EQ(staged->residual(), plain->residual()) << "n " << n << " step " << step;
      EXPECT_EQ(staged->stats().encodes, plain->stats().encodes);
      EXPECT_EQ(staged->stats().last_payload_bytes, plain->stats().last_payload_bytes);
    }
    // A staged encode that throws: committing afterwards keeps the state as it was.
    auto bad = random_gradient(n, 5);
    bad[n / 2] = std::nanf("");
    const auto before = staged->residual();
    const uint64_t encodes = staged->stats().encodes;
    staged->stage();
    EXPECT_THROW(encode(*codec, bad, *staged), InvalidArgumentError);
    staged->commit_staged();
    EXPECT_EQ(staged->residual(), before);
    EXPECT_EQ(staged->stats().encodes, encodes);
    auto grad = random_gradient(n, 6);
    EXPECT_EQ(encode(*codec, grad, *staged), encode(*codec, grad, *plain)) << "n " << n;
    EXPECT_EQ(staged->residual(), plain->residual());
  }
}

INSTANTIATE_TEST_SUITE_P(Codecs, Staged,
                         ::testing::Values("none", "fp16", "bf16", "int8",
                                           "int8:block_size=64,rounding=stochastic,seed=3", "int8:block_size=5000",
                                           "int8:block_size=1000,error_feedback=off", "topk:fraction=0.1",
                                           "topk:fraction=0.01,selection=radix", "topk:fraction=0.003",
                                           "topk:fraction=0.001,error_feedback=off"),
                         [](const auto& info) { return test_name(info.param); });

// powersgd_copy_state makes a used state into what clone() would give, in its own memory:
// later encodes from the copy and from a clone give the same bytes, residual and counters;
// states of other settings are refused.
TEST(PowerSgd, CopyStateIntoAUsedStateEqualsAClone) {
  auto codec = make_codec("powersgd:rank=3,seed=4");
  const TensorSpec spec{{60, 45}};
  const size_t n = 60 * 45;
  auto from = codec->make_state(spec);
  auto into = codec->make_state(spec);
  for (uint64_t step = 0; step < 3; ++step) encode(*codec, random_gradient(n, 30 + step), *from);
  encode(*codec, random_gradient(n, 50), *into);  // something else in its memory
  powersgd_copy_state(*from, *into);
  auto clone = from->clone();
  EXPECT_EQ(into->residual(), clone->residual());
  EXPECT_EQ(into->stats().encodes, clone->stats().encodes);
  for (uint64_t step = 0; step < 2; ++step) {
    const auto grad = random_gradient(n, 60 + step);
    ASSERT_EQ(encode(*codec, grad, *into), encode(*codec, grad, *clone)) << "step " << step;
    EXPECT_EQ(into->residual(), clone->residual()) << "step " << step;
  }
  auto other_seed = make_codec("powersgd:rank=3,seed=5")->make_state(spec);
  EXPECT_THROW(powersgd_copy_state(*from, *other_seed), InvalidArgumentError);
  auto other_shape = codec->make_state(TensorSpec{{45, 60}});
  EXPECT_THROW(powersgd_copy_state(*from, *other_shape), InvalidArgumentError);
  auto int8 = make_codec("int8")->make_state(spec);
  EXPECT_THROW(powersgd_copy_state(*from, *int8), InvalidArgumentError);
}

TEST(PowerSgd, StatesDoNotStage) {
  auto codec = make_codec("powersgd:rank=2");
  auto state = codec->make_state(TensorSpec{{64, 48}});
  EXPECT_THROW(state->stage(), InvalidArgumentError);
  EXPECT_FALSE(state->staging());
}

// NaN/Inf found late: the double-buffered encodes (int8's loop, top-k's selections) have
// already formed everything before it, so the old residual must come out untouched because it
// was never written. The bad element in the first, a middle and the last block of 4 MiB.
TEST(DoubleBuffered, NonFiniteFoundLateLeavesTheStateUnchanged) {
  for (const char* spec : {"int8", "topk:fraction=0.01", "topk:fraction=0.01,selection=radix",
                           "topk:fraction=0.001,error_feedback=off"}) {
    SCOPED_TRACE(spec);
    auto codec = make_codec(spec);
    const size_t n = (size_t(1) << 20) + 5;
    auto state = codec->make_state(TensorSpec::flat(n));
    auto grad = random_gradient(n, 8);
    encode(*codec, grad, *state);
    encode(*codec, random_gradient(n, 9), *state);  // now double-buffered, next buffer in use once
    const auto residual = state->residual();
    const auto encodes = state->stats().encodes;
    for (size_t at : {size_t(3), n / 2 + 1, n - 1}) {
      for (float bad : {std::numeric_limits<float>::quiet_NaN(), -std::numeric_limits<float>::infinity()}) {
        auto g = grad;
        g[at] = bad;
        std::vector<uint8_t> out(codec->encoded_bytes(state->spec()));
        try {
          codec->encode(view(g), *state, out);
          FAIL() << "no error for " << bad << " at " << at;
        } catch (const InvalidArgumentError& e) {
          EXPECT_NE(std::string(e.what()).find("element " + std::to_string(at) + " of " + std::to_string(n)),
                    std::string::npos)
              << e.what();
        }
        ASSERT_EQ(state->residual(), residual) << at;
        EXPECT_EQ(state->stats().encodes, encodes);
      }
    }
    // It continues exactly as a state that never saw the bad gradients.
    auto twin = codec->make_state(TensorSpec::flat(n));
    encode(*codec, grad, *twin);
    encode(*codec, random_gradient(n, 9), *twin);
    auto next = random_gradient(n, 10);
    EXPECT_EQ(encode(*codec, next, *state), encode(*codec, next, *twin));
    EXPECT_EQ(state->residual(), twin->residual());
  }
}

// A finite gradient whose sum with the residual overflows float would send an Inf, which every
// decoder rejects: top-k refuses it like a NaN gradient, and the state is unchanged, also on a
// clone's first encode (the CPU always writes v into the spare, never the committed residual).
TEST(TopK, GradientPlusResidualOverflowIsRejected) {
  auto codec = make_codec("topk:fraction=0.01");
  const size_t n = 1000;  // k = 10
  auto state = codec->make_state(TensorSpec::flat(n));
  std::vector<float> big(n, 0.0f);
  for (size_t i = 0; i < 20; ++i) big[i * 7] = 3e38f;  // 10 sent, 10 left in the residual
  encode(*codec, big, *state);
  const auto residual = state->residual();
  ASSERT_EQ(residual[70], 3e38f);
  auto twin = state->clone();
  std::vector<uint8_t> out(codec->encoded_bytes(state->spec()));
  for (CodecState* s : {twin.get(), state.get()}) {
    try {
      codec->encode(view(big), *s, out);
      FAIL() << "an overflowing gradient + residual was encoded";
    } catch (const InvalidArgumentError& e) {
      EXPECT_NE(std::string(e.what()).find("element 70 of the gradient"), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find("overflows float; the state is unchanged"), std::string::npos)
          << e.what();
    }
    EXPECT_EQ(s->residual(), residual);
  }
  EXPECT_EQ(state->stats().encodes, 1u);
}

// ---------------------------------------------------------------------------------------------
// PowerSGD.

// M = U diag(s) V^T with orthonormal U (rows x 4) and V (cols x 4).
std::vector<float> low_rank_matrix(size_t rows, size_t cols, std::vector<double> s, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> normal;
  auto orthonormal = [&](size_t m, size_t r) {
    std::vector<double> a(m * r);
    for (auto& v : a) v = normal(rng);
    for (size_t l = 0; l < r; ++l) {
      for (size_t k = 0; k < l; ++k) {
        double dot = 0;
        for (size_t i = 0; i < m; ++i) dot += a[i * r + l] * a[i * r + k];
        for (size_t i = 0; i < m; ++i) a[i * r + l] -= dot * a[i * r + k];
      }
      double norm = 0;
      for (size_t i = 0; i < m; ++i) norm += a[i * r + l] * a[i * r + l];
      for (size_t i = 0; i < m; ++i) a[i * r + l] /= std::sqrt(norm);
    }
    return a;
  };
  const size_t r = s.size();
  auto u = orthonormal(rows, r), v = orthonormal(cols, r);
  std::vector<float> m(rows * cols);
  for (size_t i = 0; i < rows; ++i)
    for (size_t j = 0; j < cols; ++j) {
      double acc = 0;
      for (size_t l = 0; l < r; ++l) acc += u[i * r + l] * s[l] * v[j * r + l];
      m[i * cols + j] = static_cast<float>(acc);
    }
  return m;
}

double frobenius_error(const std::vector<float>& a, const std::vector<float>& b) {
  double e = 0;
  for (size_t i = 0; i < a.size(); ++i) e += (double(a[i]) - b[i]) * (double(a[i]) - b[i]);
  return std::sqrt(e);
}

// A gradient whose rank is below r: the extra columns of P are in the span of the first, and
// must become 0 rather than a normalised rounding residue (which decoded a rank-1 matrix at
// rank 2 as 0.71 of itself).
TEST(PowerSgd, RankBelowTheCodecRankIsReconstructed) {
  const size_t rows = 40, cols = 50;
  std::vector<float> m(rows * cols);
  for (size_t r = 0; r < rows; ++r)
    for (size_t c = 0; c < cols; ++c) m[r * cols + c] = 6 * (1.0f + r % 7) * (0.5f - c % 3);
  for (uint32_t rank : {2u, 4u}) {
    auto codec = make_powersgd_codec({.rank = rank});
    auto state = codec->make_state(TensorSpec{{rows, cols}});
    std::vector<float> out = decode(*codec, encode(*codec, m, *state), m.size());
    for (size_t i = 0; i < m.size(); ++i) ASSERT_NEAR(out[i], m[i], 1e-4 * 63) << "rank " << rank << " element " << i;
  }
}

TEST(PowerSgd, WarmStartReducesTheErrorTowardsTheBestRankR) {
  const size_t rows = 60, cols = 40;
  auto m = low_rank_matrix(rows, cols, {10, 6, 1, 0.5}, 17);
  const double optimal = std::sqrt(1.0 + 0.25);  // the best rank-2 error: the dropped values
  auto codec = make_powersgd_codec({.rank = 2, .seed = 3, .error_feedback = false});
  auto state = codec->make_state(TensorSpec{{rows, cols}});
  std::vector<double> errors;
  for (int step = 0; step < 12; ++step) {
    auto payload = encode(*codec, m, *state);
    EXPECT_EQ(payload.size(), kPayloadHeaderBytes + 4 * 2 * (rows + cols));
    errors.push_back(frobenius_error(decode(*codec, payload, m.size()), m));
  }
  EXPECT_GT(errors.front(), errors.back());
  EXPECT_LT(errors.back(), optimal * 1.01) << "first " << errors.front();
  EXPECT_GE(errors.back(), optimal * 0.99);
}

TEST(PowerSgd, ErrorFeedbackRecoversTheFullMatrixOverSteps) {
  const size_t rows = 30, cols = 20;
  auto m = low_rank_matrix(rows, cols, {5, 4, 3, 2, 1}, 5);
  auto codec = make_powersgd_codec({.rank = 1, .seed = 9});
  auto state = codec->make_state(TensorSpec{{rows, cols}});
  std::vector<double> sum(m.size(), 0);
  const int steps = 200;
  for (int t = 0; t < steps; ++t) {
    auto out = decode(*codec, encode(*codec, m, *state), m.size());
    for (size_t i = 0; i < m.size(); ++i) sum[i] += out[i];
  }
  // The mean of the decoded matrices approaches M although each step sends rank 1.
  std::vector<float> mean(m.size());
  for (size_t i = 0; i < m.size(); ++i) mean[i] = static_cast<float>(sum[i] / steps);
  double norm = 0;
  for (float v : m) norm += double(v) * v;
  auto once = make_powersgd_codec({.rank = 1, .seed = 9});
  auto s1 = once->make_state(TensorSpec{{rows, cols}});
  const double one_step = frobenius_error(decode(*once, encode(*once, m, *s1), m.size()), m);
  EXPECT_LT(frobenius_error(mean, m), 0.1 * one_step);
  EXPECT_LT(frobenius_error(mean, m) / std::sqrt(norm), 0.05);
}

TEST(PowerSgd, VectorsAndTinyMatricesAreSentUncompressed) {
  auto codec = make_powersgd_codec({.rank = 4});
  for (auto shape : std::vector<std::vector<size_t>>{{100}, {4, 4}, {1, 1000}, {}}) {
    TensorSpec spec{shape};
    auto state = codec->make_state(spec);
    auto g = random_gradient(spec.count(), 2);
    auto payload = encode(*codec, g, *state);
    EXPECT_EQ(inspect_payload(payload).flags, 1);
    EXPECT_EQ(decode(*codec, payload, g.size()), g);
  }
}

// ---------------------------------------------------------------------------------------------
// Argument errors.

TEST(CodecArguments, MisuseIsRejectedWithContext) {
  auto int8 = make_int8_codec();
  auto topk = make_topk_codec();
  auto s = int8->make_state(TensorSpec::flat(10));
  std::vector<float> g(10, 1.0f), small(9, 1.0f);
  std::vector<uint8_t> out(int8->encoded_bytes(10));
  EXPECT_THROW(topk->encode(view(g), *s, out), InvalidArgumentError);   // state of another codec
  EXPECT_THROW(int8->encode(view(small), *s, out), InvalidArgumentError);
  std::vector<uint8_t> tiny(out.size() - 1);
  EXPECT_THROW(int8->encode(view(g), *s, tiny), InvalidArgumentError);
  BufferView wrong_dtype{g.data(), 10, DType::Float16};
  EXPECT_THROW(int8->encode(wrong_dtype, *s, out), InvalidArgumentError);
  EXPECT_THROW(make_int8_codec({.block_size = 0}), InvalidArgumentError);
  EXPECT_THROW(make_topk_codec({.fraction = 0}), InvalidArgumentError);
  EXPECT_THROW(make_topk_codec({.fraction = 1.5}), InvalidArgumentError);
  EXPECT_THROW(make_powersgd_codec({.rank = 0}), InvalidArgumentError);
  // A payload for one codec given to another.
  int8->encode(view(g), *s, out);
  std::vector<float> dst(10);
  EXPECT_THROW(topk->decode(out, view(dst)), ProtocolError);
  EXPECT_THROW(int8->decode(out, view(small)), ProtocolError);
}

TEST(CodecArguments, CudaBuffersWithoutAUsableGpuFailClearly) {
  if (cuda::device_count() > 0) GTEST_SKIP() << "a GPU is present: " << cuda::runtime_description();
  for (const auto& spec_text : all_codec_specs()) {
    auto codec = make_codec(spec_text);
    try {
      auto state = codec->make_state(TensorSpec::flat(100, DeviceKind::Cuda, 0));
      std::vector<uint8_t> out(codec->encoded_bytes(100));
      BufferView g{reinterpret_cast<void*>(uintptr_t(256)), 100, DType::Float32, DeviceKind::Cuda, 0};
      codec->encode(g, *state, out);
      FAIL() << spec_text << ": a CUDA buffer without a GPU was accepted";
    } catch (const Error& e) {
      std::string what = e.what();
      EXPECT_NE(what.find("cuda"), std::string::npos) << what;
    }
  }
}

TEST(CodecSpec, ParsesOptionsAndRejectsUnknownOnes) {
  EXPECT_EQ(make_codec("int8:block_size=128, rounding=stochastic ,seed=7")->describe(),
            "int8(block_size=128, rounding=stochastic, seed=7, error_feedback=on)");
  EXPECT_EQ(make_codec("topk:fraction=0.001,error_feedback=off")->describe(),
            "topk(fraction=0.001, error_feedback=off)");
  EXPECT_EQ(make_codec("powersgd:rank=2")->describe(), "powersgd(rank=2, seed=0, error_feedback=on)");
  EXPECT_EQ(make_codec("bf16")->id(), CodecId::Bf16);
  EXPECT_THROW(make_codec("zstd"), InvalidArgumentError);
  EXPECT_THROW(make_codec("int8:block=3"), InvalidArgumentError);
  EXPECT_THROW(make_codec("int8:block_size=abc"), InvalidArgumentError);
  EXPECT_THROW(make_codec("int8:block_size=0"), InvalidArgumentError);
  EXPECT_THROW(make_codec("topk:fraction=2"), InvalidArgumentError);
  EXPECT_THROW(make_codec("fp16:seed=1"), InvalidArgumentError);
  EXPECT_THROW(make_codec("int8:rounding"), InvalidArgumentError);
}

}  // namespace
