// AEAD record protection: AES-256-GCM or ChaCha20-Poly1305 with a counter nonce.
//
// Each AeadRecordCipher owns one EVP_CIPHER_CTX keyed once in the constructor. Per record only
// the IV is set (EVP_CipherInit_ex with a NULL cipher and key keeps the key schedule), so the
// hot path does no allocation and no key expansion.
//
// Record numbering: every seal() or open() call that gets past its argument checks consumes one
// record number, whether it succeeds or not. A nonce is therefore never used twice, even for a
// seal() that failed half-way, and after a failed open() the stream is out of step for good:
// the caller must drop the stream, which is what a tag failure calls for anyway.
#include <algorithm>
#include <climits>
#include <functional>

#include "crypto/ossl.h"
#include "meshtrain/core.h"
#include "meshtrain/crypto.h"

namespace meshtrain::crypto {

using namespace detail;

std::string_view aead_name(AeadAlgorithm algorithm) noexcept {
  switch (algorithm) {
    case AeadAlgorithm::Aes256Gcm: return "AES-256-GCM";
    case AeadAlgorithm::ChaCha20Poly1305: return "ChaCha20-Poly1305";
  }
  return "unknown";
}

struct AeadRecordCipher::Impl {
  CipherCtxPtr ctx;
  AeadAlgorithm algorithm;
  std::array<uint8_t, kAeadNonceBytes> nonce{};  // salt(4) || counter(8, big-endian)
};

namespace {

constexpr int kMaxChunk = 1 << 30;  // EVP_*Update takes an int length

void set_counter(std::array<uint8_t, kAeadNonceBytes>& nonce, uint64_t counter) {
  for (int i = 0; i < 8; ++i) nonce[4 + i] = static_cast<uint8_t>(counter >> (56 - 8 * i));
}

bool overlaps(const uint8_t* a, size_t an, const uint8_t* b, size_t bn) {
  std::less<const uint8_t*> lt;
  return an != 0 && bn != 0 && lt(a, b + bn) && lt(b, a + an);
}

}  // namespace

AeadRecordCipher::AeadRecordCipher(AeadAlgorithm algorithm, ByteSpan key32, ByteSpan nonce_salt4)
    : impl_(std::make_unique<Impl>()) {
  const EVP_CIPHER* cipher = nullptr;
  switch (algorithm) {
    case AeadAlgorithm::Aes256Gcm: cipher = EVP_aes_256_gcm(); break;
    case AeadAlgorithm::ChaCha20Poly1305: cipher = EVP_chacha20_poly1305(); break;
  }
  if (!cipher)
    throw InvalidArgumentError(
        fmt::format("AeadRecordCipher: unknown algorithm {}", static_cast<int>(algorithm)));
  if (key32.size() != kAeadKeyBytes)
    throw InvalidArgumentError(fmt::format("AeadRecordCipher: {} key is {} bytes, expected {}",
                                           aead_name(algorithm), key32.size(), kAeadKeyBytes));
  if (nonce_salt4.size() != 4)
    throw InvalidArgumentError(
        fmt::format("AeadRecordCipher: nonce salt is {} bytes, expected 4", nonce_salt4.size()));

  impl_->algorithm = algorithm;
  std::copy(nonce_salt4.begin(), nonce_salt4.end(), impl_->nonce.begin());
  impl_->ctx.reset(EVP_CIPHER_CTX_new());
  if (!impl_->ctx) throw_openssl("AeadRecordCipher: EVP_CIPHER_CTX_new");
  // Key once; the IV is set per record. Both ciphers default to a 12-byte IV.
  if (EVP_CipherInit_ex(impl_->ctx.get(), cipher, nullptr, key32.data(), nullptr, 1) != 1)
    throw_openssl(fmt::format("AeadRecordCipher: {} init", aead_name(algorithm)));
  if (EVP_CIPHER_CTX_get_iv_length(impl_->ctx.get()) != static_cast<int>(kAeadNonceBytes))
    throw InternalError(fmt::format("AeadRecordCipher: {} IV length is {}, expected {}",
                                    aead_name(algorithm), EVP_CIPHER_CTX_get_iv_length(impl_->ctx.get()),
                                    kAeadNonceBytes));
}

AeadRecordCipher::~AeadRecordCipher() = default;
AeadRecordCipher::AeadRecordCipher(AeadRecordCipher&&) noexcept = default;
AeadRecordCipher& AeadRecordCipher::operator=(AeadRecordCipher&&) noexcept = default;

void AeadRecordCipher::seal(ByteSpan aad, ByteSpan in, MutableByteSpan out,
                            std::span<uint8_t, kAeadTagBytes> tag) {
  if (!impl_) throw InvalidArgumentError("AeadRecordCipher::seal on a moved-from cipher");
  if (in.size() != out.size())
    throw InvalidArgumentError(
        fmt::format("AeadRecordCipher::seal: output is {} bytes, input {}", out.size(), in.size()));
  if (in.data() != out.data() && overlaps(in.data(), in.size(), out.data(), out.size()))
    throw InvalidArgumentError("AeadRecordCipher::seal: input and output overlap without being the same buffer");
  if (counter_ == UINT64_MAX)
    throw InvalidArgumentError("AeadRecordCipher::seal: record counter exhausted; rekey the stream");

  EVP_CIPHER_CTX* ctx = impl_->ctx.get();
  const uint64_t record = counter_++;
  set_counter(impl_->nonce, record);
  if (EVP_EncryptInit_ex(ctx, nullptr, nullptr, nullptr, impl_->nonce.data()) != 1)
    throw_openssl("AeadRecordCipher::seal: set IV");
  int len = 0;
  for (size_t off = 0; off < aad.size();) {
    int n = static_cast<int>(std::min<size_t>(aad.size() - off, kMaxChunk));
    if (EVP_EncryptUpdate(ctx, nullptr, &len, aad.data() + off, n) != 1)
      throw_openssl("AeadRecordCipher::seal: AAD");
    off += static_cast<size_t>(n);
  }
  size_t written = 0;
  for (size_t off = 0; off < in.size();) {
    int n = static_cast<int>(std::min<size_t>(in.size() - off, kMaxChunk));
    if (EVP_EncryptUpdate(ctx, out.data() + written, &len, in.data() + off, n) != 1)
      throw_openssl("AeadRecordCipher::seal: encrypt");
    off += static_cast<size_t>(n);
    written += static_cast<size_t>(len);
  }
  uint8_t final_block[32];
  if (EVP_EncryptFinal_ex(ctx, final_block, &len) != 1)
    throw_openssl("AeadRecordCipher::seal: final");
  if (written + static_cast<size_t>(len) != out.size())  // stream modes: Final writes nothing
    throw InternalError(fmt::format("AeadRecordCipher::seal: wrote {} bytes of {}", written + len, out.size()));
  if (EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_GET_TAG, static_cast<int>(kAeadTagBytes), tag.data()) != 1)
    throw_openssl("AeadRecordCipher::seal: get tag");
}

