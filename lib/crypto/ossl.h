// Internal to lib/crypto: RAII owners for OpenSSL objects and OpenSSL error reporting.
#pragma once

#include <openssl/bn.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/kdf.h>
#include <openssl/bio.h>

#include <memory>
#include <string>
#include <string_view>

#include "meshtrain/crypto.h"

namespace meshtrain::crypto::detail {

template <typename T, void (*Free)(T*)>
struct OsslDeleter {
  void operator()(T* p) const noexcept { Free(p); }
};
inline void bio_free(BIO* b) { BIO_free_all(b); }

using PkeyPtr = std::unique_ptr<EVP_PKEY, OsslDeleter<EVP_PKEY, EVP_PKEY_free>>;
using PkeyCtxPtr = std::unique_ptr<EVP_PKEY_CTX, OsslDeleter<EVP_PKEY_CTX, EVP_PKEY_CTX_free>>;
using MdCtxPtr = std::unique_ptr<EVP_MD_CTX, OsslDeleter<EVP_MD_CTX, EVP_MD_CTX_free>>;
using CipherCtxPtr = std::unique_ptr<EVP_CIPHER_CTX, OsslDeleter<EVP_CIPHER_CTX, EVP_CIPHER_CTX_free>>;
using KdfPtr = std::unique_ptr<EVP_KDF, OsslDeleter<EVP_KDF, EVP_KDF_free>>;
using KdfCtxPtr = std::unique_ptr<EVP_KDF_CTX, OsslDeleter<EVP_KDF_CTX, EVP_KDF_CTX_free>>;
using BioPtr = std::unique_ptr<BIO, OsslDeleter<BIO, bio_free>>;
using BnPtr = std::unique_ptr<BIGNUM, OsslDeleter<BIGNUM, BN_free>>;
using BnCtxPtr = std::unique_ptr<BN_CTX, OsslDeleter<BN_CTX, BN_CTX_free>>;

// Drains this thread's OpenSSL error queue into one line ("error:...; error:..."), or
// "no OpenSSL error queued" when it is empty.
std::string openssl_errors();
// Throws InternalError("<what>: <openssl_errors()>").
[[noreturn]] void throw_openssl(std::string_view what);

// A non-null pointer for a possibly empty span: some OpenSSL calls reject NULL even with len 0.
inline const unsigned char* nonnull(ByteSpan s) noexcept {
  static const unsigned char kEmpty = 0;
  return s.empty() ? &kEmpty : s.data();
}

// Process-wide fetched digests (fetched once, never freed).
const EVP_MD* sha256_md();
const EVP_MD* sha512_md();

}  // namespace meshtrain::crypto::detail
