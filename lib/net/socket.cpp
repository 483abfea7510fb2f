#include "net/socket.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

namespace meshtrain::net {

Fd& Fd::operator=(Fd&& o) noexcept {
  if (this != &o) {
    reset();
    fd_ = o.release();
  }
  return *this;
}

void Fd::reset() {
  if (fd_ >= 0) ::close(fd_);
  fd_ = -1;
}

namespace {

enum class Wait { Ready, Idle };

// Waits until fd has `events`, the cancel token fires, the deadline passes or the peer has been
// idle for peer_timeout since `last_progress`.
Wait wait_fd(int fd, short events, const IoContext& io, Clock::time_point last_progress) {
  for (;;) {
    if (io.cancel) io.cancel->throw_if_cancelled(fmt::format("{} (peer {})", io.what, io.peer));
    Clock::time_point idle_at = last_progress + io.peer_timeout;
    Clock::time_point until = std::min(io.deadline.at(), idle_at);
    auto now = Clock::now();
    if (now >= io.deadline.at())
      throw TimeoutError(fmt::format("{} ({}): deadline passed", io.what, io.peer));
    if (now >= idle_at) return Wait::Idle;
    auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(until - now).count() + 1;
    pollfd fds[2] = {{fd, events, 0}, {io.cancel ? io.cancel->fd() : -1, POLLIN, 0}};
    int n = ::poll(fds, io.cancel ? 2 : 1, static_cast<int>(std::min<int64_t>(ms, 1 << 30)));
    if (n < 0) {
      if (errno == EINTR) continue;
      throw_io_error(fmt::format("{} {}: poll", io.what, io.peer), errno);
    }
    if (n > 0 && fds[0].revents) return Wait::Ready;
  }
}

[[noreturn]] void throw_lost(const IoContext& io, const std::string& why) {
  throw PeerLostError(io.peer, fmt::format("peer {} lost while {}: {}", io.peer, io.what, why));
}

void set_common_options(int fd, int buffer_bytes) {
  int one = 1;
  ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  if (buffer_bytes > 0) {
    ::setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &buffer_bytes, sizeof buffer_bytes);
    ::setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &buffer_bytes, sizeof buffer_bytes);
  }
  // Keepalive probes find a dead host on an idle link (a killed process closes by itself).
  ::setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof one);
  int idle_s = 5, interval_s = 2, probes = 3;
  ::setsockopt(fd, IPPROTO_TCP, TCP_KEEPIDLE, &idle_s, sizeof idle_s);
  ::setsockopt(fd, IPPROTO_TCP, TCP_KEEPINTVL, &interval_s, sizeof interval_s);
  ::setsockopt(fd, IPPROTO_TCP, TCP_KEEPCNT, &probes, sizeof probes);
}

sockaddr_in resolve(const std::string& host, uint16_t port) {
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(port);
  if (::inet_pton(AF_INET, host.c_str(), &addr.sin_addr) == 1) return addr;
  addrinfo hints{};
  hints.ai_family = AF_INET;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* result = nullptr;
  int rc = ::getaddrinfo(host.c_str(), nullptr, &hints, &result);
  if (rc != 0 || !result)
    throw IoError(fmt::format("cannot resolve host '{}': {}", host, ::gai_strerror(rc)));
  addr.sin_addr = reinterpret_cast<sockaddr_in*>(result->ai_addr)->sin_addr;
  ::freeaddrinfo(result);
  return addr;
}

}  // namespace

void send_all(int fd, crypto::ByteSpan data, const IoContext& io) {
  size_t done = 0;
  auto last_progress = Clock::now();
  while (done < data.size()) {
    ssize_t n = ::send(fd, data.data() + done, data.size() - done, MSG_NOSIGNAL);
    if (n > 0) {
      done += static_cast<size_t>(n);
      last_progress = Clock::now();
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      if (wait_fd(fd, POLLOUT, io, last_progress) == Wait::Idle)
        throw_lost(io, fmt::format("it accepted no bytes for {} ms ({} of {} sent)",
                                   io.peer_timeout.count(), done, data.size()));
      continue;
    }
    throw_lost(io, fmt::format("send failed after {} of {} bytes: {}", done, data.size(),
                               std::strerror(n < 0 ? errno : EPIPE)));
  }
}

namespace {

// While a large read is outstanding, wake up only when a good part of it has arrived: with the
// default low-water mark of 1 byte, loopback and fast links wake the reader for every segment
// (a third of the 4-peer loopback all-reduce's context switches). At most a quarter of the
// receive buffer, so the buffer can always reach it; reset to 1 afterwards: the next wait may
// be for a short header.
class ReceiveLowWater {
 public:
  explicit ReceiveLowWater(int fd) : fd_(fd) {}
  ~ReceiveLowWater() {
    if (current_ > 1) set(1);
  }
  void before_wait(size_t remaining) {
    if (cap_ < 0) {
      int rcvbuf = 0;
      socklen_t len = sizeof rcvbuf;
      cap_ = ::getsockopt(fd_, SOL_SOCKET, SO_RCVBUF, &rcvbuf, &len) == 0 ? std::min(rcvbuf / 4, kMaxBytes) : 1;
    }
    int want = static_cast<int>(std::min<size_t>(remaining, static_cast<size_t>(cap_)));
    if (want < kMinBytes) want = 1;
    if (want != current_) set(want);
  }

