// `meshtrain checkpoint inspect|verify|list`: output and exit codes, text and --json.
#include <gtest/gtest.h>

#include "checkpoint/helpers.h"
#include "core/json.h"
#include "support/child_process.h"
#include "support/temp_dir.h"

using namespace meshtrain;
using namespace meshtrain::checkpoint;
using namespace meshtrain::test_support;
using namespace std::chrono_literals;

namespace {

struct CliRun {
  int code;
  std::string out;  // stdout and stderr together
};

CliRun run_cli(const TempDir& dir, std::vector<std::string> args) {
  std::string cmd = std::string("exec ") + MESHTRAIN_CLI_BINARY;
  for (const auto& a : args) cmd += " '" + a + "'";
  fs::path out = dir / "cli.out";
  cmd += " > '" + out.string() + "' 2>&1";
  ChildProcess p({"/bin/sh", "-c", cmd});
  auto code = p.wait(60s);
  EXPECT_TRUE(code.has_value());
  return {code.value_or(-1), read_text(out)};
}

struct Saved {
  TempDir dir;
  TestState s = make_test_state(9, 900);
  fs::path step_dir;
  Saved() { step_dir = save_with_writers(dir / "ckpt", s, 3).dir; }
};

TEST(Cli, InspectText) {
  Saved c;
  CliRun r = run_cli(c.dir, {"checkpoint", "inspect", (c.dir / "ckpt").string()});
  EXPECT_EQ(r.code, 0) << r.out;
  for (std::string part : {"step         900", "by 3 writers", "model/proj.weight", "bfloat16", "[3, 5, 77]",
                           "shard-2-of-3.bin", "lr = 0.001", "data_cursor (7 bytes)"})
    EXPECT_NE(r.out.find(part), std::string::npos) << part << "\n" << r.out;
}

TEST(Cli, InspectJson) {
  Saved c;
  CliRun r = run_cli(c.dir, {"checkpoint", "inspect", c.step_dir.string(), "--json"});
  ASSERT_EQ(r.code, 0) << r.out;
  json::Value v = json::parse(r.out, "inspect output");
  json::Field f(v, "inspect output");
  EXPECT_EQ(f.at("step").u64(), 900u);
  EXPECT_EQ(f.at("world_size").u64(), 3u);
  EXPECT_EQ(f.at("tensors").array_size(), c.s.tensors.size());
  EXPECT_EQ(f.at("tensors").at(2).at("dtype").str(), "bfloat16");
  EXPECT_EQ(f.at("shards").at(1).at("file").str(), "shard-1-of-3.bin");
  EXPECT_EQ(f.at("blobs").at("rng").at("bytes").u64(), 16u);
}

TEST(Cli, VerifyOkAndDamaged) {
  Saved c;
  CliRun ok = run_cli(c.dir, {"checkpoint", "verify", (c.dir / "ckpt").string()});
  EXPECT_EQ(ok.code, 0) << ok.out;
  EXPECT_NE(ok.out.find("all 3 shards verified"), std::string::npos) << ok.out;

  flip_byte(c.step_dir / "shard-1-of-3.bin", 10);
  CliRun bad = run_cli(c.dir, {"checkpoint", "verify", (c.dir / "ckpt").string()});
  EXPECT_EQ(bad.code, 1) << bad.out;
  EXPECT_NE(bad.out.find("FAILED  shard-1-of-3.bin"), std::string::npos) << bad.out;
  EXPECT_NE(bad.out.find("ok      shard-0-of-3.bin"), std::string::npos) << bad.out;

  fs::remove(c.step_dir / "shard-2-of-3.bin");
  CliRun js = run_cli(c.dir, {"checkpoint", "verify", "--json", c.step_dir.string()});
  EXPECT_EQ(js.code, 1) << js.out;
  json::Value v = json::parse(js.out, "verify output");
  json::Field f(v, "verify output");
  EXPECT_FALSE(f.at("ok").boolean());
  EXPECT_TRUE(f.at("shards").at(0).at("ok").boolean());
  EXPECT_FALSE(f.at("shards").at(1).at("ok").boolean());
  EXPECT_NE(f.at("shards").at(2).at("error").str().find("missing"), std::string::npos);
}

TEST(Cli, ErrorsAndUsage) {
  TempDir dir;
  CliRun missing = run_cli(dir, {"checkpoint", "inspect", (dir / "nothing").string()});
  EXPECT_EQ(missing.code, 1) << missing.out;
  EXPECT_NE(missing.out.find("nothing"), std::string::npos) << missing.out;
  CliRun js = run_cli(dir, {"checkpoint", "verify", (dir / "nothing").string(), "--json"});
  EXPECT_EQ(js.code, 1) << js.out;
  EXPECT_NO_THROW(json::parse(js.out, "verify output")) << js.out;

  fs::create_directories(dir / "root" / "step-1");
  write_text(dir / "root" / "step-1" / "manifest.json", "{\"format\": 7}");
  CliRun corrupt = run_cli(dir, {"checkpoint", "inspect", (dir / "root").string()});
  EXPECT_EQ(corrupt.code, 1) << corrupt.out;
  EXPECT_NE(corrupt.out.find("field format"), std::string::npos) << corrupt.out;

  EXPECT_EQ(run_cli(dir, {"checkpoint"}).code, 2);
  EXPECT_EQ(run_cli(dir, {"checkpoint", "frobnicate", "x"}).code, 2);
  EXPECT_EQ(run_cli(dir, {"checkpoint", "inspect", "x", "--bogus"}).code, 2);
  CliRun help = run_cli(dir, {"checkpoint", "--help"});
  EXPECT_EQ(help.code, 0);
  EXPECT_NE(help.out.find("verify PATH"), std::string::npos);
}

TEST(Cli, List) {
  Saved c;
  fs::create_directories(c.dir / "ckpt" / "step-901");
  CliRun r = run_cli(c.dir, {"checkpoint", "list", (c.dir / "ckpt").string()});
  EXPECT_EQ(r.code, 0) << r.out;
  EXPECT_NE(r.out.find("step-900"), std::string::npos);
  EXPECT_NE(r.out.find("incomplete"), std::string::npos);
  CliRun js = run_cli(c.dir, {"checkpoint", "list", (c.dir / "ckpt").string(), "--json"});
  json::Value v = json::parse(js.out, "list output");
  EXPECT_EQ(v.items.size(), 2u);
}

}  // namespace
