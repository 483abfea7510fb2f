// meshtrain collective: collectives between the members of a job, over the bulk transport,
// against the quorum the coordinator hands out for each step.
//
// Contract (docs/step-protocol.md): an operation either completes on every live member with
// bit-identical results, or fails on every member with PeerLostError naming the lost peers.
// Results are identical by construction: every chunk is reduced by one owner, in one fixed
// order, and its bytes are then copied to everyone (ring reduce-scatter + all-gather).
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "meshtrain/compress.h"
#include "meshtrain/coord.h"
#include "meshtrain/core.h"
#include "meshtrain/crypto.h"
#include "meshtrain/net.h"

namespace meshtrain::collective {

using crypto::PeerId;

enum class ReduceOp : uint8_t { Sum, Avg };

// A member that missed a step (straggler) or must take state first: ask next_quorum(next_step)
// with has_state = false, then receive state from the quorum's state source.
class StepMissedError : public Error {
 public:
  StepMissedError(uint64_t missed, uint64_t next, const std::string& m)
      : Error(ErrorCode::Timeout, m), missed_step(missed), next_step(next) {}
  uint64_t missed_step;
  uint64_t next_step;
};

struct CommunicatorOptions {
  std::string coordinator_endpoint;  // e.g. "tcp://127.0.0.1:7400"
  PeerId coordinator;                // the coordinator's Ed25519 key
  // Keys allowed to open bulk streams to us. The members of every quorum the coordinator hands
  // out are added, so a member admitted by join token needs no entry here, nor on the others'.
  net::AllowList members;
  // A join token for this member's key, when it is not on the job's allow-list: sent with every
  // QuorumRequest. A coordinator that refuses it makes next_quorum throw coord::JoinTokenError
  // naming the problem.
  std::optional<coord::JoinToken> join_token;
  std::string bind_host = "127.0.0.1";
  uint16_t bind_port = 0;            // 0: a free port
  std::string advertise_host;        // address others connect to; default bind_host
  uint16_t advertise_port = 0;       // port others connect to (e.g. a relay in front of our listener); default: the listener's
  net::BulkOptions bulk;
  // Parallel TCP streams per ring neighbour. One is fastest on every link measured so far
  // (loopback, 200 Mbit/s with 0 and 50 ms added latency: docs/benchmarks.md); raise it where one
  // TCP connection cannot fill a long, fat link (window-limited: rate x RTT > socket buffer).
  uint32_t streams = 1;
  size_t chunk_bytes = 1u << 20;     // pipelining unit of the ring
  std::chrono::milliseconds op_timeout{120000};      // one collective, end to end
  std::chrono::milliseconds quorum_timeout{60000};   // waiting for the coordinator's quorum
  std::chrono::milliseconds connect_timeout{10000};
  std::chrono::milliseconds heartbeat_interval{500}; // control-path heartbeats to the coordinator
  // After a local failure, how long to wait for the coordinator's Abort that names the peer
  // actually lost (a neighbour that aborted can look lost from here).
  std::chrono::milliseconds blame_grace{300};
  // The CUDA stream that buffers on a CUDA device are read and written on (nullptr: the legacy
  // default stream, which is torch's current stream unless the caller switched streams). A
  // collective orders itself after the work already enqueued there and has written its result
  // when it returns. From torch: torch_glue::current_cuda_stream(device) (meshtrain/torch.h).
  compress::CudaStream cuda_stream;
  // Host copies of CUDA buffers (the plain collectives' staging, the compressed all-reduce's
  // payloads) in page-locked memory, kept from one operation to the next: the copies to and
  // from the device run by DMA at the link's speed. That memory is held as long as the
  // Communicator (or the CompressedState) and cannot be paged out; false: pageable memory.
  // Where the host refuses to lock it, pageable memory serves, with a warning.
  bool pinned_staging = true;
  // Test hook: called at each ring step ("reduce_scatter" or "all_gather", index); may kill the
  // process to inject a fault at a precise point.
  std::function<void(std::string_view phase, size_t ring_step)> fault_hook;
};

// With fewer than min_peers live members the coordinator forms no quorum, so next_quorum and
// reduce_step time out (TimeoutError) instead of applying a partial step.
struct StepResult {
  coord::Quorum quorum;               // the quorum of the attempt that succeeded
  std::vector<PeerId> contributors;   // whose gradients are in the average
  uint32_t attempts = 0;
};

// ---- compressed all-reduce (docs/compression.md, "The compressed all-reduce")
//
// Each member encodes its chunk c of the gradient with its own error-feedback state and sends
// the encoded chunk straight to chunk c's owner (rank c; or relays it along the ring, see
// Exchange). The owner decode_accumulates the n payloads in rank order in fp32, divides for
// Avg, re-encodes the reduced chunk with an owner-side state, and the owners' payloads are
// all-gathered; every member decodes the same bytes, so results are bit-identical on every
// member.

// How a top-k all-reduce moves its payloads.
enum class SparseGather : uint8_t {
  Auto,       // the all-gather where it moves no more bytes than the owner path (2 members)
  Owner,      // through chunk owners (a second top-k selection at the owner)
  AllGather,  // every member's whole-tensor payload to everyone; no second selection
};

// How the encoded chunks reach their owners. With n members and P = one member's payload,
// a member sends (n-1)/n P in this phase with Direct and (n-1)/2 P with Ring (1.5 P against
// 0.75 P for 4 members). The result is bit-identical either way. A payload a decoder refuses
// is blamed on its author; relayed bytes are not checked end to end, so with Ring (and with
// SparseGather::AllGather among 3+ members) a malicious relayer could get its author blamed:
// keep Direct with untrusted peers (docs/compression.md).
enum class Exchange : uint8_t {
  Direct,  // to each owner over its own channel (a mesh, opened on first use per member set)
  Ring,    // relayed along the ring's channels, unchanged, hop by hop
};

struct CompressedOptions {
  SparseGather sparse_gather = SparseGather::Auto;
  Exchange exchange = Exchange::Direct;
  // The buffer's tensor shape (row-major), for PowerSGD, which views it as shape[0] x the
  // rest. Empty: flat, which PowerSGD sends uncompressed.
  std::vector<size_t> shape;
  // Test hook: sees (and may change) this member's payload for the chunk of `owner_rank` (or,
  // for the all-gather path, owner_rank = this member's rank) before it is sent.
  std::function<void(uint32_t owner_rank, std::span<uint8_t> payload)> payload_hook;
};

// What one compressed all-reduce moved: payload bytes this member sent and received (frame
// headers and AEAD tags not counted), and the uncompressed fp32 bytes of the buffer.
struct CompressedTraffic {
  uint64_t sent_bytes = 0;
  uint64_t received_bytes = 0;
  uint64_t gradient_bytes = 0;
  bool sparse_all_gather = false;  // the top-k all-gather path was taken
};

// The error-feedback state of one gradient buffer in the compressed all-reduce, kept by the
// caller across steps (one per buffer, used with one codec configuration):
// - member side: one codec state per chunk of the current partition (n chunks for n
//   members). When the quorum size changes the partition changes; the old residual is then
//   added to the next gradient (carried, not lost) and fresh per-chunk states start.
// - owner side: the state of the re-encode of the chunk this member owns; it starts fresh
//   when the member's rank or the quorum size changes (that residual is dropped).
// An operation works on copies; they replace the kept states only when the operation (or,
// in reduce_step, the coordinator's Commit) succeeds, so a failed or retried attempt never
// feeds a residual twice. Memory for those copies is kept between operations (a second
// residual for int8, top-k and PowerSGD; the payloads' host buffers: docs/compression.md,
// "The compressed all-reduce", 11) until the state is destroyed (reset() drops the residuals).
class CompressedState {
 public:
  explicit CompressedState(CompressedOptions options = {});
  ~CompressedState();
  CompressedState(CompressedState&&) noexcept;
  CompressedState& operator=(CompressedState&&) noexcept;

