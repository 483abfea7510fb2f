// Gradient codecs on torch tensors, on torch's current CUDA stream.
#include <ATen/ATen.h>

#include <fmt/format.h>

#include "meshtrain/torch.h"

// Set by lib/torch/CMakeLists.txt when torch was built with CUDA (it then has c10_cuda): the
// only way every torch version names a stream's cudaStream_t. A CPU-only torch has no CUDA
// tensors, so it never needs one.
#if MESHTRAIN_TORCH_HAS_CUDA
#include <c10/cuda/CUDAStream.h>
#endif

namespace meshtrain::torch_glue {
namespace {

// Runs `call`, putting `name` in front of the message of the errors that a tensor or payload
// causes, with their types kept.
template <class Call>
decltype(auto) naming(std::string_view name, Call&& call) {
  try {
    return call();
  } catch (const InvalidArgumentError& e) {
    throw InvalidArgumentError(fmt::format("{}: {}", name, e.what()));
  } catch (const ProtocolError& e) {
    throw ProtocolError(fmt::format("{}: {}", name, e.what()));
  } catch (const CorruptError& e) {
    throw CorruptError(fmt::format("{}: {}", name, e.what()));
  }
}

}  // namespace

compress::CudaStream current_cuda_stream(int device_index) {
#if MESHTRAIN_TORCH_HAS_CUDA
  const int devices = static_cast<int>(c10::cuda::device_count());
  if (device_index < 0 || device_index >= devices)
    throw InvalidArgumentError(fmt::format("current CUDA stream of cuda:{}: torch sees {} CUDA device(s)", device_index,
                                           devices));
  return compress::CudaStream{c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(device_index)).stream()};
#else
  throw InvalidArgumentError(fmt::format(
      "current CUDA stream of cuda:{}: this torch was built without CUDA (meshtrain_torch was built against it)",
      device_index));
#endif
}

compress::CudaStream current_stream_of(const at::Tensor& tensor) {
  if (tensor.defined() && tensor.is_cuda()) return current_cuda_stream(tensor.get_device());
  return {};
}

compress::TensorSpec tensor_spec(const at::Tensor& tensor, std::string_view name) {
  BufferView view = to_buffer_view(tensor, name);
  compress::TensorSpec spec;
  for (int64_t size : tensor.sizes()) spec.shape.push_back(static_cast<size_t>(size));
  spec.device = view.device;
  spec.device_index = view.device_index;
  return spec;
}

std::unique_ptr<compress::CodecState> make_state(const compress::Codec& codec, const at::Tensor& like,
                                                 std::string_view name) {
  compress::TensorSpec spec = tensor_spec(like, name);
  return naming(name, [&] { return codec.make_state(spec); });
}

size_t encode(const compress::Codec& codec, const at::Tensor& grad, compress::CodecState& state,
              std::span<uint8_t> out, std::string_view name) {
  BufferView view = to_buffer_view(grad, name);
  compress::CudaStream stream = current_stream_of(grad);
  return naming(name, [&] { return codec.encode(view, state, out, stream); });
}

std::vector<uint8_t> encode(const compress::Codec& codec, const at::Tensor& grad, compress::CodecState& state,
                            std::string_view name) {
  std::vector<uint8_t> payload(codec.encoded_bytes(state.spec()));
  payload.resize(encode(codec, grad, state, payload, name));
  return payload;
}

void decode(const compress::Codec& codec, std::span<const uint8_t> payload, const at::Tensor& out,
            std::string_view name) {
  BufferView view = to_buffer_view(out, name);
  compress::CudaStream stream = current_stream_of(out);
  naming(name, [&] { codec.decode(payload, view, stream); });
}

void decode_accumulate(const compress::Codec& codec, std::span<const uint8_t> payload, const at::Tensor& out,
                       std::string_view name) {
  BufferView view = to_buffer_view(out, name);
  compress::CudaStream stream = current_stream_of(out);
  naming(name, [&] { codec.decode_accumulate(payload, view, stream); });
}

}  // namespace meshtrain::torch_glue
