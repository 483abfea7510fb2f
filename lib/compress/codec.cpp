// The Codec and CodecState bases, shared checks, and make_codec's spec parser.
#include <algorithm>
#include <charconv>
#include <cstdlib>
#include <optional>
#include <cstdint>

#include "compress/common.h"

namespace meshtrain::compress {

std::string_view codec_name(CodecId id) noexcept {
  switch (id) {
    case CodecId::None: return "none";
    case CodecId::Fp16: return "fp16";
    case CodecId::Bf16: return "bf16";
    case CodecId::Int8: return "int8";
    case CodecId::TopK: return "topk";
    case CodecId::PowerSgd: return "powersgd";
  }
  return "unknown";
}

size_t TensorSpec::count() const {
  size_t n = 1;
  for (size_t d : shape) {
    if (d != 0 && n > detail::kMaxCount / d)
      throw InvalidArgumentError(fmt::format("tensor shape of {} dimensions has more than {} elements",
                                             shape.size(), detail::kMaxCount));
    n *= d;
  }
  return n;
}

CodecState::CodecState(CodecId codec, TensorSpec spec)
    : codec_(codec), spec_(std::move(spec)), count_(spec_.count()) {}
CodecState::~CodecState() = default;
std::vector<float> CodecState::residual() const { return {}; }
void CodecState::reset() { stats_ = CodecStats{}; }
void CodecState::stage() {
  throw InvalidArgumentError(fmt::format("{} states do not support staged encodes (use clone())", codec_name(codec_)));
}
void CodecState::commit_staged() {}
void CodecState::discard_staged() {}

Codec::~Codec() = default;

namespace {

std::string_view trim(std::string_view s) {
  while (!s.empty() && s.front() == ' ') s.remove_prefix(1);
  while (!s.empty() && s.back() == ' ') s.remove_suffix(1);
  return s;
}

struct Params {
  std::string_view codec;
  std::vector<std::pair<std::string_view, std::string_view>> kv;
  std::vector<bool> used;

