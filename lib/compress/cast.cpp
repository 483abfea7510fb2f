// fp16 and bf16: one codec each, the same algorithm over two formats. Round to nearest even;
// values whose magnitude would round past the format's largest finite value are clamped to it
// and counted (CodecStats::last_clamped), non-zero values that round to zero are counted
// (last_flushed). No error feedback: the cast's error is at most half an ulp of the format.
//
// CPU: branch-free element math (kernels/compress/codec_math.h) over chunks of 4096 elements
// that fit in L1, so that g++ vectorises it; the CUDA path (kernels/compress/cast.cu) applies
// the same math per thread.
#include "compress/common.h"

namespace meshtrain::compress {
namespace {

using namespace detail;

struct Fp16Format {
  static constexpr CodecId kId = CodecId::Fp16;
  static uint16_t encode(uint32_t bits, uint32_t& clamped, uint32_t& flushed) {
    return math::fp32_to_fp16(bits, clamped, flushed);
  }
  static float decode(uint16_t h) { return math::fp16_to_fp32(h); }
  static uint32_t special(uint16_t h) { return math::fp16_special(h); }
  static kc::CastCounts cuda_encode(const float* x, uint16_t* out, size_t n, int dev, void* s) {
    return kc::fp32_to_fp16(x, out, n, dev, s);
  }
  static void cuda_decode(const uint16_t* in, float* out, size_t n, bool acc, int dev, void* s) {
    kc::fp16_to_fp32(in, out, n, acc, dev, s);
  }
};

struct Bf16Format {
  static constexpr CodecId kId = CodecId::Bf16;
  static uint16_t encode(uint32_t bits, uint32_t& clamped, uint32_t& flushed) {
    return math::fp32_to_bf16(bits, clamped, flushed);
  }
  static float decode(uint16_t h) { return math::bf16_to_fp32(h); }
  static uint32_t special(uint16_t h) { return math::bf16_special(h); }
  static kc::CastCounts cuda_encode(const float* x, uint16_t* out, size_t n, int dev, void* s) {
    return kc::fp32_to_bf16(x, out, n, dev, s);
  }
  static void cuda_decode(const uint16_t* in, float* out, size_t n, bool acc, int dev, void* s) {
    kc::bf16_to_fp32(in, out, n, acc, dev, s);
  }
};

constexpr size_t kChunk = 4096;

// The loops, compiled per CPU level (MT_VECTOR_CLONES). Chunks of 4096 elements go through an
// aligned L1-resident buffer, so the payload needs no alignment.

// Encodes x[0, n) into body; returns the index of the first NaN/Inf (stopping there), or n.
template <typename F>
MT_VECTOR_CLONES size_t encode_loop(const float* x, size_t n, uint8_t* body, uint64_t& clamped,
                                    uint64_t& flushed) {
  uint16_t tmp[kChunk];
  for (size_t base = 0; base < n; base += kChunk) {
    const size_t m = std::min(kChunk, n - base);
    uint32_t c = 0, f = 0, bad = 0;
    for (size_t i = 0; i < m; ++i) {
      const uint32_t bits = math::f2u(x[base + i]);
      bad |= math::nonfinite(bits);
      tmp[i] = F::encode(bits, c, f);
    }
    if (bad) return base + find_nonfinite(x + base, m);
    std::memcpy(body + base * 2, tmp, m * 2);
    clamped += c;
    flushed += f;
  }
  return n;
}

// Index of the first Inf/NaN half in the body, or n.
template <typename F>
MT_VECTOR_CLONES size_t find_special(const uint8_t* body, size_t n) {
  uint16_t tmp[kChunk];
  for (size_t base = 0; base < n; base += kChunk) {
    const size_t m = std::min(kChunk, n - base);
    std::memcpy(tmp, body + base * 2, m * 2);
    uint32_t bad = 0;
    for (size_t i = 0; i < m; ++i) bad |= F::special(tmp[i]);
    if (bad)
      for (size_t i = 0; i < m; ++i)
        if (F::special(tmp[i])) return base + i;
  }
  return n;
}

// out (+)= decoded body. Without accumulate the Inf/NaN check is fused: returns the index of
// the first special value (out is then partly written), or n. With accumulate the caller has
// validated the body.
template <typename F>
MT_VECTOR_CLONES size_t decode_loop(const uint8_t* body, size_t n, float* out, bool accumulate) {
  uint16_t tmp[kChunk];
  for (size_t base = 0; base < n; base += kChunk) {
    const size_t m = std::min(kChunk, n - base);
    std::memcpy(tmp, body + base * 2, m * 2);
    float* oc = out + base;
    if (accumulate) {
      for (size_t i = 0; i < m; ++i) oc[i] += F::decode(tmp[i]);
    } else {
      uint32_t bad = 0;
      for (size_t i = 0; i < m; ++i) {
        bad |= F::special(tmp[i]);
        oc[i] = F::decode(tmp[i]);
      }
      if (bad) return base + find_special<F>(body + base * 2, m);
    }
  }
  return n;
}

class CastState final : public StateBase {
 public:
  CastState(CodecId id, TensorSpec spec) : StateBase(id, std::move(spec)) {}
  CastState(const CastState& other) : StateBase(other) {}  // without the staging buffer
  std::unique_ptr<CodecState> clone() const override { return std::make_unique<CastState>(*this); }
  kc::DeviceBuffer staging;  // CUDA tensors: the encoded body before it is copied to the host
};

template <typename F>
class CastCodec final : public ApplyingCodec {
 public:
  CodecId id() const noexcept override { return F::kId; }
  std::string describe() const override { return std::string(codec_name(F::kId)); }

