#include "net/codec.h"

#include <capnp/message.h>
#include <capnp/serialize.h>
#include <kj/exception.h>

#include <cstring>

#include "message.capnp.h"

namespace meshtrain::net {

std::vector<uint8_t> encode_header(const WireHeader& w) {
  capnp::MallocMessageBuilder builder(64);
  auto h = builder.initRoot<wire::MessageHeader>();
  h.setType(w.header.type);
  h.setSender(capnp::Data::Reader(w.header.sender.bytes.data(), w.header.sender.bytes.size()));
  h.setQuorumId(w.header.quorum_id);
  h.setStep(w.header.step);
  h.setOpSeq(w.header.op_seq);
  h.setTag(w.header.tag);
  h.setPayloadBytes(w.header.payload_bytes);
  h.setPartOffset(w.part_offset);
  h.setPartBytes(w.part_bytes);
  auto words = capnp::messageToFlatArray(builder);
  auto bytes = words.asBytes();
  return std::vector<uint8_t>(bytes.begin(), bytes.end());
}

WireHeader decode_header(crypto::ByteSpan bytes, const Limits& limits, uint64_t max_payload_bytes,
                         std::string_view source) {
  if (bytes.size() > limits.max_header_bytes)
    throw OversizedError(fmt::format("{} sent a {}-byte header (limit {})", source, bytes.size(),
                                    limits.max_header_bytes));
  if (bytes.empty() || bytes.size() % sizeof(capnp::word) != 0)
    throw ProtocolError(fmt::format("{} sent a header of {} bytes, not a whole number of 8-byte words",
                                    source, bytes.size()));
  // Cap'n Proto reads words in place; copy into aligned storage (headers are small).
  kj::Array<capnp::word> words = kj::heapArray<capnp::word>(bytes.size() / sizeof(capnp::word));
  std::memcpy(words.begin(), bytes.data(), bytes.size());
  capnp::ReaderOptions options;
  options.traversalLimitInWords = limits.capnp_traversal_limit_words;
  options.nestingLimit = limits.capnp_nesting_limit;
  WireHeader w;
  try {
    capnp::FlatArrayMessageReader reader(words.asPtr(), options);
    auto h = reader.getRoot<wire::MessageHeader>();
    auto sender = h.getSender();
    if (sender.size() != crypto::kEd25519PublicKeyBytes)
      throw ProtocolError(fmt::format("{} sent a header whose sender field is {} bytes (expected 32)",
                                      source, sender.size()));
    std::memcpy(w.header.sender.bytes.data(), sender.begin(), sender.size());
    w.header.type = h.getType();
    w.header.quorum_id = h.getQuorumId();
    w.header.step = h.getStep();
    w.header.op_seq = h.getOpSeq();
    w.header.tag = h.getTag();
    w.header.payload_bytes = h.getPayloadBytes();
    w.part_offset = h.getPartOffset();
    w.part_bytes = h.getPartBytes();
  } catch (const kj::Exception& e) {
    throw ProtocolError(fmt::format("{} sent an undecodable header: {}", source, e.getDescription().cStr()));
  }
  if (w.header.payload_bytes > max_payload_bytes)
    throw OversizedError(fmt::format("{} announced a payload of {} bytes (limit {})", source,
                                    w.header.payload_bytes, max_payload_bytes));
  if (w.part_offset > w.header.payload_bytes || w.part_bytes > w.header.payload_bytes - w.part_offset)
    throw ProtocolError(fmt::format("{} sent a part [{}, +{}) outside its {}-byte payload", source,
                                    w.part_offset, w.part_bytes, w.header.payload_bytes));
  return w;
}

}  // namespace meshtrain::net
