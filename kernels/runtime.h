// Internal: what the CUDA runtime reports on this host. Not installed; used by the library's
// own CUDA paths and by tests that must skip without a GPU.
//
// Compiled from runtime.cu when meshtrain is built with CUDA (MESHTRAIN_WITH_CUDA=1), from
// runtime_nocuda.cpp otherwise, so callers need no #ifdef.
#pragma once

#include <string>

namespace meshtrain::cuda {

// Number of CUDA devices visible to this process; 0 on any error (no driver, no device,
// driver older than the runtime, built without CUDA). Never throws.
int device_count() noexcept;

// One line for logs and test-skip reasons, e.g.
//   "CUDA runtime 13.0, driver 13.0, 2 devices"
//   "CUDA runtime 13.0, no driver, 0 devices (cudaErrorNoDevice: no CUDA-capable device is detected)"
//   "built without CUDA"
//   "simulated device (MESHTRAIN_CUDA=SIM), 1 device: kernels run on the CPU"
std::string runtime_description();

// True in a build with MESHTRAIN_CUDA=SIM: device_count() is 1, a simulated device on which
// kernels run on the CPU (tests/support/sim_device), thousands of times slower than a GPU.
bool simulated() noexcept;

}  // namespace meshtrain::cuda
