// top-k: the k = ceil(fraction * count) elements of largest magnitude, sent as (index, value)
// pairs in ascending index order; with error feedback the codec selects from
// v = grad + residual and keeps what it did not send (residual = v with the sent entries zeroed).
//
// Selection without a full sort: a radix select on the bits of |v| (which order like |v| for
// finite values) finds the exact k-th largest magnitude T in three histogram passes over 11,
// 11 and 9 bits. Everything with |v| > T is sent, and of the elements with |v| == T the lowest
// indices fill the rest: ties go to the lower index, so the selection is a function of v alone
// (+0 and -0 tie). CPU and CUDA share radix_select below and differ only in who counts.
//
// CPU: pass 1 forms v in place and histograms the top 11 bits; one pass gathers the keys of the
// elements in the k-th element's bin (a small fraction for gradient-like data) and the last two
// radix passes run on them; a final pass compacts. The CUDA path (kernels/compress/topk.cu)
// histograms on the GPU in three passes and compacts with per-tile prefix sums; with
// selection=sampled it first tries kernels/compress/api.h's topk_select_sampled (a sorted sample
// brackets T; same output), which falls back to that when its bracket misses.
#include <algorithm>
#include <array>
#include <cmath>

#include "compress/common.h"

namespace meshtrain::compress {
namespace {

using namespace detail;

struct Threshold {
  uint32_t key = 0;   // the k-th largest magnitude key
  uint64_t ties = 0;  // how many elements with key == threshold to send (lowest indices first)
};

struct RadixPass {
  uint32_t shift, bits;
};
constexpr std::array<RadixPass, 3> kPasses = {{{20, 11}, {9, 11}, {0, 9}}};
// kc::topk_workspace_bytes sizes the CUDA histograms for at most kTopKMaxHistogramBits.
static_assert(std::all_of(kPasses.begin(), kPasses.end(),
                          [](RadixPass p) { return p.bits <= kc::kTopKMaxHistogramBits; }));

// hist(pass, prefix) -> counts of the 2^bits digit values among the keys whose bits above
// shift + bits equal prefix. k >= 1 and k <= the number of keys.
template <typename Hist>
Threshold radix_select(uint64_t k, Hist&& hist) {
  uint32_t prefix = 0;
  for (size_t p = 0; p < kPasses.size(); ++p) {
    const std::vector<uint64_t> h = hist(p, prefix);
    uint64_t above = 0;
    uint32_t digit = 0;
    for (size_t b = h.size(); b-- > 0;) {
      if (above + h[b] >= k) {
        digit = static_cast<uint32_t>(b);
        break;
      }
      above += h[b];
    }
    k -= above;
    prefix = (prefix << kPasses[p].bits) | digit;
  }
  return Threshold{prefix, k};
}

uint64_t topk_k(double fraction, size_t n) {
  if (n == 0) return 0;
  const double y = fraction * static_cast<double>(n);
  const double nearest = std::round(y);
  double k = std::fabs(y - nearest) <= 1e-9 * std::max(1.0, y) ? nearest : std::ceil(y);
  k = std::clamp(k, 1.0, static_cast<double>(n));
  return static_cast<uint64_t>(k);
}

class TopKState final : public ResidualState {
 public:
  TopKState(TensorSpec spec, bool error_feedback) : ResidualState(CodecId::TopK, std::move(spec), error_feedback) {}
  TopKState(const TopKState& other) : ResidualState(other) {}  // without the scratch buffers
  std::unique_ptr<CodecState> clone() const override { return std::make_unique<TopKState>(*this); }

  // Scratch, kept across encodes (on CUDA, a cudaFree would synchronise the whole device).
  std::vector<float> scratch;   // CPU without error feedback: v (a copy of the gradient)
  kc::DeviceBuffer d_out;       // CUDA: indices then values
  kc::DeviceBuffer d_work;      // CUDA: the kernels' workspace (kc::topk_workspace_bytes)
};

class TopKCodec final : public ApplyingCodec {
 public:
  explicit TopKCodec(const TopKOptions& o) : o_(o) {
    if (!(o.fraction > 0.0 && o.fraction <= 1.0))
      throw InvalidArgumentError(fmt::format("topk codec: fraction {} (0 < fraction <= 1)", o.fraction));
  }

  CodecId id() const noexcept override { return CodecId::TopK; }
  std::string describe() const override {
    return fmt::format("topk(fraction={}, error_feedback={}{})", o_.fraction, o_.error_feedback ? "on" : "off",
                       sampled() ? ", selection=sampled" : "");
  }

