// meshtrain coord: the per-job coordinator (membership, heartbeats, one quorum per step) and the
// messages members exchange with it. The state machine is in docs/step-protocol.md.
//
// The coordinator keeps everything in memory. After a restart it rebuilds the job from the
// members themselves: every QuorumRequest carries the member's bulk address, and members that
// only heartbeat are counted as live, so nothing needs to be stored.
#pragma once

#include <chrono>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
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
  Refused = 520,        // coordinator -> a peer it does not admit (payload: Refusal)
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
  // Members whose state digest (QuorumRequest::state_digest) differs from the one most members
  // with state sent for this step: their parameters diverged from the job's (R10). They are
  // resynced like joiners: contributes = false, and state_source_rank is a majority member.
  std::vector<PeerId> divergent;

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
  crypto::Bytes join_token;  // JoinToken::encode() of a peer not on the allow-list; else empty
  // A hash of the member's parameters before `step`, when the application asks for a check
  // (collective::Communicator::set_state_digest); the coordinator compares them (R10).
  std::optional<crypto::Digest> state_digest;
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

enum class JoinTokenProblem : uint8_t;

// Why the coordinator does not admit a peer: a missing or invalid join token.
struct Refusal {
  JoinTokenProblem problem{};
  std::string reason;  // JoinTokenError::detail
};

// Encoders produce the payload for the matching MessageKind; decoders apply Cap'n Proto limits
// and field checks and throw ProtocolError naming `source` and the field at fault.
std::vector<uint8_t> encode(const QuorumRequest& m);
std::vector<uint8_t> encode(const Quorum& m);
std::vector<uint8_t> encode(const Rejoin& m);
std::vector<uint8_t> encode(const Abort& m);
std::vector<uint8_t> encode(const Refusal& m);
QuorumRequest decode_quorum_request(crypto::ByteSpan bytes, std::string_view source);
Quorum decode_quorum(crypto::ByteSpan bytes, std::string_view source);
Rejoin decode_rejoin(crypto::ByteSpan bytes, std::string_view source);
Abort decode_abort(crypto::ByteSpan bytes, std::string_view source);
Refusal decode_refusal(crypto::ByteSpan bytes, std::string_view source);

// ---------------------------------------------------------------------------------------------
// Join tokens: how a job owner admits a peer that is not on the job's allow-list.
//
// The owner signs, with its Ed25519 key, {version, the job (named by its coordinator's public
// key), the one peer key admitted, issue time, expiry, label}. The peer hands the token to its
// Communicator, which sends it with every QuorumRequest (so a restarted coordinator admits it
// again); a coordinator with job owners checks it and admits the peer until the token expires.
// The format and the rules are in docs/step-protocol.md ("Admission").

inline constexpr uint8_t kJoinTokenVersion = 1;
inline constexpr size_t kMaxJoinTokenLabelBytes = 64;
// Binary form: version, owner, job, peer, issued, expires, label length, label, signature.
inline constexpr size_t kMinJoinTokenBytes = 1 + 3 * 32 + 8 + 8 + 1 + crypto::kEd25519SignatureBytes;
inline constexpr size_t kMaxJoinTokenBytes = kMinJoinTokenBytes + kMaxJoinTokenLabelBytes;
// Text form: this prefix, then the binary form in lowercase hex.
inline constexpr std::string_view kJoinTokenTextPrefix = "mtjoin-";
inline constexpr size_t kMaxJoinTokenTextBytes = kJoinTokenTextPrefix.size() + 2 * kMaxJoinTokenBytes;
// A token issued this far in the future of the checker's clock is still accepted (clock skew).
inline constexpr std::chrono::seconds kJoinTokenClockSkew{300};

