// PowerSGD's kernels (kernels/compress/powersgd_kernels.cuh) run on the CPU through
// tests/support/cuda_sim.h, launched with powersgd.cu's shapes, against the CPU codec's bits
// over two encodes (the second from a residual and a warm-started Q): Q = M^T P and the
// residual's update against the second payload's Q and the CPU state's residual, decode and
// decode_accumulate against the CPU's, and P = M Q against the rows the CPU computes with the
// same codec_math.h function. The CUDA tests on a GPU (CudaVsCpu, powersgd) stay the reference.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>

#include "compress/helpers.h"
#include "compress/lowrank.h"
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
  // Row counts that leave the CPU's groups of four rows 1, 2 or 3 short; rows longer than its
  // column tile (2048); the largest rank.
  const std::vector<Case> cases = {{37, 53, 2, true},   {300, 129, 4, true}, {2, 1000, 1, true},
                                   {1000, 3, 1, false}, {64, 70, 7, false},  {513, 260, 3, true},
                                   {9, 4000, 5, true},  {6, 3000, 2, false}, {7, 2500, 3, true},
                                   {200, 300, 64, true}};
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
    // The CPU's P = M Q_prev before orthonormalising (powersgd_project on step 1's state),
    // against codec_math.h's row function: the CPU works on several rows at once.
    std::vector<float> m_cpu = g1;
    std::vector<float> p_cpu(c.rows * r);
    {
      auto again = codec->make_state(TensorSpec{{c.rows, c.cols}});
      (void)encode(*codec, g0, *again);
      powersgd_project(view(g1), *again, p_cpu);
      if (c.error_feedback) {
        m_cpu = again->residual();  // M, in place
        for (size_t e = 0; e < n; ++e) ASSERT_EQ(bits(m_cpu[e]), bits(g1[e] + residual_before[e])) << e;
      }
    }
    for (size_t i = 0; i < c.rows; ++i) {
      std::vector<double> acc(r, 0.0);
      math::lowrank_project_row(m_cpu.data() + i * c.cols, q_prev.data(), c.cols, c.rank, acc.data());
      for (size_t l = 0; l < r; ++l)
        ASSERT_EQ(bits(p_cpu[i * r + l]), bits(static_cast<float>(acc[l]))) << "cpu p row " << i << " rank " << r;
    }
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

