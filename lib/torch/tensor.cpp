// torch tensors <-> meshtrain buffer views.
#include <ATen/ATen.h>

#include <fmt/ranges.h>

#include <numeric>

#include "internal.h"
#include "meshtrain/torch.h"

namespace meshtrain::torch_glue {

DType dtype_of(const at::Tensor& tensor, std::string_view name) {
  switch (tensor.scalar_type()) {
    case at::kFloat: return DType::Float32;
    case at::kHalf: return DType::Float16;
    case at::kBFloat16: return DType::BFloat16;
    case at::kLong: return DType::Int64;
    case at::kByte: return DType::UInt8;
    case at::kInt: return DType::Int32;
    default:
      throw InvalidArgumentError(fmt::format("{}: dtype {} has no meshtrain dtype (float32, float16, bfloat16, int64, "
                                             "uint8, int32): convert it first",
                                             name, c10::toString(tensor.scalar_type())));
  }
}

namespace internal {

at::ScalarType scalar_type_of(DType dtype) {
  switch (dtype) {
    case DType::Float32: return at::kFloat;
    case DType::Float16: return at::kHalf;
    case DType::BFloat16: return at::kBFloat16;
    case DType::Int64: return at::kLong;
    case DType::UInt8: return at::kByte;
    case DType::Int32: return at::kInt;
  }
  throw InvalidArgumentError(fmt::format("dtype {} has no torch dtype", static_cast<int>(dtype)));
}

}  // namespace internal

BufferView to_buffer_view(const at::Tensor& tensor, std::string_view name) {
  if (!tensor.defined()) throw InvalidArgumentError(fmt::format("{}: the tensor is undefined", name));
  DType dtype = dtype_of(tensor, name);
  if (!tensor.is_contiguous())
    throw InvalidArgumentError(fmt::format("{}: the tensor is not contiguous (strides [{}]): call .contiguous() first", name,
                                           fmt::join(tensor.strides(), ", ")));
  BufferView view;
  view.data = tensor.numel() ? tensor.data_ptr() : nullptr;
  view.count = static_cast<size_t>(tensor.numel());
  view.dtype = dtype;
  if (tensor.is_cuda()) {
    view.device = DeviceKind::Cuda;
    view.device_index = tensor.get_device();
  } else if (tensor.is_cpu()) {
    view.device = DeviceKind::Cpu;
  } else {
    throw InvalidArgumentError(fmt::format("{}: tensors on {} are not supported (CPU or CUDA)", name, tensor.device().str()));
  }
  return view;
}

at::Tensor from_buffer_view(const BufferView& view, std::span<const int64_t> shape) {
  int64_t elements = std::accumulate(shape.begin(), shape.end(), int64_t{1}, std::multiplies<>());
  if (elements < 0 || static_cast<size_t>(elements) != view.count)
    throw InvalidArgumentError(fmt::format("buffer of {} elements cannot have shape [{}]", view.count, fmt::join(shape, ", ")));
  auto options = at::TensorOptions().dtype(internal::scalar_type_of(view.dtype));
  options = view.device == DeviceKind::Cuda ? options.device(at::kCUDA, static_cast<c10::DeviceIndex>(view.device_index))
                                            : options.device(at::kCPU);
  // An empty view has no data pointer, which from_blob cannot place on a CUDA device.
  if (view.count == 0) return at::empty(at::IntArrayRef(shape.data(), shape.size()), options);
  return at::from_blob(view.data, at::IntArrayRef(shape.data(), shape.size()), options);
}

checkpoint::TensorView to_tensor_view(const at::Tensor& tensor, std::string name) {
  BufferView buffer = to_buffer_view(tensor, name);
  if (buffer.device != DeviceKind::Cpu)
    throw InvalidArgumentError(fmt::format("{}: the tensor is on {}; checkpoints take CPU tensors (snapshot() copies "
                                           "device tensors to pinned host memory)",
                                           name, tensor.device().str()));
  auto sizes = tensor.sizes();
  return checkpoint::TensorView{std::move(name), std::vector<int64_t>(sizes.begin(), sizes.end()), buffer};
}

}  // namespace meshtrain::torch_glue
