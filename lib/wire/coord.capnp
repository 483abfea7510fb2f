@0xfb5a4e877e79989d;
# Messages between job members and meshtrain-coordinator, on the control path. Each travels as
# the payload of a net::MessageHeader whose type is one of coord::MessageKind.

$import "/capnp/c++.capnp".namespace("meshtrain::wire");

struct Member {
  id @0 :Data;            # Ed25519 public key, 32 bytes
  host @1 :Text;          # bulk listener address
  port @2 :UInt16;
  rank @3 :UInt32;
  contributes @4 :Bool;   # false for a joiner that receives state this step
}

# Member -> coordinator: "I am ready for step `step`". Also (re)registers the member, which is
# how a restarted coordinator rebuilds the job, and reports a failed attempt.
struct QuorumRequest {
  step @0 :UInt64;
  host @1 :Text;
  port @2 :UInt16;
  hasState @3 :Bool;          # false: a joiner (or a straggler) that needs the current state
  failedQuorumId @4 :UInt64;  # nonzero: the attempt with this quorum failed ...
  lost @5 :List(Data);        # ... because these peers were lost
  joinToken @6 :Data;         # a peer not on the allow-list: its join token (binary form)
  stateDigest @7 :Data;       # empty, or SHA-256 (32 bytes) of the member's parameters before `step`
}

# Coordinator -> member: the quorum for a step.
struct Quorum {
  quorumId @0 :UInt64;
  step @1 :UInt64;
  members @2 :List(Member);   # ordered by rank
  stateSourceRank @3 :Int32;  # rank that broadcasts state to joiners this step; -1: none
  divergent @4 :List(Data);   # members whose state digest differs from the majority's
}

# Coordinator -> member: you missed `missedStep`; request `nextStep` without state.
struct Rejoin {
  missedStep @0 :UInt64;
  nextStep @1 :UInt64;
  reason @2 :Text;
}

# Coordinator -> members of a quorum: stop the operation of this attempt.
struct Abort {
  quorumId @0 :UInt64;
  step @1 :UInt64;
  lost @2 :List(Data);
  reason @3 :Text;
}

# Coordinator -> a peer it does not admit (no join token, or an invalid one).
struct Refusal {
  problem @0 :UInt8;      # coord::JoinTokenProblem
  reason @1 :Text;
}
