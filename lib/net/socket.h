// TCP socket helpers for the bulk path: an owning fd, and send/receive loops that never block
// past a deadline, honour a CancelToken and report a peer that goes away or goes silent.
#pragma once

#include <cstdint>
#include <string>

#include "meshtrain/core.h"
#include "meshtrain/crypto.h"

namespace meshtrain::net {

class Fd {
 public:
  Fd() = default;
  explicit Fd(int fd) : fd_(fd) {}
  Fd(Fd&& o) noexcept : fd_(o.release()) {}
  Fd& operator=(Fd&& o) noexcept;
  ~Fd() { reset(); }
  int get() const { return fd_; }
  int release() { int f = fd_; fd_ = -1; return f; }
  void reset();
  explicit operator bool() const { return fd_ >= 0; }

 private:
  int fd_ = -1;
};

// What a wait is for, so that errors name the peer and the operation.
struct IoContext {
  std::string peer;                    // printable peer id (fingerprint) or address
  std::string what;                    // e.g. "receiving payload"
  Deadline deadline = Deadline::never();
  const CancelToken* cancel = nullptr;
  // A wait with no progress for this long is reported as PeerLost (silent peer).
  std::chrono::milliseconds peer_timeout{10000};
};

// Sends all bytes. Throws PeerLostError (connection reset/closed, or no progress within
// peer_timeout), TimeoutError (deadline), CancelledError.
void send_all(int fd, crypto::ByteSpan data, const IoContext& io);
// Receives exactly data.size() bytes. Same errors; an orderly close before the end is PeerLost.
void recv_all(int fd, crypto::MutableByteSpan data, const IoContext& io);

// Waits until fd is readable (data or EOF) without consuming anything. Only the deadline and
// the cancel token end the wait: a peer may be quiet between messages.
void wait_readable(int fd, const IoContext& io);

// Non-blocking TCP socket connected to host:port within the deadline.
Fd tcp_connect(const std::string& host, uint16_t port, const IoContext& io, int buffer_bytes);
// Listening socket; port 0 picks a free port.
Fd tcp_listen(const std::string& host, uint16_t port, int buffer_bytes);
uint16_t local_port(int fd);
// Accepts one connection (non-blocking, CLOEXEC, TCP_NODELAY) or throws Timeout/Cancelled.
Fd tcp_accept(int listen_fd, const IoContext& io, std::string* peer_address, int buffer_bytes);

}  // namespace meshtrain::net
