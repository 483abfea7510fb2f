// The direct exchange of the compressed all-reduce (docs/compression.md): every member sends
// its encoded chunk c straight to the member of rank c, over channels to every other member
// (a mesh), instead of relaying it along the ring. Also the setup of those channels.
#pragma once

#include <functional>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "collective/reused_bytes.h"
#include "collective/ring.h"

namespace meshtrain::collective {

// This member's channels to every other member of the quorum, by rank: send[c] carries frames
// to rank c, recv[c] from rank c (both null at c == own rank). A BulkStream carries both
// directions, so the ring channels serve the ring neighbours and a mesh channel per pair the
// others; one channel may be both send[c] and recv[c].
struct MeshLinks {
  std::vector<net::BulkChannel*> send;
  std::vector<net::BulkChannel*> recv;
};

// blocks[c] is this member's block for rank c (every member's blocks[c] has the same size).
// Sends blocks[c] to rank c for every c, concurrently, while receiving rank j's block for this
// member's rank from every j. `take(j, block)` runs on the calling thread in rank order
// (j = 0, 1, ..., n-1, this member's own block included) as soon as block j is in, so the
// caller can decode while later blocks arrive.
// With `produce`, the blocks' bytes are not ready yet (their sizes are): produce(c) fills
// blocks[c] on the calling thread, for c = rank+1, rank+2, ..., rank (wrapping; this member's
// own block last, as it is not sent), and the send to rank c starts as soon as produce(c)
// returned, so encoding the next block overlaps sending the previous ones; blocks that came in
// meanwhile are taken between two produce calls. Frames carry the context's quorum, step and
// op_seq and are checked like the ring's (receive_piece): frames of another quorum or step are
// dropped, anything else unexpected is a ProtocolError naming the sender. The first failure
// (a lost peer, a deadline, a take that throws) cancels the rest; it is rethrown after every
// thread has ended. The ring fault hook sees phase "reduce_scatter" with index 0 before
// anything is sent and index k after k blocks were taken.
// This member sends sum over c != rank of blocks[c].size() bytes: (n-1)/n of its payload.
// The second use (phase AllGather: every blocks[c] is the owner's reduced chunk, taken from
// every owner as it arrives) has its own frame tags and fault hook phase "all_gather".
// Block j is received into received.blocks[j] (resized to n), of received.memory.
enum class ExchangePhase { ToOwners, AllGather };
struct ReceiveSpace {  // kept by the caller across operations
  std::vector<ReusedBytes> blocks;
  HostMemory memory = HostMemory::Pageable;  // pinned where blocks are decoded onto a GPU
  int device = 0;                            // that GPU
};
void exchange_to_owners(RingContext& ctx, const MeshLinks& links, const std::vector<std::span<const uint8_t>>& blocks,
                        const std::function<void(size_t rank, std::span<const uint8_t> block)>& take,
                        ReceiveSpace& received, const std::function<void(size_t rank)>& produce = {},
                        ExchangePhase phase = ExchangePhase::ToOwners);

// One channel to open: connect to `member` (connect = true) or accept its connection, into
// *slot. `role` names the link in errors ("ring neighbour", "mesh peer").
struct LinkRequest {
  const coord::Member* member;
  bool connect;
  std::optional<net::BulkChannel>* slot;
  const char* role;
};

// Opens every requested channel: the connects run concurrently while this thread accepts the
// expected streams from the listener (assembling each peer's channel by channel id, so several
// peers may connect at once; streams of anyone else, or with another stream count, are closed
// and logged). Each wait ends at min(deadline, now + connect_timeout) or on cancel. A peer that
// cannot be reached or does not connect in time fails with PeerLostError naming it.
// Streams of a quorum member that this call does not expect (a member already opening the
// mesh while this one opens only its ring links) are kept in *early, when given, and taken
// from there by a later call, instead of being dropped; the caller empties *early whenever the
// member set changes or its channels are dropped.
struct LinkSetup {
  const crypto::Identity& self;
  net::BulkListener& listener;
  uint32_t streams;
  const net::BulkOptions& bulk;
  std::chrono::milliseconds connect_timeout;
  std::vector<net::BulkStream>* early = nullptr;
  const std::vector<PeerId>* members = nullptr;  // whose unexpected streams go to *early
};
void open_links(const LinkSetup& setup, const std::vector<LinkRequest>& requests, Deadline deadline,
                const CancelToken* cancel);

}  // namespace meshtrain::collective
