// meshtrain coord: the per-job coordinator (membership, heartbeats, one quorum per step) and the
// messages members exchange with it. The state machine is in docs/step-protocol.md.
//
// The coordinator keeps everything in memory. After a restart it rebuilds the job from the
// members themselves: every QuorumRequest carries the member's bulk address, and members that
// only heartbeat are counted as live, so nothing needs to be stored.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

#include "meshtrain/core.h"
#include "meshtrain/crypto.h"
#include "meshtrain/net.h"

namespace meshtrain::coord {

using crypto::PeerId;

// net::MessageHeader::type of each coordinator message; payload: the Cap'n Proto struct of the
// same name in lib/wire/coord.capnp.
enum class MessageKind : uint16_t {
  QuorumRequest = 512,  // member -> coordinator
  Quorum = 513,         // coordinator -> member
  Rejoin = 514,         // coordinator -> member (missed a step: come back without state)
  Abort = 515,          // coordinator -> members of a failed attempt
  Leave = 516,          // member -> coordinator (graceful exit; no payload)
  Failure = 517,        // member -> coordinator: this attempt failed here (payload: Abort)
  Done = 518,           // member -> coordinator: the step's reduction finished here
                        //   (no payload; header.quorum_id and header.step name the attempt)
  Commit = 519,         // coordinator -> members: every member of the attempt is Done, apply it
                        //   (no payload; header.quorum_id and header.step)
};

// "QuorumRequest", "Commit", ... or "type N" for a type that is not a coordinator message.
std::string message_kind_name(uint16_t type);
// Fingerprints joined with ", "; "none" for an empty list. For logs and error messages.
std::string describe_peers(const std::vector<PeerId>& peers);

struct Member {
  PeerId id;
  std::string host;
  uint16_t port = 0;
  uint32_t rank = 0;
  bool contributes = true;  // false: a joiner receiving state this step (passes zeros)
};

struct Quorum {
  uint64_t quorum_id = 0;
  uint64_t step = 0;
  std::vector<Member> members;  // ordered by rank
  int32_t state_source_rank = -1;

  size_t contributors() const;
  // Throws InvalidArgumentError when `peer` is not a member.
  const Member& member(const PeerId& peer) const;
  bool contains(const PeerId& peer) const;
};

struct QuorumRequest {
  uint64_t step = 0;
  std::string host;
  uint16_t port = 0;
  bool has_state = true;
  uint64_t failed_quorum_id = 0;
  std::vector<PeerId> lost;
};

struct Rejoin {
  uint64_t missed_step = 0;
  uint64_t next_step = 0;
  std::string reason;
};

struct Abort {
  uint64_t quorum_id = 0;
  uint64_t step = 0;
  std::vector<PeerId> lost;
  std::string reason;
};

// Encoders produce the payload for the matching MessageKind; decoders apply Cap'n Proto limits
// and field checks and throw ProtocolError naming `source` and the field at fault.
std::vector<uint8_t> encode(const QuorumRequest& m);
std::vector<uint8_t> encode(const Quorum& m);
std::vector<uint8_t> encode(const Rejoin& m);
std::vector<uint8_t> encode(const Abort& m);
QuorumRequest decode_quorum_request(crypto::ByteSpan bytes, std::string_view source);
Quorum decode_quorum(crypto::ByteSpan bytes, std::string_view source);
Rejoin decode_rejoin(crypto::ByteSpan bytes, std::string_view source);
Abort decode_abort(crypto::ByteSpan bytes, std::string_view source);

struct CoordinatorOptions {
  std::string bind_endpoint = "tcp://127.0.0.1:7400";
  net::AllowList allowed;  // the job's members
  uint32_t min_peers = 1;  // a quorum never forms with fewer contributors
  // After the first request for a step, wait at most this long for the other live members;
  // then form the quorum without the stragglers.
  std::chrono::milliseconds quorum_timeout{10000};
  // A member from which nothing arrived for this long is dropped from the job.
  std::chrono::milliseconds heartbeat_timeout{5000};
  // After (re)start, wait this long for members to announce themselves: during the grace a
  // quorum forms only when every allowed peer and every live peer has asked (no timeout rule).
  std::chrono::milliseconds startup_grace{2000};
  net::ControlOptions control;
};

struct CoordinatorStatus {
  size_t members = 0;           // registered and live
  size_t live_peers = 0;        // peers heard from within heartbeat_timeout, registered or not
  uint64_t last_step = 0;       // step of the last quorum formed
  uint64_t last_quorum_id = 0;  // to_json() writes it as a 16-digit hex string
  size_t last_quorum_size = 0;
  uint64_t quorums_formed = 0;
  uint64_t attempts_aborted = 0;
  uint64_t members_dropped = 0;
  std::string to_json() const;  // one line
  std::string to_text() const;  // one human-readable line
};

class Coordinator {
 public:
  // Binds options.bind_endpoint (throws IoError when it cannot). `self` must outlive the
  // coordinator (the control server keeps a reference).
  Coordinator(const crypto::Identity& self, CoordinatorOptions options);
  ~Coordinator();
  Coordinator(const Coordinator&) = delete;
  Coordinator& operator=(const Coordinator&) = delete;

  std::string endpoint() const;
  // Serves until `stop` is cancelled; logs a status line (component "coord") after every change.
  void run(const CancelToken& stop);
  // One round: handles messages that arrive before `deadline`, forms due quorums, drops
  // silent members. For embedding the coordinator in another event loop and for tests.
  // Throws CancelledError when `cancel` fires.
  void poll(Deadline deadline, const CancelToken* cancel = nullptr);
  // A snapshot taken after the last poll round. Thread-safe (run/poll stay on one thread).
  CoordinatorStatus status() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace meshtrain::coord
