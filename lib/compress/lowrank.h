// PowerSGD's matrix products on the CPU (lib/compress/powersgd.cpp calls them; the kernels in
// kernels/compress/powersgd_kernels.cuh are their CUDA twins). M is rows x cols, P rows x r and
// Q cols x r, all row-major fp32; r <= kMaxPowerSgdRank. Every element is the sum the kernels
// compute, over the same terms in the same order (codec_math.h), so the bits are theirs:
//   P[i][l] = double sum over j ascending of M[i][j] Q[j][l]   (lowrank_project_row)
//   Q[j][l] = double sum over i ascending of M[i][j] P[i][l]
//   (P Q^T)[i][j] = float sum over l ascending of P[i][l] Q[j][l], from 0   (lowrank_element)
#pragma once

#include <cstddef>
#include <cstdint>

namespace meshtrain::compress::lowrank {

// M = x + residual, written into the residual (when not null; M is x otherwise), then p = M q.
void project(const float* x, float* residual, const float* q, size_t rows, size_t cols, uint32_t r, float* p);

// q = M^T p.
void back_project(const float* m, const float* p, size_t rows, size_t cols, uint32_t r, float* q);

enum class Write { Assign, Add };

// P Q^T assigned to or added into `out` (skipped when null), and subtracted from `residual`
// (when not null).
void reconstruct(const float* p, const float* q, size_t rows, size_t cols, uint32_t r, float* out, Write write,
                 float* residual);

}  // namespace meshtrain::compress::lowrank
