// Threads per block of the compression kernels: shared by the launches (cuda_util.cuh) and the
// kernels' own shared-memory sizes (the *_kernels.cuh headers), which tests/support/cuda_sim.h
// also compiles on the CPU, so it includes no CUDA header.
#pragma once

namespace meshtrain::cuda::compress::detail {

inline constexpr unsigned kThreads = 256;

}  // namespace meshtrain::cuda::compress::detail
