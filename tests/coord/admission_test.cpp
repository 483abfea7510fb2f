// Admission by join token, in-process: a coordinator with a job owner and real ControlClients
// over loopback CurveZMQ, some of them on the allow-list, some holding tokens good or bad.
#include <gtest/gtest.h>

#include <memory>

#include "coord/coord_harness.h"

using namespace meshtrain;
using namespace meshtrain::coord;
using namespace meshtrain::coord::testing;
using namespace std::chrono_literals;
using SysClock = std::chrono::system_clock;

namespace {

class AdmissionTest : public ::testing::Test {
 protected:
  // Listed member 0 is on the allow-list; the coordinator admits tokens signed by owner_.
  // A long quorum timeout: a quorum that forms quickly did not wait for a refused peer.
  void start(std::chrono::milliseconds quorum_timeout = 10s) {
    coordinator_ = std::make_unique<RunningCoordinator>(coordinator_id_, options("tcp://127.0.0.1:0", quorum_timeout));
    listed_ = std::make_unique<TestMember>(std::move(listed_id_), coordinator_id_.public_key(),
                                           (*coordinator_)->endpoint(), 41000);
    // Seen before anyone asks: a quorum waits only for members it has heard from.
    ASSERT_TRUE(eventually([&] { return status().live_peers == 1; }));
  }
  CoordinatorOptions options(const std::string& endpoint, std::chrono::milliseconds quorum_timeout) {
    CoordinatorOptions o;
    o.bind_endpoint = endpoint;
    o.quorum_timeout = quorum_timeout;
    o.heartbeat_timeout = 1500ms;
    o.startup_grace = 0ms;
    o.control.linger = 0ms;
    o.allowed.add(listed_key_);
    o.job_owners.add(owner_.public_key());
    return o;
  }

  std::unique_ptr<TestMember> connect(crypto::Identity id, uint16_t port = 41001) {
    return std::make_unique<TestMember>(std::move(id), coordinator_id_.public_key(), (*coordinator_)->endpoint(), port);
  }

  JoinToken token_for(const PeerId& peer, std::chrono::seconds valid_for = 3600s) {
    auto now = SysClock::now();
    return JoinToken::issue(owner_, coordinator_id_.public_key(), peer, now + valid_for, "admission test", now);
  }

  static void request(TestMember& m, uint64_t step, const crypto::Bytes& token, bool has_state = true) {
    QuorumRequest r;
    r.step = step;
    r.host = "127.0.0.1";
    r.port = m.bulk_port();
    r.has_state = has_state;
    r.join_token = token;
    m.send(MessageKind::QuorumRequest, encode(r), 0, step);
  }

  // The next message to `m` is a Refused naming `problem` (and `detail`).
  static void expect_refusal(TestMember& m, JoinTokenProblem problem, const std::string& detail) {
    auto msg = m.expect(MessageKind::Refused);
    ASSERT_TRUE(msg);
    Refusal r = decode_refusal(msg->payload, "coordinator");
    EXPECT_EQ(join_token_problem_name(r.problem), join_token_problem_name(problem)) << r.reason;
    EXPECT_NE(r.reason.find(detail), std::string::npos) << r.reason << "\n  does not mention " << detail;
  }

  CoordinatorStatus status() { return (*coordinator_)->status(); }

  crypto::Identity coordinator_id_ = crypto::Identity::generate();
  crypto::Identity owner_ = crypto::Identity::generate();
  crypto::Identity listed_id_ = crypto::Identity::generate();
  PeerId listed_key_ = listed_id_.public_key();
  std::unique_ptr<RunningCoordinator> coordinator_;
  std::unique_ptr<TestMember> listed_;
};

}  // namespace

