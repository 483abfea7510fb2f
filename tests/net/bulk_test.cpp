// The bulk path in one process: real TCP sockets on loopback, sender on a thread.
#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <future>
#include <thread>

#include "meshtrain/net.h"
#include "support/pattern.h"

using namespace meshtrain;
using namespace meshtrain::net;
using namespace std::chrono_literals;

namespace {

struct Pair {
  crypto::Identity a = crypto::Identity::generate();
  crypto::Identity b = crypto::Identity::generate();
};

struct BulkCase {
  BulkSecurity security;
  crypto::AeadAlgorithm aead;
  uint32_t streams;
  size_t bytes;
};

std::string case_name(const ::testing::TestParamInfo<BulkCase>& info) {
  const auto& c = info.param;
  std::string sec = c.security == BulkSecurity::Plain ? "plain"
                    : c.aead == crypto::AeadAlgorithm::Aes256Gcm ? "aes" : "chacha";
  return sec + "_" + std::to_string(c.streams) + "streams_" + std::to_string(c.bytes) + "bytes";
}

class BulkRoundTrip : public ::testing::TestWithParam<BulkCase> {};

// Connects a raw TCP socket to 127.0.0.1:port.
int raw_connect(uint16_t port) {
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(port);
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  EXPECT_EQ(::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0);
  return fd;
}

// A TCP relay between a client and `target_port` that can alter the client->server bytes.
class Relay {
 public:
  Relay(uint16_t target_port, std::function<void(uint64_t offset, std::vector<uint8_t>&)> alter)
      : alter_(std::move(alter)) {
    listen_fd_ = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    ::bind(listen_fd_, reinterpret_cast<sockaddr*>(&addr), sizeof addr);
    ::listen(listen_fd_, 4);
    socklen_t len = sizeof addr;
    ::getsockname(listen_fd_, reinterpret_cast<sockaddr*>(&addr), &len);
    port_ = ntohs(addr.sin_port);
    thread_ = std::thread([this, target_port] {
      int client = ::accept(listen_fd_, nullptr, nullptr);
      int server = raw_connect(target_port);
      std::thread back([&] { pump(server, client, false); });
      pump(client, server, true);
      back.join();
      ::close(client);
      ::close(server);
    });
  }
  ~Relay() {
    ::shutdown(listen_fd_, SHUT_RDWR);
    thread_.join();
    ::close(listen_fd_);
  }
  uint16_t port() const { return port_; }

 private:
  void pump(int from, int to, bool forward) {
    std::vector<uint8_t> buf(64 << 10);
    uint64_t offset = 0;
    for (;;) {
      ssize_t n = ::recv(from, buf.data(), buf.size(), 0);
      if (n <= 0) break;
      std::vector<uint8_t> chunk(buf.begin(), buf.begin() + n);
      if (forward) alter_(offset, chunk);
      offset += n;
      if (::send(to, chunk.data(), chunk.size(), MSG_NOSIGNAL) < 0) break;
    }
    ::shutdown(to, SHUT_WR);
  }
  std::function<void(uint64_t, std::vector<uint8_t>&)> alter_;
  int listen_fd_;
  uint16_t port_;
  std::thread thread_;
};

}  // namespace

TEST_P(BulkRoundTrip, PayloadArrivesIntact) {
  const BulkCase c = GetParam();
  Pair p;
  BulkOptions options;
  options.security = c.security;
  options.aead = c.aead;
  options.record_bytes = 64 << 10;  // several records even for mid-size payloads
  BulkListener listener(p.b, {p.a.public_key()}, "127.0.0.1", 0, options);
  std::vector<uint8_t> payload(c.bytes);
  test_support::fill_pattern(payload, c.bytes + 1);

  auto sender = std::async(std::launch::async, [&] {
    auto channel = BulkChannel::connect(p.a, p.b.public_key(), "127.0.0.1", listener.port(), c.streams, options,
                                        Deadline::after(5s));
    MessageHeader h;
    h.type = 999;
    h.quorum_id = 3;
    h.step = 4;
    h.op_seq = 5;
    h.tag = 6;
    channel.send(h, payload, Deadline::after(20s));
    channel.send(h, payload, Deadline::after(20s));
  });
  auto channel = BulkChannel::accept(listener, p.a.public_key(), c.streams, Deadline::after(5s));
  EXPECT_EQ(channel.stream_count(), c.streams);
  Message m = channel.recv(Deadline::after(20s));
  EXPECT_EQ(m.header.sender, p.a.public_key());
  EXPECT_EQ(m.header.type, 999);
  EXPECT_EQ(m.header.quorum_id, 3u);
  EXPECT_EQ(m.header.step, 4u);
  EXPECT_EQ(m.header.op_seq, 5u);
  EXPECT_EQ(m.header.tag, 6u);
  EXPECT_EQ(m.payload, payload);
  std::vector<uint8_t> into(c.bytes);
  channel.recv_into(into, Deadline::after(20s));
  EXPECT_EQ(into, payload);
  sender.get();
}