  const CompressedOptions& options() const;
  // The member-side residual over the whole buffer (chunks concatenated, plus any carried
  // residual); empty before the first operation or for codecs without error feedback.
  std::vector<float> member_residual() const;
  // The owner-side residual of the chunk this member owned in the latest operation.
  std::vector<float> owner_residual() const;
  // Of the latest successful operation.
  const CompressedTraffic& traffic() const;
  // Forgets every residual.
  void reset();

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
  friend class Communicator;
};

struct StepAttempt;  // lib/collective/step_attempt.h
struct RingContext;  // lib/collective/ring.h
struct MeshLinks;    // lib/collective/exchange.h

// One job member. Owns a control connection to the coordinator (with a background thread that
// heartbeats and receives quorums and aborts) and a bulk listener for its ring neighbours (and,
// for the compressed all-reduce's direct exchange, the other members).
// Operations are called from one thread.
class Communicator {
 public:
  Communicator(const crypto::Identity& self, CommunicatorOptions options);
  ~Communicator();
  Communicator(const Communicator&) = delete;
  Communicator& operator=(const Communicator&) = delete;

  const PeerId& id() const;
  uint16_t bulk_port() const;
  const CommunicatorOptions& options() const;

  // Asks the coordinator for the quorum of `step` and makes it current. Blocks up to
  // quorum_timeout (TimeoutError). Throws StepMissedError when the coordinator says this member
  // missed the step. has_state = false marks a joiner.
  const coord::Quorum& next_quorum(uint64_t step, bool has_state = true);
  const coord::Quorum& quorum() const;
  uint32_t rank() const;

