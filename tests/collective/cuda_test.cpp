// Collectives on buffers on a CUDA device, between real processes (label cuda: they skip with
// the CUDA runtime's reason on a host without a GPU). Members 0 and 2 of each job reduce from
// buffers on CUDA device 0 (encoded and decoded by the codecs' kernels), the others from CPU
// buffers: every member must end each step with the bytes of the all-CPU algorithm.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <optional>
#include <thread>

#include "collective/compressed_reference.h"
#include "collective/consistent_step.h"
#include "collective/gradient.h"
#include "collective/half.h"
#include "collective/in_process_job.h"
#include "collective/job.h"
#include "collective/reused_bytes.h"
#include "kernels/compress/api.h"
#include "meshtrain/compress.h"
#include "support/cuda_skip.h"

using namespace meshtrain;
using namespace meshtrain::test_support;
using namespace std::chrono_literals;

namespace {

std::vector<std::string> with_device(int peer, std::vector<std::string> flags) {
  if (peer % 2 == 0) flags.insert(flags.end(), {"--device", "cuda"});
  return flags;
}

class CudaCompressedAllreduce : public ::testing::TestWithParam<CodecCase> {};

}  // namespace

// 4 processes (2 on CUDA), 3 steps: the reference algorithm's bytes on every member, and each
// member's residual after step 3 is the reference's (error feedback kept on the device is fed
// exactly once a step, like the CPU's). compressed_reference.h has the checks.
TEST_P(CudaCompressedAllreduce, MixedCpuAndCudaMembersGetTheReferenceBytes) {
  SKIP_WITHOUT_GPU();
  expect_reference_bytes(GetParam(), [](int peer) { return with_device(peer, {}); });
}

INSTANTIATE_TEST_SUITE_P(Codecs, CudaCompressedAllreduce,
                         ::testing::Values(CodecCase{"none", "auto", "none"}, CodecCase{"fp16", "auto", "fp16"},
                                           CodecCase{"bf16", "auto", "bf16"}, CodecCase{"int8", "auto", "int8"},
                                           CodecCase{"int8:block_size=64,rounding=stochastic,seed=3", "auto",
                                                     "int8_stochastic"},
                                           CodecCase{"int8", "auto", "int8_ring", "ring"},
                                           CodecCase{"topk:fraction=0.05", "owner", "topk_owner"},
                                           CodecCase{"topk:fraction=0.05", "allgather", "topk_allgather"}),
                         [](const auto& info) { return info.param.name; });

// The same on a non-blocking stream of the members' own (CommunicatorOptions::cuda_stream).
TEST(CudaCompressedAllreduceOnAStream, Int8MembersOnTheirOwnStreamsGetTheReferenceBytes) {
  SKIP_WITHOUT_GPU();
  expect_reference_bytes(CodecCase{"int8", "auto", "int8"}, [](int peer) {
    std::vector<std::string> flags = with_device(peer, {});
    if (!flags.empty()) flags.push_back("--cuda-stream");
    return flags;
  });
}

// The plain all-reduce stages CUDA buffers through the host: the same bytes on every member,
// close to the exact average.
TEST(CudaAllreduce, MixedCpuAndCudaMembersGetIdenticalAverages) {
  SKIP_WITHOUT_GPU();
  const size_t count = 100003;
  Job job({.peers = 3, .min_peers = 3});
  job.start_coordinator();
  for (int i = 0; i < 3; ++i) job.start_peer(i, 2, count, with_device(i, {}));
  for (int i = 0; i < 3; ++i) ASSERT_EQ(job.peer(i).wait(60s), 0) << "peer " << i;
  for (uint64_t step = 1; step <= 2; ++step) expect_consistent_step(job, {0, 1, 2}, step, count, 3);
}

// PowerSGD stages CUDA buffers through the host: the same bytes on every member.
TEST(CudaAllreduce, PowerSgdWithCudaMembersIsIdenticalOnAllMembers) {
  SKIP_WITHOUT_GPU();
  Job job({.peers = 4, .min_peers = 4});
  job.start_coordinator();
  for (int i = 0; i < 4; ++i)
    job.start_peer(i, 3, 10000, with_device(i, {"--codec", "powersgd:rank=4,seed=9", "--shape", "100x100"}));
  for (int i = 0; i < 4; ++i) ASSERT_EQ(job.peer(i).wait(60s), 0) << "peer " << i;
  for (uint64_t step = 1; step <= 3; ++step) EXPECT_EQ(ranks_of_step(job, {0, 1, 2, 3}, step).size(), 4u);
}

