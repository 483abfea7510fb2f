// Collectives between real processes on loopback: a meshtrain-coordinator and N
// collective_peer processes, some of them killed (SIGKILL) mid-operation.
#include <gtest/gtest.h>
#include <signal.h>

#include <cmath>

#include "collective/consistent_step.h"
#include "collective/gradient.h"
#include "collective/job.h"

using namespace meshtrain;
using namespace meshtrain::test_support;
using namespace std::chrono_literals;

namespace {

struct SizeCase {
  int peers;
  size_t count;
};

class CollectiveAllreduce : public ::testing::TestWithParam<SizeCase> {};

}  // namespace

TEST_P(CollectiveAllreduce, MatchesFloat64ReferenceAndIsIdenticalOnAllPeers) {
  const SizeCase c = GetParam();
  Job job({.peers = c.peers, .min_peers = c.peers});
  job.start_coordinator();
  for (int i = 0; i < c.peers; ++i) job.start_peer(i, 2, c.count);
  for (int i = 0; i < c.peers; ++i) ASSERT_EQ(job.peer(i).wait(60s), 0) << "peer " << i;
  std::vector<int> all;
  for (int i = 0; i < c.peers; ++i) all.push_back(i);
  for (uint64_t step : {1, 2}) expect_consistent_step(job, all, step, c.count, c.peers);
  for (int i = 1; i < c.peers; ++i) EXPECT_EQ(job.log(i).steps.at(2).params, job.log(0).steps.at(2).params);
}

INSTANTIATE_TEST_SUITE_P(PeersAndSizes, CollectiveAllreduce,
                         ::testing::Values(SizeCase{2, 1}, SizeCase{2, 100003}, SizeCase{3, 0}, SizeCase{3, 2},
                                           SizeCase{3, 65537}, SizeCase{4, 7}, SizeCase{4, 262147},
                                           SizeCase{8, 4099}),
                         [](const auto& info) {
                           return std::to_string(info.param.peers) + "peers_" + std::to_string(info.param.count);
                         });

namespace {

void kill_mid_phase(const std::string& phase) {
  const size_t count = 100003;
  Job job({.peers = 4, .min_peers = 2, .quorum_timeout_ms = 5000, .heartbeat_timeout_ms = 2000});
  job.start_coordinator();
  for (int i = 0; i < 4; ++i) {
    std::vector<std::string> extra;
    if (i == 2) extra = {"--die-at", "2", "--die-phase", phase, "--die-ring-step", "1"};
    job.start_peer(i, 4, count, extra);
  }
  EXPECT_EQ(job.peer(2).wait(60s), 128 + SIGKILL);
  for (int i : {0, 1, 3}) ASSERT_EQ(job.peer(i).wait(60s), 0) << "survivor " << i;
  std::vector<int> survivors = {0, 1, 3};
  expect_consistent_step(job, survivors, 1, count, 4);
  expect_consistent_step(job, survivors, 2, count, 3);  // retried without the dead peer
  EXPECT_GE(job.log(0).steps.at(2).attempts, 2u);
  for (uint64_t step : {3, 4}) expect_consistent_step(job, survivors, step, count, 3);
  for (int i : {1, 3}) EXPECT_EQ(job.log(i).steps.at(4).params, job.log(0).steps.at(4).params);
}

}  // namespace

TEST(CollectiveFaults, PeerKilledDuringReduceScatter) { kill_mid_phase("reduce_scatter"); }
TEST(CollectiveFaults, PeerKilledDuringAllGather) { kill_mid_phase("all_gather"); }

TEST(CollectiveFaults, StragglerIsLeftOutAndRejoins) {
  const size_t count = 5000;
  Job job({.peers = 3, .min_peers = 2, .quorum_timeout_ms = 1000, .heartbeat_timeout_ms = 5000});
  job.start_coordinator();
  for (int i = 0; i < 3; ++i) {
    std::vector<std::string> extra;
    if (i == 2) extra = {"--sleep-at", "3", "--sleep-ms", "2500"};
    job.start_peer(i, 6, count, extra);
  }
  for (int i = 0; i < 3; ++i) ASSERT_EQ(job.peer(i).wait(60s), 0) << "peer " << i;
  PeerLog straggler = job.log(2);
  ASSERT_TRUE(straggler.missed.count(3)) << "the straggler was not told it missed step 3";
  expect_consistent_step(job, {0, 1}, 3, count, 2);
  // Step 3 forms at the later of the startup grace's end and the quorum timeout, so on a slow
  // start step 4 can form before the straggler wakes up: then it misses 4 too. It comes back
  // at the step after the last one it missed.
  uint64_t back = straggler.missed.rbegin()->second;
  ASSERT_LE(back, 6u);
  // It returns as a joiner (receives the parameters, contributes nothing), then takes part.
  expect_consistent_step(job, {0, 1, 2}, back, count, 2);
  EXPECT_EQ(straggler.steps.at(back).params, job.log(0).steps.at(back).params);
  for (uint64_t step = back + 1; step <= 6; ++step) expect_consistent_step(job, {0, 1, 2}, step, count, 3);
}

TEST(CollectiveMembership, JoinerTakesStateAndThenContributes) {
  const size_t count = 3001;
  Job job({.peers = 4, .min_peers = 3, .quorum_timeout_ms = 3000});
  job.start_coordinator();
  for (int i = 0; i < 3; ++i) job.start_peer(i, 8, count, {"--step-delay-ms", "300"});
  // Start the fourth member once the others are past step 1; it asks to join at step 5, which
  // the others reach ~1.2 s later (4 steps of 300 ms): time for it to start and connect.
  for (int tries = 0; tries < 300 && !job.log(0).steps.count(1); ++tries) std::this_thread::sleep_for(20ms);
  ASSERT_TRUE(job.log(0).steps.count(1));
  job.start_peer(3, 4, count, {"--join", "--start-step", "5", "--step-delay-ms", "300"});
  for (int i = 0; i < 4; ++i) ASSERT_EQ(job.peer(i).wait(60s), 0) << "peer " << i;
  PeerLog joiner = job.log(3);
  ASSERT_TRUE(joiner.steps.count(5));
  expect_consistent_step(job, {0, 1, 2, 3}, 5, count, 3);  // receives state, contributes nothing
  EXPECT_EQ(joiner.steps.at(5).params, job.log(0).steps.at(5).params);
  for (uint64_t step = 6; step <= 8; ++step) expect_consistent_step(job, {0, 1, 2, 3}, step, count, 4);
  EXPECT_EQ(joiner.steps.at(8).params, job.log(0).steps.at(8).params);
}

TEST(CollectiveMembership, CoordinatorRestartDoesNotStopTheJob) {
  const size_t count = 2000;
  Job job({.peers = 3, .min_peers = 3, .quorum_timeout_ms = 3000, .startup_grace_ms = 1000});
  job.start_coordinator();
  for (int i = 0; i < 3; ++i) job.start_peer(i, 10, count, {"--step-delay-ms", "150"});
  for (int tries = 0; tries < 300 && !job.log(0).steps.count(3); ++tries) std::this_thread::sleep_for(20ms);
  job.kill_coordinator();
  std::this_thread::sleep_for(700ms);
  job.start_coordinator();
  for (int i = 0; i < 3; ++i) ASSERT_EQ(job.peer(i).wait(90s), 0) << "peer " << i;
  for (uint64_t step = 1; step <= 10; ++step) expect_consistent_step(job, {0, 1, 2}, step, count, 3);
}
