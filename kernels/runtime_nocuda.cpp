// CUDA runtime probe for builds without CUDA (MESHTRAIN_CUDA=OFF or no nvcc found).
#include "runtime.h"

namespace meshtrain::cuda {

int device_count() noexcept { return 0; }

std::string runtime_description() { return "built without CUDA"; }

bool simulated() noexcept { return false; }

}  // namespace meshtrain::cuda
