// none: the fp32 gradient as it is, behind the common header. The baseline the other codecs
// are measured against, and what PowerSGD sends for tensors it does not compress.
#include "compress/common.h"

namespace meshtrain::compress {
namespace {

using namespace detail;

class NoneState final : public StateBase {
 public:
  explicit NoneState(TensorSpec spec) : StateBase(CodecId::None, std::move(spec)) {}
  std::unique_ptr<CodecState> clone() const override { return std::make_unique<NoneState>(*this); }
};

class NoneCodec final : public ApplyingCodec {
 public:
  CodecId id() const noexcept override { return CodecId::None; }
  std::string describe() const override { return "none"; }

  std::unique_ptr<CodecState> make_state(const TensorSpec& spec) const override {
    check_device_supported("none", spec.device, spec.device_index);
    return std::make_unique<NoneState>(spec);
  }
  size_t encoded_bytes(const TensorSpec& spec) const override {
    return payload_bytes(Header{CodecId::None, 0, spec.count(), 0, 0});
  }

  size_t encode(BufferView grad, CodecState& state, std::span<uint8_t> out,
                CudaStream stream) const override {
    check_grad(id(), grad, state);
    auto& s = state_as<NoneState>(id(), state);
    s.begin_encode();
    const size_t n = grad.count, bytes = encoded_bytes(s.spec());
    check_capacity(id(), out, bytes);
    reject_nonfinite(id(), grad, stream);
    if (grad.device == DeviceKind::Cuda) {
      cuda_call("none encode", [&] {
        kc::copy_async(out.data() + kPayloadHeaderBytes, grad.data, n * 4, grad.device_index, stream.handle);
        kc::synchronize(grad.device_index, stream.handle);
      });
    } else if (n > 0) {
      std::memcpy(out.data() + kPayloadHeaderBytes, grad.data, n * 4);
    }
    write_header(out, Header{id(), 0, n, 0, 0});
    s.record(bytes);
    return bytes;
  }

 private:
  void apply(std::span<const uint8_t> payload, BufferView out, bool accumulate, CudaStream stream) const override {
    check_fp32(accumulate ? "none decode_accumulate" : "none decode", "output", out, out.count);
    read_header_for(payload, id(), out.count);
    const uint8_t* body = payload.data() + kPayloadHeaderBytes;
    require_finite_bytes(id(), "value", body, out.count);
    if (out.device == DeviceKind::Cuda) {
      auto d = upload(payload.subspan(kPayloadHeaderBytes), out.device_index, stream);
      cuda_call("none decode", [&] {
        if (accumulate)
          kc::add_async(static_cast<float*>(out.data), d.as<float>(), out.count, out.device_index, stream.handle);
        else
          kc::copy_async(out.data, d.data(), out.count * 4, out.device_index, stream.handle);
        kc::synchronize(out.device_index, stream.handle);
      });
      return;
    }
    float* o = static_cast<float*>(out.data);
    if (!accumulate) {
      if (out.count > 0) std::memcpy(o, body, out.count * 4);
      return;
    }
    constexpr size_t kChunk = 2048;
    float tmp[kChunk];
    for (size_t base = 0; base < out.count; base += kChunk) {
      const size_t m = std::min(kChunk, out.count - base);
      std::memcpy(tmp, body + base * 4, m * 4);
      for (size_t i = 0; i < m; ++i) o[base + i] += tmp[i];
    }
  }
};

}  // namespace

std::unique_ptr<Codec> make_none_codec() { return std::make_unique<NoneCodec>(); }

}  // namespace meshtrain::compress
