// The least-squares problem of the compressed all-reduce tests: member i holds rows of A and b
// (b = A x* + noise); its gradient is A_i^T (A_i x - b_i) / rows; the average over members is
// the gradient of the whole problem. Everything is reproducible from the member index.
#pragma once

#include <cstddef>
#include <vector>

#include "collective/gradient.h"

namespace meshtrain::test_support {

struct LeastSquaresShard {
  static constexpr size_t kDim = 64;
  static constexpr size_t kRows = 96;
  std::vector<float> a;  // kRows x kDim, row-major
  std::vector<float> b;  // kRows

  explicit LeastSquaresShard(int member) {
    a = gradient(5000 + static_cast<uint64_t>(member), 0, kRows * kDim);
    std::vector<float> truth = gradient(4999, 0, kDim);
    std::vector<float> noise = gradient(6000 + static_cast<uint64_t>(member), 0, kRows);
    b.resize(kRows);
    for (size_t r = 0; r < kRows; ++r) {
      double dot = 0;
      for (size_t k = 0; k < kDim; ++k) dot += double(a[r * kDim + k]) * truth[k];
      b[r] = static_cast<float>(dot + 0.1 * noise[r]);
    }
  }
  // 1/(2 rows) |A x - b|^2
  double loss(const std::vector<float>& x) const {
    double sum = 0;
    for (size_t r = 0; r < kRows; ++r) {
      double e = residual(x, r);
      sum += e * e;
    }
    return sum / (2.0 * kRows);
  }
  std::vector<float> gradient_at(const std::vector<float>& x) const {
    std::vector<double> g(kDim, 0.0);
    for (size_t r = 0; r < kRows; ++r) {
      double e = residual(x, r);
      for (size_t k = 0; k < kDim; ++k) g[k] += e * a[r * kDim + k];
    }
    std::vector<float> out(kDim);
    for (size_t k = 0; k < kDim; ++k) out[k] = static_cast<float>(g[k] / kRows);
    return out;
  }

 private:
  double residual(const std::vector<float>& x, size_t r) const {
    double dot = 0;
    for (size_t k = 0; k < kDim; ++k) dot += double(a[r * kDim + k]) * x[k];
    return dot - b[r];
  }
};

}  // namespace meshtrain::test_support
