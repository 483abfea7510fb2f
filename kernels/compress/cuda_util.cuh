// Internal to kernels/compress: error checks, the device guard and launch shapes.
#pragma once

#include <cuda_runtime_api.h>

#include <string>
#include <vector>

#include "api.h"
#include "launch_shape.h"

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

// kernel<<<grid, threads, shared_bytes, stream>>>(args...), written so that the sim-device build
// (MESHTRAIN_CUDA=SIM: tests/support/sim_device) can run it on the CPU instead. A kernel name
// with a comma in it (kernel<A, B>) needs an alias first: the preprocessor splits it.
#ifdef MESHTRAIN_SIM_DEVICE_RUNTIME
#define MT_LAUNCH(kernel, grid, threads, shared_bytes, stream) \
  ::meshtrain::sim_device::launch(grid, threads, shared_bytes, kernel)
#else
#define MT_LAUNCH(kernel, grid, threads, shared_bytes, stream) kernel<<<grid, threads, shared_bytes, stream>>>
#endif

inline void check_launch(const char* what, int device) { check(cudaGetLastError(), what, device); }

// Small device memory (kScratchBytes) for the result of one blocking call (the cast encode's
// counters, the NaN scan's first index), kept per thread and device. A cudaMalloc/cudaFree per
// call cost more than the kernels themselves on all but large inputs, and cudaFree synchronises
// the whole device. Each call that uses it synchronises its stream before returning, so one
// thread's calls never overlap on it. Freed when the thread ends. The device must be current.
constexpr size_t kScratchBytes = 64;
inline void* thread_scratch(int device) {
  struct Cache {
    std::vector<void*> by_device;
    ~Cache() {
      for (void* p : by_device)
        if (p != nullptr) (void)cudaFree(p);  // at process exit the runtime may be gone: ignored
    }
  };
  thread_local Cache cache;
  if (device < 0) throw CudaFailure("scratch for cuda:" + std::to_string(device) + ": no such device");
  if (static_cast<size_t>(device) >= cache.by_device.size()) cache.by_device.resize(size_t(device) + 1, nullptr);
  void*& p = cache.by_device[size_t(device)];
  if (p == nullptr) check(cudaMalloc(&p, kScratchBytes), "cudaMalloc (scratch)", device);
  return p;
}

}  // namespace meshtrain::cuda::compress::detail
