// The compressed all-reduce's direct exchange (lib/collective/exchange.h) in one process, over
// real bulk channels on loopback: several peers' channels accepted at once, strangers'
// streams dropped, frames of an aborted attempt dropped, a frame of another operation
// refused naming its sender.
#include <gtest/gtest.h>

#include <future>
#include <thread>

#include "collective/exchange.h"

using namespace meshtrain;
using namespace meshtrain::collective;
using namespace std::chrono_literals;

namespace {

// n members, each with a listener, and a quorum listing them in rank order.
struct Mesh {
  std::vector<crypto::Identity> ids;
  std::vector<std::unique_ptr<net::BulkListener>> listeners;
  coord::Quorum quorum;
  // channel[i][j]: member i's channel with member j (one per pair, both directions).
  std::vector<std::vector<std::optional<net::BulkChannel>>> channel;
  net::BulkOptions bulk;
  std::function<void(std::string_view, size_t)> no_hook;

  explicit Mesh(size_t n, const std::vector<crypto::PeerId>& also_allowed = {}) {
    net::AllowList allowed;
    for (size_t i = 0; i < n; ++i) {
      ids.push_back(crypto::Identity::generate());
      allowed.add(ids.back().public_key());
    }
    for (const auto& p : also_allowed) allowed.add(p);
    quorum.quorum_id = 0x77;
    quorum.step = 5;
    for (size_t i = 0; i < n; ++i) {
      listeners.push_back(std::make_unique<net::BulkListener>(ids[i], allowed, "127.0.0.1", 0));
      quorum.members.push_back(
          coord::Member{ids[i].public_key(), "127.0.0.1", listeners[i]->port(), static_cast<uint32_t>(i), true});
    }
    bulk.peer_timeout = 5s;
    channel.resize(n);
    for (auto& row : channel) row.resize(n);
  }
  size_t size() const { return ids.size(); }

  // Every member opens its links at once: the lower rank of each pair connects.
  void open_all() {
    std::vector<std::future<void>> done;
    for (size_t i = 0; i < size(); ++i)
      done.push_back(std::async(std::launch::async, [this, i] {
        std::vector<LinkRequest> requests;
        for (size_t j = 0; j < size(); ++j)
          if (j != i) requests.push_back({&quorum.members[j], i < j, &channel[i][j], "mesh peer"});
        open_links(LinkSetup{ids[i], *listeners[i], 1, bulk, 5000ms}, requests, Deadline::after(10s), nullptr);
      }));
    for (auto& f : done) f.get();
  }
  MeshLinks links(size_t i) {
    MeshLinks l{std::vector<net::BulkChannel*>(size()), std::vector<net::BulkChannel*>(size())};
    for (size_t j = 0; j < size(); ++j)
      if (j != i) l.send[j] = l.recv[j] = &*channel[i][j];
    return l;
  }
  void send_raw(size_t from, size_t to, uint64_t quorum_id, uint64_t step, uint64_t op_seq, uint32_t tag,
                std::vector<uint8_t> payload) {
    net::MessageHeader h;
    h.type = net::kFirstUserMessageType;
    h.quorum_id = quorum_id;
    h.step = step;
    h.op_seq = op_seq;
    h.tag = tag;
    channel[from][to]->send(h, payload, Deadline::after(5s));
  }
};

// Member i's block for rank c: its bytes say who sent it to whom.
std::vector<uint8_t> block_of(size_t i, size_t c, size_t bytes) {
  std::vector<uint8_t> b(bytes);
  for (size_t k = 0; k < bytes; ++k) b[k] = static_cast<uint8_t>(i * 16 + c + k * 7);
  return b;
}

}  // namespace

