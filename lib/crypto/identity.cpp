// Ed25519 identities: signing, verification, PEM storage and the Ed25519 -> X25519 binding.
#include <fcntl.h>
#include <openssl/crypto.h>
#include <openssl/pem.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <string>

#include "crypto/ossl.h"
#include "meshtrain/core.h"
#include "meshtrain/crypto.h"

namespace meshtrain::crypto {

using namespace detail;

namespace {

// Wipes a buffer that held secret material when it goes out of scope.
struct Cleanse {
  void* p;
  size_t n;
  ~Cleanse() { OPENSSL_cleanse(p, n); }
};
struct SecretBuffer {
  std::vector<uint8_t> bytes;
  ~SecretBuffer() { OPENSSL_cleanse(bytes.data(), bytes.size()); }
};
struct FdCloser {
  int fd;
  ~FdCloser() {
    if (fd >= 0) ::close(fd);
  }
};

// 1 verified, 0 did not verify, -1 OpenSSL failed (error left on the queue).
int ed25519_verify(const PublicKey& key, ByteSpan message, ByteSpan signature) noexcept {
  if (signature.size() != kEd25519SignatureBytes) return 0;
  PkeyPtr pkey(EVP_PKEY_new_raw_public_key(EVP_PKEY_ED25519, nullptr, key.bytes.data(), key.bytes.size()));
  if (!pkey) return -1;
  MdCtxPtr ctx(EVP_MD_CTX_new());
  if (!ctx) return -1;
  if (EVP_DigestVerifyInit_ex(ctx.get(), nullptr, nullptr, nullptr, nullptr, pkey.get(), nullptr) != 1)
    return -1;
  int rc = EVP_DigestVerify(ctx.get(), signature.data(), signature.size(), nonnull(message),
                            message.size());
  if (rc == 1) return 1;
  // A bad signature or a key that is not a curve point both land here; neither is an
  // internal failure, so drop what OpenSSL queued about it.
  ERR_clear_error();
  return 0;
}

PublicKey raw_public_key(EVP_PKEY* pkey, std::string_view what) {
  PublicKey key;
  size_t len = key.bytes.size();
  if (EVP_PKEY_get_raw_public_key(pkey, key.bytes.data(), &len) != 1 || len != key.bytes.size())
    throw_openssl(fmt::format("{}: EVP_PKEY_get_raw_public_key", what));
  return key;
}

// Refuses to prompt on the terminal for the pass phrase of an encrypted PEM.
int no_password(char*, int, int, void*) { return -1; }

void write_all(int fd, const char* data, size_t size, const std::string& what) {
  while (size > 0) {
    ssize_t n = ::write(fd, data, size);
    if (n < 0) {
      if (errno == EINTR) continue;
      throw_io_error(what, errno);
    }
    data += n;
    size -= static_cast<size_t>(n);
  }
}

}  // namespace

void verify(const PublicKey& key, ByteSpan message, ByteSpan signature, std::string_view what) {
  if (signature.size() != kEd25519SignatureBytes)
    throw AuthError(fmt::format("{}: signature is {} bytes, expected {}", what, signature.size(),
                                kEd25519SignatureBytes));
  int rc = ed25519_verify(key, message, signature);
  if (rc < 0) throw_openssl(fmt::format("{}: Ed25519 verification", what));
  if (rc == 0)
    throw AuthError(fmt::format("{}: signature does not verify with key {}", what, key.fingerprint()));
}

bool is_valid_signature(const PublicKey& key, ByteSpan message, ByteSpan signature) noexcept {
  int rc = ed25519_verify(key, message, signature);
  if (rc < 0) ERR_clear_error();
  return rc == 1;
}

// ---------------------------------------------------------------------------------------------

struct Identity::Impl {
  PkeyPtr pkey;
};

Identity::Identity(std::unique_ptr<Impl> impl)
    : impl_(std::move(impl)), public_key_(raw_public_key(impl_->pkey.get(), "Identity")) {}
Identity::Identity(Identity&&) noexcept = default;
Identity& Identity::operator=(Identity&&) noexcept = default;
Identity::~Identity() = default;

Identity Identity::generate() {
  auto impl = std::make_unique<Impl>();
  impl->pkey.reset(EVP_PKEY_Q_keygen(nullptr, nullptr, "ED25519"));
  if (!impl->pkey) throw_openssl("Identity::generate: EVP_PKEY_Q_keygen(ED25519)");
  return Identity(std::move(impl));
}

Identity Identity::from_seed(ByteSpan seed32) {
  if (seed32.size() != 32)
    throw InvalidArgumentError(
        fmt::format("Identity::from_seed: seed is {} bytes, expected 32", seed32.size()));
  auto impl = std::make_unique<Impl>();
  impl->pkey.reset(EVP_PKEY_new_raw_private_key(EVP_PKEY_ED25519, nullptr, seed32.data(), seed32.size()));
  if (!impl->pkey) throw_openssl("Identity::from_seed: EVP_PKEY_new_raw_private_key");
  return Identity(std::move(impl));
}

Identity Identity::load_pem(const std::filesystem::path& path) {
  const std::string name = path.string();
  FdCloser fd{::open(name.c_str(), O_RDONLY | O_CLOEXEC)};
  if (fd.fd < 0) throw_io_error(fmt::format("identity key {}: cannot open", name), errno);
  struct stat st{};
  if (::fstat(fd.fd, &st) != 0) throw_io_error(fmt::format("identity key {}: fstat", name), errno);
  if ((st.st_mode & S_IFMT) != S_IFREG)
    throw IoError(fmt::format("identity key {}: not a regular file", name));
  if (st.st_mode & (S_IRWXG | S_IRWXO))
    log::warn("crypto", "identity key {} has mode {:04o}: group/others may access it; chmod 600 it",
              name, st.st_mode & 07777);

  constexpr size_t kMaxPem = 64 * 1024;  // an Ed25519 PEM is ~120 bytes
  SecretBuffer text;
  text.bytes.resize(kMaxPem + 1);
  size_t used = 0;
  while (used < text.bytes.size()) {
    ssize_t n = ::read(fd.fd, text.bytes.data() + used, text.bytes.size() - used);
    if (n < 0) {
      if (errno == EINTR) continue;
      throw_io_error(fmt::format("identity key {}: read", name), errno);
    }
    if (n == 0) break;
    used += static_cast<size_t>(n);
  }
  if (used > kMaxPem)
    throw AuthError(fmt::format("identity key {}: larger than {} bytes, not a PEM key", name, kMaxPem));

  BioPtr bio(BIO_new_mem_buf(text.bytes.data(), static_cast<int>(used)));
  if (!bio) throw_openssl(fmt::format("identity key {}: BIO_new_mem_buf", name));
  auto impl = std::make_unique<Impl>();
  impl->pkey.reset(PEM_read_bio_PrivateKey(bio.get(), nullptr, no_password, nullptr));
  if (!impl->pkey)
    throw AuthError(fmt::format("identity key {}: not a readable unencrypted PEM private key ({})",
                                name, openssl_errors()));
  if (EVP_PKEY_get_id(impl->pkey.get()) != EVP_PKEY_ED25519) {
    const char* type = EVP_PKEY_get0_type_name(impl->pkey.get());
    throw AuthError(fmt::format("identity key {}: key type is {}, expected ED25519", name,
                                type ? type : "unknown"));
  }
  return Identity(std::move(impl));
}

void Identity::save_pem(const std::filesystem::path& path) const {
  const std::string name = path.string();
  if (path.filename().empty())
    throw InvalidArgumentError(fmt::format("identity key path '{}' has no file name", name));

  // Serialise into secure heap memory first, so a failure leaves no file behind.
  BioPtr bio(BIO_new(BIO_s_secmem()));
  if (!bio) throw_openssl("Identity::save_pem: BIO_new");
  if (PEM_write_bio_PrivateKey(bio.get(), impl_->pkey.get(), nullptr, nullptr, 0, nullptr, nullptr) != 1)
    throw_openssl(fmt::format("identity key {}: PEM_write_bio_PrivateKey", name));
  char* pem = nullptr;
  long pem_len = BIO_get_mem_data(bio.get(), &pem);
  if (pem_len <= 0 || !pem) throw_openssl(fmt::format("identity key {}: BIO_get_mem_data", name));

  std::filesystem::path dir = path.parent_path();
  if (dir.empty()) dir = ".";
  std::array<uint8_t, 8> nonce{};
  random_bytes(nonce);
  const std::string tmp =
      (dir / fmt::format(".{}.{}.{}.tmp", path.filename().string(), ::getpid(), to_hex(nonce))).string();

  int fd = ::open(tmp.c_str(), O_CREAT | O_EXCL | O_WRONLY | O_CLOEXEC | O_NOFOLLOW, 0600);
  if (fd < 0) throw_io_error(fmt::format("identity key {}: cannot create {}", name, tmp), errno);
  try {
    // umask can only have narrowed 0600; set it exactly so the owner can read it back.
    if (::fchmod(fd, 0600) != 0) throw_io_error(fmt::format("identity key {}: fchmod {}", name, tmp), errno);
    struct stat st{};
    if (::fstat(fd, &st) != 0) throw_io_error(fmt::format("identity key {}: fstat {}", name, tmp), errno);
    if ((st.st_mode & 07777) != 0600)
      throw IoError(fmt::format("identity key {}: {} has mode {:04o}, expected 0600", name, tmp,
                                st.st_mode & 07777));
    write_all(fd, pem, static_cast<size_t>(pem_len), fmt::format("identity key {}: write {}", name, tmp));
    if (::fsync(fd) != 0) throw_io_error(fmt::format("identity key {}: fsync {}", name, tmp), errno);
    int rc = ::close(fd);
    fd = -1;
    if (rc != 0) throw_io_error(fmt::format("identity key {}: close {}", name, tmp), errno);
    if (::rename(tmp.c_str(), name.c_str()) != 0)
      throw_io_error(fmt::format("identity key {}: rename from {}", name, tmp), errno);
  } catch (...) {
    if (fd >= 0) ::close(fd);
    ::unlink(tmp.c_str());
    throw;
  }
  // Make the rename durable. A failure here does not undo a written key, so only warn.
  int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd >= 0) {
    if (::fsync(dfd) != 0)
      log::warn("crypto", "identity key {}: fsync of directory {} failed: {}", name, dir.string(), std::strerror(errno));
    ::close(dfd);
  }
}

