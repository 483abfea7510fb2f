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
// The products are written out here (no BLAS dependency): loops in row-major order with
// double accumulators, a fixed summation order, so the payload is deterministic. On a CUDA
// tensor the gradient is staged through host memory and this CPU path runs; the residual and
// Q live on the host (docs/compression.md: cuBLAS products are future work).
#include <cmath>

#include "compress/common.h"

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

// out[i, j] = sum_l P[i, l] Q[j, l], float, l ascending: what decode computes and what the
// residual subtracts, bit for bit.
inline float reconstruct(const float* p_row, const float* q_row, size_t r) {
  float acc = 0.0f;
  for (size_t l = 0; l < r; ++l) acc += p_row[l] * q_row[l];
  return acc;
}

class PowerSgdState final : public StateBase {
 public:
  PowerSgdState(TensorSpec spec, Shape shape, uint64_t seed, bool error_feedback)
      : StateBase(CodecId::PowerSgd, std::move(spec)), shape_(shape), seed_(seed) {
    has_residual_ = error_feedback && shape.rank > 0;
    if (has_residual_) residual_.assign(count(), 0.0f);
    init_q();
  }
  // Without the scratch buffers.
  PowerSgdState(const PowerSgdState& other)
      : StateBase(other), shape_(other.shape_), seed_(other.seed_), has_residual_(other.has_residual_),
        residual_(other.residual_), q_(other.q_) {}
  std::unique_ptr<CodecState> clone() const override { return std::make_unique<PowerSgdState>(*this); }
  // Q and the residual change in place through three calls (compress.h): no staging.
  void stage() override { CodecState::stage(); }
  std::vector<float> residual() const override { return has_residual_ ? residual_ : std::vector<float>{}; }
  void reset() override {
    StateBase::reset();
    std::fill(residual_.begin(), residual_.end(), 0.0f);
    init_q();
  }

  const Shape& shape() const { return shape_; }
  bool has_residual() const { return has_residual_; }
  std::vector<float>& residual_vec() { return residual_; }
  std::vector<float>& q() { return q_; }
  std::vector<float> host_grad;  // CUDA tensors: the staged gradient
  std::vector<float> scratch;    // M without error feedback

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
  std::vector<float> residual_;
  std::vector<float> q_;
};

// The steps of one power iteration, shared by encode and the all-reduce's two-phase form.

// M = x + residual (in place in the residual; in scratch without error feedback); p = M Q.
void project(const float* x, PowerSgdState& s, float* p) {
  const Shape& sh = s.shape();
  const size_t rows = sh.rows, cols = sh.cols, r = sh.rank, n = rows * cols;
  float* m = nullptr;
  if (s.has_residual()) {
    m = s.residual_vec().data();
    for (size_t i = 0; i < n; ++i) m[i] = x[i] + m[i];
  } else {
    s.scratch.assign(x, x + n);
    m = s.scratch.data();
  }
  const float* q_prev = s.q().data();
  std::vector<double> acc(r);
  for (size_t i = 0; i < rows; ++i) {
    std::fill(acc.begin(), acc.end(), 0.0);
    const float* mi = m + i * cols;
    for (size_t j = 0; j < cols; ++j) {
      const double v = mi[j];
      const float* qj = q_prev + j * r;
      for (size_t l = 0; l < r; ++l) acc[l] += v * qj[l];
    }
    for (size_t l = 0; l < r; ++l) p[i * r + l] = static_cast<float>(acc[l]);
  }
}

// M as project left it.
const float* matrix_of(PowerSgdState& s) { return s.has_residual() ? s.residual_vec().data() : s.scratch.data(); }

// q = M^T p (cols x r).
void back_project(PowerSgdState& s, const float* p, float* q) {
  const Shape& sh = s.shape();
  const size_t rows = sh.rows, cols = sh.cols, r = sh.rank;
  const float* m = matrix_of(s);
  std::vector<double> qd(cols * r, 0.0);
  for (size_t i = 0; i < rows; ++i) {
    const float* mi = m + i * cols;
    const float* pi = p + i * r;
    for (size_t j = 0; j < cols; ++j) {
      const double v = mi[j];
      double* qj = qd.data() + j * r;
      for (size_t l = 0; l < r; ++l) qj[l] += v * pi[l];
    }
  }
  for (size_t i = 0; i < qd.size(); ++i) q[i] = static_cast<float>(qd[i]);
}

