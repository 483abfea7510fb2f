// The meshtrain-coordinator daemon as a child process: bind port 0, publish the endpoint, form a
// quorum for two real clients, stop cleanly on SIGTERM. Also its usage errors and key creation.
#include <gtest/gtest.h>
#include <sys/stat.h>

#include <filesystem>
#include <fstream>

#include "coord/coord_harness.h"
#include "support/child_process.h"
#include "support/temp_dir.h"

using namespace meshtrain;
using namespace meshtrain::coord;
using namespace meshtrain::coord::testing;
using meshtrain::test_support::ChildProcess;
using meshtrain::test_support::TempDir;
using namespace std::chrono_literals;
namespace fs = std::filesystem;

namespace {

void write_file(const fs::path& path, const std::string& text) {
  std::ofstream out(path);
  out << text;
}

std::vector<std::string> read_lines(const fs::path& path) {
  std::ifstream in(path);
  std::vector<std::string> lines;
  for (std::string line; std::getline(in, line);) lines.push_back(line);
  return lines;
}

std::optional<int> run_to_exit(std::vector<std::string> argv) {
  argv.insert(argv.begin(), COORDINATOR_BINARY);
  ChildProcess child(argv);
  return child.wait(10s);
}

}  // namespace

TEST(CoordinatorBinary, ServesAQuorumAndStopsOnSigterm) {
  TempDir dir;
  auto a = crypto::Identity::generate();
  auto b = crypto::Identity::generate();
  write_file(dir / "allow", fmt::format("# job members\n{}\n{}\n", a.public_key().hex(), b.public_key().hex()));
  fs::path key = dir / "coordinator.pem";
  fs::path endpoint_file = dir / "endpoint";

  ChildProcess child({COORDINATOR_BINARY, "--bind", "tcp://127.0.0.1:0", "--allow", (dir / "allow").string(), "--key",
                      key.string(), "--print-endpoint-file", endpoint_file.string(), "--startup-grace-ms", "0",
                      "--quorum-timeout-ms", "5000", "--heartbeat-timeout-ms", "2000", "--min-peers", "2",
                      "--status-json"});
  ASSERT_TRUE(eventually([&] { return fs::exists(endpoint_file) || child.wait(0ms).has_value(); }, 15s))
      << "the coordinator did not write " << endpoint_file;
  ASSERT_FALSE(child.wait(0ms).has_value()) << "the coordinator exited early";
  auto lines = read_lines(endpoint_file);
  ASSERT_EQ(lines.size(), 2u);
  EXPECT_EQ(lines[0].rfind("tcp://127.0.0.1:", 0), 0u) << lines[0];
  EXPECT_NE(lines[0], "tcp://127.0.0.1:0");
  PeerId server = PeerId::from_hex(lines[1], "endpoint file key");

  // The key was created, private to its owner, and is the one the daemon serves with.
  ASSERT_TRUE(fs::exists(key));
  EXPECT_EQ(fs::status(key).permissions() & (fs::perms::group_all | fs::perms::others_all), fs::perms::none);
  EXPECT_EQ(crypto::Identity::load_pem(key).public_key(), server);

  {
    TestMember ma(std::move(a), server, lines[0], 43001);
    TestMember mb(std::move(b), server, lines[0], 43002);
    ma.request(1);
    mb.request(1);
    Quorum qa = ma.expect_quorum(10s);
    Quorum qb = mb.expect_quorum(10s);
    EXPECT_EQ(qa.quorum_id, qb.quorum_id);
    EXPECT_EQ(qa.members.size(), 2u);
    EXPECT_EQ(qa.step, 1u);
  }

  child.signal(SIGTERM);
  auto code = child.wait(10s);
  ASSERT_TRUE(code.has_value()) << "still running 10 s after SIGTERM";
  EXPECT_EQ(*code, 0);
}

TEST(CoordinatorBinary, ReusesAnExistingKey) {
  TempDir dir;
  auto id = crypto::Identity::generate();
  id.save_pem(dir / "key.pem");
  write_file(dir / "allow", "");
  fs::path endpoint_file = dir / "endpoint";
  ChildProcess child({COORDINATOR_BINARY, "--bind=tcp://127.0.0.1:0", "--allow", (dir / "allow").string(), "--key",
                      (dir / "key.pem").string(), "--print-endpoint-file", endpoint_file.string()});
  ASSERT_TRUE(eventually([&] { return fs::exists(endpoint_file) || child.wait(0ms).has_value(); }, 15s));
  auto lines = read_lines(endpoint_file);
  ASSERT_EQ(lines.size(), 2u);
  EXPECT_EQ(lines[1], id.public_key().hex());
  child.signal(SIGINT);
  EXPECT_EQ(child.wait(10s), std::optional<int>(0));
}

TEST(CoordinatorBinary, UsageErrorsExitWithCode2) {
  TempDir dir;
  write_file(dir / "allow", "");
  write_file(dir / "bad_allow", "not a key\n");
  std::string allow = (dir / "allow").string();
  EXPECT_EQ(run_to_exit({"--help"}), std::optional<int>(0));
  EXPECT_EQ(run_to_exit({}), std::optional<int>(2)) << "--allow is required";
  EXPECT_EQ(run_to_exit({"--allow", allow, "--frobnicate"}), std::optional<int>(2));
  EXPECT_EQ(run_to_exit({"--allow", allow, "--min-peers", "two"}), std::optional<int>(2));
  EXPECT_EQ(run_to_exit({"--allow", allow, "--min-peers", "0"}), std::optional<int>(2));
  EXPECT_EQ(run_to_exit({"--allow", allow, "--quorum-timeout-ms"}), std::optional<int>(2));
  EXPECT_EQ(run_to_exit({"--allow", allow, "--bind", "localhost:7400"}), std::optional<int>(2));
  EXPECT_EQ(run_to_exit({"--allow", (dir / "bad_allow").string()}), std::optional<int>(2));
  EXPECT_EQ(run_to_exit({"--allow", allow, "--status-json=yes"}), std::optional<int>(2));
}