Signature Identity::sign(ByteSpan message) const {
  MdCtxPtr ctx(EVP_MD_CTX_new());
  if (!ctx) throw_openssl("Identity::sign: EVP_MD_CTX_new");
  if (EVP_DigestSignInit_ex(ctx.get(), nullptr, nullptr, nullptr, nullptr, impl_->pkey.get(), nullptr) != 1)
    throw_openssl("Identity::sign: EVP_DigestSignInit_ex");
  Signature sig{};
  size_t len = sig.size();
  if (EVP_DigestSign(ctx.get(), sig.data(), &len, nonnull(message), message.size()) != 1 ||
      len != sig.size())
    throw_openssl("Identity::sign: EVP_DigestSign");
  return sig;
}

X25519Key Identity::curve_secret() const {
  uint8_t seed[32];
  Cleanse wipe_seed{seed, sizeof seed};
  size_t len = sizeof seed;
  if (EVP_PKEY_get_raw_private_key(impl_->pkey.get(), seed, &len) != 1 || len != sizeof seed)
    throw_openssl("Identity::curve_secret: EVP_PKEY_get_raw_private_key");
  uint8_t h[64];
  Cleanse wipe_h{h, sizeof h};
  unsigned int hlen = 0;
  if (EVP_Digest(seed, sizeof seed, h, &hlen, sha512_md(), nullptr) != 1 || hlen != sizeof h)
    throw_openssl("Identity::curve_secret: SHA-512");
  X25519Key s{};
  std::copy(h, h + s.size(), s.begin());
  s[0] &= 248;
  s[31] &= 127;
  s[31] |= 64;
  return s;
}