// A member killed mid-step: CUDA survivors discard their staged device residuals, repartition
// (4 -> 3 members: the old residual is summed into the gradient on the host and copied to the
// device) and the retried step is exactly a fresh run from their entry states.
TEST(CudaCompressedFaults, PeerKilledWhileSendingToOwnersCudaSurvivorsRetryFromTheirEntryState) {
  SKIP_WITHOUT_GPU();
  kill_mid_compressed("reduce_scatter", 1, "direct", {0, 1});
}

// A CUDA member joins at step 5 (int8): it takes the state, adds encoded zeros from a zeroed
// device buffer with scratch device states in its joining step, and contributes from the next.
// Every step ends with the same bytes on all its members.
TEST(CudaCompressedMembership, ACudaJoinerAddsZerosThenContributes) {
  SKIP_WITHOUT_GPU();
  const size_t count = 6007;
  Job job({.peers = 4, .min_peers = 3, .quorum_timeout_ms = 3000, .capture_output = true});
  job.start_coordinator();
  const std::vector<std::string> flags = {"--codec", "int8", "--step-delay-ms", "300"};
  for (int i = 0; i < 3; ++i) job.start_peer(i, 8, count, with_device(i, flags));
  // Started once the others are past step 1: time to connect and make its CUDA context before
  // they ask for step 5 (if it is later, it joins at a later step: see below).
  for (int tries = 0; tries < 500 && !job.log(0).steps.count(1); ++tries) std::this_thread::sleep_for(20ms);
  ASSERT_TRUE(job.log(0).steps.count(1));
  std::vector<std::string> joiner = {"--codec", "int8", "--step-delay-ms", "300", "--join", "--start-step", "5",
                                     "--device", "cuda"};
  job.start_peer(3, 4, count, joiner);
  for (int i = 0; i < 4; ++i) ASSERT_EQ(job.peer(i).wait(60s), 0) << "peer " << i;
  // Its first step is 5, or a later one if making its CUDA context outlasted step 5's quorum.
  const std::map<uint64_t, StepRecord> joined = job.log(3).steps;
  ASSERT_FALSE(joined.empty()) << "the joiner took part in no step";
  const uint64_t first = joined.begin()->first;
  ASSERT_LT(first, 8u) << "the joiner joined too late to contribute";
  EXPECT_EQ(ranks_of_step(job, {0, 1, 2, 3}, first).size(), 3u);  // the joiner contributes nothing yet
  for (uint64_t step = first + 1; step <= 8; ++step) EXPECT_EQ(ranks_of_step(job, {0, 1, 2, 3}, step).size(), 4u);
}

namespace {

// A member's buffer: on CUDA device 0, or in host memory.
class Placed {
 public:
  Placed(bool on_cuda, size_t count, DType dtype = DType::Float32)
      : host_(count * dtype_size(dtype)), view_{host_.data(), count, dtype} {
    if (!on_cuda) return;
    device_.emplace(host_.size(), 0);
    view_.data = device_->data();
    view_.device = DeviceKind::Cuda;
  }
  const BufferView& view() const { return view_; }
  template <typename T>
  void put(const std::vector<T>& values) {
    ASSERT_EQ(values.size() * sizeof(T), host_.size());
    std::memcpy(host_.data(), values.data(), host_.size());
    if (device_) copy(device_->data(), host_.data());
  }
  template <typename T>
  std::vector<T> get() {
    if (device_) copy(host_.data(), device_->data());
    std::vector<T> values(host_.size() / sizeof(T));
    std::memcpy(values.data(), host_.data(), host_.size());
    return values;
  }

 private:
  void copy(void* dst, const void* src) {
    cuda::compress::copy_async(dst, src, host_.size(), 0, nullptr);
    cuda::compress::synchronize(0, nullptr);
  }
  std::vector<uint8_t> host_;
  std::optional<cuda::compress::DeviceBuffer> device_;
  BufferView view_;
};

bool on_cuda(int member) { return member != 1; }  // members 0 and 2 of 3

// MESHTRAIN_SIM_REFUSE_PINNED=1 for a scope: the simulated device then refuses pinned memory.
class RefusePinned {
 public:
  RefusePinned() { ::setenv("MESHTRAIN_SIM_REFUSE_PINNED", "1", 1); }
  ~RefusePinned() { ::unsetenv("MESHTRAIN_SIM_REFUSE_PINNED"); }
};

}  // namespace

