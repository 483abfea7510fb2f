// meshtrain net: the authenticated peer transport.
//
// Two paths between peers, both identified by their Ed25519 public key (crypto::PeerId):
//
//  * Control path (ControlServer / ControlClient): ZeroMQ ROUTER/DEALER sockets with CurveZMQ
//    encryption. The Curve key of a peer is the X25519 form of its Ed25519 identity (see
//    docs/transport.md), so an allow-list of Ed25519 keys is all a server needs: a client whose
//    key is not on it fails the CURVE handshake (refused and logged by the ZAP handler), and
//    every accepted message carries its sender's authenticated identity.
//
//  * Bulk path (BulkListener / BulkStream / BulkChannel): a dedicated TCP stream per neighbour,
//    authenticated by a signed X25519 handshake, then either AEAD-sealed records
//    (AES-256-GCM or ChaCha20-Poly1305, per-record nonces that never repeat) or, chosen
//    explicitly on both sides, plain bytes for trusted links. Payload bytes go straight from
//    and into the caller's buffer; they are never copied into a Cap'n Proto message.
//
// Every message is a Cap'n Proto header (lib/wire/message.capnp) optionally followed by payload
// bytes. Every receive takes a Deadline and an optional CancelToken; nothing blocks forever.
// Every decoder applies the size limits in Limits.
#pragma once

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "meshtrain/core.h"
#include "meshtrain/crypto.h"

namespace meshtrain::net {

using crypto::PeerId;

// Message types below 256 are reserved for meshtrain's own protocols; upper layers pick theirs
// from kFirstUserMessageType.
enum class MessageType : uint16_t {
  Heartbeat = 1,  // control path only; consumed by the transport, never returned by recv()
  Hello = 2,
  Data = 3,
  Text = 4,
};
inline constexpr uint16_t kFirstUserMessageType = 256;

struct MessageHeader {
  uint16_t type = static_cast<uint16_t>(MessageType::Data);
  PeerId sender;            // filled in by the transport on send; checked on receive
  uint64_t quorum_id = 0;   // (quorum_id, step, op_seq) tag every collective frame
  uint64_t step = 0;
  uint64_t op_seq = 0;
  uint32_t tag = 0;         // free for the upper layer (e.g. chunk index)
  uint64_t payload_bytes = 0;  // bytes that follow this header (whole message)
};

struct Message {
  MessageHeader header;
  std::vector<uint8_t> payload;
};

// Size limits applied by every decoder before it allocates or reads.
struct Limits {
  size_t max_header_bytes = 4096;                    // encoded Cap'n Proto header
  size_t max_control_payload_bytes = 16u << 20;      // control path payload
  uint64_t max_bulk_payload_bytes = 4ull << 30;      // one bulk message (all streams together)
  uint64_t capnp_traversal_limit_words = 1024;       // Cap'n Proto reader limits
  int capnp_nesting_limit = 8;
};

// The keys a socket accepts. Text form: one 64-hex-character Ed25519 public key per line;
// '#' starts a comment.
class AllowList {
 public:
  AllowList() = default;
  AllowList(std::initializer_list<PeerId> peers) : peers_(peers) {}
  // Throws IoError (unreadable) or InvalidArgumentError naming the file and line.
  static AllowList load(const std::filesystem::path& path);
  void add(const PeerId& peer) { peers_.insert(peer); }
  bool contains(const PeerId& peer) const { return peers_.count(peer) != 0; }
  const std::set<PeerId>& peers() const { return peers_; }

