// WanRelay (benchmarks/wan/relay.h): bytes arrive intact and in order, latency is added, the
// link can be cut, many connections work, backpressure bounds the queue, and the standalone
// tool starts, relays and stops on SIGTERM. Timing checks are lower bounds only.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <fstream>
#include <iostream>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#include <gtest/gtest.h>
#include <meshtrain/core.h>

#include "relay.h"
#include "support/child_process.h"
#include "support/pattern.h"
#include "support/temp_dir.h"

namespace {

using meshtrain::wan::RelayOptions;
using meshtrain::wan::WanRelay;
using namespace std::chrono_literals;
using SteadyClock = std::chrono::steady_clock;

constexpr auto kIoTimeout = 30s;  // no test socket call blocks longer than this

void set_timeouts(int fd) {
  timeval tv{};
  tv.tv_sec = std::chrono::duration_cast<std::chrono::seconds>(kIoTimeout).count();
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  ::setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
}

int connect_to(uint16_t port) {
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) throw std::runtime_error("socket failed");
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(port);
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0) {
    int e = errno;
    ::close(fd);
    throw std::runtime_error(std::string("connect failed: ") + std::strerror(e));
  }
  int one = 1;
  ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  set_timeouts(fd);
  return fd;
}

// Sends everything; returns bytes sent before an error (errno kept).
size_t send_all(int fd, const uint8_t* p, size_t n) {
  size_t done = 0;
  while (done < n) {
    ssize_t w = ::send(fd, p + done, n - done, MSG_NOSIGNAL);
    if (w < 0) {
      if (errno == EINTR) continue;
      return done;
    }
    done += static_cast<size_t>(w);
  }
  return done;
}

// Receives exactly n bytes unless EOF/error first; returns bytes received.
size_t recv_all(int fd, uint8_t* p, size_t n) {
  size_t done = 0;
  while (done < n) {
    ssize_t r = ::recv(fd, p + done, n - done, 0);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) return done;
    done += static_cast<size_t>(r);
  }
  return done;
}

// Result of reading until the stream ends.
struct Drained {
  uint64_t bytes = 0;
  int end_errno = 0;  // 0: clean EOF; else the recv errno (ECONNRESET for a cut)
};
Drained drain(int fd) {
  Drained d;
  std::vector<uint8_t> buf(64 * 1024);
  while (true) {
    ssize_t r = ::recv(fd, buf.data(), buf.size(), 0);
    if (r > 0) {
      d.bytes += static_cast<uint64_t>(r);
    } else if (r == 0) {
      return d;
    } else if (errno != EINTR) {
      d.end_errno = errno;
      return d;
    }
  }
}

