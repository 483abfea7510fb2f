// The NaN/Inf scan, the fp32 add and the scale behind kernels/compress/api.h (launched by common.cu).
//
// Included by common.cu and by tests/compress/cast_kernels_sim_test.cpp,
// which runs these kernels on the CPU through tests/support/cuda_sim.h: keep them to the
// built-ins that file provides.
#pragma once

#include <cstddef>
#include <cstdint>

#include "codec_math.h"

namespace meshtrain::cuda::compress {
namespace {

namespace math = meshtrain::compress::math;

// Each thread's elements are visited in increasing order, so its first hit is its smallest.
__global__ void find_nonfinite_kernel(const float* x, size_t n, unsigned long long* first) {
  const size_t stride = size_t(gridDim.x) * blockDim.x;
  for (size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    if (math::nonfinite(math::f2u(x[i]))) {
      atomicMin(first, static_cast<unsigned long long>(i));
      return;
    }
  }
}

__global__ void add_kernel(float* acc, const float* x, size_t n) {
  const size_t stride = size_t(gridDim.x) * blockDim.x;
  for (size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride)
    acc[i] = math::add_rn(x[i], acc[i]);
}

__global__ void scale_kernel(float* x, size_t n, float factor) {
  const size_t stride = size_t(gridDim.x) * blockDim.x;
  for (size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) x[i] = math::mul_rn(x[i], factor);
}

}  // namespace
}  // namespace meshtrain::cuda::compress
