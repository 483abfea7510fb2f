// Skips a GPU test, with the CUDA runtime's reason, on a host without a CUDA device. Test
// targets that include it need the project root on their include path (kernels/runtime.h).
#pragma once

#include <gtest/gtest.h>

#include "kernels/runtime.h"

#include <cstddef>

// On the simulated device (MESHTRAIN_CUDA=SIM: tests/support/sim_device) each CUDA thread is a
// fiber on the CPU, thousands of times slower than a GPU: cases over this many elements are left
// to GPUs, which run every case.
inline constexpr size_t kSimulatedDeviceElements = 40000;
inline bool left_to_gpus(size_t elements) {
  return ::meshtrain::cuda::simulated() && elements > kSimulatedDeviceElements;
}
#define SKIP_IF_LEFT_TO_GPUS(elements)                                                             \
  do {                                                                                            \
    if (left_to_gpus(elements))                                                                   \
      GTEST_SKIP() << (elements) << " elements: more than the simulated device runs ("            \
                   << kSimulatedDeviceElements << "); a GPU runs this case";                      \
  } while (0)

#define SKIP_WITHOUT_GPU()                                                                        \
  do {                                                                                            \
    if (::meshtrain::cuda::device_count() == 0)                                                   \
      GTEST_SKIP() << "no CUDA device: " << ::meshtrain::cuda::runtime_description();             \
  } while (0)
