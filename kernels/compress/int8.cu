// kernels/compress/api.h's int8 functions: launches. The kernels, and what they compute, are in
// int8_kernels.cuh.
#include "cuda_util.cuh"
#include "int8_kernels.cuh"

namespace meshtrain::cuda::compress {

using namespace detail;

void int8_quantize(const float* d_x, float* d_residual, size_t n, uint32_t block, bool stochastic,
                   uint64_t seed, uint64_t step, int8_t* d_q, float* d_scales, int device, void* stream) {
  if (n == 0) return;
  DeviceGuard guard(device);
  const size_t blocks = (n + block - 1) / block;
  if (blocks > 0x7fffffffu) throw CudaFailure("int8_quantize: more than 2^31 - 1 blocks");
  // 16-byte loads and stores of x and the residual, 4-byte stores of q (the codec's q follows the
  // scales in one buffer: only 4-byte aligned).
  const bool aligned = (reinterpret_cast<uintptr_t>(d_x) | reinterpret_cast<uintptr_t>(d_residual)) % 16 == 0 &&
                       reinterpret_cast<uintptr_t>(d_q) % 4 == 0;
  const Int8Launch l = int8_launch(blocks, block, aligned);
  cudaStream_t s = as_stream(stream);
  const auto launch = [&](auto kernel) {
    MT_LAUNCH(kernel, l.grid, l.threads, 0, s)(d_x, d_residual, n, blocks, stochastic, seed, step, d_q, d_scales);
  };
  switch (l.per_lane) {
    case 4: launch(quantize_warp_kernel<4>); break;
    case 8: launch(quantize_warp_kernel<8>); break;
    case 16: launch(quantize_warp_kernel<16>); break;
    case 32: launch(quantize_warp_kernel<32>); break;
    default:
      MT_LAUNCH(quantize_kernel, l.grid, l.threads, 0, s)(d_x, d_residual, n, block, stochastic, seed, step, d_q,
                                                   d_scales);
  }
  check_launch("int8 quantize kernel", device);
}

void int8_dequantize(const int8_t* d_q, const float* d_scales, size_t n, uint32_t block, float* d_out,
                     bool accumulate, int device, void* stream) {
  if (n == 0) return;
  DeviceGuard guard(device);
  MT_LAUNCH(dequantize_kernel, grid_for(n), kThreads, 0, as_stream(stream))(d_q, d_scales, n, block, d_out,
                                                                        accumulate);
  check_launch("int8 dequantize kernel", device);
}

}  // namespace meshtrain::cuda::compress