// 4 members, blocks of several pieces (chunk_bytes 4096): every member gets every member's
// block for its rank, in rank order, and the frames of an earlier attempt (another quorum id,
// another step) waiting in a channel are dropped, not taken.
TEST(DirectExchange, EveryOwnerTakesEveryBlockInRankOrderAndStaleFramesAreDropped) {
  Mesh mesh(4);
  mesh.open_all();
  const size_t block_bytes = 10000;
  mesh.send_raw(1, 0, 0x76, 5, 1, 0xc0000000u, {1, 2, 3});  // an aborted attempt of step 5
  mesh.send_raw(3, 0, 0x77, 4, 1, 0xc0000000u, {4, 5});     // the previous step
  std::vector<std::future<std::vector<std::pair<size_t, std::vector<uint8_t>>>>> done;
  std::vector<std::unique_ptr<CancelToken>> cancels;
  for (size_t i = 0; i < 4; ++i) cancels.push_back(std::make_unique<CancelToken>());
  for (size_t i = 0; i < 4; ++i)
    done.push_back(std::async(std::launch::async, [&, i] {
      std::vector<std::vector<uint8_t>> mine;
      for (size_t c = 0; c < 4; ++c) mine.push_back(block_of(i, c, block_bytes));
      std::vector<std::span<const uint8_t>> blocks(mine.begin(), mine.end());
      RingContext ctx{mesh.quorum, static_cast<uint32_t>(i), 1, nullptr, nullptr, Deadline::after(10s),
                      cancels[i].get(), 4096, mesh.no_hook};
      std::vector<std::pair<size_t, std::vector<uint8_t>>> taken;
      ReceiveSpace received;
      exchange_to_owners(
          ctx, mesh.links(i), blocks,
          [&](size_t j, std::span<const uint8_t> b) { taken.emplace_back(j, std::vector<uint8_t>(b.begin(), b.end())); },
          received);
      return taken;
    }));
  for (size_t i = 0; i < 4; ++i) {
    auto taken = done[i].get();
    ASSERT_EQ(taken.size(), 4u) << "member " << i;
    for (size_t j = 0; j < 4; ++j) {
      EXPECT_EQ(taken[j].first, j) << "member " << i << " took out of rank order";
      EXPECT_EQ(taken[j].second, block_of(j, i, block_bytes)) << "member " << i << ", block of " << j;
    }
  }
}

// With `produce`, the blocks are filled while the exchange runs: each member produces the
// blocks in the order rank+1, ..., rank (its own last), and still takes every member's block
// in rank order with the right bytes. Then the second use, phase AllGather (every block is
// the member's own), on the same channels in the same operation: every member takes every
// member's block.
TEST(DirectExchange, ProducedBlocksAreSentAsTheyAreFilledThenAllGathered) {
  Mesh mesh(4);
  mesh.open_all();
  const size_t block_bytes = 10000;
  struct Seen {
    std::vector<size_t> produced;
    std::vector<std::pair<size_t, std::vector<uint8_t>>> taken, gathered;
  };
  std::vector<std::unique_ptr<CancelToken>> cancels;
  for (size_t i = 0; i < 4; ++i) cancels.push_back(std::make_unique<CancelToken>());
  std::vector<std::future<Seen>> done;
  for (size_t i = 0; i < 4; ++i)
    done.push_back(std::async(std::launch::async, [&, i] {
      Seen seen;
      std::vector<std::vector<uint8_t>> mine(4, std::vector<uint8_t>(block_bytes, 0));
      std::vector<std::span<const uint8_t>> blocks(mine.begin(), mine.end());
      RingContext ctx{mesh.quorum, static_cast<uint32_t>(i), 1, nullptr, nullptr, Deadline::after(10s),
                      cancels[i].get(), 4096, mesh.no_hook};
      ReceiveSpace received;  // both uses receive into the same memory
      exchange_to_owners(
          ctx, mesh.links(i), blocks,
          [&](size_t j, std::span<const uint8_t> b) { seen.taken.emplace_back(j, std::vector<uint8_t>(b.begin(), b.end())); },
          received,
          [&](size_t c) {
            seen.produced.push_back(c);
            const std::vector<uint8_t> b = block_of(i, c, block_bytes);
            std::copy(b.begin(), b.end(), mine[c].begin());  // in place: `blocks` points there
          });
      const std::vector<std::span<const uint8_t>> own(4, std::span<const uint8_t>(mine[i]));
      exchange_to_owners(
          ctx, mesh.links(i), own,
          [&](size_t j, std::span<const uint8_t> b) {
            seen.gathered.emplace_back(j, std::vector<uint8_t>(b.begin(), b.end()));
          },
          received, {}, ExchangePhase::AllGather);
      return seen;
    }));
  for (size_t i = 0; i < 4; ++i) {
    Seen seen = done[i].get();
    ASSERT_EQ(seen.produced.size(), 4u);
    for (size_t k = 0; k < 4; ++k) EXPECT_EQ(seen.produced[k], (i + 1 + k) % 4) << "member " << i;
    ASSERT_EQ(seen.taken.size(), 4u) << "member " << i;
    ASSERT_EQ(seen.gathered.size(), 4u) << "member " << i;
    for (size_t j = 0; j < 4; ++j) {
      EXPECT_EQ(seen.taken[j].first, j) << "member " << i << " took out of rank order";
      EXPECT_EQ(seen.taken[j].second, block_of(j, i, block_bytes)) << "member " << i << ", block of " << j;
      EXPECT_EQ(seen.gathered[j].first, j);
      EXPECT_EQ(seen.gathered[j].second, block_of(j, j, block_bytes)) << "member " << i << ", gathered from " << j;
    }
  }
}

