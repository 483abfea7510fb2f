// int8 blockwise: one fp32 scale (absmax / 127) per block of block_size elements, and one
// signed byte per element, rounded to nearest even or stochastically. With error feedback the
// codec quantizes v = grad + residual and keeps residual = v - decoded(v) for the next step.
//
// Error bound per element: |decoded - v| <= scale / 2 (nearest) or < scale (stochastic),
// scale = max |v| over the element's block / 127.
//
// CPU: per block, pass 1 forms v and its absmax from the bits of |v| (an integer max, which g++
// vectorises); pass 2 quantizes the block while it is still in L1 and leaves the new residual.
// The CUDA kernel (kernels/compress/int8.cu) does both in one pass per block with the same
// element math (codec_math.h).
//
// NaN/Inf with error feedback: the state must be unchanged after a rejected gradient, but the
// gradient is only known to be finite once it has all been read. A state encoded before
// (steady state) is therefore double-buffered on the CPU: the new residual goes to a second
// buffer, and the two swap when the whole gradient has passed; a NaN/Inf shows in the block's
// absmax (|NaN| and |Inf| have the largest keys) at no cost in the loop. The old residual is
// never written, so nothing has to be restored. The price is 4 bytes per element more for a
// state that is encoded repeatedly. A state's first unstaged encode (and blocks over kChunk)
// scans the gradient first and updates the residual in place instead (a one-off state, e.g. a
// clone, would allocate and page-fault the second buffer for one use). Staged encodes
// (compress.h; the compressed all-reduce) always take the double-buffered loop and leave the
// new residual in the second buffer until commit_staged() swaps it in. Both loops produce the
// same bits.
#include <cstring>

#include "compress/common.h"

namespace meshtrain::compress {
namespace {

using namespace detail;

constexpr size_t kChunk = 4096;

class Int8State final : public ResidualState {
 public:
  Int8State(TensorSpec spec, bool error_feedback) : ResidualState(CodecId::Int8, std::move(spec), error_feedback) {}
  Int8State(const Int8State& other) : ResidualState(other) {}  // without the scratch
  std::unique_ptr<CodecState> clone() const override { return std::make_unique<Int8State>(*this); }

