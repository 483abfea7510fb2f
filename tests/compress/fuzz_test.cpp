// Corrupted and truncated payloads: every decoder rejects them with ProtocolError (header,
// length) or CorruptError (body structure), never reads past the payload nor writes past the
// output, and decode_accumulate leaves its output unchanged when it throws. Run under
// AddressSanitizer too (the asan preset) to make "never out of bounds" checkable.
#include <gtest/gtest.h>

#include <limits>

#include "compress/helpers.h"

using namespace meshtrain;
using namespace meshtrain::compress;
using namespace meshtrain::compress::testing;

namespace {

struct Sample {
  std::unique_ptr<Codec> codec;
  TensorSpec spec;
  std::vector<uint8_t> payload;
};

Sample make_sample(const std::string& spec_text, std::vector<size_t> shape) {
  Sample s{make_codec(spec_text), TensorSpec{std::move(shape)}, {}};
  auto state = s.codec->make_state(s.spec);
  auto grad = random_gradient(s.spec.count(), 5);
  s.payload = encode(*s.codec, grad, *state);
  return s;
}

std::vector<std::pair<std::string, std::vector<size_t>>> fuzz_cases() {
  std::vector<std::pair<std::string, std::vector<size_t>>> cases;
  for (const auto& spec : all_codec_specs())
    for (auto shape : std::vector<std::vector<size_t>>{{1}, {300}, {20, 50}}) cases.emplace_back(spec, shape);
  return cases;
}

// Decodes `payload` both ways. Returns "" when accepted, else the error class; fails the test
// on any other exception or when decode_accumulate changed its output before throwing.
std::string try_decode(const Codec& codec, const std::vector<uint8_t>& payload, size_t n) {
  std::vector<float> out(n, 1.0f);
  std::string kind;
  try {
    codec.decode(payload, view(out));
  } catch (const ProtocolError&) {
    kind = "protocol";
  } catch (const CorruptError&) {
    kind = "corrupt";
  }
  const std::vector<float> before = random_gradient(n, 77);
  std::vector<float> acc = before;
  std::string kind_acc;
  try {
    codec.decode_accumulate(payload, view(acc));
  } catch (const ProtocolError&) {
    kind_acc = "protocol";
  } catch (const CorruptError&) {
    kind_acc = "corrupt";
  }
  EXPECT_EQ(kind, kind_acc);
  if (!kind_acc.empty()) EXPECT_EQ(acc, before) << "decode_accumulate changed its output before throwing";
  return kind;
}

class PayloadFuzz : public ::testing::TestWithParam<std::pair<std::string, std::vector<size_t>>> {};

TEST_P(PayloadFuzz, EveryTruncationAndExtensionIsAProtocolError) {
  Sample s = make_sample(GetParam().first, GetParam().second);
  const size_t n = s.spec.count();
  ASSERT_EQ(try_decode(*s.codec, s.payload, n), "");
  for (size_t len = 0; len < s.payload.size(); ++len) {
    // An exact-size copy, so that AddressSanitizer sees any read past its end.
    std::vector<uint8_t> cut(s.payload.begin(), s.payload.begin() + len);
    ASSERT_EQ(try_decode(*s.codec, cut, n), "protocol") << "length " << len;
    EXPECT_THROW(inspect_payload(cut), ProtocolError);
  }
  for (size_t extra = 1; extra <= 8; ++extra) {
    auto longer = s.payload;
    longer.resize(longer.size() + extra, 0);
    ASSERT_EQ(try_decode(*s.codec, longer, n), "protocol") << "extra " << extra;
  }
}

TEST_P(PayloadFuzz, RandomByteFlipsAreRejectedOrDecodedInBounds) {
  Sample s = make_sample(GetParam().first, GetParam().second);
  const size_t n = s.spec.count();
  std::mt19937_64 rng(std::hash<std::string>{}(GetParam().first) + n);
  size_t rejected = 0;
  const int rounds = 1500;
  for (int round = 0; round < rounds; ++round) {
    auto p = s.payload;
    const int flips = 1 + static_cast<int>(rng() % 4);
    for (int f = 0; f < flips; ++f) {
      // Half of the flips in the header, where they matter most.
      const size_t at = (rng() % 2 == 0) ? rng() % kPayloadHeaderBytes : rng() % p.size();
      p[at] ^= static_cast<uint8_t>(1u << (rng() % 8));
    }
    rejected += !try_decode(*s.codec, p, n).empty();
    if (::testing::Test::HasFailure()) FAIL() << "round " << round;
  }
  EXPECT_GT(rejected, 0u);
}

INSTANTIATE_TEST_SUITE_P(Codecs, PayloadFuzz, ::testing::ValuesIn(fuzz_cases()), [](const auto& info) {
  std::string name = test_name(info.param.first);
  for (size_t d : info.param.second) name += "_" + std::to_string(d);
  return name;
});

// ---- targeted header and body corruptions

template <typename T>
void put(std::vector<uint8_t>& p, size_t offset, T v) {
  std::memcpy(p.data() + offset, &v, sizeof v);
}

TEST(PayloadHeader, InconsistentFieldsAreProtocolErrors) {
  Sample int8 = make_sample("int8", {1000});
  auto expect_protocol = [&](const Sample& s, auto mutate, const char* what) {
    auto p = s.payload;
    mutate(p);
    EXPECT_EQ(try_decode(*s.codec, p, s.spec.count()), "protocol") << what;
  };
  expect_protocol(int8, [](auto& p) { p[0] = 'X'; }, "magic");
  expect_protocol(int8, [](auto& p) { p[4] = 99; }, "unknown codec");
  expect_protocol(int8, [](auto& p) { p[4] = 1; }, "other codec");
  expect_protocol(int8, [](auto& p) { p[5] = 2; }, "version");
  expect_protocol(int8, [](auto& p) { p[6] = 7; }, "flags");
  expect_protocol(int8, [](auto& p) { p[7] = 1; }, "reserved");
  expect_protocol(int8, [](auto& p) { put<uint64_t>(p, 8, 999); }, "count");
  expect_protocol(int8, [](auto& p) { put<uint64_t>(p, 8, uint64_t(1) << 63); }, "huge count");
  expect_protocol(int8, [](auto& p) { put<uint64_t>(p, 8, ~uint64_t(0)); }, "count overflow");
  expect_protocol(int8, [](auto& p) { put<uint64_t>(p, 16, 0); }, "block 0");
  expect_protocol(int8, [](auto& p) { put<uint64_t>(p, 16, uint64_t(1) << 40); }, "block huge");
  expect_protocol(int8, [](auto& p) { put<uint64_t>(p, 16, 128); }, "block size changes the length");
  expect_protocol(int8, [](auto& p) { put<uint64_t>(p, 24, 1); }, "param_b");

  Sample topk = make_sample("topk:fraction=0.1", {1000});
  expect_protocol(topk, [](auto& p) { put<uint64_t>(p, 16, 1001); }, "k > count");
  expect_protocol(topk, [](auto& p) { put<uint64_t>(p, 16, 0); }, "k = 0");
  expect_protocol(topk, [](auto& p) { put<uint64_t>(p, 16, 99); }, "k changes the length");

  Sample psgd = make_sample("powersgd:rank=2", {20, 50});
  expect_protocol(psgd, [](auto& p) { put<uint64_t>(p, 24, 0); }, "rank 0");
  expect_protocol(psgd, [](auto& p) { put<uint64_t>(p, 24, 65); }, "rank > 64");
  expect_protocol(psgd, [](auto& p) { put<uint64_t>(p, 16, 0); }, "rows 0");
  expect_protocol(psgd, [](auto& p) { put<uint64_t>(p, 16, 30); }, "rows do not divide");
  expect_protocol(psgd, [](auto& p) { put<uint64_t>(p, 16, 10); }, "rows change the length");
}

TEST(PayloadBody, StructuralCorruptionIsACorruptError) {
  auto expect_corrupt = [](const Sample& s, auto mutate, const char* what) {
    auto p = s.payload;
    mutate(p);
    EXPECT_EQ(try_decode(*s.codec, p, s.spec.count()), "corrupt") << what;
  };
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const size_t h = kPayloadHeaderBytes;

  Sample topk = make_sample("topk:fraction=0.1", {1000});  // k = 100
  expect_corrupt(topk, [&](auto& p) { put<uint32_t>(p, h, 1000); }, "index == count");
  expect_corrupt(topk, [&](auto& p) { put<uint32_t>(p, h + 4 * 99, 0xffffffffu); }, "index huge");
  expect_corrupt(topk, [&](auto& p) { std::swap_ranges(p.begin() + h, p.begin() + h + 4, p.begin() + h + 4); },
                 "indices out of order");
  expect_corrupt(topk, [&](auto& p) { std::copy(p.begin() + h, p.begin() + h + 4, p.begin() + h + 4); },
                 "duplicate index");
  expect_corrupt(topk, [&](auto& p) { put<float>(p, h + 400 + 4 * 7, nan); }, "NaN value");

  Sample int8 = make_sample("int8", {1000});
  expect_corrupt(int8, [&](auto& p) { put<float>(p, h + 4, nan); }, "NaN scale");
  expect_corrupt(int8, [&](auto& p) { put<float>(p, h, -1.0f); }, "negative scale");
  expect_corrupt(int8, [&](auto& p) { put<float>(p, h, std::numeric_limits<float>::max()); },
                 "scale that overflows when dequantised");
  // FLT_MAX / 127 rounds up: 127 quanta of it are Inf.
  expect_corrupt(int8, [&](auto& p) { put<float>(p, h, std::numeric_limits<float>::max() / 127.0f); },
                 "scale FLT_MAX / 127");
  // Quanta are in [-127, 127]: -128 times the largest scale is -Inf (1000 elements: 4 scales).
  expect_corrupt(int8, [&](auto& p) { put<uint8_t>(p, h + 16 + 999, 0x80); }, "quantum -128");
  {
    auto p = int8.payload;  // the largest scale and 127 everywhere: finite
    for (size_t b = 0; b < 4; ++b) put<float>(p, h + 4 * b, 0x1.020406p+121f);
    std::fill(p.begin() + static_cast<std::ptrdiff_t>(h + 16), p.end(), uint8_t{127});
    std::vector<float> out(1000);
    int8.codec->decode(p, view(out));
    for (float v : out) ASSERT_EQ(v, 3.4028233e38f);
  }

  Sample fp16 = make_sample("fp16", {300});
  expect_corrupt(fp16, [&](auto& p) { put<uint16_t>(p, h + 2 * 299, 0x7c00); }, "fp16 Inf");
  expect_corrupt(fp16, [&](auto& p) { put<uint16_t>(p, h, 0xfe01); }, "fp16 NaN");
  Sample bf16 = make_sample("bf16", {300});
  expect_corrupt(bf16, [&](auto& p) { put<uint16_t>(p, h + 2 * 150, 0x7f80); }, "bf16 Inf");
  Sample none = make_sample("none", {300});
  expect_corrupt(none, [&](auto& p) { put<float>(p, h + 4 * 3, nan); }, "none NaN");
  Sample psgd = make_sample("powersgd:rank=2", {20, 50});
  expect_corrupt(psgd, [&](auto& p) { put<float>(p, h + 4 * 41, -nan); }, "powersgd NaN");
}

// Unaligned payloads (inside a receive buffer at an odd offset) decode like aligned ones.
TEST(PayloadBody, UnalignedPayloadsDecode) {
  for (const auto& spec : all_codec_specs()) {
    Sample s = make_sample(spec, {20, 50});
    std::vector<uint8_t> buffer(s.payload.size() + 3);
    std::memcpy(buffer.data() + 3, s.payload.data(), s.payload.size());
    std::span<const uint8_t> odd(buffer.data() + 3, s.payload.size());
    std::vector<float> a(1000), b(1000);
    s.codec->decode(s.payload, view(a));
    s.codec->decode(odd, view(b));
    EXPECT_EQ(a, b) << spec;
  }
}

}  // namespace
