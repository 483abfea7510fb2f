// Internal helpers shared by the codecs: argument checks, the non-finite scan, and the bridge
// to the CUDA kernels (kernels/compress/api.h).
#pragma once

#include <algorithm>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "compress/payload.h"
#include "kernels/compress/api.h"
#include "kernels/compress/codec_math.h"
#include "meshtrain/compress.h"

// Hot CPU loops are compiled twice, for x86-64-v3 (AVX2, F16C, FMA) and for the baseline, and
// the loader picks one per CPU (GCC function multiversioning): the library stays runnable on
// any x86-64 while using 32-byte vectors where they exist (fp16 encode: ~2x). FMA contraction
// stays off (-ffp-contract=off), so both clones round identically.
// GCC only: Clang has the attribute but not on function templates (cast.cpp's loops are ones),
// so a Clang build gets the baseline loops alone.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__has_attribute)
#if __has_attribute(target_clones)
#define MT_VECTOR_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#endif
#endif
#ifndef MT_VECTOR_CLONES
#define MT_VECTOR_CLONES
#endif

namespace meshtrain::compress::detail {

namespace kc = meshtrain::cuda::compress;

// `buffer` is fp32, `count` elements, 4-byte aligned, on a device this build supports.
// (Payload bytes need no alignment: they are accessed with memcpy.)
void check_fp32(std::string_view codec, std::string_view what, const BufferView& buffer,
                size_t count);
// grad matches the state (fp32, count, device and index) and the state is of `codec`.
void check_grad(CodecId codec, const BufferView& grad, const CodecState& state);
// InvalidArgumentError "<who>: <what> is on cuda:1 but its state was made for cpu:0" unless
// `buffer` is on the device `state` was made for.
void check_state_device(std::string_view who, std::string_view what, const BufferView& buffer,
                        const CodecState& state);
void check_capacity(CodecId codec, std::span<const uint8_t> out, size_t need);
// Throws InvalidArgumentError when `device` is Cuda and meshtrain was built without CUDA.
void check_device_supported(std::string_view who, DeviceKind device, int device_index);

// Index of the first NaN / Inf in x[0, n) (CPU memory), or n.
size_t find_nonfinite(const float* x, size_t n);
// Same for a CPU or CUDA buffer of fp32; blocks.
size_t find_nonfinite(const BufferView& x, CudaStream stream);
// Throws InvalidArgumentError naming the element when x has a NaN / Inf; the state is untouched.
void reject_nonfinite(CodecId codec, const BufferView& x, CudaStream stream);

// Runs a kernels/compress call, turning CudaFailure into InternalError with context.
template <typename F>
auto cuda_call(std::string_view what, F&& f) -> decltype(f()) {
  try {
    return f();
  } catch (const kc::CudaFailure& e) {
    throw InternalError(fmt::format("{}: {}", what, e.what()));
  }
}

// out (+)= x for CPU buffers.
void copy_or_add(float* out, const float* x, size_t n, bool accumulate);

// The dynamic type check of a state: the codec's own state class, or InvalidArgumentError.
template <typename S>
S& state_as(CodecId codec, CodecState& state) {
  auto* s = dynamic_cast<S*>(&state);
  if (s == nullptr)
    throw InvalidArgumentError(fmt::format("{} encode given a state made by the {} codec",
                                           codec_name(codec), codec_name(state.codec())));
  return *s;
}

// A state class's constructor needs CodecState's protected one.
class StateBase : public CodecState {
 public:
  StateBase(CodecId codec, TensorSpec spec) : CodecState(codec, std::move(spec)) {}
  StateBase(const StateBase& other) : CodecState(other) { staging_ = false; }  // a clone is not staging
  using CodecState::mutable_stats;
  void reset() override {
    discard_staged();
    mutable_stats() = CodecStats{};
  }

  // Staging (compress.h): here the counters; ResidualState adds the residual.
  void stage() override {
    staging_ = true;
    staged_ = false;
  }
  void commit_staged() override {
    if (staging_ && staged_) mutable_stats() = staged_stats_;
    staging_ = staged_ = false;
  }
  void discard_staged() override { staging_ = staged_ = false; }
  // Called first by every encode: a staged encode that fails leaves nothing pending.
  void begin_encode() { staged_ = false; }
  // Called after each successful encode (the counters an encode starts from are stats(), the
  // committed ones, also while staging).
  void record(size_t payload_bytes, uint64_t clamped = 0, uint64_t flushed = 0, bool sampled_miss = false) {
    CodecStats s = stats();
    ++s.encodes;
    s.sampled_misses += sampled_miss;
    s.last_payload_bytes = payload_bytes;
    s.last_clamped = clamped;
    s.total_clamped += clamped;
    s.last_flushed = flushed;
    s.total_flushed += flushed;
    if (staging_) {
      staged_stats_ = s;
      staged_ = true;
    } else {
      mutable_stats() = s;
    }
  }

 protected:
  bool staged_result() const { return staged_; }

