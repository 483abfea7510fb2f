// Admission by join token with real processes: a meshtrain-coordinator started with
// --job-owner, collective_peer members on the allow-list, and peers that are on nobody's
// allow-list holding tokens minted by `meshtrain token` (or forged ones).
#include <gtest/gtest.h>

#include <fstream>
#include <sstream>

#include "collective/job.h"
#include "support/temp_dir.h"
#include "meshtrain/coord.h"

using namespace meshtrain;
using namespace meshtrain::test_support;
using namespace std::chrono_literals;

namespace {

std::string read_text(const std::string& path) {
  std::ifstream in(path);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

// `meshtrain ARGS...` must exit 0.
void run_cli(std::vector<std::string> args) {
  args.insert(args.begin(), MESHTRAIN_CLI);
  ChildProcess cli(args);
  ASSERT_EQ(cli.wait(30s), 0) << "meshtrain " << args[1] << " failed";
}

// `meshtrain ARGS...`: exit code and output (stdout and stderr together).
std::pair<int, std::string> cli_output(const std::filesystem::path& dir, std::vector<std::string> args) {
  args.insert(args.begin(), MESHTRAIN_CLI);
  const std::string output = (dir / "cli.out").string();
  ChildProcess cli(args, output);
  auto code = cli.wait(30s);
  return {code.value_or(-1), read_text(output)};
}

// Every listed peer's record of `step` agrees with peer 0's (attempt, contributors, result,
// parameters), and the contributors are exactly `expected` (job indices).
void expect_step(const Job& job, const std::vector<int>& peers, uint64_t step, std::vector<int> expected) {
  SCOPED_TRACE("step " + std::to_string(step));
  const PeerLog first = job.log(peers[0]);
  ASSERT_TRUE(first.steps.count(step));
  const StepRecord& r0 = first.steps.at(step);
  std::vector<int> contributors;
  for (const auto& key : r0.contributors) contributors.push_back(job.index_of(key));
  std::sort(contributors.begin(), contributors.end());
  std::sort(expected.begin(), expected.end());
  EXPECT_EQ(contributors, expected);
  for (int p : peers) {
    const PeerLog log = job.log(p);
    ASSERT_TRUE(log.steps.count(step)) << "peer " << p << " has no step " << step;
    const StepRecord& r = log.steps.at(step);
    EXPECT_EQ(r.quorum_id, r0.quorum_id) << "peer " << p;
    EXPECT_EQ(r.contributors, r0.contributors) << "peer " << p;
    EXPECT_EQ(r.result, r0.result) << "peer " << p;
    EXPECT_EQ(r.params, r0.params) << "peer " << p;
  }
}

}  // namespace

// Peer 3 is on no allow-list (the coordinator's or the members'); the owner mints it a token
// with the CLI; it joins the running job at step 5, takes the parameters, then contributes.
TEST(JoinByToken, TokenHolderJoinsARunningJobAndContributes) {
  const size_t count = 3001;
  Job job({.peers = 3, .min_peers = 3, .quorum_timeout_ms = 3000, .outsiders = 1, .job_owner = true});
  job.start_coordinator();
  for (int i = 0; i < 3; ++i) job.start_peer(i, 8, count, {"--step-delay-ms", "300"});

  const std::string token_file = (job.dir() / "peer3.token").string();
  run_cli({"token", "--owner-key", (job.dir() / "owner.pem").string(), "--peer", job.key(3), "--job",
           job.coordinator_key(), "--expires", "1h", "--label", "late joiner", "--out", token_file});
  coord::JoinToken token = coord::JoinToken::load(token_file);
  EXPECT_EQ(token.peer.hex(), job.key(3));
  EXPECT_EQ(token.label, "late joiner");

  // Start it once the others are past step 1: it must be admitted (its first request) before
  // they ask for step 5, ~1.2 s later; from step 3 that left it only ~0.3 s.
  for (int tries = 0; tries < 300 && !job.log(0).steps.count(1); ++tries) std::this_thread::sleep_for(20ms);
  ASSERT_TRUE(job.log(0).steps.count(1));
  job.start_peer(3, 4, count, {"--join", "--start-step", "5", "--step-delay-ms", "300", "--join-token", token_file});
  for (int i = 0; i < 4; ++i) ASSERT_EQ(job.peer(i).wait(60s), 0) << "peer " << i;

  expect_step(job, {0, 1, 2, 3}, 5, {0, 1, 2});  // the joiner receives state, contributes nothing
  for (uint64_t step = 6; step <= 8; ++step) expect_step(job, {0, 1, 2, 3}, step, {0, 1, 2, 3});
}

// Peers off the allow-list with an expired, a wrong-peer, a wrong-owner, a tampered and a
// garbage token: each stops with its problem named, and the listed members' job runs through.
TEST(JoinByToken, BadTokensAreRefusedAndTheJobIsUnharmed) {
  const size_t count = 1001;
  Job job({.peers = 2, .min_peers = 2, .quorum_timeout_ms = 3000, .outsiders = 5, .job_owner = true,
           .capture_output = true});
  job.start_coordinator();
  auto owner = crypto::Identity::load_pem(job.dir() / "owner.pem");
  auto not_owner = crypto::Identity::generate();
  auto job_key = crypto::PeerId::from_hex(job.coordinator_key());
  auto key = [&](int i) { return crypto::PeerId::from_hex(job.key(i)); };
  auto now = std::chrono::system_clock::now();

  std::string tampered = coord::JoinToken::issue(owner, job_key, key(5), now + 1h, "aaaa", now).to_text();
  // The label's last byte, 0x61 ('a'), becomes 0x60 ('`'): still a well-formed token.
  tampered[tampered.size() - 2 * crypto::kEd25519SignatureBytes - 1] = '0';
  struct Case {
    int peer;
    std::string token;
    std::string problem;
  };
  std::vector<Case> cases = {
      {2, coord::JoinToken::issue(owner, job_key, key(2), now - 1h, "", now - 2h).to_text(), "join token expired"},
      {3, coord::JoinToken::issue(owner, job_key, key(0), now + 1h, "", now).to_text(), "join token wrong peer"},
      {4, coord::JoinToken::issue(not_owner, job_key, key(4), now + 1h, "", now).to_text(), "join token wrong owner"},
      {5, tampered, "join token bad signature"},
      {6, "mtjoin-00ff", "join token malformed"},
  };
  for (int i = 0; i < 2; ++i) job.start_peer(i, 6, count, {"--step-delay-ms", "100"});
  for (const auto& c : cases) {
    std::string file = (job.dir() / ("peer" + std::to_string(c.peer) + ".token")).string();
    std::ofstream(file) << c.token << "\n";
    job.start_peer(c.peer, 6, count, {"--join-token", file});
  }
  for (const auto& c : cases) {
    SCOPED_TRACE("peer " + std::to_string(c.peer) + ": " + c.problem);
    ASSERT_EQ(job.peer(c.peer).wait(60s), 4);
    std::string output = read_text(job.log_path(c.peer));
    EXPECT_NE(output.find(c.problem), std::string::npos) << output;
    // Refused by the coordinator (or, for garbage, before contacting it), not timed out.
    EXPECT_EQ(output.find("no quorum for step"), std::string::npos) << output;
    EXPECT_TRUE(job.log(c.peer).steps.empty());
  }
  for (int i = 0; i < 2; ++i) ASSERT_EQ(job.peer(i).wait(60s), 0) << "peer " << i;
  for (uint64_t step = 1; step <= 6; ++step) expect_step(job, {0, 1}, step, {0, 1});
}

// The tools a job owner uses: `meshtrain key` creates identities (never overwriting one),
// `meshtrain token` mints a token and --show checks it as the coordinator would.
TEST(JoinByToken, KeyAndTokenCommands) {
  TempDir dir;
  auto path = [&](const char* name) { return (dir / name).string(); };
  auto [code, owner_key] = cli_output(dir.path(), {"key", "generate", path("owner.pem"), "--public-out", path("owner.pub")});
  ASSERT_EQ(code, 0) << owner_key;
  owner_key = owner_key.substr(0, 64);
  EXPECT_EQ(read_text(path("owner.pub")), owner_key + "\n");
  EXPECT_EQ(cli_output(dir.path(), {"key", "public", path("owner.pem")}).second, owner_key + "\n");
  auto again = cli_output(dir.path(), {"key", "generate", path("owner.pem")});
  EXPECT_EQ(again.first, 2);
  EXPECT_NE(again.second.find("not overwriting"), std::string::npos) << again.second;
  EXPECT_EQ(crypto::Identity::load_pem(path("owner.pem")).public_key().hex(), owner_key);

  std::string peer = crypto::Identity::generate().public_key().hex();
  std::string job = crypto::Identity::generate().public_key().hex();
  auto minted = cli_output(dir.path(), {"token", "--owner-key", path("owner.pem"), "--peer", peer, "--job", job,
                                        "--expires", "90m", "--label", "cli test"});
  ASSERT_EQ(minted.first, 0) << minted.second;
  std::string token = minted.second.substr(0, minted.second.find('\n'));
  coord::JoinToken t = coord::JoinToken::from_text(token, "cli output");
  EXPECT_EQ(t.owner.hex(), owner_key);
  EXPECT_EQ(t.expires - t.issued, std::chrono::minutes(90));

  auto ok = cli_output(dir.path(), {"token", "--show", token, "--owner", path("owner.pub"), "--job", job, "--peer", peer});
  EXPECT_EQ(ok.first, 0) << ok.second;
  EXPECT_NE(ok.second.find("check    ok"), std::string::npos) << ok.second;
  auto wrong = cli_output(dir.path(), {"token", "--show", token, "--owner", owner_key, "--job", job, "--peer", job});
  EXPECT_EQ(wrong.first, 1) << wrong.second;
  EXPECT_NE(wrong.second.find("join token wrong peer"), std::string::npos) << wrong.second;
  auto bad = cli_output(dir.path(), {"token", "--owner-key", path("owner.pem"), "--peer", peer, "--job", job,
                                     "--expires", "soon"});
  EXPECT_EQ(bad.first, 2) << bad.second;
  EXPECT_NE(bad.second.find("--expires"), std::string::npos) << bad.second;
}
