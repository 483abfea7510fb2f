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
// CPU: (below, "The CPU selection") one pass finds a lower bound of the k-th key, one gathers
// the indices of the keys at or above it, and the radix select and compaction run on those
// alone (or, when they would be most of the tensor, on v in place). The CUDA path
// (kernels/compress/topk.cu) histograms on the GPU in three passes and compacts with per-tile
// prefix sums; with selection=sampled it first tries kernels/compress/api.h's
// topk_select_sampled (a sorted sample brackets T; same output), which falls back to that when
// its bracket misses.
#include <algorithm>
#include <array>
#include <cmath>
#include <limits>

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

// The bin of histogram h that holds the k-th largest key (k >= 1, at most h's total), and how
// many keys the bins above it hold.
struct KthBin {
  uint32_t digit = 0;
  uint64_t above = 0;
};
KthBin kth_bin(const std::vector<uint64_t>& h, uint64_t k) {
  KthBin bin;
  for (size_t b = h.size(); b-- > 0;) {
    if (bin.above + h[b] >= k) {
      bin.digit = static_cast<uint32_t>(b);
      break;
    }
    bin.above += h[b];
  }
  return bin;
}

// hist(pass, prefix) -> counts of the 2^bits digit values among the keys whose bits above
// shift + bits equal prefix. k >= 1 and k <= the number of keys.
template <typename Hist>
Threshold radix_select(uint64_t k, Hist&& hist) {
  uint32_t prefix = 0;
  for (size_t p = 0; p < kPasses.size(); ++p) {
    const KthBin bin = kth_bin(hist(p, prefix), k);
    k -= bin.above;
    prefix = (prefix << kPasses[p].bits) | bin.digit;
  }
  return Threshold{prefix, k};
}

uint64_t topk_k(double fraction, size_t n) {
  if (n == 0) return 0;
  const double y = fraction * static_cast<double>(n);
  const double nearest = std::round(y);
  // fraction * n is off by a few ulps at most (0.07 * 100 = 7.000000000000001): such a product
  // counts as the integer. An absolute floor for small y, relative (a few ulps) for large y; a
  // tolerance proportional to y alone would reach 0.5 at y = 5e8 and turn ceil into round.
  const double tolerance = std::max(1e-9, 8 * std::numeric_limits<double>::epsilon() * y);
  double k = std::fabs(y - nearest) <= tolerance ? nearest : std::ceil(y);
  k = std::clamp(k, 1.0, static_cast<double>(n));
  return static_cast<uint64_t>(k);
}

// ---- The CPU selection. Both ways find a lower bound lo <= T (T: the k-th largest key), gather
// the indices of the keys >= lo in one pass (in index order; the candidates), run the radix
// select on the candidates' keys alone and compact them. Radix: lo is the bottom of pass 1's
// top-digit bin that holds T (exact; pass 1 also forms v). Sampled: lo is a low order statistic
// of a sorted sample of v (the GPU's plan, kc::topk_sample_plan, with fewer samples), and v is
// formed in the gathering pass: two passes over the data instead of three, and none of pass
// 1's scattered histogram increments. It misses when fewer than k keys are >= lo or more than
// its capacity are (data unlike its sample); v is formed by then and the radix select runs on it.

// After a miss, Selection::Auto takes the radix way for this many encodes of the state before
// it samples again (data that misses tends to go on missing: a gradient mostly of zeros).
constexpr uint32_t kCpuMissBackoff = 16;
// The gathering pass forms v a chunk at a time, then scans the chunk while it is in L1.
constexpr size_t kCpuChunk = 4096;

struct CpuTopKScratch {
  std::vector<uint32_t> sample;      // the sample's keys
  std::vector<uint32_t> candidates;  // indices of the keys >= lo, ascending
  std::vector<float> values;         // their values of v (read while v is in cache)
};