TEST_F(AdmissionTest, ValidTokenAdmitsAnUnlistedPeerIntoTheQuorum) {
  start();
  auto joiner_id = crypto::Identity::generate();
  PeerId joiner_key = joiner_id.public_key();
  JoinToken token = token_for(joiner_key);
  auto joiner = connect(std::move(joiner_id));
  ASSERT_TRUE(eventually([&] { return status().live_peers == 1; }));  // the listed member only

  request(*joiner, 1, token.encode());
  // Admitted before the listed member asks: else step 1 could form without it.
  ASSERT_TRUE(eventually([&] { return status().joins_admitted == 1; }));
  listed_->request(1);
  Quorum q = joiner->expect_quorum();
  EXPECT_EQ(listed_->expect_quorum().quorum_id, q.quorum_id);
  ASSERT_EQ(q.members.size(), 2u);
  EXPECT_TRUE(q.contains(joiner_key));
  EXPECT_TRUE(q.contains(listed_key_));
  joiner->send(MessageKind::Done, {}, q.quorum_id, 1);
  listed_->send(MessageKind::Done, {}, q.quorum_id, 1);
  EXPECT_TRUE(joiner->expect(MessageKind::Commit));
  EXPECT_TRUE(listed_->expect(MessageKind::Commit));

  // Admitted: the next step waits for it (two live peers), and a request without the token is fine.
  EXPECT_TRUE(eventually([&] { return status().live_peers == 2 && status().members == 2; }));
  listed_->request(2);
  joiner->expect_nothing(300ms);
  request(*joiner, 2, {});
  EXPECT_EQ(joiner->expect_quorum().members.size(), 2u);
  EXPECT_EQ(listed_->expect_quorum().members.size(), 2u);
  EXPECT_EQ(status().joins_admitted, 1u);
  EXPECT_EQ(status().refused, 0u);
}

TEST_F(AdmissionTest, BadTokensAreRefusedWithTheirProblemAndTheJobGoesOn) {
  start();
  auto stranger = crypto::Identity::generate();
  auto not_owner = crypto::Identity::generate();
  auto other_job = crypto::Identity::generate();
  auto now = SysClock::now();

  struct Case {
    std::string name;
    std::function<crypto::Bytes(const PeerId& self)> token;
    JoinTokenProblem problem;
    std::string detail;
  };
  std::vector<Case> cases = {
      {"missing", [](const PeerId&) { return crypto::Bytes{}; }, JoinTokenProblem::Missing, "sent no join token"},
      {"garbage", [](const PeerId&) { return crypto::Bytes(100, 0x5a); }, JoinTokenProblem::Malformed, "100 bytes"},
      {"expired",
       [&](const PeerId& self) {
         return JoinToken::issue(owner_, coordinator_id_.public_key(), self, now - 1h, "old", now - 2h).encode();
       },
       JoinTokenProblem::Expired, "it is now"},
      {"wrong peer", [&](const PeerId&) { return token_for(stranger.public_key()).encode(); },
       JoinTokenProblem::WrongPeer, stranger.public_key().fingerprint()},
      {"wrong owner",
       [&](const PeerId& self) {
         return JoinToken::issue(not_owner, coordinator_id_.public_key(), self, now + 1h, "", now).encode();
       },
       JoinTokenProblem::WrongOwner, not_owner.public_key().fingerprint()},
      {"wrong job",
       [&](const PeerId& self) { return JoinToken::issue(owner_, other_job.public_key(), self, now + 1h, "", now).encode(); },
       JoinTokenProblem::WrongJob, other_job.public_key().fingerprint()},
      {"tampered",
       [&](const PeerId& self) {
         crypto::Bytes b = token_for(self).encode();
         b[1 + 3 * 32 + 8 + 7] ^= 0x01;  // the expiry's last byte: a second more or less
         return b;
       },
       JoinTokenProblem::BadSignature, "altered"},
  };

  uint16_t port = 41100;
  uint64_t step = 100;
  for (const auto& c : cases) {
    SCOPED_TRACE(c.name);
    auto id = crypto::Identity::generate();
    PeerId key = id.public_key();
    auto peer = connect(std::move(id), port++);
    uint64_t refused_before = status().refused;
    request(*peer, 1, c.token(key));
    expect_refusal(*peer, c.problem, c.detail);
    EXPECT_TRUE(eventually([&] { return status().refused == refused_before + 1; }));
    // Nothing else from it gets through either.
    peer->send(MessageKind::Done, {}, 12345, 1);
    peer->send(MessageKind::Leave);
    expect_refusal(*peer, JoinTokenProblem::Missing, "not admitted");
    expect_refusal(*peer, JoinTokenProblem::Missing, "not admitted");
    // The refused peer stays connected and heartbeating, yet the listed member's step forms at
    // once: nobody waits for it.
    listed_->request(++step);
    Quorum q = listed_->expect_quorum(5s);
    ASSERT_EQ(q.members.size(), 1u);
    EXPECT_EQ(q.members[0].id, listed_key_);
    listed_->send(MessageKind::Done, {}, q.quorum_id, q.step);
    EXPECT_TRUE(listed_->expect(MessageKind::Commit));
  }
  EXPECT_EQ(status().joins_admitted, 0u);
  EXPECT_EQ(status().members, 1u);
  EXPECT_EQ(status().live_peers, 1u);
}