 private:
  std::set<PeerId> peers_;
};

// Counters of what a socket refused; for logs, status output and tests.
struct RejectStats {
  uint64_t refused_identity = 0;  // handshake from a key not on the allow-list, or bad signature
  uint64_t malformed = 0;         // undecodable, truncated or inconsistent message
  uint64_t oversized = 0;         // over a Limits bound
  uint64_t wrong_sender = 0;      // header.sender differs from the authenticated identity
};

// ---------------------------------------------------------------------------------------------
// Control path.

struct ControlOptions {
  Limits limits;
  // ZeroMQ-level heartbeats (ZMTP PING) drop a dead TCP connection after heartbeat_timeout.
  std::chrono::milliseconds heartbeat_interval{1000};
  std::chrono::milliseconds heartbeat_timeout{5000};
  // How long close waits to flush unsent messages.
  std::chrono::milliseconds linger{200};
  // Server only. false: only keys on the allow-list complete the handshake. true: any key may
  // connect (for services that authenticate each request, like the market, or that admit with a
  // join token); each message's claimed sender must still be the Ed25519 key whose X25519 form
  // the connection authenticated with, so a peer can speak only for its own key.
  bool admit_any_key = false;
  // Server only, with admit_any_key: what the server remembers of a key not on its allow-list
  // (its route and last_seen) is forgotten after this long without a message from it, so that
  // many keys connecting once do not grow its memory for good.
  std::chrono::milliseconds forget_unlisted_after{std::chrono::minutes(10)};
};

// A bound ROUTER socket: many authenticated clients, each addressed by its PeerId.
// Not thread-safe: use one ControlServer from one thread.
class ControlServer {
 public:
  // bind_endpoint: e.g. "tcp://127.0.0.1:0" (port 0 picks a free port; see endpoint()).
  ControlServer(const crypto::Identity& self, AllowList allowed, const std::string& bind_endpoint,
                ControlOptions options = {});
  ~ControlServer();
  ControlServer(const ControlServer&) = delete;
  ControlServer& operator=(const ControlServer&) = delete;

  // The bound endpoint with the real port, e.g. "tcp://127.0.0.1:41237".
  std::string endpoint() const;
  const PeerId& id() const;

  // Admits another key from now on (e.g. a joiner with a valid join token).
  void allow(const PeerId& peer);
  // Whether `peer` is on the allow-list (with admit_any_key, unlisted peers connect too).
  bool allowed(const PeerId& peer) const;

  // Waits for the next valid message from any allowed peer. Returns nullopt when the deadline
  // passes. Invalid messages are logged, counted in stats() and skipped. Heartbeats update
  // last_seen() and are not returned. Throws CancelledError when `cancel` fires.
  std::optional<Message> recv(Deadline deadline, const CancelToken* cancel = nullptr);

  // Queues a message to `to`. Throws PeerLostError when `to` is not connected (never connected,
  // or its connection dropped). Does not wait for delivery; waits up to 2 s for room in the
  // queue to `to` (TimeoutError after).
  void send(const PeerId& to, const MessageHeader& header, crypto::ByteSpan payload = {});
  // As send(), but never waits: returns false (nothing queued) when the queue to `to` is full.
  // For replies to peers that may not read them (a refusal to an unadmitted key): one such peer
  // must not stall the server's thread for 2 s per message.
  bool try_send(const PeerId& to, const MessageHeader& header, crypto::ByteSpan payload = {});

  // Peers from which nothing (message or heartbeat) arrived within `silence`, among those that
  // have ever sent something. Lets an upper layer report PeerLost for control-only peers.
  std::vector<PeerId> silent_peers(std::chrono::milliseconds silence) const;
  std::optional<Clock::time_point> last_seen(const PeerId& peer) const;
  // Peers from which something (message or heartbeat) arrived within `window`.
  std::vector<PeerId> peers_seen_within(std::chrono::milliseconds window) const;

  RejectStats stats() const;

 private:
  bool send_to_route(const PeerId& to, const MessageHeader& header, crypto::ByteSpan payload, bool wait);
  void forget_unlisted(Clock::time_point now);
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// A connected DEALER socket to one ControlServer whose identity must be `server`.
// Not thread-safe.
class ControlClient {
 public:
  ControlClient(const crypto::Identity& self, const PeerId& server, const std::string& endpoint,
                ControlOptions options = {});
  ~ControlClient();
  ControlClient(const ControlClient&) = delete;
  ControlClient& operator=(const ControlClient&) = delete;

