// The control path in one process: CurveZMQ between a ControlServer and clients.
#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>
#include <zmq.h>

#include <thread>

#include "meshtrain/net.h"
#include "net/codec.h"

using namespace meshtrain;
using namespace meshtrain::net;
using namespace std::chrono_literals;

namespace {

uint16_t port_of(const std::string& endpoint) {
  return static_cast<uint16_t>(std::stoi(endpoint.substr(endpoint.rfind(':') + 1)));
}

MessageHeader typed(uint16_t type, uint32_t tag = 0) {
  MessageHeader h;
  h.type = type;
  h.tag = tag;
  return h;
}

// A raw DEALER with a real, allowed Curve identity, to send what ControlClient never would.
struct RawDealer {
  void* ctx = zmq_ctx_new();
  void* sock = zmq_socket(ctx, ZMQ_DEALER);
  RawDealer(const crypto::Identity& self, const PeerId& server, const std::string& endpoint) {
    auto server_key = crypto::ed25519_to_x25519_public(server);
    auto secret = self.curve_secret();
    auto pub = crypto::x25519_public_from_secret(secret);
    zmq_setsockopt(sock, ZMQ_CURVE_SERVERKEY, server_key.data(), 32);
    zmq_setsockopt(sock, ZMQ_CURVE_PUBLICKEY, pub.data(), 32);
    zmq_setsockopt(sock, ZMQ_CURVE_SECRETKEY, secret.data(), 32);
    int linger = 0;
    zmq_setsockopt(sock, ZMQ_LINGER, &linger, sizeof linger);
    zmq_connect(sock, endpoint.c_str());
  }
  ~RawDealer() {
    zmq_close(sock);
    zmq_ctx_term(ctx);
  }
  void send(std::vector<std::vector<uint8_t>> frames) {
    for (size_t i = 0; i < frames.size(); ++i)
      zmq_send(sock, frames[i].data(), frames[i].size(), i + 1 < frames.size() ? ZMQ_SNDMORE : 0);
  }
};

std::vector<uint8_t> header_bytes(const PeerId& sender, uint64_t payload_bytes, uint16_t type = 500) {
  WireHeader w;
  w.header.type = type;
  w.header.sender = sender;
  w.header.payload_bytes = payload_bytes;
  w.part_bytes = payload_bytes;
  return encode_header(w);
}

}  // namespace

TEST(Control, RequestAndReplyBetweenAuthenticatedPeers) {
  auto server_id = crypto::Identity::generate();
  auto client_id = crypto::Identity::generate();
  ControlServer server(server_id, {client_id.public_key()}, "tcp://127.0.0.1:0");
  ControlClient client(client_id, server_id.public_key(), server.endpoint());
  std::vector<uint8_t> request(1024, 0x42);
  client.send(typed(300, 1), request);
  auto got = server.recv(Deadline::after(5s));
  ASSERT_TRUE(got);
  EXPECT_EQ(got->header.sender, client_id.public_key());
  EXPECT_EQ(got->header.type, 300);
  EXPECT_EQ(got->payload, request);
  std::vector<uint8_t> reply = {9, 8, 7};
  server.send(client_id.public_key(), typed(301, 2), reply);
  Message m = client.recv(Deadline::after(5s));
  EXPECT_EQ(m.header.sender, server_id.public_key());
  EXPECT_EQ(m.header.tag, 2u);
  EXPECT_EQ(m.payload, reply);
  EXPECT_TRUE(server.last_seen(client_id.public_key()).has_value());
}

TEST(Control, UnlistedClientIsRefusedAndLogged) {
  auto server_id = crypto::Identity::generate();
  auto stranger = crypto::Identity::generate();
  ControlServer server(server_id, {}, "tcp://127.0.0.1:0");
  ControlClient client(stranger, server_id.public_key(), server.endpoint());
  client.send(typed(300));
  EXPECT_FALSE(server.recv(Deadline::after(1s)).has_value());
  EXPECT_GE(server.stats().refused_identity, 1u);
  EXPECT_THROW(client.recv(Deadline::after(200ms)), TimeoutError);
  // Admitting the key later lets it in.
  server.allow(stranger.public_key());
  ControlClient admitted(stranger, server_id.public_key(), server.endpoint());
  admitted.send(typed(302));
  auto got = server.recv(Deadline::after(5s));
  ASSERT_TRUE(got);
  EXPECT_EQ(got->header.type, 302);
}

