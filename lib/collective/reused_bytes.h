// Host memory kept from one collective operation to the next (see ReusedBytes).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <utility>

namespace meshtrain::collective {

// Host bytes reused across operations: grown, never shrunk, never zeroed. A 64 MiB compressed
// all-reduce with `none` allocated, zeroed and page-faulted about 250 MiB per operation before
// (22–26% of its time on loopback, docs/benchmarks.md); reduce_step copied the gradients aside
// into fresh memory every step.
class ReusedBytes {
 public:
  ReusedBytes() = default;
  ReusedBytes(ReusedBytes&& other) noexcept
      : data_(std::move(other.data_)), capacity_(std::exchange(other.capacity_, 0)) {}
  ReusedBytes& operator=(ReusedBytes&& other) noexcept {
    data_ = std::move(other.data_);
    capacity_ = std::exchange(other.capacity_, 0);
    return *this;
  }
  // `bytes` bytes (new ones uninitialised; the old contents when it did not grow).
  std::span<uint8_t> take(size_t bytes) {
    if (bytes > capacity_) {
      data_.reset();  // not old and new at once
      capacity_ = 0;
      data_ = std::make_unique_for_overwrite<uint8_t[]>(bytes);
      capacity_ = bytes;
    }
    return {data_.get(), bytes};
  }
  // The same, as floats (operator new's alignment serves them).
  std::span<float> take_floats(size_t count) {
    return {reinterpret_cast<float*>(take(count * sizeof(float)).data()), count};
  }

 private:
  std::unique_ptr<uint8_t[]> data_;
  size_t capacity_ = 0;
};

}  // namespace meshtrain::collective