 private:
  bool staged_ = false;  // staging, and the latest encode succeeded
  CodecStats staged_stats_;
};

// An fp32 residual kept on the tensor's device (host vector or DeviceBuffer).
class Residual {
 public:
  Residual() = default;
  Residual(size_t count, DeviceKind device, int device_index);
  Residual(const Residual& other);  // a deep copy (device to device for CUDA)
  Residual(Residual&&) noexcept = default;
  Residual& operator=(Residual&&) noexcept = default;
  float* data() { return device_ == DeviceKind::Cuda ? buffer_.as<float>() : host_.data(); }
  std::vector<float> to_host() const;
  void zero();
  // Exchanges the host buffer with `other` (same size), in O(1): a double-buffered encode
  // writes the next residual into `other` and swaps it in once nothing can fail any more.
  void swap_host(std::vector<float>& other);
  // Copies `other` (same size and device) into this residual's memory; a device copy runs on
  // `stream` (the encode's, so that it does not wait for the legacy stream's work).
  void assign(const Residual& other, CudaStream stream = {});

 private:
  size_t count_ = 0;
  DeviceKind device_ = DeviceKind::Cpu;
  std::vector<float> host_;
  kc::DeviceBuffer buffer_;
};

// A codec state with an optional error-feedback residual (int8, top-k).
class ResidualState : public StateBase {
 public:
  ResidualState(CodecId codec, TensorSpec spec, bool error_feedback) : StateBase(codec, std::move(spec)) {
    if (error_feedback) residual_ = Residual(count(), this->spec().device, this->spec().device_index);
    has_residual_ = error_feedback;
  }
  // While a CUDA state stages, residual_ holds the pending result and backup_ the committed one
  // (the CPU keeps the pending one in spare_): both read the committed residual.
  std::vector<float> residual() const override {
    return has_residual_ ? committed().to_host() : std::vector<float>{};
  }
  ResidualState(const ResidualState& other)  // clone(): the committed state, no spare or backup
      : StateBase(other), has_residual_(other.has_residual_), residual_(other.committed()) {}
  void reset() override {
    StateBase::reset();
    if (has_residual_) residual_.zero();
  }
  // Null without error feedback. While staging this is the committed residual: CPU encodes
  // only read it and write spare(); CUDA encodes call begin_in_place_staged_encode() first.
  float* residual_data() { return has_residual_ ? residual_.data() : nullptr; }
  // CPU: the second buffer (count() floats, allocated on first use and kept): where a
  // double-buffered encode writes the next residual, and where a staged encode leaves it.
  std::vector<float>& spare() {
    if (spare_.size() != count()) spare_.assign(count(), 0.0f);
    return spare_;
  }
  // Unstaged CPU double buffering: makes spare() the residual (the old one becomes the spare).
  void swap_residual() { residual_.swap_host(spare_); }
  // CPU with error feedback: whether this object has encoded before (set by an unstaged encode
  // through mark_encoded() and by a committed staged one; a clone starts unset). Such a state
  // is likely to encode again, so a double-buffered encode (the new residual into spare(),
  // swapped in when the whole gradient has passed: a NaN/Inf found on the way leaves the state
  // untouched without a scan before) pays for the spare's memory.
  bool encoded_before() const { return encoded_before_; }
  void mark_encoded() { encoded_before_ = true; }
  // CUDA with a residual, while staging: keeps (or restores) a copy of the committed residual
  // so that the encode may update residual_data() in place.
  void begin_in_place_staged_encode(CudaStream stream);

  void stage() override;
  void commit_staged() override;
  void discard_staged() override;

 private:
  const Residual& committed() const { return backup_ ? *backup_ : residual_; }

  bool has_residual_ = false;
  bool encoded_before_ = false;
  Residual residual_;
  std::vector<float> spare_;
  std::optional<Residual> backup_;  // CUDA staging: the committed residual
  // CUDA: the buffer the last stage's backup lived in, reused by the next stage (a device
  // allocation and free per step cost a device-wide synchronisation each).
  std::optional<Residual> device_spare_;
  // Puts the committed residual (backup_) back in place; its buffer becomes the spare.
  void restore_backup();
};

// Base of the codecs whose decode and decode_accumulate are one routine with an accumulate flag.
class ApplyingCodec : public Codec {
 public:
  void decode(std::span<const uint8_t> payload, BufferView out, CudaStream stream) const final {
    apply(payload, out, false, stream);
  }
  void decode_accumulate(std::span<const uint8_t> payload, BufferView out, CudaStream stream) const final {
    apply(payload, out, true, stream);
  }

 protected:
  // Checks the whole payload, then writes (or, with accumulate, adds) it into out.
  virtual void apply(std::span<const uint8_t> payload, BufferView out, bool accumulate, CudaStream stream) const = 0;
};

}  // namespace meshtrain::compress::detail

namespace meshtrain::compress::detail {

// Index of the first non-finite fp32 value among the n stored (unaligned) at p, or n.
size_t find_nonfinite_bytes(const uint8_t* p, size_t n);
// Throws CorruptError when the n fp32 values at p (what: "value", "scale") are not all finite.
void require_finite_bytes(CodecId codec, std::string_view what, const uint8_t* p, size_t n);

// A device copy of host bytes (for decoding into a CUDA buffer), in stream-ordered memory;
// enqueued on the stream.
kc::StreamBuffer upload(std::span<const uint8_t> bytes, int device, CudaStream stream);

}  // namespace meshtrain::compress::detail
