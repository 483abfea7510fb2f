// Tests for meshtrain/crypto.h. Known-answer vectors come from the RFCs (8032, 7748, 5869,
// FIPS 180-2) or were computed independently with Python's `cryptography` package.
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <set>
#include <string>

#include <gtest/gtest.h>

#include "meshtrain/core.h"
#include "meshtrain/crypto.h"

namespace mc = meshtrain::crypto;
using meshtrain::AuthError;
using meshtrain::CorruptError;
using meshtrain::InvalidArgumentError;
using meshtrain::IoError;

// Expects `haystack` to contain `needle`, evaluating each once.
::testing::AssertionResult Contains(const std::string& haystack, const std::string& needle) {
  if (haystack.find(needle) != std::string::npos) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << "\"" << haystack << "\" does not contain \"" << needle << "\"";
}
#define EXPECT_CONTAINS(haystack, needle) EXPECT_TRUE(Contains((haystack), (needle)))

namespace {

mc::Bytes bytes_of(std::string_view s) { return mc::Bytes(s.begin(), s.end()); }

template <size_t N>
std::array<uint8_t, N> array_from_hex(std::string_view hex) {
  mc::Bytes b = mc::from_hex(hex);
  EXPECT_EQ(b.size(), N);
  std::array<uint8_t, N> out{};
  std::copy_n(b.begin(), std::min(N, b.size()), out.begin());
  return out;
}

// Runs `f`, expects it to throw E, and returns the message for further checks.
template <typename E, typename F>
std::string error_message(F&& f) {
  try {
    f();
  } catch (const E& e) {
    return e.what();
  } catch (const std::exception& e) {
    ADD_FAILURE() << "threw the wrong exception type: " << e.what();
    return {};
  }
  ADD_FAILURE() << "did not throw";
  return {};
}

class TempDir {
 public:
  TempDir() {
    std::string tmpl = (std::filesystem::temp_directory_path() / "meshtrain-crypto-XXXXXX").string();
    char* made = ::mkdtemp(tmpl.data());
    if (!made) throw std::runtime_error("mkdtemp failed");
    path_ = made;
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  const std::filesystem::path& path() const { return path_; }
  std::filesystem::path operator/(const std::string& name) const { return path_ / name; }

 private:
  std::filesystem::path path_;
};

void write_file(const std::filesystem::path& path, std::string_view text, mode_t mode = 0600) {
  {
    std::ofstream f(path, std::ios::binary | std::ios::trunc);
    f << text;
  }
  ::chmod(path.c_str(), mode);
}

mode_t file_mode(const std::filesystem::path& path) {
  struct stat st{};
  EXPECT_EQ(::stat(path.c_str(), &st), 0) << path;
  return st.st_mode & 07777;
}

// Generated with `openssl genpkey`.
constexpr std::string_view kEd25519Pem =
    "-----BEGIN PRIVATE KEY-----\n"
    "MC4CAQAwBQYDK2VwBCIEIFYpti8IsOl1mhGq3XhVi9Hjf9bz8CxNCCwGVD+775Gd\n"
    "-----END PRIVATE KEY-----\n";
constexpr std::string_view kEd25519PemPublicHex =
    "fc8bc13bd71c1a8423a8f1e8cbbefc43ddf5d4046c24ca89f28449c31c94ea61";
constexpr std::string_view kX25519Pem =
    "-----BEGIN PRIVATE KEY-----\n"
    "MC4CAQAwBQYDK2VuBCIEIGjOUWU6lEWGUNwOZCRmscyakn9eQneHXYTNu54sIiNz\n"
    "-----END PRIVATE KEY-----\n";
constexpr std::string_view kEd25519PublicPem =
    "-----BEGIN PUBLIC KEY-----\n"
    "MCowBQYDK2VwAyEA/IvBO9ccGoQjqPHoy778Q9311ARsJMqJ8oRJwxyU6mE=\n"
    "-----END PUBLIC KEY-----\n";
constexpr std::string_view kEncryptedEd25519Pem =  // pass phrase "x"
    "-----BEGIN ENCRYPTED PRIVATE KEY-----\n"
    "MIGbMFcGCSqGSIb3DQEFDTBKMCkGCSqGSIb3DQEFDDAcBAi9qktK+4JfDQICCAAw\n"
    "DAYIKoZIhvcNAgkFADAdBglghkgBZQMEASoEEKJJgP2i/0e1C7urZs3TAP0EQLrS\n"
    "nr4PywYMYxLoUIv+zCtsh7J3d5Gj2qv7HchiThG7nbGPoIuQ7W5ceHa2c7pnj34l\n"
    "m7b7LwH7stAziUOvdOQ=\n"
    "-----END ENCRYPTED PRIVATE KEY-----\n";

// RFC 8032 7.1, TEST 1.
constexpr std::string_view kRfc8032Seed = "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60";
constexpr std::string_view kRfc8032Public = "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a";
constexpr std::string_view kRfc8032Signature =
    "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b4"
    "6bd25bf5f0595bbe24655141438e7a100b";

}  // namespace

// ---------------------------------------------------------------------------------------------
// Hex and PublicKey

TEST(Hex, RoundTripAndCase) {
  mc::Bytes b = {0x00, 0x01, 0x7f, 0x80, 0xab, 0xff};
  EXPECT_EQ(mc::to_hex(b), "00017f80abff");
  EXPECT_EQ(mc::from_hex("00017f80abff"), b);
  EXPECT_EQ(mc::from_hex("00017F80ABFF"), b);
  EXPECT_EQ(mc::to_hex({}), "");
  EXPECT_TRUE(mc::from_hex("").empty());
}

TEST(Hex, ErrorsNameTheField) {
  std::string odd = error_message<InvalidArgumentError>([] { mc::from_hex("abc", "peer key"); });
  EXPECT_CONTAINS(odd, "peer key");
  EXPECT_CONTAINS(odd, "odd length 3");
  std::string bad = error_message<InvalidArgumentError>([] { mc::from_hex("0g", "token"); });
  EXPECT_CONTAINS(bad, "token");
  EXPECT_CONTAINS(bad, "'g'");
  EXPECT_THROW(mc::from_hex("  "), InvalidArgumentError);
  EXPECT_THROW(mc::from_hex("0x"), InvalidArgumentError);
  EXPECT_THROW(mc::from_hex(std::string_view("\0\0", 2)), InvalidArgumentError);
}

TEST(PublicKey, ParsePrintAndFingerprint) {
  mc::PublicKey k = mc::PublicKey::from_hex(kRfc8032Public);
  EXPECT_EQ(k.hex(), kRfc8032Public);
  EXPECT_EQ(mc::PublicKey::from_bytes(k.bytes), k);
  mc::Digest d = mc::sha256(k.bytes);
  EXPECT_EQ(k.fingerprint(), mc::to_hex(mc::ByteSpan(d.data(), 8)));
  EXPECT_EQ(k.fingerprint().size(), 16u);

  std::string msg = error_message<InvalidArgumentError>(
      [] { mc::PublicKey::from_bytes(mc::Bytes(31), "hello.key"); });
  EXPECT_CONTAINS(msg, "hello.key");
  EXPECT_CONTAINS(msg, "31 bytes, expected 32");
  EXPECT_THROW(mc::PublicKey::from_bytes(mc::Bytes(33)), InvalidArgumentError);
  EXPECT_THROW(mc::PublicKey::from_hex(kRfc8032Public.substr(2)), InvalidArgumentError);
  EXPECT_THROW(mc::PublicKey::from_hex(std::string(64, 'z')), InvalidArgumentError);
}

// ---------------------------------------------------------------------------------------------
// Ed25519

TEST(Ed25519, Rfc8032KnownAnswer) {
  mc::Identity id = mc::Identity::from_seed(mc::from_hex(kRfc8032Seed));
  EXPECT_EQ(id.public_key().hex(), kRfc8032Public);
  mc::Signature sig = id.sign({});
  EXPECT_EQ(mc::to_hex(sig), kRfc8032Signature);
  EXPECT_NO_THROW(mc::verify(id.public_key(), {}, sig, "rfc8032"));
  EXPECT_THROW(mc::Identity::from_seed(mc::Bytes(31)), InvalidArgumentError);
}

TEST(Ed25519, SignVerifyRoundTrip) {
  mc::Identity id = mc::Identity::generate();
  for (size_t size : {0u, 1u, 64u, 1000u}) {
    mc::Bytes msg(size);
    mc::random_bytes(msg);
    mc::Signature sig = id.sign(msg);
    EXPECT_TRUE(mc::is_valid_signature(id.public_key(), msg, sig));
    EXPECT_NO_THROW(mc::verify(id.public_key(), msg, sig, "round trip"));
  }
  EXPECT_NE(mc::Identity::generate().public_key(), id.public_key());
}

TEST(Ed25519, TamperedMessageRejected) {
  mc::Identity id = mc::Identity::generate();
  mc::Bytes msg = bytes_of("join round 7");
  mc::Signature sig = id.sign(msg);
  msg[0] ^= 1;
  EXPECT_FALSE(mc::is_valid_signature(id.public_key(), msg, sig));
  std::string m = error_message<AuthError>([&] { mc::verify(id.public_key(), msg, sig, "hello from peer"); });
  EXPECT_CONTAINS(m, "hello from peer");
  EXPECT_CONTAINS(m, "does not verify with key " + id.public_key().fingerprint());
  msg[0] ^= 1;
  sig[10] ^= 0x40;  // tampered signature
  EXPECT_FALSE(mc::is_valid_signature(id.public_key(), msg, sig));
  EXPECT_THROW(mc::verify(id.public_key(), msg, sig, "sig"), AuthError);
}

TEST(Ed25519, WrongKeyRejected) {
  mc::Identity a = mc::Identity::generate();
  mc::Identity b = mc::Identity::generate();
  mc::Bytes msg = bytes_of("payload");
  mc::Signature sig = a.sign(msg);
  EXPECT_FALSE(mc::is_valid_signature(b.public_key(), msg, sig));
  std::string m = error_message<AuthError>([&] { mc::verify(b.public_key(), msg, sig, "w"); });
  EXPECT_CONTAINS(m, b.public_key().fingerprint());
  // A key that is not a curve point verifies nothing and does not crash.
  mc::PublicKey junk = mc::PublicKey::from_hex(std::string(64, 'f'));
  EXPECT_FALSE(mc::is_valid_signature(junk, msg, sig));
  EXPECT_THROW(mc::verify(junk, msg, sig, "junk"), AuthError);
}

TEST(Ed25519, WrongLengthSignatureRejected) {
  mc::Identity id = mc::Identity::generate();
  mc::Bytes msg = bytes_of("m");
  mc::Signature sig = id.sign(msg);
  mc::Bytes short_sig(sig.begin(), sig.end() - 1);
  mc::Bytes long_sig(sig.begin(), sig.end());
  long_sig.push_back(0);

  std::string m63 = error_message<AuthError>([&] { mc::verify(id.public_key(), msg, short_sig, "ticket"); });
  EXPECT_CONTAINS(m63, "ticket");
  EXPECT_CONTAINS(m63, "signature is 63 bytes, expected 64");
  std::string m65 = error_message<AuthError>([&] { mc::verify(id.public_key(), msg, long_sig, "ticket"); });
  EXPECT_CONTAINS(m65, "signature is 65 bytes, expected 64");
  std::string m0 = error_message<AuthError>([&] { mc::verify(id.public_key(), msg, {}, "ticket"); });
  EXPECT_CONTAINS(m0, "signature is 0 bytes");

  EXPECT_FALSE(mc::is_valid_signature(id.public_key(), msg, short_sig));
  EXPECT_FALSE(mc::is_valid_signature(id.public_key(), msg, long_sig));
  EXPECT_FALSE(mc::is_valid_signature(id.public_key(), msg, {}));
}

TEST(Ed25519, IdentityIsMovable) {
  mc::Identity a = mc::Identity::generate();
  mc::PublicKey pk = a.public_key();
  mc::Identity b = std::move(a);
  EXPECT_EQ(b.public_key(), pk);
  mc::Signature sig = b.sign(bytes_of("x"));
  EXPECT_TRUE(mc::is_valid_signature(pk, bytes_of("x"), sig));
  mc::Identity c = mc::Identity::generate();
  c = std::move(b);
  EXPECT_EQ(c.public_key(), pk);
}

// ---------------------------------------------------------------------------------------------
// PEM storage

TEST(Pem, SaveLoadRoundTrip) {
  TempDir dir;
  mc::Identity id = mc::Identity::generate();
  auto path = dir / "node.pem";
  id.save_pem(path);
  EXPECT_EQ(file_mode(path), 0600);

  mc::Identity loaded = mc::Identity::load_pem(path);
  EXPECT_EQ(loaded.public_key(), id.public_key());
  mc::Bytes msg = bytes_of("same key, same signature");
  EXPECT_EQ(loaded.sign(msg), id.sign(msg));  // Ed25519 signatures are deterministic
  EXPECT_TRUE(mc::is_valid_signature(id.public_key(), msg, loaded.sign(msg)));
  EXPECT_EQ(loaded.curve_secret(), id.curve_secret());

  std::ifstream f(path);
  std::string first;
  std::getline(f, first);
  EXPECT_EQ(first, "-----BEGIN PRIVATE KEY-----");  // PKCS#8, unencrypted

  // Only the key file is left: no temporary files.
  size_t entries = std::distance(std::filesystem::directory_iterator(dir.path()),
                                 std::filesystem::directory_iterator());
  EXPECT_EQ(entries, 1u);
}

TEST(Pem, ModeIsExactly0600WhateverTheUmask) {
  TempDir dir;
  mc::Identity id = mc::Identity::generate();
  mode_t old = ::umask(0);
  id.save_pem(dir / "a.pem");
  ::umask(0077);
  id.save_pem(dir / "b.pem");
  ::umask(old);
  EXPECT_EQ(file_mode(dir / "a.pem"), 0600);
  EXPECT_EQ(file_mode(dir / "b.pem"), 0600);
}

TEST(Pem, SaveReplacesAnExistingFileAndNarrowsItsMode) {
  TempDir dir;
  auto path = dir / "node.pem";
  write_file(path, "old contents", 0644);
  mc::Identity id = mc::Identity::generate();
  id.save_pem(path);
  EXPECT_EQ(file_mode(path), 0600);
  EXPECT_EQ(mc::Identity::load_pem(path).public_key(), id.public_key());
}

TEST(Pem, SaveIntoMissingDirectoryIsIoError) {
  TempDir dir;
  mc::Identity id = mc::Identity::generate();
  auto path = dir / "no-such-dir" / "node.pem";
  std::string m = error_message<IoError>([&] { id.save_pem(path); });
  EXPECT_CONTAINS(m, path.string());
}

TEST(Pem, LoadsOpensslGeneratedKey) {
  TempDir dir;
  write_file(dir / "cli.pem", kEd25519Pem);
  EXPECT_EQ(mc::Identity::load_pem(dir / "cli.pem").public_key().hex(), kEd25519PemPublicHex);
}

TEST(Pem, MissingFileIsIoError) {
  TempDir dir;
  auto path = dir / "absent.pem";
  try {
    mc::Identity::load_pem(path);
    FAIL() << "did not throw";
  } catch (const IoError& e) {
    EXPECT_CONTAINS(std::string(e.what()), path.string());
    EXPECT_EQ(e.errno_value(), ENOENT);
  }
  EXPECT_THROW(mc::Identity::load_pem(dir.path()), IoError);  // a directory
}

TEST(Pem, GarbageFileIsAuthErrorNamingThePath) {
  TempDir dir;
  auto garbage = dir / "garbage.pem";
  write_file(garbage, "this is not a key\n\x01\x02\x03");
  EXPECT_CONTAINS(error_message<AuthError>([&] { mc::Identity::load_pem(garbage); }), garbage.string());

  auto empty = dir / "empty.pem";
  write_file(empty, "");
  EXPECT_CONTAINS(error_message<AuthError>([&] { mc::Identity::load_pem(empty); }), empty.string());

  auto truncated = dir / "truncated.pem";
  write_file(truncated, kEd25519Pem.substr(0, 50));
  EXPECT_THROW(mc::Identity::load_pem(truncated), AuthError);
}

TEST(Pem, NonEd25519KeysRejected) {
  TempDir dir;
  auto x = dir / "x25519.pem";
  write_file(x, kX25519Pem);
  std::string m = error_message<AuthError>([&] { mc::Identity::load_pem(x); });
  EXPECT_CONTAINS(m, x.string());
  EXPECT_CONTAINS(m, "X25519");

  auto pub = dir / "public.pem";
  write_file(pub, kEd25519PublicPem);
  EXPECT_CONTAINS(error_message<AuthError>([&] { mc::Identity::load_pem(pub); }), pub.string());

  // An encrypted key is refused without prompting for a pass phrase.
  auto enc = dir / "encrypted.pem";
  write_file(enc, kEncryptedEd25519Pem);
  EXPECT_CONTAINS(error_message<AuthError>([&] { mc::Identity::load_pem(enc); }), enc.string());
}

TEST(Pem, WarnsWhenOthersCanReadTheKey) {
  TempDir dir;
  auto path = dir / "loose.pem";
  write_file(path, kEd25519Pem, 0644);
  ::testing::internal::CaptureStderr();
  mc::Identity id = mc::Identity::load_pem(path);
  std::string err = ::testing::internal::GetCapturedStderr();
  EXPECT_EQ(id.public_key().hex(), kEd25519PemPublicHex);
  EXPECT_CONTAINS(err, path.string());
  EXPECT_CONTAINS(err, "0644");

  ::chmod(path.c_str(), 0600);
  ::testing::internal::CaptureStderr();
  (void)mc::Identity::load_pem(path);
  EXPECT_EQ(::testing::internal::GetCapturedStderr(), "");
}

// ---------------------------------------------------------------------------------------------
// The Ed25519 -> X25519 binding

TEST(CurveBinding, KnownAnswer) {
  mc::Identity id = mc::Identity::from_seed(mc::from_hex(kRfc8032Seed));
  EXPECT_EQ(mc::to_hex(id.curve_secret()),
            "307c83864f2833cb427a2ef1c00a013cfdff2768d980c0a3a520f006904de94f");
  EXPECT_EQ(mc::to_hex(mc::ed25519_to_x25519_public(id.public_key())),
            "d85e07ec22b0ad881537c2f44d662d1a143cf830c57aca4305d85c7a90f6b62e");
}

TEST(CurveBinding, PublicMapMatchesSecretFor50Identities) {
  std::set<mc::X25519Key> seen;
  for (int i = 0; i < 50; ++i) {
    mc::Identity id = mc::Identity::generate();
    mc::X25519Key secret = id.curve_secret();
    EXPECT_EQ(secret[0] & 7, 0);
    EXPECT_EQ(secret[31] & 0xc0, 0x40);
    mc::X25519Key from_public = mc::ed25519_to_x25519_public(id.public_key());
    EXPECT_EQ(from_public, mc::x25519_public_from_secret(secret)) << "identity " << i;
    seen.insert(from_public);
  }
  EXPECT_EQ(seen.size(), 50u);
}

TEST(CurveBinding, SignBitDoesNotChangeU) {
  mc::Identity id = mc::Identity::generate();
  mc::PublicKey flipped = id.public_key();
  flipped.bytes[31] ^= 0x80;
  EXPECT_EQ(mc::ed25519_to_x25519_public(flipped), mc::ed25519_to_x25519_public(id.public_key()));
}

TEST(CurveBinding, RejectsInvalidEncodings) {
  auto reject = [](std::string_view hex, std::string_view why) {
    mc::PublicKey k = mc::PublicKey::from_hex(hex);
    std::string m = error_message<AuthError>([&] { mc::ed25519_to_x25519_public(k); });
    EXPECT_CONTAINS(m, k.fingerprint()) << why;
  };
  // y = 1: the neutral point, 1 - y = 0.
  reject("0100000000000000000000000000000000000000000000000000000000000000", "y = 1");
  reject("0100000000000000000000000000000000000000000000000000000000000080", "y = 1, sign set");
  // y = p and y = p + 1: not reduced.
  reject("edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f", "y = p");
  reject("eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f", "y = p + 1");
  reject("ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff", "y = 2^255 - 1");
  // y = 2: no x satisfies the curve equation.
  reject("0200000000000000000000000000000000000000000000000000000000000000", "y = 2 off curve");
  // Low-order points: y = -1 (order 2), y = 0 (order 4), the order-8 points.
  reject("ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f", "y = -1");
  reject("0000000000000000000000000000000000000000000000000000000000000000", "y = 0");
  reject("26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05", "order 8");
  reject("c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a", "order 8");
  // y = 3 is on the curve and of large order: accepted.
  EXPECT_NO_THROW(mc::ed25519_to_x25519_public(
      mc::PublicKey::from_hex("0300000000000000000000000000000000000000000000000000000000000000")));
}

// ---------------------------------------------------------------------------------------------
// X25519

TEST(X25519, Rfc7748PublicKey) {
  auto secret = array_from_hex<32>("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a");
  EXPECT_EQ(mc::to_hex(mc::x25519_public_from_secret(secret)),
            "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a");
}

TEST(X25519, BothSidesDeriveTheSameSecret) {
  mc::X25519KeyPair a = mc::X25519KeyPair::generate();
  mc::X25519KeyPair b = mc::X25519KeyPair::generate();
  mc::X25519KeyPair c = mc::X25519KeyPair::generate();
  EXPECT_NE(a.public_key(), b.public_key());
  mc::X25519Key ab = a.shared_secret(b.public_key());
  EXPECT_EQ(ab, b.shared_secret(a.public_key()));
  EXPECT_NE(ab, a.shared_secret(c.public_key()));
  EXPECT_NE(ab, mc::X25519Key{});
}

TEST(X25519, IdentityCurveKeysAgree) {
  // What CurveZMQ relies on: long-term curve keys derived from two identities agree.
  mc::Identity alice = mc::Identity::generate();
  mc::Identity bob = mc::Identity::generate();
  mc::X25519KeyPair eph = mc::X25519KeyPair::generate();
  EXPECT_EQ(eph.shared_secret(mc::ed25519_to_x25519_public(alice.public_key())),
            eph.shared_secret(mc::x25519_public_from_secret(alice.curve_secret())));
  EXPECT_NE(mc::ed25519_to_x25519_public(alice.public_key()),
            mc::ed25519_to_x25519_public(bob.public_key()));
}

TEST(X25519, LowOrderPeerKeysRejected) {
  mc::X25519KeyPair a = mc::X25519KeyPair::generate();
  for (std::string_view hex : {
           "0000000000000000000000000000000000000000000000000000000000000000",
           "0100000000000000000000000000000000000000000000000000000000000000",
           "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800",
           "5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157",
           "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
       }) {
    EXPECT_THROW(a.shared_secret(array_from_hex<32>(hex)), AuthError) << hex;
  }
}

// ---------------------------------------------------------------------------------------------
// SHA-256, HKDF, random

TEST(Sha256, KnownVectors) {
  EXPECT_EQ(mc::to_hex(mc::sha256({})), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  EXPECT_EQ(mc::to_hex(mc::sha256(bytes_of("abc"))),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  EXPECT_EQ(mc::to_hex(mc::sha256(bytes_of("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"))),
            "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
  mc::Bytes million(1000000, 'a');
  EXPECT_EQ(mc::to_hex(mc::sha256(million)),
            "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
  mc::Sha256 h;
  for (int i = 0; i < 1000; ++i) h.update(mc::ByteSpan(million.data(), 1000));
  EXPECT_EQ(mc::to_hex(h.finish()), "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
}

TEST(Sha256, StreamingInOddChunksEqualsOneShot) {
  mc::Bytes data(100003);
  mc::random_bytes(data);
  mc::Digest one_shot = mc::sha256(data);
  for (size_t chunk : {1u, 7u, 63u, 64u, 65u, 4099u}) {
    mc::Sha256 h;
    h.update({});
    for (size_t off = 0; off < data.size(); off += chunk)
      h.update(mc::ByteSpan(data).subspan(off, std::min(chunk, data.size() - off)));
    EXPECT_EQ(h.finish(), one_shot) << "chunk " << chunk;
  }
  mc::Sha256 empty;
  EXPECT_EQ(empty.finish(), mc::sha256({}));
  EXPECT_THROW(empty.finish(), InvalidArgumentError);
  EXPECT_THROW(empty.update(data), InvalidArgumentError);
}

TEST(Hkdf, Rfc5869TestCase1) {
  mc::Bytes okm = mc::hkdf_sha256(mc::Bytes(22, 0x0b), mc::from_hex("000102030405060708090a0b0c"),
                                  mc::from_hex("f0f1f2f3f4f5f6f7f8f9"), 42);
  EXPECT_EQ(mc::to_hex(okm),
            "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865");
}

TEST(Hkdf, Rfc5869TestCase3EmptySaltAndInfo) {
  mc::Bytes okm = mc::hkdf_sha256(mc::Bytes(22, 0x0b), {}, {}, 42);
  EXPECT_EQ(mc::to_hex(okm),
            "8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d9d201395faa4b61a96c8");
}

TEST(Hkdf, LengthLimits) {
  EXPECT_TRUE(mc::hkdf_sha256(mc::Bytes(32, 1), {}, {}, 0).empty());
  EXPECT_EQ(mc::hkdf_sha256(mc::Bytes(32, 1), {}, {}, 255 * 32).size(), 255u * 32);
  EXPECT_THROW(mc::hkdf_sha256(mc::Bytes(32, 1), {}, {}, 255 * 32 + 1), InvalidArgumentError);
  EXPECT_NE(mc::hkdf_sha256(mc::Bytes(32, 1), {}, bytes_of("a"), 32),
            mc::hkdf_sha256(mc::Bytes(32, 1), {}, bytes_of("b"), 32));
}

TEST(Random, OutputsDiffer) {
  std::array<uint8_t, 32> a{}, b{};
  mc::random_bytes(a);
  mc::random_bytes(b);
  EXPECT_NE(a, b);
  EXPECT_NE(a, (std::array<uint8_t, 32>{}));
  mc::Bytes big(1 << 20);
  mc::random_bytes(big);
  size_t zeros = std::count(big.begin(), big.end(), 0);
  EXPECT_LT(zeros, big.size() / 128);  // ~1/256 expected
  mc::random_bytes({});
}

// ---------------------------------------------------------------------------------------------
// AEAD records

namespace {

struct Sealed {
  mc::Bytes data;
  std::array<uint8_t, mc::kAeadTagBytes> tag{};
};

Sealed seal(mc::AeadRecordCipher& c, mc::ByteSpan aad, mc::ByteSpan plain) {
  Sealed s;
  s.data.resize(plain.size());
  c.seal(aad, plain, s.data, s.tag);
  return s;
}

const mc::Bytes kKey = [] {
  mc::Bytes k(32);
  for (size_t i = 0; i < k.size(); ++i) k[i] = static_cast<uint8_t>(i);
  return k;
}();
const mc::Bytes kSalt = {0xa1, 0xb2, 0xc3, 0xd4};

class Aead : public ::testing::TestWithParam<mc::AeadAlgorithm> {
 protected:
  mc::AeadRecordCipher make(const mc::Bytes& key = kKey, const mc::Bytes& salt = kSalt) {
    return mc::AeadRecordCipher(GetParam(), key, salt);
  }
};

}  // namespace

TEST_P(Aead, KnownAnswerPinsTheNonceLayout) {
  // Computed with Python `cryptography` for nonce = salt || big-endian record number.
  const bool gcm = GetParam() == mc::AeadAlgorithm::Aes256Gcm;
  const std::string_view expected[2] = {
      gcm ? "ef664680e8eca26d65aba1cbbe743a6e4bbc9bb6d5176b3ff8532a82ceb75bf9"
          : "88f3b4663f962fbac95546a4ec0d6c49f93d981065876723b9cf90b7f4c780bb",
      gcm ? "324a3202cdec4ce52490274164e1836d9a05df8a8e2083712367c253ed012cb4"
          : "cb8a16a16293a8426a885a650f82825c94bd9f7acbb9302b73d4a1252d6493c6"};
  mc::AeadRecordCipher tx = make();
  for (int record = 0; record < 2; ++record) {
    Sealed s = seal(tx, bytes_of("hdr"), bytes_of("meshtrain record"));
    EXPECT_EQ(mc::to_hex(s.data) + mc::to_hex(s.tag), expected[record]) << "record " << record;
  }
  EXPECT_EQ(tx.records(), 2u);
}

TEST_P(Aead, RoundTripOddSizes) {
  mc::AeadRecordCipher tx = make();
  mc::AeadRecordCipher rx = make();
  for (size_t size : {0u, 1u, 4097u, 15u, 16u, 17u}) {
    mc::Bytes plain(size);
    mc::random_bytes(plain);
    mc::Bytes aad = bytes_of("record header");
    Sealed s = seal(tx, aad, plain);
    if (size > 0) {
      EXPECT_NE(s.data, plain);
    }
    rx.open(aad, s.data, s.tag, "round trip");
    EXPECT_EQ(s.data, plain) << "size " << size;
  }
  EXPECT_EQ(tx.records(), 6u);
  EXPECT_EQ(rx.records(), 6u);
}

TEST_P(Aead, InPlace) {
  mc::AeadRecordCipher tx = make();
  mc::AeadRecordCipher tx_copy = make();
  mc::AeadRecordCipher rx = make();
  for (size_t size : {0u, 1u, 4097u}) {
    mc::Bytes plain(size);
    mc::random_bytes(plain);
    mc::Bytes buf = plain;
    std::array<uint8_t, mc::kAeadTagBytes> tag{};
    tx.seal({}, buf, buf, tag);
    Sealed separate = seal(tx_copy, {}, plain);
    EXPECT_EQ(buf, separate.data);
    EXPECT_EQ(tag, separate.tag);
    rx.open({}, buf, tag, "in place");
    EXPECT_EQ(buf, plain);
  }
}

TEST_P(Aead, FlippedCiphertextByteRejected) {
  mc::AeadRecordCipher tx = make();
  mc::AeadRecordCipher rx = make();
  Sealed s = seal(tx, {}, mc::Bytes(4097, 0x5a));
  s.data[4000] ^= 0x01;
  std::string m = error_message<CorruptError>([&] { rx.open({}, s.data, s.tag, "gradient chunk"); });
  EXPECT_CONTAINS(m, "gradient chunk");
  EXPECT_CONTAINS(m, "record 0");
  EXPECT_EQ(rx.records(), 1u);  // a failed open uses up its record number
}

TEST_P(Aead, FlippedTagByteRejected) {
  mc::AeadRecordCipher tx = make();
  mc::AeadRecordCipher rx = make();
  Sealed s = seal(tx, {}, bytes_of("hello"));
  s.tag[15] ^= 0x80;
  EXPECT_THROW(rx.open({}, s.data, s.tag, "t"), CorruptError);
  // An empty record is still authenticated by its tag.
  mc::AeadRecordCipher tx2 = make();
  mc::AeadRecordCipher rx2 = make();
  Sealed e = seal(tx2, bytes_of("aad"), {});
  e.tag[0] ^= 1;
  EXPECT_THROW(rx2.open(bytes_of("aad"), e.data, e.tag, "empty"), CorruptError);
}

TEST_P(Aead, WrongAadRejected) {
  mc::AeadRecordCipher tx = make();
  mc::AeadRecordCipher rx = make();
  Sealed s = seal(tx, bytes_of("seq=1"), bytes_of("payload"));
  EXPECT_THROW(rx.open(bytes_of("seq=2"), s.data, s.tag, "aad"), CorruptError);
  mc::AeadRecordCipher rx2 = make();
  EXPECT_THROW(rx2.open({}, s.data, s.tag, "no aad"), CorruptError);
}

TEST_P(Aead, ReplayedRecordRejected) {
  mc::AeadRecordCipher tx = make();
  mc::AeadRecordCipher rx = make();
  const Sealed r0 = seal(tx, {}, bytes_of("record zero"));
  (void)seal(tx, {}, bytes_of("record one"));
  Sealed copy = r0;  // open() decrypts in place, so each attempt gets its own copy
  rx.open({}, copy.data, copy.tag, "stream");
  EXPECT_EQ(copy.data, bytes_of("record zero"));
  copy = r0;
  std::string m = error_message<CorruptError>([&] { rx.open({}, copy.data, copy.tag, "stream"); });
  EXPECT_CONTAINS(m, "record 1");
  // A fresh-counter receiver accepts record 0 once; once it has advanced, not again.
  mc::AeadRecordCipher fresh = make();
  copy = r0;
  fresh.open({}, copy.data, copy.tag, "fresh");
  EXPECT_EQ(copy.data, bytes_of("record zero"));
  copy = r0;
  EXPECT_THROW(fresh.open({}, copy.data, copy.tag, "fresh"), CorruptError);
}

TEST_P(Aead, ReorderedOrDroppedRecordsRejected) {
  mc::AeadRecordCipher tx = make();
  Sealed r0 = seal(tx, {}, bytes_of("first"));
  Sealed r1 = seal(tx, {}, bytes_of("second"));
  mc::AeadRecordCipher rx = make();
  EXPECT_THROW(rx.open({}, r1.data, r1.tag, "reordered"), CorruptError);  // r0 dropped or late
  EXPECT_THROW(rx.open({}, r0.data, r0.tag, "reordered"), CorruptError);  // now at record 1
}

TEST_P(Aead, WrongKeyOrDirectionRejected) {
  mc::AeadRecordCipher tx = make();
  Sealed s = seal(tx, {}, bytes_of("x"));
  mc::Bytes other_key = kKey;
  other_key[31] ^= 1;
  mc::AeadRecordCipher wrong_key = make(other_key);
  Sealed a = s;
  EXPECT_THROW(wrong_key.open({}, a.data, a.tag, "k"), CorruptError);
  mc::AeadRecordCipher wrong_salt = make(kKey, {0xa1, 0xb2, 0xc3, 0xd5});
  Sealed b = s;
  EXPECT_THROW(wrong_salt.open({}, b.data, b.tag, "salt"), CorruptError);
}

TEST_P(Aead, MovedCipherKeepsItsPlaceInTheStream) {
  mc::AeadRecordCipher tx = make();
  mc::AeadRecordCipher rx = make();
  Sealed r0 = seal(tx, {}, bytes_of("a"));
  rx.open({}, r0.data, r0.tag, "m");
  mc::AeadRecordCipher tx2 = std::move(tx);
  mc::AeadRecordCipher rx2 = make();
  rx2 = std::move(rx);
  Sealed r1 = seal(tx2, {}, bytes_of("b"));
  EXPECT_NO_THROW(rx2.open({}, r1.data, r1.tag, "m"));
  EXPECT_EQ(r1.data, bytes_of("b"));
  EXPECT_EQ(rx2.records(), 2u);
}

TEST_P(Aead, BadArguments) {
  EXPECT_CONTAINS(error_message<InvalidArgumentError>([&] { (void)mc::AeadRecordCipher(GetParam(), mc::Bytes(16), kSalt); }), "16 bytes, expected 32");
  EXPECT_CONTAINS(error_message<InvalidArgumentError>([&] { (void)mc::AeadRecordCipher(GetParam(), kKey, mc::Bytes(12)); }), "12 bytes, expected 4");
  mc::AeadRecordCipher tx = make();
  mc::Bytes in(10), out(9);
  std::array<uint8_t, mc::kAeadTagBytes> tag{};
  EXPECT_THROW(tx.seal({}, in, out, tag), InvalidArgumentError);
  mc::Bytes buf(20);
  EXPECT_THROW(tx.seal({}, mc::ByteSpan(buf).subspan(0, 10), mc::MutableByteSpan(buf).subspan(5, 10), tag),
               InvalidArgumentError);
  EXPECT_EQ(tx.records(), 0u);
}

INSTANTIATE_TEST_SUITE_P(BothAlgorithms, Aead,
                         ::testing::Values(mc::AeadAlgorithm::Aes256Gcm, mc::AeadAlgorithm::ChaCha20Poly1305),
                         [](const auto& info) {
                           return info.param == mc::AeadAlgorithm::Aes256Gcm ? "Aes256Gcm" : "ChaCha20Poly1305";
                         });

TEST(AeadName, Names) {
  EXPECT_EQ(mc::aead_name(mc::AeadAlgorithm::Aes256Gcm), "AES-256-GCM");
  EXPECT_EQ(mc::aead_name(mc::AeadAlgorithm::ChaCha20Poly1305), "ChaCha20-Poly1305");
}