// The CPU's products (lib/compress/lowrank.h) work on several rows at once and on Q
// transposed; each element's sum must still add the same terms in the same order as the
// kernels. Plain random data cannot show that (a double sum's rounding almost never reaches the
// float it is rounded to), so each sum of P = M Q and Q = M^T P here ends on a term that cancels
// the float value of the sum before it: what is left is that sum's low bits, i.e. its rounding
// history, which another order changes. The terms span 2^-30 .. 2^30, so every addition rounds.
// 9 rows leave the last group of four short, 2049 columns cross the reconstruct's column tile;
// ranks 3 and 5 take the run-time-rank loops.
TEST(SimPowerSgd, CpuProductsAddEachSumsTermsInTheKernelsOrder) {
  const size_t rows = 9, cols = 2049;
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> unit(1.0f, 2.0f);
  auto wide = [&](int span) {
    const int e = static_cast<int>(rng() % (2 * span + 1)) - span;
    return (rng() % 2 ? 1.0f : -1.0f) * std::ldexp(unit(rng), e);
  };
  for (uint32_t r : {1u, 3u, 4u, 5u, 8u}) {
    const std::string at = "rank " + std::to_string(r);
    // Column l of Q (of P) is column 0 times 2^-l (2^l): an exact scaling, so that one last
    // term cancels the sums of every column.
    std::vector<float> scale_q(cols), scale_p(rows);
    for (float& v : scale_q) v = wide(10);
    for (float& v : scale_p) v = wide(10);
    scale_q.back() = 1.0f;
    scale_p.back() = 1.0f;
    std::vector<float> q(cols * r), p(rows * r);
    for (size_t j = 0; j < cols; ++j)
      for (uint32_t l = 0; l < r; ++l) q[j * r + l] = std::ldexp(scale_q[j], -static_cast<int>(l));
    for (size_t i = 0; i < rows; ++i)
      for (uint32_t l = 0; l < r; ++l) p[i * r + l] = std::ldexp(scale_p[i], static_cast<int>(l));
    // P = M Q along each row, M formed as x + residual in the residual.
    std::vector<float> x(rows * cols), residual(rows * cols);
    for (size_t e = 0; e < x.size(); ++e) {
      x[e] = wide(20);
      residual[e] = e % 7 == 0 ? wide(20) : 0.0f;
    }
    for (size_t i = 0; i < rows; ++i) {
      double sum = 0;  // the kernels' order: j ascending
      for (size_t j = 0; j + 1 < cols; ++j) sum += double(x[i * cols + j] + residual[i * cols + j]) * scale_q[j];
      x[i * cols + cols - 1] = -static_cast<float>(sum);
      residual[i * cols + cols - 1] = 0.0f;
    }
    std::vector<float> m = x;
    for (size_t e = 0; e < m.size(); ++e) m[e] = x[e] + residual[e];
    std::vector<float> got_p(rows * r), want_p(rows * r);
    lowrank::project(x.data(), residual.data(), q.data(), rows, cols, r, got_p.data());
    expect_same_bits(residual.data(), m.data(), m.size(), at + " M = x + residual");
    cuda_sim::launch(kc::detail::blocks_covering(rows * r), kThreads, 0, kc::lowrank_project_kernel, m.data(), q.data(),
                     rows, cols, r, want_p.data());
    expect_same_bits(got_p.data(), want_p.data(), want_p.size(), at + " p");
    // Q = M^T P down each column.
    for (size_t j = 0; j < cols; ++j) {
      double sum = 0;  // i ascending
      for (size_t i = 0; i + 1 < rows; ++i) sum += double(m[i * cols + j]) * scale_p[i];
      m[(rows - 1) * cols + j] = -static_cast<float>(sum);
    }
    std::vector<float> got_q(cols * r), want_q(cols * r);
    lowrank::back_project(m.data(), p.data(), rows, cols, r, got_q.data());
    cuda_sim::launch(kc::detail::blocks_covering(cols * r), kThreads, 0, kc::lowrank_back_project_kernel, m.data(),
                     p.data(), rows, cols, r, want_q.data());
    expect_same_bits(got_q.data(), want_q.data(), want_q.size(), at + " q");
    // P Q^T (a float sum over l): +B, -B, then a term of ~1, repeated, B = 2^30: in order each
    // sum ends on its last small term; in another a small term meets a B and is lost.
    if (r < 3) continue;
    for (size_t i = 0; i < rows; ++i)
      for (uint32_t l = 0; l < r; ++l) p[i * r + l] = l % 3 == 2 ? unit(rng) : 0x1p30f;
    for (size_t j = 0; j < cols; ++j)
      for (uint32_t l = 0; l < r; ++l) q[j * r + l] = l % 3 == 1 ? -1.0f : 1.0f;
    for (bool add : {false, true}) {
      std::vector<float> got = random_gradient(rows * cols, 3), want = got;
      std::vector<float> got_residual = random_gradient(rows * cols, 4), want_residual = got_residual;
      lowrank::reconstruct(p.data(), q.data(), rows, cols, r, got.data(),
                           add ? lowrank::Write::Add : lowrank::Write::Assign, got_residual.data());
      cuda_sim::launch(kc::detail::grid_for(rows * cols), kThreads, 0, kc::lowrank_reconstruct_kernel, p.data(),
                       q.data(), rows, cols, r, want.data(), add ? kc::LowRankWrite::Add : kc::LowRankWrite::Assign);
      cuda_sim::launch(kc::detail::grid_for(rows * cols), kThreads, 0, kc::lowrank_reconstruct_kernel, p.data(),
                       q.data(), rows, cols, r, want_residual.data(), kc::LowRankWrite::Subtract);
      expect_same_bits(got.data(), want.data(), want.size(), at + (add ? " P Q^T added" : " P Q^T"));
      expect_same_bits(got_residual.data(), want_residual.data(), want.size(), at + " residual - P Q^T");
    }
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
