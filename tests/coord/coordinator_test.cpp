// The coordinator in-process, driven by real ControlClients over loopback CurveZMQ.
#include <gtest/gtest.h>

#include <algorithm>
#include <memory>
#include <thread>

#include "coord/coord_harness.h"

using namespace meshtrain;
using namespace meshtrain::coord;
using namespace meshtrain::coord::testing;
using namespace std::chrono_literals;

namespace {

class CoordinatorTest : public ::testing::Test {
 protected:
  CoordinatorOptions options() {
    CoordinatorOptions o;
    o.bind_endpoint = "tcp://127.0.0.1:0";
    o.min_peers = 1;
    o.quorum_timeout = 400ms;
    o.heartbeat_timeout = 1000ms;
    o.startup_grace = 0ms;
    o.control.linger = 0ms;
    for (const auto& id : identities_) o.allowed.add(id.public_key());
    return o;
  }

  // `allowed` identities on the allow-list; the coordinator started; nobody connected yet.
  void start(size_t allowed, CoordinatorOptions o) {
    for (size_t i = identities_.size(); i < allowed; ++i) identities_.push_back(crypto::Identity::generate());
    for (const auto& id : identities_) o.allowed.add(id.public_key());
    coordinator_ = std::make_unique<RunningCoordinator>(coordinator_id_, std::move(o));
    endpoint_ = (*coordinator_)->endpoint();
    slots_.resize(identities_.size());
  }
  void start(size_t allowed) {
    for (size_t i = identities_.size(); i < allowed; ++i) identities_.push_back(crypto::Identity::generate());
    start(allowed, options());
  }

  // Connects allowed identity `i` as a member (heartbeating from now on).
  TestMember& connect(size_t i) {
    if (slots_.size() < identities_.size()) slots_.resize(identities_.size());
    // An Identity is move-only: each one is handed to its TestMember once.
    EXPECT_FALSE(slots_[i]) << "identity " << i << " connected twice";
    slots_[i] = std::make_unique<TestMember>(std::move(identities_[i]), coordinator_id_.public_key(), endpoint_,
                                             static_cast<uint16_t>(41000 + i));
    return *slots_[i];
  }
  TestMember& member(size_t i) { return *slots_[i]; }
  void disconnect(size_t i) { slots_[i].reset(); }

  // Connects members [0, n) and waits until the coordinator has heard from all of them.
  void connect_all(size_t n) {
    for (size_t i = 0; i < n; ++i) connect(i);
    wait_live(n);
  }
  void wait_live(size_t n) {
    ASSERT_TRUE(eventually([&] { return (*coordinator_)->status().live_peers == n; }))
        << "the coordinator sees " << (*coordinator_)->status().live_peers << " of " << n << " members";
  }
  CoordinatorStatus status() { return (*coordinator_)->status(); }
  void member_dies_mid_attempt(bool repeat_then_others_done);

  void restart(CoordinatorOptions o) {
    coordinator_.reset();
    for (const auto& m : slots_)
      if (m) o.allowed.add(m->id());
    o.bind_endpoint = endpoint_;
    coordinator_ = std::make_unique<RunningCoordinator>(coordinator_id_, std::move(o));
    EXPECT_EQ((*coordinator_)->endpoint(), endpoint_);
  }

  crypto::Identity coordinator_id_ = crypto::Identity::generate();
  std::vector<crypto::Identity> identities_;
  std::unique_ptr<RunningCoordinator> coordinator_;
  std::string endpoint_;
  std::vector<std::unique_ptr<TestMember>> slots_;
};

// The members of `q` in rank order are its peers sorted by key bytes, ranks 0..n-1.
void expect_rank_order(const Quorum& q) {
  for (size_t i = 0; i < q.members.size(); ++i) {
    EXPECT_EQ(q.members[i].rank, i);
    if (i > 0) {
      EXPECT_TRUE(q.members[i - 1].id < q.members[i].id) << "rank " << i << " is not sorted by peer id";
    }
  }
}

std::vector<PeerId> ids_of(const Quorum& q) {
  std::vector<PeerId> out;
  for (const auto& m : q.members) out.push_back(m.id);
  return out;
}

}  // namespace

