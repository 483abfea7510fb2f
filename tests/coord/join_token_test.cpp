// Join tokens: encoding, every refusal reason, and decoding fuzzed input (truncations, bit flips,
// garbage), which must be refused with a JoinTokenError and never verify.
#include <gtest/gtest.h>

#include <fstream>
#include <random>

#include "meshtrain/coord.h"
#include "support/temp_dir.h"

using namespace meshtrain;
using namespace meshtrain::coord;
using meshtrain::test_support::TempDir;
using namespace std::chrono_literals;
using SysClock = std::chrono::system_clock;

namespace {

class JoinTokenTest : public ::testing::Test {
 protected:
  JoinToken issue(std::string label = "gpu-7 from provider x") {
    return JoinToken::issue(owner_, job_.public_key(), peer_.public_key(), now_ + 2h, std::move(label), now_);
  }
  void verify(const JoinToken& t) const { t.verify(owners_, job_.public_key(), peer_.public_key(), now_); }

  // verify() must throw a JoinTokenError of `problem` whose message names it and holds `detail`.
  void expect_refused(const std::function<void()>& check, JoinTokenProblem problem, const std::string& detail) {
    try {
      check();
      ADD_FAILURE() << "accepted; expected " << join_token_problem_name(problem);
    } catch (const JoinTokenError& e) {
      EXPECT_EQ(e.problem, problem) << e.what();
      EXPECT_EQ(e.code(), ErrorCode::Auth);
      std::string what = e.what();
      EXPECT_EQ(what.rfind(fmt::format("join token {}: ", join_token_problem_name(problem)), 0), 0u) << what;
      EXPECT_NE(what.find(detail), std::string::npos) << what << "\n  does not mention " << detail;
    }
  }

  crypto::Identity owner_ = crypto::Identity::generate();
  crypto::Identity job_ = crypto::Identity::generate();
  crypto::Identity peer_ = crypto::Identity::generate();
  net::AllowList owners_{owner_.public_key()};
  JoinToken::TimePoint now_ = std::chrono::floor<std::chrono::seconds>(SysClock::now());
};

}  // namespace

TEST_F(JoinTokenTest, RoundTripsThroughBinaryAndText) {
  JoinToken t = issue();
  crypto::Bytes bytes = t.encode();
  EXPECT_EQ(bytes.size(), kMinJoinTokenBytes + t.label.size());
  std::string text = t.to_text();
  EXPECT_EQ(text.rfind("mtjoin-", 0), 0u);
  EXPECT_LE(text.size(), kMaxJoinTokenTextBytes);
  for (const JoinToken& back : {JoinToken::decode(bytes, "test"), JoinToken::from_text("  " + text + "\n", "test")}) {
    EXPECT_EQ(back.owner, owner_.public_key());
    EXPECT_EQ(back.job, job_.public_key());
    EXPECT_EQ(back.peer, peer_.public_key());
    EXPECT_EQ(back.issued, now_);
    EXPECT_EQ(back.expires, now_ + 2h);
    EXPECT_EQ(back.label, "gpu-7 from provider x");
    EXPECT_EQ(back.encode(), bytes);
    EXPECT_NO_THROW(verify(back));
  }
  EXPECT_NO_THROW(verify(issue("")));
  EXPECT_NO_THROW(verify(issue(std::string(kMaxJoinTokenLabelBytes, 'x'))));
}

