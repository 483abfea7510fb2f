#include <gtest/gtest.h>

#include <cerrno>
#include <cstring>
#include <string>

#include "meshtrain/core.h"

namespace meshtrain {
namespace {

TEST(ErrorTest, CodeNamesAreDistinctAndStable) {
  EXPECT_EQ(error_code_name(ErrorCode::Timeout), "Timeout");
  EXPECT_EQ(error_code_name(ErrorCode::PeerLost), "PeerLost");
  EXPECT_EQ(error_code_name(ErrorCode::Protocol), "Protocol");
  EXPECT_EQ(error_code_name(ErrorCode::Auth), "Auth");
  EXPECT_EQ(error_code_name(ErrorCode::Corrupt), "Corrupt");
  EXPECT_EQ(error_code_name(ErrorCode::InvalidArgument), "InvalidArgument");
  EXPECT_EQ(error_code_name(ErrorCode::Io), "Io");
  EXPECT_EQ(error_code_name(ErrorCode::Cancelled), "Cancelled");
  EXPECT_EQ(error_code_name(ErrorCode::Internal), "Internal");
  EXPECT_EQ(error_code_name(static_cast<ErrorCode>(0)), "Unknown");
  EXPECT_EQ(error_code_name(static_cast<ErrorCode>(999)), "Unknown");
}

TEST(ErrorTest, EachSubclassCarriesItsCodeAndMessage) {
  EXPECT_EQ(TimeoutError("t").code(), ErrorCode::Timeout);
  EXPECT_EQ(ProtocolError("p").code(), ErrorCode::Protocol);
  EXPECT_EQ(AuthError("a").code(), ErrorCode::Auth);
  EXPECT_EQ(CorruptError("c").code(), ErrorCode::Corrupt);
  EXPECT_EQ(InvalidArgumentError("i").code(), ErrorCode::InvalidArgument);
  EXPECT_EQ(IoError("o").code(), ErrorCode::Io);
  EXPECT_EQ(CancelledError("x").code(), ErrorCode::Cancelled);
  EXPECT_EQ(InternalError("n").code(), ErrorCode::Internal);
  EXPECT_STREQ(CorruptError("shard 3 hash mismatch").what(), "shard 3 hash mismatch");
}

TEST(ErrorTest, SubclassesAreCatchableAsErrorAndRuntimeError) {
  try {
    throw AuthError("bad signature from peer");
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::Auth);
    EXPECT_STREQ(e.what(), "bad signature from peer");
  }
  EXPECT_THROW(throw TimeoutError("late"), std::runtime_error);
}

TEST(ErrorTest, PeerLostNamesThePeer) {
  PeerLostError e("0123456789abcdef", "peer 0123456789abcdef closed its connection");
  EXPECT_EQ(e.code(), ErrorCode::PeerLost);
  EXPECT_EQ(e.peer(), "0123456789abcdef");
  EXPECT_STREQ(e.what(), "peer 0123456789abcdef closed its connection");
  try {
    throw e;
  } catch (const Error& base) {
    const auto* lost = dynamic_cast<const PeerLostError*>(&base);
    ASSERT_NE(lost, nullptr);
    EXPECT_EQ(lost->peer(), "0123456789abcdef");
  }
}

TEST(ErrorTest, IoErrorKeepsErrno) {
  EXPECT_EQ(IoError("no errno").errno_value(), 0);
  EXPECT_EQ(IoError("disk full", ENOSPC).errno_value(), ENOSPC);
}

TEST(ErrorTest, ThrowIoErrorIncludesWhatAndStrerror) {
  try {
    throw_io_error("open /nonexistent/shard.0", ENOENT);
    FAIL() << "throw_io_error returned";
  } catch (const IoError& e) {
    EXPECT_EQ(e.code(), ErrorCode::Io);
    EXPECT_EQ(e.errno_value(), ENOENT);
    std::string message = e.what();
    EXPECT_EQ(message, std::string("open /nonexistent/shard.0: ") + std::strerror(ENOENT));
    EXPECT_NE(message.find("/nonexistent/shard.0"), std::string::npos);
  }
}

}  // namespace
}  // namespace meshtrain
