#include <mutex>

#include "net/bulk_stream.h"

namespace meshtrain::net {

struct BulkListener::Impl {
  const crypto::Identity& self;
  AllowList allowed;
  BulkOptions options;
  Fd fd;
  mutable std::mutex stats_mutex;
  RejectStats stats;
};

BulkListener::BulkListener(const crypto::Identity& self, AllowList allowed, const std::string& host, uint16_t port,
                           BulkOptions options)
    : impl_(new Impl{self, std::move(allowed), options, Fd{}, {}, {}}) {
  impl_->fd = tcp_listen(host, port, options.socket_buffer_bytes);
  log::debug("net", "bulk listener {} on {}:{} ({})", self.public_key().fingerprint(), host, this->port(),
             options.security == BulkSecurity::Plain ? "plain" : crypto::aead_name(options.aead));
}

BulkListener::~BulkListener() = default;

uint16_t BulkListener::port() const { return local_port(impl_->fd.get()); }
void BulkListener::allow(const PeerId& peer) { impl_->allowed.add(peer); }

RejectStats BulkListener::stats() const {
  std::lock_guard lock(impl_->stats_mutex);
  return impl_->stats;
}

BulkStream BulkListener::accept(Deadline deadline, const CancelToken* cancel) {
  for (;;) {
    IoContext io;
    io.peer = fmt::format("listener :{}", port());
    io.what = "waiting for a bulk connection";
    io.deadline = deadline;
    io.cancel = cancel;
    std::string address;
    Fd fd = tcp_accept(impl_->fd.get(), io, &address, impl_->options.socket_buffer_bytes);
    Deadline handshake_deadline(std::min(deadline.at(), Clock::now() + impl_->options.handshake_timeout));
    try {
      auto stream = server_handshake(std::move(fd), impl_->self, impl_->allowed, impl_->options, address,
                                     handshake_deadline, cancel);
      log::debug("net", "bulk stream {}/{} of channel {:x} from {} accepted", stream->stream_index + 1,
                 stream->stream_count, stream->channel_id, stream->peer_name);
      return BulkStream(std::move(stream));
    } catch (const CancelledError&) {
      throw;
    } catch (const Error& e) {
      // One bad connection never takes the listener down: log, count, keep accepting.
      std::lock_guard lock(impl_->stats_mutex);
      if (dynamic_cast<const OversizedError*>(&e)) {
        ++impl_->stats.oversized;
      } else if (e.code() == ErrorCode::Auth) {
        ++impl_->stats.refused_identity;
      } else {
        ++impl_->stats.malformed;
      }
      log::warn("net", "bulk connection from {} refused: {}", address, e.what());
    }
  }
}

}  // namespace meshtrain::net
