#include "market/server.h"

#include <chrono>

namespace meshtrain::market {

TimeMs wall_clock_ms() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::system_clock::now().time_since_epoch())
      .count();
}

std::string MarketServerStats::to_json() const {
  return fmt::format(
      R"({{"requests":{},"ok":{},"refused":{},"malformed":{},"dropped":{},"failed":{},"expired":{},)"
      R"("transport_rejected":{}}})",
      requests, ok, refused, malformed, dropped, failed, expired, transport_rejected);
}

std::string MarketServerStats::to_text() const {
  return fmt::format(
      "requests {} (ok {}, refused {}), malformed {}, dropped {}, failed {}, leases expired {}, transport rejected {}",
      requests, ok, refused, malformed, dropped, failed, expired, transport_rejected);
}

namespace {

net::ControlOptions control_options() {
  net::ControlOptions options;
  options.admit_any_key = true;
  // The limit applies both ways: large enough for the largest reply, so a request above its own
  // limit (kMaxRequestBytes) still gets an error reply; beyond this the transport drops and
  // counts it by itself.
  options.limits.max_control_payload_bytes = protocol::kMaxReplyBytes;
  return options;
}

}  // namespace

struct MarketServer::Impl {
  Ledger ledger;
  net::ControlServer server;
  MarketServerOptions options;
  MarketServerStats stats;
  Clock::time_point next_sweep = Clock::now();

  Impl(const crypto::Identity& self, const std::filesystem::path& db, MarketServerOptions opts)
      : ledger(db, opts.ledger),
        server(self, net::AllowList{}, opts.bind_endpoint, control_options()),
        options(std::move(opts)) {}

  void sweep_if_due() {
    if (Clock::now() < next_sweep) return;
    next_sweep = Clock::now() + options.sweep_interval;
    try {
      size_t n = ledger.sweep(wall_clock_ms());
      stats.expired += n;
      if (n) log::info("market", "closed {} expired lease(s), unspent escrow refunded", n);
    } catch (const Error& e) {
      log::error("market", "expiry sweep failed: {}", e.what());
    }
  }

  // Runs one message; always returns the reply to send (or nothing for a non-request).
  std::optional<protocol::Reply> handle(const net::Message& message) {
    const auto& sender = message.header.sender;
    if (message.header.type != static_cast<uint16_t>(protocol::MessageType::Request)) {
      ++stats.dropped;
      log::warn("market", "dropped a message of type {} from {}: not a market request", message.header.type,
                sender.fingerprint());
      return std::nullopt;
    }
    std::string source = fmt::format("market request {} from {}", message.header.op_seq, sender.fingerprint());
    protocol::Request request;
    try {
      if (message.payload.size() > protocol::kMaxRequestBytes + 256)
        throw ProtocolError(fmt::format("{}: {} bytes, more than the limit {}", source, message.payload.size(),
                                        protocol::kMaxRequestBytes));
      request = protocol::decode_signed(message.payload, source);
      if (request.account != sender)
        throw AuthError(fmt::format("{}: signed for account {}, but the connection is authenticated as {}", source,
                                    request.account.fingerprint(), sender.fingerprint()));
    } catch (const Error& e) {
      ++stats.malformed;
      log::warn("market", "refused {}: {}", source, e.what());
      return protocol::error_reply(e);
    }

    ++stats.requests;
    protocol::Reply reply;
    try {
      reply = ledger.execute(request, wall_clock_ms());
    } catch (const std::exception& e) {
      // The database failed; the transaction rolled back, so the client may simply retry.
      ++stats.failed;
      log::error("market", "{} ({}) failed in the ledger: {}", source, protocol::request_name(request.body), e.what());
      return protocol::error_reply(e);
    }
    bool query = !protocol::changes_state(request.body);
    if (reply.ok) {
      ++stats.ok;
      if (query)
        log::debug("market", "{} from {}: ok", protocol::request_name(request.body), sender.fingerprint());
      else
        log::info("market", "{} from {} (nonce {}): ok", protocol::request_name(request.body), sender.fingerprint(),
                  request.nonce);
    } else {
      ++stats.refused;
      log::info("market", "{} from {} (nonce {}): refused ({}): {}", protocol::request_name(request.body),
                sender.fingerprint(), request.nonce, reply.reason.empty() ? error_code_name(reply.code) : reply.reason,
                reply.message);
    }
    return reply;
  }

  void reply_to(const net::Message& message, const protocol::Reply& reply) {
    net::MessageHeader header;
    header.type = static_cast<uint16_t>(protocol::MessageType::Reply);
    header.op_seq = message.header.op_seq;
    try {
      auto bytes = protocol::encode(reply);
      if (bytes.size() > protocol::kMaxReplyBytes) {
        // Only lists grow this large (1000 offers with long texts): ask for smaller pages.
        log::warn("market", "reply {} to {} is {} bytes, over the limit {}", message.header.op_seq,
                  message.header.sender.fingerprint(), bytes.size(), protocol::kMaxReplyBytes);
        bytes = protocol::encode(protocol::error_reply(MarketError(
            "reply_too_large", fmt::format("the reply would be {} bytes, more than the limit {}: use a smaller limit",
                                           bytes.size(), protocol::kMaxReplyBytes))));
      }
      server.send(message.header.sender, header, bytes);
    } catch (const Error& e) {
      // The client left (PeerLost) or the reply could not be sent: the server carries on.
      ++stats.dropped;
      log::info("market", "reply {} to {} not delivered: {}", message.header.op_seq,
                message.header.sender.fingerprint(), e.what());
    }
  }
};

MarketServer::MarketServer(const crypto::Identity& self, const std::filesystem::path& db, MarketServerOptions options)
    : impl_(std::make_unique<Impl>(self, db, std::move(options))) {}
MarketServer::~MarketServer() = default;

std::string MarketServer::endpoint() const { return impl_->server.endpoint(); }
const crypto::PeerId& MarketServer::id() const { return impl_->server.id(); }
MarketServerStats MarketServer::stats() const {
  MarketServerStats s = impl_->stats;
  auto t = impl_->server.stats();
  s.transport_rejected = t.refused_identity + t.malformed + t.oversized + t.wrong_sender;
  return s;
}
Ledger& MarketServer::ledger() { return impl_->ledger; }

void MarketServer::poll(Deadline deadline, const CancelToken* cancel) {
  auto& impl = *impl_;
  for (;;) {
    impl.sweep_if_due();
    // Wake for the next sweep even when no request comes.
    Deadline wait(std::min(deadline.at(), impl.next_sweep));
    auto message = impl.server.recv(wait, cancel);
    if (message) {
      if (auto reply = impl.handle(*message)) impl.reply_to(*message, *reply);
    }
    if (deadline.expired()) return;
  }
}

}  // namespace meshtrain::market
