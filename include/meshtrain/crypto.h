// meshtrain crypto: Ed25519 identities, SHA-256, secure random, X25519 key exchange, HKDF and
// AEAD record sealing. All of it on OpenSSL 3 EVP; no OpenSSL type appears in this header.
//
// Wrong-length or malformed keys and signatures throw AuthError / InvalidArgumentError with a
// message naming the field and the expected length.
#pragma once

#include <array>
#include <compare>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace meshtrain::crypto {

using Bytes = std::vector<uint8_t>;
using ByteSpan = std::span<const uint8_t>;
using MutableByteSpan = std::span<uint8_t>;

inline constexpr size_t kEd25519PublicKeyBytes = 32;
inline constexpr size_t kEd25519SignatureBytes = 64;
inline constexpr size_t kX25519KeyBytes = 32;
inline constexpr size_t kSha256Bytes = 32;
inline constexpr size_t kAeadKeyBytes = 32;
inline constexpr size_t kAeadTagBytes = 16;
inline constexpr size_t kAeadNonceBytes = 12;

using Digest = std::array<uint8_t, kSha256Bytes>;
using Signature = std::array<uint8_t, kEd25519SignatureBytes>;
using X25519Key = std::array<uint8_t, kX25519KeyBytes>;

std::string to_hex(ByteSpan bytes);
// Throws InvalidArgumentError naming `what` on odd length or a non-hex character.
Bytes from_hex(std::string_view hex, std::string_view what = "hex string");

// An Ed25519 public key: a peer's identity everywhere in meshtrain (PeerId).
struct PublicKey {
  std::array<uint8_t, kEd25519PublicKeyBytes> bytes{};

  // Throws InvalidArgumentError if `raw` is not exactly 32 bytes.
  static PublicKey from_bytes(ByteSpan raw, std::string_view what = "public key");
  static PublicKey from_hex(std::string_view hex, std::string_view what = "public key");
  std::string hex() const;  // 64 hex characters
  // Short printable id for logs and errors: first 8 bytes of SHA-256(key) in hex (16 chars).
  std::string fingerprint() const;

  auto operator<=>(const PublicKey&) const = default;
};
using PeerId = PublicKey;

// Throws AuthError naming `what` when the signature is the wrong length or does not verify.
void verify(const PublicKey& key, ByteSpan message, ByteSpan signature, std::string_view what);
// The same check without an exception; false for a wrong-length signature too.
bool is_valid_signature(const PublicKey& key, ByteSpan message, ByteSpan signature) noexcept;

// An Ed25519 key pair. Movable, not copyable; the private key never leaves the object except
// through save_pem() and curve_secret().
class Identity {
 public:
  static Identity generate();
  // Reads a PKCS#8 PEM private key. Throws IoError (unreadable file), AuthError (not an Ed25519
  // key, or malformed PEM), both naming the path. Warns when the file is readable by others.
  static Identity load_pem(const std::filesystem::path& path);
  static Identity from_seed(ByteSpan seed32);

  Identity(Identity&&) noexcept;
  Identity& operator=(Identity&&) noexcept;
  ~Identity();

  // Writes the private key as PKCS#8 PEM with permissions 0600 (created so, never widened),
  // through a temporary file and rename.
  void save_pem(const std::filesystem::path& path) const;
  const PublicKey& public_key() const { return public_key_; }
  Signature sign(ByteSpan message) const;

  // The X25519 (Curve25519) secret scalar that belongs to this Ed25519 key: the clamped first
  // half of SHA-512(seed), as libsodium's crypto_sign_ed25519_sk_to_curve25519 computes it.
  // Its public half equals ed25519_to_x25519_public(public_key()). Used for CurveZMQ.
  X25519Key curve_secret() const;

 private:
  struct Impl;
  explicit Identity(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
  PublicKey public_key_;
};

// Maps an Ed25519 public key to its X25519 (Montgomery u) public key: u = (1 + y) / (1 - y)
// mod 2^255-19. Throws AuthError for a key that is not a valid curve point encoding.
X25519Key ed25519_to_x25519_public(const PublicKey& key);
// The X25519 public key of a secret scalar.
X25519Key x25519_public_from_secret(const X25519Key& secret);

// Streaming SHA-256. update() any number of times, then finish() once.
class Sha256 {
 public:
  Sha256();
  ~Sha256();
  Sha256(const Sha256&) = delete;
  Sha256& operator=(const Sha256&) = delete;
  void update(ByteSpan data);
  Digest finish();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};
Digest sha256(ByteSpan data);

// Fills `out` from OpenSSL's CSPRNG; throws InternalError if it cannot.
void random_bytes(MutableByteSpan out);

// An ephemeral X25519 key pair for one key exchange.
class X25519KeyPair {
 public:
  static X25519KeyPair generate();
  const X25519Key& public_key() const { return public_; }
  // Throws AuthError for a peer key that yields an all-zero (low-order) shared secret.
  X25519Key shared_secret(const X25519Key& peer_public) const;

 private:
  X25519Key secret_{};
  X25519Key public_{};
};

// HKDF-SHA256 (RFC 5869).
Bytes hkdf_sha256(ByteSpan input_key, ByteSpan salt, ByteSpan info, size_t out_bytes);

enum class AeadAlgorithm : uint8_t { Aes256Gcm = 1, ChaCha20Poly1305 = 2 };
std::string_view aead_name(AeadAlgorithm algorithm) noexcept;

// One direction of an AEAD-protected record stream. The nonce is a 4-byte direction salt
// followed by a 64-bit record counter that starts at 0 and increments after every record, so a
// nonce never repeats under one key; the receiver derives the same counter, so a replayed,
// dropped or reordered record fails its tag check. Not thread-safe: one per stream direction.
class AeadRecordCipher {
 public:
  AeadRecordCipher(AeadAlgorithm algorithm, ByteSpan key32, ByteSpan nonce_salt4);
  ~AeadRecordCipher();
  AeadRecordCipher(AeadRecordCipher&&) noexcept;
  AeadRecordCipher& operator=(AeadRecordCipher&&) noexcept;

  // Encrypts `in` into `out` (same size; may alias exactly) and writes the tag.
  void seal(ByteSpan aad, ByteSpan in, MutableByteSpan out, std::span<uint8_t, kAeadTagBytes> tag);
  // Decrypts in place; throws CorruptError naming `what` and the record number when the tag
  // does not match (tampered, replayed or reordered record). The buffer content is unspecified
  // after a failure. Every seal() or open() that passes its argument checks uses up one record
  // number, failed or not, so after a failed open() the stream is out of step: drop it.
  void open(ByteSpan aad, MutableByteSpan data, std::span<const uint8_t, kAeadTagBytes> tag,
            std::string_view what);
  uint64_t records() const { return counter_; }

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
  uint64_t counter_ = 0;
};

}  // namespace meshtrain::crypto
