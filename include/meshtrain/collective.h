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
#include <string>
#include <vector>

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
  net::AllowList members;            // keys allowed to open bulk streams to us (the job)
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

// One job member. Owns a control connection to the coordinator (with a background thread that
// heartbeats and receives quorums and aborts) and a bulk listener for its ring neighbours.
// Operations are called from one thread.
class Communicator {
 public:
  Communicator(const crypto::Identity& self, CommunicatorOptions options);
  ~Communicator();
  Communicator(const Communicator&) = delete;
  Communicator& operator=(const Communicator&) = delete;

  const PeerId& id() const;
  uint16_t bulk_port() const;

  // Asks the coordinator for the quorum of `step` and makes it current. Blocks up to
  // quorum_timeout (TimeoutError). Throws StepMissedError when the coordinator says this member
  // missed the step. has_state = false marks a joiner.
  const coord::Quorum& next_quorum(uint64_t step, bool has_state = true);
  const coord::Quorum& quorum() const;
  uint32_t rank() const;

  // Collectives against the current quorum. fp32, fp16 and bf16 buffers (CPU memory);
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
  // from the gradients as they were on entry. Gives up after max_attempts (rethrows).
  StepResult reduce_step(uint64_t step, BufferView gradients, uint32_t max_attempts = 5);

  // Tells the coordinator this member leaves (best effort).
  void leave();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace meshtrain::collective
