// PowerSGD (Vogels et al., 2019): a rank-r approximation M ~= P Q^T of the gradient viewed as
// a rows x cols matrix (rows = shape[0], cols = the product of the other dimensions), by one
// step of subspace (power) iteration per encode, warm-started from the previous step's Q:
//
//   M = grad + residual        (error feedback; residual = 0 without it)
//   P = M Q_prev, orthonormalised (modified Gram-Schmidt; a column with norm ~0 becomes 0)
//   Q = M^T P                  (kept in the state: the next step's warm start)
//   payload = P (rows x r) and Q (cols x r), fp32;   decoded = P Q^T;   residual = M - P Q^T
//
// Tensors with fewer than two dimensions, and matrices where r (rows + cols) >= rows * cols,
// are sent uncompressed (fp32, flag 1 in the header) and leave no residual.
//
// The products are written out (no BLAS dependency) with double accumulators and a fixed
// summation order per element, so the payload is deterministic: on the CPU in lowrank.cpp, for a
// CUDA tensor on its device (kernels/compress/powersgd_kernels.cuh), the same sums in the same
// order, so they give the same bits; its residual lives there too. Only P (rows x r) crosses
// to the host in the middle of an encode, to be orthonormalised, and Q for the payload.
#include <cmath>

#include "compress/common.h"
#include "compress/lowrank.h"

namespace meshtrain::compress {
namespace {

using namespace detail;

struct Shape {
  size_t rows = 0, cols = 0, rank = 0;  // rank 0: sent uncompressed
};

Shape matrix_shape(const TensorSpec& spec, uint32_t rank) {
  Shape s;
  const size_t n = spec.count();
  if (spec.shape.size() < 2 || n == 0) return s;
  s.rows = spec.shape[0];
  s.cols = n / s.rows;
  const size_t r = std::min<size_t>({rank, s.rows, s.cols});
  if (r * (s.rows + s.cols) < n) s.rank = r;
  return s;
}

class PowerSgdState final : public StateBase {
 public:
  PowerSgdState(TensorSpec spec, Shape shape, uint64_t seed, bool error_feedback)
      : StateBase(CodecId::PowerSgd, std::move(spec)), shape_(shape), seed_(seed) {
    has_residual_ = error_feedback && shape.rank > 0;
    if (has_residual_) residual_ = Residual(count(), this->spec().device, this->spec().device_index);
    init_q();
  }
  // Without the scratch buffers.
  PowerSgdState(const PowerSgdState& other)
      : StateBase(other), shape_(other.shape_), seed_(other.seed_), has_residual_(other.has_residual_),
        residual_(other.residual_), q_(other.q_) {}
  std::unique_ptr<CodecState> clone() const override { return std::make_unique<PowerSgdState>(*this); }
  // What clone() copies, into this state's memory (powersgd_copy_state).
  void copy_from(const PowerSgdState& other, CudaStream stream) {
    if (this == &other) return;
    if (other.spec().shape != spec().shape || other.spec().device != spec().device ||
        other.spec().device_index != spec().device_index || other.shape_.rank != shape_.rank ||
        other.seed_ != seed_ || other.has_residual_ != has_residual_)
      throw InvalidArgumentError("powersgd_copy_state: states of different tensors or PowerSGD settings");
    if (has_residual_) residual_.assign(other.residual_, stream);
    std::copy(other.q_.begin(), other.q_.end(), q_.begin());
    mutable_stats() = other.stats();
    device_m = nullptr;
  }
  // Q and the residual change in place through three calls (compress.h): no staging.
  void stage() override { CodecState::stage(); }
  std::vector<float> residual() const override { return has_residual_ ? residual_.to_host() : std::vector<float>{}; }
  void reset() override {
    StateBase::reset();
    if (has_residual_) residual_.zero();
    init_q();
    device_m = nullptr;
  }