// The plain collectives stage CUDA buffers through pinned host memory kept between operations:
// two rounds (the second larger, so the kept memory grows) of every operation, members 0 and 2
// on CUDA, member 1 on the CPU; member 2's reduce_scatter output is on the CPU.
TEST(CudaCollectives, EveryOperationOnCudaBuffersTwiceOverKeptStaging) {
  SKIP_WITHOUT_GPU();
  InProcessJob job(3);
  uint64_t step = 1;
  for (size_t count : {size_t{3001}, size_t{5003}}) {
    // broadcast from every rank (ranks are known once the step's quorum is taken)
    for (uint32_t root = 0; root < 3; ++root) {
      std::vector<Placed> data;
      for (int i = 0; i < 3; ++i) {
        data.emplace_back(on_cuda(i), count);
        data[i].put(test_support::gradient(10 + i, count, count));
      }
      job.each(step++, [&](int i) { job.comm(i).broadcast(data[i].view(), root); });
      int root_member = 0;
      while (job.comm(root_member).rank() != root) ++root_member;
      const auto expected = test_support::gradient(10 + root_member, count, count);
      for (int i = 0; i < 3; ++i) EXPECT_EQ(data[i].get<float>(), expected) << "member " << i << ", " << count;
    }
    // allgather
    std::vector<Placed> in, out;
    for (int i = 0; i < 3; ++i) {
      in.emplace_back(on_cuda(i), count);
      in[i].put(test_support::gradient(20 + i, count, count));
      out.emplace_back(on_cuda(i), 3 * count);
    }
    job.each(step++, [&](int i) { job.comm(i).allgather(in[i].view(), out[i].view()); });
    const auto gathered = out[1].get<float>();
    for (int i = 0; i < 3; ++i) {
      EXPECT_EQ(out[i].get<float>(), gathered) << "member " << i;
      const auto mine = test_support::gradient(20 + i, count, count);
      EXPECT_TRUE(std::equal(mine.begin(), mine.end(), gathered.begin() + job.comm(i).rank() * count)) << i;
    }
    // reduce_scatter (Avg)
    std::vector<Placed> full, part;
    for (int i = 0; i < 3; ++i) {
      full.emplace_back(on_cuda(i), 3 * count);
      full[i].put(test_support::gradient(30 + i, count, 3 * count));
      part.emplace_back(i == 0, count);
    }
    job.each(step++, [&](int i) { job.comm(i).reduce_scatter(full[i].view(), part[i].view(), collective::ReduceOp::Avg); });
    std::vector<std::vector<float>> inputs;
    for (int j = 0; j < 3; ++j) inputs.push_back(test_support::gradient(30 + j, count, 3 * count));
    for (int i = 0; i < 3; ++i) {
      const uint32_t r = job.comm(i).rank();
      const auto got = part[i].get<float>();
      for (size_t k = 0; k < count; ++k) {
        double sum = 0;
        for (int j = 0; j < 3; ++j) sum += inputs[j][r * count + k];
        ASSERT_NEAR(got[k], sum / 3, 1e-6) << "member " << i << " element " << k;
      }
    }
    // allreduce of fp16 buffers (widened to fp32 on the host)
    std::vector<Placed> halves;
    std::vector<std::vector<uint16_t>> sent(3, std::vector<uint16_t>(count));
    for (int i = 0; i < 3; ++i) {
      halves.emplace_back(on_cuda(i), count, DType::Float16);
      const auto g = test_support::gradient(40 + i, count, count);
      for (size_t k = 0; k < count; ++k) sent[i][k] = collective::float_to_half(g[k]);
      halves[i].put(sent[i]);
    }
    job.each(step++, [&](int i) { job.comm(i).allreduce(halves[i].view(), collective::ReduceOp::Sum); });
    const auto reduced = halves[1].get<uint16_t>();
    for (int i = 0; i < 3; ++i) EXPECT_EQ(halves[i].get<uint16_t>(), reduced) << "member " << i;
    for (size_t k = 0; k < count; k += 97) {
      double sum = 0;
      for (int j = 0; j < 3; ++j) sum += collective::half_to_float(sent[j][k]);
      ASSERT_NEAR(collective::half_to_float(reduced[k]), sum, 2e-3 * std::max(1.0, std::abs(sum))) << k;
    }
  }
}

