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
// speeds up (and freeing it synchronises the device), so it grows by at least half each time,
// and it also serves takes of pageable memory. Where the host refuses to lock memory, the bytes
// are pageable instead, with one warning per process, and later takes of no more bytes do not
// ask again.
class ReusedBytes {
 public:
  ReusedBytes() = default;
  ReusedBytes(ReusedBytes&& other) noexcept;
  ReusedBytes& operator=(ReusedBytes&& other) noexcept;
  ~ReusedBytes() = default;

  // `bytes` bytes of `memory` (pinned: in CUDA device `device`'s context); new ones
  // uninitialised, the old contents when nothing was allocated. Throws std::bad_alloc when
  // even pageable memory is refused, InternalError on a CUDA error other than a refusal.
  std::span<uint8_t> take(size_t bytes, HostMemory memory = HostMemory::Pageable, int device = 0);
  // The same, as floats (both allocators' alignment serves them).
  std::span<float> take_floats(size_t count, HostMemory memory = HostMemory::Pageable, int device = 0) {
    return {reinterpret_cast<float*>(take(count * sizeof(float), memory, device).data()), count};
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