  const Shape& shape() const { return shape_; }
  bool has_residual() const { return has_residual_; }
  // M after project (x + residual, in place); null without error feedback. On the tensor's device.
  float* residual_data() { return has_residual_ ? residual_.data() : nullptr; }
  bool on_cuda() const { return spec().device == DeviceKind::Cuda; }
  int device_index() const { return spec().device_index; }
  std::vector<float>& q() { return q_; }  // on the host, also for a CUDA tensor (it goes into the payload)
  std::vector<float> scratch;             // CPU: M without error feedback
  // CUDA: P and Q for the products, M without error feedback when a later call needs it, and
  // where project left M, until the step's last call (kept across calls, not cloned).
  kc::DeviceBuffer d_p, d_q, d_m;
  const float* device_m = nullptr;
  // Sized for this state's P and Q (before anything is written: a call that fails for want of
  // memory leaves the residual as it was).
  void allocate_device_factors() {
    const int dev = spec().device_index;
    if (d_p.bytes() < shape_.rows * shape_.rank * 4) d_p = kc::DeviceBuffer(shape_.rows * shape_.rank * 4, dev);
    if (d_q.bytes() < shape_.cols * shape_.rank * 4) d_q = kc::DeviceBuffer(shape_.cols * shape_.rank * 4, dev);
  }

 private:
  // Q_0: uniform in [-1, 1) from a hash of (seed, element), identical on every peer.
  void init_q() {
    q_.assign(shape_.cols * shape_.rank, 0.0f);
    for (size_t i = 0; i < q_.size(); ++i) {
      uint32_t h = math::block_key(seed_, 0, i);
      q_[i] = static_cast<float>(h >> 8) * (2.0f / 16777216.0f) - 1.0f;
    }
  }

