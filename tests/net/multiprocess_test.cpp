// Two real processes: this test and tests/net/net_peer, over TCP loopback.
#include <gtest/gtest.h>
#include <signal.h>

#include <future>

#include "meshtrain/net.h"
#include "support/child_process.h"
#include "support/pattern.h"
#include "support/temp_dir.h"

using namespace meshtrain;
using namespace meshtrain::net;
using namespace meshtrain::test_support;
using namespace std::chrono_literals;

namespace {

struct Keys {
  TempDir dir;
  crypto::Identity self = crypto::Identity::generate();
  crypto::Identity child = crypto::Identity::generate();
  std::string child_pem = (dir / "child.pem").string();
  Keys() { child.save_pem(child_pem); }
};

std::vector<std::string> bulk_send_args(const Keys& k, uint16_t port, uint64_t bytes, uint64_t seed,
                                        uint32_t streams, bool plain) {
  std::vector<std::string> a = {NET_PEER_BINARY, "bulk-send", "--key", k.child_pem, "--peer", k.self.public_key().hex(),
                                "--port", std::to_string(port), "--bytes", std::to_string(bytes), "--seed",
                                std::to_string(seed), "--streams", std::to_string(streams)};
  if (plain) a.push_back("--plain");
  return a;
}

crypto::Digest expected_digest(uint64_t bytes, uint64_t seed) {
  std::vector<uint8_t> payload(bytes);
  fill_pattern(payload, seed);
  return crypto::sha256(payload);
}

void receive_and_verify(bool plain, uint32_t streams) {
  Keys k;
  const uint64_t bytes = 256ull << 20;
  const uint64_t seed = 1234 + streams;
  BulkOptions options;
  if (plain) options.security = BulkSecurity::Plain;
  BulkListener listener(k.self, {k.child.public_key()}, "127.0.0.1", 0, options);
  ChildProcess child(bulk_send_args(k, listener.port(), bytes, seed, streams, plain));
  auto expected = std::async(std::launch::async, [&] { return expected_digest(bytes, seed); });
  auto channel = BulkChannel::accept(listener, k.child.public_key(), streams, Deadline::after(20s));
  std::vector<uint8_t> payload(bytes);
  MessageHeader h = channel.recv_into(payload, Deadline::after(120s));
  EXPECT_EQ(h.step, 7u);
  EXPECT_EQ(crypto::to_hex(crypto::sha256(payload)), crypto::to_hex(expected.get()));
  MessageHeader ack;
  ack.step = 7;
  channel.send(ack, {}, Deadline::after(5s));
  EXPECT_EQ(child.wait(30s), 0);
}

}  // namespace

TEST(MultiProcess, Bulk256MiBEncryptedOneStream) { receive_and_verify(false, 1); }
TEST(MultiProcess, Bulk256MiBEncryptedFourStreams) { receive_and_verify(false, 4); }
TEST(MultiProcess, Bulk256MiBPlainFourStreams) { receive_and_verify(true, 4); }

TEST(MultiProcess, ControlMessagesOneKiB) {
  Keys k;
  ControlServer server(k.self, {k.child.public_key()}, "tcp://127.0.0.1:0");
  const int count = 50;
  ChildProcess child({NET_PEER_BINARY, "control-echo", "--key", k.child_pem, "--server", k.self.public_key().hex(),
                      "--endpoint", server.endpoint(), "--count", std::to_string(count)});
  auto hello = server.recv(Deadline::after(20s));
  ASSERT_TRUE(hello);
  EXPECT_EQ(hello->header.type, static_cast<uint16_t>(MessageType::Hello));
  EXPECT_EQ(hello->header.sender, k.child.public_key());
  for (int i = 0; i < count; ++i) {
    std::vector<uint8_t> payload(1024);
    fill_pattern(payload, i);
    MessageHeader h;
    h.type = kFirstUserMessageType;
    h.op_seq = i;
    server.send(k.child.public_key(), h, payload);
    auto echo = server.recv(Deadline::after(10s));
    ASSERT_TRUE(echo) << "no echo for message " << i;
    EXPECT_EQ(echo->header.op_seq, static_cast<uint64_t>(i));
    EXPECT_EQ(echo->payload, payload);
  }
  EXPECT_EQ(child.wait(10s), 0);
}