  kc::DeviceBuffer staging_buffer;
};

// The loops, compiled per CPU level (MT_VECTOR_CLONES).

// Quantizes x[0, n) into scales (one float per block) and q (one byte per element). With a
// residual r: pass 1 forms v = x + r in place in r, pass 2 quantizes v while the block is in
// L1 and leaves r = v - decoded(v); the caller has checked x for NaN/Inf. Without a residual
// the check is fused into pass 1 (nothing to protect): returns the index of the first NaN/Inf
// (the payload is then partly written), or n.
MT_VECTOR_CLONES size_t quantize_loop(const float* __restrict x, float* __restrict r, size_t n, size_t block,
                                      bool stochastic, uint64_t seed, uint64_t step, uint8_t* scales,
                                      uint8_t* __restrict q) {
  const size_t blocks = (n + block - 1) / block;
  for (size_t b = 0; b < blocks; ++b) {
    const size_t begin = b * block, len = std::min(block, n - begin);
    const float* __restrict xb = x + begin;
    const float* v = xb;
    uint32_t absmax_key = 0;
    if (r != nullptr) {
      float* __restrict rb = r + begin;
      for (size_t i = 0; i < len; ++i) {
        const float vi = math::add_rn(xb[i], rb[i]);
        rb[i] = vi;
        const uint32_t a = math::f2u(vi) & 0x7fffffffu;
        absmax_key = a > absmax_key ? a : absmax_key;
      }
      v = rb;
    } else {
      uint32_t bad = 0;
      for (size_t i = 0; i < len; ++i) {
        const uint32_t bits = math::f2u(xb[i]);
        bad |= math::nonfinite(bits);
        const uint32_t a = bits & 0x7fffffffu;
        absmax_key = a > absmax_key ? a : absmax_key;
      }
      if (bad) return begin + find_nonfinite(xb, len);
    }
    const float absmax = math::u2f(absmax_key);
    const float scale = math::int8_scale(absmax), inverse = math::int8_inverse(absmax);
    store<float>(scales, b, scale);
    const uint32_t key = stochastic ? math::block_key(seed, step, b) : 0;
    for (size_t c = 0; c < len; c += kChunk) {
      const size_t m = std::min(kChunk, len - c);
      int8_t tmp[kChunk];
      float* rc = r != nullptr ? r + begin + c : nullptr;
      const float* vc = v + c;
      if (stochastic) {
        for (size_t i = 0; i < m; ++i) {
          const float u = math::noise(key, static_cast<uint32_t>(c + i));
          tmp[i] = static_cast<int8_t>(static_cast<int32_t>(math::int8_stochastic(vc[i], inverse, u)));
        }
        if (rc != nullptr)
          for (size_t i = 0; i < m; ++i)
            rc[i] = math::sub_rn(vc[i], math::int8_value(static_cast<float>(tmp[i]), scale));
      } else if (rc != nullptr) {
        // vc is rc: keep q as floats in an L1 buffer, narrow to bytes in a second loop (one
        // loop doing both spills vector registers; see quantize_feedback_loop).
        alignas(64) float t[kChunk];
        for (size_t i = 0; i < m; ++i) {
          t[i] = math::int8_nearest(vc[i], inverse);
          rc[i] = math::sub_rn(vc[i], math::int8_value(t[i], scale));
        }
        for (size_t i = 0; i < m; ++i) tmp[i] = static_cast<int8_t>(static_cast<int32_t>(t[i]));
      } else {
        for (size_t i = 0; i < m; ++i)
          tmp[i] = static_cast<int8_t>(static_cast<int32_t>(math::int8_nearest(vc[i], inverse)));
      }
      std::memcpy(q + begin + c, tmp, m);
    }
  }
  return n;
}

// The double-buffered form of quantize_loop with a residual (block <= kChunk): reads x and
// r_old, writes scales, q and r_new = v - decoded(v), never r_old. Returns the index of the
// first NaN/Inf in x, found from the block's absmax before anything of that block is written,
// or n. (A finite x whose sum with the residual overflows is not caught, as in quantize_loop.)
MT_VECTOR_CLONES size_t quantize_feedback_loop(const float* __restrict x, const float* __restrict r_old,
                                               float* __restrict r_new, size_t n, size_t block,
                                               bool stochastic, uint64_t seed, uint64_t step,
                                               uint8_t* scales, uint8_t* __restrict q) {
  const size_t blocks = (n + block - 1) / block;
  alignas(64) float v[kChunk];
  alignas(64) int8_t tmp[kChunk];
  for (size_t b = 0; b < blocks; ++b) {
    const size_t begin = b * block, len = std::min(block, n - begin);
    const float* __restrict xb = x + begin;
    const float* __restrict rb = r_old + begin;
    uint32_t absmax_key = 0;
    for (size_t i = 0; i < len; ++i) {
      const float vi = math::add_rn(xb[i], rb[i]);
      v[i] = vi;
      const uint32_t a = math::f2u(vi) & 0x7fffffffu;
      absmax_key = a > absmax_key ? a : absmax_key;
    }
    // v is NaN/Inf where x is (the residual is finite); the rare hit names x's element.
    if (absmax_key >= 0x7f800000u) {
      const size_t bad = find_nonfinite(xb, len);
      if (bad < len) return begin + bad;
    }
    const float absmax = math::u2f(absmax_key);
    const float scale = math::int8_scale(absmax), inverse = math::int8_inverse(absmax);
    store<float>(scales, b, scale);
    float* __restrict rb_new = r_new + begin;
    if (stochastic) {
      const uint32_t key = math::block_key(seed, step, b);
      for (size_t i = 0; i < len; ++i) {
        const float u = math::noise(key, static_cast<uint32_t>(i));
        tmp[i] = static_cast<int8_t>(static_cast<int32_t>(math::int8_stochastic(v[i], inverse, u)));
      }
      for (size_t i = 0; i < len; ++i)
        rb_new[i] = math::sub_rn(v[i], math::int8_value(static_cast<float>(tmp[i]), scale));
    } else {
      // Two loops: the float work, then the narrowing to bytes (one loop doing both ran out
      // of vector registers and spilled: 10.8 ms against 8.7 ms on 64 MiB).
      for (size_t i = 0; i < len; ++i) {
        const float t = math::int8_nearest(v[i], inverse);
        rb_new[i] = math::sub_rn(v[i], math::int8_value(t, scale));
        v[i] = t;
      }
      for (size_t i = 0; i < len; ++i) tmp[i] = static_cast<int8_t>(static_cast<int32_t>(v[i]));
    }
    std::memcpy(q + begin, tmp, len);
  }
  return n;
}

MT_VECTOR_CLONES void dequantize_loop(const uint8_t* scales, const uint8_t* q, size_t n, size_t block,
                                      float* out, bool accumulate) {
  const size_t blocks = (n + block - 1) / block;
  for (size_t b = 0; b < blocks; ++b) {
    const size_t begin = b * block, len = std::min(block, n - begin);
    const float scale = load<float>(scales, b);
    for (size_t c = 0; c < len; c += kChunk) {
      const size_t m = std::min(kChunk, len - c);
      int8_t tmp[kChunk];
      std::memcpy(tmp, q + begin + c, m);
      float* oc = out + begin + c;
      if (accumulate) {
        for (size_t i = 0; i < m; ++i) oc[i] += math::int8_value(static_cast<float>(tmp[i]), scale);
      } else {
        for (size_t i = 0; i < m; ++i) oc[i] = math::int8_value(static_cast<float>(tmp[i]), scale);
      }
    }
  }
}

class Int8Codec final : public ApplyingCodec {
 public:
  explicit Int8Codec(const Int8Options& o) : o_(o) {
    if (o.block_size < 1 || o.block_size > kMaxInt8Block)
      throw InvalidArgumentError(
          fmt::format("int8 codec: block_size {} (1 ..= {})", o.block_size, kMaxInt8Block));
  }