TEST_F(JoinTokenTest, EachProblemIsNamed) {
  JoinToken good = issue();
  auto other = crypto::Identity::generate();

  expect_refused([&] { good.verify(owners_, job_.public_key(), peer_.public_key(), now_ + 2h); },
                 JoinTokenProblem::Expired, "expires");
  expect_refused([&] { good.verify(owners_, job_.public_key(), peer_.public_key(), now_ - 1h); },
                 JoinTokenProblem::NotYetValid, "clocks");
  // Within the allowed clock skew a token issued "in the future" is fine.
  EXPECT_NO_THROW(good.verify(owners_, job_.public_key(), peer_.public_key(), now_ - kJoinTokenClockSkew));
  expect_refused([&] { good.verify(owners_, job_.public_key(), other.public_key(), now_); },
                 JoinTokenProblem::WrongPeer, other.public_key().fingerprint());
  expect_refused([&] { good.verify(owners_, other.public_key(), peer_.public_key(), now_); },
                 JoinTokenProblem::WrongJob, other.public_key().fingerprint());
  expect_refused([&] { good.verify(net::AllowList{other.public_key()}, job_.public_key(), peer_.public_key(), now_); },
                 JoinTokenProblem::WrongOwner, owner_.public_key().fingerprint());

  JoinToken stretched = good;  // someone extends the expiry without the owner's key
  stretched.expires += 24h;
  expect_refused([&] { verify(stretched); }, JoinTokenProblem::BadSignature, "altered");
  JoinToken reassigned = good;  // ... or hands the token to another peer
  reassigned.peer = other.public_key();
  expect_refused([&] { reassigned.verify(owners_, job_.public_key(), other.public_key(), now_); },
                 JoinTokenProblem::BadSignature, "altered");
  JoinToken resigned = good;  // ... or claims another owner
  resigned.owner = other.public_key();
  expect_refused([&] { resigned.verify(net::AllowList{other.public_key()}, job_.public_key(), peer_.public_key(), now_); },
                 JoinTokenProblem::BadSignature, "altered");

  expect_refused([&] { JoinToken::from_text("mtjoin-zz", "the test's token"); }, JoinTokenProblem::Malformed,
                 "the test's token");
  expect_refused([&] { JoinToken::from_text("hello", "flag --join-token"); }, JoinTokenProblem::Malformed,
                 "does not start with 'mtjoin-'");
  expect_refused([&] { JoinToken::from_text(std::string(kMaxJoinTokenTextBytes + 1, 'a'), "x"); },
                 JoinTokenProblem::Malformed, "characters");
}

TEST_F(JoinTokenTest, IssueRefusesBadLabelsAndExpiries) {
  EXPECT_THROW(issue(std::string(kMaxJoinTokenLabelBytes + 1, 'x')), InvalidArgumentError);
  EXPECT_THROW(issue("tab\there"), InvalidArgumentError);
  EXPECT_THROW(JoinToken::issue(owner_, job_.public_key(), peer_.public_key(), now_, "", now_), InvalidArgumentError);
  // The year ~2250: past what decode accepts (2^33 s, 2242).
  const auto too_late = now_ + std::chrono::hours(24 * 365 * 225);
  EXPECT_THROW(JoinToken::issue(owner_, job_.public_key(), peer_.public_key(), too_late, "", now_), InvalidArgumentError);
}

TEST_F(JoinTokenTest, FieldChecksOnDecode) {
  crypto::Bytes bytes = issue("abc").encode();
  crypto::Bytes v2 = bytes;
  v2[0] = 2;
  expect_refused([&] { JoinToken::decode(v2, "peer p"); }, JoinTokenProblem::Malformed, "version 2");
  crypto::Bytes long_label = bytes;
  long_label[1 + 96 + 16] = 4;  // claims a 4-byte label, carries 3
  expect_refused([&] { JoinToken::decode(long_label, "peer p"); }, JoinTokenProblem::Malformed, "4-byte label");
  crypto::Bytes control = bytes;
  control[1 + 96 + 16 + 1] = '\n';
  expect_refused([&] { JoinToken::decode(control, "peer p"); }, JoinTokenProblem::Malformed, "printable");
  crypto::Bytes far_future = bytes;
  far_future[1 + 96 + 8] = 0x7f;  // expiry's top byte
  expect_refused([&] { JoinToken::decode(far_future, "peer p"); }, JoinTokenProblem::Malformed, "out of range");
  // 10^10 s (the year 2286): below 2^34, but its nanoseconds overflow the clock's 64 bits.
  crypto::Bytes past_the_clock = bytes;
  const uint64_t expiry = 10'000'000'000;
  for (int i = 0; i < 8; ++i) past_the_clock[1 + 96 + 8 + i] = static_cast<uint8_t>(expiry >> (56 - 8 * i));
  expect_refused([&] { JoinToken::decode(past_the_clock, "peer p"); }, JoinTokenProblem::Malformed, "out of range");
}

