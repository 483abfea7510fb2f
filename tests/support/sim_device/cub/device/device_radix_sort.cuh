// cub::DeviceRadixSort::SortKeys and cub::DoubleBuffer as kernels/compress/topk.cu uses them, on
// the simulated device (tests/support/sim_device/cuda_runtime_api.h): an ascending sort by the
// key's bits [begin_bit, end_bit), stable as CUB's, with the result left in the buffer
// Current() names.
#pragma once

#include <algorithm>
#include <cstddef>

#include "cuda_runtime_api.h"

namespace cub {

template <typename Key>
struct DoubleBuffer {
  Key* buffers[2] = {nullptr, nullptr};
  int selector = 0;
  DoubleBuffer() = default;
  DoubleBuffer(Key* current, Key* alternate) : buffers{current, alternate} {}
  Key* Current() const { return buffers[selector]; }
  Key* Alternate() const { return buffers[selector ^ 1]; }
};

struct DeviceRadixSort {
  template <typename Key>
  static cudaError_t SortKeys(void* storage, size_t& storage_bytes, DoubleBuffer<Key>& keys, int count,
                              int begin_bit = 0, int end_bit = int(sizeof(Key) * 8), cudaStream_t = nullptr) {
    if (storage == nullptr) {
      storage_bytes = 256;
      return cudaSuccess;
    }
    if (count <= 0) return cudaSuccess;
    const int bits = end_bit - begin_bit;
    const Key mask = bits >= int(sizeof(Key) * 8) ? ~Key(0) : ((Key(1) << bits) - 1) << begin_bit;
    Key* in = keys.Current();
    Key* out = keys.Alternate();
    std::copy(in, in + count, out);
    std::stable_sort(out, out + count, [mask](Key a, Key b) { return (a & mask) < (b & mask); });
    keys.selector ^= 1;  // CUB may leave the result in either buffer: callers read Current()
    return cudaSuccess;
  }
};

}  // namespace cub
