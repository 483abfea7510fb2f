// Ring algorithms over the two bulk channels of one member (to the next rank, from the
// previous rank). Chunked and pipelined: a sender thread streams pieces to the next rank while
// this thread receives, reduces and forwards. Owner-reduces-then-copies: every chunk is reduced
// once, at its owner, in ring order; everyone else receives the owner's bytes.
#pragma once

#include <functional>
#include <span>
#include <string_view>
#include <vector>

#include "meshtrain/collective.h"

namespace meshtrain::collective {

struct RingContext {
  const coord::Quorum& quorum;
  uint32_t rank;
  uint64_t op_seq;
  net::BulkChannel* to_next;    // null when the quorum has one member
  net::BulkChannel* from_prev;
  Deadline deadline;
  CancelToken* cancel;          // fired by a coordinator Abort, or by a failing sender
  size_t chunk_bytes;           // pipelining unit
  const std::function<void(std::string_view, size_t)>& fault_hook;
  // Gradients: a partial sum with NaN or Inf from the previous rank fails the operation with a
  // PeerLostError naming it (every member checks its own gradients before sending, so only a faulty or malicious
  // sender or an overflow produces one).
  bool reject_non_finite = false;
};

// The header of this operation's frames (type, quorum, step, op_seq); the sender sets the tag.
net::MessageHeader frame_header(const RingContext& ctx);

// Receives the piece tagged `tag` of this operation (exactly `bytes` long) from the previous
// rank into `in_place` when given (its header is checked before any byte lands there), else
// into `buf`. Frames of another quorum or step (an aborted attempt) are read into `buf` and
// dropped with a log line (at most 64 in a row); any other mismatch is a ProtocolError.
void receive_piece(RingContext& ctx, uint32_t tag, size_t bytes, std::vector<uint8_t>& buf,
                   uint8_t* in_place = nullptr);

// In place: data becomes sum / divisor over all members, identical bytes everywhere.
void ring_allreduce(RingContext& ctx, float* data, size_t count, float divisor);
// data holds n blocks of block_count floats; afterwards block `rank` holds the reduced block.
void ring_reduce_scatter_blocks(RingContext& ctx, float* data, size_t block_count, float divisor);
// data holds n blocks of block_bytes; block `rank` is filled; afterwards every block is.
void ring_allgather_blocks(RingContext& ctx, uint8_t* data, size_t block_bytes);
// blocks[c] is this member's block for the member of rank c (every member's blocks[c] has the
// same size). Afterwards gathered[j] holds rank j's block for this member's rank, for every j
// (this member's own included). Blocks are relayed along the ring unchanged, never combined:
// with n members, this member sends sum over k < n-1 of (k+1) blocks. The ring fault hook
// sees phase "reduce_scatter" at each ring step.
void ring_gather_to_owners(RingContext& ctx, const std::vector<std::span<const uint8_t>>& blocks,
                           std::vector<std::vector<uint8_t>>& gathered);
// root's bytes to everyone, along the ring.
void ring_broadcast(RingContext& ctx, uint8_t* data, size_t bytes, uint32_t root);

}  // namespace meshtrain::collective
