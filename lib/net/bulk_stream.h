// Internal state of one bulk stream and its handshake (see docs/transport.md for the protocol).
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "meshtrain/net.h"
#include "net/codec.h"
#include "net/socket.h"

namespace meshtrain::net {

struct BulkStream::Impl {
  Fd fd;
  PeerId self;
  PeerId peer;
  std::string peer_name;  // fingerprint, for errors and logs
  uint64_t channel_id = 0;
  uint32_t stream_index = 0;
  uint32_t stream_count = 1;
  BulkOptions options;
  std::optional<crypto::AeadRecordCipher> send_cipher;  // set in Encrypted mode
  std::optional<crypto::AeadRecordCipher> recv_cipher;
  std::vector<uint8_t> send_scratch;
  uint64_t recv_part_pending = 0;  // payload bytes of the last header not read yet
  bool recv_broken = false;        // a framing error happened; the stream cannot be trusted

  IoContext io(std::string what, Deadline deadline, const CancelToken* cancel) const;

  void send_part(const WireHeader& header, crypto::ByteSpan part, Deadline deadline, const CancelToken* cancel);
  WireHeader recv_wire_header(Deadline deadline, const CancelToken* cancel);
  void recv_part(crypto::MutableByteSpan dest, Deadline deadline, const CancelToken* cancel);
};

// Runs the client side of the handshake on a connected socket.
std::unique_ptr<BulkStream::Impl> client_handshake(Fd fd, const crypto::Identity& self, const PeerId& expected,
                                                   const BulkOptions& options, uint64_t channel_id,
                                                   uint32_t stream_index, uint32_t stream_count,
                                                   Deadline deadline);
// Runs the server side; throws AuthError/ProtocolError/PeerLostError/TimeoutError on failure.
std::unique_ptr<BulkStream::Impl> server_handshake(Fd fd, const crypto::Identity& self, const AllowList& allowed,
                                                   const BulkOptions& options, const std::string& address,
                                                   Deadline deadline, const CancelToken* cancel);

}  // namespace meshtrain::net
