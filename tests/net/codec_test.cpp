// Bounded decoding of the Cap'n Proto message header: every malformed input is a
// ProtocolError, never a crash or an out-of-bounds read.
#include <capnp/message.h>
#include <capnp/serialize.h>
#include <gtest/gtest.h>

#include <random>

#include "message.capnp.h"
#include "net/codec.h"

using namespace meshtrain;
using namespace meshtrain::net;

namespace {

WireHeader sample() {
  WireHeader w;
  w.header.type = 300;
  w.header.sender = crypto::Identity::generate().public_key();
  w.header.quorum_id = 11;
  w.header.step = 12;
  w.header.op_seq = 13;
  w.header.tag = 14;
  w.header.payload_bytes = 1000;
  w.part_offset = 100;
  w.part_bytes = 900;
  return w;
}

std::vector<uint8_t> encode_raw(size_t sender_bytes, uint64_t payload, uint64_t offset, uint64_t part) {
  capnp::MallocMessageBuilder b;
  auto h = b.initRoot<wire::MessageHeader>();
  std::vector<uint8_t> sender(sender_bytes, 7);
  h.setSender(capnp::Data::Reader(sender.data(), sender.size()));
  h.setPayloadBytes(payload);
  h.setPartOffset(offset);
  h.setPartBytes(part);
  auto words = capnp::messageToFlatArray(b);
  auto bytes = words.asBytes();
  return std::vector<uint8_t>(bytes.begin(), bytes.end());
}

}  // namespace

TEST(Codec, RoundTripKeepsEveryField) {
  Limits limits;
  WireHeader w = sample();
  WireHeader r = decode_header(encode_header(w), limits, limits.max_bulk_payload_bytes, "test");
  EXPECT_EQ(r.header.type, 300);
  EXPECT_EQ(r.header.sender, w.header.sender);
  EXPECT_EQ(r.header.quorum_id, 11u);
  EXPECT_EQ(r.header.step, 12u);
  EXPECT_EQ(r.header.op_seq, 13u);
  EXPECT_EQ(r.header.tag, 14u);
  EXPECT_EQ(r.header.payload_bytes, 1000u);
  EXPECT_EQ(r.part_offset, 100u);
  EXPECT_EQ(r.part_bytes, 900u);
}

TEST(Codec, TruncatedHeaderRejected) {
  Limits limits;
  auto bytes = encode_header(sample());
  for (size_t cut = 0; cut < bytes.size(); ++cut) {
    std::vector<uint8_t> part(bytes.begin(), bytes.begin() + cut);
    EXPECT_THROW(decode_header(part, limits, limits.max_bulk_payload_bytes, "test"), ProtocolError) << cut;
  }
}

TEST(Codec, OversizedHeaderRejectedBeforeParsing) {
  Limits limits;
  limits.max_header_bytes = 64;
  auto bytes = encode_raw(1000, 0, 0, 0);
  try {
    decode_header(bytes, limits, 1 << 20, "peer abc");
    FAIL() << "accepted";
  } catch (const OversizedError& e) {
    EXPECT_NE(std::string(e.what()).find("limit 64"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("peer abc"), std::string::npos) << e.what();
  }
}

TEST(Codec, TraversalLimitStopsHugeFields) {
  Limits limits;
  limits.max_header_bytes = 1 << 20;
  limits.capnp_traversal_limit_words = 64;
  auto bytes = encode_raw(8000, 0, 0, 0);
  EXPECT_THROW(decode_header(bytes, limits, 1 << 20, "test"), ProtocolError);
}

TEST(Codec, WrongSenderLengthRejected) {
  Limits limits;
  for (size_t n : {0, 31, 33}) {
    try {
      decode_header(encode_raw(n, 0, 0, 0), limits, 1 << 20, "test");
      FAIL() << n;
    } catch (const ProtocolError& e) {
      EXPECT_NE(std::string(e.what()).find("sender"), std::string::npos) << e.what();
    }
  }
}

TEST(Codec, PayloadAndPartBoundsChecked) {
  Limits limits;
  EXPECT_THROW(decode_header(encode_raw(32, 2000, 0, 2000), limits, 1000, "test"), OversizedError);
  EXPECT_THROW(decode_header(encode_raw(32, 1000, 900, 200), limits, 1 << 20, "test"), ProtocolError);
  EXPECT_THROW(decode_header(encode_raw(32, 1000, 1001, 0), limits, 1 << 20, "test"), ProtocolError);
  EXPECT_THROW(decode_header(encode_raw(32, UINT64_MAX, UINT64_MAX - 1, 5), limits, UINT64_MAX, "test"),
               ProtocolError);
  EXPECT_NO_THROW(decode_header(encode_raw(32, 1000, 1000, 0), limits, 1 << 20, "test"));
}

TEST(Codec, RandomBytesNeverCrash) {
  Limits limits;
  std::mt19937_64 rng(42);
  auto good = encode_header(sample());
  int decoded = 0;
  for (int i = 0; i < 5000; ++i) {
    std::vector<uint8_t> bytes = good;
    // Mutate a few bytes (structured fuzzing) or use pure noise.
    if (i % 2 == 0) {
      for (int k = 0; k < 3; ++k) bytes[rng() % bytes.size()] = static_cast<uint8_t>(rng());
    } else {
      bytes.resize(8 * (1 + rng() % 16));
      for (auto& b : bytes) b = static_cast<uint8_t>(rng());
    }
    try {
      decode_header(bytes, limits, limits.max_bulk_payload_bytes, "fuzz");
      ++decoded;
    } catch (const ProtocolError&) {
    }
  }
  EXPECT_GT(decoded, 0);  // some single-byte mutations (e.g. in a counter field) stay valid
}