TEST(Control, AdmitAnyKeyServerBindsEachMessageToItsConnectionKey) {
  auto server_id = crypto::Identity::generate();
  auto listed = crypto::Identity::generate();
  auto stranger = crypto::Identity::generate();
  auto victim = crypto::Identity::generate();
  ControlOptions options;
  options.admit_any_key = true;
  ControlServer server(server_id, {listed.public_key()}, "tcp://127.0.0.1:0", options);
  ControlClient client(stranger, server_id.public_key(), server.endpoint());
  client.send(typed(300));
  auto got = server.recv(Deadline::after(5s));
  ASSERT_TRUE(got);
  EXPECT_EQ(got->header.sender, stranger.public_key());
  EXPECT_FALSE(server.allowed(stranger.public_key()));
  EXPECT_TRUE(server.allowed(listed.public_key()));
  // Replies reach the unlisted peer.
  server.send(stranger.public_key(), typed(301));
  EXPECT_EQ(client.recv(Deadline::after(5s)).header.type, 301);
  // An unlisted connection cannot speak for another key, listed or not.
  RawDealer raw(stranger, server_id.public_key(), server.endpoint());
  raw.send({header_bytes(victim.public_key(), 0)});
  raw.send({header_bytes(listed.public_key(), 0)});
  raw.send({header_bytes(stranger.public_key(), 0, 777)});
  got = server.recv(Deadline::after(5s));
  ASSERT_TRUE(got);
  EXPECT_EQ(got->header.type, 777);
  EXPECT_EQ(server.stats().wrong_sender, 2u);
  EXPECT_EQ(server.stats().refused_identity, 0u);
}

// try_send never waits: to a peer that stops reading it queues until ZeroMQ's limits are
// reached and then returns false (send() would wait 2 s per message there, then throw).
TEST(Control, TrySendToAPeerThatDoesNotReadReturnsFalseInsteadOfWaiting) {
  auto server_id = crypto::Identity::generate();
  auto stranger = crypto::Identity::generate();
  ControlOptions options;
  options.admit_any_key = true;
  ControlServer server(server_id, {}, "tcp://127.0.0.1:0", options);
  RawDealer raw(stranger, server_id.public_key(), server.endpoint());  // never reads
  raw.send({header_bytes(stranger.public_key(), 0, 300)});
  ASSERT_TRUE(server.recv(Deadline::after(5s)).has_value());
  const std::vector<uint8_t> payload(16 << 10, 0x5a);
  size_t queued = 0;
  bool full = false;
  while (queued < 200000 && !full) {
    if (server.try_send(stranger.public_key(), typed(301), payload))
      ++queued;
    else
      full = true;
  }
  EXPECT_TRUE(full) << queued << " messages queued to a peer that reads nothing";
  EXPECT_GT(queued, 0u);
}

// With admit_any_key, a key off the allow-list that has been silent for forget_unlisted_after
// is forgotten (route and last_seen), so keys that connect once do not grow the server for
// good; one that speaks again is known again. Listed keys are kept.
TEST(Control, SilentUnlistedKeysAreForgotten) {
  auto server_id = crypto::Identity::generate();
  auto listed = crypto::Identity::generate();
  auto stranger = crypto::Identity::generate();
  ControlOptions options;
  options.admit_any_key = true;
  options.forget_unlisted_after = 50ms;
  ControlServer server(server_id, {listed.public_key()}, "tcp://127.0.0.1:0", options);
  ControlClient once(stranger, server_id.public_key(), server.endpoint());
  ControlClient member(listed, server_id.public_key(), server.endpoint());
  once.send(typed(300));
  ASSERT_TRUE(server.recv(Deadline::after(5s)).has_value());
  member.send(typed(301));
  ASSERT_TRUE(server.recv(Deadline::after(5s)).has_value());
  ASSERT_TRUE(server.last_seen(stranger.public_key()).has_value());
  std::this_thread::sleep_for(120ms);
  member.send(typed(302));  // any message lets the server sweep
  ASSERT_TRUE(server.recv(Deadline::after(5s)).has_value());
  EXPECT_FALSE(server.last_seen(stranger.public_key()).has_value());
  EXPECT_THROW(server.send(stranger.public_key(), typed(303)), PeerLostError);
  EXPECT_TRUE(server.last_seen(listed.public_key()).has_value());
  once.send(typed(304));
  auto again = server.recv(Deadline::after(5s));
  ASSERT_TRUE(again.has_value());
  EXPECT_EQ(again->header.type, 304);
  server.send(stranger.public_key(), typed(305));
  EXPECT_EQ(once.recv(Deadline::after(5s)).header.type, 305);
}

TEST(Control, ClientWithWrongServerKeyCannotConnect) {
  auto server_id = crypto::Identity::generate();
  auto impostor = crypto::Identity::generate();
  auto client_id = crypto::Identity::generate();
  ControlServer server(server_id, {client_id.public_key()}, "tcp://127.0.0.1:0");
  // The client believes the server is `impostor`: the CURVE handshake fails.
  ControlClient client(client_id, impostor.public_key(), server.endpoint());
  client.send(typed(300));
  EXPECT_FALSE(server.recv(Deadline::after(1s)).has_value());
}

