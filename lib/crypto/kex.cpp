// X25519 key exchange and HKDF-SHA256.
#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/params.h>

#include <algorithm>

#include "crypto/ossl.h"
#include "meshtrain/core.h"
#include "meshtrain/crypto.h"

namespace meshtrain::crypto {

using namespace detail;

X25519Key x25519_public_from_secret(const X25519Key& secret) {
  PkeyPtr key(EVP_PKEY_new_raw_private_key(EVP_PKEY_X25519, nullptr, secret.data(), secret.size()));
  if (!key) throw_openssl("x25519_public_from_secret: EVP_PKEY_new_raw_private_key");
  X25519Key pub{};
  size_t len = pub.size();
  if (EVP_PKEY_get_raw_public_key(key.get(), pub.data(), &len) != 1 || len != pub.size())
    throw_openssl("x25519_public_from_secret: EVP_PKEY_get_raw_public_key");
  return pub;
}

X25519KeyPair X25519KeyPair::generate() {
  X25519KeyPair kp;
  random_bytes(kp.secret_);  // X25519 clamps the scalar itself (RFC 7748 5)
  kp.public_ = x25519_public_from_secret(kp.secret_);
  return kp;
}

X25519Key X25519KeyPair::shared_secret(const X25519Key& peer_public) const {
  PkeyPtr own(EVP_PKEY_new_raw_private_key(EVP_PKEY_X25519, nullptr, secret_.data(), secret_.size()));
  if (!own) throw_openssl("X25519 shared_secret: EVP_PKEY_new_raw_private_key");
  PkeyPtr peer(EVP_PKEY_new_raw_public_key(EVP_PKEY_X25519, nullptr, peer_public.data(), peer_public.size()));
  if (!peer) throw_openssl("X25519 shared_secret: EVP_PKEY_new_raw_public_key");
  PkeyCtxPtr ctx(EVP_PKEY_CTX_new_from_pkey(nullptr, own.get(), nullptr));
  if (!ctx) throw_openssl("X25519 shared_secret: EVP_PKEY_CTX_new_from_pkey");
  if (EVP_PKEY_derive_init(ctx.get()) != 1) throw_openssl("X25519 shared_secret: EVP_PKEY_derive_init");
  if (EVP_PKEY_derive_set_peer_ex(ctx.get(), peer.get(), 0) != 1)
    throw_openssl("X25519 shared_secret: EVP_PKEY_derive_set_peer_ex");
  X25519Key out{};
  size_t len = out.size();
  // OpenSSL's X25519 derive fails exactly when the result is all zero (a low-order peer key,
  // RFC 7748 6.1), so a failure here is the peer's fault, not an internal one.
  if (EVP_PKEY_derive(ctx.get(), out.data(), &len) != 1) {
    std::string detail = openssl_errors();
    throw AuthError(fmt::format(
        "X25519 key exchange: peer public key {} is low-order (all-zero shared secret): {}",
        to_hex(peer_public), detail));
  }
  static const X25519Key kZero{};
  if (len != out.size() || CRYPTO_memcmp(out.data(), kZero.data(), out.size()) == 0)
    throw AuthError(fmt::format(
        "X25519 key exchange: peer public key {} is low-order (all-zero shared secret)",
        to_hex(peer_public)));
  return out;
}

Bytes hkdf_sha256(ByteSpan input_key, ByteSpan salt, ByteSpan info, size_t out_bytes) {
  if (out_bytes > 255 * kSha256Bytes)
    throw InvalidArgumentError(fmt::format("hkdf_sha256: {} output bytes requested, at most {}",
                                           out_bytes, 255 * kSha256Bytes));
  Bytes out(out_bytes);
  if (out_bytes == 0) return out;

  static EVP_KDF* kdf = [] {
    EVP_KDF* k = EVP_KDF_fetch(nullptr, OSSL_KDF_NAME_HKDF, nullptr);
    if (!k) throw_openssl("hkdf_sha256: EVP_KDF_fetch(HKDF)");
    return k;  // kept for the life of the process
  }();
  KdfCtxPtr ctx(EVP_KDF_CTX_new(kdf));
  if (!ctx) throw_openssl("hkdf_sha256: EVP_KDF_CTX_new");

  char digest[] = "SHA256";
  OSSL_PARAM params[5];
  size_t n = 0;
  params[n++] = OSSL_PARAM_construct_utf8_string(OSSL_KDF_PARAM_DIGEST, digest, 0);
  params[n++] = OSSL_PARAM_construct_octet_string(
      OSSL_KDF_PARAM_KEY, const_cast<unsigned char*>(nonnull(input_key)), input_key.size());
  // An absent salt means HashLen zero bytes (RFC 5869 2.2), which is OpenSSL's default.
  if (!salt.empty())
    params[n++] = OSSL_PARAM_construct_octet_string(
        OSSL_KDF_PARAM_SALT, const_cast<unsigned char*>(salt.data()), salt.size());
  if (!info.empty())
    params[n++] = OSSL_PARAM_construct_octet_string(
        OSSL_KDF_PARAM_INFO, const_cast<unsigned char*>(info.data()), info.size());
  params[n] = OSSL_PARAM_construct_end();
  if (EVP_KDF_derive(ctx.get(), out.data(), out.size(), params) != 1)
    throw_openssl("hkdf_sha256: EVP_KDF_derive");
  return out;
}

}  // namespace meshtrain::crypto