// ---------------------------------------------------------------------------------------------

namespace {

BnPtr bn_new() {
  BnPtr b(BN_new());
  if (!b) throw_openssl("ed25519_to_x25519_public: BN_new");
  return b;
}

void bn_check(int rc, const char* op) {
  if (rc != 1) throw_openssl(fmt::format("ed25519_to_x25519_public: {}", op));
}

// The X25519 u-coordinates of the points of order 8 (libsodium's blocklist): an Ed25519 key
// that maps to one of them, or to 0 / 1, is a low-order point and binds no secret.
constexpr std::array<std::array<uint8_t, 32>, 2> kOrder8U = {{
    {0xe0, 0xeb, 0x7a, 0x7c, 0x3b, 0x41, 0xb8, 0xae, 0x16, 0x56, 0xe3, 0xfa, 0xf1, 0x9f, 0xc4, 0x6a,
     0xda, 0x09, 0x8d, 0xeb, 0x9c, 0x32, 0xb1, 0xfd, 0x86, 0x62, 0x05, 0x16, 0x5f, 0x49, 0xb8, 0x00},
    {0x5f, 0x9c, 0x95, 0xbc, 0xa3, 0x50, 0x8c, 0x24, 0xb1, 0xd0, 0xb1, 0x55, 0x9c, 0x83, 0xef, 0x5b,
     0x04, 0x44, 0x5c, 0xc4, 0x58, 0x1c, 0x8e, 0x86, 0xd8, 0x22, 0x4e, 0xdd, 0xd0, 0x9f, 0x11, 0x57},
}};

}  // namespace