  Shape shape_;
  uint64_t seed_;
  bool has_residual_ = false;
  Residual residual_;
  std::vector<float> q_;
};

// The steps of one power iteration, shared by encode and the all-reduce's two-phase form. P and
// Q are in host memory (the all-reduce sums them there, the payload carries them); M and the
// residual are on the tensor's device, where a CUDA state's products run
// (kernels/compress/powersgd_kernels.cuh, the same sums in the same order: the same bits).

// M = x + residual (in place in the residual; without error feedback x itself, or a copy of it
// when `keep_matrix`, i.e. when a later call reads M); p = M Q.
void project(const float* x, PowerSgdState& s, float* p, bool keep_matrix, CudaStream stream) {
  const Shape& sh = s.shape();
  const size_t rows = sh.rows, cols = sh.cols, n = rows * cols;
  const auto r = static_cast<uint32_t>(sh.rank);
  if (s.on_cuda()) {
    const int dev = s.device_index();
    void* st = stream.handle;
    cuda_call("powersgd project", [&] {
      s.allocate_device_factors();
      const bool copy = keep_matrix && !s.has_residual();
      if (copy && s.d_m.bytes() < n * 4) s.d_m = kc::DeviceBuffer(n * 4, dev);
      const float* m = x;
      if (float* residual = s.residual_data()) {
        kc::add_async(residual, x, n, dev, st);
        m = residual;
      } else if (copy) {
        kc::copy_async(s.d_m.data(), x, n * 4, dev, st);
        m = s.d_m.as<float>();
      }
      s.device_m = m;
      kc::copy_async(s.d_q.data(), s.q().data(), cols * r * 4, dev, st);
      kc::lowrank_project(m, s.d_q.as<float>(), rows, cols, r, s.d_p.as<float>(), dev, st);
      kc::copy_async(p, s.d_p.data(), rows * r * 4, dev, st);
      kc::synchronize(dev, st);
    });
    return;
  }
  float* residual = s.residual_data();
  if (residual == nullptr) s.scratch.assign(x, x + n);
  lowrank::project(x, residual, s.q().data(), rows, cols, r, p);
}

// q = M^T p (cols x r), M as project left it. On a device, P and Q stay there for write().
void back_project(PowerSgdState& s, const float* p, float* q, CudaStream stream) {
  const Shape& sh = s.shape();
  const size_t rows = sh.rows, cols = sh.cols;
  const auto r = static_cast<uint32_t>(sh.rank);
  if (s.on_cuda()) {
    if (s.device_m == nullptr) throw InternalError("powersgd back_project before project");
    const int dev = s.device_index();
    void* st = stream.handle;
    cuda_call("powersgd back_project", [&] {
      kc::copy_async(s.d_p.data(), p, rows * r * 4, dev, st);
      kc::lowrank_back_project(s.device_m, s.d_p.as<float>(), rows, cols, r, s.d_q.as<float>(), dev, st);
      kc::copy_async(q, s.d_q.data(), cols * r * 4, dev, st);
      kc::synchronize(dev, st);
    });
    return;
  }
  const float* m = s.has_residual() ? s.residual_data() : s.scratch.data();
  lowrank::back_project(m, p, rows, cols, r, q);
}

// out = p q^T (when out is not null) and residual = M - p q^T (in place; nothing to keep without
// error feedback). On a device `upload` first copies p and q there (else they are back_project's).
// The step's last call: M is no longer needed.
void write(PowerSgdState& s, const float* p, const float* q, float* out, bool upload, CudaStream stream) {
  const Shape& sh = s.shape();
  const size_t rows = sh.rows, cols = sh.cols;
  const auto r = static_cast<uint32_t>(sh.rank);
  float* residual = s.residual_data();
  s.device_m = nullptr;
  if (out == nullptr && residual == nullptr) return;
  if (s.on_cuda()) {
    const int dev = s.device_index();
    void* st = stream.handle;
    cuda_call("powersgd reconstruct", [&] {
      if (upload) {
        s.allocate_device_factors();
        kc::copy_async(s.d_p.data(), p, rows * r * 4, dev, st);
        kc::copy_async(s.d_q.data(), q, cols * r * 4, dev, st);
      }
      const float* d_p = s.d_p.as<float>();
      const float* d_q = s.d_q.as<float>();
      if (out != nullptr) kc::lowrank_reconstruct(d_p, d_q, rows, cols, r, out, kc::LowRankWrite::Assign, dev, st);
      if (residual != nullptr)
        kc::lowrank_reconstruct(d_p, d_q, rows, cols, r, residual, kc::LowRankWrite::Subtract, dev, st);
      kc::synchronize(dev, st);
    });
    return;
  }
  lowrank::reconstruct(p, q, rows, cols, r, out, lowrank::Write::Assign, residual);
}

// Modified Gram-Schmidt on the r columns of the row-major rows x r matrix, in double. A column
// that is (almost) in the span of the earlier ones becomes 0: what is left of it after the
// projections is rounding error (the earlier columns are stored in float), and normalising
// that would add a spurious direction (a rank-1 gradient at rank 2 decoded as 0.71 of itself).
void orthonormalise(float* p, size_t rows, size_t r) {
  constexpr double kDependent = 1e-4;  // relative to the column's norm before the projections
  std::vector<double> col(rows);
  for (size_t l = 0; l < r; ++l) {
    double before = 0;
    for (size_t i = 0; i < rows; ++i) {
      col[i] = p[i * r + l];
      before += col[i] * col[i];
    }
    for (size_t k = 0; k < l; ++k) {
      double dot = 0;
      for (size_t i = 0; i < rows; ++i) dot += col[i] * p[i * r + k];
      for (size_t i = 0; i < rows; ++i) col[i] -= dot * p[i * r + k];
    }
    double norm = 0;
    for (size_t i = 0; i < rows; ++i) norm += col[i] * col[i];
    norm = std::sqrt(norm);
    const double inv = norm > 1e-30 && norm > kDependent * std::sqrt(before) ? 1.0 / norm : 0.0;
    for (size_t i = 0; i < rows; ++i) p[i * r + l] = static_cast<float>(col[i] * inv);
  }
}

PowerSgdState& low_rank_state(CodecState& state, std::string_view what) {
  auto* s = dynamic_cast<PowerSgdState*>(&state);
  if (s == nullptr)
    throw InvalidArgumentError(fmt::format("{}: given a state made by the {} codec", what, codec_name(state.codec())));
  if (s->shape().rank == 0)
    throw InvalidArgumentError(fmt::format("{}: the tensor is sent uncompressed (rank 0); all-reduce it directly", what));
  return *s;
}

void check_span(std::string_view what, std::string_view name, size_t got, size_t want) {
  if (got != want) throw InvalidArgumentError(fmt::format("{}: {} holds {} floats, needs {}", what, name, got, want));
}

class PowerSgdCodec final : public ApplyingCodec {
 public:
  explicit PowerSgdCodec(const PowerSgdOptions& o) : o_(o) {
    if (o.rank < 1 || o.rank > kMaxPowerSgdRank)
      throw InvalidArgumentError(fmt::format("powersgd codec: rank {} (1 ..= {})", o.rank, kMaxPowerSgdRank));
  }

