#include <gtest/gtest.h>

#include <string>

#include "meshtrain/core.h"

namespace meshtrain {
namespace {

using log::Level;

// Every test leaves the process at the default level so test order does not matter.
class LogTest : public ::testing::Test {
 protected:
  void TearDown() override { log::configure("info"); }
};

TEST_F(LogTest, SingleLevelAppliesToEveryComponent) {
  log::configure("warn");
  EXPECT_FALSE(log::enabled(Level::Info, "net"));
  EXPECT_TRUE(log::enabled(Level::Warn, "net"));
  EXPECT_TRUE(log::enabled(Level::Error, "crypto"));
  EXPECT_FALSE(log::enabled(Level::Debug, "anything"));
}

TEST_F(LogTest, EveryLevelNameParses) {
  for (const char* name : {"trace", "debug", "info", "warn", "warning", "error", "off"}) {
    EXPECT_NO_THROW(log::configure(name)) << name;
  }
  log::configure("trace");
  EXPECT_TRUE(log::enabled(Level::Trace, "x"));
  log::configure("error");
  EXPECT_FALSE(log::enabled(Level::Warn, "x"));
  EXPECT_TRUE(log::enabled(Level::Error, "x"));
}

TEST_F(LogTest, OffDisablesEverything) {
  log::configure("off");
  EXPECT_FALSE(log::enabled(Level::Error, "net"));
  EXPECT_FALSE(log::enabled(Level::Trace, "net"));
  // Off is a threshold, never a level a message can be written at.
  log::configure("trace");
  EXPECT_FALSE(log::enabled(Level::Off, "net"));
}

TEST_F(LogTest, PerComponentOverride) {
  log::configure("warn,net=debug,crypto=off");
  EXPECT_TRUE(log::enabled(Level::Debug, "net"));
  EXPECT_FALSE(log::enabled(Level::Trace, "net"));
  EXPECT_FALSE(log::enabled(Level::Error, "crypto"));
  EXPECT_FALSE(log::enabled(Level::Info, "core"));
  EXPECT_TRUE(log::enabled(Level::Warn, "core"));
  // Component names match exactly, not by prefix.
  EXPECT_FALSE(log::enabled(Level::Debug, "network"));
}

TEST_F(LogTest, OverrideOrderAndEmptyTokens) {
  log::configure("net=trace,error");
  EXPECT_TRUE(log::enabled(Level::Trace, "net"));
  EXPECT_FALSE(log::enabled(Level::Warn, "core"));
  log::configure(",,debug,,");
  EXPECT_TRUE(log::enabled(Level::Debug, "core"));
}

TEST_F(LogTest, EmptySpecMeansDefaultInfo) {
  log::configure("error");
  log::configure("");
  EXPECT_TRUE(log::enabled(Level::Info, "core"));
  EXPECT_FALSE(log::enabled(Level::Debug, "core"));
}

TEST_F(LogTest, ReconfigureReplacesOverrides) {
  log::configure("info,net=trace");
  log::configure("info");
  EXPECT_FALSE(log::enabled(Level::Trace, "net"));
}

TEST_F(LogTest, BadLevelThrowsInvalidArgumentNamingTheToken) {
  try {
    log::configure("info,net=loud");
    FAIL() << "configure accepted a bad level";
  } catch (const InvalidArgumentError& e) {
    EXPECT_EQ(e.code(), ErrorCode::InvalidArgument);
    EXPECT_NE(std::string(e.what()).find("loud"), std::string::npos) << e.what();
  }
  EXPECT_THROW(log::configure("verbose"), InvalidArgumentError);
  EXPECT_THROW(log::configure("=debug"), InvalidArgumentError);
}

TEST_F(LogTest, BadSpecLeavesSettingsUnchanged) {
  log::configure("warn,net=debug");
  EXPECT_THROW(log::configure("trace,net=nonsense"), InvalidArgumentError);
  EXPECT_FALSE(log::enabled(Level::Info, "core"));
  EXPECT_TRUE(log::enabled(Level::Debug, "net"));
}

TEST_F(LogTest, WriteGoesToStderrInTheDocumentedFormat) {
  log::configure("info");
  ::testing::internal::CaptureStderr();
  log::warn("net", "peer {} lost after {} ms", "abcd", 250);
  log::debug("net", "suppressed {}", 1);
  std::string out = ::testing::internal::GetCapturedStderr();
  // 2026-11-26T20:41:43.123Z W net[1234] message
  EXPECT_NE(out.find("Z W net["), std::string::npos) << out;
  EXPECT_NE(out.find("] peer abcd lost after 250 ms\n"), std::string::npos) << out;
  EXPECT_EQ(out.find("suppressed"), std::string::npos) << out;
  ASSERT_GE(out.size(), 24u);
  EXPECT_EQ(out[4], '-');
  EXPECT_EQ(out[10], 'T');
  EXPECT_EQ(out[23], 'Z');
}

}  // namespace
}  // namespace meshtrain
