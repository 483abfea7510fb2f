// Host memory kept from one collective operation to the next (see ReusedBytes).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>

namespace meshtrain::collective {

// Pageable host memory, or page-locked memory for bytes that cross to and from a CUDA device:
// those copies then run by DMA at the link's speed instead of through the driver's bounce
// buffer (and a pageable cudaMemcpyAsync blocks the host while it lasts).
enum class HostMemory { Pageable, Pinned };

// Frees what ReusedBytes allocated, of either kind.
struct HostBytesFree {
  HostMemory memory = HostMemory::Pageable;
  void operator()(uint8_t* p) const noexcept;
};

// Host bytes reused across operations: grown, never shrunk, never zeroed. A 64 MiB compressed
// all-reduce with `none` allocated, zeroed and page-faulted about 250 MiB per operation before
// (22–26% of its time on loopback, docs/benchmarks.md); reduce_step copied the gradients aside
// into fresh memory every step, and the plain collectives staged a CUDA buffer through a fresh
// zeroed vector.
//
// Pinned memory is allocated once and kept: locking pages costs far more than the copies it
// speeds up. Where the allocation is refused (the host short of memory it can lock, say), the
// bytes are pageable instead, with one warning per process, and later takes of no more
// bytes do not ask again.
class ReusedBytes {
 public:
  ReusedBytes() = default;
  ReusedBytes(ReusedBytes&& other) noexcept;
  ReusedBytes& operator=(ReusedBytes&& other) noexcept;
  ~ReusedBytes() = default;

  // `bytes` bytes of `memory` (new ones uninitialised; the old contents when it did not grow
  // and the kind stayed). Throws std::bad_alloc when even pageable memory is refused.
  std::span<uint8_t> take(size_t bytes, HostMemory memory = HostMemory::Pageable);
  // The same, as floats (both allocators' alignment serves them).
  std::span<float> take_floats(size_t count, HostMemory memory = HostMemory::Pageable) {
    return {reinterpret_cast<float*>(take(count * sizeof(float), memory).data()), count};
  }
  // What the held bytes are (Pageable also after a refused pinned allocation).
  HostMemory memory() const { return held_; }

 private:
  std::unique_ptr<uint8_t[], HostBytesFree> data_;
  size_t capacity_ = 0;
  HostMemory held_ = HostMemory::Pageable;
  bool pin_refused_ = false;  // the held pageable bytes stand in for refused pinned ones
};

}  // namespace meshtrain::collective
