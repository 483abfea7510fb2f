// The bulk stream handshake: each side sends one signed BulkHello; the X25519 ephemeral keys
// give a shared secret from which HKDF derives one AEAD key and nonce salt per direction.
//
// client -> server: hello_c = {identity_c, eph_c, random_c, security, aead, channel, index,
//                              count, expected_peer = identity_s, sig_c}
//   sig_c signs T_c = SHA-256("meshtrain-bulk-v1 client" || fields of hello_c)
// server -> client: hello_s = {identity_s, eph_s, random_s, security, aead, channel, index,
//                              count, sig_s}
//   sig_s signs T_s = SHA-256("meshtrain-bulk-v1 server" || fields of hello_s || T_c)
// keys = HKDF-SHA256(ikm = X25519(eph_c, eph_s), salt = T_c || T_s, info = "meshtrain-bulk-v1 keys")
//        -> key_c2s(32) key_s2c(32) salt_c2s(4) salt_s2c(4)
#include <capnp/message.h>
#include <capnp/serialize.h>
#include <kj/exception.h>

#include <cstring>

#include "message.capnp.h"
#include "net/bulk_stream.h"

namespace meshtrain::net {
namespace {

constexpr uint16_t kHandshakeVersion = 1;
constexpr size_t kMaxHelloBytes = 1024;

struct Hello {
  PeerId identity;
  crypto::X25519Key ephemeral{};
  std::array<uint8_t, 32> random{};
  BulkSecurity security = BulkSecurity::Encrypted;
  crypto::AeadAlgorithm aead = crypto::AeadAlgorithm::Aes256Gcm;
  uint64_t channel_id = 0;
  uint32_t stream_index = 0;
  uint32_t stream_count = 1;
  std::optional<PeerId> expected_peer;
  crypto::Signature signature{};
};

void append(crypto::Bytes& out, const void* p, size_t n) {
  auto* b = static_cast<const uint8_t*>(p);
  out.insert(out.end(), b, b + n);
}
template <typename T>
void append_le(crypto::Bytes& out, T v) {
  for (size_t i = 0; i < sizeof(T); ++i) out.push_back(static_cast<uint8_t>(v >> (8 * i)));
}

crypto::Digest transcript(std::string_view role, const Hello& h, const crypto::Digest* client_transcript) {
  crypto::Bytes t;
  append(t, role.data(), role.size());
  append(t, h.identity.bytes.data(), 32);
  append(t, h.ephemeral.data(), 32);
  append(t, h.random.data(), 32);
  t.push_back(static_cast<uint8_t>(h.security));
  t.push_back(static_cast<uint8_t>(h.aead));
  append_le(t, h.channel_id);
  append_le(t, h.stream_index);
  append_le(t, h.stream_count);
  if (h.expected_peer) append(t, h.expected_peer->bytes.data(), 32);
  if (client_transcript) append(t, client_transcript->data(), client_transcript->size());
  return crypto::sha256(t);
}

crypto::Bytes encode_hello(const Hello& h) {
  capnp::MallocMessageBuilder builder(128);
  auto m = builder.initRoot<wire::BulkHello>();
  m.setVersion(kHandshakeVersion);
  m.setIdentity(capnp::Data::Reader(h.identity.bytes.data(), 32));
  m.setEphemeral(capnp::Data::Reader(h.ephemeral.data(), 32));
  m.setRandom(capnp::Data::Reader(h.random.data(), 32));
  m.setSecurity(h.security == BulkSecurity::Plain ? wire::BulkSecurity::PLAIN : wire::BulkSecurity::ENCRYPTED);
  m.setAead(h.aead == crypto::AeadAlgorithm::ChaCha20Poly1305 ? wire::AeadAlgorithm::CHACHA20_POLY1305
                                                               : wire::AeadAlgorithm::AES256_GCM);
  m.setChannelId(h.channel_id);
  m.setStreamIndex(h.stream_index);
  m.setStreamCount(h.stream_count);
  if (h.expected_peer) m.setExpectedPeer(capnp::Data::Reader(h.expected_peer->bytes.data(), 32));
  m.setSignature(capnp::Data::Reader(h.signature.data(), h.signature.size()));
  auto words = capnp::messageToFlatArray(builder);
  auto bytes = words.asBytes();
  crypto::Bytes out;
  append_le(out, static_cast<uint32_t>(bytes.size()));
  out.insert(out.end(), bytes.begin(), bytes.end());
  return out;
}

template <size_t N>
void copy_field(std::array<uint8_t, N>& out, capnp::Data::Reader in, std::string_view field, const std::string& source) {
  if (in.size() != N)
    throw ProtocolError(fmt::format("{}: handshake field '{}' is {} bytes, expected {}", source, field, in.size(), N));
  std::memcpy(out.data(), in.begin(), N);
}

Hello read_hello(int fd, const IoContext& io) {
  uint8_t len_bytes[4];
  recv_all(fd, len_bytes, io);
  uint32_t len = len_bytes[0] | len_bytes[1] << 8 | len_bytes[2] << 16 | uint32_t(len_bytes[3]) << 24;
  if (len > kMaxHelloBytes)
    throw OversizedError(fmt::format("{}: handshake message of {} bytes (limit {})", io.peer, len, kMaxHelloBytes));
  if (len == 0 || len % 8 != 0)
    throw ProtocolError(fmt::format("{}: handshake message of {} bytes is not a whole number of 8-byte words",
                                    io.peer, len));
  kj::Array<capnp::word> words = kj::heapArray<capnp::word>(len / 8);
  recv_all(fd, crypto::MutableByteSpan(reinterpret_cast<uint8_t*>(words.begin()), len), io);
  capnp::ReaderOptions options;
  options.traversalLimitInWords = 256;
  options.nestingLimit = 4;
  Hello h;
  try {
    capnp::FlatArrayMessageReader reader(words.asPtr(), options);
    auto m = reader.getRoot<wire::BulkHello>();
    if (m.getVersion() != kHandshakeVersion)
      throw ProtocolError(fmt::format("{}: handshake version {} (this build speaks {})", io.peer, m.getVersion(),
                                      kHandshakeVersion));
    copy_field(h.identity.bytes, m.getIdentity(), "identity", io.peer);
    copy_field(h.ephemeral, m.getEphemeral(), "ephemeral", io.peer);
    copy_field(h.random, m.getRandom(), "random", io.peer);
    switch (m.getSecurity()) {
      case wire::BulkSecurity::ENCRYPTED: h.security = BulkSecurity::Encrypted; break;
      case wire::BulkSecurity::PLAIN: h.security = BulkSecurity::Plain; break;
      default: throw ProtocolError(fmt::format("{}: handshake without a security mode", io.peer));
    }
    switch (m.getAead()) {
      case wire::AeadAlgorithm::AES256_GCM: h.aead = crypto::AeadAlgorithm::Aes256Gcm; break;
      case wire::AeadAlgorithm::CHACHA20_POLY1305: h.aead = crypto::AeadAlgorithm::ChaCha20Poly1305; break;
      default: throw ProtocolError(fmt::format("{}: handshake without an AEAD algorithm", io.peer));
    }
    h.channel_id = m.getChannelId();
    h.stream_index = m.getStreamIndex();
    h.stream_count = m.getStreamCount();
    if (m.hasExpectedPeer()) {
      PeerId expected;
      copy_field(expected.bytes, m.getExpectedPeer(), "expectedPeer", io.peer);
      h.expected_peer = expected;
    }
    copy_field(h.signature, m.getSignature(), "signature", io.peer);
  } catch (const kj::Exception& e) {
    throw ProtocolError(fmt::format("{}: undecodable handshake: {}", io.peer, e.getDescription().cStr()));
  }
  if (h.stream_count == 0 || h.stream_count > 256 || h.stream_index >= h.stream_count)
    throw ProtocolError(fmt::format("{}: handshake stream {} of {} is out of range", io.peer, h.stream_index,
                                    h.stream_count));
  return h;
}

Hello make_hello(const crypto::Identity& self, const crypto::X25519KeyPair& eph, const BulkOptions& options,
                 uint64_t channel_id, uint32_t stream_index, uint32_t stream_count) {
  Hello h;
  h.identity = self.public_key();
  h.ephemeral = eph.public_key();
  crypto::random_bytes(h.random);
  h.security = options.security;
  h.aead = options.aead;
  h.channel_id = channel_id;
  h.stream_index = stream_index;
  h.stream_count = stream_count;
  return h;
}

void install_keys(BulkStream::Impl& s, const crypto::X25519KeyPair& eph, const crypto::X25519Key& peer_eph,
                  const crypto::Digest& tc, const crypto::Digest& ts, bool is_client) {
  if (s.options.security != BulkSecurity::Encrypted) return;
  crypto::X25519Key shared = eph.shared_secret(peer_eph);
  crypto::Bytes salt(tc.begin(), tc.end());
  salt.insert(salt.end(), ts.begin(), ts.end());
  static constexpr std::string_view kInfo = "meshtrain-bulk-v1 keys";
  crypto::Bytes okm = crypto::hkdf_sha256(shared, salt,
                                          crypto::ByteSpan(reinterpret_cast<const uint8_t*>(kInfo.data()), kInfo.size()),
                                          72);
  crypto::ByteSpan key_c2s(okm.data(), 32), key_s2c(okm.data() + 32, 32);
  crypto::ByteSpan salt_c2s(okm.data() + 64, 4), salt_s2c(okm.data() + 68, 4);
  s.send_cipher.emplace(s.options.aead, is_client ? key_c2s : key_s2c, is_client ? salt_c2s : salt_s2c);
  s.recv_cipher.emplace(s.options.aead, is_client ? key_s2c : key_c2s, is_client ? salt_s2c : salt_c2s);
  s.send_scratch.resize(s.options.record_bytes + crypto::kAeadTagBytes);
}

std::string_view security_name(BulkSecurity s) { return s == BulkSecurity::Plain ? "plain" : "encrypted"; }

}  // namespace

std::unique_ptr<BulkStream::Impl> client_handshake(Fd fd, const crypto::Identity& self, const PeerId& expected,
                                                   const BulkOptions& options, uint64_t channel_id,
                                                   uint32_t stream_index, uint32_t stream_count,
                                                   Deadline deadline) {
  auto s = std::make_unique<BulkStream::Impl>();
  s->fd = std::move(fd);
  s->self = self.public_key();
  s->peer = expected;
  s->peer_name = expected.fingerprint();
  s->options = options;
  IoContext io = s->io("the handshake", deadline, nullptr);
  io.peer_timeout = options.handshake_timeout;

  auto eph = crypto::X25519KeyPair::generate();
  Hello mine = make_hello(self, eph, options, channel_id, stream_index, stream_count);
  mine.expected_peer = expected;
  crypto::Digest tc = transcript("meshtrain-bulk-v1 client", mine, nullptr);
  mine.signature = self.sign(tc);
  send_all(s->fd.get(), encode_hello(mine), io);

  Hello theirs = read_hello(s->fd.get(), io);
  if (theirs.identity != expected)
    throw AuthError(fmt::format("bulk handshake: expected peer {}, but {} answered", expected.fingerprint(),
                                theirs.identity.fingerprint()));
  crypto::Digest ts = transcript("meshtrain-bulk-v1 server", theirs, &tc);
  crypto::verify(theirs.identity, ts, theirs.signature, fmt::format("bulk handshake from {}", s->peer_name));
  if (theirs.security != options.security || theirs.aead != options.aead || theirs.channel_id != channel_id ||
      theirs.stream_index != stream_index || theirs.stream_count != stream_count)
    throw AuthError(fmt::format("bulk handshake with {}: parameters differ (we asked {} {}, it answered {} {})",
                                s->peer_name, security_name(options.security), crypto::aead_name(options.aead),
                                security_name(theirs.security), crypto::aead_name(theirs.aead)));
  s->channel_id = channel_id;
  s->stream_index = stream_index;
  s->stream_count = stream_count;
  install_keys(*s, eph, theirs.ephemeral, tc, ts, /*is_client=*/true);
  return s;
}

std::unique_ptr<BulkStream::Impl> server_handshake(Fd fd, const crypto::Identity& self, const AllowList& allowed,
                                                   const BulkOptions& options, const std::string& address,
                                                   Deadline deadline, const CancelToken* cancel) {
  auto s = std::make_unique<BulkStream::Impl>();
  s->fd = std::move(fd);
  s->self = self.public_key();
  s->peer_name = address;
  s->options = options;
  IoContext io = s->io("the handshake", deadline, cancel);
  io.peer_timeout = options.handshake_timeout;

  Hello theirs = read_hello(s->fd.get(), io);
  std::string who = fmt::format("{} at {}", theirs.identity.fingerprint(), address);
  if (!allowed.contains(theirs.identity))
    throw AuthError(fmt::format("bulk handshake: peer {} is not on the allow-list", who));
  if (!theirs.expected_peer || *theirs.expected_peer != self.public_key())
    throw AuthError(fmt::format("bulk handshake: peer {} wants to reach another identity", who));
  crypto::Digest tc = transcript("meshtrain-bulk-v1 client", theirs, nullptr);
  crypto::verify(theirs.identity, tc, theirs.signature, fmt::format("bulk handshake from {}", who));
  if (theirs.security != options.security)
    throw AuthError(fmt::format("bulk handshake: peer {} asked for {} but this listener is {}", who,
                                security_name(theirs.security), security_name(options.security)));
  if (theirs.aead != options.aead)
    throw AuthError(fmt::format("bulk handshake: peer {} asked for {} but this listener uses {}", who,
                                crypto::aead_name(theirs.aead), crypto::aead_name(options.aead)));

  auto eph = crypto::X25519KeyPair::generate();
  Hello mine = make_hello(self, eph, options, theirs.channel_id, theirs.stream_index, theirs.stream_count);
  crypto::Digest ts = transcript("meshtrain-bulk-v1 server", mine, &tc);
  mine.signature = self.sign(ts);
  send_all(s->fd.get(), encode_hello(mine), io);

  s->peer = theirs.identity;
  s->peer_name = theirs.identity.fingerprint();
  s->channel_id = theirs.channel_id;
  s->stream_index = theirs.stream_index;
  s->stream_count = theirs.stream_count;
  install_keys(*s, eph, theirs.ephemeral, tc, ts, /*is_client=*/false);
  return s;
}

}  // namespace meshtrain::net
