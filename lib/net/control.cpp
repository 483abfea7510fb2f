// The control path on ZeroMQ with CurveZMQ. A peer's Curve key pair is the X25519 form of its
// Ed25519 identity (crypto::Identity::curve_secret / crypto::ed25519_to_x25519_public), so
// the ZAP handler maps the client's authenticated Curve key back to an Ed25519 PeerId, admits
// it only if that PeerId is on the allow-list, and names it as the ZAP user id, which ZeroMQ
// then attaches to every message from that connection ("User-Id" property).
#include <zmq.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <map>
#include <mutex>
#include <set>
#include <string_view>
#include <thread>

#include "net/codec.h"

namespace meshtrain::net {
namespace {

// ZAP user id of a connection whose key is not on the allow-list (admit_any_key servers).
constexpr std::string_view kUnlistedPrefix = "unlisted:";

[[noreturn]] void throw_zmq(const std::string& what) {
  throw InternalError(fmt::format("{}: {}", what, zmq_strerror(zmq_errno())));
}

void set_option(void* socket, int option, const void* value, size_t size, const char* name) {
  if (zmq_setsockopt(socket, option, value, size) != 0) throw_zmq(fmt::format("zmq_setsockopt({})", name));
}
void set_int(void* socket, int option, int value, const char* name) {
  set_option(socket, option, &value, sizeof value, name);
}

void set_common_options(void* socket, const ControlOptions& o) {
  set_int(socket, ZMQ_LINGER, static_cast<int>(o.linger.count()), "ZMQ_LINGER");
  set_int(socket, ZMQ_HEARTBEAT_IVL, static_cast<int>(o.heartbeat_interval.count()), "ZMQ_HEARTBEAT_IVL");
  set_int(socket, ZMQ_HEARTBEAT_TIMEOUT, static_cast<int>(o.heartbeat_timeout.count()), "ZMQ_HEARTBEAT_TIMEOUT");
  set_int(socket, ZMQ_HEARTBEAT_TTL, static_cast<int>(o.heartbeat_timeout.count()), "ZMQ_HEARTBEAT_TTL");
  int64_t max_message = static_cast<int64_t>(o.limits.max_header_bytes + o.limits.max_control_payload_bytes);
  // ZeroMQ drops a connection that sends a frame over this size before buffering it.
  set_option(socket, ZMQ_MAXMSGSIZE, &max_message, sizeof max_message, "ZMQ_MAXMSGSIZE");
  set_int(socket, ZMQ_SNDTIMEO, 2000, "ZMQ_SNDTIMEO");
}

void check_curve_available() {
  if (!zmq_has("curve"))
    throw InternalError("this libzmq was built without CURVE support; the control path needs it");
}

struct ZmqMessage {
  zmq_msg_t msg;
  ZmqMessage() { zmq_msg_init(&msg); }
  ~ZmqMessage() { zmq_msg_close(&msg); }
  ZmqMessage(const ZmqMessage&) = delete;
  ZmqMessage& operator=(const ZmqMessage&) = delete;
  crypto::ByteSpan bytes() { return {static_cast<const uint8_t*>(zmq_msg_data(&msg)), zmq_msg_size(&msg)}; }
};

// Reads all frames of one multipart message (up to max_frames kept; the rest drained and
// counted). Returns false if nothing was waiting.
bool recv_multipart(void* socket, std::vector<std::unique_ptr<ZmqMessage>>& frames, size_t max_frames,
                    size_t& extra_frames) {
  frames.clear();
  extra_frames = 0;
  for (;;) {
    auto frame = std::make_unique<ZmqMessage>();
    if (zmq_msg_recv(&frame->msg, socket, frames.empty() ? ZMQ_DONTWAIT : 0) < 0) {
      if (frames.empty() && (zmq_errno() == EAGAIN || zmq_errno() == EINTR)) return false;
      throw_zmq("zmq_msg_recv");
    }
    bool more = zmq_msg_more(&frame->msg);
    if (frames.size() < max_frames) {
      frames.push_back(std::move(frame));
    } else {
      ++extra_frames;
    }
    if (!more) return true;
  }
}

enum class Ready { Socket, Timeout };

// Waits for the socket to become readable, the deadline, or the cancel token.
Ready poll_socket(void* socket, Deadline deadline, const CancelToken* cancel, const std::string& what) {
  for (;;) {
    if (cancel) cancel->throw_if_cancelled(what);
    zmq_pollitem_t items[2] = {{socket, 0, ZMQ_POLLIN, 0}, {nullptr, cancel ? cancel->fd() : -1, ZMQ_POLLIN, 0}};
    int rc = zmq_poll(items, cancel ? 2 : 1, deadline.remaining_ms());
    if (rc < 0) {
      if (zmq_errno() == EINTR) continue;
      throw_zmq("zmq_poll");
    }
    if (items[0].revents & ZMQ_POLLIN) return Ready::Socket;
    if (deadline.expired()) return Ready::Timeout;
  }
}

// Sends [routing id] header [payload].
// Sends one message. `wait` false: ZMQ_DONTWAIT, and a full queue returns false (ZeroMQ
// queues a multipart message whole or not at all, so only the first frame can meet it).
bool send_frames(void* socket, const crypto::Bytes* routing_id, const crypto::Bytes& header,
                 crypto::ByteSpan payload, bool has_payload, const std::string& peer, bool wait = true) {
  const int dontwait = wait ? 0 : ZMQ_DONTWAIT;
  bool first = true;
  auto send_one = [&](const void* data, size_t size, int flags) {
    const bool was_first = first;
    first = false;
    if (zmq_send(socket, data, size, flags | dontwait) >= 0) return true;
    int e = zmq_errno();
    if (e == EHOSTUNREACH)
      throw PeerLostError(peer, fmt::format("control send to {}: peer is not connected", peer));
    if (e == EAGAIN && !wait && was_first) return false;
    if (e == EAGAIN)
      throw TimeoutError(fmt::format("control send to {}: send queue full for 2 s", peer));
    throw_zmq(fmt::format("control send to {}", peer));
  };
  if (routing_id && !send_one(routing_id->data(), routing_id->size(), ZMQ_SNDMORE)) return false;
  if (!send_one(header.data(), header.size(), has_payload ? ZMQ_SNDMORE : 0)) return false;
  if (has_payload) send_one(payload.data(), payload.size(), 0);
  return true;
}

// Validates frames [header] [payload?] from `source`; fills `out`. Returns false (with the
// reason logged and counted) if the message must be dropped.
bool parse_message(std::vector<std::unique_ptr<ZmqMessage>>& frames, size_t first, size_t extra_frames,
                   const Limits& limits, const std::string& source, RejectStats& stats, Message& out) {
  size_t parts = frames.size() - first;
  if (extra_frames > 0 || parts < 1 || parts > 2) {
    ++stats.malformed;
    log::warn("net", "control message from {} dropped: {} frames (expected header and optional payload)", source,
              parts + extra_frames);
    return false;
  }
  WireHeader w;
  try {
    w = decode_header(frames[first]->bytes(), limits, limits.max_control_payload_bytes, source);
  } catch (const OversizedError& e) {
    ++stats.oversized;
    log::warn("net", "control message dropped: {}", e.what());
    return false;
  } catch (const ProtocolError& e) {
    ++stats.malformed;
    log::warn("net", "control message dropped: {}", e.what());
    return false;
  }
  size_t payload_size = parts == 2 ? frames[first + 1]->bytes().size() : 0;
  if (payload_size != w.header.payload_bytes || w.part_offset != 0 || w.part_bytes != w.header.payload_bytes) {
    ++stats.malformed;
    log::warn("net", "control message from {} dropped: header announces {} payload bytes, frame has {}", source,
              w.header.payload_bytes, payload_size);
    return false;
  }
  out.header = w.header;
  if (parts == 2) {
    auto p = frames[first + 1]->bytes();
    out.payload.assign(p.begin(), p.end());
  } else {
    out.payload.clear();
  }
  return true;
}

crypto::Bytes encode_for_send(MessageHeader header, const PeerId& self, size_t payload_size, const Limits& limits,
                              const std::string& to) {
  if (payload_size > limits.max_control_payload_bytes)
    throw InvalidArgumentError(fmt::format("control message to {}: payload of {} bytes exceeds the limit of {}", to,
                                           payload_size, limits.max_control_payload_bytes));
  header.sender = self;
  header.payload_bytes = payload_size;
  return encode_header(WireHeader{header, 0, payload_size});
}

}  // namespace

// ---------------------------------------------------------------------------------------------

struct ControlServer::Impl {
  Impl(const crypto::Identity& s, ControlOptions o) : self(s), options(std::move(o)) {}
  const crypto::Identity& self;
  ControlOptions options;
  void* context = nullptr;
  void* router = nullptr;
  std::thread zap_thread;
  std::atomic<bool> stopping{false};

