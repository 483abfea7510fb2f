// Internal: the payload header shared by every codec, and the size each codec's body has.
//
// Layout (little-endian, 32 bytes, then the codec's body; docs/compression.md has the table):
//   0  u32 magic "MTC1"     8  u64 count (elements)     24 u64 param_b
//   4  u8  codec id        16  u64 param_a
//   5  u8  version (1)
//   6  u8  flags
//   7  u8  reserved (0)
#pragma once

#include <bit>
#include <cstring>
#include <span>

#include "meshtrain/compress.h"

namespace meshtrain::compress::detail {

static_assert(std::endian::native == std::endian::little, "payloads are little-endian");

constexpr uint32_t kMagic = 0x3143544d;  // "MTC1"
constexpr uint8_t kVersion = 1;
// Larger tensors are refused, so that every size computation below stays far from overflow.
constexpr uint64_t kMaxCount = uint64_t(1) << 48;
constexpr uint32_t kMaxInt8Block = 1u << 20;
constexpr uint32_t kMaxPowerSgdRank = 64;

struct Header {
  CodecId codec = CodecId::None;
  uint8_t flags = 0;
  uint64_t count = 0;
  uint64_t param_a = 0;
  uint64_t param_b = 0;
};

// Payload bytes implied by a header (header included). Throws ProtocolError naming the field
// when the header is inconsistent (unknown codec, bad flags or parameters, count too large).
size_t payload_bytes(const Header& h);

// Writes the header into out[0, 32). out.size() >= 32 is the caller's to ensure.
void write_header(std::span<uint8_t> out, const Header& h);

// Parses and checks a payload's header against its length: ProtocolError when short,
// malformed, or when payload.size() != payload_bytes(header).
Header read_header(std::span<const uint8_t> payload);

// read_header plus: the codec is `expected` and the element count is `count`.
Header read_header_for(std::span<const uint8_t> payload, CodecId expected, size_t count);

// Unaligned little-endian loads and stores into payload bytes.
template <typename T>
inline T load(const uint8_t* p, size_t i) {
  T v;
  std::memcpy(&v, p + i * sizeof(T), sizeof(T));
  return v;
}
template <typename T>
inline void store(uint8_t* p, size_t i, T v) {
  std::memcpy(p + i * sizeof(T), &v, sizeof(T));
}

}  // namespace meshtrain::compress::detail