  CodecId id() const noexcept override { return CodecId::Int8; }
  std::string describe() const override {
    return fmt::format("int8(block_size={}, rounding={}, seed={}, error_feedback={})", o_.block_size,
                       o_.rounding == Rounding::Nearest ? "nearest" : "stochastic", o_.seed,
                       o_.error_feedback ? "on" : "off");
  }

  std::unique_ptr<CodecState> make_state(const TensorSpec& spec) const override {
    check_device_supported("int8", spec.device, spec.device_index);
    return std::make_unique<Int8State>(spec, o_.error_feedback);
  }
  size_t encoded_bytes(const TensorSpec& spec) const override { return payload_bytes(header(spec.count())); }

  size_t encode(BufferView grad, CodecState& state, std::span<uint8_t> out,
                CudaStream stream) const override {
    check_grad(id(), grad, state);
    auto& s = state_as<Int8State>(id(), state);
    s.begin_encode();
    const size_t n = grad.count, bytes = encoded_bytes(s.spec());
    check_capacity(id(), out, bytes);
    // A NaN/Inf gradient must leave the residual as it was. The CPU's double-buffered loop
    // (a state encoded before, or any staged encode) checks as it goes and never writes the
    // old residual; so does the loop without error feedback, which has no state to protect.
    // Otherwise (first encode, blocks over kChunk, CUDA) the gradient is scanned before
    // anything changes.
    float* residual = s.residual_data();
    const size_t block = o_.block_size, blocks = (n + block - 1) / block;
    const bool staged = s.staging() && residual != nullptr;
    const bool double_buffered =
        grad.device == DeviceKind::Cpu && residual != nullptr && block <= kChunk && (s.encoded_before() || staged);
    if (grad.device == DeviceKind::Cuda || (residual != nullptr && !double_buffered))
      reject_nonfinite(id(), grad, stream);
    if (staged && grad.device == DeviceKind::Cuda) s.begin_in_place_staged_encode(stream);
    if (staged && !double_buffered && grad.device == DeviceKind::Cpu) {
      // Blocks over kChunk: the in-place loop on a copy, which becomes the pending residual.
      std::vector<float>& pending = s.spare();
      std::memcpy(pending.data(), residual, n * sizeof(float));
      residual = pending.data();
    }
    const bool stochastic = o_.rounding == Rounding::Stochastic;
    const uint64_t step = s.stats().encodes;
    uint8_t* scales = out.data() + kPayloadHeaderBytes;
    uint8_t* q = scales + 4 * blocks;
    if (grad.device == DeviceKind::Cuda) {
      const size_t body = bytes - kPayloadHeaderBytes;
      cuda_call("int8 encode", [&] {
        if (s.staging_buffer.bytes() < body) s.staging_buffer = kc::DeviceBuffer(body, grad.device_index);
        float* d_scales = s.staging_buffer.as<float>();
        kc::int8_quantize(static_cast<const float*>(grad.data), residual, n, o_.block_size,
                          stochastic, o_.seed, step, reinterpret_cast<int8_t*>(d_scales + blocks),
                          d_scales, grad.device_index, stream.handle);
        kc::copy_async(scales, s.staging_buffer.data(), body, grad.device_index, stream.handle);
        kc::synchronize(grad.device_index, stream.handle);
      });
    } else if (double_buffered) {
      if (quantize_feedback_loop(static_cast<const float*>(grad.data), residual, s.spare().data(), n,
                                 block, stochastic, o_.seed, step, scales, q) < n)
        reject_nonfinite(id(), grad, stream);  // throws; the residual was only read
      if (!staged) s.swap_residual();          // staged: the spare is the pending residual
    } else {
      if (quantize_loop(static_cast<const float*>(grad.data), residual, n, block, stochastic, o_.seed, step,
                        scales, q) < n)
        reject_nonfinite(id(), grad, stream);
      if (!staged) s.mark_encoded();
    }
    write_header(out, header(n));
    s.record(bytes);
    return bytes;
  }