  std::unique_ptr<CodecState> make_state(const TensorSpec& spec) const override {
    check_device_supported("topk", spec.device, spec.device_index);
    if (spec.count() > UINT32_MAX)
      throw InvalidArgumentError(fmt::format(
          "topk codec: tensor of {} elements; indices are 32-bit (at most {})", spec.count(), UINT32_MAX));
    return std::make_unique<TopKState>(spec, o_.error_feedback);
  }
  size_t encoded_bytes(const TensorSpec& spec) const override {
    const size_t n = spec.count();
    if (n > UINT32_MAX)
      throw InvalidArgumentError(fmt::format("topk codec: tensor of {} elements exceeds 2^32 - 1", n));
    return payload_bytes(Header{CodecId::TopK, 0, n, topk_k(o_.fraction, n), 0});
  }

  size_t encode(BufferView grad, CodecState& state, std::span<uint8_t> out,
                CudaStream stream) const override {
    check_grad(id(), grad, state);
    auto& s = state_as<TopKState>(id(), state);
    s.begin_encode();
    const size_t n = grad.count, bytes = encoded_bytes(s.spec());
    const uint64_t k = topk_k(o_.fraction, n);
    check_capacity(id(), out, bytes);
    reject_nonfinite(id(), grad, stream);
    uint8_t* idx = out.data() + kPayloadHeaderBytes;
    uint8_t* val = idx + 4 * k;
    if (n > 0 && grad.device == DeviceKind::Cuda) {
      s.begin_in_place_staged_encode(stream);
      encode_cuda(grad, s, k, sampled(), idx, stream);
    } else if (n > 0) {
      encode_cpu(static_cast<const float*>(grad.data), n, s, k, idx, val);
    }
    write_header(out, Header{id(), 0, n, k, 0});
    s.record(bytes);
    return bytes;
  }

 private:
  static void encode_cpu(const float* x, size_t n, TopKState& s, uint64_t k, uint8_t* idx, uint8_t* val) {
    // v is the residual, updated in place; while staging it is the spare (the pending
    // residual), formed from the committed residual r, which is only read.
    const float* r = s.residual_data();
    float* v = s.residual_data();
    if (v == nullptr) {
      s.scratch.resize(n);
      v = s.scratch.data();
      std::memcpy(v, x, n * 4);
    } else if (s.staging()) {
      v = s.spare().data();
    }
    // Pass 1: v = x + residual, and the histogram of the top digit. Four interleaved
    // histograms, because gradient magnitudes crowd into a few bins.
    constexpr uint32_t kTop = 1u << 11;
    std::vector<uint64_t> h4(4 * kTop, 0);
    const bool add = r != nullptr;
    size_t i = 0;
    for (; i + 4 <= n; i += 4) {
      for (size_t j = 0; j < 4; ++j) {
        if (add) v[i + j] = math::add_rn(x[i + j], r[i + j]);
        ++h4[j * kTop + (math::magnitude_key(v[i + j]) >> 20)];
      }
    }
    for (; i < n; ++i) {
      if (add) v[i] = math::add_rn(x[i], r[i]);
      ++h4[math::magnitude_key(v[i]) >> 20];
    }
    std::vector<uint32_t> candidates;
    const Threshold t = radix_select(k, [&](size_t pass, uint32_t prefix) {
      const RadixPass rp = kPasses[pass];
      std::vector<uint64_t> h(size_t(1) << rp.bits, 0);
      if (pass == 0) {
        for (uint32_t b = 0; b < kTop; ++b) h[b] = h4[b] + h4[kTop + b] + h4[2 * kTop + b] + h4[3 * kTop + b];
        return h;
      }
      if (pass == 1) {  // gather the keys of the chosen top bin once
        for (size_t e = 0; e < n; ++e) {
          const uint32_t key = math::magnitude_key(v[e]);
          if ((key >> 20) == prefix) candidates.push_back(key);
        }
      }
      const uint32_t above = rp.shift + rp.bits, mask = (1u << rp.bits) - 1;
      for (uint32_t key : candidates)
        if ((key >> above) == prefix) ++h[(key >> rp.shift) & mask];
      return h;
    });
    // Compaction in index order; what is sent leaves the residual.
    uint64_t j = 0, ties = t.ties;
    for (size_t e = 0; e < n; ++e) {
      const uint32_t key = math::magnitude_key(v[e]);
      if (key > t.key || (key == t.key && ties > 0)) {
        ties -= key == t.key;
        store<uint32_t>(idx, j, static_cast<uint32_t>(e));
        store<float>(val, j, v[e]);
        v[e] = 0.0f;
        ++j;
      }
    }
    if (j != k)
      throw InternalError(fmt::format("topk encode selected {} elements, expected {}", j, k));
  }