TEST_F(AdmissionTest, AMemberWhoseTokenExpiredIsRefusedAtItsNextRequest) {
  start();
  auto joiner_id = crypto::Identity::generate();
  JoinToken token = token_for(joiner_id.public_key(), 2s);
  auto joiner = connect(std::move(joiner_id));
  request(*joiner, 1, token.encode());
  // Admitted before the listed member asks: else step 1 could form without it.
  ASSERT_TRUE(eventually([&] { return status().joins_admitted == 1; }));
  listed_->request(1);
  Quorum q = joiner->expect_quorum();
  EXPECT_EQ(q.members.size(), 2u);
  listed_->expect_quorum();
  joiner->send(MessageKind::Done, {}, q.quorum_id, 1);
  listed_->send(MessageKind::Done, {}, q.quorum_id, 1);
  EXPECT_TRUE(joiner->expect(MessageKind::Commit));
  EXPECT_TRUE(listed_->expect(MessageKind::Commit));

  std::this_thread::sleep_until(token.expires + 100ms);
  request(*joiner, 2, token.encode());
  expect_refusal(*joiner, JoinTokenProblem::Expired, "expires");
  EXPECT_TRUE(eventually([&] { return status().members == 1; }));
  listed_->request(2);
  Quorum next = listed_->expect_quorum();
  EXPECT_EQ(next.members.size(), 1u);
  EXPECT_EQ(status().joins_admitted, 1u);
}

TEST_F(AdmissionTest, ARestartedCoordinatorAdmitsTheTokenHolderAgain) {
  start(400ms);
  std::string endpoint = (*coordinator_)->endpoint();
  auto joiner_id = crypto::Identity::generate();
  JoinToken token = token_for(joiner_id.public_key());
  auto joiner = connect(std::move(joiner_id));
  request(*joiner, 1, token.encode());
  EXPECT_EQ(joiner->expect_quorum().members.size(), 1u);  // the listed member has not asked: timeout rule

  coordinator_.reset();
  coordinator_ = std::make_unique<RunningCoordinator>(coordinator_id_, options(endpoint, 400ms));
  // The joiner's client reconnects by itself; its request carries the token again.
  Quorum q;
  for (int attempt = 0; attempt < 10 && q.members.empty(); ++attempt) {
    request(*joiner, 2, token.encode());
    if (auto m = joiner->next(1s); m && m->header.type == static_cast<uint16_t>(MessageKind::Quorum))
      q = decode_quorum(m->payload, "coordinator");
  }
  ASSERT_EQ(q.members.size(), 1u);
  EXPECT_EQ(status().joins_admitted, 1u);
  EXPECT_EQ(status().refused, 0u);
}