// Pinned host memory is kept and reused, also for takes of pageable memory, and grows by at
// least half; pageable memory asked to be pinned is reallocated.
TEST(CudaReusedBytes, PinnedBytesAreKeptServePageableTakesAndGrowByHalf) {
  SKIP_WITHOUT_GPU();
  using collective::HostMemory;
  collective::ReusedBytes bytes;
  auto first = bytes.take(1000, HostMemory::Pinned);
  EXPECT_EQ(bytes.memory(), HostMemory::Pinned);
  for (size_t i = 0; i < first.size(); ++i) first[i] = static_cast<uint8_t>(i * 7);
  // A device round trip through it.
  cuda::compress::DeviceBuffer device(1000, 0);
  cuda::compress::copy_async(device.data(), first.data(), 1000, 0, nullptr);
  cuda::compress::synchronize(0, nullptr);
  auto again = bytes.take(600, HostMemory::Pinned);
  EXPECT_EQ(again.data(), first.data());
  std::fill(again.begin(), again.end(), uint8_t{0});
  cuda::compress::copy_async(again.data(), device.data(), 600, 0, nullptr);
  cuda::compress::synchronize(0, nullptr);
  for (size_t i = 0; i < again.size(); ++i) ASSERT_EQ(again[i], static_cast<uint8_t>(i * 7)) << i;
  EXPECT_EQ(bytes.take(900, HostMemory::Pageable).data(), first.data());
  EXPECT_EQ(bytes.memory(), HostMemory::Pinned);
  auto grown = bytes.take(1001, HostMemory::Pageable);  // grows, pinned still, to 1500
  EXPECT_EQ(bytes.memory(), HostMemory::Pinned);
  EXPECT_EQ(bytes.take(1500, HostMemory::Pinned).data(), grown.data());

  collective::ReusedBytes pageable;
  pageable.take(1000, HostMemory::Pageable);
  EXPECT_EQ(pageable.memory(), HostMemory::Pageable);
  pageable.take(10, HostMemory::Pinned);
  EXPECT_EQ(pageable.memory(), HostMemory::Pinned);
}

// Where pinned memory is refused, the bytes are pageable, and takes of no more bytes do not ask
// again (the simulated device can be told to refuse; a GPU is not).
TEST(CudaReusedBytes, RefusedPinnedMemoryIsPageableAndNotAskedForAgain) {
  SKIP_WITHOUT_GPU();
  if (!cuda::simulated()) GTEST_SKIP() << "only the simulated device can be made to refuse pinned memory";
  using collective::HostMemory;
  collective::ReusedBytes bytes;
  std::span<uint8_t> refused;
  {
    RefusePinned refuse;
    refused = bytes.take(1000, HostMemory::Pinned);
    EXPECT_EQ(bytes.memory(), HostMemory::Pageable);
  }
  EXPECT_EQ(bytes.take(800, HostMemory::Pinned).data(), refused.data());
  EXPECT_EQ(bytes.take(1000, HostMemory::Pageable).data(), refused.data());
  EXPECT_EQ(bytes.memory(), HostMemory::Pageable);
  bytes.take(1001, HostMemory::Pinned);  // more: asked again, and granted
  EXPECT_EQ(bytes.memory(), HostMemory::Pinned);
}

// A whole operation with pinned memory refused: staged through pageable memory, same bytes.
TEST(CudaCollectives, RefusedPinnedMemoryStagesThroughPageableMemory) {
  SKIP_WITHOUT_GPU();
  if (!cuda::simulated()) GTEST_SKIP() << "only the simulated device can be made to refuse pinned memory";
  RefusePinned refuse;
  const size_t count = 4001;
  InProcessJob job(3);
  std::vector<Placed> data;
  for (int i = 0; i < 3; ++i) {
    data.emplace_back(on_cuda(i), count);
    data[i].put(test_support::gradient(50 + i, 1, count));
  }
  job.each(1, [&](int i) { job.comm(i).allreduce(data[i].view(), collective::ReduceOp::Avg); });
  const auto reduced = data[1].get<float>();
  for (int i = 0; i < 3; ++i) EXPECT_EQ(data[i].get<float>(), reduced) << "member " << i;
  for (size_t k = 0; k < count; k += 101) {
    double sum = 0;
    for (int j = 0; j < 3; ++j) sum += test_support::gradient(50 + j, 1, count)[k];
    ASSERT_NEAR(reduced[k], sum / 3, 1e-6) << k;
  }
}