  // A hash of this member's parameters before `step` (e.g. every N steps): sent with the
  // requests for that step, so the coordinator compares the members' digests and lists the
  // members whose state diverged in Quorum::divergent (docs/step-protocol.md, R10); those
  // members are joiners of that quorum (take the state from state_source_rank, add zeros).
  void set_state_digest(uint64_t step, const crypto::Digest& digest);

  // Collectives against the current quorum. fp32, fp16 and bf16 buffers, in CPU memory or on
  // a CUDA device (staged through host memory, pinned unless options.pinned_staging is off and
  // kept between operations: one copy each way, on options.cuda_stream);
  // reduction in fp32. Avg divides by the number of contributing members; a non-contributing
  // member (joiner) adds zeros. Throw PeerLostError naming the lost peers, TimeoutError after
  // op_timeout.
  void allreduce(BufferView buffer, ReduceOp op);
  void broadcast(BufferView buffer, uint32_t root_rank);
  // out holds quorum size x in.count elements, in rank order.
  void allgather(BufferView in, BufferView out);
  // in holds quorum size x out.count elements; this member gets the reduced block of its rank.
  void reduce_scatter(BufferView in, BufferView out, ReduceOp op);

  // The step loop: gets a quorum for `step`, averages `gradients` over the contributors; on
  // PeerLost reports the failure, gets a new quorum for the same step and redoes the reduction
  // from the gradients as they were on entry. Gives up after max_attempts (rethrows). The copy
  // of the entry gradients is kept by the Communicator from one step to the next: host memory
  // for CPU buffers and/or, for CUDA buffers, device memory the size of the largest buffer
  // stepped (outside torch's caching allocator). Its copies run on options.cuda_stream, and no
  // longer wait for the whole device after the first step: gradients written on another stream
  // must be ready (synchronised) before the call, as for every operation here.
  StepResult reduce_step(uint64_t step, BufferView gradients, uint32_t max_attempts = 5);

  // The compressed all-reduce of an fp32 buffer with `codec` (none, fp16, bf16, int8,
  // topk, powersgd). Every member must use the same codec configuration (payload sizes that
  // disagree fail the operation with a ProtocolError). PowerSGD runs by linearity instead of
  // through owners: two plain all-reduces, of P = M Q and of Q = M^T P (compress.h), with the
  // buffer viewed as CompressedOptions::shape. Avg divides by the number of contributing
  // members; a non-contributing member sends an encoded zero and keeps no residual. On
  // success `state` advances; on any error it is as before the call and `buffer` is
  // unspecified. A gradient with NaN or Inf is refused (InvalidArgumentError naming the
  // element) before anything is sent. A payload a peer's decoder rejects fails the operation
  // with PeerLostError naming that peer. Throws PeerLostError / TimeoutError like allreduce.
  // A buffer on a CUDA device is encoded there (the codec's kernels, error feedback kept on the
  // device) and the reduced chunks are decoded there; only payloads cross to the host, where
  // owners reduce in fp32 as for CPU buffers, so CPU and CUDA members of one job get the same
  // bytes. PowerSGD's products run on the device too; only P and Q are all-reduced (over host
  // memory), and a tensor it sends uncompressed is staged through the host. One CompressedState serves one
  // device: using it with a buffer elsewhere is an InvalidArgumentError.
  void allreduce_compressed(BufferView buffer, const compress::Codec& codec, CompressedState& state, ReduceOp op);

  // reduce_step through the compressed all-reduce: each attempt starts from the gradients and
  // the state as they were on entry; the state advances only when the coordinator commits.
  StepResult reduce_step(uint64_t step, BufferView gradients, const compress::Codec& codec, CompressedState& state,
                         uint32_t max_attempts = 5);

  // Tells the coordinator this member leaves (best effort).
  void leave();

 private:
  // One compressed all-reduce whose state changes stay pending in `state` (compressed.cpp).
  void compressed_attempt(BufferView buffer, const compress::Codec& codec, CompressedState& state, ReduceOp op);
  void powersgd_attempt(BufferView buffer, const compress::Codec& codec, CompressedState& state, ReduceOp op);
  // Runs `body` as one ring operation of the current quorum (failures become PeerLostError).
  void run_ring_op(std::string_view what, const std::function<void(RingContext&)>& body);
  // The same with channels to every member (the direct exchange's mesh) set up too.
  void run_mesh_op(std::string_view what, const std::function<void(RingContext&, const MeshLinks&)>& body);
  // The step loop shared by both reduce_step overloads: `gradients` is copied aside first and
  // put back after every failed attempt.
  StepResult run_step(uint64_t step, BufferView gradients, StepAttempt& attempt, uint32_t max_attempts);

  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace meshtrain::collective
