// SHA-256, secure random bytes and OpenSSL error reporting.
#include <openssl/rand.h>

#include <algorithm>
#include <climits>

#include "crypto/ossl.h"
#include "meshtrain/core.h"
#include "meshtrain/crypto.h"

namespace meshtrain::crypto {
namespace detail {

std::string openssl_errors() {
  std::string out;
  while (unsigned long e = ERR_get_error()) {
    char buf[256];
    ERR_error_string_n(e, buf, sizeof buf);
    if (!out.empty()) out += "; ";
    out += buf;
  }
  return out.empty() ? std::string("no OpenSSL error queued") : out;
}

void throw_openssl(std::string_view what) {
  throw InternalError(fmt::format("{}: {}", what, openssl_errors()));
}

namespace {
const EVP_MD* fetch_md(const char* name) {
  EVP_MD* md = EVP_MD_fetch(nullptr, name, nullptr);
  if (!md) throw_openssl(fmt::format("EVP_MD_fetch({})", name));
  return md;  // kept for the life of the process
}
}  // namespace

const EVP_MD* sha256_md() {
  static const EVP_MD* md = fetch_md("SHA2-256");
  return md;
}
const EVP_MD* sha512_md() {
  static const EVP_MD* md = fetch_md("SHA2-512");
  return md;
}

}  // namespace detail

using namespace detail;

struct Sha256::Impl {
  MdCtxPtr ctx;
  bool finished = false;
};

Sha256::Sha256() : impl_(std::make_unique<Impl>()) {
  impl_->ctx.reset(EVP_MD_CTX_new());
  if (!impl_->ctx) throw_openssl("Sha256: EVP_MD_CTX_new");
  if (EVP_DigestInit_ex(impl_->ctx.get(), sha256_md(), nullptr) != 1)
    throw_openssl("Sha256: EVP_DigestInit_ex");
}

Sha256::~Sha256() = default;

void Sha256::update(ByteSpan data) {
  if (impl_->finished) throw InvalidArgumentError("Sha256::update called after finish()");
  if (data.empty()) return;
  if (EVP_DigestUpdate(impl_->ctx.get(), data.data(), data.size()) != 1)
    throw_openssl("Sha256: EVP_DigestUpdate");
}

Digest Sha256::finish() {
  if (impl_->finished) throw InvalidArgumentError("Sha256::finish called twice");
  impl_->finished = true;
  Digest out{};
  unsigned int len = 0;
  if (EVP_DigestFinal_ex(impl_->ctx.get(), out.data(), &len) != 1 || len != out.size())
    throw_openssl("Sha256: EVP_DigestFinal_ex");
  return out;
}

Digest sha256(ByteSpan data) {
  Digest out{};
  unsigned int len = 0;
  if (EVP_Digest(nonnull(data), data.size(), out.data(), &len, sha256_md(), nullptr) != 1 ||
      len != out.size())
    throw_openssl("sha256: EVP_Digest");
  return out;
}

void random_bytes(MutableByteSpan out) {
  size_t done = 0;
  while (done < out.size()) {
    int n = static_cast<int>(std::min<size_t>(out.size() - done, INT_MAX));
    if (RAND_bytes(out.data() + done, n) != 1) throw_openssl("random_bytes: RAND_bytes");
    done += static_cast<size_t>(n);
  }
}

}  // namespace meshtrain::crypto