// What is wrong with a token; every JoinTokenError names one.
enum class JoinTokenProblem : uint8_t {
  Missing,       // an unlisted peer sent no token
  Malformed,     // not a token: bad prefix, length, hex, version or label
  BadSignature,  // the signature does not verify under the token's owner key (tampered)
  WrongOwner,    // signed by a key that is not one of this job's owners
  WrongJob,      // issued for another job (coordinator key)
  WrongPeer,     // issued for another peer key
  Expired,       // past its expiry
  NotYetValid,   // issued in the future (beyond kJoinTokenClockSkew)
};
// "missing", "malformed", "bad signature", "wrong owner", "wrong job", "wrong peer",
// "expired", "not yet valid".
std::string_view join_token_problem_name(JoinTokenProblem problem) noexcept;

class JoinTokenError : public AuthError {
 public:
  // what() is "join token <problem>: <detail>".
  JoinTokenError(JoinTokenProblem p, const std::string& detail);
  JoinTokenProblem problem;
  std::string detail;
};

struct JoinToken {
  using TimePoint = std::chrono::system_clock::time_point;

  uint8_t version = kJoinTokenVersion;
  PeerId owner;  // the signer
  PeerId job;    // the coordinator's public key
  PeerId peer;   // the only key this token admits
  TimePoint issued;   // whole seconds
  TimePoint expires;  // whole seconds
  std::string label;  // for logs: who and why; printable ASCII, at most kMaxJoinTokenLabelBytes
  crypto::Signature signature{};

  // Signs a token with the owner's key. Throws InvalidArgumentError for a label that is too
  // long or not printable ASCII, or an expiry not after `issued_at`.
  static JoinToken issue(const crypto::Identity& owner, const PeerId& job, const PeerId& peer, TimePoint expires,
                         std::string label = {}, TimePoint issued_at = std::chrono::system_clock::now());

  crypto::Bytes encode() const;
  std::string to_text() const;
  // Throw JoinTokenError(Malformed) naming `source` and the field at fault. They check the
  // layout only; verify() checks what the token says.
  static JoinToken decode(crypto::ByteSpan bytes, std::string_view source);
  static JoinToken from_text(std::string_view text, std::string_view source);  // surrounding space ignored
  // A token given on a command line: the text form itself, or a file holding it.
  static JoinToken load(std::string_view text_or_path);

  // The bytes the signature covers: a domain-separation string and every field but the signature.
  crypto::Bytes signed_bytes() const;

  // Checks, in this order, the signature, that the owner is one of `owners`, the job, the peer
  // and the validity window at `now`. Throws JoinTokenError naming the problem, the token's
  // label and the keys at fault.
  void verify(const net::AllowList& owners, const PeerId& job_key, const PeerId& joining_peer,
              TimePoint now = std::chrono::system_clock::now()) const;
  // "label 'x' for peer F of job F signed by F, expires 2026-11-27T01:00:00Z"
  std::string describe() const;
};

// A public key given on a command line: 64 hex digits, a file holding exactly one key in
// allow-list syntax, or an identity PEM file (its public half). Throws InvalidArgumentError
// naming `what` (IoError / AuthError for an unreadable file or a bad PEM).
PeerId read_public_key(std::string_view hex_or_path, std::string_view what);

struct CoordinatorOptions {
  std::string bind_endpoint = "tcp://127.0.0.1:7400";
  net::AllowList allowed;  // the job's members
  // Keys whose join tokens admit peers that are not on `allowed`. Empty: tokens are refused and
  // only `allowed` peers can connect. Otherwise any key may connect (admit_any_key is set on
  // the control server), but only listed peers and peers whose QuorumRequest carries a valid
  // token for their own key are admitted; everything else from other keys is refused and
  // counted (CoordinatorStatus::refused).
  net::AllowList job_owners;
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
  uint64_t joins_admitted = 0;  // peers admitted with a join token (again after each expiry or restart)
  uint64_t refused = 0;         // messages refused from peers that are not admitted
  uint64_t state_divergences = 0;  // quorums whose members sent different state digests (R10)
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
