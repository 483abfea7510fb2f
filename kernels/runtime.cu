// CUDA runtime probe. C++17, no torch headers: compiled by nvcc into the meshtrain library.
#include <cuda_runtime_api.h>

#include <string>

#include "runtime.h"

namespace meshtrain::cuda {
namespace {

std::string version_string(int v) {
  // CUDA encodes versions as 1000 * major + 10 * minor.
  return std::to_string(v / 1000) + "." + std::to_string((v % 1000) / 10);
}

std::string device_phrase(int n) { return std::to_string(n) + (n == 1 ? " device" : " devices"); }

}  // namespace

int device_count() noexcept {
  int n = 0;
  cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();  // clear the sticky-free error so later calls start clean
    return 0;
  }
  return n < 0 ? 0 : n;
}

bool simulated() noexcept {
#ifdef MESHTRAIN_SIM_DEVICE_RUNTIME
  return true;
#else
  return false;
#endif
}

std::string runtime_description() {
  if (simulated()) return "simulated device (MESHTRAIN_CUDA=SIM), 1 device: kernels run on the CPU";
  std::string out = "CUDA runtime ";
  int runtime = 0;
  if (cudaRuntimeGetVersion(&runtime) == cudaSuccess) {
    out += version_string(runtime);
  } else {
    out += "unknown";
  }
  int driver = 0;
  if (cudaDriverGetVersion(&driver) == cudaSuccess && driver > 0) {
    out += ", driver " + version_string(driver);
  } else {
    out += ", no driver";
  }
  int n = 0;
  cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();
    out += ", " + device_phrase(0) + " (" + cudaGetErrorName(err) + ": " + cudaGetErrorString(err) + ")";
  } else {
    out += ", " + device_phrase(n);
  }
  return out;
}

}  // namespace meshtrain::cuda
