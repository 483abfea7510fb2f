// kernels/compress/api.h: int8 blockwise quantization, fused: one CUDA block per quantization
// block forms v = x + residual, reduces absmax, quantizes and writes the new residual. The
// second read of x and residual hits L1/L2 (a block of 256 elements is 2 KiB). Element math
// from codec_math.h, so the bytes equal lib/compress/int8.cpp's.
#include "codec_math.h"
#include "cuda_util.cuh"

namespace meshtrain::cuda::compress {

using namespace detail;
namespace math = meshtrain::compress::math;

namespace {

__device__ __forceinline__ uint32_t warp_max(uint32_t v) {
  for (int o = 16; o > 0; o >>= 1) v = max(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
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

}  // namespace

void int8_quantize(const float* d_x, float* d_residual, size_t n, uint32_t block, bool stochastic,
                   uint64_t seed, uint64_t step, int8_t* d_q, float* d_scales, int device, void* stream) {
  if (n == 0) return;
  DeviceGuard guard(device);
  const size_t blocks = (n + block - 1) / block;
  if (blocks > 0x7fffffffu) throw CudaFailure("int8_quantize: more than 2^31 - 1 blocks");
  // One warp per 32 elements up to kThreads: small blocks do not leave most threads idle.
  const unsigned threads = static_cast<unsigned>(std::min<size_t>(kThreads, (block + 31) / 32 * 32));
  quantize_kernel<<<static_cast<unsigned>(blocks), threads, 0, as_stream(stream)>>>(
      d_x, d_residual, n, block, stochastic, seed, step, d_q, d_scales);
  check_launch("int8 quantize kernel", device);
}

void int8_dequantize(const int8_t* d_q, const float* d_scales, size_t n, uint32_t block, float* d_out,
                     bool accumulate, int device, void* stream) {
  if (n == 0) return;
  DeviceGuard guard(device);
  dequantize_kernel<<<grid_for(n), kThreads, 0, as_stream(stream)>>>(d_q, d_scales, n, block, d_out,
                                                                        accumulate);
  check_launch("int8 dequantize kernel", device);
}

}  // namespace meshtrain::cuda::compress