TEST(CoordinatorStatusFormat, JsonAndText) {
  CoordinatorStatus s;
  EXPECT_EQ(s.to_text(), "members 0 · no quorum yet · formed 0 · aborted 0 · dropped 0");
  s.members = 3;
  s.live_peers = 3;
  s.last_step = 5;
  s.last_quorum_id = 0x1a2b;
  s.last_quorum_size = 3;
  s.quorums_formed = 6;
  s.attempts_aborted = 1;
  EXPECT_EQ(s.to_json(),
            "{\"members\":3,\"live_peers\":3,\"last_step\":5,\"last_quorum_id\":\"0000000000001a2b\","
            "\"last_quorum_size\":3,\"quorums_formed\":6,\"attempts_aborted\":1,\"members_dropped\":0,"
            "\"joins_admitted\":0,\"refused\":0,\"state_divergences\":0}");
  EXPECT_EQ(s.to_text(),
            "members 3 · step 5 · quorum 3 peers (id 0000000000001a2b) · formed 6 · aborted 1 · dropped 0");
}

TEST_F(CoordinatorTest, ThreeMembersGetTheSameQuorumRankedByPeerId) {
  auto o = options();
  o.quorum_timeout = 20s;  // only "everyone asked" can form it in time
  start(3, o);
  connect_all(3);
  auto t0 = Clock::now();
  for (size_t i = 0; i < 3; ++i) member(i).request(1);
  std::vector<Quorum> got;
  for (size_t i = 0; i < 3; ++i) got.push_back(member(i).expect_quorum());
  EXPECT_LT(Clock::now() - t0, 5s);
  ASSERT_EQ(got[0].members.size(), 3u);
  EXPECT_NE(got[0].quorum_id, 0u);
  EXPECT_EQ(got[0].step, 1u);
  EXPECT_EQ(got[0].state_source_rank, -1);
  EXPECT_EQ(got[0].contributors(), 3u);
  expect_rank_order(got[0]);
  for (size_t i = 0; i < 3; ++i) {
    EXPECT_EQ(got[i].quorum_id, got[0].quorum_id);
    EXPECT_EQ(ids_of(got[i]), ids_of(got[0]));
    const Member& me = got[i].member(member(i).id());
    EXPECT_EQ(me.host, "127.0.0.1");
    EXPECT_EQ(me.port, member(i).bulk_port());
    EXPECT_TRUE(me.contributes);
  }
  ASSERT_TRUE(eventually([&] { return status().quorums_formed == 1; }));
  auto st = status();
  EXPECT_EQ(st.members, 3u);
  EXPECT_EQ(st.last_step, 1u);
  EXPECT_EQ(st.last_quorum_id, got[0].quorum_id);
  EXPECT_EQ(st.last_quorum_size, 3u);

  // The next step gets a new id.
  for (size_t i = 0; i < 3; ++i) member(i).request(2);
  for (size_t i = 0; i < 3; ++i) {
    Quorum q = member(i).expect_quorum();
    EXPECT_EQ(q.step, 2u);
    EXPECT_NE(q.quorum_id, got[0].quorum_id);
  }
}

TEST_F(CoordinatorTest, MinPeersHoldsTheQuorumUntilEnoughAsk) {
  auto o = options();
  o.min_peers = 3;
  o.quorum_timeout = 300ms;
  start(3, o);
  connect_all(2);
  member(0).request(1);
  member(1).request(1);
  // Everyone live asked and the timeout passed, but 2 < min_peers.
  member(0).expect_nothing(900ms);
  member(1).expect_nothing(0ms);
  EXPECT_EQ(status().quorums_formed, 0u);
  connect(2);
  wait_live(3);
  member(2).request(1);
  for (size_t i = 0; i < 3; ++i) EXPECT_EQ(member(i).expect_quorum().members.size(), 3u);
}

TEST_F(CoordinatorTest, StragglerIsLeftOutAndToldToRejoin) {
  auto o = options();
  o.quorum_timeout = 400ms;
  start(3, o);
  connect_all(3);
  auto t0 = Clock::now();
  member(0).request(1);
  member(1).request(1);
  Quorum q0 = member(0).expect_quorum();
  Quorum q1 = member(1).expect_quorum();
  EXPECT_GE(Clock::now() - t0, 350ms) << "formed before the quorum timeout while a live member had not asked";
  EXPECT_EQ(q0.quorum_id, q1.quorum_id);
  EXPECT_EQ(q0.members.size(), 2u);
  EXPECT_FALSE(q0.contains(member(2).id()));

  // The straggler's late request.
  member(2).request(1);
  Rejoin r = member(2).expect_rejoin();
  EXPECT_EQ(r.missed_step, 1u);
  EXPECT_EQ(r.next_step, 2u);
  EXPECT_FALSE(r.reason.empty());

  // It comes back without state for step 2: a joiner.
  member(2).request(2, /*has_state=*/false);
  member(0).request(2);
  member(1).request(2);
  Quorum q = member(0).expect_quorum();
  member(1).expect_quorum();
  EXPECT_EQ(member(2).expect_quorum().quorum_id, q.quorum_id);
  ASSERT_EQ(q.members.size(), 3u);
  EXPECT_FALSE(q.member(member(2).id()).contributes);
  EXPECT_EQ(q.contributors(), 2u);
  int32_t expected_source = -1;
  for (const auto& m : q.members)
    if (m.contributes) {
      expected_source = static_cast<int32_t>(m.rank);
      break;
    }
  EXPECT_EQ(q.state_source_rank, expected_source);
}

