// Skips a GPU test, with the CUDA runtime's reason, on a host without a CUDA device. Test
// targets that include it need the project root on their include path (kernels/runtime.h).
#pragma once

#include <gtest/gtest.h>

#include "kernels/runtime.h"

#define SKIP_WITHOUT_GPU()                                                                        \
  do {                                                                                            \
    if (::meshtrain::cuda::device_count() == 0)                                                   \
      GTEST_SKIP() << "no CUDA device: " << ::meshtrain::cuda::runtime_description();             \
  } while (0)
