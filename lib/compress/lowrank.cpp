// PowerSGD's products on the CPU (lowrank.h). What differs from the one-element-at-a-time
// definitions is only the order in which elements are worked on: several rows at once, so that
// the additions of different sums overlap instead of each waiting for the one before (a chain
// of dependent adds runs at one per ~4 cycles), and Q transposed, so that the loops run along
// contiguous memory and vectorise. Within each element's sum nothing moves.
#include "compress/lowrank.h"

#include <algorithm>
#include <array>
#include <vector>

#include "compress/common.h"

namespace meshtrain::compress::lowrank {
namespace {

constexpr size_t kRows = 4;           // rows of M worked on together
constexpr size_t kColumnTile = 2048;  // columns of a reconstructed row kept in L1

// Columns [l0, l0 + B) of p = M q for G rows: G x B sums, few enough to stay in registers.
template <size_t G, uint32_t B>
MT_VECTOR_CLONES void project_block(const float* const* m, const float* q, size_t cols, uint32_t r, uint32_t l0,
                                    float* p) {
  std::array<double, G * B> acc{};
  for (size_t j = 0; j < cols; ++j) {
    const float* qj = q + j * r + l0;
    for (size_t g = 0; g < G; ++g) {
      const double v = m[g][j];
      for (uint32_t b = 0; b < B; ++b) acc[g * B + b] = math::dadd_rn(acc[g * B + b], math::dmul_rn(v, qj[b]));
    }
  }
  for (size_t g = 0; g < G; ++g)
    for (uint32_t b = 0; b < B; ++b) p[g * r + l0 + b] = static_cast<float>(acc[g * B + b]);
}

// p = M q for G rows, up to eight columns of Q per pass over the rows (which stay in cache).
template <size_t G>
void project_rows(const float* const* m, const float* q, size_t cols, uint32_t r, float* p) {
  uint32_t l0 = 0;
  for (; l0 + 8 <= r; l0 += 8) project_block<G, 8>(m, q, cols, r, l0, p);
  if (l0 + 4 <= r) {
    project_block<G, 4>(m, q, cols, r, l0, p);
    l0 += 4;
  }
  switch (r - l0) {
    case 3: project_block<G, 3>(m, q, cols, r, l0, p); break;
    case 2: project_block<G, 2>(m, q, cols, r, l0, p); break;
    case 1: project_block<G, 1>(m, q, cols, r, l0, p); break;
    default: break;
  }
}

}  // namespace

// M's rows are formed (x + residual) a group at a time just before they are read: one pass
// over memory instead of two.
MT_VECTOR_CLONES void project(const float* x, float* residual, const float* q, size_t rows, size_t cols, uint32_t r,
                              float* p) {
  for (size_t i0 = 0; i0 < rows; i0 += kRows) {
    const size_t group = std::min(kRows, rows - i0);
    std::array<const float*, kRows> m{};
    for (size_t g = 0; g < group; ++g) {
      const size_t row = (i0 + g) * cols;
      if (residual != nullptr) {
        float* mi = residual + row;
        const float* xi = x + row;
        for (size_t j = 0; j < cols; ++j) mi[j] = math::add_rn(xi[j], mi[j]);
        m[g] = mi;
      } else {
        m[g] = x + row;
      }
    }
    float* pg = p + i0 * r;
    switch (group) {
      case 4: project_rows<4>(m.data(), q, cols, r, pg); break;
      case 3: project_rows<3>(m.data(), q, cols, r, pg); break;
      case 2: project_rows<2>(m.data(), q, cols, r, pg); break;
      default: project_rows<1>(m.data(), q, cols, r, pg); break;
    }
  }
}

namespace {

// q = M^T p: column l of Q, transposed into qt[l cols + j], gains the rows' terms in row order,
// a group of rows per pass along it.
template <size_t G>
MT_VECTOR_CLONES void back_project_rows(const float* m, const float* p, size_t cols, uint32_t r, double* qt) {
  for (uint32_t l = 0; l < r; ++l) {
    std::array<double, G> pl;
    for (size_t g = 0; g < G; ++g) pl[g] = p[g * r + l];
    double* t = qt + l * cols;
    for (size_t j = 0; j < cols; ++j) {
      double a = t[j];
      for (size_t g = 0; g < G; ++g) a = math::dadd_rn(a, math::dmul_rn(m[g * cols + j], pl[g]));
      t[j] = a;
    }
  }
}

}  // namespace

void back_project(const float* m, const float* p, size_t rows, size_t cols, uint32_t r, float* q) {
  std::vector<double> qt(cols * r, 0.0);
  for (size_t i0 = 0; i0 < rows; i0 += kRows) {
    const float* mg = m + i0 * cols;
    const float* pg = p + i0 * r;
    switch (std::min(kRows, rows - i0)) {
      case 4: back_project_rows<4>(mg, pg, cols, r, qt.data()); break;
      case 3: back_project_rows<3>(mg, pg, cols, r, qt.data()); break;
      case 2: back_project_rows<2>(mg, pg, cols, r, qt.data()); break;
      default: back_project_rows<1>(mg, pg, cols, r, qt.data()); break;
    }
  }
  for (size_t j = 0; j < cols; ++j)
    for (uint32_t l = 0; l < r; ++l) q[j * r + l] = static_cast<float>(qt[l * cols + j]);
}

MT_VECTOR_CLONES void reconstruct(const float* p, const float* q, size_t rows, size_t cols, uint32_t r, float* out,
                                  Write write, float* residual) {
  if (out == nullptr && residual == nullptr) return;
  std::vector<float> qt(cols * r);
  for (size_t j = 0; j < cols; ++j)
    for (uint32_t l = 0; l < r; ++l) qt[l * cols + j] = q[j * r + l];
  std::array<float, kColumnTile> v;  // a tile of row i of P Q^T, summed a column of Q at a time
  for (size_t i = 0; i < rows; ++i) {
    const float* pi = p + i * r;
    for (size_t j0 = 0; j0 < cols; j0 += kColumnTile) {
      const size_t w = std::min(kColumnTile, cols - j0);
      for (size_t j = 0; j < w; ++j) v[j] = 0.0f;
      for (uint32_t l = 0; l < r; ++l) {
        const float pl = pi[l];
        const float* ql = qt.data() + l * cols + j0;
        for (size_t j = 0; j < w; ++j) v[j] = math::add_rn(v[j], math::mul_rn(pl, ql[j]));
      }
      const size_t at = i * cols + j0;
      if (out != nullptr && write == Write::Assign) std::copy_n(v.data(), w, out + at);
      if (out != nullptr && write == Write::Add)
        for (size_t j = 0; j < w; ++j) out[at + j] = math::add_rn(out[at + j], v[j]);
      if (residual != nullptr)
        for (size_t j = 0; j < w; ++j) residual[at + j] = math::sub_rn(residual[at + j], v[j]);
    }
  }
}

}  // namespace meshtrain::compress::lowrank