// The gradient x, the residual r added to it (null: v is x itself), and `out`, where v is
// written when r is set and where what is sent is cleared to 0 (null: nothing is written).
struct CpuVectors {
  const float* x;
  const float* r;
  float* out;
  const float* v() const { return r != nullptr ? out : x; }
};

// Expected candidates of the sampled selection: the keys >= the sample's lo_rank-th.
uint64_t cpu_sampled_capacity(const kc::TopKSamplePlan& p, uint64_t n) {
  const double expected = static_cast<double>(p.samples - p.lo_rank) / static_cast<double>(p.samples) *
                          static_cast<double>(n);
  const double capacity = 3.0 * std::ceil(expected) + 8192.0;
  return capacity >= static_cast<double>(n) ? n : static_cast<uint64_t>(capacity);
}
// Sampling prunes only when lo cuts off most of the tensor (and its candidates, 8 bytes each,
// kept in the state's scratch, stay within a byte per element). With 2^15 samples that takes
// about 70,000 elements at 0.1% and 104,000 at 1%, and a fraction below about 3.3%.
bool cpu_sampling_worthwhile(uint64_t n, uint64_t k) {
  const kc::TopKSamplePlan p = kc::topk_sample_plan(n, k, kc::kTopKCpuSamples);
  return !p.lo_open && cpu_sampled_capacity(p, n) <= n / 8;
}

// Writes v over [0, n) when r is set, and appends to cand / cand_v the indices i with
// key(v[i]) >= lo and v[i] while at most `capacity` are gathered; both have room for capacity +
// kCpuChunk. Returns how many were gathered, or more than capacity once they overflowed (v is
// still formed entirely).
MT_VECTOR_CLONES
size_t form_and_gather(const float* x, const float* r, float* out, size_t n, uint32_t lo, uint32_t* cand,
                       float* cand_v, size_t capacity) {
  size_t c = 0;
  for (size_t b = 0; b < n; b += kCpuChunk) {
    const size_t e = std::min(n, b + kCpuChunk);
    const float* v = x;
    if (r != nullptr) {
      for (size_t i = b; i < e; ++i) out[i] = math::add_rn(x[i], r[i]);
      v = out;
    }
    if (c > capacity) continue;
    size_t i = b;
    for (; i + 16 <= e; i += 16) {  // most groups of 16 hold no candidate: test them at once
      uint32_t any = 0;
      for (size_t t = 0; t < 16; ++t) any |= static_cast<uint32_t>(math::magnitude_key(v[i + t]) >= lo);
      if (any == 0) continue;
      for (size_t t = 0; t < 16; ++t) {  // branch-free: the taken ones are unpredictable
        cand[c] = static_cast<uint32_t>(i + t);
        cand_v[c] = v[i + t];
        c += math::magnitude_key(v[i + t]) >= lo;
      }
    }
    for (; i < e; ++i)
      if (math::magnitude_key(v[i]) >= lo) {
        cand[c] = static_cast<uint32_t>(i);
        cand_v[c++] = v[i];
      }
  }
  return c;
}

// v = x + r, fused with the histogram of the top digit (pass 1 of the radix select).
MT_VECTOR_CLONES
std::vector<uint64_t> form_and_histogram(const CpuVectors& vec, size_t n) {
  // Four interleaved histograms, because gradient magnitudes crowd into a few bins.
  static_assert(kPasses[0].shift == 20 && kPasses[0].bits == 11);
  constexpr uint32_t kTop = 1u << 11;
  std::vector<uint64_t> h4(4 * kTop, 0);
  const float *x = vec.x, *r = vec.r;
  float* v = vec.out;
  size_t i = 0;
  if (r != nullptr) {
    for (; i + 4 <= n; i += 4)
      for (size_t j = 0; j < 4; ++j) {
        v[i + j] = math::add_rn(x[i + j], r[i + j]);
        ++h4[j * kTop + (math::magnitude_key(v[i + j]) >> 20)];
      }
    for (; i < n; ++i) {
      v[i] = math::add_rn(x[i], r[i]);
      ++h4[math::magnitude_key(v[i]) >> 20];
    }
  } else {
    for (; i + 4 <= n; i += 4)
      for (size_t j = 0; j < 4; ++j) ++h4[j * kTop + (math::magnitude_key(x[i + j]) >> 20)];
    for (; i < n; ++i) ++h4[math::magnitude_key(x[i]) >> 20];
  }
  for (uint32_t b = 0; b < kTop; ++b) h4[b] += h4[kTop + b] + h4[2 * kTop + b] + h4[3 * kTop + b];
  h4.resize(kTop);
  return h4;
}