X25519Key ed25519_to_x25519_public(const PublicKey& key) {
  BnCtxPtr ctx(BN_CTX_new());
  if (!ctx) throw_openssl("ed25519_to_x25519_public: BN_CTX_new");

  // p = 2^255 - 19
  BnPtr p = bn_new();
  bn_check(BN_set_bit(p.get(), 255), "BN_set_bit");
  bn_check(BN_sub_word(p.get(), 19), "BN_sub_word");

  std::array<uint8_t, 32> ybytes = key.bytes;
  ybytes[31] &= 0x7f;  // the top bit is the sign of x
  BnPtr y(BN_lebin2bn(ybytes.data(), static_cast<int>(ybytes.size()), nullptr));
  if (!y) throw_openssl("ed25519_to_x25519_public: BN_lebin2bn");

  if (BN_cmp(y.get(), p.get()) >= 0)
    throw AuthError(fmt::format("public key {}: y coordinate is not reduced mod 2^255-19 (non-canonical encoding)",
                                key.fingerprint()));
  if (BN_is_one(y.get()))
    throw AuthError(fmt::format("public key {}: is the neutral point (y = 1), which has no X25519 form",
                                key.fingerprint()));

  BnPtr one = bn_new();
  bn_check(BN_one(one.get()), "BN_one");

  // On-curve check (RFC 8032 5.1.3): x^2 = (y^2 - 1) / (d y^2 + 1) must have a root mod p,
  // with d = -121665 / 121666.
  BnPtr y2 = bn_new(), num = bn_new(), den = bn_new(), d = bn_new(), t = bn_new(), e = bn_new();
  bn_check(BN_mod_sqr(y2.get(), y.get(), p.get(), ctx.get()), "BN_mod_sqr");
  bn_check(BN_mod_sub(num.get(), y2.get(), one.get(), p.get(), ctx.get()), "BN_mod_sub");
  bn_check(BN_set_word(t.get(), 121666), "BN_set_word");
  if (!BN_mod_inverse(d.get(), t.get(), p.get(), ctx.get())) throw_openssl("ed25519_to_x25519_public: BN_mod_inverse(121666)");
  bn_check(BN_set_word(t.get(), 121665), "BN_set_word");
  bn_check(BN_mod_mul(d.get(), d.get(), t.get(), p.get(), ctx.get()), "BN_mod_mul");
  bn_check(BN_sub(d.get(), p.get(), d.get()), "BN_sub");  // d = -(121665/121666) mod p
  bn_check(BN_mod_mul(den.get(), d.get(), y2.get(), p.get(), ctx.get()), "BN_mod_mul");
  bn_check(BN_mod_add(den.get(), den.get(), one.get(), p.get(), ctx.get()), "BN_mod_add");
  // den = d y^2 + 1 is never 0 mod p (-1/d is not a square), so the inverse exists.
  if (!BN_mod_inverse(t.get(), den.get(), p.get(), ctx.get())) throw_openssl("ed25519_to_x25519_public: BN_mod_inverse(d y^2 + 1)");
  bn_check(BN_mod_mul(t.get(), num.get(), t.get(), p.get(), ctx.get()), "BN_mod_mul");  // x^2
  if (!BN_is_zero(t.get())) {
    bn_check(BN_rshift1(e.get(), p.get()), "BN_rshift1");  // (p - 1) / 2, p is odd
    bn_check(BN_mod_exp(e.get(), t.get(), e.get(), p.get(), ctx.get()), "BN_mod_exp");
    if (!BN_is_one(e.get()))
      throw AuthError(fmt::format("public key {}: is not a point on Ed25519 (no x for its y)",
                                  key.fingerprint()));
  }

  // u = (1 + y) / (1 - y) mod p
  BnPtr u = bn_new();
  bn_check(BN_mod_add(num.get(), one.get(), y.get(), p.get(), ctx.get()), "BN_mod_add");
  bn_check(BN_mod_sub(den.get(), one.get(), y.get(), p.get(), ctx.get()), "BN_mod_sub");
  if (!BN_mod_inverse(t.get(), den.get(), p.get(), ctx.get())) throw_openssl("ed25519_to_x25519_public: BN_mod_inverse(1 - y)");
  bn_check(BN_mod_mul(u.get(), num.get(), t.get(), p.get(), ctx.get()), "BN_mod_mul");

  X25519Key out{};
  if (BN_bn2lebinpad(u.get(), out.data(), static_cast<int>(out.size())) != static_cast<int>(out.size()))
    throw_openssl("ed25519_to_x25519_public: BN_bn2lebinpad");

  bool low_order = BN_is_zero(u.get()) || BN_is_one(u.get()) ||
                   std::any_of(kOrder8U.begin(), kOrder8U.end(), [&](const auto& c) { return c == out; });
  if (low_order)
    throw AuthError(fmt::format("public key {}: is a low-order point", key.fingerprint()));
  return out;
}

}  // namespace meshtrain::crypto
