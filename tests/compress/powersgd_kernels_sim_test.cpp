// PowerSGD's kernels (kernels/compress/powersgd_kernels.cuh) run on the CPU through
// tests/support/cuda_sim.h, launched with powersgd.cu's shapes, against the CPU codec's bits
// over two encodes (the second from a residual and a warm-started Q): Q = M^T P and the
// residual's update against the second payload's Q and the CPU state's residual, decode and
// decode_accumulate against the CPU's, and P = M Q against the rows the CPU computes with the
// same codec_math.h function. The CUDA tests on a GPU (CudaVsCpu, powersgd) stay the reference.
#include <gtest/gtest.h>

#include <cstring>

#include "compress/helpers.h"
#include "support/cuda_sim.h"

#include "kernels/compress/common_kernels.cuh"
#include "kernels/compress/launch_shape.h"
#include "kernels/compress/powersgd_kernels.cuh"

using namespace meshtrain;
using namespace meshtrain::compress;
using namespace meshtrain::compress::testing;
namespace kc = meshtrain::cuda::compress;
using kc::detail::kThreads;

namespace {

void expect_same_bits(const float* got, const float* want, size_t n, const std::string& what) {
  for (size_t i = 0; i < n; ++i) ASSERT_EQ(bits(got[i]), bits(want[i])) << what << " element " << i;
}

std::vector<float> floats_at(const std::vector<uint8_t>& payload, size_t offset_floats, size_t count) {
  std::vector<float> out(count);
  std::memcpy(out.data(), payload.data() + kPayloadHeaderBytes + offset_floats * 4, count * 4);
  return out;
}

struct Case {
  size_t rows, cols;
  uint32_t rank;
  bool error_feedback;
};

TEST(SimPowerSgd, KernelsEqualTheCpuCodecOverTwoSteps) {
  const std::vector<Case> cases = {{37, 53, 2, true},   {300, 129, 4, true}, {2, 1000, 1, true},
                                   {1000, 3, 1, false}, {64, 70, 7, false},  {513, 260, 3, true}};
  for (const Case& c : cases) {
    const size_t n = c.rows * c.cols, r = c.rank;
    auto codec = make_powersgd_codec({.rank = c.rank, .seed = 5, .error_feedback = c.error_feedback});
    auto state = codec->make_state(TensorSpec{{c.rows, c.cols}});
    ASSERT_EQ(powersgd_shape(*state).rank, r);
    // Step 0 on the CPU; its Q is step 1's warm start.
    const std::vector<float> g0 = random_gradient(n, 21 + n);
    const std::vector<float> q_prev = floats_at(encode(*codec, g0, *state), c.rows * r, c.cols * r);
    const std::vector<float> residual_before = state->residual();
    const std::vector<float> g1 = random_gradient(n, 22 + n);
    const std::vector<uint8_t> payload = encode(*codec, g1, *state);
    const std::vector<float> p = floats_at(payload, 0, c.rows * r);            // orthonormalised
    const std::vector<float> q = floats_at(payload, c.rows * r, c.cols * r);  // M^T p
    cuda_sim::for_each_order([&](const char* order) {
      const std::string at = std::string(order) + ", " + std::to_string(c.rows) + " x " + std::to_string(c.cols) +
                             " rank " + std::to_string(r) + (c.error_feedback ? "" : " no feedback");
      // M = g1 + residual, in place in the residual (the codec's add_async); without error
      // feedback M is the gradient itself.
      std::vector<float> m = g1;
      if (c.error_feedback) {
        m = residual_before;
        cuda_sim::launch(kc::detail::grid_for(n), kThreads, 0, kc::add_kernel, m.data(), g1.data(), n);
      }
      // P = M Q_prev, against codec_math.h's row function as the CPU calls it.
      std::vector<float> got_p(c.rows * r);
      cuda_sim::launch(kc::detail::blocks_covering(c.rows * r), kThreads, 0, kc::lowrank_project_kernel, m.data(),
                       q_prev.data(), c.rows, c.cols, c.rank, got_p.data());
      for (size_t i = 0; i < c.rows; ++i) {
        std::vector<double> acc(r, 0.0);
        math::lowrank_project_row(m.data() + i * c.cols, q_prev.data(), c.cols, c.rank, acc.data());
        for (size_t l = 0; l < r; ++l)
          ASSERT_EQ(bits(got_p[i * r + l]), bits(static_cast<float>(acc[l]))) << at << " p row " << i;
      }
      // Q = M^T P with the payload's (orthonormalised) P: the payload's Q.
      std::vector<float> got_q(c.cols * r);
      cuda_sim::launch(kc::detail::blocks_covering(c.cols * r), kThreads, 0, kc::lowrank_back_project_kernel, m.data(),
                       p.data(), c.rows, c.cols, c.rank, got_q.data());
      expect_same_bits(got_q.data(), q.data(), q.size(), at + " q");
      // residual = M - P Q^T: the CPU state's residual.
      if (c.error_feedback) {
        cuda_sim::launch(kc::detail::grid_for(n), kThreads, 0, kc::lowrank_reconstruct_kernel, p.data(), q.data(),
                         c.rows, c.cols, c.rank, m.data(), kc::LowRankWrite::Subtract);
        expect_same_bits(m.data(), state->residual().data(), n, at + " residual");
      }
      // decode and decode_accumulate.
      for (bool accumulate : {false, true}) {
        std::vector<float> want = random_gradient(n, 9), got = want;
        if (accumulate) codec->decode_accumulate(payload, view(want));
        else codec->decode(payload, view(want));
        cuda_sim::launch(kc::detail::grid_for(n), kThreads, 0, kc::lowrank_reconstruct_kernel, p.data(), q.data(),
                         c.rows, c.cols, c.rank, got.data(),
                         accumulate ? kc::LowRankWrite::Add : kc::LowRankWrite::Assign);
        expect_same_bits(got.data(), want.data(), n, at + (accumulate ? " decode_accumulate" : " decode"));
      }
    });
  }
}

// A grid smaller than the tensor: the reconstruct kernel's grid-stride loop covers every element.
TEST(SimPowerSgd, ReconstructCoversTheTensorWithAFewBlocks) {
  const size_t rows = 33, cols = 257, r = 3, n = rows * cols;
  const std::vector<float> p = random_gradient(rows * r, 1, 1.0f), q = random_gradient(cols * r, 2, 1.0f);
  std::vector<float> out(n, -1.0f);
  cuda_sim::launch(2, kThreads, 0, kc::lowrank_reconstruct_kernel, p.data(), q.data(), rows, cols, uint32_t(r),
                   out.data(), kc::LowRankWrite::Assign);
  for (size_t i = 0; i < rows; ++i)
    for (size_t j = 0; j < cols; ++j)
      ASSERT_EQ(bits(out[i * cols + j]), bits(math::lowrank_element(p.data() + i * r, q.data() + j * r, r)))
          << i << ", " << j;
}

}  // namespace