// The radix select over `count` values (v's candidates, or v itself; `top`, when given, is the
// first pass's histogram of them), then the compaction in order: k (index, value) pairs, what is
// sent cleared in `clear` when set. index_of(q) is value q's index in v.
template <typename IndexOf>
void select_among(const float* values, size_t count, IndexOf index_of, uint64_t k, const std::vector<uint64_t>* top,
                  float* clear, uint8_t* idx, uint8_t* val) {
  const Threshold t = radix_select(k, [&](size_t pass, uint32_t prefix) {
    if (pass == 0 && top != nullptr) return *top;
    const RadixPass rp = kPasses[pass];
    std::vector<uint64_t> h(size_t(1) << rp.bits, 0);
    const uint32_t above = rp.shift + rp.bits, mask = (1u << rp.bits) - 1;  // above <= 31
    for (size_t q = 0; q < count; ++q) {
      const uint32_t key = math::magnitude_key(values[q]);
      if ((key >> above) == prefix) ++h[(key >> rp.shift) & mask];
    }
    return h;
  });
  // Everything above T is sent, and of the keys equal to T the first t.ties in index order.
  uint64_t j = 0, ties = t.ties;
  for (size_t q = 0; q < count; ++q) {
    const uint32_t key = math::magnitude_key(values[q]);
    if (key > t.key || (key == t.key && ties > 0)) {
      ties -= key == t.key;
      const uint32_t e = index_of(q);
      store<uint32_t>(idx, j, e);
      store<float>(val, j, values[q]);
      if (clear != nullptr) clear[e] = 0.0f;
      ++j;
    }
  }
  if (j != k) throw InternalError(fmt::format("topk encode selected {} elements, expected {}", j, k));
}

// What the selections below return when v is finite.
constexpr size_t kFinite = SIZE_MAX;

// The exact selection among the gathered candidates (every key >= lo, at least k of them, in
// index order). A NaN/Inf in v shows among them: the largest key is always a candidate, and
// with any NaN/Inf it is one (Infs from an overflowing v + r all share that key, so all are
// candidates). Returns kFinite, or the index of a NaN/Inf of v (nothing written).
size_t select_candidates(float* clear, uint64_t k, const CpuTopKScratch& scratch, size_t count, uint8_t* idx,
                         uint8_t* val) {
  const uint32_t* cand = scratch.candidates.data();
  const float* values = scratch.values.data();
  if (const size_t bad = find_nonfinite(values, count); bad < count) return cand[bad];
  select_among(values, count, [cand](size_t q) { return cand[q]; }, k, nullptr, clear, idx, val);
  return kFinite;
}