 private:
  static constexpr int kMinBytes = 64 << 10;
  static constexpr int kMaxBytes = 256 << 10;
  void set(int bytes) {
    if (::setsockopt(fd_, SOL_SOCKET, SO_RCVLOWAT, &bytes, sizeof bytes) == 0) current_ = bytes;
  }
  int fd_;
  int current_ = 1;
  int cap_ = -1;
};

}  // namespace

void recv_all(int fd, crypto::MutableByteSpan data, const IoContext& io) {
  size_t done = 0;
  auto last_progress = Clock::now();
  ReceiveLowWater low_water(fd);
  while (done < data.size()) {
    ssize_t n = ::recv(fd, data.data() + done, data.size() - done, 0);
    if (n > 0) {
      done += static_cast<size_t>(n);
      last_progress = Clock::now();
      continue;
    }
    if (n == 0)
      throw_lost(io, fmt::format("connection closed after {} of {} bytes", done, data.size()));
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) {
      low_water.before_wait(data.size() - done);
      if (wait_fd(fd, POLLIN, io, last_progress) == Wait::Idle)
        throw_lost(io, fmt::format("it sent nothing for {} ms ({} of {} bytes received)",
                                   io.peer_timeout.count(), done, data.size()));
      continue;
    }
    throw_lost(io, fmt::format("recv failed after {} of {} bytes: {}", done, data.size(), std::strerror(errno)));
  }
}

void wait_readable(int fd, const IoContext& io) {
  IoContext quiet_ok = io;
  quiet_ok.peer_timeout = std::chrono::hours(24 * 365);
  wait_fd(fd, POLLIN, quiet_ok, Clock::now());
}

Fd tcp_connect(const std::string& host, uint16_t port, const IoContext& io, int buffer_bytes) {
  sockaddr_in addr = resolve(host, port);
  Fd fd(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
  if (!fd) throw_io_error("socket", errno);
  set_common_options(fd.get(), buffer_bytes);
  if (::connect(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0) return fd;
  if (errno != EINPROGRESS) throw_lost(io, fmt::format("connect to {}:{}: {}", host, port, std::strerror(errno)));
  if (wait_fd(fd.get(), POLLOUT, io, Clock::now()) == Wait::Idle)
    throw_lost(io, fmt::format("connect to {}:{} did not complete in {} ms", host, port, io.peer_timeout.count()));
  int err = 0;
  socklen_t len = sizeof err;
  ::getsockopt(fd.get(), SOL_SOCKET, SO_ERROR, &err, &len);
  if (err != 0) throw_lost(io, fmt::format("connect to {}:{}: {}", host, port, std::strerror(err)));
  return fd;
}

Fd tcp_listen(const std::string& host, uint16_t port, int buffer_bytes) {
  sockaddr_in addr = resolve(host, port);
  Fd fd(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
  if (!fd) throw_io_error("socket", errno);
  int one = 1;
  ::setsockopt(fd.get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  // Buffer sizes set on the listener are inherited by accepted sockets before the handshake,
  // which is when the TCP window scale is fixed.
  if (buffer_bytes > 0) {
    ::setsockopt(fd.get(), SOL_SOCKET, SO_SNDBUF, &buffer_bytes, sizeof buffer_bytes);
    ::setsockopt(fd.get(), SOL_SOCKET, SO_RCVBUF, &buffer_bytes, sizeof buffer_bytes);
  }
  if (::bind(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0)
    throw_io_error(fmt::format("bind {}:{}", host, port), errno);
  if (::listen(fd.get(), 128) != 0) throw_io_error(fmt::format("listen {}:{}", host, port), errno);
  return fd;
}

uint16_t local_port(int fd) {
  sockaddr_in addr{};
  socklen_t len = sizeof addr;
  if (::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) != 0) throw_io_error("getsockname", errno);
  return ntohs(addr.sin_port);
}

Fd tcp_accept(int listen_fd, const IoContext& io, std::string* peer_address, int buffer_bytes) {
  for (;;) {
    sockaddr_in addr{};
    socklen_t len = sizeof addr;
    Fd fd(::accept4(listen_fd, reinterpret_cast<sockaddr*>(&addr), &len, SOCK_CLOEXEC | SOCK_NONBLOCK));
    if (fd) {
      set_common_options(fd.get(), buffer_bytes);
      if (peer_address) {
        char text[INET_ADDRSTRLEN] = {};
        ::inet_ntop(AF_INET, &addr.sin_addr, text, sizeof text);
        *peer_address = fmt::format("{}:{}", text, ntohs(addr.sin_port));
      }
      return fd;
    }
    if (errno == EINTR || errno == ECONNABORTED) continue;
    if (errno != EAGAIN && errno != EWOULDBLOCK) throw_io_error("accept", errno);
    wait_readable(listen_fd, io);
  }
}

}  // namespace meshtrain::net