TEST_F(CoordinatorTest, FreshJobWithoutStateEveryoneContributes) {
  start(2);
  connect_all(2);
  member(0).request(0, false);
  member(1).request(0, false);
  Quorum q = member(0).expect_quorum();
  member(1).expect_quorum();
  EXPECT_EQ(q.contributors(), 2u);
  EXPECT_EQ(q.state_source_rank, -1);
}

TEST_F(CoordinatorTest, JoinerBehindTheJobIsToldTheNextStep) {
  start(3);
  connect_all(2);
  for (uint64_t step = 1; step <= 3; ++step) {
    member(0).request(step);
    member(1).request(step);
    member(0).expect_quorum();
    member(1).expect_quorum();
  }
  // A new member does not know the step: it asks for 0 and learns the job is at 3.
  connect(2);
  wait_live(3);
  member(2).request(0, false);
  Rejoin r = member(2).expect_rejoin();
  EXPECT_EQ(r.missed_step, 0u);
  EXPECT_EQ(r.next_step, 4u);
  member(2).request(4, false);
  member(0).request(4);
  member(1).request(4);
  Quorum q = member(2).expect_quorum();
  member(0).expect_quorum();
  member(1).expect_quorum();
  EXPECT_EQ(q.members.size(), 3u);
  EXPECT_FALSE(q.member(member(2).id()).contributes);
  EXPECT_TRUE(q.member(member(0).id()).contributes);
  EXPECT_GE(q.state_source_rank, 0);
  EXPECT_TRUE(q.members[q.state_source_rank].contributes);
}

TEST_F(CoordinatorTest, FailureReportAbortsTheAttemptAndTheRetryGetsANewId) {
  auto o = options();
  o.quorum_timeout = 20s;
  start(3, o);
  connect_all(3);
  for (size_t i = 0; i < 3; ++i) member(i).request(7);
  Quorum q;
  for (size_t i = 0; i < 3; ++i) q = member(i).expect_quorum();

  // Member 0 reports that the attempt failed because member 2 was lost.
  member(0).request(7, true, q.quorum_id, {member(2).id()});
  for (size_t i : {1, 2}) {
    Abort a = member(i).expect_abort();
    EXPECT_EQ(a.quorum_id, q.quorum_id);
    EXPECT_EQ(a.step, 7u);
    ASSERT_EQ(a.lost.size(), 1u);
    EXPECT_EQ(a.lost[0], member(2).id());
    EXPECT_FALSE(a.reason.empty());
  }
  member(0).expect_nothing(200ms);  // the reporter gets no Abort of its own report
  ASSERT_TRUE(eventually([&] { return status().attempts_aborted == 1; }));

  // The others ask again (as real members do, naming the failed attempt): the retry forms
  // with everyone who asked, under a new id. Member 2 asks first: once member 1 has asked,
  // the retry no longer waits for member 2, which was reported lost.
  member(2).request(7, true, q.quorum_id, {});
  std::this_thread::sleep_for(500ms);  // its request must be in before member 1's (a loaded CI box)
  member(1).request(7, true, q.quorum_id, {member(2).id()});
  Quorum retry = member(0).expect_quorum();
  EXPECT_EQ(member(1).expect_quorum().quorum_id, retry.quorum_id);
  EXPECT_EQ(member(2).expect_quorum().quorum_id, retry.quorum_id);
  EXPECT_EQ(retry.step, 7u);
  EXPECT_NE(retry.quorum_id, q.quorum_id);
  EXPECT_EQ(retry.members.size(), 3u) << "a reported peer is not dropped while it heartbeats";
  EXPECT_TRUE(eventually([&] { return status().quorums_formed == 2; }));
  EXPECT_EQ(status().attempts_aborted, 1u);
  EXPECT_EQ(status().members_dropped, 0u);
}

