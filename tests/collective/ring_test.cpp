// The ring's frame filter: frames of an aborted attempt are dropped, anything else out of
// order is refused. Real bulk channels over loopback, in one process.
#include <gtest/gtest.h>

#include <future>

#include "collective/ring.h"

using namespace meshtrain;
using namespace meshtrain::collective;
using namespace std::chrono_literals;

namespace {

struct Link {
  crypto::Identity a = crypto::Identity::generate();
  crypto::Identity b = crypto::Identity::generate();
  std::optional<net::BulkChannel> a_to_b;
  std::optional<net::BulkChannel> b_from_a;
  coord::Quorum quorum;
  std::function<void(std::string_view, size_t)> no_hook;
  CancelToken cancel;

  Link() {
    net::BulkListener listener(b, {a.public_key()}, "127.0.0.1", 0);
    auto connecting = std::async(std::launch::async, [&] {
      return net::BulkChannel::connect(a, b.public_key(), "127.0.0.1", listener.port(), 1, {}, Deadline::after(5s));
    });
    b_from_a = net::BulkChannel::accept(listener, a.public_key(), 1, Deadline::after(5s));
    a_to_b = connecting.get();
    quorum.quorum_id = 77;
    quorum.step = 5;
    quorum.members = {coord::Member{a.public_key(), "127.0.0.1", 1, 0, true},
                      coord::Member{b.public_key(), "127.0.0.1", 2, 1, true}};
  }
  RingContext receiver_context() {
    return RingContext{quorum, 1, 3, nullptr, &*b_from_a, Deadline::after(5s), &cancel, 4096, no_hook};
  }
  void send(uint64_t quorum_id, uint64_t step, uint64_t op_seq, uint32_t tag, std::vector<uint8_t> payload) {
    net::MessageHeader h;
    h.quorum_id = quorum_id;
    h.step = step;
    h.op_seq = op_seq;
    h.tag = tag;
    a_to_b->send(h, payload, Deadline::after(5s));
  }
};

}  // namespace

TEST(RingFrames, FramesOfAnAbortedAttemptAreDropped) {
  Link link;
  link.send(76, 5, 3, 9, {1, 1, 1});     // older attempt of the same step
  link.send(77, 4, 3, 9, {2, 2, 2, 2});  // another step
  link.send(77, 5, 3, 9, {7, 8, 9});     // the one expected
  RingContext ctx = link.receiver_context();
  std::vector<uint8_t> buf;
  receive_piece(ctx, 9, 3, buf);
  EXPECT_EQ(buf, std::vector<uint8_t>({7, 8, 9}));
}

TEST(RingFrames, OutOfOrderFrameOfTheCurrentAttemptIsAProtocolError) {
  Link link;
  link.send(77, 5, 3, 10, {1, 2, 3});  // wrong tag
  RingContext ctx = link.receiver_context();
  std::vector<uint8_t> buf;
  EXPECT_THROW(receive_piece(ctx, 9, 3, buf), ProtocolError);
  link.send(77, 5, 3, 9, {1, 2});  // right tag, wrong size
  EXPECT_THROW(receive_piece(ctx, 9, 3, buf), ProtocolError);
}

TEST(RingFrames, EndlessStaleFramesAreRefused) {
  Link link;
  auto sender = std::async(std::launch::async, [&] {
    for (int i = 0; i < 70; ++i) link.send(1, 1, 1, 1, {0});
  });
  RingContext ctx = link.receiver_context();
  std::vector<uint8_t> buf;
  EXPECT_THROW(receive_piece(ctx, 9, 1, buf), ProtocolError);
  sender.get();
}
