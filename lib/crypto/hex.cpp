// Hex encoding and PublicKey's parsing and printing.
#include <algorithm>

#include "crypto/ossl.h"
#include "meshtrain/core.h"
#include "meshtrain/crypto.h"

namespace meshtrain::crypto {
namespace {

constexpr char kHexDigits[] = "0123456789abcdef";

int hex_value(char c) noexcept {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

}  // namespace

std::string to_hex(ByteSpan bytes) {
  std::string out(bytes.size() * 2, '\0');
  for (size_t i = 0; i < bytes.size(); ++i) {
    out[2 * i] = kHexDigits[bytes[i] >> 4];
    out[2 * i + 1] = kHexDigits[bytes[i] & 0x0f];
  }
  return out;
}

Bytes from_hex(std::string_view hex, std::string_view what) {
  if (hex.size() % 2 != 0)
    throw InvalidArgumentError(
        fmt::format("{}: hex string has odd length {}", what, hex.size()));
  Bytes out(hex.size() / 2);
  for (size_t i = 0; i < out.size(); ++i) {
    int hi = hex_value(hex[2 * i]);
    int lo = hex_value(hex[2 * i + 1]);
    if (hi < 0 || lo < 0) {
      size_t bad = hi < 0 ? 2 * i : 2 * i + 1;
      unsigned char c = static_cast<unsigned char>(hex[bad]);
      throw InvalidArgumentError(
          c >= 0x20 && c < 0x7f
              ? fmt::format("{}: non-hex character '{}' at offset {}", what, static_cast<char>(c), bad)
              : fmt::format("{}: non-hex byte 0x{:02x} at offset {}", what, c, bad));
    }
    out[i] = static_cast<uint8_t>(hi << 4 | lo);
  }
  return out;
}

PublicKey PublicKey::from_bytes(ByteSpan raw, std::string_view what) {
  if (raw.size() != kEd25519PublicKeyBytes)
    throw InvalidArgumentError(fmt::format("{}: Ed25519 public key is {} bytes, expected {}", what,
                                           raw.size(), kEd25519PublicKeyBytes));
  PublicKey key;
  std::copy(raw.begin(), raw.end(), key.bytes.begin());
  return key;
}

PublicKey PublicKey::from_hex(std::string_view hex, std::string_view what) {
  if (hex.size() != 2 * kEd25519PublicKeyBytes)
    throw InvalidArgumentError(fmt::format("{}: Ed25519 public key is {} hex characters, expected {}",
                                           what, hex.size(), 2 * kEd25519PublicKeyBytes));
  return from_bytes(crypto::from_hex(hex, what), what);
}

std::string PublicKey::hex() const { return to_hex(bytes); }

std::string PublicKey::fingerprint() const {
  Digest d = sha256(bytes);
  return to_hex(ByteSpan(d.data(), 8));
}

}  // namespace meshtrain::crypto
