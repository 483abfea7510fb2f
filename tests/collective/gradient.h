// The gradient of job member `seed` at `step`: uniform floats in [-1, 1), reproducible by the
// tests from the seed alone.
#pragma once

#include <cstring>
#include <vector>

#include "support/pattern.h"

namespace meshtrain::test_support {

inline std::vector<float> gradient(uint64_t seed, uint64_t step, size_t count) {
  std::vector<uint8_t> bytes(count * 8);
  fill_pattern(bytes, seed * 1000003 + step);
  std::vector<float> g(count);
  for (size_t i = 0; i < count; ++i) {
    uint64_t v;
    std::memcpy(&v, bytes.data() + i * 8, 8);
    g[i] = static_cast<float>(static_cast<double>(v >> 11) / 9007199254740992.0 * 2.0 - 1.0);
  }
  return g;
}

}  // namespace meshtrain::test_support
