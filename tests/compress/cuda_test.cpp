// Every CUDA kernel against its CPU reference: the same codec encodes the same fresh random
// gradients on the CPU and on the GPU (odd sizes, smaller than a block, many blocks), and the
// payload bytes, residuals, clamp counts and decoded outputs must be identical. Runs on a
// non-default stream. Skips with the CUDA runtime's reason where there is no GPU.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>

#include "compress/helpers.h"
#include "compress/topk_sample_emulation.h"
#include "kernels/compress/api.h"
#include "kernels/compress/codec_math.h"
#include "support/cuda_skip.h"

using namespace meshtrain;
using namespace meshtrain::compress;
using namespace meshtrain::compress::testing;
namespace kc = meshtrain::cuda::compress;

namespace {

// A device copy of a host vector, on device 0, used through `stream`.
class DeviceVector {
 public:
  DeviceVector(const std::vector<float>& host, void* stream)
      : n_(host.size()), buffer_(std::max<size_t>(host.size(), 1) * 4, 0), stream_(stream) {
    kc::copy_async(buffer_.data(), host.data(), n_ * 4, 0, stream_);
    kc::synchronize(0, stream_);
  }
  BufferView view() const { return BufferView{buffer_.data(), n_, DType::Float32, DeviceKind::Cuda, 0}; }
  std::vector<float> host() const {
    std::vector<float> out(n_);
    kc::copy_async(out.data(), buffer_.data(), n_ * 4, 0, stream_);
    kc::synchronize(0, stream_);
    return out;
  }

 private:
  size_t n_;
  kc::DeviceBuffer buffer_;
  void* stream_;
};

class Stream {
 public:
  Stream() : s_(kc::stream_create(0)) {}
  ~Stream() { kc::stream_destroy(s_, 0); }
  CudaStream get() const { return CudaStream{s_}; }
  void* raw() const { return s_; }