  mutable std::mutex mutex;  // guards the members below (shared with the ZAP thread)
  std::map<crypto::X25519Key, PeerId> curve_to_peer;
  std::set<PeerId> listed;
  RejectStats stats;

  std::map<PeerId, crypto::Bytes> routes;  // these three: the server's thread only
  std::map<PeerId, Clock::time_point> seen;
  Clock::time_point last_sweep{};  // of unlisted keys (forget_unlisted)

  void allow(const PeerId& peer) {
    crypto::X25519Key curve = crypto::ed25519_to_x25519_public(peer);
    std::lock_guard lock(mutex);
    curve_to_peer[curve] = peer;
    listed.insert(peer);
  }

  // ZAP (RFC 27) handler: answers the ZeroMQ library's authentication requests for the router.
  void serve_zap(void* zap) {
    std::vector<std::unique_ptr<ZmqMessage>> frames;
    while (!stopping.load()) {
      zmq_pollitem_t item{zap, 0, ZMQ_POLLIN, 0};
      if (zmq_poll(&item, 1, 100) <= 0) continue;
      size_t extra = 0;
      if (!recv_multipart(zap, frames, 8, extra)) continue;
      auto text = [&](size_t i) {
        auto b = frames[i]->bytes();
        return std::string(reinterpret_cast<const char*>(b.data()), b.size());
      };
      std::string status = "400", status_text = "malformed ZAP request", user_id;
      std::string address = frames.size() > 3 ? text(3) : "?";
      if (frames.size() >= 7 && text(5) == "CURVE" && frames[6]->bytes().size() == crypto::kX25519KeyBytes) {
        crypto::X25519Key curve;
        std::memcpy(curve.data(), frames[6]->bytes().data(), curve.size());
        std::lock_guard lock(mutex);
        auto it = curve_to_peer.find(curve);
        if (it != curve_to_peer.end()) {
          status = "200";
          status_text = "OK";
          user_id = it->second.hex();
        } else if (options.admit_any_key) {
          // The sender is bound to this key per message in recv().
          status = "200";
          status_text = "OK";
          user_id = std::string(kUnlistedPrefix) + crypto::to_hex(curve);
        } else {
          status_text = "key not on the allow-list";
          ++stats.refused_identity;
          log::warn("net", "control connection from {} refused: Curve key {} belongs to no allowed peer", address,
                    crypto::to_hex(curve).substr(0, 16));
        }
      } else {
        log::warn("net", "control connection from {} refused: {}", address, status_text);
      }
      std::string version = "1.0";
      std::string request_id = frames.size() > 1 ? text(1) : "";
      zmq_send(zap, version.data(), version.size(), ZMQ_SNDMORE);
      zmq_send(zap, request_id.data(), request_id.size(), ZMQ_SNDMORE);
      zmq_send(zap, status.data(), status.size(), ZMQ_SNDMORE);
      zmq_send(zap, status_text.data(), status_text.size(), ZMQ_SNDMORE);
      zmq_send(zap, user_id.data(), user_id.size(), ZMQ_SNDMORE);
      zmq_send(zap, "", 0, 0);
    }
    zmq_close(zap);
  }

