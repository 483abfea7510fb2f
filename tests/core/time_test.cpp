#include <gtest/gtest.h>
#include <poll.h>

#include <chrono>
#include <climits>
#include <string>
#include <thread>

#include "meshtrain/core.h"

namespace meshtrain {
namespace {

using namespace std::chrono_literals;

TEST(DeadlineTest, NeverIsMinusOneAndNeverExpires) {
  Deadline d = Deadline::never();
  EXPECT_TRUE(d.is_never());
  EXPECT_FALSE(d.expired());
  EXPECT_EQ(d.remaining_ms(), -1);
}

TEST(DeadlineTest, FutureDeadlineRemainingIsPositiveAndBounded) {
  Deadline d = Deadline::after(5000ms);
  EXPECT_FALSE(d.is_never());
  EXPECT_FALSE(d.expired());
  int left = d.remaining_ms();
  EXPECT_GT(left, 4000);
  // Rounded up by at most one millisecond, so a wait never ends just short of the deadline.
  EXPECT_LE(left, 5001);
}

TEST(DeadlineTest, PastDeadlineIsZeroNotNegative) {
  Deadline d = Deadline::after(-50ms);
  EXPECT_TRUE(d.expired());
  EXPECT_EQ(d.remaining_ms(), 0);
  Deadline now(Clock::now());
  EXPECT_TRUE(now.expired());
  EXPECT_EQ(now.remaining_ms(), 0);
}

TEST(DeadlineTest, ShortDeadlineExpires) {
  Deadline d = Deadline::after(20ms);
  std::this_thread::sleep_for(40ms);
  EXPECT_TRUE(d.expired());
  EXPECT_EQ(d.remaining_ms(), 0);
}

TEST(DeadlineTest, HugeFiniteDeadlineClampsToIntMax) {
  Deadline d = Deadline::after(std::chrono::hours(24 * 365 * 100));
  EXPECT_FALSE(d.is_never());
  EXPECT_EQ(d.remaining_ms(), INT_MAX);
}

TEST(DeadlineTest, AtReturnsTheTimePoint) {
  auto at = Clock::now() + 1s;
  EXPECT_EQ(Deadline(at).at(), at);
}

bool readable(int fd, int timeout_ms) {
  pollfd p{fd, POLLIN, 0};
  int n = ::poll(&p, 1, timeout_ms);
  return n == 1 && (p.revents & POLLIN);
}

TEST(CancelTokenTest, FreshTokenIsNotCancelledAndFdNotReadable) {
  CancelToken token;
  EXPECT_FALSE(token.cancelled());
  EXPECT_GE(token.fd(), 0);
  EXPECT_FALSE(readable(token.fd(), 0));
  EXPECT_NO_THROW(token.throw_if_cancelled("all-reduce"));
}

TEST(CancelTokenTest, CancelMakesFdReadableAndStaysSo) {
  CancelToken token;
  token.cancel();
  EXPECT_TRUE(token.cancelled());
  EXPECT_TRUE(readable(token.fd(), 0));
  // Readable for every later waiter too: cancelling is permanent.
  EXPECT_TRUE(readable(token.fd(), 0));
  token.cancel();  // idempotent
  EXPECT_TRUE(token.cancelled());
  EXPECT_TRUE(readable(token.fd(), 0));
}

TEST(CancelTokenTest, CancelWakesABlockedPoll) {
  CancelToken token;
  std::thread canceller([&] {
    std::this_thread::sleep_for(30ms);
    token.cancel();
  });
  auto start = Clock::now();
  bool woke = readable(token.fd(), 10000);
  auto waited = Clock::now() - start;
  canceller.join();
  EXPECT_TRUE(woke);
  EXPECT_LT(waited, 5s);
}

TEST(CancelTokenTest, ThrowIfCancelledThrowsCancelledErrorNamingTheOperation) {
  CancelToken token;
  token.cancel();
  try {
    token.throw_if_cancelled("all-reduce step 7");
    FAIL() << "throw_if_cancelled did not throw";
  } catch (const CancelledError& e) {
    EXPECT_EQ(e.code(), ErrorCode::Cancelled);
    EXPECT_EQ(std::string(e.what()), "all-reduce step 7 cancelled");
  }
}

TEST(CancelTokenTest, TokensAreIndependent) {
  CancelToken a;
  CancelToken b;
  EXPECT_NE(a.fd(), b.fd());
  a.cancel();
  EXPECT_FALSE(b.cancelled());
  EXPECT_FALSE(readable(b.fd(), 0));
}

}  // namespace
}  // namespace meshtrain