  bool sampled() const noexcept { return o_.selection == TopKOptions::Selection::Sampled; }

  static void encode_cuda(const BufferView& grad, TopKState& s, uint64_t k, bool sampled, uint8_t* host_out,
                          CudaStream stream) {
    const size_t n = grad.count;
    const int dev = grad.device_index;
    cuda_call("topk encode", [&] {
      // Every allocation comes before the first write: unstaged with error feedback, v is the
      // residual itself, and an encode that throws must leave it as it was (a full device is
      // the likely failure, and a caller that retries would otherwise add grad twice).
      // Without error feedback the selection reads the gradient itself and writes nothing back.
      float* residual = s.residual_data();
      const float* v = residual ? residual : static_cast<const float*>(grad.data);
      size_t work = kc::topk_workspace_bytes(n);
      if (sampled) work = std::max(work, kc::topk_sampled_workspace_bytes(n, k, dev));
      if (s.d_work.bytes() < work) s.d_work = kc::DeviceBuffer(work, dev);
      if (s.d_out.bytes() < 8 * k) s.d_out = kc::DeviceBuffer(8 * k, dev);
      if (residual != nullptr) kc::add_async(residual, static_cast<const float*>(grad.data), n, dev, stream.handle);
      uint32_t* d_idx = s.d_out.as<uint32_t>();
      float* d_val = reinterpret_cast<float*>(d_idx + k);
      // The sampled selection writes nothing when its bracket misses; the radix select then runs.
      if (!sampled || !kc::topk_select_sampled(v, residual, n, k, d_idx, d_val, s.d_work.data(), s.d_work.bytes(),
                                               dev, stream.handle)) {
        const Threshold t = radix_select(k, [&](size_t pass, uint32_t prefix) {
          const RadixPass rp = kPasses[pass];
          std::vector<uint64_t> h(size_t(1) << rp.bits, 0);
          kc::magnitude_histogram(v, n, rp.shift, rp.bits, prefix, 31 - rp.shift - rp.bits, h.data(),
                                  s.d_work.data(), s.d_work.bytes(), dev, stream.handle);
          return h;
        });
        kc::topk_compact(v, residual, n, t.key, t.ties, d_idx, d_val, k, s.d_work.data(), s.d_work.bytes(), dev,
                         stream.handle);
      }
      kc::copy_async(host_out, s.d_out.data(), 8 * k, dev, stream.handle);
      kc::synchronize(dev, stream.handle);
    });
  }

  void apply(std::span<const uint8_t> payload, BufferView out, bool accumulate,
             CudaStream stream) const override {
    check_fp32(accumulate ? "topk decode_accumulate" : "topk decode", "output", out, out.count);
    const Header h = read_header_for(payload, id(), out.count);
    const size_t n = out.count, k = h.param_a;
    const uint8_t* idx = payload.data() + kPayloadHeaderBytes;
    const uint8_t* val = idx + 4 * k;
    // Validate before touching `out`: indices strictly increasing (so in range and distinct,
    // which the scatter relies on) and values finite.
    int64_t previous = -1;
    for (size_t j = 0; j < k; ++j) {
      const uint32_t i = load<uint32_t>(idx, j);
      if (static_cast<int64_t>(i) <= previous || i >= n)
        throw CorruptError(fmt::format(
            "topk payload: index {} of {} is {} (indices must increase and be < {}; previous {})", j, k,
            i, n, previous));
      previous = i;
    }
    require_finite_bytes(id(), "value", val, k);
    if (out.device == DeviceKind::Cuda) {
      auto d = upload(payload.subspan(kPayloadHeaderBytes), out.device_index, stream);
      cuda_call("topk decode", [&] {
        if (!accumulate) kc::zero_async(out.data, n * 4, out.device_index, stream.handle);
        kc::scatter_add(d.as<uint32_t>(), reinterpret_cast<const float*>(d.as<uint32_t>() + k), k,
                        static_cast<float*>(out.data), out.device_index, stream.handle);
        kc::synchronize(out.device_index, stream.handle);
      });
      return;
    }
    float* o = static_cast<float*>(out.data);
    if (!accumulate && n > 0) std::memset(o, 0, n * 4);
    for (size_t j = 0; j < k; ++j) o[load<uint32_t>(idx, j)] += load<float>(val, j);
  }

  TopKOptions o_;
};

}  // namespace

std::unique_ptr<Codec> make_topk_codec(const TopKOptions& options) {
  return std::make_unique<TopKCodec>(options);
}

}  // namespace meshtrain::compress
