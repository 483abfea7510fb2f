// The check every plain all-reduce test makes of a finished step (collective_test.cpp,
// cuda_test.cpp).
#pragma once

#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "collective/gradient.h"
#include "collective/job.h"

namespace meshtrain::test_support {

// Every peer's record of `step` agrees (quorum, contributors, result bytes, parameters), and the
// result equals the float64 average of the contributors' gradients within fp32 rounding.
inline void expect_consistent_step(const Job& job, const std::vector<int>& peers, uint64_t step,
                                   size_t count, size_t expected_contributors) {
  SCOPED_TRACE("step " + std::to_string(step));
  std::vector<PeerLog> logs;
  for (int p : peers) logs.push_back(job.log(p));
  const StepRecord& first = logs[0].steps.at(step);
  EXPECT_EQ(first.contributors.size(), expected_contributors);
  for (size_t i = 1; i < logs.size(); ++i) {
    ASSERT_TRUE(logs[i].steps.count(step)) << "peer " << peers[i] << " has no step " << step;
    const StepRecord& r = logs[i].steps.at(step);
    EXPECT_EQ(r.quorum_id, first.quorum_id);
    EXPECT_EQ(r.contributors, first.contributors);
    EXPECT_EQ(r.result, first.result) << "results differ between peers " << peers[0] << " and " << peers[i];
  }
  std::vector<double> reference(count, 0.0);
  for (const auto& key : first.contributors) {
    int index = job.index_of(key);
    ASSERT_GE(index, 0);
    std::vector<float> g = gradient(Job::seed(index), step, count);
    for (size_t i = 0; i < count; ++i) reference[i] += g[i];
  }
  std::vector<float> got = job.result(peers[0], step);
  ASSERT_EQ(got.size(), count);
  const double n = static_cast<double>(first.contributors.size());
  for (size_t i = 0; i < count; ++i) {
    double expected = reference[i] / n;
    ASSERT_NEAR(got[i], expected, 1e-6 + 4e-7 * n) << "element " << i;
  }
}

}  // namespace meshtrain::test_support