  ~Impl() {
    stopping.store(true);
    if (zap_thread.joinable()) zap_thread.join();
    if (router) zmq_close(router);
    if (context) zmq_ctx_term(context);
  }
};

ControlServer::ControlServer(const crypto::Identity& self, AllowList allowed, const std::string& bind_endpoint,
                             ControlOptions options)
    : impl_(new Impl(self, options)) {
  check_curve_available();
  for (const auto& peer : allowed.peers()) impl_->allow(peer);
  impl_->context = zmq_ctx_new();
  if (!impl_->context) throw_zmq("zmq_ctx_new");
  // The ZAP handler must be bound before the router accepts its first handshake.
  void* zap = zmq_socket(impl_->context, ZMQ_REP);
  if (!zap || zmq_bind(zap, "inproc://zeromq.zap.01") != 0) throw_zmq("binding the ZAP handler");
  impl_->zap_thread = std::thread([impl = impl_.get(), zap] { impl->serve_zap(zap); });

  impl_->router = zmq_socket(impl_->context, ZMQ_ROUTER);
  if (!impl_->router) throw_zmq("zmq_socket(ROUTER)");
  set_common_options(impl_->router, options);
  set_int(impl_->router, ZMQ_ROUTER_MANDATORY, 1, "ZMQ_ROUTER_MANDATORY");
  set_int(impl_->router, ZMQ_CURVE_SERVER, 1, "ZMQ_CURVE_SERVER");
  crypto::X25519Key secret = self.curve_secret();
  set_option(impl_->router, ZMQ_CURVE_SECRETKEY, secret.data(), secret.size(), "ZMQ_CURVE_SECRETKEY");
  std::string domain = "meshtrain";
  set_option(impl_->router, ZMQ_ZAP_DOMAIN, domain.data(), domain.size(), "ZMQ_ZAP_DOMAIN");
  if (zmq_bind(impl_->router, bind_endpoint.c_str()) != 0)
    throw IoError(fmt::format("control server: cannot bind {}: {}", bind_endpoint, zmq_strerror(zmq_errno())),
                  zmq_errno());
  log::info("net", "control server {} listening on {}", self.public_key().fingerprint(), endpoint());
}

ControlServer::~ControlServer() = default;

std::string ControlServer::endpoint() const {
  char buf[256];
  size_t size = sizeof buf;
  if (zmq_getsockopt(impl_->router, ZMQ_LAST_ENDPOINT, buf, &size) != 0) throw_zmq("ZMQ_LAST_ENDPOINT");
  return std::string(buf);
}

const PeerId& ControlServer::id() const { return impl_->self.public_key(); }
void ControlServer::allow(const PeerId& peer) { impl_->allow(peer); }

bool ControlServer::allowed(const PeerId& peer) const {
  std::lock_guard lock(impl_->mutex);
  return impl_->listed.count(peer) != 0;
}

RejectStats ControlServer::stats() const {
  std::lock_guard lock(impl_->mutex);
  return impl_->stats;
}

std::optional<Message> ControlServer::recv(Deadline deadline, const CancelToken* cancel) {
  std::vector<std::unique_ptr<ZmqMessage>> frames;
  for (;;) {
    size_t extra = 0;
    if (!recv_multipart(impl_->router, frames, 3, extra)) {
      if (poll_socket(impl_->router, deadline, cancel, "control receive") == Ready::Timeout) return std::nullopt;
      continue;
    }
    const char* user = frames.size() > 1 ? zmq_msg_gets(&frames[1]->msg, "User-Id") : nullptr;
    if (!user) continue;  // cannot happen with CURVE: every admitted connection has a user id
    std::string_view user_id(user);
    std::optional<crypto::X25519Key> unlisted_curve;
    PeerId from;
    if (user_id.starts_with(kUnlistedPrefix)) {
      unlisted_curve = crypto::X25519Key{};
      crypto::Bytes raw = crypto::from_hex(user_id.substr(kUnlistedPrefix.size()), "ZAP user id");
      std::memcpy(unlisted_curve->data(), raw.data(), unlisted_curve->size());
    } else {
      from = PeerId::from_hex(user, "ZAP user id");
    }
    std::string source = unlisted_curve ? fmt::format("unlisted peer (Curve key {})",
                                                      crypto::to_hex(*unlisted_curve).substr(0, 16))
                                        : fmt::format("peer {}", from.fingerprint());
    Message m;
    bool ok;
    {
      std::lock_guard lock(impl_->mutex);
      ok = parse_message(frames, 1, extra, impl_->options.limits, source, impl_->stats, m);
      // An unlisted connection speaks for the Ed25519 key whose X25519 form it authenticated with.
      if (ok && unlisted_curve && crypto::ed25519_to_x25519_public(m.header.sender) == *unlisted_curve)
        from = m.header.sender;
      if (ok && m.header.sender != from) {
        ++impl_->stats.wrong_sender;
        log::warn("net", "control message from {} dropped: header claims sender {}", source,
                  m.header.sender.fingerprint());
        ok = false;
      }
    }
    if (!ok) continue;
    auto id = frames[0]->bytes();
    const Clock::time_point now = Clock::now();
    impl_->routes[from] = crypto::Bytes(id.begin(), id.end());
    impl_->seen[from] = now;
    if (impl_->options.admit_any_key) forget_unlisted(now);
    if (m.header.type == static_cast<uint16_t>(MessageType::Heartbeat)) continue;
    return m;
  }
}

void ControlServer::forget_unlisted(Clock::time_point now) {
  // A sweep at most every tenth of the age (scanning every key per message would cost too).
  const auto age = impl_->options.forget_unlisted_after;
  if (now - impl_->last_sweep < age / 10) return;
  impl_->last_sweep = now;
  std::lock_guard lock(impl_->mutex);
  for (auto it = impl_->seen.begin(); it != impl_->seen.end();) {
    if (now - it->second > age && !impl_->listed.count(it->first)) {
      impl_->routes.erase(it->first);
      it = impl_->seen.erase(it);
    } else {
      ++it;
    }
  }
}

void ControlServer::send(const PeerId& to, const MessageHeader& header, crypto::ByteSpan payload) {
  send_to_route(to, header, payload, /*wait=*/true);
}

bool ControlServer::try_send(const PeerId& to, const MessageHeader& header, crypto::ByteSpan payload) {
  return send_to_route(to, header, payload, /*wait=*/false);
}

bool ControlServer::send_to_route(const PeerId& to, const MessageHeader& header, crypto::ByteSpan payload, bool wait) {
  std::string name = to.fingerprint();
  auto route = impl_->routes.find(to);
  if (route == impl_->routes.end())
    throw PeerLostError(name, fmt::format("control send to {}: peer has never connected", name));
  crypto::Bytes encoded = encode_for_send(header, id(), payload.size(), impl_->options.limits, name);
  return send_frames(impl_->router, &route->second, encoded, payload, !payload.empty(), name, wait);
}

std::vector<PeerId> ControlServer::silent_peers(std::chrono::milliseconds silence) const {
  std::vector<PeerId> out;
  auto now = Clock::now();
  for (const auto& [peer, when] : impl_->seen)
    if (now - when > silence) out.push_back(peer);
  return out;
}

std::vector<PeerId> ControlServer::peers_seen_within(std::chrono::milliseconds window) const {
  std::vector<PeerId> out;
  auto now = Clock::now();
  for (const auto& [peer, when] : impl_->seen)
    if (now - when <= window) out.push_back(peer);
  return out;
}

std::optional<Clock::time_point> ControlServer::last_seen(const PeerId& peer) const {
  auto it = impl_->seen.find(peer);
  if (it == impl_->seen.end()) return std::nullopt;
  return it->second;
}

// ---------------------------------------------------------------------------------------------

struct ControlClient::Impl {
  Impl(const crypto::Identity& s, const PeerId& srv, ControlOptions o)
      : self(s), server(srv), server_name(srv.fingerprint()), options(std::move(o)) {}
  const crypto::Identity& self;
  PeerId server;
  std::string server_name;
  ControlOptions options;
  void* context = nullptr;
  void* dealer = nullptr;
  Clock::time_point last_send = Clock::now();
  RejectStats stats;

