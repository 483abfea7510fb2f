// kernels/compress/api.h's PowerSGD products: launches. The kernels, and the order of their
// sums, are in powersgd_kernels.cuh.
#include "cuda_util.cuh"
#include "powersgd_kernels.cuh"

namespace meshtrain::cuda::compress {

using namespace detail;

namespace {

void check_rank(const char* what, uint32_t r) {
  if (r < 1 || r > kLowRankMaxRank)
    throw CudaFailure(std::string(what) + ": rank " + std::to_string(r) + " (1 ..= 64)");
}

// One thread per element of `elements`, in a grid of at most 2^31 - 1 blocks.
unsigned blocks_for(const char* what, size_t elements) {
  const size_t blocks = (elements + kThreads - 1) / kThreads;
  if (blocks > 0x7fffffffu) throw CudaFailure(std::string(what) + ": more than 2^31 - 1 blocks");
  return static_cast<unsigned>(blocks);
}

}  // namespace

void lowrank_project(const float* d_m, const float* d_q, size_t rows, size_t cols, uint32_t r, float* d_p,
                     int device, void* stream) {
  check_rank("lowrank_project", r);
  if (rows == 0) return;
  DeviceGuard guard(device);
  MT_LAUNCH(lowrank_project_kernel, blocks_for("lowrank_project", rows * r), kThreads, 0,
            as_stream(stream))(d_m, d_q, rows, cols, r, d_p);
  check_launch("lowrank project kernel", device);
}

void lowrank_back_project(const float* d_m, const float* d_p, size_t rows, size_t cols, uint32_t r, float* d_q,
                          int device, void* stream) {
  check_rank("lowrank_back_project", r);
  if (cols == 0) return;
  DeviceGuard guard(device);
  MT_LAUNCH(lowrank_back_project_kernel, blocks_for("lowrank_back_project", cols * r), kThreads, 0,
            as_stream(stream))(d_m, d_p, rows, cols, r, d_q);
  check_launch("lowrank back-project kernel", device);
}

void lowrank_reconstruct(const float* d_p, const float* d_q, size_t rows, size_t cols, uint32_t r, float* d_out,
                         LowRankWrite write, int device, void* stream) {
  check_rank("lowrank_reconstruct", r);
  if (rows == 0 || cols == 0) return;
  DeviceGuard guard(device);
  MT_LAUNCH(lowrank_reconstruct_kernel, grid_for(rows * cols), kThreads, 0, as_stream(stream))(d_p, d_q, rows, cols,
                                                                                              r, d_out, write);
  check_launch("lowrank reconstruct kernel", device);
}

}  // namespace meshtrain::cuda::compress