 private:
  void* s_;
};

void expect_same_bits(const std::vector<float>& a, const std::vector<float>& b, const std::string& what) {
  ASSERT_EQ(a.size(), b.size()) << what;
  for (size_t i = 0; i < a.size(); ++i) ASSERT_EQ(bits(a[i]), bits(b[i])) << what << " element " << i;
}

struct Case {
  std::string spec;
  std::vector<size_t> shape;
};
void PrintTo(const Case& c, std::ostream* os) {
  *os << c.spec << " shape {";
  for (size_t i = 0; i < c.shape.size(); ++i) *os << (i ? ", " : "") << c.shape[i];
  *os << "}";
}

std::vector<Case> cases() {
  std::vector<std::vector<size_t>> shapes = {{1}, {7}, {31}, {255}, {256}, {257}, {1000}, {4097},
                                             {65537}, {(1u << 20) + 3}, {37, 53}, {300, 129}};
  // The int8 block sizes that take the warp-per-block kernel (128, 256, 512, 1024) besides the
  // default, with each rounding and error feedback off, against the CPU.
  std::vector<std::string> specs = all_codec_specs();
  for (const char* warp_kernel_spec : {"int8:block_size=128,rounding=stochastic,seed=5",
                                       "int8:block_size=512,error_feedback=off", "int8:block_size=1024"})
    specs.push_back(warp_kernel_spec);
  // Top-k's sampled selection, with error feedback and without (a third of the elements sent).
  for (const char* sampled_spec : {"topk:fraction=0.01,selection=sampled",
                                   "topk:fraction=0.3,error_feedback=off,selection=sampled"})
    specs.push_back(sampled_spec);
  // PowerSGD without error feedback (its products read the gradient itself) at a higher rank.
  specs.push_back("powersgd:rank=7,error_feedback=off");
  std::vector<Case> out;
  for (const auto& spec : specs)
    for (const auto& shape : shapes) out.push_back({spec, shape});
  return out;
}

class CudaVsCpu : public ::testing::TestWithParam<Case> {};

TEST_P(CudaVsCpu, PayloadResidualAndDecodeMatchTheCpuReference) {
  SKIP_WITHOUT_GPU();
  Stream stream;
  auto codec = make_codec(GetParam().spec);
  TensorSpec cpu_spec{GetParam().shape};
  TensorSpec gpu_spec{GetParam().shape, DeviceKind::Cuda, 0};
  const size_t n = cpu_spec.count();
  SKIP_IF_LEFT_TO_GPUS(n);
  auto cpu_state = codec->make_state(cpu_spec);
  auto gpu_state = codec->make_state(gpu_spec);
  for (uint64_t step = 0; step < 3; ++step) {
    const std::string at = GetParam().spec + " n=" + std::to_string(n) + " step " + std::to_string(step);
    auto grad = random_gradient(n, 4000 + 31 * step + n);
    DeviceVector d_grad(grad, stream.raw());
    auto cpu_payload = encode(*codec, grad, *cpu_state);
    std::vector<uint8_t> gpu_payload(codec->encoded_bytes(gpu_spec));
    gpu_payload.resize(codec->encode(d_grad.view(), *gpu_state, gpu_payload, stream.get()));
    ASSERT_EQ(cpu_payload, gpu_payload) << at;
    EXPECT_EQ(cpu_state->stats().last_clamped, gpu_state->stats().last_clamped) << at;
    EXPECT_EQ(cpu_state->stats().last_flushed, gpu_state->stats().last_flushed) << at;
    expect_same_bits(cpu_state->residual(), gpu_state->residual(), at + " residual");
    EXPECT_EQ(d_grad.host(), grad) << at << ": encode changed the gradient";

    auto expected = decode(*codec, cpu_payload, n);
    DeviceVector d_out(std::vector<float>(n, -7.0f), stream.raw());
    codec->decode(gpu_payload, d_out.view(), stream.get());
    expect_same_bits(expected, d_out.host(), at + " decode");

    auto base = random_gradient(n, 9);
    auto expected_acc = base;
    codec->decode_accumulate(cpu_payload, view(expected_acc));
    DeviceVector d_acc(base, stream.raw());
    codec->decode_accumulate(gpu_payload, d_acc.view(), stream.get());
    expect_same_bits(expected_acc, d_acc.host(), at + " decode_accumulate");
  }
}

TEST_P(CudaVsCpu, NonFiniteGradientsAreRejectedWithTheSameIndex) {
  SKIP_WITHOUT_GPU();
  Stream stream;
  auto codec = make_codec(GetParam().spec);
  TensorSpec gpu_spec{GetParam().shape, DeviceKind::Cuda, 0};
  const size_t n = gpu_spec.count();
  SKIP_IF_LEFT_TO_GPUS(n);
  auto state = codec->make_state(gpu_spec);
  auto grad = random_gradient(n, 1);
  const size_t bad = n / 2;
  grad[bad] = std::numeric_limits<float>::quiet_NaN();
  if (n > 3) grad[n - 1] = std::numeric_limits<float>::infinity();
  DeviceVector d_grad(grad, stream.raw());
  std::vector<uint8_t> out(codec->encoded_bytes(gpu_spec));
  try {
    codec->encode(d_grad.view(), *state, out, stream.get());
    FAIL() << "accepted a NaN";
  } catch (const InvalidArgumentError& e) {
    EXPECT_NE(std::string(e.what()).find("element " + std::to_string(bad) + " of"), std::string::npos) << e.what();
  }
  EXPECT_EQ(state->stats().encodes, 0u);
  for (float r : state->residual()) ASSERT_EQ(r, 0.0f);
}

INSTANTIATE_TEST_SUITE_P(Codecs, CudaVsCpu, ::testing::ValuesIn(cases()), [](const auto& info) {
  std::string name = test_name(info.param.spec);
  for (size_t d : info.param.shape) name += "_" + std::to_string(d);
  return name;
});

// Ties and degenerate inputs for the radix select and the tile compaction: all equal, all
// zero, and runs of equal magnitudes with both signs across tile boundaries.
TEST(CudaTopK, TiesAndDegenerateInputsMatchTheCpu) {
  SKIP_WITHOUT_GPU();
  Stream stream;
  const size_t n = 3 * 4096 + 17;
  std::vector<std::vector<float>> inputs = {std::vector<float>(n, 0.0f), std::vector<float>(n, 0.25f)};
  std::vector<float> runs(n);
  for (size_t i = 0; i < n; ++i) runs[i] = ((i / 1000) % 2 ? -1.0f : 1.0f) * float(i % 7);
  inputs.push_back(runs);
  for (double fraction : {0.001, 0.01, 0.3, 1.0}) {
    for (auto selection : {TopKOptions::Selection::Radix, TopKOptions::Selection::Sampled}) {
      auto codec = make_topk_codec({.fraction = fraction, .error_feedback = false, .selection = selection});
      for (const auto& x : inputs) {
        auto cpu_state = codec->make_state(TensorSpec::flat(n));
        auto gpu_state = codec->make_state(TensorSpec::flat(n, DeviceKind::Cuda, 0));
        DeviceVector d(x, stream.raw());
        std::vector<uint8_t> gpu(codec->encoded_bytes(n));
        codec->encode(d.view(), *gpu_state, gpu, stream.get());
        EXPECT_EQ(encode(*codec, x, *cpu_state), gpu) << codec->describe();
      }
    }
  }
}

// The sampled selection's kernels reach what its host emulation (topk_sample_emulation.h)
// reaches: the same hit or miss and number of candidates; when the bracket holds, the same
// indices, their values and the residual with them cleared; when it misses, nothing written.
// Sizes from one element to 1030 tiles (the tile scan carries across rounds), k from 1 to all,
// gradient-like data, ties (one key beyond the buffer: the compaction path), no candidate taken
// (exactly k = 1000 keys above the bracket), and data hidden from the sample on purpose.
TEST(CudaTopK, SampledSelectionDoesWhatItsEmulationDoes) {
  SKIP_WITHOUT_GPU();
  Stream stream;
  auto check = [&](const SampledTestData& d, uint64_t k) {
    const size_t n = d.x.size();
    const std::string at = std::string(d.name) + " n " + std::to_string(n) + " k " + std::to_string(k);
    const SampledOutcome expected = emulate_sampled_selection(d.x, k);
    DeviceVector v(d.x, stream.raw());
    float* d_v = static_cast<float*>(v.view().data);
    const std::vector<uint8_t> poison(8 * k, 0xff);
    kc::DeviceBuffer out(poison.size(), 0), work(kc::topk_sampled_workspace_bytes(n, k, 0), 0);
    kc::copy_async(out.data(), poison.data(), poison.size(), 0, stream.raw());
    SampledRun got{false, ~uint64_t(0), std::vector<uint32_t>(k), std::vector<float>(k), {}};
    got.hit = kc::topk_select_sampled(d_v, d_v, n, k, out.as<uint32_t>(),
                                      reinterpret_cast<float*>(out.as<uint32_t>() + k), work.data(), work.bytes(), 0,
                                      stream.raw(), &got.candidates);
    kc::copy_async(got.idx.data(), out.data(), 4 * k, 0, stream.raw());
    kc::copy_async(got.val.data(), out.as<uint32_t>() + k, 4 * k, 0, stream.raw());
    kc::synchronize(0, stream.raw());
    got.residual = v.host();
    expect_like_the_emulation(got, expected, d.x, at);
  };
  for (size_t n : {size_t(1), size_t(33), size_t(3 * 4096 + 17), (size_t(1) << 19) - 1, (size_t(1) << 20) + 3,
                   (size_t(1) << 22) + 5 * 4096 + 17}) {
    if (left_to_gpus(n)) continue;
    std::vector<SampledTestData> data = sampled_test_data(n);
    data.push_back({"all equal", std::vector<float>(n, 0.5f), false});
    for (double fraction : {0.0, 0.01, 0.3, 1.0}) {
      const uint64_t k = std::max<uint64_t>(1, static_cast<uint64_t>(std::ceil(fraction * double(n))));
      const kc::TopKSamplePlan plan = kc::topk_sample_plan(n, k);
      std::vector<float> hidden(n, 1.0f);  // zeros where the sample looks
      for (uint64_t s = 0; s < plan.samples; ++s)
        hidden[meshtrain::compress::math::topk_sample_index(s, n, plan.samples)] = 0.0f;
      data.push_back({"hidden from the sample", hidden, false});
      for (const SampledTestData& d : data) check(d, k);
      data.pop_back();
    }
    if (n > kc::kTopKSamples) check({"k above the bracket", all_sent_above_the_bracket(n, 1000)}, 1000);
  }
}

// The radix select's magnitude histograms, plain and warp-aggregated, count exactly what the host
// counts, for each pass's digit under the prefix of a real key (sizes below a warp, odd tails,
// many blocks; ties and zeros in the data).
TEST(CudaTopK, HistogramsPlainAndWarpAggregatedCountLikeTheHost) {
  SKIP_WITHOUT_GPU();
  Stream stream;
  struct Pass {
    uint32_t shift, bits;
  };
  // The last size takes the grid-stride loop round more than once (grid_for caps the blocks).
  for (size_t n : {size_t(1), size_t(31), size_t(33), size_t(4097), (size_t(1) << 20) + 3,
                   (size_t(1) << 24) + 3 * 4097 + 5}) {
    if (left_to_gpus(n)) continue;
    std::vector<float> x = random_gradient(n, 900 + n);
    for (size_t i = 0; i < n; i += 7) x[i] = 0.0f;
    for (size_t i = 3; i < n; i += 11) x[i] = -0.015625f;
    DeviceVector d(x, stream.raw());
    kc::DeviceBuffer work(kc::topk_workspace_bytes(n), 0);
    // Prefixes of a random key, and of the planted ties' key (many equal digits in every pass).
    for (uint32_t some_key : {meshtrain::compress::math::magnitude_key(x[n / 2]),
                              meshtrain::compress::math::magnitude_key(-0.015625f)}) {
      for (Pass p : {Pass{20, 11}, Pass{9, 11}, Pass{0, 9}}) {
        const uint32_t above = p.shift + p.bits, prefix = above >= 31 ? 0u : some_key >> above;
        std::vector<uint64_t> expected(size_t(1) << p.bits, 0);
        for (float v : x) {
          const uint32_t key = meshtrain::compress::math::magnitude_key(v);
          if ((above >= 31 ? 0u : key >> above) == prefix) ++expected[(key >> p.shift) & ((1u << p.bits) - 1)];
        }
        for (bool aggregated : {false, true}) {
          std::vector<uint64_t> got(expected.size(), ~uint64_t(0));
          kc::magnitude_histogram(static_cast<const float*>(d.view().data), n, p.shift, p.bits, prefix,
                                  31 - above, got.data(), work.data(), work.bytes(), 0, stream.raw(), aggregated);
          EXPECT_EQ(got, expected) << "n " << n << " shift " << p.shift << (aggregated ? " aggregated" : " plain");
        }
      }
    }
  }
}

// The compaction with the tiles' prefixes summed on the device writes what the host-scan one
// writes (indices, values, cleared residual), for k from 1 element to all of them; counts that
// cannot make k throw in both and leave the residual as it was.
TEST(CudaTopK, CompactionWithTheDeviceScanEqualsTheHostScan) {
  SKIP_WITHOUT_GPU();
  Stream stream;
  // The last size has 1030 tiles: the scan carries across its 1024-tile rounds.
  for (size_t n : {size_t(1), size_t(33), size_t(3 * 4096 + 17), (size_t(1) << 20) + 3,
                   (size_t(1) << 22) + 5 * 4096 + 17}) {
    if (left_to_gpus(n)) continue;
    std::vector<float> x = random_gradient(n, 1300 + n);
    for (size_t i = 0; i < n; i += 5) x[i] = 0.03125f;  // ties at many ranks
    std::vector<uint32_t> keys(n);
    for (size_t i = 0; i < n; ++i) keys[i] = meshtrain::compress::math::magnitude_key(x[i]);
    for (double fraction : {0.0, 0.01, 0.3, 1.0}) {
      const uint64_t k = std::max<uint64_t>(1, static_cast<uint64_t>(std::ceil(fraction * double(n))));
      std::vector<uint32_t> sorted = keys;
      std::nth_element(sorted.begin(), sorted.begin() + static_cast<std::ptrdiff_t>(k - 1), sorted.end(),
                       std::greater<>());
      const uint32_t threshold = sorted[k - 1];
      const uint64_t above = static_cast<uint64_t>(std::count_if(keys.begin(), keys.end(), [&](uint32_t key) {
        return key > threshold;
      }));
      const uint64_t ties = k - above;
      // A workspace of its own for each call, filled with 0xff: prefixes the scan failed to write
      // cannot be left over from the other path.
      const std::vector<uint8_t> poison(kc::topk_workspace_bytes(n), 0xff);
      auto fresh_work = [&] {
        kc::DeviceBuffer work(poison.size(), 0);
        kc::copy_async(work.data(), poison.data(), poison.size(), 0, stream.raw());
        kc::synchronize(0, stream.raw());
        return work;
      };
      struct Result {
        std::vector<uint32_t> idx;
        std::vector<float> val, cleared;
      };
      auto compact = [&](bool device_scan, uint64_t want) {
        DeviceVector v(x, stream.raw());
        kc::DeviceBuffer idx(8 * (want + 1), 0), work = fresh_work();
        float* d_v = static_cast<float*>(v.view().data);
        Result r{std::vector<uint32_t>(k), std::vector<float>(k), {}};
        kc::topk_compact(d_v, d_v, n, threshold, ties, idx.as<uint32_t>(),
                         reinterpret_cast<float*>(idx.as<uint32_t>() + want), want, work.data(), work.bytes(), 0,
                         stream.raw(), device_scan);
        kc::copy_async(r.idx.data(), idx.data(), 4 * k, 0, stream.raw());
        kc::copy_async(r.val.data(), idx.as<uint32_t>() + want, 4 * k, 0, stream.raw());
        kc::synchronize(0, stream.raw());
        r.cleared = v.host();
        return r;
      };
      const std::string at = "n " + std::to_string(n) + " k " + std::to_string(k);
      const Result host_scan = compact(false, k), device_scan = compact(true, k);
      EXPECT_EQ(host_scan.idx, device_scan.idx) << at;
      EXPECT_EQ(host_scan.val, device_scan.val) << at;
      EXPECT_EQ(host_scan.cleared, device_scan.cleared) << at;
      EXPECT_TRUE(std::is_sorted(device_scan.idx.begin(), device_scan.idx.end())) << at;
      for (bool scan_on_device : {false, true}) {
        DeviceVector v(x, stream.raw());
        kc::DeviceBuffer out(8 * (k + 1), 0), work = fresh_work();
        float* d_v = static_cast<float*>(v.view().data);
        EXPECT_THROW(kc::topk_compact(d_v, d_v, n, threshold, ties, out.as<uint32_t>(),
                                      reinterpret_cast<float*>(out.as<uint32_t>() + k + 1), k + 1, work.data(),
                                      work.bytes(), 0, stream.raw(), scan_on_device),
                     kc::CudaFailure)
            << at;
        EXPECT_EQ(v.host(), x) << at << ": a failed compaction changed the residual";
        std::vector<uint8_t> written(out.bytes(), 0xee);
        kc::copy_async(written.data(), out.data(), out.bytes(), 0, stream.raw());
        kc::synchronize(0, stream.raw());
        EXPECT_EQ(written, std::vector<uint8_t>(out.bytes(), 0)) << at << ": a failed compaction wrote output";
      }
    }
  }
}

// int8 blocks whose absmax is below 2^-120 (sent as zeros, residual kept: codec_math.h), with
// both roundings and a decay of 30 zero steps: the GPU's payloads and residuals are the CPU's.
TEST(CudaInt8, TinyBlocksAndDecayingResidualsMatchTheCpu) {
  SKIP_WITHOUT_GPU();
  Stream stream;
  for (const char* spec : {"int8:block_size=4", "int8:block_size=4,rounding=stochastic,seed=2"}) {
    SCOPED_TRACE(spec);
    auto codec = make_codec(spec);
    const std::vector<float> first = {1e-37f, 0.0f, 5e-38f, -2e-38f, 0x1p-121f, -0x1p-122f, 0.0f, 0.0f,
                                      1e-3f,  -2e-3f, 0.0f, 3e-4f};
    const size_t n = first.size();
    auto cpu_state = codec->make_state(TensorSpec::flat(n));
    auto gpu_state = codec->make_state(TensorSpec::flat(n, DeviceKind::Cuda, 0));
    for (int step = 0; step < 30; ++step) {
      const std::vector<float> x = step == 0 ? first : std::vector<float>(n, 0.0f);
      DeviceVector d(x, stream.raw());
      std::vector<uint8_t> gpu(codec->encoded_bytes(n));
      codec->encode(d.view(), *gpu_state, gpu, stream.get());
      ASSERT_EQ(encode(*codec, x, *cpu_state), gpu) << "step " << step;
      expect_same_bits(cpu_state->residual(), gpu_state->residual(), "residual at step " + std::to_string(step));
    }
  }
}

// A gradient that is not 16-byte aligned (a view one element into a buffer) takes the one-block-
// per-quantization-block kernel instead of the warp kernel's 16-byte loads: the same bytes.
TEST(CudaInt8, UnalignedGradientMatchesTheCpu) {
  SKIP_WITHOUT_GPU();
  Stream stream;
  const size_t n = 100003;
  SKIP_IF_LEFT_TO_GPUS(n);
  for (const char* spec : {"int8", "int8:rounding=stochastic,seed=4,error_feedback=off"}) {
    SCOPED_TRACE(spec);
    auto codec = make_codec(spec);
    auto cpu_state = codec->make_state(TensorSpec::flat(n));
    auto gpu_state = codec->make_state(TensorSpec::flat(n, DeviceKind::Cuda, 0));
    for (uint64_t step = 0; step < 2; ++step) {
      auto grad = random_gradient(n + 1, 77 + step);
      DeviceVector d(grad, stream.raw());
      BufferView unaligned = d.view();
      unaligned.data = static_cast<float*>(unaligned.data) + 1;
      unaligned.count = n;
      std::vector<uint8_t> gpu(codec->encoded_bytes(n));
      codec->encode(unaligned, *gpu_state, gpu, stream.get());
      ASSERT_EQ(encode(*codec, std::vector<float>(grad.begin() + 1, grad.end()), *cpu_state), gpu) << "step " << step;
      expect_same_bits(cpu_state->residual(), gpu_state->residual(), "residual at step " + std::to_string(step));
    }
  }
}

// Staged encodes on the device (what the compressed all-reduce does with CUDA gradients): a
// discarded attempt and a retry that encodes twice give a plain CPU state's bytes and residual;
// while staging, residual() and clone() show the committed residual (the device keeps the
// pending one in place and the committed one aside); a staged encode that throws leaves the
// state as it was.
TEST(CudaStaging, FailedAttemptThenRetryEqualsOneCpuEncode) {
  SKIP_WITHOUT_GPU();
  Stream stream;
  const size_t n = 30011;  // within the simulated device's range: staging does not depend on the size
  for (const char* spec : {"int8", "int8:block_size=64,rounding=stochastic,seed=3", "topk:fraction=0.01"}) {
    SCOPED_TRACE(spec);
    auto codec = make_codec(spec);
    auto staged = codec->make_state(TensorSpec::flat(n, DeviceKind::Cuda, 0));
    auto plain = codec->make_state(TensorSpec::flat(n));
    auto gpu_encode = [&](const std::vector<float>& x) {
      DeviceVector d(x, stream.raw());
      std::vector<uint8_t> out(codec->encoded_bytes(n));
      codec->encode(d.view(), *staged, out, stream.get());
      return out;
    };
    for (uint64_t step = 0; step < 3; ++step) {
      const auto grad = random_gradient(n, 300 + step);
      const auto expected = encode(*codec, grad, *plain);
      const auto committed = staged->residual();
      staged->stage();
      gpu_encode(random_gradient(n, 900 + step));
      expect_same_bits(staged->residual(), committed, "residual() while staging");
      expect_same_bits(staged->clone()->residual(), committed, "clone() while staging");
      staged->discard_staged();
      staged->stage();
      gpu_encode(random_gradient(n, 1900 + step));
      ASSERT_EQ(gpu_encode(grad), expected) << "step " << step;
      staged->commit_staged();
      expect_same_bits(staged->residual(), plain->residual(), "residual after commit");
    }
    auto bad = random_gradient(n, 5);
    bad[n / 2] = std::nanf("");
    const auto before = staged->residual();
    staged->stage();
    EXPECT_THROW(gpu_encode(bad), InvalidArgumentError);
    staged->commit_staged();
    expect_same_bits(staged->residual(), before, "residual after a rejected staged encode");
  }
}

// A CUDA PowerSGD state keeps its residual on the device: clone() and powersgd_copy_state copy
// it there, reset() zeroes it and restarts Q, and both continue like CPU states that did the
// same; the all-reduce's by-linearity steps on it give the CPU's p, q, output and residual,
// and refuse a gradient in host memory.
TEST(CudaPowerSgd, CloneAndResetOfADeviceStateContinueLikeTheCpu) {
  SKIP_WITHOUT_GPU();
  Stream stream;
  auto codec = make_codec("powersgd:rank=3");
  const std::vector<size_t> shape = {120, 77};
  const size_t n = 120 * 77;
  auto gpu = codec->make_state(TensorSpec{shape, DeviceKind::Cuda, 0});
  auto cpu = codec->make_state(TensorSpec{shape});
  auto gpu_encode = [&](CodecState& state, const std::vector<float>& x) {
    DeviceVector d(x, stream.raw());
    std::vector<uint8_t> out(codec->encoded_bytes(state.spec()));
    codec->encode(d.view(), state, out, stream.get());
    return out;
  };
  for (uint64_t step = 0; step < 2; ++step) {
    const auto grad = random_gradient(n, 70 + step);
    ASSERT_EQ(gpu_encode(*gpu, grad), encode(*codec, grad, *cpu)) << "step " << step;
  }
  auto gpu_clone = gpu->clone();
  auto cpu_clone = cpu->clone();
  const auto grad = random_gradient(n, 80);
  ASSERT_EQ(gpu_encode(*gpu_clone, grad), encode(*codec, grad, *cpu_clone));
  expect_same_bits(gpu_clone->residual(), cpu_clone->residual(), "clone's residual");
  expect_same_bits(gpu->residual(), cpu->residual(), "the original's residual after its clone encoded");
  // A copy into a used device state (the all-reduce's per-attempt copy) continues like the clone.
  powersgd_copy_state(*gpu, *gpu_clone, stream.get());
  auto cpu_again = cpu->clone();
  const auto next = random_gradient(n, 85);
  ASSERT_EQ(gpu_encode(*gpu_clone, next), encode(*codec, next, *cpu_again)) << "after powersgd_copy_state";
  expect_same_bits(gpu_clone->residual(), cpu_again->residual(), "copied state's residual");
  gpu->reset();
  cpu->reset();
  EXPECT_EQ(gpu->residual(), std::vector<float>(n, 0.0f));
  ASSERT_EQ(gpu_encode(*gpu, grad), encode(*codec, grad, *cpu)) << "after reset";
  std::vector<float> host_grad = random_gradient(n, 90);
  DeviceVector d_grad(host_grad, stream.raw());
  std::vector<float> p_cpu(120 * 3), p_gpu(120 * 3), q_cpu(77 * 3), q_gpu(77 * 3);
  EXPECT_THROW(powersgd_project(view(host_grad), *gpu, p_gpu, stream.get()), InvalidArgumentError);
  powersgd_project(view(host_grad), *cpu, p_cpu);
  powersgd_project(d_grad.view(), *gpu, p_gpu, stream.get());
  expect_same_bits(p_gpu, p_cpu, "powersgd_project's p");
  for (float& v : p_cpu) v *= 2.0f;  // as if summed over two members
  p_gpu = p_cpu;
  powersgd_back_project(*cpu, p_cpu, q_cpu);
  powersgd_back_project(*gpu, p_gpu, q_gpu, stream.get());
  expect_same_bits(q_gpu, q_cpu, "powersgd_back_project's q");
  std::vector<float> out_cpu(n);
  DeviceVector out_gpu(std::vector<float>(n, -1.0f), stream.raw());
  powersgd_finish(*cpu, p_cpu, q_cpu, view(out_cpu));
  powersgd_finish(*gpu, p_gpu, q_gpu, out_gpu.view(), stream.get());
  expect_same_bits(out_gpu.host(), out_cpu, "powersgd_finish's output");
  expect_same_bits(gpu->residual(), cpu->residual(), "residual after powersgd_finish");
}

TEST(CudaCast, ClampAndFlushCountsMatchTheCpu) {
  SKIP_WITHOUT_GPU();
  Stream stream;
  std::vector<float> x = {70000.0f, -1e10f, 65519.0f, 65520.0f, 1e-9f, 0.0f, -0.0f, 1.0f,
                          std::numeric_limits<float>::max(), 1e-45f, -3e38f};
  for (const char* spec : {"fp16", "bf16"}) {
    auto codec = make_codec(spec);
    auto cpu_state = codec->make_state(TensorSpec::flat(x.size()));
    auto gpu_state = codec->make_state(TensorSpec::flat(x.size(), DeviceKind::Cuda, 0));
    DeviceVector d(x, stream.raw());
    std::vector<uint8_t> gpu(codec->encoded_bytes(x.size()));
    codec->encode(d.view(), *gpu_state, gpu, stream.get());
    EXPECT_EQ(encode(*codec, x, *cpu_state), gpu) << spec;
    EXPECT_EQ(cpu_state->stats().last_clamped, gpu_state->stats().last_clamped) << spec;
    EXPECT_EQ(cpu_state->stats().last_flushed, gpu_state->stats().last_flushed) << spec;
    EXPECT_GT(gpu_state->stats().last_clamped, 0u) << spec;
  }
}

// The fp16 decode kernel over every finite half.
TEST(CudaCast, EveryFiniteHalfDecodesLikeTheCpu) {
  SKIP_WITHOUT_GPU();
  std::vector<uint16_t> halves;
  for (uint32_t h = 0; h < 65536; ++h)
    if ((h & 0x7c00u) != 0x7c00u) halves.push_back(static_cast<uint16_t>(h));
  kc::DeviceBuffer in(halves.size() * 2, 0), out(halves.size() * 4, 0);
  kc::copy_async(in.data(), halves.data(), halves.size() * 2, 0, nullptr);
  kc::fp16_to_fp32(in.as<uint16_t>(), out.as<float>(), halves.size(), false, 0, nullptr);
  std::vector<float> got(halves.size());
  kc::copy_async(got.data(), out.data(), got.size() * 4, 0, nullptr);
  kc::synchronize(0, nullptr);
  for (size_t i = 0; i < halves.size(); ++i)
    ASSERT_EQ(bits(got[i]), bits(meshtrain::compress::math::fp16_to_fp32(halves[i]))) << std::hex << halves[i];
}

}  // namespace