INSTANTIATE_TEST_SUITE_P(
    Sizes, BulkRoundTrip,
    ::testing::Values(BulkCase{BulkSecurity::Encrypted, crypto::AeadAlgorithm::Aes256Gcm, 1, 0},
                      BulkCase{BulkSecurity::Encrypted, crypto::AeadAlgorithm::Aes256Gcm, 1, 1},
                      BulkCase{BulkSecurity::Encrypted, crypto::AeadAlgorithm::Aes256Gcm, 1, 65537},
                      BulkCase{BulkSecurity::Encrypted, crypto::AeadAlgorithm::Aes256Gcm, 4, 1000},
                      BulkCase{BulkSecurity::Encrypted, crypto::AeadAlgorithm::Aes256Gcm, 4, (3 << 20) + 7},
                      BulkCase{BulkSecurity::Encrypted, crypto::AeadAlgorithm::ChaCha20Poly1305, 3, (1 << 20) + 3},
                      BulkCase{BulkSecurity::Plain, crypto::AeadAlgorithm::Aes256Gcm, 1, 0},
                      BulkCase{BulkSecurity::Plain, crypto::AeadAlgorithm::Aes256Gcm, 1, 4097},
                      BulkCase{BulkSecurity::Plain, crypto::AeadAlgorithm::Aes256Gcm, 4, (2 << 20) + 1}),
    case_name);

TEST(Bulk, RecvPlacedLandsOnlyTheChosenMessagesInPlace) {
  Pair p;
  BulkListener listener(p.b, {p.a.public_key()}, "127.0.0.1", 0);
  std::vector<uint8_t> wanted(BulkChannel::kMinSplitBytes + 12345), other(777);  // split over 2 streams / not
  test_support::fill_pattern(wanted, 1);
  test_support::fill_pattern(other, 2);
  auto sender = std::async(std::launch::async, [&] {
    auto channel = BulkChannel::connect(p.a, p.b.public_key(), "127.0.0.1", listener.port(), 2, {}, Deadline::after(5s));
    MessageHeader h;
    h.tag = 7;
    channel.send(h, other, Deadline::after(20s));
    h.tag = 6;
    channel.send(h, wanted, Deadline::after(20s));
    channel.send(h, wanted, Deadline::after(20s));
  });
  auto channel = BulkChannel::accept(listener, p.a.public_key(), 2, Deadline::after(5s));
  std::vector<uint8_t> in_place(wanted.size(), 0), fallback;
  const BulkChannel::PlaceFn place = [&](const MessageHeader& h) -> std::optional<crypto::MutableByteSpan> {
    if (h.tag != 6) return std::nullopt;
    return crypto::MutableByteSpan(in_place);
  };
  // Tag 7 is not wanted: it goes to the fallback and the destination stays untouched.
  EXPECT_EQ(channel.recv_placed(place, fallback, Deadline::after(20s)).tag, 7u);
  EXPECT_EQ(fallback, other);
  EXPECT_EQ(in_place, std::vector<uint8_t>(wanted.size(), 0));
  EXPECT_EQ(channel.recv_placed(place, fallback, Deadline::after(20s)).tag, 6u);
  EXPECT_EQ(in_place, wanted);
  EXPECT_EQ(fallback, other);
  // A destination of the wrong size is the caller's error, named, and the stream is given up.
  std::vector<uint8_t> small(10);
  const BulkChannel::PlaceFn wrong = [&](const MessageHeader&) -> std::optional<crypto::MutableByteSpan> {
    return crypto::MutableByteSpan(small);
  };
  try {
    channel.recv_placed(wrong, fallback, Deadline::after(20s));
    ADD_FAILURE() << "a 10-byte destination for a larger message was accepted";
  } catch (const InvalidArgumentError& e) {
    EXPECT_NE(std::string(e.what()).find("10-byte destination"), std::string::npos) << e.what();
  }
  sender.get();
}

