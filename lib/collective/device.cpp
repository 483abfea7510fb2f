#include "collective/device.h"

#include <cstring>

#include "compress/common.h"

namespace meshtrain::collective::device {

namespace kc = cuda::compress;
using compress::detail::cuda_call;

namespace {

bool on_cuda(const BufferView& b) { return b.device == DeviceKind::Cuda; }

void copy(void* dst, const void* src, size_t bytes, const BufferView& device_side, CudaStream stream,
          std::string_view what) {
  cuda_call(what, [&] {
    kc::copy_async(dst, src, bytes, device_side.device_index, stream.handle);
    kc::synchronize(device_side.device_index, stream.handle);
  });
}

}  // namespace

void require_supported(std::string_view op, const BufferView& buffer) {
  compress::detail::check_device_supported(op, buffer.device, buffer.device_index);
}

void copy_to_host(const BufferView& buffer, void* host, CudaStream stream) {
  if (!on_cuda(buffer)) {
    if (buffer.bytes()) std::memcpy(host, buffer.data, buffer.bytes());
    return;
  }
  copy(host, buffer.data, buffer.bytes(), buffer, stream, "copying a collective's buffer to the host");
}

void copy_from_host(const void* host, const BufferView& buffer, CudaStream stream) {
  if (!on_cuda(buffer)) {
    if (buffer.bytes()) std::memcpy(buffer.data, host, buffer.bytes());
    return;
  }
  copy(buffer.data, host, buffer.bytes(), buffer, stream, "copying a collective's result to the device");
}

float element(const BufferView& buffer, size_t i, CudaStream stream) {
  BufferView one = buffer;
  one.data = static_cast<float*>(buffer.data) + i;
  one.count = 1;
  float v = 0;
  copy_to_host(one, &v, stream);
  return v;
}

size_t find_nonfinite(const BufferView& buffer, CudaStream stream) {
  return compress::detail::find_nonfinite(buffer, stream);
}

void scale(const BufferView& buffer, float factor, CudaStream stream) {
  float* x = static_cast<float*>(buffer.data);
  if (!on_cuda(buffer)) {
    for (size_t i = 0; i < buffer.count; ++i) x[i] *= factor;
    return;
  }
  cuda_call("scaling a collective's result on the device", [&] {
    kc::scale_async(x, buffer.count, factor, buffer.device_index, stream.handle);
    kc::synchronize(buffer.device_index, stream.handle);
  });
}

Snapshot::Snapshot(const BufferView& buffer, CudaStream stream, SnapshotSpace& space)
    : buffer_(buffer), stream_(stream) {
  if (!on_cuda(buffer)) {
    copy_ = space.host.take(buffer.bytes()).data();
    copy_to_host(buffer, copy_, stream);
    return;
  }
  if (space.device.bytes() < buffer.bytes() || space.device.device() != buffer.device_index) {
    space.device = {};  // not old and new at once
    space.device = cuda_call("allocating a device buffer",
                             [&] { return kc::DeviceBuffer(buffer.bytes(), buffer.device_index); });
  }
  copy_ = space.device.data();
  copy(copy_, buffer.data, buffer.bytes(), buffer, stream, "copying a step's gradients aside on the device");
}

void Snapshot::restore() const {
  if (!on_cuda(buffer_)) {
    copy_from_host(copy_, buffer_, stream_);
    return;
  }
  copy(buffer_.data, copy_, buffer_.bytes(), buffer_, stream_, "restoring a step's gradients on the device");
}

Floats::Floats(size_t count, const BufferView& like) : view_{nullptr, count, DType::Float32, like.device, like.device_index} {
  if (on_cuda(like)) {
    device_ = cuda_call("allocating a device buffer",
                        [&] { return kc::DeviceBuffer(count * sizeof(float), like.device_index); });  // zero-filled
    view_.data = device_.data();
  } else {
    host_.assign(count, 0.0f);
    view_.data = host_.data();
  }
}

Floats::Floats(std::span<const float> values, const BufferView& like, CudaStream stream) : Floats(values.size(), like) {
  copy_from_host(values.data(), view_, stream);
}

BufferView Floats::view() const { return view_; }

HostView::HostView(const BufferView& buffer, CudaStream stream, ReusedBytes& staging, HostMemory memory, bool load)
    : buffer_(buffer), host_(buffer), stream_(stream) {
  if (!on_cuda(buffer)) return;
  host_.data = staging.take(buffer.bytes(), memory, buffer.device_index).data();
  host_.device = DeviceKind::Cpu;
  host_.device_index = 0;
  if (load) copy_to_host(buffer, host_.data, stream);
}

void HostView::write_back() {
  if (on_cuda(buffer_)) copy_from_host(host_.data, buffer_, stream_);
}

}  // namespace meshtrain::collective::device
