// Deterministic pseudo-random bytes (splitmix64), so two processes can agree on a payload
// from a seed alone.
#pragma once

#include <cstdint>
#include <cstring>
#include <span>

namespace meshtrain::test_support {

inline void fill_pattern(std::span<uint8_t> out, uint64_t seed) {
  uint64_t state = seed;
  size_t i = 0;
  for (; i + 8 <= out.size(); i += 8) {
    uint64_t z = (state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    std::memcpy(out.data() + i, &z, 8);
  }
  for (; i < out.size(); ++i) out[i] = static_cast<uint8_t>(seed + i);
}

}  // namespace meshtrain::test_support
