// kernels/compress/api.h: fp32 <-> fp16 / bf16 launches; the kernels are in cast_kernels.cuh.
#include "cast_kernels.cuh"
#include "cuda_util.cuh"

namespace meshtrain::cuda::compress {

using namespace detail;

namespace {

template <bool kBf16>
CastCounts encode(const float* d_x, uint16_t* d_out, size_t n, int device, void* stream) {
  CastCounts result;
  if (n == 0) return result;
  DeviceGuard guard(device);
  cudaStream_t s = as_stream(stream);
  static_assert(2 * sizeof(unsigned long long) <= kScratchBytes);
  auto* counts = static_cast<unsigned long long*>(thread_scratch(device));
  check(cudaMemsetAsync(counts, 0, 2 * sizeof(unsigned long long), s), "cudaMemsetAsync", device);
  MT_LAUNCH(encode_kernel<kBf16>, grid_for(n), kThreads, 0, s)(d_x, d_out, n, counts);
  check_launch(kBf16 ? "fp32_to_bf16 kernel" : "fp32_to_fp16 kernel", device);
  unsigned long long host[2] = {0, 0};
  check(cudaMemcpyAsync(host, counts, sizeof host, cudaMemcpyDeviceToHost, s), "cudaMemcpyAsync",
        device);
  check(cudaStreamSynchronize(s), "cudaStreamSynchronize", device);
  result.clamped = host[0];
  result.flushed = host[1];
  return result;
}

template <bool kBf16>
void decode(const uint16_t* d_in, float* d_out, size_t n, bool accumulate, int device, void* stream) {
  if (n == 0) return;
  DeviceGuard guard(device);
  MT_LAUNCH(decode_kernel<kBf16>, grid_for(n), kThreads, 0, as_stream(stream))(d_in, d_out, n, accumulate);
  check_launch(kBf16 ? "bf16_to_fp32 kernel" : "fp16_to_fp32 kernel", device);
}

}  // namespace

CastCounts fp32_to_fp16(const float* d_x, uint16_t* d_out, size_t n, int device, void* stream) {
  return encode<false>(d_x, d_out, n, device, stream);
}
CastCounts fp32_to_bf16(const float* d_x, uint16_t* d_out, size_t n, int device, void* stream) {
  return encode<true>(d_x, d_out, n, device, stream);
}
void fp16_to_fp32(const uint16_t* d_in, float* d_out, size_t n, bool accumulate, int device, void* stream) {
  decode<false>(d_in, d_out, n, accumulate, device, stream);
}
void bf16_to_fp32(const uint16_t* d_in, float* d_out, size_t n, bool accumulate, int device, void* stream) {
  decode<true>(d_in, d_out, n, accumulate, device, stream);
}

}  // namespace meshtrain::cuda::compress
