// Buffers on a CUDA device in the collectives. The plain collectives stage such a buffer
// through host memory (the ring runs over host bytes: one copy in, one copy out); the
// compressed all-reduce encodes and decodes on the device and only payloads cross to the host.
// On the CPU every function here is a plain memcpy or a view of the buffer itself, so the CPU
// and CUDA paths of a collective are the same code.
#pragma once

#include <span>
#include <string_view>
#include <vector>

#include "collective/reused_bytes.h"
#include "kernels/compress/api.h"
#include "meshtrain/compress.h"
#include "meshtrain/core.h"

namespace meshtrain::collective::device {

using compress::CudaStream;

// InvalidArgumentError naming `op` when `buffer` is on a CUDA device and this build has no CUDA.
void require_supported(std::string_view op, const BufferView& buffer);

// Copies all of `buffer`'s bytes to / from host memory; blocks until done.
void copy_to_host(const BufferView& buffer, void* host, CudaStream stream);
void copy_from_host(const void* host, const BufferView& buffer, CudaStream stream);

// Element i of an fp32 buffer (for error messages).
float element(const BufferView& buffer, size_t i, CudaStream stream);
// Index of the first NaN / Inf of an fp32 buffer, or buffer.count.
size_t find_nonfinite(const BufferView& buffer, CudaStream stream);
// buffer[i] *= factor (fp32, rounded as the CPU rounds); blocks.
void scale(const BufferView& buffer, float factor, CudaStream stream);

// Where Snapshots keep their copies, from one step to the next: host memory, and a device
// buffer (allocated once: a cudaMalloc/cudaFree per step would synchronise the whole device).
struct SnapshotSpace {
  ReusedBytes host;
  cuda::compress::DeviceBuffer device;
};

// A copy of a buffer's bytes on the buffer's own device (host memory for a CPU buffer), which
// restore() puts back: reduce_step's inputs for a retry, without a round trip through the host.
// The copy lives in `space`, which must outlive the snapshot and serve no other meanwhile.
class Snapshot {
 public:
  Snapshot(const BufferView& buffer, CudaStream stream, SnapshotSpace& space);
  void restore() const;

 private:
  BufferView buffer_;
  CudaStream stream_;
  void* copy_ = nullptr;
};

// `count` fp32 values on `like`'s device: zeros, or a copy of host values.
class Floats {
 public:
  Floats(size_t count, const BufferView& like);
  Floats(std::span<const float> values, const BufferView& like, CudaStream stream);
  BufferView view() const;

 private:
  BufferView view_;
  std::vector<float> host_;
  cuda::compress::DeviceBuffer device_;
};

// Pinned (when `pin`: CommunicatorOptions::pinned_staging) for the host side of a CUDA
// buffer's copies, pageable otherwise.
inline HostMemory host_memory_for(const BufferView& buffer, bool pin) {
  return pin && buffer.device == DeviceKind::Cuda ? HostMemory::Pinned : HostMemory::Pageable;
}

// A buffer's bytes in host memory: the buffer itself on the CPU, else a host copy in `staging`
// (of `memory`; loaded when `load`) that write_back() copies to the device. `staging` must
// outlive the view and serve no other meanwhile.
class HostView {
 public:
  HostView(const BufferView& buffer, CudaStream stream, ReusedBytes& staging, HostMemory memory, bool load = true);
  const BufferView& view() const { return host_; }
  void write_back();

 private:
  BufferView buffer_;
  BufferView host_;
  CudaStream stream_;
};

}  // namespace meshtrain::collective::device
