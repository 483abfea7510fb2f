// PowerSGD's products on the device (launched by powersgd.cu), in the CPU reference's order
// (lib/compress/powersgd.cpp), so that payloads and residuals are the CPU's bits:
//   project:      P = M Q      one thread per element of P: a double sum along M's row (j ascending)
//   back_project: Q = M^T P    one thread per element of Q: a double sum down M's column (i ascending)
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

// Element e = i r + l of P; the r threads of a row read it together.
__global__ void lowrank_project_kernel(const float* m, const float* q, size_t rows, size_t cols, uint32_t r,
                                       float* p) {
  const size_t e = size_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= rows * r) return;
  const size_t i = e / r, l = e - i * r;
  const float* mi = m + i * cols;
  double acc = 0.0;  // as codec_math.h lowrank_project_row's acc[l]
  for (size_t j = 0; j < cols; ++j) acc = math::dadd_rn(acc, math::dmul_rn(mi[j], q[j * r + l]));
  p[e] = static_cast<float>(acc);
}

// Element e = j r + l of Q; neighbouring threads read neighbouring columns of each row.
__global__ void lowrank_back_project_kernel(const float* m, const float* p, size_t rows, size_t cols, uint32_t r,
                                            float* q) {
  const size_t e = size_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= cols * r) return;
  const size_t j = e / r, l = e - j * r;
  double acc = 0.0;
  for (size_t i = 0; i < rows; ++i) acc = math::dadd_rn(acc, math::dmul_rn(m[i * cols + j], p[i * r + l]));
  q[e] = static_cast<float>(acc);
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