  std::optional<std::string_view> take(std::string_view key) {
    for (size_t i = 0; i < kv.size(); ++i)
      if (kv[i].first == key) {
        used[i] = true;
        return kv[i].second;
      }
    return std::nullopt;
  }
  [[noreturn]] void bad(std::string_view key, std::string_view value, std::string_view want) const {
    throw InvalidArgumentError(
        fmt::format("codec spec '{}': {}={} is not {}", codec, key, value, want));
  }
  uint64_t u64(std::string_view key, uint64_t fallback, uint64_t lo, uint64_t hi) {
    auto v = take(key);
    if (!v) return fallback;
    uint64_t out = 0;
    auto [p, ec] = std::from_chars(v->data(), v->data() + v->size(), out);
    if (ec != std::errc() || p != v->data() + v->size() || out < lo || out > hi)
      bad(key, *v, fmt::format("an integer in [{}, {}]", lo, hi));
    return out;
  }
  double real(std::string_view key, double fallback) {
    auto v = take(key);
    if (!v) return fallback;
    std::string s(*v);
    char* end = nullptr;
    double out = std::strtod(s.c_str(), &end);
    if (s.empty() || end != s.c_str() + s.size() || !(out > 0.0 && out <= 1.0))
      bad(key, *v, "a number in (0, 1]");
    return out;
  }
  bool flag(std::string_view key, bool fallback) {
    auto v = take(key);
    if (!v) return fallback;
    if (*v == "on" || *v == "true" || *v == "1") return true;
    if (*v == "off" || *v == "false" || *v == "0") return false;
    bad(key, *v, "on or off");
  }
  void finish() const {
    for (size_t i = 0; i < kv.size(); ++i)
      if (!used[i])
        throw InvalidArgumentError(
            fmt::format("codec spec: {} has no parameter '{}'", codec, kv[i].first));
  }
};

}  // namespace

std::unique_ptr<Codec> make_codec(std::string_view spec) {
  Params p;
  size_t colon = spec.find(':');
  p.codec = trim(spec.substr(0, colon));
  if (colon != std::string_view::npos) {
    std::string_view rest = spec.substr(colon + 1);
    while (!rest.empty()) {
      size_t comma = rest.find(',');
      std::string_view item = trim(rest.substr(0, comma));
      size_t eq = item.find('=');
      if (eq == std::string_view::npos || eq == 0)
        throw InvalidArgumentError(
            fmt::format("codec spec '{}': '{}' is not key=value", spec, item));
      p.kv.emplace_back(trim(item.substr(0, eq)), trim(item.substr(eq + 1)));
      p.used.push_back(false);
      if (comma == std::string_view::npos) break;
      rest = rest.substr(comma + 1);
    }
  }
  std::unique_ptr<Codec> codec;
  if (p.codec == "none") {
    codec = make_none_codec();
  } else if (p.codec == "fp16") {
    codec = make_fp16_codec();
  } else if (p.codec == "bf16") {
    codec = make_bf16_codec();
  } else if (p.codec == "int8") {
    Int8Options o;
    o.block_size = static_cast<uint32_t>(p.u64("block_size", o.block_size, 1, detail::kMaxInt8Block));
    if (auto r = p.take("rounding")) {
      if (*r == "nearest") o.rounding = Rounding::Nearest;
      else if (*r == "stochastic") o.rounding = Rounding::Stochastic;
      else p.bad("rounding", *r, "nearest or stochastic");
    }
    o.seed = p.u64("seed", o.seed, 0, UINT64_MAX);
    o.error_feedback = p.flag("error_feedback", o.error_feedback);
    codec = make_int8_codec(o);
  } else if (p.codec == "topk") {
    TopKOptions o;
    o.fraction = p.real("fraction", o.fraction);
    o.error_feedback = p.flag("error_feedback", o.error_feedback);
    if (auto sel = p.take("selection")) {
      if (*sel == "auto") o.selection = TopKOptions::Selection::Auto;
      else if (*sel == "radix") o.selection = TopKOptions::Selection::Radix;
      else if (*sel == "sampled") o.selection = TopKOptions::Selection::Sampled;
      else p.bad("selection", *sel, "auto, radix or sampled");
    }
    codec = make_topk_codec(o);
  } else if (p.codec == "powersgd") {
    PowerSgdOptions o;
    o.rank = static_cast<uint32_t>(p.u64("rank", o.rank, 1, detail::kMaxPowerSgdRank));
    o.seed = p.u64("seed", o.seed, 0, UINT64_MAX);
    o.error_feedback = p.flag("error_feedback", o.error_feedback);
    codec = make_powersgd_codec(o);
  } else {
    throw InvalidArgumentError(fmt::format(
        "codec spec '{}': unknown codec '{}' (none, fp16, bf16, int8, topk, powersgd)", spec, p.codec));
  }
  p.finish();
  return codec;
}

}  // namespace meshtrain::compress

