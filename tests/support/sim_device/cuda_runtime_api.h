// The CUDA runtime calls of kernels/ on a simulated device, for the sim-device build
// (MESHTRAIN_SIM_DEVICE, CMakePresets.json "sim-device"): the .cu files compile as C++ against
// this header, device memory is host memory, every call completes before it returns (streams
// only carry names), and kernels run on the CPU through tests/support/cuda_sim.h. It lets the
// host side of every CUDA path (allocations, copies, launches, synchronisation, the codecs'
// and collectives' CUDA branches) run in CI on a machine without a GPU.
//
// What it cannot show: anything about timing or concurrency between streams (all work here is
// done in order, at once), which memory is really device memory (a host pointer passed as a
// device pointer works here and fails on a GPU), or what nvcc compiles differently. GPU runs
// remain the reference.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "support/cuda_sim.h"

#define MESHTRAIN_SIM_DEVICE_RUNTIME 1

enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInvalidDevice = 101,
};
using cudaError = cudaError_t;

struct CUstream_st {
  unsigned flags = 0;
};
using cudaStream_t = CUstream_st*;
#define cudaStreamLegacy (reinterpret_cast<cudaStream_t>(0x1))
#define cudaStreamNonBlocking 0x01u

enum cudaMemcpyKind : int {
  cudaMemcpyHostToHost = 0,
  cudaMemcpyHostToDevice = 1,
  cudaMemcpyDeviceToHost = 2,
  cudaMemcpyDeviceToDevice = 3,
  cudaMemcpyDefault = 4
};

namespace meshtrain::sim_device {

inline int& current_device() {
  static thread_local int device = 0;
  return device;
}
inline cudaError_t& last_error() {
  static thread_local cudaError_t error = cudaSuccess;
  return error;
}
inline cudaError_t fail(cudaError_t e) {
  last_error() = e;
  return e;
}
// Device memory: 256-byte aligned host memory, as cudaMalloc's.
inline cudaError_t allocate(void** p, size_t bytes) {
  if (p == nullptr) return fail(cudaErrorInvalidValue);
  *p = std::aligned_alloc(256, (std::max<size_t>(bytes, 1) + 255) / 256 * 256);
  return *p ? cudaSuccess : fail(cudaErrorMemoryAllocation);
}

}  // namespace meshtrain::sim_device

inline cudaError_t cudaGetDeviceCount(int* n) {
  *n = 1;
  return cudaSuccess;
}
inline cudaError_t cudaRuntimeGetVersion(int* v) {
  *v = 0;  // runtime.cu prints "0.0": no CUDA runtime, a simulated device
  return cudaSuccess;
}
inline cudaError_t cudaDriverGetVersion(int* v) {
  *v = 0;
  return cudaSuccess;
}
inline const char* cudaGetErrorName(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
    case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
  }
  return "cudaErrorUnknown";
}
inline const char* cudaGetErrorString(cudaError_t e) {
  return e == cudaSuccess ? "no error" : "simulated device error";
}
inline cudaError_t cudaGetLastError() {
  const cudaError_t e = meshtrain::sim_device::last_error();
  meshtrain::sim_device::last_error() = cudaSuccess;
  return e;
}
inline cudaError_t cudaGetDevice(int* device) {
  *device = meshtrain::sim_device::current_device();
  return cudaSuccess;
}
inline cudaError_t cudaSetDevice(int device) {
  if (device != 0) return meshtrain::sim_device::fail(cudaErrorInvalidDevice);
  meshtrain::sim_device::current_device() = device;
  return cudaSuccess;
}
inline cudaError_t cudaMalloc(void** p, size_t bytes) { return meshtrain::sim_device::allocate(p, bytes); }
inline cudaError_t cudaMallocAsync(void** p, size_t bytes, cudaStream_t) {
  return meshtrain::sim_device::allocate(p, bytes);
}
inline cudaError_t cudaFree(void* p) {
  std::free(p);
  return cudaSuccess;
}
inline cudaError_t cudaFreeAsync(void* p, cudaStream_t) { return cudaFree(p); }
// Pinned host memory is host memory here. MESHTRAIN_SIM_REFUSE_PINNED=1 makes cudaHostAlloc
// fail, as it does where the locked-memory limit is low, for the tests of that path.
#define cudaHostAllocPortable 0x01u
inline cudaError_t cudaHostAlloc(void** p, size_t bytes, unsigned) {
  const char* refuse = std::getenv("MESHTRAIN_SIM_REFUSE_PINNED");
  if (refuse != nullptr && refuse[0] == '1') return meshtrain::sim_device::fail(cudaErrorMemoryAllocation);
  return meshtrain::sim_device::allocate(p, bytes);
}
inline cudaError_t cudaFreeHost(void* p) {
  std::free(p);
  return cudaSuccess;
}
inline cudaError_t cudaMemset(void* p, int value, size_t bytes) {
  std::memset(p, value, bytes);
  return cudaSuccess;
}
inline cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t) {
  return cudaMemset(p, value, bytes);
}
inline cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind, cudaStream_t) {
  if (bytes > 0 && (dst == nullptr || src == nullptr)) return meshtrain::sim_device::fail(cudaErrorInvalidValue);
  if (bytes > 0) std::memmove(dst, src, bytes);
  return cudaSuccess;
}
inline cudaError_t cudaStreamCreateWithFlags(cudaStream_t* s, unsigned flags) {
  *s = new CUstream_st{flags};
  return cudaSuccess;
}
inline cudaError_t cudaStreamDestroy(cudaStream_t s) {
  if (s != nullptr && s != cudaStreamLegacy) delete s;
  return cudaSuccess;
}
inline cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }

// kernel<<<grid, threads, shared, stream>>>(args...) is written MT_LAUNCH(kernel, grid, threads,
// shared, stream)(args...) in kernels/ (cuda_util.cuh): here a launch on the simulator.
namespace meshtrain::sim_device {
template <typename Kernel>
struct Launch {
  unsigned grid, threads;
  size_t shared;
  Kernel kernel;
  template <typename... Args>
  void operator()(Args... args) const {
    cuda_sim::launch(grid, threads, shared, kernel, args...);
  }
};
template <typename Kernel>
Launch<Kernel> launch(unsigned grid, unsigned threads, size_t shared, Kernel kernel) {
  return Launch<Kernel>{grid, threads, shared, kernel};
}
}  // namespace meshtrain::sim_device