TEST(Control, MalformedMessagesAreDroppedAndGoodOnesStillArrive) {
  auto server_id = crypto::Identity::generate();
  auto client_id = crypto::Identity::generate();
  auto other = crypto::Identity::generate();
  ControlOptions options;
  options.limits.max_control_payload_bytes = 1000;
  ControlServer server(server_id, {client_id.public_key()}, "tcp://127.0.0.1:0", options);
  RawDealer raw(client_id, server_id.public_key(), server.endpoint());
  const PeerId me = client_id.public_key();
  raw.send({{1, 2, 3, 4, 5, 6, 7}});                                       // not a header
  raw.send({header_bytes(other.public_key(), 0)});                         // claims another sender
  raw.send({header_bytes(me, 3), {1, 2, 3}, {4}});                         // too many frames
  raw.send({header_bytes(me, 10), {1, 2, 3, 4, 5}});                       // payload shorter than announced
  raw.send({header_bytes(me, 5000)});                                      // announces > limit
  raw.send({header_bytes(me, 2, 777), {4, 2}});                            // good
  auto got = server.recv(Deadline::after(5s));
  ASSERT_TRUE(got);
  EXPECT_EQ(got->header.type, 777);
  EXPECT_EQ(got->payload, std::vector<uint8_t>({4, 2}));
  RejectStats stats = server.stats();
  EXPECT_EQ(stats.malformed, 3u);
  EXPECT_EQ(stats.wrong_sender, 1u);
  EXPECT_EQ(stats.oversized, 1u);
}

TEST(Control, OversizedFrameDropsOnlyThatConnection) {
  auto server_id = crypto::Identity::generate();
  auto client_id = crypto::Identity::generate();
  ControlOptions options;
  options.limits.max_control_payload_bytes = 1000;
  ControlServer server(server_id, {client_id.public_key()}, "tcp://127.0.0.1:0", options);
  {
    RawDealer raw(client_id, server_id.public_key(), server.endpoint());
    raw.send({header_bytes(client_id.public_key(), 1 << 20), std::vector<uint8_t>(1 << 20, 1)});
    EXPECT_FALSE(server.recv(Deadline::after(500ms)).has_value());
  }
  ControlClient client(client_id, server_id.public_key(), server.endpoint());
  client.send(typed(303));
  auto got = server.recv(Deadline::after(5s));
  ASSERT_TRUE(got);
  EXPECT_EQ(got->header.type, 303);
}

TEST(Control, GarbageBytesOnTheSocketAreHarmless) {
  auto server_id = crypto::Identity::generate();
  auto client_id = crypto::Identity::generate();
  ControlServer server(server_id, {client_id.public_key()}, "tcp://127.0.0.1:0");
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(port_of(server.endpoint()));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0);
  std::vector<uint8_t> noise(100000);
  for (size_t i = 0; i < noise.size(); ++i) noise[i] = static_cast<uint8_t>(i * 131 + 7);
  ::send(fd, noise.data(), noise.size(), MSG_NOSIGNAL);
  EXPECT_FALSE(server.recv(Deadline::after(300ms)).has_value());
  ControlClient client(client_id, server_id.public_key(), server.endpoint());
  client.send(typed(304));
  auto got = server.recv(Deadline::after(5s));
  ASSERT_TRUE(got);
  EXPECT_EQ(got->header.type, 304);
  ::close(fd);
}

TEST(Control, SendToUnknownPeerIsPeerLost) {
  auto server_id = crypto::Identity::generate();
  auto nobody = crypto::Identity::generate();
  ControlServer server(server_id, {}, "tcp://127.0.0.1:0");
  try {
    server.send(nobody.public_key(), typed(300));
    FAIL();
  } catch (const PeerLostError& e) {
    EXPECT_EQ(e.peer(), nobody.public_key().fingerprint());
  }
}

TEST(Control, ReceiveCanBeCancelled) {
  auto server_id = crypto::Identity::generate();
  ControlServer server(server_id, {}, "tcp://127.0.0.1:0");
  CancelToken cancel;
  std::thread t([&] {
    std::this_thread::sleep_for(100ms);
    cancel.cancel();
  });
  EXPECT_THROW(server.recv(Deadline::never(), &cancel), CancelledError);
  t.join();
}

TEST(Control, HeartbeatsKeepAPeerSeenAndAreNotDelivered) {
  auto server_id = crypto::Identity::generate();
  auto client_id = crypto::Identity::generate();
  ControlServer server(server_id, {client_id.public_key()}, "tcp://127.0.0.1:0");
  ControlClient client(client_id, server_id.public_key(), server.endpoint());
  client.heartbeat();
  EXPECT_FALSE(server.recv(Deadline::after(500ms)).has_value());
  ASSERT_TRUE(server.last_seen(client_id.public_key()).has_value());
  EXPECT_TRUE(server.silent_peers(60s).empty());
  std::this_thread::sleep_for(20ms);
  auto silent = server.silent_peers(10ms);
  ASSERT_EQ(silent.size(), 1u);
  EXPECT_EQ(silent[0], client_id.public_key());
}