TEST_F(CoordinatorTest, RetryDoesNotWaitForAPeerReportedLost) {
  auto o = options();
  o.quorum_timeout = 20s;
  start(3, o);
  connect_all(3);
  for (size_t i = 0; i < 3; ++i) member(i).request(1);
  Quorum q;
  for (size_t i = 0; i < 3; ++i) q = member(i).expect_quorum();
  auto t0 = Clock::now();
  member(0).request(1, true, q.quorum_id, {member(2).id()});
  member(1).expect_abort();
  member(2).expect_abort();
  member(1).request(1, true, q.quorum_id, {member(2).id()});
  // Member 2 heartbeats but does not ask: it was reported lost, so the retry goes on without it.
  Quorum retry = member(0).expect_quorum();
  member(1).expect_quorum();
  EXPECT_LT(Clock::now() - t0, 5s);
  EXPECT_EQ(retry.members.size(), 2u);
  EXPECT_FALSE(retry.contains(member(2).id()));
  // When it does ask, that attempt already formed without it.
  member(2).request(1, true, q.quorum_id, {});
  Rejoin r = member(2).expect_rejoin();
  EXPECT_EQ(r.missed_step, 1u);
  EXPECT_EQ(r.next_step, 2u);
}

TEST_F(CoordinatorTest, AskingForTheSameStepAgainGetsTheSameQuorum) {
  auto o = options();
  o.quorum_timeout = 20s;
  start(2, o);
  connect_all(2);
  member(0).request(3);
  member(1).request(3);
  Quorum q = member(0).expect_quorum();
  member(1).expect_quorum();
  member(1).request(3);  // a repeat (no failed_quorum_id): its request crossed the quorum
  EXPECT_EQ(member(1).expect_quorum().quorum_id, q.quorum_id);
  member(0).expect_nothing(300ms);  // the attempt goes on
  // A repeat that names the attempt as failed is a retry.
  member(0).request(3, true, q.quorum_id, {});
  Abort a = member(1).expect_abort();
  EXPECT_EQ(a.quorum_id, q.quorum_id);
  member(1).request(3, true, q.quorum_id, {});
  Quorum retry = member(0).expect_quorum();
  EXPECT_EQ(member(1).expect_quorum().quorum_id, retry.quorum_id);
  EXPECT_NE(retry.quorum_id, q.quorum_id);
}

TEST_F(CoordinatorTest, DoneFromEveryMemberCommitsAndFailureAbortsForAll) {
  start(3);
  connect_all(3);
  for (size_t i = 0; i < 3; ++i) member(i).request(1);
  Quorum q;
  for (size_t i = 0; i < 3; ++i) q = member(i).expect_quorum();
  member(0).send(MessageKind::Done, {}, q.quorum_id, 1);
  member(1).send(MessageKind::Done, {}, q.quorum_id, 1);
  member(0).expect_nothing(200ms);  // not everyone is done yet
  member(2).send(MessageKind::Done, {}, q.quorum_id, 1);
  for (size_t i = 0; i < 3; ++i) {
    auto m = member(i).expect(MessageKind::Commit);
    ASSERT_TRUE(m);
    EXPECT_EQ(m->header.quorum_id, q.quorum_id);
    EXPECT_EQ(m->header.step, 1u);
  }

  // Step 2: member 1 fails; everyone, the reporter too, gets the Abort; a later Done of that
  // attempt gets the Abort again instead of a Commit.
  for (size_t i = 0; i < 3; ++i) member(i).request(2);
  for (size_t i = 0; i < 3; ++i) q = member(i).expect_quorum();
  member(0).send(MessageKind::Done, {}, q.quorum_id, 2);
  member(1).send(MessageKind::Failure, encode(Abort{q.quorum_id, 2, {member(2).id()}, "ring broke"}), q.quorum_id, 2);
  for (size_t i = 0; i < 3; ++i) {
    Abort a = member(i).expect_abort();
    EXPECT_EQ(a.quorum_id, q.quorum_id);
    ASSERT_EQ(a.lost.size(), 1u);
    EXPECT_EQ(a.lost[0], member(2).id());
    EXPECT_NE(a.reason.find("ring broke"), std::string::npos) << a.reason;
  }
  member(2).send(MessageKind::Done, {}, q.quorum_id, 2);
  EXPECT_EQ(member(2).expect_abort().quorum_id, q.quorum_id);
  EXPECT_TRUE(eventually([&] { return status().attempts_aborted == 1; }));
}