// The radix way: pass 1's histogram (which forms v) gives lo exactly, the bottom of the bin that
// holds the k-th key; then gather and select. Returns as select_candidates.
size_t select_radix_cpu(const CpuVectors& vec, size_t n, uint64_t k, CpuTopKScratch& scratch, uint8_t* idx,
                        uint8_t* val) {
  const std::vector<uint64_t> top = form_and_histogram(vec, n);
  const KthBin bin = kth_bin(top, k);
  const uint64_t count = bin.above + top[bin.digit];  // the keys >= lo
  const float* v = vec.v();
  if (count > n / 4) {
    // Ties or a flat distribution: the candidates would be most of v (and kept in the state's
    // scratch). The last two passes and the compaction read v itself instead.
    if (const size_t bad = find_nonfinite(v, n); bad < n) return bad;
    select_among(v, n, [](size_t q) { return static_cast<uint32_t>(q); }, k, &top, vec.out, idx, val);
    return kFinite;
  }
  scratch.candidates.resize(count + kCpuChunk);
  scratch.values.resize(count + kCpuChunk);
  const size_t gathered = form_and_gather(v, nullptr, nullptr, n, bin.digit << kPasses[0].shift,
                                          scratch.candidates.data(), scratch.values.data(), count);
  if (gathered != count)
    throw InternalError(fmt::format("topk encode gathered {} candidates, its histogram counted {}", gathered, count));
  return select_candidates(vec.out, k, scratch, count, idx, val);
}

// The sampled way; returns false when the sample's lo missed (v formed, nothing written), else
// true with select_candidates' result in `nonfinite`.
bool select_sampled_cpu(const CpuVectors& vec, size_t n, uint64_t k, CpuTopKScratch& scratch, uint8_t* idx,
                        uint8_t* val, size_t& nonfinite) {
  const kc::TopKSamplePlan plan = kc::topk_sample_plan(n, k, kc::kTopKCpuSamples);
  const uint64_t capacity = cpu_sampled_capacity(plan, n);
  scratch.sample.resize(plan.samples);
  for (uint64_t q = 0; q < plan.samples; ++q) {
    const uint64_t i = math::topk_sample_index(q, n, plan.samples);
    scratch.sample[q] = math::magnitude_key(vec.r != nullptr ? math::add_rn(vec.x[i], vec.r[i]) : vec.x[i]);
  }
  const auto at = scratch.sample.begin() + static_cast<std::ptrdiff_t>(plan.lo_rank);
  std::nth_element(scratch.sample.begin(), at, scratch.sample.end());
  const uint32_t lo = *at;
  scratch.candidates.resize(capacity + kCpuChunk);
  scratch.values.resize(capacity + kCpuChunk);
  const size_t count = form_and_gather(vec.x, vec.r, vec.out, n, lo, scratch.candidates.data(),
                                       scratch.values.data(), capacity);
  if (count < k || count > capacity) return false;
  nonfinite = select_candidates(vec.out, k, scratch, count, idx, val);
  return true;
}

class TopKState final : public ResidualState {
 public:
  TopKState(TensorSpec spec, bool error_feedback) : ResidualState(CodecId::TopK, std::move(spec), error_feedback) {}
  TopKState(const TopKState& other) : ResidualState(other) {}  // without the scratch buffers
  std::unique_ptr<CodecState> clone() const override { return std::make_unique<TopKState>(*this); }

  // The miss back-off is part of what a discarded attempt or a refused gradient leaves as it was.
  void stage() override {
    ResidualState::stage();
    skip_sampling_committed = skip_sampling;
  }
  void discard_staged() override {
    ResidualState::discard_staged();
    skip_sampling = skip_sampling_committed;
  }
  void reset() override {
    ResidualState::reset();
    skip_sampling = 0;
  }