namespace meshtrain::compress::detail {

void check_fp32(std::string_view codec, std::string_view what, const BufferView& buffer,
                size_t count) {
  if (buffer.dtype != DType::Float32)
    throw InvalidArgumentError(fmt::format("{}: {} is {}, not float32", codec, what,
                                           dtype_name(buffer.dtype)));
  if (buffer.count != count)
    throw InvalidArgumentError(
        fmt::format("{}: {} has {} elements, expected {}", codec, what, buffer.count, count));
  if (count > 0 && buffer.data == nullptr)
    throw InvalidArgumentError(fmt::format("{}: {} of {} elements has no data", codec, what, count));
  if (reinterpret_cast<uintptr_t>(buffer.data) % alignof(float) != 0)
    throw InvalidArgumentError(fmt::format("{}: {} is not 4-byte aligned", codec, what));
  check_device_supported(codec, buffer.device, buffer.device_index);
}

void check_device_supported(std::string_view who, DeviceKind device, int device_index) {
  if (device != DeviceKind::Cuda) return;
  if (!kc::available())
    throw InvalidArgumentError(fmt::format(
        "{}: buffer is on cuda:{} but meshtrain was built without CUDA (MESHTRAIN_CUDA=OFF or "
        "no nvcc at build time)",
        who, device_index));
  if (device_index < 0)
    throw InvalidArgumentError(fmt::format("{}: cuda device index {}", who, device_index));
}

void check_grad(CodecId codec, const BufferView& grad, const CodecState& state) {
  std::string what = fmt::format("{} encode", codec_name(codec));
  if (state.codec() != codec)
    throw InvalidArgumentError(
        fmt::format("{} given a state made by the {} codec", what, codec_name(state.codec())));
  check_fp32(what, "gradient", grad, state.count());
  check_state_device(what, "gradient", grad, state);
}

void check_state_device(std::string_view who, std::string_view what, const BufferView& buffer,
                        const CodecState& state) {
  const TensorSpec& spec = state.spec();
  if (buffer.device != spec.device || (buffer.device == DeviceKind::Cuda && buffer.device_index != spec.device_index))
    throw InvalidArgumentError(fmt::format(
        "{}: {} is on {}:{} but its state was made for {}:{}", who, what,
        buffer.device == DeviceKind::Cuda ? "cuda" : "cpu", buffer.device_index,
        spec.device == DeviceKind::Cuda ? "cuda" : "cpu", spec.device_index));
}

void check_capacity(CodecId codec, std::span<const uint8_t> out, size_t need) {
  if (out.size() < need)
    throw InvalidArgumentError(fmt::format("{} encode: output of {} bytes, the payload needs {}",
                                           codec_name(codec), out.size(), need));
}

MT_VECTOR_CLONES size_t find_nonfinite(const float* x, size_t n) {
  constexpr size_t kChunk = 4096;
  for (size_t base = 0; base < n; base += kChunk) {
    const size_t m = std::min(kChunk, n - base);
    const float* c = x + base;
    uint32_t bad = 0;
    for (size_t i = 0; i < m; ++i) bad |= math::nonfinite(math::f2u(c[i]));
    if (bad)
      for (size_t i = 0; i < m; ++i)
        if (math::nonfinite(math::f2u(c[i]))) return base + i;
  }
  return n;
}

size_t find_nonfinite(const BufferView& x, CudaStream stream) {
  if (x.device == DeviceKind::Cuda)
    return cuda_call("scanning a gradient for NaN/Inf", [&] {
      return kc::find_nonfinite(static_cast<const float*>(x.data), x.count, x.device_index,
                                stream.handle);
    });
  return find_nonfinite(static_cast<const float*>(x.data), x.count);
}

void reject_nonfinite(CodecId codec, const BufferView& x, CudaStream stream) {
  size_t i = find_nonfinite(x, stream);
  if (i == x.count) return;
  float v = 0;
  if (x.device == DeviceKind::Cuda) {
    cuda_call("reading a non-finite element", [&] {
      kc::copy_async(&v, static_cast<const float*>(x.data) + i, sizeof v, x.device_index, stream.handle);
      kc::synchronize(x.device_index, stream.handle);
    });
  } else {
    v = static_cast<const float*>(x.data)[i];
  }
  throw InvalidArgumentError(fmt::format(
      "{} encode: gradient element {} of {} is {}; a gradient with NaN or Inf is rejected "
      "(skip the step or lower the loss scale)",
      codec_name(codec), i, x.count, v));
}

MT_VECTOR_CLONES void copy_or_add(float* out, const float* x, size_t n, bool accumulate) {
  if (accumulate) {
    for (size_t i = 0; i < n; ++i) out[i] += x[i];
  } else if (n > 0) {
    std::memcpy(out, x, n * sizeof(float));
  }
}

Residual::Residual(size_t count, DeviceKind device, int device_index)
    : count_(count), device_(device) {
  if (device == DeviceKind::Cuda) {
    buffer_ = cuda_call("allocating an error-feedback residual",
                        [&] { return kc::DeviceBuffer(count * sizeof(float), device_index); });
  } else {
    host_.assign(count, 0.0f);
  }
}

Residual::Residual(const Residual& other) : count_(other.count_), device_(other.device_), host_(other.host_) {
  if (device_ != DeviceKind::Cuda) return;
  const int device = other.buffer_.device();
  buffer_ = cuda_call("copying an error-feedback residual", [&] {
    kc::DeviceBuffer b(count_ * sizeof(float), device);
    kc::copy_async(b.data(), other.buffer_.data(), count_ * sizeof(float), device, nullptr);
    kc::synchronize(device, nullptr);
    return b;
  });
}

std::vector<float> Residual::to_host() const {
  if (device_ != DeviceKind::Cuda) return host_;
  std::vector<float> out(count_);
  cuda_call("copying a residual to the host", [&] {
    kc::copy_async(out.data(), buffer_.data(), count_ * sizeof(float), buffer_.device(), nullptr);
    kc::synchronize(buffer_.device(), nullptr);
  });
  return out;
}

void Residual::swap_host(std::vector<float>& other) {
  if (device_ == DeviceKind::Cuda || other.size() != count_)
    throw InternalError(fmt::format("residual swap: {} host floats for a residual of {} on {}", other.size(),
                                    count_, device_ == DeviceKind::Cuda ? "cuda" : "cpu"));
  host_.swap(other);
}

void Residual::assign(const Residual& other, CudaStream stream) {
  if (count_ != other.count_ || device_ != other.device_)
    throw InternalError("residual assign: residuals of different size or device");
  if (device_ != DeviceKind::Cuda) {
    host_ = other.host_;
    return;
  }
  cuda_call("copying into an error-feedback residual", [&] {
    kc::copy_async(buffer_.data(), other.buffer_.data(), count_ * sizeof(float), buffer_.device(), stream.handle);
    kc::synchronize(buffer_.device(), stream.handle);
  });
}

void ResidualState::stage() {
  discard_staged();
  StateBase::stage();
}

void ResidualState::begin_in_place_staged_encode(CudaStream stream) {
  if (!staging() || !has_residual_ || spec().device != DeviceKind::Cuda) return;
  if (backup_) {
    residual_.assign(*backup_, stream);  // an earlier staged encode changed it: start from the committed one
  } else if (device_spare_) {
    backup_ = std::move(device_spare_);  // the buffer of an earlier stage: no allocation
    device_spare_.reset();
    backup_->assign(residual_, stream);
  } else {
    backup_.emplace(residual_);
  }
}

void ResidualState::restore_backup() {
  if (!backup_) return;
  std::swap(residual_, *backup_);  // the committed residual back in place
  device_spare_ = std::move(backup_);
  backup_.reset();
}

void ResidualState::commit_staged() {
  if (staging() && staged_result()) encoded_before_ = true;
  if (staging() && staged_result() && has_residual_) {
    if (spec().device != DeviceKind::Cuda) residual_.swap_host(spare_);
    device_spare_ = std::move(backup_);  // the pending result stays in place; keep the buffer
    backup_.reset();
  }
  restore_backup();  // the last staged encode failed
  StateBase::commit_staged();
}

void ResidualState::discard_staged() {
  restore_backup();
  StateBase::discard_staged();
}

void Residual::zero() {
  if (device_ != DeviceKind::Cuda) {
    std::fill(host_.begin(), host_.end(), 0.0f);
    return;
  }
  cuda_call("zeroing a residual", [&] {
    kc::zero_async(buffer_.data(), count_ * sizeof(float), buffer_.device(), nullptr);
    kc::synchronize(buffer_.device(), nullptr);
  });
}

}  // namespace meshtrain::compress::detail

