// The element-wise kernels (kernels/compress/cast_kernels.cuh, common_kernels.cuh) run on the
// CPU through tests/support/cuda_sim.h: fp16 / bf16 encode (with the warp-summed clamp and flush
// counts) and decode against the CPU codec's bytes, the NaN/Inf scan's first index, and the fp32
// add. The CUDA tests on a GPU (CudaVsCpu, CudaCast) remain the reference.
#include <gtest/gtest.h>

#include <cstring>
#include <limits>

#include "compress/helpers.h"
#include "support/cuda_sim.h"

#include "kernels/compress/cast_kernels.cuh"
#include "kernels/compress/common_kernels.cuh"
#include "kernels/compress/launch_shape.h"

using namespace meshtrain;
using namespace meshtrain::compress;
using namespace meshtrain::compress::testing;
namespace kc = meshtrain::cuda::compress;

namespace {

// Gradients with values that clamp and flush in fp16 (1e6, 1e-30) and in bf16 (3.4e38, 1e-44).
std::vector<float> with_extremes(size_t n, uint64_t seed) {
  std::vector<float> x = random_gradient(n, seed);
  for (size_t i = 0; i < n; i += 97) x[i] = (i % 2 ? -1.0f : 1.0f) * 1e6f;
  for (size_t i = 5; i < n; i += 89) x[i] = 1e-30f;
  for (size_t i = 7; i < n; i += 83) x[i] = (i % 2 ? -1.0f : 1.0f) * 3.4e38f;  // clamps in bf16 too
  for (size_t i = 9; i < n; i += 79) x[i] = 1e-44f;                            // flushes in bf16 too
  return x;
}

TEST(SimCast, EncodeAndDecodeKernelsEqualTheCpu) {
  for (bool bf16 : {false, true}) {
    for (size_t n : {size_t(1), size_t(255), size_t(4097)}) {
      const std::string at = std::string(bf16 ? "bf16" : "fp16") + " n " + std::to_string(n);
      auto codec = make_codec(bf16 ? "bf16" : "fp16");
      auto state = codec->make_state(TensorSpec::flat(n));
      const std::vector<float> x = with_extremes(n, n);
      const std::vector<uint8_t> expected = encode(*codec, x, *state);
      if (n > 1000) EXPECT_GT(state->stats().last_clamped * state->stats().last_flushed, 0u) << at;
      std::vector<uint16_t> half(n);
      cuda_sim::for_each_order([&](const char* order) {
        unsigned long long counts[2] = {0, 0};
        // Three blocks: the grid-stride loop goes round, and every warp sums its counts.
        const auto encode_kernel = bf16 ? kc::encode_kernel<true> : kc::encode_kernel<false>;
        cuda_sim::launch(3, kc::detail::kThreads, 0, encode_kernel, x.data(), half.data(), n, counts);
        ASSERT_EQ(std::memcmp(expected.data() + kPayloadHeaderBytes, half.data(), 2 * n), 0) << at << ", " << order;
        EXPECT_EQ(counts[0], state->stats().last_clamped) << at << ", " << order;
        EXPECT_EQ(counts[1], state->stats().last_flushed) << at << ", " << order;
      });
      for (bool accumulate : {false, true}) {
        std::vector<float> want = random_gradient(n, 9), got = want;
        if (accumulate) codec->decode_accumulate(expected, view(want));
        else codec->decode(expected, view(want));
        const auto decode_kernel = bf16 ? kc::decode_kernel<true> : kc::decode_kernel<false>;
        cuda_sim::launch(3, kc::detail::kThreads, 0, decode_kernel, half.data(), got.data(), n, accumulate);
        for (size_t i = 0; i < n; ++i) ASSERT_EQ(bits(got[i]), bits(want[i])) << at << " decode " << i;
      }
    }
  }
  EXPECT_EQ(cuda_sim::violations(), 0);
}

TEST(SimCommon, NonfiniteScanFindsTheFirstAndAddAndScaleRoundLikeTheCpu) {
  const size_t n = 3000;
  for (size_t bad : {size_t(0), size_t(1), size_t(1234), n - 1, n}) {  // n: none
    std::vector<float> x = random_gradient(n, 4);
    if (bad < n) x[bad] = std::numeric_limits<float>::quiet_NaN();
    if (bad + 700 < n) x[bad + 700] = std::numeric_limits<float>::infinity();  // a later one, in another block
    unsigned long long first = n;
    cuda_sim::launch(3, kc::detail::kThreads, 0, kc::find_nonfinite_kernel, x.data(), n, &first);
    EXPECT_EQ(first, bad);
  }
  std::vector<float> acc = random_gradient(n, 5);
  const std::vector<float> x = random_gradient(n, 6);
  std::vector<float> want = acc;
  for (size_t i = 0; i < n; ++i) want[i] = meshtrain::compress::math::add_rn(x[i], want[i]);
  cuda_sim::launch(2, kc::detail::kThreads, 0, kc::add_kernel, acc.data(), x.data(), n);
  for (size_t i = 0; i < n; ++i) ASSERT_EQ(bits(acc[i]), bits(want[i])) << i;
  for (size_t i = 0; i < n; ++i) want[i] = meshtrain::compress::math::mul_rn(want[i], 3.0f);
  cuda_sim::launch(2, kc::detail::kThreads, 0, kc::scale_kernel, acc.data(), n, 3.0f);
  for (size_t i = 0; i < n; ++i) ASSERT_EQ(bits(acc[i]), bits(want[i])) << "scale " << i;
  EXPECT_EQ(cuda_sim::violations(), 0);
}

}  // namespace