TEST_F(CoordinatorTest, SilentMemberIsDroppedAndNotWaitedFor) {
  auto o = options();
  o.quorum_timeout = 20s;  // only the drop can let step 2 form in time
  o.heartbeat_timeout = 1000ms;
  start(3, o);
  connect_all(3);
  for (size_t i = 0; i < 3; ++i) member(i).request(1);
  for (size_t i = 0; i < 3; ++i) member(i).expect_quorum();
  PeerId gone = member(2).id();
  // t0 before the disconnect: a stall between the two must not shorten the measured wait.
  auto t0 = Clock::now();
  disconnect(2);  // no more heartbeats
  member(0).request(2);
  member(1).request(2);
  Quorum q = member(0).expect_quorum(8s);
  member(1).expect_quorum();
  auto waited = Clock::now() - t0;
  EXPECT_GE(waited, 700ms);
  EXPECT_LT(waited, 6s);
  EXPECT_EQ(q.members.size(), 2u);
  EXPECT_FALSE(q.contains(gone));
  ASSERT_TRUE(eventually([&] { return status().members_dropped == 1 && status().members == 2; }));
}

// Member 1 of a 3-member attempt dies: the other two get the attempt's Abort naming it.
// `repeat_then_others_done`: before dying it repeated its request (it crossed the quorum, R5:
// sent the quorum again) and the others finished their part: the attempt is still in flight
// (the repeat used to mark it ended, and the others waited out op_timeout).
void CoordinatorTest::member_dies_mid_attempt(bool repeat_then_others_done) {
  auto o = options();
  o.heartbeat_timeout = 800ms;
  o.quorum_timeout = 20s;
  start(3, o);
  connect_all(3);
  for (size_t i = 0; i < 3; ++i) member(i).request(1);
  Quorum q;
  for (size_t i = 0; i < 3; ++i) q = member(i).expect_quorum();
  if (repeat_then_others_done) {
    member(1).request(1);
    EXPECT_EQ(member(1).expect_quorum().quorum_id, q.quorum_id);
    for (size_t i : {0, 2}) member(i).send(MessageKind::Done, {}, q.quorum_id, 1);
  }
  PeerId gone = member(1).id();
  disconnect(1);
  for (size_t i : {0, 2}) {
    Abort a = member(i).expect_abort(5s);
    EXPECT_EQ(a.quorum_id, q.quorum_id);
    ASSERT_EQ(a.lost.size(), 1u);
    EXPECT_EQ(a.lost[0], gone);
  }
}

TEST_F(CoordinatorTest, MemberThatDiesMidAttemptAbortsItForTheOthers) { member_dies_mid_attempt(false); }

TEST_F(CoordinatorTest, MemberThatRepeatedItsRequestAndDiesStillAbortsTheAttempt) { member_dies_mid_attempt(true); }

TEST_F(CoordinatorTest, LeaveDropsTheMemberAtOnce) {
  auto o = options();
  o.quorum_timeout = 20s;
  start(3, o);
  connect_all(3);
  for (size_t i = 0; i < 3; ++i) member(i).request(1);
  for (size_t i = 0; i < 3; ++i) member(i).expect_quorum();
  member(0).request(2);
  member(1).request(2);
  member(0).expect_nothing(300ms);  // waiting for member 2
  member(2).send(MessageKind::Leave);
  // Still heartbeating, but it left: step 2 forms without it at once.
  EXPECT_EQ(member(0).expect_quorum(3s).members.size(), 2u);
  member(1).expect_quorum();
  EXPECT_TRUE(eventually([&] { return status().members == 2 && status().members_dropped == 1; }));
}

TEST_F(CoordinatorTest, GarbageIsIgnoredAndTheCoordinatorKeepsWorking) {
  start(2);
  connect_all(2);
  member(0).send(MessageKind::QuorumRequest, {1, 2, 3});
  member(0).send(MessageKind::QuorumRequest, std::vector<uint8_t>(64, 0xff));
  member(0).send(MessageKind::QuorumRequest, std::vector<uint8_t>(16, 0));
  member(1).send(MessageKind::Failure, {0xde, 0xad, 0xbe, 0xef, 0, 0, 0, 0});
  member(1).send(MessageKind::Done, {}, 12345, 9);  // an unknown attempt: told to retry
  EXPECT_EQ(member(1).expect_abort().quorum_id, 12345u);
  member(1).send_type(999, {1, 2, 3});
  member(1).send(MessageKind::Quorum, encode(Quorum{}));  // only the coordinator sends these
  QuorumRequest no_address;
  no_address.step = 1;
  member(0).send(MessageKind::QuorumRequest, encode(no_address));
  member(0).expect_nothing(300ms);
  EXPECT_EQ(status().members, 0u);
  member(0).request(1);
  member(1).request(1);
  EXPECT_EQ(member(0).expect_quorum().members.size(), 2u);
  EXPECT_EQ(member(1).expect_quorum().members.size(), 2u);
}

