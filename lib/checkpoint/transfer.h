// The live state transfer's messages (docs/checkpoints.md, "Live state transfer"). Internal;
// exposed to tests that play a misbehaving sender.
#pragma once

#include <cstdint>

namespace meshtrain::checkpoint::transfer {

// Message types on the bulk channel (net::MessageHeader::type).
inline constexpr uint16_t kOffer = 3072;     // sender: step, quorum_id = total bytes, op_seq = manifest bytes, tag = format version
inline constexpr uint16_t kAnswer = 3073;    // receiver: tag = Verdict (Ok: send the state; else refused)
inline constexpr uint16_t kManifest = 3074;  // sender: the manifest JSON
inline constexpr uint16_t kBlock = 3075;     // sender: op_seq = block index over all shards, payload = the block
inline constexpr uint16_t kVerdict = 3076;   // receiver: tag = Verdict, op_seq = the failed block

enum Verdict : uint32_t {
  kOk = 0,
  kTooLarge = 1,       // offer over the receiver's limits
  kBadVersion = 2,     // format version not supported
  kBadManifest = 3,    // manifest malformed or inconsistent with the offer
  kBadBlock = 4,       // a block failed its SHA-256 check (op_seq names it)
};

}  // namespace meshtrain::checkpoint::transfer
