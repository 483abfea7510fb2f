// R10, the state check: members send a digest of their parameters with their request; the
// coordinator names the members whose digest differs from the majority's in Quorum::divergent.
// In-process against real ControlClients, and with collective_peer processes, one of which
// changes its parameters behind the job's back.
#include <gtest/gtest.h>

#include "collective/job.h"
#include "coord/coord_harness.h"

using namespace meshtrain;
using namespace meshtrain::coord;
using namespace meshtrain::coord::testing;
using namespace std::chrono_literals;

namespace {

class StateDigestTest : public ::testing::Test {
 protected:
  void SetUp() override {
    CoordinatorOptions o;
    o.bind_endpoint = "tcp://127.0.0.1:0";
    o.quorum_timeout = 5s;
    o.startup_grace = 0ms;
    o.control.linger = 0ms;
    std::vector<crypto::Identity> ids;
    for (int i = 0; i < 4; ++i) {
      ids.push_back(crypto::Identity::generate());
      o.allowed.add(ids.back().public_key());
    }
    coordinator_ = std::make_unique<RunningCoordinator>(coordinator_id_, std::move(o));
    for (int i = 0; i < 4; ++i)
      members_.push_back(std::make_unique<TestMember>(std::move(ids[i]), coordinator_id_.public_key(),
                                                      (*coordinator_)->endpoint(), static_cast<uint16_t>(42000 + i)));
    ASSERT_TRUE(eventually([&] { return (*coordinator_)->status().live_peers == 4; }));
  }

  // Every member asks for `step` with its digest (nullopt: none); returns the quorum.
  Quorum ask(uint64_t step, const std::vector<std::optional<crypto::Digest>>& digests, bool joiner_last = false) {
    for (size_t i = 0; i < members_.size(); ++i) {
      QuorumRequest r;
      r.step = step;
      r.host = "127.0.0.1";
      r.port = members_[i]->bulk_port();
      r.has_state = !(joiner_last && i + 1 == members_.size());
      r.state_digest = digests[i];
      members_[i]->send(MessageKind::QuorumRequest, encode(r), 0, step);
    }
    Quorum q;
    for (auto& m : members_) q = m->expect_quorum();
    return q;
  }
  static crypto::Digest digest(uint8_t fill) {
    crypto::Digest d;
    d.fill(fill);
    return d;
  }
  std::vector<PeerId> keys(std::initializer_list<int> indices) {
    std::vector<PeerId> out;
    for (int i : indices) out.push_back(members_[i]->id());
    std::sort(out.begin(), out.end());
    return out;
  }

  crypto::Identity coordinator_id_ = crypto::Identity::generate();
  std::unique_ptr<RunningCoordinator> coordinator_;
  std::vector<std::unique_ptr<TestMember>> members_;
};

}  // namespace

TEST_F(StateDigestTest, EqualDigestsOrNoneAreNotADivergence) {
  EXPECT_TRUE(ask(1, {digest(1), digest(1), digest(1), digest(1)}).divergent.empty());
  EXPECT_TRUE(ask(2, {digest(2), std::nullopt, digest(2), std::nullopt}).divergent.empty());
  EXPECT_TRUE(ask(3, {std::nullopt, std::nullopt, std::nullopt, std::nullopt}).divergent.empty());
  // A joiner has no state yet: its digest is not compared.
  EXPECT_TRUE(ask(4, {digest(4), digest(4), digest(4), digest(9)}, true).divergent.empty());
  EXPECT_EQ((*coordinator_)->status().state_divergences, 0u);
}