  CodecId id() const noexcept override { return CodecId::PowerSgd; }
  std::string describe() const override {
    return fmt::format("powersgd(rank={}, seed={}, error_feedback={})", o_.rank, o_.seed,
                       o_.error_feedback ? "on" : "off");
  }

  std::unique_ptr<CodecState> make_state(const TensorSpec& spec) const override {
    check_device_supported("powersgd", spec.device, spec.device_index);
    return std::make_unique<PowerSgdState>(spec, matrix_shape(spec, o_.rank), o_.seed, o_.error_feedback);
  }
  size_t encoded_bytes(const TensorSpec& spec) const override {
    return payload_bytes(header(spec.count(), matrix_shape(spec, o_.rank)));
  }

  size_t encode(BufferView grad, CodecState& state, std::span<uint8_t> out,
                CudaStream stream) const override {
    check_grad(id(), grad, state);
    auto& s = state_as<PowerSgdState>(id(), state);
    const size_t n = grad.count, bytes = encoded_bytes(s.spec());
    check_capacity(id(), out, bytes);
    reject_nonfinite(id(), grad, stream);
    const float* x = static_cast<const float*>(grad.data);
    const Shape& sh = s.shape();
    uint8_t* body = out.data() + kPayloadHeaderBytes;
    if (sh.rank > 0) {
      encode_low_rank(x, s, body, stream);
    } else if (grad.device == DeviceKind::Cuda) {
      cuda_call("powersgd encode (uncompressed)", [&] {
        kc::copy_async(body, x, n * 4, grad.device_index, stream.handle);
        kc::synchronize(grad.device_index, stream.handle);
      });
    } else if (n > 0) {
      std::memcpy(body, x, n * 4);
    }
    write_header(out, header(n, sh));
    s.record(bytes);
    return bytes;
  }

 private:
  Header header(size_t count, const Shape& sh) const {
    if (sh.rank == 0) return Header{CodecId::PowerSgd, 1, count, 0, 0};
    return Header{CodecId::PowerSgd, 0, count, sh.rows, sh.rank};
  }

  static void encode_low_rank(const float* x, PowerSgdState& s, uint8_t* body, CudaStream stream) {
    const Shape& sh = s.shape();
    std::vector<float> p(sh.rows * sh.rank);
    project(x, s, p.data(), /*keep_matrix=*/false, stream);
    orthonormalise(p.data(), sh.rows, sh.rank);
    back_project(s, p.data(), s.q().data(), stream);
    std::memcpy(body, p.data(), p.size() * 4);
    std::memcpy(body + p.size() * 4, s.q().data(), s.q().size() * 4);
    write(s, p.data(), s.q().data(), nullptr, /*upload=*/false, stream);
  }

  void apply(std::span<const uint8_t> payload, BufferView out, bool accumulate,
             CudaStream stream) const override {
    check_fp32(accumulate ? "powersgd decode_accumulate" : "powersgd decode", "output", out, out.count);
    const Header h = read_header_for(payload, id(), out.count);
    const size_t n = out.count;
    const uint8_t* body = payload.data() + kPayloadHeaderBytes;
    const size_t values = (payload.size() - kPayloadHeaderBytes) / 4;
    require_finite_bytes(id(), "value", body, values);
    float* o = static_cast<float*>(out.data);
    const size_t rows = h.param_a, cols = rows ? n / rows : 0;
    const auto r = static_cast<uint32_t>(h.param_b);
    if (out.device == DeviceKind::Cuda) {  // P and Q go up (the whole tensor when uncompressed)
      auto d = upload(payload.subspan(kPayloadHeaderBytes), out.device_index, stream);
      cuda_call("powersgd decode", [&] {
        const int dev = out.device_index;
        if (h.flags == 1 && accumulate)
          kc::add_async(o, d.as<float>(), n, dev, stream.handle);
        else if (h.flags == 1)
          kc::copy_async(o, d.data(), n * 4, dev, stream.handle);
        else
          kc::lowrank_reconstruct(d.as<float>(), d.as<float>() + rows * r, rows, cols, r, o,
                                  accumulate ? kc::LowRankWrite::Add : kc::LowRankWrite::Assign, dev, stream.handle);
        kc::synchronize(dev, stream.handle);
      });
      return;
    }
    if (h.flags == 1) {
      std::vector<float> tmp(n);
      if (n > 0) std::memcpy(tmp.data(), body, n * 4);
      copy_or_add(o, tmp.data(), n, accumulate);
    } else {
      std::vector<float> p(rows * r), q(cols * r);
      std::memcpy(p.data(), body, p.size() * 4);
      std::memcpy(q.data(), body + p.size() * 4, q.size() * 4);
      lowrank::reconstruct(p.data(), q.data(), rows, cols, r, o,
                           accumulate ? lowrank::Write::Add : lowrank::Write::Assign, nullptr);
    }
  }