// Every prefix of the binary and text forms, and every single-bit flip of the binary form, is
// refused: by decode (Malformed) or by verify (a signature or field check). None verifies.
TEST_F(JoinTokenTest, FuzzedTokensAreRefusedNeverAccepted) {
  const JoinToken good = issue("fuzz");
  const crypto::Bytes bytes = good.encode();
  const std::string text = good.to_text();
  auto outcome = [&](const std::function<JoinToken()>& decode) -> std::string {
    try {
      JoinToken t = decode();
      verify(t);
      return "accepted";
    } catch (const JoinTokenError& e) {
      return std::string(join_token_problem_name(e.problem));
    }
  };
  for (size_t n = 0; n < bytes.size(); ++n) {
    crypto::Bytes cut(bytes.begin(), bytes.begin() + static_cast<ptrdiff_t>(n));
    EXPECT_EQ(outcome([&] { return JoinToken::decode(cut, "fuzz"); }), "malformed") << "prefix of " << n << " bytes";
  }
  for (size_t n = 0; n < text.size(); ++n)
    EXPECT_EQ(outcome([&] { return JoinToken::from_text(text.substr(0, n), "fuzz"); }), "malformed")
        << "prefix of " << n << " characters";
  size_t refused_by_decode = 0;
  for (size_t bit = 0; bit < bytes.size() * 8; ++bit) {
    crypto::Bytes flipped = bytes;
    flipped[bit / 8] ^= static_cast<uint8_t>(1u << (bit % 8));
    std::string result = outcome([&] { return JoinToken::decode(flipped, "fuzz"); });
    EXPECT_NE(result, "accepted") << "bit " << bit;
    refused_by_decode += result == "malformed";
  }
  EXPECT_GT(refused_by_decode, 0u);
  EXPECT_LT(refused_by_decode, bytes.size() * 8);  // most flips decode and fail the signature
  std::mt19937_64 rng(42);
  for (int i = 0; i < 2000; ++i) {
    crypto::Bytes garbage(rng() % (kMaxJoinTokenBytes + 8));
    for (auto& b : garbage) b = static_cast<uint8_t>(rng());
    if (i % 2 && !garbage.empty()) garbage[0] = kJoinTokenVersion;
    EXPECT_NE(outcome([&] { return JoinToken::decode(garbage, "fuzz"); }), "accepted");
    std::string noise = "mtjoin-" + crypto::to_hex(garbage);
    EXPECT_NE(outcome([&] { return JoinToken::from_text(noise, "fuzz"); }), "accepted");
  }
}

TEST_F(JoinTokenTest, LoadsFromTheCommandLineOrAFile) {
  TempDir dir;
  JoinToken t = issue();
  EXPECT_EQ(JoinToken::load(t.to_text()).encode(), t.encode());
  std::ofstream(dir / "token") << t.to_text() << "\n";
  EXPECT_EQ(JoinToken::load((dir / "token").string()).encode(), t.encode());
  std::ofstream(dir / "big") << "mtjoin-" << std::string(4000, 'a');
  EXPECT_THROW(JoinToken::load((dir / "big").string()), JoinTokenError);
  try {
    JoinToken::load((dir / "missing").string());
    ADD_FAILURE() << "a missing file loaded";
  } catch (const IoError& e) {
    EXPECT_NE(std::string(e.what()).find("missing"), std::string::npos) << e.what();
  }
}

TEST(ReadPublicKey, HexOrAFileWithOneKey) {
  TempDir dir;
  auto a = crypto::Identity::generate().public_key();
  auto b = crypto::Identity::generate().public_key();
  EXPECT_EQ(read_public_key(a.hex(), "--peer"), a);
  std::ofstream(dir / "one") << "# the owner\n" << a.hex() << "\n";
  EXPECT_EQ(read_public_key((dir / "one").string(), "--peer"), a);
  std::ofstream(dir / "two") << a.hex() << "\n" << b.hex() << "\n";
  EXPECT_THROW(read_public_key((dir / "two").string(), "--peer"), InvalidArgumentError);
  auto identity = crypto::Identity::generate();
  identity.save_pem(dir / "id.pem");
  EXPECT_EQ(read_public_key((dir / "id.pem").string(), "--job"), identity.public_key());
  EXPECT_THROW(read_public_key("nothing-here", "--peer"), InvalidArgumentError);
}

TEST(CoordMessages, RefusalAndTokenCarryingRequestRoundTrip) {
  Refusal r{JoinTokenProblem::WrongPeer, "token for peer x presented by y"};
  Refusal back = decode_refusal(encode(r), "test");
  EXPECT_EQ(back.problem, r.problem);
  EXPECT_EQ(back.reason, r.reason);

  QuorumRequest q;
  q.step = 3;
  q.host = "127.0.0.1";
  q.port = 7000;
  q.join_token = crypto::Bytes(kMaxJoinTokenBytes, 0xab);
  EXPECT_EQ(decode_quorum_request(encode(q), "test").join_token, q.join_token);
  q.join_token.push_back(0);
  EXPECT_THROW(decode_quorum_request(encode(q), "test"), ProtocolError);
}