// residual = M - p q^T (in place; nothing to keep without error feedback).
void subtract_from_residual(PowerSgdState& s, const float* p, const float* q) {
  if (!s.has_residual()) return;
  const Shape& sh = s.shape();
  float* m = s.residual_vec().data();
  for (size_t i = 0; i < sh.rows; ++i)
    for (size_t j = 0; j < sh.cols; ++j) m[i * sh.cols + j] -= reconstruct(p + i * sh.rank, q + j * sh.rank, sh.rank);
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
    if (grad.device == DeviceKind::Cuda) {
      s.host_grad.resize(n);
      cuda_call("powersgd encode (staging the gradient)", [&] {
        kc::copy_async(s.host_grad.data(), grad.data, n * 4, grad.device_index, stream.handle);
        kc::synchronize(grad.device_index, stream.handle);
      });
      x = s.host_grad.data();
    }
    const Shape& sh = s.shape();
    uint8_t* body = out.data() + kPayloadHeaderBytes;
    if (sh.rank == 0) {
      if (n > 0) std::memcpy(body, x, n * 4);
    } else {
      encode_low_rank(x, s, body);
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

  static void encode_low_rank(const float* x, PowerSgdState& s, uint8_t* body) {
    const Shape& sh = s.shape();
    std::vector<float> p(sh.rows * sh.rank);
    project(x, s, p.data());
    orthonormalise(p.data(), sh.rows, sh.rank);
    back_project(s, p.data(), s.q().data());
    std::memcpy(body, p.data(), p.size() * 4);
    std::memcpy(body + p.size() * 4, s.q().data(), s.q().size() * 4);
    subtract_from_residual(s, p.data(), s.q().data());
  }

  void apply(std::span<const uint8_t> payload, BufferView out, bool accumulate,
             CudaStream stream) const override {
    check_fp32(accumulate ? "powersgd decode_accumulate" : "powersgd decode", "output", out, out.count);
    const Header h = read_header_for(payload, id(), out.count);
    const size_t n = out.count;
    const uint8_t* body = payload.data() + kPayloadHeaderBytes;
    const size_t values = (payload.size() - kPayloadHeaderBytes) / 4;
    require_finite_bytes(id(), "value", body, values);
    std::vector<float> host;
    float* o = static_cast<float*>(out.data);
    const bool cuda = out.device == DeviceKind::Cuda;
    if (cuda) {
      host.assign(n, 0.0f);
      o = host.data();
    }
    const bool add = accumulate && !cuda;
    if (h.flags == 1) {
      std::vector<float> tmp(n);
      if (n > 0) std::memcpy(tmp.data(), body, n * 4);
      copy_or_add(o, tmp.data(), n, add);
    } else {
      const size_t rows = h.param_a, r = h.param_b, cols = n / rows;
      std::vector<float> p(rows * r), q(cols * r);
      std::memcpy(p.data(), body, p.size() * 4);
      std::memcpy(q.data(), body + p.size() * 4, q.size() * 4);
      for (size_t i = 0; i < rows; ++i) {
        float* oi = o + i * cols;
        const float* pi = p.data() + i * r;
        if (add) {
          for (size_t j = 0; j < cols; ++j) oi[j] += reconstruct(pi, q.data() + j * r, r);
        } else {
          for (size_t j = 0; j < cols; ++j) oi[j] = reconstruct(pi, q.data() + j * r, r);
        }
      }
    }
    if (cuda) {
      auto d = upload(std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(host.data()), n * 4),
                      out.device_index, stream);
      cuda_call("powersgd decode", [&] {
        if (accumulate)
          kc::add_async(static_cast<float*>(out.data), d.as<float>(), n, out.device_index, stream.handle);
        else
          kc::copy_async(out.data, d.data(), n * 4, out.device_index, stream.handle);
        kc::synchronize(out.device_index, stream.handle);
      });
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

void powersgd_project(BufferView grad, CodecState& state, std::span<float> p) {
  constexpr std::string_view what = "powersgd_project";
  PowerSgdState& s = low_rank_state(state, what);
  check_grad(CodecId::PowerSgd, grad, state);
  if (grad.device != DeviceKind::Cpu) throw InvalidArgumentError("powersgd_project: CPU buffers only");
  check_span(what, "p", p.size(), s.shape().rows * s.shape().rank);
  reject_nonfinite(CodecId::PowerSgd, grad, {});
  project(static_cast<const float*>(grad.data), s, p.data());
}

void powersgd_back_project(CodecState& state, std::span<float> p, std::span<float> q) {
  constexpr std::string_view what = "powersgd_back_project";
  PowerSgdState& s = low_rank_state(state, what);
  check_span(what, "p", p.size(), s.shape().rows * s.shape().rank);
  check_span(what, "q", q.size(), s.shape().cols * s.shape().rank);
  orthonormalise(p.data(), s.shape().rows, s.shape().rank);
  back_project(s, p.data(), q.data());
}

void powersgd_finish(CodecState& state, std::span<const float> p, std::span<const float> q, BufferView out) {
  constexpr std::string_view what = "powersgd_finish";
  PowerSgdState& s = low_rank_state(state, what);
  const Shape& sh = s.shape();
  check_span(what, "p", p.size(), sh.rows * sh.rank);
  check_span(what, "q", q.size(), sh.cols * sh.rank);
  check_fp32(what, "output", out, s.count());
  if (out.device != DeviceKind::Cpu) throw InvalidArgumentError("powersgd_finish: CPU buffers only");
  float* o = static_cast<float*>(out.data);
  for (size_t i = 0; i < sh.rows; ++i)
    for (size_t j = 0; j < sh.cols; ++j) o[i * sh.cols + j] = reconstruct(p.data() + i * sh.rank, q.data() + j * sh.rank, sh.rank);
  subtract_from_residual(s, p.data(), q.data());
  std::copy(q.begin(), q.end(), s.q().begin());
  s.record(0);
}

void powersgd_adopt_q(CodecState& state, std::span<const float> q) {
  constexpr std::string_view what = "powersgd_adopt_q";
  PowerSgdState& s = low_rank_state(state, what);
  check_span(what, "q", q.size(), s.shape().cols * s.shape().rank);
  std::copy(q.begin(), q.end(), s.q().begin());
}

std::unique_ptr<Codec> make_powersgd_codec(const PowerSgdOptions& options) {
  return std::make_unique<PowerSgdCodec>(options);
}

}  // namespace meshtrain::compress
