// The int8 kernels (kernels/compress/int8_kernels.cuh) run on the CPU through
// tests/support/cuda_sim.h, launched as int8_quantize launches them (int8_launch), against the
// CPU codec's bytes: scales, q and the residual over two steps (the second adds a residual),
// for the warp kernel's block sizes (128 .. 1024), other sizes (the block kernel), an unaligned
// view, both roundings and without error feedback; and the dequantize kernel against decode.
// The CUDA tests on a GPU (CudaVsCpu) remain the reference; this runs on any machine.
#include <gtest/gtest.h>

#include <cstring>

#include "compress/helpers.h"
#include "support/cuda_sim.h"

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunknown-pragmas"  // #pragma unroll
#include "kernels/compress/int8_kernels.cuh"
#pragma GCC diagnostic pop

using namespace meshtrain;
using namespace meshtrain::compress;
using namespace meshtrain::compress::testing;
namespace kc = meshtrain::cuda::compress;

namespace {

// int8_quantize's launch (kernels/compress/int8.cu), on the simulator.
void quantize_on_sim(const float* x, float* residual, size_t n, uint32_t block, bool stochastic, uint64_t seed,
                     uint64_t step, int8_t* q, float* scales) {
  const size_t blocks = (n + block - 1) / block;
  const bool aligned = (reinterpret_cast<uintptr_t>(x) | reinterpret_cast<uintptr_t>(residual)) % 16 == 0 &&
                       reinterpret_cast<uintptr_t>(q) % 4 == 0;
  const kc::Int8Launch l = kc::int8_launch(blocks, block, aligned);
  auto run = [&](auto kernel) {
    cuda_sim::launch(l.grid, l.threads, 0, kernel, x, residual, n, blocks, stochastic, seed, step, q, scales);
  };
  switch (l.per_lane) {
    case 4: run(kc::quantize_warp_kernel<4>); break;
    case 8: run(kc::quantize_warp_kernel<8>); break;
    case 16: run(kc::quantize_warp_kernel<16>); break;
    case 32: run(kc::quantize_warp_kernel<32>); break;
    default:
      cuda_sim::launch(l.grid, l.threads, 0, kc::quantize_kernel, x, residual, n, block, stochastic, seed, step, q,
                       scales);
  }
}

struct Case {
  uint32_t block;
  Rounding rounding;
  bool error_feedback;
};

TEST(SimInt8, QuantizeKernelsEqualTheCpuOverTwoSteps) {
  const std::vector<Case> cases = {{256, Rounding::Nearest, true},     {128, Rounding::Stochastic, true},
                                   {512, Rounding::Nearest, false},    {1024, Rounding::Nearest, true},
                                   {64, Rounding::Stochastic, true},   {1000, Rounding::Nearest, false},
                                   {256, Rounding::Stochastic, false}, {37, Rounding::Nearest, true}};
  for (const Case& c : cases) {
    for (size_t n : {size_t(1), size_t(255), size_t(257), size_t(4097), size_t(3 * 1024 + 5)}) {
      for (size_t offset : {size_t(0), size_t(1)}) {  // 1: x and the residual 4 bytes past 16-byte alignment
        cuda_sim::for_each_order([&](const char* order) {
          const std::string at = std::string(order) + ", block " + std::to_string(c.block) + " n " +
                                 std::to_string(n) + " offset " + std::to_string(offset) +
                                 (c.rounding == Rounding::Stochastic ? " stochastic" : "") +
                                 (c.error_feedback ? "" : " no feedback");
          auto codec = make_int8_codec({.block_size = c.block, .rounding = c.rounding, .seed = 11,
                                        .error_feedback = c.error_feedback});
          auto state = codec->make_state(TensorSpec::flat(n));
          const size_t blocks = (n + c.block - 1) / c.block;
          // 16-byte aligned storage, viewed at `offset` floats.
          std::vector<float4> x_store(n / 4 + 2), r_store(n / 4 + 2);
          float* x = reinterpret_cast<float*>(x_store.data()) + offset;
          float* residual = c.error_feedback ? reinterpret_cast<float*>(r_store.data()) + offset : nullptr;
          if (residual) std::fill(residual, residual + n, 0.0f);
          for (uint64_t step = 0; step < 2; ++step) {
            const std::vector<float> g = random_gradient(n, 70 + 13 * step + n);
            std::copy(g.begin(), g.end(), x);
            const std::vector<uint8_t> expected = encode(*codec, g, *state);
            std::vector<float> scales(blocks);
            std::vector<int8_t> q(n);
            quantize_on_sim(x, residual, n, c.block, c.rounding == Rounding::Stochastic, 11, step, q.data(),
                            scales.data());
            ASSERT_EQ(expected.size(), kPayloadHeaderBytes + 4 * blocks + n) << at;
            ASSERT_EQ(std::memcmp(expected.data() + kPayloadHeaderBytes, scales.data(), 4 * blocks), 0)
                << at << " step " << step << ": scales";
            ASSERT_EQ(std::memcmp(expected.data() + kPayloadHeaderBytes + 4 * blocks, q.data(), n), 0)
                << at << " step " << step << ": q";
            if (residual) {
              const std::vector<float> cpu = state->residual();
              for (size_t i = 0; i < n; ++i)
                ASSERT_EQ(bits(residual[i]), bits(cpu[i])) << at << " step " << step << ": residual " << i;
            }
          }
        });
      }
    }
  }
  EXPECT_EQ(cuda_sim::violations(), 0);
}

TEST(SimInt8, DequantizeKernelEqualsTheCpuDecode) {
  for (uint32_t block : {37u, 256u}) {
    const size_t n = 4097, blocks = (n + block - 1) / block;
    auto codec = make_int8_codec({.block_size = block, .error_feedback = false});
    auto state = codec->make_state(TensorSpec::flat(n));
    const std::vector<uint8_t> payload = encode(*codec, random_gradient(n, 3), *state);
    std::vector<float> scales(blocks);
    std::memcpy(scales.data(), payload.data() + kPayloadHeaderBytes, 4 * blocks);
    const auto* q = reinterpret_cast<const int8_t*>(payload.data() + kPayloadHeaderBytes + 4 * blocks);
    for (bool accumulate : {false, true}) {
      std::vector<float> expected = random_gradient(n, 5), got = expected;
      if (accumulate) codec->decode_accumulate(payload, view(expected));
      else codec->decode(payload, view(expected));
      cuda_sim::for_each_order([&](const char* order) {
        std::vector<float> out = got;
        cuda_sim::launch(3, kc::kThreads, 0, kc::dequantize_kernel, q, scales.data(), n, block, out.data(), accumulate);
        for (size_t i = 0; i < n; ++i)
          ASSERT_EQ(bits(out[i]), bits(expected[i])) << "block " << block << (accumulate ? " accumulate " : " ") << i
                                                     << ", " << order;
      });
    }
  }
  EXPECT_EQ(cuda_sim::violations(), 0);
}

}  // namespace
