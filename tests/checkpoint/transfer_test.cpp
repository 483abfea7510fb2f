// Live state transfer to a joiner over loopback bulk channels: equal to a disk round trip;
// damaged blocks, bad manifests and oversized offers are refused and both sides are told.
#include <gtest/gtest.h>

#include <future>

#include "checkpoint/helpers.h"
#include "checkpoint/transfer.h"
#include "meshtrain/net.h"
#include "support/temp_dir.h"

using namespace meshtrain;
using namespace meshtrain::checkpoint;
using namespace meshtrain::test_support;
using namespace std::chrono_literals;

namespace {

// A healthy peer and a joiner, connected by a bulk channel of `streams` streams.
struct Link {
  crypto::Identity healthy = crypto::Identity::generate();
  crypto::Identity joiner = crypto::Identity::generate();
  net::BulkOptions options;
  std::unique_ptr<net::BulkListener> listener;
  std::optional<net::BulkChannel> to_joiner;    // the healthy peer's end
  std::optional<net::BulkChannel> from_healthy;  // the joiner's end

  explicit Link(uint32_t streams, net::BulkSecurity security = net::BulkSecurity::Encrypted) {
    options.security = security;
    listener = std::make_unique<net::BulkListener>(joiner, net::AllowList{healthy.public_key()}, "127.0.0.1", 0, options);
    auto accepted = std::async(std::launch::async, [&] {
      return net::BulkChannel::accept(*listener, healthy.public_key(), streams, Deadline::after(10s));
    });
    to_joiner.emplace(net::BulkChannel::connect(healthy, joiner.public_key(), "127.0.0.1", listener->port(), streams,
                                                options, Deadline::after(10s)));
    from_healthy.emplace(accepted.get());
  }
};

void expect_same_as_disk(const LoadedState& received, const LoadedState& from_disk) {
  EXPECT_EQ(received.step(), from_disk.step());
  EXPECT_EQ(received.manifest.tensors, from_disk.manifest.tensors);
  EXPECT_EQ(received.manifest.metadata, from_disk.manifest.metadata);
  EXPECT_EQ(received.manifest.blobs, from_disk.manifest.blobs);
  EXPECT_EQ(received.manifest.total_bytes, from_disk.manifest.total_bytes);
  ASSERT_EQ(received.buffer.size(), from_disk.buffer.size());
  EXPECT_TRUE(std::equal(received.buffer.span().begin(), received.buffer.span().end(), from_disk.buffer.span().begin()));
  ASSERT_EQ(received.tensors.size(), from_disk.tensors.size());
  for (size_t i = 0; i < received.tensors.size(); ++i) {
    EXPECT_EQ(received.tensors[i].info, from_disk.tensors[i].info);
    EXPECT_TRUE(received.tensors[i].complete());
  }
}

class TransferTest : public ::testing::TestWithParam<std::tuple<uint32_t, net::BulkSecurity>> {};

TEST_P(TransferTest, LoopbackEqualsDiskRoundTrip) {
  auto [streams, security] = GetParam();
  TempDir dir;
  TestState s = make_test_state(17, 170, 16);  // ~4.5 MiB: several blocks of 1 MiB
  save(dir.path(), s.view());
  LoadedState from_disk = load(dir.path());

  Link link(streams, security);
  TransferOptions o;
  o.block_bytes = 1 << 20;
  auto sender = std::async(std::launch::async, [&] { return send_state(*link.to_joiner, s.view(), o); });
  LoadedState received = receive_state(*link.from_healthy, o);
  Manifest sent = sender.get();
  EXPECT_EQ(sent.tensors, received.manifest.tensors);
  EXPECT_TRUE(received.dir.empty());
  expect_same_as_disk(received, from_disk);
  expect_equal(received, s);
}

INSTANTIATE_TEST_SUITE_P(Streams, TransferTest,
                         ::testing::Values(std::make_tuple(1u, net::BulkSecurity::Encrypted),
                                           std::make_tuple(3u, net::BulkSecurity::Encrypted),
                                           std::make_tuple(2u, net::BulkSecurity::Plain)));

TEST(Transfer, EmptyState) {
  Link link(1);
  TestState s;
  s.step = 3;
  s.blobs["rng"] = {9, 9};
  auto sender = std::async(std::launch::async, [&] { return send_state(*link.to_joiner, s.view()); });
  LoadedState received = receive_state(*link.from_healthy);
  sender.get();
  EXPECT_EQ(received.step(), 3u);
  EXPECT_EQ(received.manifest.blobs, s.blobs);
}

TEST(Transfer, OversizedOfferIsRefusedBeforeAllocating) {
  Link link(1);
  TestState s = make_test_state(1, 1);
  TransferOptions small;
  small.max_state_bytes = 1000;
  auto sender = std::async(std::launch::async, [&] { return send_state(*link.to_joiner, s.view()); });
  expect_error<ProtocolError>([&] { receive_state(*link.from_healthy, small); }, {"limits are 1000"});
  expect_error<ProtocolError>([&] { sender.get(); }, {"refused", "size limits"});
}

// Plays a sender that sends the real manifest of a saved checkpoint but a damaged block.
TEST(Transfer, DamagedBlockIsRejectedAndNamed) {
  TempDir dir;
  TestState s = make_test_state(2, 20);
  SaveOptions so;
  so.block_bytes = 4096;
  auto res = save(dir.path(), s.view(), so);
  std::string manifest = read_text(res.dir / "manifest.json");
  std::string shard = read_text(res.dir / "shard-0-of-1.bin");
  shard[3 * 4096 + 100] ^= 1;  // block 3

  Link link(2);
  auto fake = std::async(std::launch::async, [&] {
    net::BulkChannel& c = *link.to_joiner;
    auto deadline = Deadline::after(20s);
    net::MessageHeader h;
    h.type = transfer::kOffer;
    h.step = 20;
    h.quorum_id = shard.size();
    h.op_seq = manifest.size();
    h.tag = kFormatVersion;
    c.send(h, {}, deadline);
    EXPECT_EQ(c.recv_into({}, deadline).tag, transfer::kOk);
    h = {};
    h.type = transfer::kManifest;
    h.step = 20;
    c.send(h, {reinterpret_cast<const uint8_t*>(manifest.data()), manifest.size()}, deadline);
    for (uint64_t k = 0; k * 4096 < shard.size(); ++k) {
      h = {};
      h.type = transfer::kBlock;
      h.op_seq = k;
      size_t n = std::min<size_t>(4096, shard.size() - k * 4096);
      c.send(h, {reinterpret_cast<const uint8_t*>(shard.data()) + k * 4096, n}, deadline);
    }
    return c.recv_into({}, deadline);
  });
  expect_error<CorruptError>([&] { receive_state(*link.from_healthy); }, {"block 3", "shard-0-of-1.bin", "SHA-256"});
  net::MessageHeader verdict = fake.get();
  EXPECT_EQ(verdict.type, transfer::kVerdict);
  EXPECT_EQ(verdict.tag, transfer::kBadBlock);
  EXPECT_EQ(verdict.op_seq, 3u);
}

TEST(Transfer, MalformedManifestIsRejected) {
  Link link(1);
  std::string manifest = "{\"format\": \"meshtrain-checkpoint\", \"format_version\": 1, \"step\": \"x\"}";
  auto fake = std::async(std::launch::async, [&] {
    net::BulkChannel& c = *link.to_joiner;
    auto deadline = Deadline::after(20s);
    net::MessageHeader h;
    h.type = transfer::kOffer;
    h.op_seq = manifest.size();
    h.tag = kFormatVersion;
    c.send(h, {}, deadline);
    c.recv_into({}, deadline);
    h.type = transfer::kManifest;
    c.send(h, {reinterpret_cast<const uint8_t*>(manifest.data()), manifest.size()}, deadline);
    return c.recv_into({}, deadline);
  });
  expect_error<CorruptError>([&] { receive_state(*link.from_healthy); }, {"state manifest from peer"});
  EXPECT_EQ(fake.get().tag, transfer::kBadManifest);
}

TEST(Transfer, UnexpectedMessageIsAProtocolError) {
  Link link(1);
  auto fake = std::async(std::launch::async, [&] {
    net::MessageHeader h;
    h.type = 999;
    link.to_joiner->send(h, {}, Deadline::after(5s));
  });
  expect_error<ProtocolError>([&] { receive_state(*link.from_healthy); }, {"type 999", "state offer"});
  fake.get();
}

TEST(Transfer, SilentSenderTimesOut) {
  Link link(1);
  TransferOptions o;
  o.timeout = 300ms;
  auto start = std::chrono::steady_clock::now();
  EXPECT_THROW(receive_state(*link.from_healthy, o), Error);
  EXPECT_LT(std::chrono::steady_clock::now() - start, 5s);
}

}  // namespace