  // Scratch, kept across encodes (on CUDA, a cudaFree would synchronise the whole device).
  CpuTopKScratch cpu;
  uint32_t skip_sampling = 0;   // CPU, Selection::Auto: encodes left before sampling again after a miss
  uint32_t skip_sampling_committed = 0;  // its value when the state staged
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
                       selection_text());
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
    // A NaN/Inf gradient must leave the state as it was. On the CPU the selection sees every
    // NaN/Inf of v among its candidates at no cost, and the CPU never writes the committed
    // residual: with error feedback v goes into the spare (double-buffered always, unlike int8,
    // because the selection may allocate after v is formed: a failed allocation must not leave
    // a residual that already holds grad). CUDA scans first.
    const bool cpu = grad.device == DeviceKind::Cpu;
    const bool feedback = s.residual_data() != nullptr, staged = feedback && s.staging();
    if (!cpu) reject_nonfinite(id(), grad, stream);
    uint8_t* idx = out.data() + kPayloadHeaderBytes;
    uint8_t* val = idx + 4 * k;
    bool sampled_miss = false;
    if (n > 0 && !cpu) {
      s.begin_in_place_staged_encode(stream);
      sampled_miss = encode_cuda(grad, s, k, sampled(), idx, stream);
    } else if (n > 0) {
      const float* x = static_cast<const float*>(grad.data);
      const uint32_t skip_sampling = s.skip_sampling;
      const CpuOutcome got = encode_cpu(x, n, s, k, o_.selection, idx, val);
      if (got.nonfinite != kFinite) {
        s.skip_sampling = skip_sampling;
        reject_nonfinite(id(), grad, stream);  // throws when the gradient itself has one
        throw InvalidArgumentError(fmt::format(
            "topk encode: element {} of the gradient ({}) plus the residual overflows float; the state is unchanged",
            got.nonfinite, x[got.nonfinite]));
      }
      if (feedback && !staged) s.swap_residual();  // staged: the spare is the pending residual
      sampled_miss = got.missed;
    }
    write_header(out, Header{id(), 0, n, k, 0});
    s.record(bytes, 0, 0, sampled_miss);
    return bytes;
  }

 private:
  struct CpuOutcome {
    bool missed = false;        // the sampled selection missed, and the radix select ran after it
    size_t nonfinite = kFinite;  // or the index of a NaN/Inf of v (select_candidates)
  };
  static CpuOutcome encode_cpu(const float* x, size_t n, TopKState& s, uint64_t k,
                               TopKOptions::Selection selection, uint8_t* idx, uint8_t* val) {
    // v = x + r goes into the spare (the committed residual r is only read). Without error
    // feedback v is the gradient itself, only read, and nothing is cleared.
    const float* r = s.residual_data();
    float* residual = r != nullptr ? s.spare().data() : nullptr;
    const CpuVectors vec{x, r, residual};
    const bool automatic = selection == TopKOptions::Selection::Auto;
    bool sampled = selection == TopKOptions::Selection::Sampled;
    if (automatic) {
      sampled = s.skip_sampling == 0;
      if (!sampled) --s.skip_sampling;
    }
    CpuOutcome got;
    if (sampled && cpu_sampling_worthwhile(n, k)) {
      got.missed = !select_sampled_cpu(vec, n, k, s.cpu, idx, val, got.nonfinite);
      if (got.missed && automatic) s.skip_sampling = kCpuMissBackoff;
      // The bracket missed: v is formed; the radix select reads it.
      if (got.missed) got.nonfinite = select_radix_cpu(CpuVectors{vec.v(), nullptr, residual}, n, k, s.cpu, idx, val);
    } else {
      got.nonfinite = select_radix_cpu(vec, n, k, s.cpu, idx, val);
    }
    return got;
  }

  // CUDA tensors: Auto is Radix until the sampled kernels have run on a GPU.
  bool sampled() const noexcept { return o_.selection == TopKOptions::Selection::Sampled; }
  const char* selection_text() const noexcept {
    switch (o_.selection) {
      case TopKOptions::Selection::Radix: return ", selection=radix";
      case TopKOptions::Selection::Sampled: return ", selection=sampled";
      case TopKOptions::Selection::Auto: break;
    }
    return "";
  }

  static bool encode_cuda(const BufferView& grad, TopKState& s, uint64_t k, bool sampled, uint8_t* host_out,
                          CudaStream stream) {
    const size_t n = grad.count;
    const int dev = grad.device_index;
    bool missed = false;
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
      missed = sampled && !kc::topk_select_sampled(v, residual, n, k, d_idx, d_val, s.d_work.data(),
                                                   s.d_work.bytes(), dev, stream.handle);
      if (!sampled || missed) {
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
    return missed;
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