// A frame of the current attempt but another operation, from member 1: member 0's exchange
// fails with a ProtocolError naming member 1.
TEST(DirectExchange, FrameOfAnotherOperationIsRefusedNamingItsSender) {
  Mesh mesh(2);
  mesh.open_all();
  mesh.send_raw(1, 0, 0x77, 5, 2, 0xc0000000u, {9, 9, 9, 9});  // op 2 where op 1 runs
  CancelToken cancel;
  RingContext ctx{mesh.quorum, 0, 1, nullptr, nullptr, Deadline::after(10s), &cancel, 4096, mesh.no_hook};
  std::vector<std::vector<uint8_t>> mine = {block_of(0, 0, 4), block_of(0, 1, 4)};
  std::vector<std::span<const uint8_t>> blocks(mine.begin(), mine.end());
  try {
    ReceiveSpace received;
    exchange_to_owners(ctx, mesh.links(0), blocks, [](size_t, std::span<const uint8_t>) {}, received);
    ADD_FAILURE() << "a frame of another operation was taken";
  } catch (const ProtocolError& e) {
    EXPECT_NE(std::string(e.what()).find(mesh.ids[1].public_key().fingerprint()), std::string::npos) << e.what();
  }
}

// A member of the job that is not an expected link of this quorum (allowed by the listener,
// so it passes the handshake) and a key nobody allowed both connect while member 2 waits for
// members 0 and 1 at once: the stranger's streams are dropped, the unknown key is refused at
// the handshake, and the expected channels are still assembled.
TEST(MeshLinks, StrangersAreDroppedWhileSeveralPeersAreAccepted) {
  crypto::Identity stranger = crypto::Identity::generate();
  crypto::Identity unknown = crypto::Identity::generate();
  Mesh mesh(3, {stranger.public_key()});
  const auto& target = mesh.quorum.members[2];
  // Both are queued at member 2's listener before the members connect.
  auto from_stranger = std::async(std::launch::async, [&] {
    return net::BulkChannel::connect(stranger, target.id, target.host, target.port, 1, mesh.bulk, Deadline::after(5s));
  });
  auto from_unknown = std::async(std::launch::async, [&] {
    return net::BulkChannel::connect(unknown, target.id, target.host, target.port, 1, mesh.bulk, Deadline::after(5s));
  });
  std::this_thread::sleep_for(300ms);
  mesh.open_all();
  from_stranger.get();  // its handshake passed; member 2 then dropped it
  EXPECT_THROW(from_unknown.get(), Error);  // the listener refused it
  EXPECT_GE(mesh.listeners[2]->stats().refused_identity, 1u);
  for (size_t j : {0, 1}) {
    ASSERT_TRUE(mesh.channel[2][j].has_value());
    EXPECT_EQ(mesh.channel[2][j]->peer(), mesh.ids[j].public_key());
  }
  // The channels work in both directions.
  mesh.send_raw(0, 2, 0x77, 5, 1, 1, {42});
  mesh.send_raw(2, 0, 0x77, 5, 1, 2, {43});
  std::vector<uint8_t> got;
  EXPECT_EQ(mesh.channel[2][0]->recv(got, Deadline::after(5s)).tag, 1u);
  EXPECT_EQ(got, std::vector<uint8_t>{42});
  EXPECT_EQ(mesh.channel[0][2]->recv(got, Deadline::after(5s)).tag, 2u);
  EXPECT_EQ(got, std::vector<uint8_t>{43});
}
