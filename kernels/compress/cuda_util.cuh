// Internal to kernels/compress: error checks, the device guard and launch shapes.
#pragma once

#include <cuda_runtime_api.h>

#include <algorithm>
#include <string>

#include "api.h"

namespace meshtrain::cuda::compress::detail {

inline void check(cudaError_t err, const char* what, int device) {
  if (err == cudaSuccess) return;
  (void)cudaGetLastError();  // clear a non-sticky error so later calls start clean
  throw CudaFailure(std::string(what) + " on cuda:" + std::to_string(device) + ": " +
                    cudaGetErrorName(err) + ": " + cudaGetErrorString(err));
}

// Makes `device` current for a scope and restores the previous one.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    check(cudaGetDevice(&previous_), "cudaGetDevice", device);
    if (previous_ != device) {
      check(cudaSetDevice(device), "cudaSetDevice", device);
      changed_ = true;
    }
  }
  ~DeviceGuard() {
    if (changed_) (void)cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
  bool changed_ = false;
};

inline cudaStream_t as_stream(void* s) { return static_cast<cudaStream_t>(s); }

constexpr unsigned kThreads = 256;

// Blocks for a grid-stride loop over n elements: enough to fill any current GPU, capped so
// that each thread does a few elements of a large tensor.
inline unsigned grid_for(size_t n, unsigned threads = kThreads) {
  size_t blocks = (n + threads - 1) / threads;
  return static_cast<unsigned>(std::clamp<size_t>(blocks, 1, 1u << 16));
}

inline void check_launch(const char* what, int device) { check(cudaGetLastError(), what, device); }

// Small device scratch freed at scope exit (after the caller has synchronised).
class Scratch {
 public:
  Scratch(size_t bytes, int device) : device_(device) {
    check(cudaMalloc(&p_, std::max<size_t>(bytes, 1)), "cudaMalloc (scratch)", device);
  }
  ~Scratch() { (void)cudaFree(p_); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  template <typename T>
  T* as() const { return static_cast<T*>(p_); }

 private:
  void* p_ = nullptr;
  int device_;
};

__device__ __forceinline__ unsigned long long warp_sum(unsigned long long v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

}  // namespace meshtrain::cuda::compress::detail