// A loopback server: each accepted connection runs handler(fd) on its own thread; the fd is
// closed after the handler returns. Joins everything on destruction.
class TestServer {
 public:
  explicit TestServer(std::function<void(int)> handler) : handler_(std::move(handler)) {
    fd_ = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    int one = 1;
    ::setsockopt(fd_, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (::bind(fd_, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0 || ::listen(fd_, 64) != 0) {
      throw std::runtime_error("test server bind/listen failed");
    }
    socklen_t len = sizeof a;
    ::getsockname(fd_, reinterpret_cast<sockaddr*>(&a), &len);
    port_ = ntohs(a.sin_port);
    acceptor_ = std::thread([this] {
      while (!stop_) {
        pollfd p{fd_, POLLIN, 0};
        if (::poll(&p, 1, 50) <= 0) continue;
        int c = ::accept4(fd_, nullptr, nullptr, SOCK_CLOEXEC);
        if (c < 0) continue;
        set_timeouts(c);
        accepted_++;
        std::lock_guard<std::mutex> lock(mu_);
        workers_.emplace_back([this, c] {
          handler_(c);
          ::close(c);
        });
      }
    });
  }
  ~TestServer() {
    stop_ = true;
    acceptor_.join();
    for (auto& t : workers_) t.join();
    ::close(fd_);
  }
  uint16_t port() const { return port_; }
  int accepted() const { return accepted_; }

 private:
  std::function<void(int)> handler_;
  int fd_ = -1;
  uint16_t port_ = 0;
  std::atomic<bool> stop_{false};
  std::atomic<int> accepted_{0};
  std::thread acceptor_;
  std::mutex mu_;
  std::vector<std::thread> workers_;
};

// Echoes until EOF, then half-closes its side.
void echo_handler(int fd) {
  std::vector<uint8_t> buf(64 * 1024);
  while (true) {
    ssize_t r = ::recv(fd, buf.data(), buf.size(), 0);
    if (r <= 0) break;
    if (send_all(fd, buf.data(), static_cast<size_t>(r)) != static_cast<size_t>(r)) break;
  }
  ::shutdown(fd, SHUT_WR);
}

RelayOptions relay_to(uint16_t port) {
  RelayOptions o;
  o.listen_host = "127.0.0.1";
  o.listen_port = 0;
  o.target_host = "127.0.0.1";
  o.target_port = port;
  o.seed = 42;
  return o;
}

std::vector<uint8_t> pattern(size_t n, uint64_t seed) {
  std::vector<uint8_t> v(n);
  meshtrain::test_support::fill_pattern(v, seed);
  return v;
}

// Sends `out` and receives `in_expected.size()` bytes concurrently on fd, then half-closes and
// expects EOF. Returns true when what came back equals in_expected.
void exchange(int fd, const std::vector<uint8_t>& out, const std::vector<uint8_t>& in_expected) {
  std::vector<uint8_t> in(in_expected.size());
  size_t sent = 0;
  std::thread sender([&] {
    sent = send_all(fd, out.data(), out.size());
    ::shutdown(fd, SHUT_WR);
  });
  size_t got = recv_all(fd, in.data(), in.size());
  sender.join();
  EXPECT_EQ(sent, out.size());
  ASSERT_EQ(got, in.size());
  EXPECT_TRUE(in == in_expected) << "bytes differ after the relay";
  uint8_t extra;
  EXPECT_EQ(::recv(fd, &extra, 1, 0), 0) << "expected EOF (half-close) after the payload";
}

TEST(WanRelay, ForwardsEightMiBBothWaysIntactWithJitter) {
  constexpr size_t kBytes = 8u << 20;
  const auto up = pattern(kBytes, 1);
  const auto down = pattern(kBytes, 2);
  std::atomic<int> server_verdict{0};  // 0: pending, 1: ok, 2: bad
  TestServer server([&](int fd) {
    std::vector<uint8_t> in(kBytes);
    size_t sent = 0;
    std::thread sender([&] {
      sent = send_all(fd, down.data(), down.size());
      ::shutdown(fd, SHUT_WR);
    });
    size_t got = recv_all(fd, in.data(), in.size());
    uint8_t extra;
    bool eof = ::recv(fd, &extra, 1, 0) == 0;
    sender.join();
    server_verdict = (got == kBytes && in == up && eof && sent == kBytes) ? 1 : 2;
  });
  auto o = relay_to(server.port());
  o.delay = 5ms;
  o.jitter = 4ms;  // jitter must never reorder bytes
  WanRelay relay(o);
  relay.start();
  ASSERT_NE(relay.port(), 0);

  int fd = connect_to(relay.port());
  exchange(fd, up, down);
  ::close(fd);
  for (int i = 0; i < 3000 && server_verdict == 0; ++i) std::this_thread::sleep_for(10ms);
  relay.stop();
  EXPECT_EQ(server_verdict.load(), 1) << "server did not receive the client's 8 MiB intact followed by EOF";
  EXPECT_EQ(relay.stats().bytes_c2s, kBytes);
  EXPECT_EQ(relay.stats().bytes_s2c, kBytes);
}

TEST(WanRelay, HalfCloseIsPropagated) {
  TestServer server([](int fd) {
    // Read until the client's FIN arrives through the relay, then answer and close.
    Drained d = drain(fd);
    std::string reply = d.end_errno == 0 ? "got " + std::to_string(d.bytes) : "error";
    send_all(fd, reinterpret_cast<const uint8_t*>(reply.data()), reply.size());
  });
  auto o = relay_to(server.port());
  o.delay = 2ms;
  WanRelay relay(o);
  relay.start();
  int fd = connect_to(relay.port());
  const std::string msg = "ping";
  ASSERT_EQ(send_all(fd, reinterpret_cast<const uint8_t*>(msg.data()), msg.size()), msg.size());
  ::shutdown(fd, SHUT_WR);
  std::string reply;
  char buf[64];
  ssize_t r;
  while ((r = ::recv(fd, buf, sizeof buf, 0)) > 0) reply.append(buf, static_cast<size_t>(r));
  EXPECT_EQ(r, 0) << "expected a clean EOF, errno " << std::strerror(errno);
  EXPECT_EQ(reply, "got 4");
  ::close(fd);
}

TEST(WanRelay, DelayAddsAtLeastTwiceTheOneWayLatencyPerRoundTrip) {
  TestServer server(echo_handler);
  auto o = relay_to(server.port());
  o.delay = 50ms;
  WanRelay relay(o);
  relay.start();
  int fd = connect_to(relay.port());
  for (int i = 0; i < 3; ++i) {
    uint8_t b = static_cast<uint8_t>('a' + i), back = 0;
    auto t0 = SteadyClock::now();
    ASSERT_EQ(send_all(fd, &b, 1), 1u);
    ASSERT_EQ(recv_all(fd, &back, 1), 1u);
    auto rtt = SteadyClock::now() - t0;
    EXPECT_EQ(back, b);
    EXPECT_GE(rtt, 100ms) << "round trip " << std::chrono::duration<double, std::milli>(rtt).count()
                          << " ms through a relay adding 50 ms each way";
  }
  ::close(fd);
}

TEST(WanRelay, RateCapPacesTransfers) {
  // 2 MiB at 40 Mbit/s needs at least 0.42 s. Lower bound only.
  constexpr size_t kBytes = 2u << 20;
  std::atomic<uint64_t> received{0};
  TestServer server([&](int fd) { received = drain(fd).bytes; });
  auto o = relay_to(server.port());
  o.rate_mbps = 40;
  WanRelay relay(o);
  relay.start();
  int fd = connect_to(relay.port());
  const auto data = pattern(kBytes, 3);
  auto t0 = SteadyClock::now();
  ASSERT_EQ(send_all(fd, data.data(), data.size()), kBytes);
  ::shutdown(fd, SHUT_WR);
  uint8_t b;
  EXPECT_EQ(::recv(fd, &b, 1, 0), 0);  // the server closes after draining everything
  auto elapsed = SteadyClock::now() - t0;
  EXPECT_EQ(received.load(), kBytes);
  EXPECT_GE(elapsed, 400ms) << std::chrono::duration<double>(elapsed).count() << " s for 2 MiB at 40 Mbit/s";
  ::close(fd);
}

TEST(WanRelay, CutAfterBytesResetsBothSides) {
  constexpr uint64_t kCut = 100000;
  std::atomic<uint64_t> server_bytes{UINT64_MAX};
  std::atomic<int> server_errno{-1};
  TestServer server([&](int fd) {
    Drained d = drain(fd);
    server_bytes = d.bytes;
    server_errno = d.end_errno;
  });
  auto o = relay_to(server.port());
  o.delay = 2ms;
  o.cut_after_bytes = kCut;
  WanRelay relay(o);
  relay.start();
  int fd = connect_to(relay.port());
  const auto data = pattern(1u << 20, 4);
  size_t sent = send_all(fd, data.data(), data.size());  // may stop early with EPIPE/ECONNRESET
  (void)sent;
  Drained client = drain(fd);  // the client must see the end of the stream, not hang
  EXPECT_EQ(client.bytes, 0u);
  EXPECT_TRUE(client.end_errno == 0 || client.end_errno == ECONNRESET)
      << "client: " << std::strerror(client.end_errno);
  ::close(fd);
  for (int i = 0; i < 500 && server_bytes == UINT64_MAX; ++i) std::this_thread::sleep_for(10ms);
  EXPECT_LE(server_bytes.load(), kCut);
  EXPECT_TRUE(server_errno == 0 || server_errno == ECONNRESET) << "server: " << std::strerror(server_errno);
  EXPECT_EQ(relay.stats().bytes_c2s, kCut);
  EXPECT_EQ(relay.stats().cut, 1u);
  std::cout << "cut: server got " << server_bytes.load() << " of " << kCut << " bytes, then "
            << (server_errno == 0 ? "EOF" : std::strerror(server_errno)) << "\n";
}

TEST(WanRelay, EightConcurrentConnections) {
  constexpr int kConns = 8;
  constexpr size_t kBytes = 512 * 1024;
  TestServer server(echo_handler);
  auto o = relay_to(server.port());
  o.delay = 10ms;
  o.jitter = 2ms;
  WanRelay relay(o);
  relay.start();
  std::vector<std::thread> clients;
  std::atomic<int> ok{0};
  for (int i = 0; i < kConns; ++i) {
    clients.emplace_back([&, i] {
      const auto data = pattern(kBytes, 100 + static_cast<uint64_t>(i));
      int fd = connect_to(relay.port());
      std::vector<uint8_t> back(kBytes);
      std::thread sender([&] {
        send_all(fd, data.data(), data.size());
        ::shutdown(fd, SHUT_WR);
      });
      size_t got = recv_all(fd, back.data(), back.size());
      sender.join();
      uint8_t extra;
      bool eof = ::recv(fd, &extra, 1, 0) == 0;
      ::close(fd);
      if (got == kBytes && back == data && eof) ok++;
    });
  }
  for (auto& t : clients) t.join();
  EXPECT_EQ(ok.load(), kConns);
  EXPECT_EQ(server.accepted(), kConns);
  EXPECT_EQ(relay.stats().accepted, static_cast<uint64_t>(kConns));
  EXPECT_EQ(relay.stats().bytes_c2s, kConns * kBytes);
}

TEST(WanRelay, BackpressureBoundsWhatASenderCanPushIntoASlowReader) {
  // The server reads nothing for a while. With a 1 MiB relay queue, the client can only fill
  // the queue plus the kernel socket buffers on the way before its sends stop; without
  // backpressure it could push all 128 MiB into relay memory.
  constexpr size_t kTotal = 128u << 20;
  constexpr size_t kCap = 1u << 20;
  std::atomic<bool> start_reading{false};
  std::atomic<uint64_t> received{0};
  TestServer server([&](int fd) {
    while (!start_reading) std::this_thread::sleep_for(5ms);
    received = drain(fd).bytes;
  });
  auto o = relay_to(server.port());
  o.max_queued_bytes = kCap;
  WanRelay relay(o);
  relay.start();
  int fd = connect_to(relay.port());
  std::vector<uint8_t> block(1u << 20, 0xab);
  std::atomic<uint64_t> pushed{0};
  std::thread sender([&] {
    for (size_t i = 0; i < kTotal / block.size(); ++i) {
      size_t n = send_all(fd, block.data(), block.size());
      pushed += n;
      if (n != block.size()) break;
    }
    ::shutdown(fd, SHUT_WR);
  });
  std::this_thread::sleep_for(1500ms);
  uint64_t stalled_at = pushed.load();
  EXPECT_LT(stalled_at, uint64_t{96} << 20) << "the sender was never slowed down by the relay";
  // One read (64 KiB) may land on top of a queue just under the cap.
  EXPECT_LE(relay.stats().peak_queued, kCap + 64 * 1024);
  start_reading = true;
  sender.join();
  uint8_t b;
  EXPECT_EQ(::recv(fd, &b, 1, 0), 0);
  ::close(fd);
  for (int i = 0; i < 500 && received.load() != kTotal; ++i) std::this_thread::sleep_for(10ms);
  EXPECT_EQ(received.load(), kTotal);
  std::cout << "backpressure: sender stalled after " << (stalled_at >> 20) << " MiB\n";
}

TEST(WanRelay, MaxConnectionsRefusesTheExtraConnection) {
  TestServer server(echo_handler);
  auto o = relay_to(server.port());
  o.max_connections = 1;
  WanRelay relay(o);
  relay.start();
  int first = connect_to(relay.port());
  uint8_t b = 'x', back = 0;
  ASSERT_EQ(send_all(first, &b, 1), 1u);
  ASSERT_EQ(recv_all(first, &back, 1), 1u);  // the first connection is live
  int second = connect_to(relay.port());
  Drained d = drain(second);
  EXPECT_EQ(d.bytes, 0u);
  EXPECT_TRUE(d.end_errno == 0 || d.end_errno == ECONNRESET) << std::strerror(d.end_errno);
  ::close(second);
  ::close(first);
  EXPECT_EQ(relay.stats().refused, 1u);
}

TEST(WanRelay, StopResetsOpenConnections) {
  TestServer server(echo_handler);
  WanRelay relay(relay_to(server.port()));
  relay.start();
  int fd = connect_to(relay.port());
  uint8_t b = 'x', back = 0;
  ASSERT_EQ(send_all(fd, &b, 1), 1u);
  ASSERT_EQ(recv_all(fd, &back, 1), 1u);
  relay.stop();
  Drained d = drain(fd);
  EXPECT_TRUE(d.end_errno == 0 || d.end_errno == ECONNRESET) << std::strerror(d.end_errno);
  ::close(fd);
  EXPECT_EQ(relay.stats().active, 0u);
}

TEST(WanRelay, UnreachableTargetResetsTheClient) {
  // Find a port nobody listens on: bind, read the port, close.
  int probe = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(::bind(probe, reinterpret_cast<sockaddr*>(&a), sizeof a), 0);
  socklen_t len = sizeof a;
  ::getsockname(probe, reinterpret_cast<sockaddr*>(&a), &len);
  ::close(probe);
  WanRelay relay(relay_to(ntohs(a.sin_port)));
  relay.start();
  int fd = connect_to(relay.port());
  Drained d = drain(fd);
  EXPECT_EQ(d.bytes, 0u);
  EXPECT_TRUE(d.end_errno == 0 || d.end_errno == ECONNRESET) << std::strerror(d.end_errno);
  ::close(fd);
  for (int i = 0; i < 200 && relay.stats().refused == 0; ++i) std::this_thread::sleep_for(10ms);
  EXPECT_EQ(relay.stats().refused, 1u);
}

TEST(WanRelay, ParseHostPort) {
  using meshtrain::wan::parse_host_port;
  EXPECT_EQ(parse_host_port("127.0.0.1:80"), std::make_pair(std::string("127.0.0.1"), uint16_t{80}));
  EXPECT_EQ(parse_host_port("[::1]:0"), std::make_pair(std::string("::1"), uint16_t{0}));
  EXPECT_THROW(parse_host_port("localhost"), meshtrain::InvalidArgumentError);
  EXPECT_THROW(parse_host_port("host:70000"), meshtrain::InvalidArgumentError);
  EXPECT_THROW(parse_host_port(":80"), meshtrain::InvalidArgumentError);
  EXPECT_THROW(parse_host_port("h:8x"), meshtrain::InvalidArgumentError);
}

TEST(WanRelayTool, RelaysWithPortFileAndStopsOnSigterm) {
  TestServer server(echo_handler);
  meshtrain::test_support::TempDir dir;
  const std::string port_file = (dir / "port").string();
  meshtrain::test_support::ChildProcess tool({WAN_RELAY_BINARY, "--listen", "127.0.0.1:0", "--target",
                                              "127.0.0.1:" + std::to_string(server.port()), "--delay-ms",
                                              "20", "--port-file", port_file});
  uint16_t port = 0;
  for (int i = 0; i < 1000 && port == 0; ++i) {
    std::ifstream in(port_file);
    unsigned p = 0;
    if (in >> p) port = static_cast<uint16_t>(p);
    else std::this_thread::sleep_for(10ms);
    ASSERT_FALSE(tool.wait(0ms).has_value()) << "the relay exited early";
  }
  ASSERT_NE(port, 0) << "no port file after 10 s";
  int fd = connect_to(port);
  const auto data = pattern(1u << 20, 7);
  auto t0 = SteadyClock::now();
  exchange(fd, data, data);
  EXPECT_GE(SteadyClock::now() - t0, 40ms);
  ::close(fd);
  tool.signal(SIGTERM);
  auto rc = tool.wait(10s);
  ASSERT_TRUE(rc.has_value()) << "the relay did not stop within 10 s of SIGTERM";
  EXPECT_EQ(*rc, 0);
}

TEST(WanRelayTool, BadArgumentsExitWithStatus2) {
  meshtrain::test_support::ChildProcess tool({WAN_RELAY_BINARY, "--listen", "127.0.0.1:0", "--delay-ms", "-3"});
  auto rc = tool.wait(10s);
  ASSERT_TRUE(rc.has_value());
  EXPECT_EQ(*rc, 2);
}

}  // namespace