namespace meshtrain::compress::detail {

size_t find_nonfinite_bytes(const uint8_t* p, size_t n) {
  constexpr size_t kChunk = 2048;
  float tmp[kChunk];
  for (size_t base = 0; base < n; base += kChunk) {
    const size_t m = std::min(kChunk, n - base);
    std::memcpy(tmp, p + base * 4, m * 4);
    size_t i = find_nonfinite(tmp, m);
    if (i < m) return base + i;
  }
  return n;
}

void require_finite_bytes(CodecId codec, std::string_view what, const uint8_t* p, size_t n) {
  size_t i = find_nonfinite_bytes(p, n);
  if (i < n)
    throw CorruptError(fmt::format("{} payload: {} {} of {} is {} (encoders never send NaN/Inf)",
                                   codec_name(codec), what, i, n, load<float>(p, i)));
}

kc::StreamBuffer upload(std::span<const uint8_t> bytes, int device, CudaStream stream) {
  return cuda_call("copying a payload to the device", [&] {
    kc::StreamBuffer b(bytes.size(), device, stream.handle);
    kc::copy_async(b.data(), bytes.data(), bytes.size(), device, stream.handle);
    // Read by the time this returns, as a copy from pageable memory is: the bytes may be pinned
    // memory the caller reuses, also when the decode after this fails before synchronising.
    kc::synchronize(device, stream.handle);
    return b;
  });
}

}  // namespace meshtrain::compress::detail