  void send(const MessageHeader& header, crypto::ByteSpan payload = {});
  // Waits for the next valid message from the server, sending a heartbeat whenever nothing was
  // sent for heartbeat_interval. Throws TimeoutError naming the server when the deadline passes,
  // CancelledError when `cancel` fires.
  Message recv(Deadline deadline, const CancelToken* cancel = nullptr);
  // Sends a heartbeat now (the server counts it towards last_seen()).
  void heartbeat();
  RejectStats stats() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// ---------------------------------------------------------------------------------------------
// Bulk path.

enum class BulkSecurity : uint8_t {
  Encrypted = 1,  // default: AEAD records
  Plain = 2,      // authenticated handshake, then unencrypted bytes; for trusted links only
};

struct BulkOptions {
  BulkSecurity security = BulkSecurity::Encrypted;
  crypto::AeadAlgorithm aead = crypto::AeadAlgorithm::Aes256Gcm;
  size_t record_bytes = 256u << 10;  // AEAD record size (payload is sealed in records of this size)
  Limits limits;
  // A peer that sends nothing for this long while we wait for its bytes is reported PeerLost.
  std::chrono::milliseconds peer_timeout{10000};
  std::chrono::milliseconds handshake_timeout{5000};
  int socket_buffer_bytes = 4 << 20;  // SO_SNDBUF / SO_RCVBUF; 0 keeps the kernel default
};

// One authenticated TCP connection to one peer. Movable; one thread at a time per direction
// (a send and a recv may run concurrently from two threads).
class BulkStream {
 public:
  // Connects to host:port, runs the handshake and checks that the other side is `peer`.
  // Throws AuthError (wrong identity, refused, security mismatch), PeerLostError / IoError
  // (connection failed or dropped), TimeoutError.
  static BulkStream connect(const crypto::Identity& self, const PeerId& peer, const std::string& host,
                            uint16_t port, const BulkOptions& options, Deadline deadline,
                            uint64_t channel_id = 0, uint32_t stream_index = 0, uint32_t stream_count = 1);

  BulkStream(BulkStream&&) noexcept;
  BulkStream& operator=(BulkStream&&) noexcept;
  ~BulkStream();

  const PeerId& peer() const;
  uint64_t channel_id() const;
  uint32_t stream_index() const;
  uint32_t stream_count() const;
  BulkSecurity security() const;

  // Sends header + payload (header.payload_bytes is set from payload.size(), header.sender to
  // our id). Blocks until the bytes are handed to the kernel. Throws PeerLostError, TimeoutError,
  // CancelledError.
  void send(MessageHeader header, crypto::ByteSpan payload, Deadline deadline,
            const CancelToken* cancel = nullptr);
  // Receives the next header. Its payload must then be read with recv_payload() (exactly
  // header.payload_bytes) before the next header. Throws ProtocolError on a malformed or
  // oversized header (the stream is then closed), CorruptError on a failed AEAD tag.
  MessageHeader recv_header(Deadline deadline, const CancelToken* cancel = nullptr);
  void recv_payload(crypto::MutableByteSpan dest, Deadline deadline, const CancelToken* cancel = nullptr);
  // recv_header + recv_payload into a new buffer.
  Message recv(Deadline deadline, const CancelToken* cancel = nullptr);

  struct Impl;

 private:
  explicit BulkStream(std::unique_ptr<Impl> impl);
  friend class BulkListener;
  friend class BulkChannel;
  std::unique_ptr<Impl> impl_;
};

// A listening TCP socket that accepts authenticated BulkStreams from allowed peers.
class BulkListener {
 public:
  // host: address to bind ("127.0.0.1", "0.0.0.0"); port 0 picks a free one.
  BulkListener(const crypto::Identity& self, AllowList allowed, const std::string& host, uint16_t port,
               BulkOptions options = {});
  ~BulkListener();
  BulkListener(const BulkListener&) = delete;
  BulkListener& operator=(const BulkListener&) = delete;

