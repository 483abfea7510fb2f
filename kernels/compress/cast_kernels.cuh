// The fp16 / bf16 cast kernels behind kernels/compress/api.h (launched by cast.cu), with
// codec_math.h's element math (the same bits as lib/compress/cast.cpp), clamp and flush counts
// reduced per warp.
//
// Included by cast.cu and by tests/compress/cast_kernels_sim_test.cpp,
// which runs these kernels on the CPU through tests/support/cuda_sim.h: keep them to the
// built-ins that file provides.
#pragma once

#include <cstddef>
#include <cstdint>

#include "codec_math.h"

namespace meshtrain::cuda::compress {
namespace {

namespace math = meshtrain::compress::math;

__device__ __forceinline__ unsigned long long warp_sum(unsigned long long v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <bool kBf16>
__global__ void encode_kernel(const float* x, uint16_t* out, size_t n, unsigned long long* counts) {
  uint32_t clamped = 0, flushed = 0;
  const size_t stride = size_t(gridDim.x) * blockDim.x;
  for (size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const uint32_t bits = math::f2u(x[i]);
    out[i] = kBf16 ? math::fp32_to_bf16(bits, clamped, flushed) : math::fp32_to_fp16(bits, clamped, flushed);
  }
  unsigned long long c = warp_sum(clamped), f = warp_sum(flushed);
  if ((threadIdx.x & 31) == 0 && (c | f) != 0) {
    atomicAdd(&counts[0], c);
    atomicAdd(&counts[1], f);
  }
}

template <bool kBf16>
__global__ void decode_kernel(const uint16_t* in, float* out, size_t n, bool accumulate) {
  const size_t stride = size_t(gridDim.x) * blockDim.x;
  for (size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const float v = kBf16 ? math::bf16_to_fp32(in[i]) : math::fp16_to_fp32(in[i]);
    out[i] = accumulate ? math::add_rn(out[i], v) : v;
  }
}

}  // namespace
}  // namespace meshtrain::cuda::compress
