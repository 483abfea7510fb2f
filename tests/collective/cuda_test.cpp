// Collectives on buffers on a CUDA device, between real processes (label cuda: they skip with
// the CUDA runtime's reason on a host without a GPU). Members 0 and 2 of each job reduce from
// buffers on CUDA device 0 (encoded and decoded by the codecs' kernels), the others from CPU
// buffers: every member must end each step with the bytes of the all-CPU algorithm.
#include <gtest/gtest.h>

#include <cmath>
#include <thread>

#include "collective/compressed_reference.h"
#include "collective/consistent_step.h"
#include "collective/gradient.h"
#include "collective/job.h"
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