  ~Impl() {
    if (dealer) zmq_close(dealer);
    if (context) zmq_ctx_term(context);
  }
};

ControlClient::ControlClient(const crypto::Identity& self, const PeerId& server, const std::string& endpoint,
                             ControlOptions options)
    : impl_(new Impl(self, server, options)) {
  check_curve_available();
  impl_->context = zmq_ctx_new();
  if (!impl_->context) throw_zmq("zmq_ctx_new");
  impl_->dealer = zmq_socket(impl_->context, ZMQ_DEALER);
  if (!impl_->dealer) throw_zmq("zmq_socket(DEALER)");
  set_common_options(impl_->dealer, options);
  crypto::X25519Key server_key = crypto::ed25519_to_x25519_public(server);
  crypto::X25519Key secret = self.curve_secret();
  crypto::X25519Key public_key = crypto::x25519_public_from_secret(secret);
  set_option(impl_->dealer, ZMQ_CURVE_SERVERKEY, server_key.data(), server_key.size(), "ZMQ_CURVE_SERVERKEY");
  set_option(impl_->dealer, ZMQ_CURVE_PUBLICKEY, public_key.data(), public_key.size(), "ZMQ_CURVE_PUBLICKEY");
  set_option(impl_->dealer, ZMQ_CURVE_SECRETKEY, secret.data(), secret.size(), "ZMQ_CURVE_SECRETKEY");
  if (zmq_connect(impl_->dealer, endpoint.c_str()) != 0)
    throw InvalidArgumentError(fmt::format("control client: cannot connect to {}: {}", endpoint,
                                           zmq_strerror(zmq_errno())));
  log::debug("net", "control client {} connecting to {} at {}", self.public_key().fingerprint(), impl_->server_name,
             endpoint);
}

ControlClient::~ControlClient() = default;

void ControlClient::send(const MessageHeader& header, crypto::ByteSpan payload) {
  crypto::Bytes encoded = encode_for_send(header, impl_->self.public_key(), payload.size(), impl_->options.limits,
                                          impl_->server_name);
  send_frames(impl_->dealer, nullptr, encoded, payload, !payload.empty(), impl_->server_name);
  impl_->last_send = Clock::now();
}

void ControlClient::heartbeat() {
  MessageHeader h;
  h.type = static_cast<uint16_t>(MessageType::Heartbeat);
  send(h);
}

RejectStats ControlClient::stats() const { return impl_->stats; }

Message ControlClient::recv(Deadline deadline, const CancelToken* cancel) {
  std::vector<std::unique_ptr<ZmqMessage>> frames;
  std::string source = fmt::format("server {}", impl_->server_name);
  for (;;) {
    size_t extra = 0;
    if (!recv_multipart(impl_->dealer, frames, 2, extra)) {
      auto beat_at = impl_->last_send + impl_->options.heartbeat_interval;
      if (Clock::now() >= beat_at) {
        heartbeat();
        beat_at = impl_->last_send + impl_->options.heartbeat_interval;
      }
      Deadline slice(std::min(deadline.at(), beat_at));
      if (poll_socket(impl_->dealer, slice, cancel, "control receive") == Ready::Timeout && deadline.expired())
        throw TimeoutError(fmt::format("no control message from {} before the deadline", source));
      continue;
    }
    Message m;
    if (!parse_message(frames, 0, extra, impl_->options.limits, source, impl_->stats, m)) continue;
    if (m.header.sender != impl_->server) {
      ++impl_->stats.wrong_sender;
      log::warn("net", "control message from {} dropped: header claims sender {}", source,
                m.header.sender.fingerprint());
      continue;
    }
    if (m.header.type == static_cast<uint16_t>(MessageType::Heartbeat)) continue;
    return m;
  }
}

}  // namespace meshtrain::net