  uint16_t port() const;
  void allow(const PeerId& peer);
  // Accepts connections until one completes a valid handshake. Connections that fail it
  // (garbage bytes, unknown key, bad signature, security mismatch, too slow) are logged,
  // counted in stats() and closed; the listener keeps serving. Throws TimeoutError at the
  // deadline, CancelledError on cancel.
  BulkStream accept(Deadline deadline, const CancelToken* cancel = nullptr);
  RejectStats stats() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// Several BulkStreams to the same peer used as one: a large payload is split into contiguous
// parts, one per stream, sent and received in parallel (fills high-latency links).
// Payloads below min_split_bytes travel on stream 0 alone.
class BulkChannel {
 public:
  static BulkChannel connect(const crypto::Identity& self, const PeerId& peer, const std::string& host,
                             uint16_t port, uint32_t streams, const BulkOptions& options, Deadline deadline);
  // Accepts streams from `listener` until `streams` streams of one channel from `peer` are here.
  // Streams of other peers or channels accepted meanwhile are closed and logged.
  static BulkChannel accept(BulkListener& listener, const PeerId& peer, uint32_t streams, Deadline deadline,
                            const CancelToken* cancel = nullptr);
  explicit BulkChannel(std::vector<BulkStream> streams);
  BulkChannel(BulkChannel&&) noexcept;
  BulkChannel& operator=(BulkChannel&&) noexcept;
  ~BulkChannel();

  const PeerId& peer() const;
  size_t stream_count() const;
  static constexpr size_t kMinSplitBytes = 256u << 10;

  void send(const MessageHeader& header, crypto::ByteSpan payload, Deadline deadline,
            const CancelToken* cancel = nullptr);
  // Receives one message whose total payload is exactly dest.size() bytes into dest. Throws
  // ProtocolError when the header disagrees (size, or streams disagree on the message tags).
  MessageHeader recv_into(crypto::MutableByteSpan dest, Deadline deadline, const CancelToken* cancel = nullptr);
  Message recv(Deadline deadline, const CancelToken* cancel = nullptr);
  // Receives one message of any size (within Limits) into `payload`, reusing its capacity.
  MessageHeader recv(std::vector<uint8_t>& payload, Deadline deadline, const CancelToken* cancel = nullptr);
  // Receives one message, choosing where its payload goes once the header is in (and checked):
  // `place` returns a span of exactly header.payload_bytes to receive into, or nullopt to
  // receive into `fallback` (resized) instead. Lets a caller land expected data in place and
  // still read (and then refuse or drop) anything else. A message for `fallback` larger than
  // `max_fallback_bytes` is a ProtocolError before anything is allocated (the stream, now
  // mid-message, is closed): a peer cannot make the receiver allocate up to Limits'
  // max_bulk_payload_bytes for a frame it will refuse anyway.
  using PlaceFn = std::function<std::optional<crypto::MutableByteSpan>(const MessageHeader&)>;
  MessageHeader recv_placed(const PlaceFn& place, std::vector<uint8_t>& fallback, Deadline deadline,
                            const CancelToken* cancel = nullptr, size_t max_fallback_bytes = SIZE_MAX);

 private:
  std::vector<BulkStream::Impl*> impls();
  std::vector<BulkStream> streams_;
};

// Puts accepted BulkStreams back together into channels: the streams of one channel (same
// peer and channel id) are kept until all `streams` of it are in. Streams of several peers and
// channels may arrive interleaved. BulkChannel::accept uses it for one peer; a member opening
// links to several peers at once uses it for all of them.
class BulkChannelAssembler {
 public:
  explicit BulkChannelAssembler(uint32_t streams);
  ~BulkChannelAssembler();
  // Returns the channel `stream` completes, if any. A stream whose stream count differs from
  // the assembler's, or whose index was already received for its channel, is logged and dropped.
  std::optional<BulkChannel> add(BulkStream stream);
  // Hands back the streams of channels not complete yet (the assembler is empty afterwards).
  std::vector<BulkStream> take_incomplete();

 private:
  uint32_t streams_;
  std::map<std::pair<PeerId, uint64_t>, std::vector<std::optional<BulkStream>>> pending_;
};

}  // namespace meshtrain::net
