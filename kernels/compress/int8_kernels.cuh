// The int8 kernels behind kernels/compress/api.h (launched by int8.cu): blockwise quantization,
// fused: v = x + residual, absmax, quantize and the new residual in one pass. Element math from
// codec_math.h, so the bytes equal lib/compress/int8.cpp's. Two kernels:
// - block sizes of 128, 256, 512 or 1024 on 16-byte aligned x and residual (the default, 256, among
//   them): one warp per quantization block, its values held in registers between the absmax
//   and the quantization, loaded and stored 16 bytes at a time, the absmax by warp shuffles;
// - any other: one CUDA block per quantization block, the second read of x and residual from
//   L1/L2. It was the only kernel until an H100 showed it at 0.435 ms for 256 MiB with error
//   feedback (one small CUDA block and two barriers per 256 elements), against a 0.30 ms floor
//   for its 13 bytes per element (docs/compression.md).
//
// Included by int8.cu (after cuda_util.cuh) and by
// tests/compress/int8_kernels_sim_test.cpp, which runs these kernels on the CPU through
// tests/support/cuda_sim.h: keep them to the built-ins that file provides.
#pragma once

#include <cstddef>
#include <cstdint>

#include "codec_math.h"
#include "launch_shape.h"

namespace meshtrain::cuda::compress {
namespace {

namespace math = meshtrain::compress::math;
using detail::kThreads;

__device__ __forceinline__ uint32_t warp_max(uint32_t v) {
  for (int o = 16; o > 0; o >>= 1) v = max(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// The in-block index of lane `lane`'s k-th value in quantize_warp_kernel (see there).
__device__ __forceinline__ uint32_t warp_block_index(int k, uint32_t lane) {
  return 4 * (32 * (uint32_t(k) / 4) + lane) + uint32_t(k) % 4;
}

// One warp per quantization block of 32 * kPerLane elements (kPerLane a multiple of 4): lane l
// holds elements 4 * (32 * j + l) .. + 3 for j < kPerLane / 4, so each float4 load of the warp
// covers 512 contiguous bytes. The last block, if shorter, takes the guarded scalar path.
template <int kPerLane>
__global__ void quantize_warp_kernel(const float* x, float* residual, size_t n, size_t blocks, bool stochastic,
                                     uint64_t seed, uint64_t step, int8_t* q, float* scales) {
  constexpr uint32_t kBlock = 32 * kPerLane;
  constexpr int kVectors = kPerLane / 4;
  const size_t b = (size_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  if (b >= blocks) return;  // whole warps: b is the same for all 32 lanes
  const uint32_t lane = threadIdx.x & 31;
  const size_t begin = b * kBlock;
  const uint32_t len = static_cast<uint32_t>(n - begin < kBlock ? n - begin : size_t(kBlock));
  const uint32_t key = stochastic ? math::block_key(seed, step, b) : 0u;
  float v[kPerLane];
  uint32_t m = 0;
  if (len == kBlock) {
    const float4* x4 = reinterpret_cast<const float4*>(x + begin);
    const float4* r4 = residual ? reinterpret_cast<const float4*>(residual + begin) : nullptr;
#pragma unroll
    for (int j = 0; j < kVectors; ++j) {
      const float4 a = x4[32 * j + lane];
      float4 c = a;
      if (r4) {
        const float4 r = r4[32 * j + lane];
        c = make_float4(math::add_rn(a.x, r.x), math::add_rn(a.y, r.y), math::add_rn(a.z, r.z),
                        math::add_rn(a.w, r.w));
      }
      v[4 * j] = c.x, v[4 * j + 1] = c.y, v[4 * j + 2] = c.z, v[4 * j + 3] = c.w;
    }
#pragma unroll
    for (int k = 0; k < kPerLane; ++k) m = max(m, math::magnitude_key(v[k]));
  } else {
#pragma unroll
    for (int k = 0; k < kPerLane; ++k) {
      const uint32_t i = warp_block_index(k, lane);
      v[k] = 0.0f;
      if (i < len) {
        v[k] = residual ? math::add_rn(x[begin + i], residual[begin + i]) : x[begin + i];
        m = max(m, math::magnitude_key(v[k]));
      }
    }
  }
  const float absmax = math::u2f(warp_max(m));
  const float scale = math::int8_scale(absmax), inverse = math::int8_inverse(absmax);
  if (lane == 0) scales[b] = scale;
  float t[kPerLane];
#pragma unroll
  for (int k = 0; k < kPerLane; ++k) {
    const uint32_t i = warp_block_index(k, lane);
    t[k] = stochastic ? math::int8_stochastic(v[k], inverse, math::noise(key, i)) : math::int8_nearest(v[k], inverse);
  }
  if (len == kBlock) {
    char4* q4 = reinterpret_cast<char4*>(q + begin);
    float4* r4 = residual ? reinterpret_cast<float4*>(residual + begin) : nullptr;
#pragma unroll
    for (int j = 0; j < kVectors; ++j) {
      const float* tj = t + 4 * j;
      q4[32 * j + lane] = make_char4(static_cast<signed char>(static_cast<int32_t>(tj[0])),
                                     static_cast<signed char>(static_cast<int32_t>(tj[1])),
                                     static_cast<signed char>(static_cast<int32_t>(tj[2])),
                                     static_cast<signed char>(static_cast<int32_t>(tj[3])));
      if (r4) {
        const float* vj = v + 4 * j;
        r4[32 * j + lane] = make_float4(math::sub_rn(vj[0], math::int8_value(tj[0], scale)),
                                        math::sub_rn(vj[1], math::int8_value(tj[1], scale)),
                                        math::sub_rn(vj[2], math::int8_value(tj[2], scale)),
                                        math::sub_rn(vj[3], math::int8_value(tj[3], scale)));
      }
    }
  } else {
#pragma unroll
    for (int k = 0; k < kPerLane; ++k) {
      const uint32_t i = warp_block_index(k, lane);
      if (i >= len) continue;
      q[begin + i] = static_cast<int8_t>(static_cast<int32_t>(t[k]));
      if (residual) residual[begin + i] = math::sub_rn(v[k], math::int8_value(t[k], scale));
    }
  }
}

__global__ void quantize_kernel(const float* x, float* residual, size_t n, uint32_t block,
                                bool stochastic, uint64_t seed, uint64_t step, int8_t* q, float* scales) {
  __shared__ uint32_t warp_maxima[32];
  __shared__ float shared_absmax;
  const size_t b = blockIdx.x;
  const size_t begin = b * block;
  const uint32_t len = static_cast<uint32_t>(n - begin < block ? n - begin : size_t(block));
  uint32_t m = 0;
  for (uint32_t i = threadIdx.x; i < len; i += blockDim.x) {
    const float v = residual ? math::add_rn(x[begin + i], residual[begin + i]) : x[begin + i];
    m = max(m, math::magnitude_key(v));
  }
  m = warp_max(m);
  if ((threadIdx.x & 31) == 0) warp_maxima[threadIdx.x >> 5] = m;
  __syncthreads();
  if (threadIdx.x == 0) {
    uint32_t all = 0;
    for (unsigned w = 0; w < (blockDim.x + 31) / 32; ++w) all = max(all, warp_maxima[w]);
    shared_absmax = math::u2f(all);
  }
  __syncthreads();
  const float absmax = shared_absmax;
  const float scale = math::int8_scale(absmax), inverse = math::int8_inverse(absmax);
  if (threadIdx.x == 0) scales[b] = scale;
  const uint32_t key = stochastic ? math::block_key(seed, step, b) : 0u;
  for (uint32_t i = threadIdx.x; i < len; i += blockDim.x) {
    const float v = residual ? math::add_rn(x[begin + i], residual[begin + i]) : x[begin + i];
    const float t = stochastic ? math::int8_stochastic(v, inverse, math::noise(key, i))
                               : math::int8_nearest(v, inverse);
    q[begin + i] = static_cast<int8_t>(static_cast<int32_t>(t));
    if (residual) residual[begin + i] = math::sub_rn(v, math::int8_value(t, scale));
  }
}

__global__ void dequantize_kernel(const int8_t* q, const float* scales, size_t n, uint32_t block, float* out,
                                  bool accumulate) {
  const size_t stride = size_t(gridDim.x) * blockDim.x;
  for (size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const float v = math::int8_value(static_cast<float>(q[i]), scales[i / block]);
    out[i] = accumulate ? math::add_rn(out[i], v) : v;
  }
}

// Which kernel int8_quantize launches, and its shape: the warp kernel (per_lane values per lane)
// for blocks of 128, 256, 512 or 1024 on aligned buffers, else one CUDA block per quantization
// block with one warp per 32 elements up to kThreads (small blocks leave no threads idle).
struct Int8Launch {
  int per_lane = 0;  // 0: quantize_kernel
  unsigned grid = 0, threads = 0;
};
inline Int8Launch int8_launch(size_t blocks, uint32_t block, bool aligned) {
  if (aligned && (block == 128 || block == 256 || block == 512 || block == 1024)) {
    const unsigned warps_per_cta = kThreads / 32;
    return {static_cast<int>(block / 32), static_cast<unsigned>((blocks + warps_per_cta - 1) / warps_per_cta),
            kThreads};
  }
  return {0, static_cast<unsigned>(blocks), block < kThreads ? (block + 31) / 32 * 32 : kThreads};
}

}  // namespace
}  // namespace meshtrain::cuda::compress