// An unexpected message larger than the caller accepts is refused from its header: nothing is
// allocated for it (a peer could otherwise make the receiver allocate up to 4 GiB per frame).
TEST(Bulk, RecvPlacedRefusesAnOversizedUnexpectedMessageUnread) {
  Pair p;
  BulkListener listener(p.b, {p.a.public_key()}, "127.0.0.1", 0);
  std::vector<uint8_t> small(100), large(3 << 20);
  auto sender = std::async(std::launch::async, [&] {
    auto channel = BulkChannel::connect(p.a, p.b.public_key(), "127.0.0.1", listener.port(), 1, {}, Deadline::after(5s));
    MessageHeader h;
    h.tag = 9;
    channel.send(h, small, Deadline::after(20s));
    try {
      channel.send(h, large, Deadline::after(20s));
    } catch (const Error&) {
      // The receiver closed the stream rather than read it.
    }
  });
  auto channel = BulkChannel::accept(listener, p.a.public_key(), 1, Deadline::after(5s));
  const BulkChannel::PlaceFn nowhere = [](const MessageHeader&) { return std::nullopt; };
  std::vector<uint8_t> fallback;
  EXPECT_EQ(channel.recv_placed(nowhere, fallback, Deadline::after(20s), nullptr, 1 << 20).tag, 9u);
  EXPECT_EQ(fallback.size(), 100u);  // within the limit: read
  try {
    channel.recv_placed(nowhere, fallback, Deadline::after(20s), nullptr, 1 << 20);
    ADD_FAILURE() << "a 3 MiB message was read into the fallback";
  } catch (const ProtocolError& e) {
    EXPECT_NE(std::string(e.what()).find("unexpected 3145728-byte message"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("at most 1048576 bytes"), std::string::npos) << e.what();
  }
  EXPECT_LE(fallback.capacity(), 100u) << "the refused message was allocated for";
  sender.get();
}

TEST(Bulk, WrongServerIdentityRefusedByBothSides) {
  Pair p;
  auto other = crypto::Identity::generate();
  BulkListener listener(p.b, {p.a.public_key()}, "127.0.0.1", 0);
  auto server = std::async(std::launch::async, [&] {
    EXPECT_THROW(listener.accept(Deadline::after(1500ms)), TimeoutError);
  });
  // The client expects `other` at this address; the listener is b.
  EXPECT_THROW(BulkStream::connect(p.a, other.public_key(), "127.0.0.1", listener.port(), {}, Deadline::after(3s)),
               Error);
  server.get();
  EXPECT_EQ(listener.stats().refused_identity, 1u);
}

TEST(Bulk, UnlistedClientRefused) {
  Pair p;
  auto stranger = crypto::Identity::generate();
  BulkListener listener(p.b, {p.a.public_key()}, "127.0.0.1", 0);
  auto server = std::async(std::launch::async, [&] {
    EXPECT_THROW(listener.accept(Deadline::after(1500ms)), TimeoutError);
  });
  EXPECT_THROW(BulkStream::connect(stranger, p.b.public_key(), "127.0.0.1", listener.port(), {}, Deadline::after(3s)),
               Error);
  server.get();
  EXPECT_EQ(listener.stats().refused_identity, 1u);
}

TEST(Bulk, PlainClientCannotTalkToEncryptedListener) {
  Pair p;
  BulkListener listener(p.b, {p.a.public_key()}, "127.0.0.1", 0);
  auto server = std::async(std::launch::async, [&] {
    EXPECT_THROW(listener.accept(Deadline::after(1500ms)), TimeoutError);
  });
  BulkOptions plain;
  plain.security = BulkSecurity::Plain;
  EXPECT_THROW(BulkStream::connect(p.a, p.b.public_key(), "127.0.0.1", listener.port(), plain, Deadline::after(3s)),
               Error);
  server.get();
  EXPECT_EQ(listener.stats().refused_identity, 1u);
}

TEST(Bulk, TamperedByteFailsTheTag) {
  Pair p;
  BulkListener listener(p.b, {p.a.public_key()}, "127.0.0.1", 0);
  // Flip one byte well past the handshake (~300 bytes), inside the payload records.
  Relay relay(listener.port(), [](uint64_t offset, std::vector<uint8_t>& chunk) {
    const uint64_t target = 5000;
    if (offset <= target && target < offset + chunk.size()) chunk[target - offset] ^= 0x01;
  });
  std::vector<uint8_t> payload(100000, 0x5a);
  auto sender = std::async(std::launch::async, [&] {
    auto s = BulkStream::connect(p.a, p.b.public_key(), "127.0.0.1", relay.port(), {}, Deadline::after(5s));
    try {
      s.send({}, payload, Deadline::after(5s));
    } catch (const Error&) {
    }
  });
  auto s = listener.accept(Deadline::after(5s));
  EXPECT_THROW(s.recv(Deadline::after(5s)), CorruptError);
  // The stream cannot be trusted after a failed tag.
  EXPECT_THROW(s.recv(Deadline::after(1s)), ProtocolError);
  sender.get();
}

TEST(Bulk, ReplayedSessionIsRejected) {
  Pair p;
  BulkListener listener(p.b, {p.a.public_key()}, "127.0.0.1", 0);
  // Record everything the client sends in a first session...
  std::vector<uint8_t> recorded;
  std::mutex recorded_mutex;
  {
    Relay relay(listener.port(), [&](uint64_t, std::vector<uint8_t>& chunk) {
      std::lock_guard lock(recorded_mutex);
      recorded.insert(recorded.end(), chunk.begin(), chunk.end());
    });
    auto sender = std::async(std::launch::async, [&] {
      auto s = BulkStream::connect(p.a, p.b.public_key(), "127.0.0.1", relay.port(), {}, Deadline::after(5s));
      std::vector<uint8_t> payload(5000, 1);
      s.send({}, payload, Deadline::after(5s));
      s.recv(Deadline::after(5s));  // wait for the ack so the relay saw everything
    });
    auto s = listener.accept(Deadline::after(5s));
    EXPECT_EQ(s.recv(Deadline::after(5s)).payload.size(), 5000u);
    s.send({}, {}, Deadline::after(5s));
    sender.get();
  }
  // ...and replay it verbatim. The listener's fresh ephemeral key gives new session keys, so
  // the recorded records fail their tags (the replayed signed hello itself is accepted).
  int fd = raw_connect(listener.port());
  {
    std::lock_guard lock(recorded_mutex);
    ASSERT_EQ(::send(fd, recorded.data(), recorded.size(), MSG_NOSIGNAL), static_cast<ssize_t>(recorded.size()));
  }
  auto s = listener.accept(Deadline::after(5s));
  EXPECT_THROW(s.recv(Deadline::after(5s)), CorruptError);
  ::close(fd);
}

TEST(Bulk, GarbageAndOversizedHandshakesDoNotStopTheListener) {
  Pair p;
  BulkListener listener(p.b, {p.a.public_key()}, "127.0.0.1", 0);
  int garbage = raw_connect(listener.port());
  // A plausible length (16) followed by bytes that are no Cap'n Proto message.
  uint8_t noise[20] = {16, 0, 0, 0};
  std::memset(noise + 4, 0xab, 16);
  ::send(garbage, noise, sizeof noise, 0);
  int oversized = raw_connect(listener.port());
  uint8_t huge_length[4] = {0xff, 0xff, 0xff, 0x7f};
  ::send(oversized, huge_length, 4, 0);
  auto sender = std::async(std::launch::async, [&] {
    auto s = BulkStream::connect(p.a, p.b.public_key(), "127.0.0.1", listener.port(), {}, Deadline::after(5s));
    uint8_t hello[3] = {1, 2, 3};
    s.send({}, hello, Deadline::after(5s));
  });
  auto s = listener.accept(Deadline::after(5s));
  EXPECT_EQ(s.recv(Deadline::after(5s)).payload, std::vector<uint8_t>({1, 2, 3}));
  sender.get();
  EXPECT_EQ(listener.stats().oversized, 1u);
  EXPECT_EQ(listener.stats().malformed, 1u);
  ::close(garbage);
  ::close(oversized);
}

TEST(Bulk, ReceiveHonoursDeadlineAndCancel) {
  Pair p;
  BulkOptions options;
  options.peer_timeout = 60s;  // the peer is alive but quiet: only the deadline/cancel end the wait
  BulkListener listener(p.b, {p.a.public_key()}, "127.0.0.1", 0, options);
  auto client_future = std::async(std::launch::async, [&] {
    return BulkStream::connect(p.a, p.b.public_key(), "127.0.0.1", listener.port(), options, Deadline::after(5s));
  });
  auto s = listener.accept(Deadline::after(5s));
  auto client = client_future.get();
  auto start = Clock::now();
  EXPECT_THROW(s.recv(Deadline::after(200ms)), TimeoutError);
  EXPECT_LT(Clock::now() - start, 5s);

  CancelToken cancel;
  std::thread canceller([&] {
    std::this_thread::sleep_for(100ms);
    cancel.cancel();
  });
  EXPECT_THROW(s.recv(Deadline::never(), &cancel), CancelledError);
  canceller.join();
}
