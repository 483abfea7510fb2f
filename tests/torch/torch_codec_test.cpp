// Codecs through torch tensors (lib/torch/codec.cpp): the bytes of the BufferView calls, the
// tensor's shape in the state, errors that name the tensor, and on a GPU torch's current stream.
#include <ATen/ATen.h>
#include <c10/core/StreamGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <gtest/gtest.h>
#include <torch/cuda.h>

#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "kernels/runtime.h"
#include "meshtrain/torch.h"

namespace meshtrain {
namespace {

namespace tg = torch_glue;
namespace mc = compress;

template <class E, class F>
void expect_error(F&& call, std::vector<std::string> fragments) {
  try {
    call();
    ADD_FAILURE() << "no exception";
  } catch (const E& e) {
    for (const auto& f : fragments) EXPECT_NE(std::string(e.what()).find(f), std::string::npos) << e.what();
  }
}

bool same_bytes(const at::Tensor& a, const at::Tensor& b) {
  at::Tensor x = a.cpu().contiguous(), y = b.cpu().contiguous();
  return x.sizes() == y.sizes() && x.scalar_type() == y.scalar_type() &&
         std::memcmp(x.data_ptr(), y.data_ptr(), x.nbytes()) == 0;
}

// The same calls through BufferViews, for comparison.
std::vector<uint8_t> encode_view(const mc::Codec& codec, const at::Tensor& grad, mc::CodecState& state) {
  std::vector<uint8_t> out(codec.encoded_bytes(state.spec()));
  out.resize(codec.encode(tg::to_buffer_view(grad, "grad"), state, out));
  return out;
}

TEST(TorchCodec, ATensorEncodesAndDecodesAsItsBuffer) {
  for (const char* spec : {"none", "fp16", "bf16", "int8:block_size=64", "int8:rounding=stochastic,seed=3",
                           "topk:fraction=0.05", "powersgd:rank=2"}) {
    SCOPED_TRACE(spec);
    auto codec = mc::make_codec(spec);
    at::manual_seed(11);
    at::Tensor grad = at::randn({48, 33});
    auto through_torch = tg::make_state(*codec, grad, "fc1.weight");
    auto direct = codec->make_state(mc::TensorSpec{{48, 33}});
    for (int step = 0; step < 3; ++step) {  // error feedback carries over the steps
      grad = at::randn({48, 33});
      std::vector<uint8_t> payload = tg::encode(*codec, grad, *through_torch, "fc1.weight");
      ASSERT_EQ(payload, encode_view(*codec, grad, *direct)) << "step " << step;

      at::Tensor out = at::full({48, 33}, 5.0f), want = at::empty({48, 33});
      tg::decode(*codec, payload, out, "fc1.weight");
      codec->decode(payload, tg::to_buffer_view(want, "want"));
      EXPECT_TRUE(same_bytes(out, want));

      at::Tensor sum = at::full({48, 33}, 0.25f), want_sum = sum.clone();
      tg::decode_accumulate(*codec, payload, sum, "fc1.weight");
      codec->decode_accumulate(payload, tg::to_buffer_view(want_sum, "want"));
      EXPECT_TRUE(same_bytes(sum, want_sum));
    }
    EXPECT_EQ(through_torch->residual(), direct->residual());
    EXPECT_EQ(through_torch->stats().encodes, 3u);
  }
}

TEST(TorchCodec, TheStateHasTheTensorsShape) {
  auto powersgd = mc::make_codec("powersgd:rank=2");
  at::Tensor matrix = at::zeros({64, 8, 4});
  mc::TensorSpec spec = tg::tensor_spec(matrix, "conv.weight");
  EXPECT_EQ(spec.shape, (std::vector<size_t>{64, 8, 4}));
  EXPECT_EQ(spec.device, DeviceKind::Cpu);
  // Seen as 64 x 32 at rank 2, it is compressed: (64 + 32) * 2 floats instead of 2048.
  EXPECT_LT(powersgd->encoded_bytes(spec), 2048 * sizeof(float) / 4);
  EXPECT_EQ(tg::make_state(*powersgd, matrix, "conv.weight")->spec().shape, spec.shape);
  EXPECT_TRUE(tg::tensor_spec(at::zeros({}), "scale").shape.empty());  // a scalar
}

TEST(TorchCodec, ErrorsNameTheTensorAndKeepTheirType) {
  auto codec = mc::make_codec("int8");
  at::Tensor grad = at::randn({100});
  auto state = tg::make_state(*codec, grad, "fc1.weight");

  expect_error<InvalidArgumentError>([&] { tg::encode(*codec, grad.to(at::kHalf), *state, "fc1.weight"); },
                                     {"fc1.weight", "float16", "float32"});
  at::Tensor strided = at::randn({200}).slice(0, 0, 200, 2);
  expect_error<InvalidArgumentError>([&] { tg::encode(*codec, strided, *state, "fc2.bias"); },
                                     {"fc2.bias", "not contiguous"});
  expect_error<InvalidArgumentError>([&] { tg::encode(*codec, at::randn({101}), *state, "fc1.weight"); },
                                     {"fc1.weight", "101 elements"});
  expect_error<InvalidArgumentError>([&] { tg::make_state(*codec, at::randn({4}).to(at::kDouble), "head.bias"); },
                                     {"head.bias", "Double"});
  std::vector<uint8_t> small(8);
  expect_error<InvalidArgumentError>([&] { tg::encode(*codec, grad, *state, small, "fc1.weight"); },
                                     {"fc1.weight", "output of 8 bytes"});

  // A bad payload: its error names the tensor it was for, and decode_accumulate leaves it as it was.
  std::vector<uint8_t> payload = tg::encode(*codec, grad, *state, "fc1.weight");
  at::Tensor sum = at::full({100}, 2.0f), before = sum.clone();
  std::vector<uint8_t> truncated(payload.begin(), payload.end() - 1);
  expect_error<ProtocolError>([&] { tg::decode_accumulate(*codec, truncated, sum, "fc1.weight"); }, {"fc1.weight"});
  EXPECT_TRUE(same_bytes(sum, before));
  std::vector<uint8_t> nan_scale = payload;
  const float nan = std::numeric_limits<float>::quiet_NaN();
  std::memcpy(nan_scale.data() + mc::kPayloadHeaderBytes, &nan, sizeof nan);  // the first block's scale
  expect_error<CorruptError>([&] { tg::decode_accumulate(*codec, nan_scale, sum, "fc1.weight"); }, {"fc1.weight"});
  EXPECT_TRUE(same_bytes(sum, before));
}

TEST(TorchCodec, CpuTensorsHaveNoStream) {
  EXPECT_EQ(tg::current_stream_of(at::zeros({3})).handle, nullptr);
  EXPECT_EQ(tg::current_stream_of(at::Tensor()).handle, nullptr);
  if (torch::cuda::is_available()) GTEST_SKIP() << "the rest checks a host without CUDA devices";
  expect_error<InvalidArgumentError>([] { tg::current_cuda_stream(0); }, {"cuda:0"});
}

// ---------------------------------------------------------------------------------------------

// The codecs run on torch's current stream: a side stream from torch's pool (non-blocking, so
// it does not wait for the legacy default stream, nor that for it) is made current, and 50 adds
// over 256 MiB (~10 ms on an H100) are queued on it just before encode and decode_accumulate.
// Both must see every add: the payload is the CPU's of the final values, and the sum is the
// final values plus the decoded payload.
TEST(TorchCuda, CodecsRunOnTorchsCurrentStream) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device: torch::cuda::is_available() is false";
  if (cuda::device_count() == 0) GTEST_SKIP() << "meshtrain's CUDA paths: " << cuda::runtime_description();
  constexpr int64_t kCount = int64_t{1} << 26;
  const at::Device gpu(at::kCUDA, 0);
  const mc::CudaStream default_stream = tg::current_cuda_stream(0);
  c10::Stream side = c10::impl::getDeviceGuardImpl(c10::kCUDA)->getStreamFromGlobalPool(gpu);
  for (const char* spec : {"int8", "topk:fraction=0.01"}) {
    SCOPED_TRACE(spec);
    auto codec = mc::make_codec(spec);
    at::Tensor cpu_grad = at::full({kCount}, 0.5f * 50);
    cpu_grad.slice(0, 0, kCount, 7).fill_(-3.0f);  // not one value: top-k has something to choose
    auto cpu_state = codec->make_state(mc::TensorSpec::flat(kCount));
    const std::vector<uint8_t> want = encode_view(*codec, cpu_grad, *cpu_state);

    at::Tensor grad = at::zeros({kCount}, at::TensorOptions().device(gpu));
    at::Tensor start = (cpu_grad - 0.5f * 50).to(gpu);
    at::Tensor sum = at::zeros({kCount}, at::TensorOptions().device(gpu));
    torch::cuda::synchronize();
    c10::StreamGuard guard(side);
    ASSERT_NE(tg::current_cuda_stream(0).handle, default_stream.handle);
    auto state = tg::make_state(*codec, grad, "grad");
    grad.copy_(start);
    for (int i = 0; i < 50; ++i) grad.add_(0.5);
    std::vector<uint8_t> payload = tg::encode(*codec, grad, *state, "grad");
    EXPECT_TRUE(payload == want) << "the encode did not see the final gradient";

    for (int i = 0; i < 50; ++i) sum.add_(1.0);
    tg::decode_accumulate(*codec, want, sum, "sum");
    at::Tensor want_sum = at::full({kCount}, 50.0f);
    codec->decode_accumulate(want, tg::to_buffer_view(want_sum, "want"));
    EXPECT_TRUE(same_bytes(sum, want_sum)) << "decode_accumulate did not add to the final values";
  }
}

}  // namespace
}  // namespace meshtrain
