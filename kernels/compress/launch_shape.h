// Launch shapes of the compression kernels: threads per block (also the kernels' own
// shared-memory sizes) and grid sizes. Shared by the launches (the .cu files, through
// cuda_util.cuh) and by the tests that run the kernels on the CPU (tests/support/cuda_sim.h), so
// it includes no CUDA header.
#pragma once

#include <algorithm>
#include <cstddef>

namespace meshtrain::cuda::compress::detail {

inline constexpr unsigned kThreads = 256;

// Blocks for a grid-stride loop over n elements: enough to fill any current GPU, capped so
// that each thread does a few elements of a large tensor.
inline unsigned grid_for(size_t n, unsigned threads = kThreads) {
  size_t blocks = (n + threads - 1) / threads;
  return static_cast<unsigned>(std::clamp<size_t>(blocks, 1, 1u << 16));
}

// Blocks that give each of n elements its own thread (kernels without a grid-stride loop).
inline unsigned blocks_covering(size_t n, unsigned threads = kThreads) {
  return static_cast<unsigned>((n + threads - 1) / threads);
}

}  // namespace meshtrain::cuda::compress::detail
