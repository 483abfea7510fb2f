// PowerSGD's products on the device (launched by powersgd.cu), in the CPU reference's order
// (lib/compress/powersgd.cpp), so that payloads and residuals are the CPU's bits:
//   project:      P = M Q      one thread per row of M, r double sums over the row (j ascending)
//   back_project: Q = M^T P    one thread per column of M, r double sums down it (i ascending)
//   reconstruct:  out = / += / -= P Q^T, one thread per element (codec_math.h lowrank_element)
// M is rows x cols, row-major; P is rows x r and Q cols x r, row-major; r <= kMaxRank.
//
// Included by powersgd.cu and by tests/compress/powersgd_kernels_sim_test.cpp, which runs these
// kernels on the CPU through tests/support/cuda_sim.h: keep them to the built-ins that file
// provides.
#pragma once

#include <cstddef>
#include <cstdint>

#include "api.h"
#include "codec_math.h"

namespace meshtrain::cuda::compress {
namespace {

namespace math = meshtrain::compress::math;

constexpr uint32_t kLowRankMaxRank = 64;  // lib/compress/payload.h kMaxPowerSgdRank

__global__ void lowrank_project_kernel(const float* m, const float* q, size_t rows, size_t cols, uint32_t r,
                                       float* p) {
  const size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= rows) return;
  double acc[kLowRankMaxRank];
  for (uint32_t l = 0; l < r; ++l) acc[l] = 0.0;
  math::lowrank_project_row(m + i * cols, q, cols, r, acc);
  for (uint32_t l = 0; l < r; ++l) p[i * r + l] = static_cast<float>(acc[l]);
}

// Threads of a warp take neighbouring columns, so each row's reads are coalesced.
__global__ void lowrank_back_project_kernel(const float* m, const float* p, size_t rows, size_t cols, uint32_t r,
                                            float* q) {
  const size_t j = size_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= cols) return;
  double acc[kLowRankMaxRank];
  for (uint32_t l = 0; l < r; ++l) acc[l] = 0.0;
  for (size_t i = 0; i < rows; ++i) {
    const double v = m[i * cols + j];
    const float* pi = p + i * r;
    for (uint32_t l = 0; l < r; ++l) acc[l] = math::dadd_rn(acc[l], math::dmul_rn(v, pi[l]));
  }
  for (uint32_t l = 0; l < r; ++l) q[j * r + l] = static_cast<float>(acc[l]);
}

__global__ void lowrank_reconstruct_kernel(const float* p, const float* q, size_t rows, size_t cols, uint32_t r,
                                           float* out, LowRankWrite write) {
  const size_t n = rows * cols, stride = size_t(gridDim.x) * blockDim.x;
  for (size_t e = size_t(blockIdx.x) * blockDim.x + threadIdx.x; e < n; e += stride) {
    const size_t i = e / cols, j = e - i * cols;
    const float v = math::lowrank_element(p + i * r, q + j * r, r);
    switch (write) {
      case LowRankWrite::Assign: out[e] = v; break;
      case LowRankWrite::Add: out[e] = math::add_rn(out[e], v); break;
      case LowRankWrite::Subtract: out[e] = math::sub_rn(out[e], v); break;
    }
  }
}

}  // namespace
}  // namespace meshtrain::cuda::compress