  PowerSgdOptions o_;
};

}  // namespace

LowRankShape powersgd_shape(const CodecState& state) {
  auto* s = dynamic_cast<const PowerSgdState*>(&state);
  if (s == nullptr)
    throw InvalidArgumentError(fmt::format("powersgd_shape: given a state made by the {} codec",
                                           codec_name(state.codec())));
  return LowRankShape{s->shape().rows, s->shape().cols, s->shape().rank};
}

void powersgd_project(BufferView grad, CodecState& state, std::span<float> p, CudaStream stream) {
  constexpr std::string_view what = "powersgd_project";
  PowerSgdState& s = low_rank_state(state, what);
  check_grad(CodecId::PowerSgd, grad, state);
  check_span(what, "p", p.size(), s.shape().rows * s.shape().rank);
  reject_nonfinite(CodecId::PowerSgd, grad, stream);
  project(static_cast<const float*>(grad.data), s, p.data(), /*keep_matrix=*/true, stream);
}

void powersgd_back_project(CodecState& state, std::span<float> p, std::span<float> q, CudaStream stream) {
  constexpr std::string_view what = "powersgd_back_project";
  PowerSgdState& s = low_rank_state(state, what);
  check_span(what, "p", p.size(), s.shape().rows * s.shape().rank);
  check_span(what, "q", q.size(), s.shape().cols * s.shape().rank);
  orthonormalise(p.data(), s.shape().rows, s.shape().rank);
  back_project(s, p.data(), q.data(), stream);
}

void powersgd_finish(CodecState& state, std::span<const float> p, std::span<const float> q, BufferView out,
                     CudaStream stream) {
  constexpr std::string_view what = "powersgd_finish";
  PowerSgdState& s = low_rank_state(state, what);
  const Shape& sh = s.shape();
  check_span(what, "p", p.size(), sh.rows * sh.rank);
  check_span(what, "q", q.size(), sh.cols * sh.rank);
  check_fp32(what, "output", out, s.count());
  check_state_device(what, "output", out, state);
  write(s, p.data(), q.data(), static_cast<float*>(out.data), /*upload=*/true, stream);
  std::copy(q.begin(), q.end(), s.q().begin());
  s.record(0);
}

void powersgd_adopt_q(CodecState& state, std::span<const float> q) {
  constexpr std::string_view what = "powersgd_adopt_q";
  PowerSgdState& s = low_rank_state(state, what);
  check_span(what, "q", q.size(), s.shape().cols * s.shape().rank);
  std::copy(q.begin(), q.end(), s.q().begin());
}

void powersgd_copy_state(const CodecState& from, CodecState& into, CudaStream stream) {
  const auto* source = dynamic_cast<const PowerSgdState*>(&from);
  auto* target = dynamic_cast<PowerSgdState*>(&into);
  if (source == nullptr || target == nullptr)
    throw InvalidArgumentError(fmt::format("powersgd_copy_state: given states made by the {} and {} codecs",
                                           codec_name(from.codec()), codec_name(into.codec())));
  target->copy_from(*source, stream);
}

std::unique_ptr<Codec> make_powersgd_codec(const PowerSgdOptions& options) {
  return std::make_unique<PowerSgdCodec>(options);
}

}  // namespace meshtrain::compress