void AeadRecordCipher::open(ByteSpan aad, MutableByteSpan data,
                            std::span<const uint8_t, kAeadTagBytes> tag, std::string_view what) {
  if (!impl_) throw InvalidArgumentError(fmt::format("{}: AeadRecordCipher::open on a moved-from cipher", what));
  if (counter_ == UINT64_MAX)
    throw InvalidArgumentError(fmt::format("{}: record counter exhausted; rekey the stream", what));

  EVP_CIPHER_CTX* ctx = impl_->ctx.get();
  const uint64_t record = counter_++;
  set_counter(impl_->nonce, record);
  if (EVP_DecryptInit_ex(ctx, nullptr, nullptr, nullptr, impl_->nonce.data()) != 1)
    throw_openssl(fmt::format("{}: record {}: set IV", what, record));
  std::array<uint8_t, kAeadTagBytes> expected;
  std::copy(tag.begin(), tag.end(), expected.begin());
  if (EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_SET_TAG, static_cast<int>(kAeadTagBytes), expected.data()) != 1)
    throw_openssl(fmt::format("{}: record {}: set tag", what, record));
  int len = 0;
  for (size_t off = 0; off < aad.size();) {
    int n = static_cast<int>(std::min<size_t>(aad.size() - off, kMaxChunk));
    if (EVP_DecryptUpdate(ctx, nullptr, &len, aad.data() + off, n) != 1)
      throw_openssl(fmt::format("{}: record {}: AAD", what, record));
    off += static_cast<size_t>(n);
  }
  for (size_t off = 0; off < data.size();) {
    int n = static_cast<int>(std::min<size_t>(data.size() - off, kMaxChunk));
    if (EVP_DecryptUpdate(ctx, data.data() + off, &len, data.data() + off, n) != 1 || len != n)
      throw_openssl(fmt::format("{}: record {}: decrypt", what, record));
    off += static_cast<size_t>(n);
  }
  uint8_t final_block[32];
  if (EVP_DecryptFinal_ex(ctx, final_block, &len) != 1) {
    ERR_clear_error();
    throw CorruptError(fmt::format(
        "{}: record {} failed its {} tag check (tampered, replayed, reordered or dropped record)",
        what, record, aead_name(impl_->algorithm)));
  }
}

}  // namespace meshtrain::crypto