TEST(MultiProcess, ControlRefusesUnlistedKey) {
  Keys k;
  ControlServer server(k.self, {}, "tcp://127.0.0.1:0");
  ChildProcess child({NET_PEER_BINARY, "control-echo", "--key", k.child_pem, "--server", k.self.public_key().hex(),
                      "--endpoint", server.endpoint(), "--count", "1", "--timeout-ms", "1500"});
  EXPECT_FALSE(server.recv(Deadline::after(2500ms)).has_value());
  EXPECT_EQ(child.wait(10s), 3);  // the child timed out waiting: nothing got through
  EXPECT_GE(server.stats().refused_identity, 1u);
}

TEST(MultiProcess, BulkRefusesUnlistedKey) {
  Keys k;
  auto someone_else = crypto::Identity::generate();
  BulkListener listener(k.self, {someone_else.public_key()}, "127.0.0.1", 0);
  ChildProcess child(bulk_send_args(k, listener.port(), 1000, 1, 1, false));
  EXPECT_THROW(listener.accept(Deadline::after(2s)), TimeoutError);
  EXPECT_EQ(child.wait(10s), 4);
  EXPECT_EQ(listener.stats().refused_identity, 1u);
}

// The sender is blocked mid-payload (256 MiB cannot fit in the socket buffers) when it dies.
TEST(MultiProcess, KilledPeerIsReportedLostWithItsId) {
  Keys k;
  BulkOptions options;
  options.peer_timeout = 3s;
  BulkListener listener(k.self, {k.child.public_key()}, "127.0.0.1", 0, options);
  ChildProcess child(bulk_send_args(k, listener.port(), 256ull << 20, 9, 1, false));
  auto stream = listener.accept(Deadline::after(20s));
  MessageHeader h = stream.recv_header(Deadline::after(20s));
  ASSERT_EQ(h.payload_bytes, 256ull << 20);
  std::this_thread::sleep_for(300ms);
  child.signal(SIGKILL);
  std::vector<uint8_t> payload(h.payload_bytes);
  auto start = Clock::now();
  try {
    stream.recv_payload(payload, Deadline::after(60s));
    FAIL() << "a killed peer delivered the whole payload";
  } catch (const PeerLostError& e) {
    EXPECT_EQ(e.peer(), k.child.public_key().fingerprint());
    EXPECT_NE(std::string(e.what()).find(k.child.public_key().fingerprint()), std::string::npos) << e.what();
  }
  EXPECT_LT(Clock::now() - start, options.peer_timeout);
}

// A frozen peer (SIGSTOP: alive, connection open, sends nothing) is reported after peer_timeout.
TEST(MultiProcess, FrozenPeerIsReportedLostAfterPeerTimeout) {
  Keys k;
  BulkOptions options;
  options.peer_timeout = 1s;
  BulkListener listener(k.self, {k.child.public_key()}, "127.0.0.1", 0, options);
  ChildProcess child(bulk_send_args(k, listener.port(), 256ull << 20, 9, 1, false));
  auto stream = listener.accept(Deadline::after(20s));
  MessageHeader h = stream.recv_header(Deadline::after(20s));
  child.signal(SIGSTOP);
  std::vector<uint8_t> payload(h.payload_bytes);
  auto start = Clock::now();
  EXPECT_THROW(stream.recv_payload(payload, Deadline::after(60s)), PeerLostError);
  auto took = Clock::now() - start;
  EXPECT_GE(took, options.peer_timeout - 100ms);
  EXPECT_LT(took, options.peer_timeout * 10);
  child.signal(SIGKILL);
}