TEST_F(CoordinatorTest, RestartedCoordinatorRebuildsTheJobFromItsMembers) {
  auto o = options();
  o.quorum_timeout = 20s;
  start(3, o);
  connect_all(3);
  for (size_t i = 0; i < 3; ++i) member(i).request(1);
  Quorum before;
  for (size_t i = 0; i < 3; ++i) before = member(i).expect_quorum();

  // Same identity, same endpoint, no memory. The members reconnect by themselves; their
  // heartbeats tell the new coordinator whom to wait for.
  auto o2 = options();
  o2.quorum_timeout = 20s;
  o2.startup_grace = 500ms;
  restart(o2);
  wait_live(3);
  EXPECT_EQ(status().members, 0u);
  for (size_t i = 0; i < 3; ++i) member(i).request(2);
  Quorum after = member(0).expect_quorum();
  EXPECT_EQ(member(1).expect_quorum().quorum_id, after.quorum_id);
  EXPECT_EQ(member(2).expect_quorum().quorum_id, after.quorum_id);
  EXPECT_EQ(after.step, 2u);
  EXPECT_EQ(after.members.size(), 3u);
  EXPECT_EQ(ids_of(after), ids_of(before));
  EXPECT_NE(after.quorum_id, before.quorum_id);
  EXPECT_TRUE(eventually([&] { return status().members == 3; }));
}

TEST_F(CoordinatorTest, StartupGraceWaitsForPeersThatOnlyHeartbeat) {
  auto o = options();
  o.quorum_timeout = 100ms;
  o.startup_grace = 2000ms;
  auto started = Clock::now();
  start(2, o);
  connect_all(2);
  member(0).request(1);  // member 1 is live but silent about steps: not before the grace ends
  Quorum q = member(0).expect_quorum(6s);
  EXPECT_GE(Clock::now() - started, 1900ms);
  EXPECT_EQ(q.members.size(), 1u);
}

TEST_F(CoordinatorTest, FreshJobWaitsOutTheGraceForAllowedPeersNotYetConnected) {
  auto o = options();
  o.quorum_timeout = 100ms;
  o.startup_grace = 3000ms;
  auto started = Clock::now();
  start(3, o);
  connect_all(2);
  member(0).request(1);
  member(1).request(1);
  member(0).expect_nothing(600ms);  // the third allowed peer has not connected yet
  connect(2);
  member(2).request(1);
  Quorum q = member(2).expect_quorum();
  EXPECT_LT(Clock::now() - started, 3000ms) << "everyone asked: no need to wait out the grace";
  EXPECT_EQ(q.members.size(), 3u);
  EXPECT_EQ(member(0).expect_quorum().quorum_id, q.quorum_id);
  EXPECT_EQ(member(1).expect_quorum().quorum_id, q.quorum_id);
}

TEST_F(CoordinatorTest, GraceEndsWithoutAllowedPeersThatNeverCome) {
  auto o = options();
  o.quorum_timeout = 100ms;
  o.startup_grace = 800ms;
  auto started = Clock::now();
  start(3, o);
  connect_all(2);
  member(0).request(1);
  member(1).request(1);
  Quorum q = member(0).expect_quorum(5s);
  EXPECT_GE(Clock::now() - started, 750ms);
  EXPECT_EQ(q.members.size(), 2u);
}

TEST_F(CoordinatorTest, PollCanBeDrivenFromTheCallersLoop) {
  identities_.push_back(crypto::Identity::generate());
  auto o = options();
  Coordinator c(coordinator_id_, o);
  TestMember m(std::move(identities_[0]), coordinator_id_.public_key(), c.endpoint(), 42000);
  m.request(1);
  auto until = Clock::now() + 5s;
  while (c.status().quorums_formed == 0 && Clock::now() < until) c.poll(Deadline::after(50ms));
  EXPECT_EQ(m.expect_quorum().members.size(), 1u);
  CancelToken cancel;
  cancel.cancel();
  EXPECT_THROW(c.poll(Deadline::after(1s), &cancel), CancelledError);
}