TEST_F(StateDigestTest, TheMinorityIsNamedDivergent) {
  // The status is published after the quorum is sent: hence eventually().
  Quorum q = ask(1, {digest(1), digest(7), digest(1), digest(1)});
  EXPECT_EQ(q.divergent, keys({1}));
  // Resync: the diverged member contributes nothing and takes the state of a majority member.
  EXPECT_FALSE(q.member(members_[1]->id()).contributes);
  EXPECT_EQ(q.contributors(), 3u);
  ASSERT_GE(q.state_source_rank, 0);
  EXPECT_NE(q.members[q.state_source_rank].id, members_[1]->id());
  EXPECT_TRUE(q.members[q.state_source_rank].contributes);
  EXPECT_TRUE(eventually([&] { return (*coordinator_)->status().state_divergences == 1u; }));
  q = ask(2, {digest(3), digest(3), digest(5), digest(6)});
  EXPECT_EQ(q.divergent, keys({2, 3}));
  EXPECT_EQ(q.contributors(), 2u);
  ASSERT_GE(q.state_source_rank, 0);
  const PeerId& source = q.members[q.state_source_rank].id;
  EXPECT_TRUE(source == members_[0]->id() || source == members_[1]->id());
  EXPECT_TRUE(eventually([&] { return (*coordinator_)->status().state_divergences == 2u; }));
  // A tie: the group holding the lowest peer id is taken as the job's state.
  q = ask(3, {digest(1), digest(1), digest(2), digest(2)});
  std::vector<PeerId> low = keys({0, 1}), high = keys({2, 3});
  EXPECT_EQ(q.divergent, low.front() < high.front() ? high : low);
}

TEST(StateDigestMessages, DigestAndDivergentRoundTripAndAreChecked) {
  QuorumRequest r;
  r.step = 1;
  r.host = "h";
  r.port = 1;
  r.state_digest = crypto::sha256(crypto::ByteSpan());
  EXPECT_EQ(decode_quorum_request(encode(r), "t").state_digest, r.state_digest);
  r.state_digest.reset();
  EXPECT_FALSE(decode_quorum_request(encode(r), "t").state_digest);

  auto a = crypto::Identity::generate().public_key(), b = crypto::Identity::generate().public_key();
  Quorum q;
  q.quorum_id = 1;
  q.step = 1;
  q.members = {Member{a, "h", 1, 0, true}, Member{b, "h", 2, 1, true}};
  q.divergent = {b};
  EXPECT_EQ(decode_quorum(encode(q), "t").divergent, q.divergent);
  q.divergent = {crypto::Identity::generate().public_key()};
  EXPECT_THROW(decode_quorum(encode(q), "t"), ProtocolError);
}

// Three collective_peer processes check their state every step; peer 2 adds 1 to a parameter
// before step 3. Every member learns at step 3 that peer 2 diverged; peer 2 takes the state of
// a majority member (as a joiner does) and contributes nothing to step 3, so from step 4 on
// the three agree again and end with identical parameters.
TEST(StateDigestJob, ADivergedMemberIsNamedAndResynced) {
  using test_support::Job;
  Job job({.peers = 3, .min_peers = 3});
  job.start_coordinator();
  for (int i = 0; i < 3; ++i) {
    std::vector<std::string> extra = {"--check-state"};
    if (i == 2) extra.insert(extra.end(), {"--perturb-at", "3"});
    job.start_peer(i, 4, 257, extra);
  }
  for (int i = 0; i < 3; ++i) ASSERT_EQ(job.peer(i).wait(60s), 0) << "peer " << i;
  for (int i = 0; i < 3; ++i) {
    std::map<uint64_t, std::vector<std::string>> expected = {{3, {job.key(2)}}};
    EXPECT_EQ(job.log(i).divergent, expected) << "peer " << i;
  }
  std::vector<std::string> contributors = job.log(2).steps.at(3).contributors, majority = {job.key(0), job.key(1)};
  std::sort(contributors.begin(), contributors.end());
  std::sort(majority.begin(), majority.end());
  EXPECT_EQ(contributors, majority);
  for (uint64_t step = 3; step <= 4; ++step)
    EXPECT_EQ(job.log(2).steps.at(step).params, job.log(0).steps.at(step).params) << "step " << step;
}
