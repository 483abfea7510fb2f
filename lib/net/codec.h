// Encoding and bounded decoding of the Cap'n Proto message header (lib/wire/message.capnp).
#pragma once

#include <cstdint>
#include <vector>

#include "meshtrain/net.h"

namespace meshtrain::net {

// The header as it travels: the public MessageHeader plus this stream's part of the payload.
struct WireHeader {
  MessageHeader header;
  uint64_t part_offset = 0;
  uint64_t part_bytes = 0;
};

std::vector<uint8_t> encode_header(const WireHeader& header);

// Decodes with the Cap'n Proto traversal/nesting limits of `limits` and checks every field:
// sender is 32 bytes, the part lies within the payload, sizes within limits. Throws
// ProtocolError naming `source` (peer or endpoint) and the field at fault.
WireHeader decode_header(crypto::ByteSpan bytes, const Limits& limits, uint64_t max_payload_bytes,
                         std::string_view source);

// A ProtocolError for a message over a Limits bound; counted apart in RejectStats.
class OversizedError : public ProtocolError {
 public:
  using ProtocolError::ProtocolError;
};

}  // namespace meshtrain::net
