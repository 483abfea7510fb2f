#include "net/bulk_stream.h"

#include <cstring>
#include <mutex>

namespace meshtrain::net {
namespace {

constexpr uint8_t kHeaderAad = 'H';
constexpr uint8_t kPayloadAad = 'P';

void put_le32(uint8_t* out, uint32_t v) {
  for (int i = 0; i < 4; ++i) out[i] = static_cast<uint8_t>(v >> (8 * i));
}
uint32_t get_le32(const uint8_t* in) {
  return in[0] | in[1] << 8 | in[2] << 16 | uint32_t(in[3]) << 24;
}

}  // namespace

IoContext BulkStream::Impl::io(std::string what, Deadline deadline, const CancelToken* cancel) const {
  IoContext c;
  c.peer = peer_name;
  c.what = std::move(what);
  c.deadline = deadline;
  c.cancel = cancel;
  c.peer_timeout = options.peer_timeout;
  return c;
}

// Frame on the wire: u32 header length (little endian), header bytes [+ tag], then the part's
// payload in records of record_bytes [+ tag each]. In Encrypted mode the length is the AAD of
// the header record, so it cannot be altered either.
void BulkStream::Impl::send_part(const WireHeader& header, crypto::ByteSpan part, Deadline deadline,
                                 const CancelToken* cancel) {
  IoContext c = io("sending", deadline, cancel);
  std::vector<uint8_t> encoded = encode_header(header);
  const bool sealed = send_cipher.has_value();
  std::vector<uint8_t> frame(4 + encoded.size() + (sealed ? crypto::kAeadTagBytes : 0));
  put_le32(frame.data(), static_cast<uint32_t>(encoded.size()));
  if (sealed) {
    uint8_t aad[5] = {kHeaderAad};
    std::memcpy(aad + 1, frame.data(), 4);
    send_cipher->seal(aad, encoded, crypto::MutableByteSpan(frame.data() + 4, encoded.size()),
                      std::span<uint8_t, crypto::kAeadTagBytes>(frame.data() + 4 + encoded.size(), crypto::kAeadTagBytes));
  } else {
    std::memcpy(frame.data() + 4, encoded.data(), encoded.size());
  }
  send_all(fd.get(), frame, c);
  if (!sealed) {
    send_all(fd.get(), part, c);
    return;
  }
  const uint8_t aad[1] = {kPayloadAad};
  for (size_t offset = 0; offset < part.size(); offset += options.record_bytes) {
    size_t n = std::min(options.record_bytes, part.size() - offset);
    send_cipher->seal(aad, part.subspan(offset, n), crypto::MutableByteSpan(send_scratch.data(), n),
                      std::span<uint8_t, crypto::kAeadTagBytes>(send_scratch.data() + n, crypto::kAeadTagBytes));
    send_all(fd.get(), crypto::ByteSpan(send_scratch.data(), n + crypto::kAeadTagBytes), c);
  }
}

WireHeader BulkStream::Impl::recv_wire_header(Deadline deadline, const CancelToken* cancel) {
  if (recv_broken)
    throw ProtocolError(fmt::format("bulk stream from {} is closed after an earlier framing error", peer_name));
  if (recv_part_pending != 0)
    throw InvalidArgumentError(fmt::format("bulk stream from {}: {} payload bytes of the previous message not read yet",
                                           peer_name, recv_part_pending));
  IoContext c = io("receiving a message header", deadline, cancel);
  // A timeout or cancel before the first byte leaves the stream intact.
  wait_readable(fd.get(), c);
  // Any failure below leaves the stream at an unknown position: mark it broken first.
  recv_broken = true;
  uint8_t len_bytes[4];
  recv_all(fd.get(), len_bytes, c);
  uint32_t len = get_le32(len_bytes);
  if (len > options.limits.max_header_bytes) {
    fd.reset();
    throw OversizedError(fmt::format("peer {} sent a {}-byte header (limit {}); stream closed", peer_name, len,
                                    options.limits.max_header_bytes));
  }
  std::vector<uint8_t> buf(len + (recv_cipher ? crypto::kAeadTagBytes : 0));
  recv_all(fd.get(), buf, c);
  if (recv_cipher) {
    uint8_t aad[5] = {kHeaderAad};
    std::memcpy(aad + 1, len_bytes, 4);
    try {
      recv_cipher->open(aad, crypto::MutableByteSpan(buf.data(), len),
                        std::span<const uint8_t, crypto::kAeadTagBytes>(buf.data() + len, crypto::kAeadTagBytes),
                        fmt::format("header from {}", peer_name));
    } catch (const Error&) {
      fd.reset();
      throw;
    }
  }
  WireHeader w;
  try {
    w = decode_header(crypto::ByteSpan(buf.data(), len), options.limits, options.limits.max_bulk_payload_bytes,
                      fmt::format("peer {}", peer_name));
  } catch (const Error&) {
    fd.reset();
    throw;
  }
  if (w.header.sender != peer) {
    fd.reset();
    throw ProtocolError(fmt::format("peer {} sent a header claiming sender {}; stream closed", peer_name,
                                    w.header.sender.fingerprint()));
  }
  recv_broken = false;
  recv_part_pending = w.part_bytes;
  return w;
}

void BulkStream::Impl::recv_part(crypto::MutableByteSpan dest, Deadline deadline, const CancelToken* cancel) {
  if (dest.size() != recv_part_pending)
    throw InvalidArgumentError(fmt::format("bulk stream from {}: reading {} payload bytes but the header announced {}",
                                           peer_name, dest.size(), recv_part_pending));
  IoContext c = io("receiving a payload", deadline, cancel);
  recv_broken = true;
  if (!recv_cipher) {
    recv_all(fd.get(), dest, c);
  } else {
    const uint8_t aad[1] = {kPayloadAad};
    std::array<uint8_t, crypto::kAeadTagBytes> tag;
    for (size_t offset = 0; offset < dest.size(); offset += options.record_bytes) {
      size_t n = std::min(options.record_bytes, dest.size() - offset);
      auto record = dest.subspan(offset, n);
      recv_all(fd.get(), record, c);
      recv_all(fd.get(), tag, c);
      try {
        recv_cipher->open(aad, record, tag, fmt::format("payload record from {}", peer_name));
      } catch (const Error&) {
        fd.reset();
        throw;
      }
    }
  }
  recv_part_pending = 0;
  recv_broken = false;
}

// ---------------------------------------------------------------------------------------------

BulkStream::BulkStream(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
BulkStream::BulkStream(BulkStream&&) noexcept = default;
BulkStream& BulkStream::operator=(BulkStream&&) noexcept = default;
BulkStream::~BulkStream() = default;

BulkStream BulkStream::connect(const crypto::Identity& self, const PeerId& peer, const std::string& host,
                               uint16_t port, const BulkOptions& options, Deadline deadline, uint64_t channel_id,
                               uint32_t stream_index, uint32_t stream_count) {
  if (options.record_bytes == 0 || options.record_bytes > (64u << 20))
    throw InvalidArgumentError(fmt::format("BulkOptions.record_bytes {} out of range (1 B .. 64 MiB)", options.record_bytes));
  IoContext c;
  c.peer = peer.fingerprint();
  c.what = "connecting";
  c.deadline = deadline;
  c.peer_timeout = options.handshake_timeout;
  Fd fd = tcp_connect(host, port, c, options.socket_buffer_bytes);
  return BulkStream(client_handshake(std::move(fd), self, peer, options, channel_id, stream_index, stream_count,
                                     deadline));
}

const PeerId& BulkStream::peer() const { return impl_->peer; }
uint64_t BulkStream::channel_id() const { return impl_->channel_id; }
uint32_t BulkStream::stream_index() const { return impl_->stream_index; }
uint32_t BulkStream::stream_count() const { return impl_->stream_count; }
BulkSecurity BulkStream::security() const { return impl_->options.security; }

void BulkStream::send(MessageHeader header, crypto::ByteSpan payload, Deadline deadline, const CancelToken* cancel) {
  header.sender = impl_->self;
  header.payload_bytes = payload.size();
  WireHeader w{header, 0, payload.size()};
  impl_->send_part(w, payload, deadline, cancel);
}

MessageHeader BulkStream::recv_header(Deadline deadline, const CancelToken* cancel) {
  WireHeader w = impl_->recv_wire_header(deadline, cancel);
  if (w.part_offset != 0 || w.part_bytes != w.header.payload_bytes) {
    impl_->fd.reset();
    impl_->recv_broken = true;
    throw ProtocolError(fmt::format("peer {} sent a partial message [{}, +{}) of {} bytes on a single stream",
                                    impl_->peer_name, w.part_offset, w.part_bytes, w.header.payload_bytes));
  }
  return w.header;
}

void BulkStream::recv_payload(crypto::MutableByteSpan dest, Deadline deadline, const CancelToken* cancel) {
  impl_->recv_part(dest, deadline, cancel);
}

Message BulkStream::recv(Deadline deadline, const CancelToken* cancel) {
  Message m;
  m.header = recv_header(deadline, cancel);
  m.payload.resize(m.header.payload_bytes);
  recv_payload(m.payload, deadline, cancel);
  return m;
}

}  // namespace meshtrain::net