 private:
  Header header(size_t count) const {
    return Header{CodecId::Int8, static_cast<uint8_t>(o_.rounding == Rounding::Stochastic), count,
                  o_.block_size, 0};
  }

  // The payload's own block size is authoritative (it is self-describing).
  void apply(std::span<const uint8_t> payload, BufferView out, bool accumulate,
             CudaStream stream) const override {
    check_fp32(accumulate ? "int8 decode_accumulate" : "int8 decode", "output", out, out.count);
    const Header h = read_header_for(payload, id(), out.count);
    const size_t n = out.count, block = h.param_a, blocks = (n + block - 1) / block;
    const uint8_t* scales = payload.data() + kPayloadHeaderBytes;
    const uint8_t* q = scales + 4 * blocks;
    for (size_t b = 0; b < blocks; ++b) {
      const float sc = load<float>(scales, b);
      // An encoder's scale is absmax / 127 of finite values, at most kInt8MaxScale: anything
      // else is corrupt (and a larger one would dequantise to Inf).
      if (!(sc >= 0.0f && sc <= math::kInt8MaxScale))
        throw CorruptError(fmt::format(
            "int8 payload: scale {} of {} is {} (must be in [0, {}])", b, blocks, sc, math::kInt8MaxScale));
    }
    // Encoders write quanta in [-127, 127]; -128 times the largest scale would be -Inf.
    if (const void* at = n > 0 ? std::memchr(q, 0x80, n) : nullptr)
      throw CorruptError(fmt::format("int8 payload: value {} of {} is -128 (quanta are in [-127, 127])",
                                     static_cast<const uint8_t*>(at) - q, n));
    if (out.device == DeviceKind::Cuda) {
      auto d = upload(payload.subspan(kPayloadHeaderBytes), out.device_index, stream);
      cuda_call("int8 decode", [&] {
        kc::int8_dequantize(reinterpret_cast<const int8_t*>(d.as<float>() + blocks), d.as<float>(), n,
                            static_cast<uint32_t>(block), static_cast<float*>(out.data), accumulate,
                            out.device_index, stream.handle);
        kc::synchronize(out.device_index, stream.handle);
      });
      return;
    }
    dequantize_loop(scales, q, n, block, static_cast<float*>(out.data), accumulate);
  }

  Int8Options o_;
};

}  // namespace

std::unique_ptr<Codec> make_int8_codec(const Int8Options& options) {
  return std::make_unique<Int8Codec>(options);
}

}  // namespace meshtrain::compress