  std::unique_ptr<CodecState> make_state(const TensorSpec& spec) const override {
    check_device_supported(name(), spec.device, spec.device_index);
    return std::make_unique<CastState>(F::kId, spec);
  }
  size_t encoded_bytes(const TensorSpec& spec) const override {
    return payload_bytes(Header{F::kId, 0, spec.count(), 0, 0});
  }

  size_t encode(BufferView grad, CodecState& state, std::span<uint8_t> out,
                CudaStream stream) const override {
    check_grad(id(), grad, state);
    auto& s = state_as<CastState>(id(), state);
    s.begin_encode();
    const size_t n = grad.count, bytes = encoded_bytes(s.spec());
    check_capacity(id(), out, bytes);
    uint8_t* body = out.data() + kPayloadHeaderBytes;
    uint64_t clamped = 0, flushed = 0;
    if (grad.device == DeviceKind::Cuda) {
      reject_nonfinite(id(), grad, stream);
      cuda_call(fmt::format("{} encode", name()), [&] {
        if (s.staging.bytes() < n * 2) s.staging = kc::DeviceBuffer(n * 2, grad.device_index);
        kc::CastCounts c = F::cuda_encode(static_cast<const float*>(grad.data),
                                          s.staging.template as<uint16_t>(), n, grad.device_index,
                                          stream.handle);
        kc::copy_async(body, s.staging.data(), n * 2, grad.device_index, stream.handle);
        kc::synchronize(grad.device_index, stream.handle);
        clamped = c.clamped;
        flushed = c.flushed;
      });
    } else {
      // Stateless, so the NaN/Inf check is fused into the conversion: on a bad chunk, throw
      // (out is unspecified, the state's counters unchanged).
      if (encode_loop<F>(static_cast<const float*>(grad.data), n, body, clamped, flushed) < n)
        reject_nonfinite(id(), grad, stream);
    }
    write_header(out, Header{id(), 0, n, 0, 0});
    s.record(bytes, clamped, flushed);
    return bytes;
  }

 private:
  [[noreturn]] void corrupt(size_t index, size_t n) const {
    throw CorruptError(fmt::format("{} payload: element {} of {} is Inf or NaN (encoders clamp and "
                                   "never send them)", name(), index, n));
  }

  void apply(std::span<const uint8_t> payload, BufferView out, bool accumulate,
             CudaStream stream) const override {
    check_fp32(fmt::format("{} {}", name(), accumulate ? "decode_accumulate" : "decode"), "output",
               out, out.count);
    read_header_for(payload, id(), out.count);
    const size_t n = out.count;
    const uint8_t* body = payload.data() + kPayloadHeaderBytes;
    if (out.device == DeviceKind::Cuda || accumulate) {
      // Validate everything first: decode_accumulate leaves `out` unchanged on error.
      if (size_t bad = find_special<F>(body, n); bad < n) corrupt(bad, n);
    }
    if (out.device == DeviceKind::Cuda) {
      auto d = upload(payload.subspan(kPayloadHeaderBytes), out.device_index, stream);
      cuda_call(fmt::format("{} decode", name()), [&] {
        F::cuda_decode(d.template as<uint16_t>(), static_cast<float*>(out.data), n, accumulate,
                       out.device_index, stream.handle);
        kc::synchronize(out.device_index, stream.handle);
      });
      return;
    }
    if (size_t bad = decode_loop<F>(body, n, static_cast<float*>(out.data), accumulate); bad < n)
      corrupt(bad, n);
  }
};

}  // namespace

std::unique_ptr<Codec> make_fp16_codec() { return std::make_unique<CastCodec<Fp16Format>>(); }
std::unique_ptr<Codec> make_bf16_codec() { return std::make_unique<CastCodec<Bf16Format>>(); }

}  // namespace meshtrain::compress
