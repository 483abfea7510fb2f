// Helpers shared by the Cap'n Proto codecs of lib/*/protocol.cpp: flat encoding, bounded
// decoding that turns every Cap'n Proto failure into a ProtocolError naming the source, and
// field conversions with their own checks.
#pragma once

#include <capnp/message.h>
#include <capnp/serialize.h>
#include <kj/exception.h>

#include <cstring>
#include <string>
#include <string_view>
#include <vector>

#include "meshtrain/core.h"
#include "meshtrain/crypto.h"

namespace meshtrain::wire {

inline std::vector<uint8_t> to_bytes(capnp::MessageBuilder& builder) {
  auto words = capnp::messageToFlatArray(builder);
  auto bytes = words.asBytes();
  return std::vector<uint8_t>(bytes.begin(), bytes.end());
}

// A message whose root of type Root is filled by `fill(Root::Builder)`, as flat bytes.
template <typename Root, typename Fill>
std::vector<uint8_t> build_message(Fill fill) {
  capnp::MallocMessageBuilder builder;
  fill(builder.initRoot<Root>());
  return to_bytes(builder);
}

inline capnp::Data::Reader data_of(const crypto::PublicKey& key) {
  return capnp::Data::Reader(key.bytes.data(), key.bytes.size());
}

inline capnp::Data::Reader data_of(const crypto::Signature& signature) {
  return capnp::Data::Reader(signature.data(), signature.size());
}

inline crypto::PublicKey key_of(capnp::Data::Reader d, std::string_view field, std::string_view source) {
  if (d.size() != crypto::kEd25519PublicKeyBytes)
    throw ProtocolError(fmt::format("{}: field '{}' is {} bytes, expected a 32-byte public key", source, field, d.size()));
  crypto::PublicKey key;
  std::memcpy(key.bytes.data(), d.begin(), d.size());
  return key;
}

inline crypto::Signature signature_of(capnp::Data::Reader d, std::string_view field, std::string_view source) {
  if (d.size() != crypto::kEd25519SignatureBytes)
    throw ProtocolError(fmt::format("{}: field '{}' is {} bytes, expected a 64-byte signature", source, field, d.size()));
  crypto::Signature signature;
  std::memcpy(signature.data(), d.begin(), d.size());
  return signature;
}

inline std::string text_of(capnp::Text::Reader t, size_t max_bytes, std::string_view field, std::string_view source) {
  if (t.size() > max_bytes)
    throw ProtocolError(fmt::format("{}: field '{}' is {} bytes (limit {})", source, field, t.size(), max_bytes));
  return std::string(t.cStr(), t.size());
}

struct ReadLimits {
  uint64_t traversal_limit_words = 1 << 16;
  int nesting_limit = 8;
};

// Runs `read` on the root of `bytes`, turning every Cap'n Proto failure into a ProtocolError.
template <typename Root, typename Fn>
auto read_message(crypto::ByteSpan bytes, std::string_view what, std::string_view source, Fn read,
                  ReadLimits limits = {}) {
  if (bytes.empty() || bytes.size() % sizeof(capnp::word) != 0)
    throw ProtocolError(fmt::format("{}: {} of {} bytes is not a whole number of words", source, what, bytes.size()));
  kj::Array<capnp::word> words = kj::heapArray<capnp::word>(bytes.size() / sizeof(capnp::word));
  std::memcpy(words.begin(), bytes.data(), bytes.size());
  capnp::ReaderOptions options;
  options.traversalLimitInWords = limits.traversal_limit_words;
  options.nestingLimit = limits.nesting_limit;
  try {
    capnp::FlatArrayMessageReader reader(words.asPtr(), options);
    return read(reader.getRoot<Root>());
  } catch (const kj::Exception& e) {
    throw ProtocolError(fmt::format("{}: undecodable {}: {}", source, what, e.getDescription().cStr()));
  }
}

}  // namespace meshtrain::wire
