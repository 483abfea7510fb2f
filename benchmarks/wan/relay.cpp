#include "relay.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <deque>
#include <random>
#include <vector>

#include <meshtrain/core.h>

namespace meshtrain::wan {
namespace {

constexpr size_t kReadSize = 64 * 1024;

std::string errno_text(int e) { return std::strerror(e); }

std::string sockaddr_text(const sockaddr* sa) {
  char host[INET6_ADDRSTRLEN] = "?";
  uint16_t port = 0;
  if (sa->sa_family == AF_INET) {
    auto* in = reinterpret_cast<const sockaddr_in*>(sa);
    ::inet_ntop(AF_INET, &in->sin_addr, host, sizeof host);
    port = ntohs(in->sin_port);
    return fmt::format("{}:{}", host, port);
  }
  if (sa->sa_family == AF_INET6) {
    auto* in6 = reinterpret_cast<const sockaddr_in6*>(sa);
    ::inet_ntop(AF_INET6, &in6->sin6_addr, host, sizeof host);
    port = ntohs(in6->sin6_port);
    return fmt::format("[{}]:{}", host, port);
  }
  return "?";
}

struct Resolved {
  sockaddr_storage addr{};
  socklen_t len = 0;
};

Resolved resolve(const std::string& host, uint16_t port, bool passive, const char* what) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = passive ? AI_PASSIVE : 0;
  addrinfo* res = nullptr;
  std::string port_s = std::to_string(port);
  int rc = ::getaddrinfo(host.empty() ? nullptr : host.c_str(), port_s.c_str(), &hints, &res);
  if (rc != 0 || !res) {
    throw InvalidArgumentError(
        fmt::format("wan relay: cannot resolve {} address '{}': {}", what, host, ::gai_strerror(rc)));
  }
  Resolved r;
  std::memcpy(&r.addr, res->ai_addr, res->ai_addrlen);
  r.len = res->ai_addrlen;
  ::freeaddrinfo(res);
  return r;
}

void set_nodelay(int fd) {
  int one = 1;
  ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

void set_linger_zero(int fd) {
  if (fd < 0) return;
  linger l{};
  l.l_onoff = 1;
  l.l_linger = 0;
  ::setsockopt(fd, SOL_SOCKET, SO_LINGER, &l, sizeof l);
}

timespec to_timespec(Clock::duration d) {
  if (d < Clock::duration::zero()) d = Clock::duration::zero();
  auto ns = std::chrono::duration_cast<std::chrono::nanoseconds>(d).count();
  timespec ts{};
  ts.tv_sec = static_cast<time_t>(ns / 1000000000);
  ts.tv_nsec = static_cast<long>(ns % 1000000000);
  return ts;
}

}  // namespace

std::pair<std::string, uint16_t> parse_host_port(const std::string& text) {
  std::string host;
  std::string port;
  if (!text.empty() && text.front() == '[') {
    auto close = text.find(']');
    if (close == std::string::npos || close + 1 >= text.size() || text[close + 1] != ':') {
      throw InvalidArgumentError(fmt::format("'{}' is not [HOST]:PORT", text));
    }
    host = text.substr(1, close - 1);
    port = text.substr(close + 2);
  } else {
    auto colon = text.rfind(':');
    if (colon == std::string::npos) throw InvalidArgumentError(fmt::format("'{}' is not HOST:PORT", text));
    host = text.substr(0, colon);
    port = text.substr(colon + 1);
  }
  if (host.empty()) throw InvalidArgumentError(fmt::format("'{}': empty host", text));
  char* end = nullptr;
  errno = 0;
  unsigned long p = port.empty() ? 70000 : std::strtoul(port.c_str(), &end, 10);
  if (port.empty() || errno != 0 || *end != '\0' || p > 65535) {
    throw InvalidArgumentError(fmt::format("'{}': port '{}' is not a number in 0..65535", text, port));
  }
  return {host, static_cast<uint16_t>(p)};
}

// ---------------------------------------------------------------------------------------------

struct WanRelay::Shared {
  RelayOptions opts;
  Resolved target;
  std::string target_text;
  int stop_fd = -1;  // eventfd, readable once the relay stops
  std::atomic<uint64_t> accepted{0}, refused{0}, active{0}, cut{0}, bytes_c2s{0}, bytes_s2c{0},
      peak_queued{0};
  uint64_t seed = 0;

  ~Shared() {
    if (stop_fd >= 0) ::close(stop_fd);
  }
};

struct WanRelay::Connection {
  Connection(std::shared_ptr<Shared> s, uint64_t id, int client, std::string peer)
      : shared(std::move(s)), id(id), client_fd(client), peer(std::move(peer)) {
    abort_fd = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  }
  ~Connection() {
    if (abort_fd >= 0) ::close(abort_fd);
  }

  std::shared_ptr<Shared> shared;
  uint64_t id;
  int client_fd;
  int server_fd = -1;
  int abort_fd = -1;
  std::string peer;
  std::thread c2s;  // connects to the target, then relays client -> server
  std::thread s2c;  // started by c2s once connected
  std::atomic<int> running{1};
  std::atomic<bool> finished{false};
  std::atomic<bool> aborted{false};
  std::atomic<uint64_t> fwd_c2s{0}, fwd_s2c{0};
  std::mutex reason_mu;
  std::string reason;
  Clock::time_point opened = Clock::now();

  void abort(const std::string& why, bool is_cut = false) {
    if (aborted.exchange(true)) return;
    {
      std::lock_guard<std::mutex> lock(reason_mu);
      reason = why;
    }
    if (is_cut) shared->cut.fetch_add(1);
    // RST instead of FIN when the sockets are closed (by the last thread to leave).
    set_linger_zero(client_fd);
    set_linger_zero(server_fd);
    uint64_t one = 1;
    [[maybe_unused]] auto n = ::write(abort_fd, &one, sizeof one);
  }

  // Called by each relay thread as it leaves; the last one closes the sockets.
  void leave() {
    if (running.fetch_sub(1, std::memory_order_acq_rel) != 1) return;
    if (client_fd >= 0) ::close(client_fd);
    if (server_fd >= 0) ::close(server_fd);
    std::string why;
    {
      std::lock_guard<std::mutex> lock(reason_mu);
      why = reason.empty() ? "both sides closed" : reason;
    }
    double secs = std::chrono::duration<double>(Clock::now() - opened).count();
    log::info("wan", "conn {} closed ({}): {} B client->server, {} B server->client, {:.3f} s", id, why,
              fwd_c2s.load(), fwd_s2c.load(), secs);
    shared->active.fetch_sub(1);
    finished.store(true, std::memory_order_release);
  }

  void run_c2s();
  void pipe(bool client_to_server);
};

void WanRelay::Connection::run_c2s() {
  const RelayOptions& o = shared->opts;
  int fd = ::socket(shared->target.addr.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) {
    shared->refused.fetch_add(1);
    abort(fmt::format("socket(): {}", errno_text(errno)));
    leave();
    return;
  }
  server_fd = fd;
  int rc = ::connect(fd, reinterpret_cast<const sockaddr*>(&shared->target.addr), shared->target.len);
  if (rc != 0 && errno != EINPROGRESS) {
    shared->refused.fetch_add(1);
    abort(fmt::format("connect to {}: {}", shared->target_text, errno_text(errno)));
    leave();
    return;
  }
  if (rc != 0) {
    auto until = Clock::now() + o.connect_timeout;
    while (true) {
      pollfd fds[3] = {{fd, POLLOUT, 0}, {shared->stop_fd, POLLIN, 0}, {abort_fd, POLLIN, 0}};
      timespec ts = to_timespec(until - Clock::now());
      int n = ::ppoll(fds, 3, &ts, nullptr);
      if (n < 0 && errno == EINTR) continue;
      if (fds[1].revents || fds[2].revents) {
        abort("relay stopping");
        leave();
        return;
      }
      if (n == 0) {
        shared->refused.fetch_add(1);
        abort(fmt::format("connect to {}: timed out after {} ms", shared->target_text,
                          o.connect_timeout.count()));
        leave();
        return;
      }
      if (fds[0].revents) break;
    }
    int err = 0;
    socklen_t len = sizeof err;
    ::getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len);
    if (err != 0) {
      shared->refused.fetch_add(1);
      abort(fmt::format("connect to {}: {}", shared->target_text, errno_text(err)));
      leave();
      return;
    }
  }
  set_nodelay(fd);
  set_nodelay(client_fd);
  log::info("wan", "conn {} open: {} -> {}", id, peer, shared->target_text);
  if (o.cut_after_bytes && *o.cut_after_bytes == 0) {
    abort("cut after 0 bytes", true);
    leave();
    return;
  }
  running.fetch_add(1, std::memory_order_acq_rel);
  try {
    s2c = std::thread([this] {
      pipe(false);
      leave();
    });
  } catch (const std::exception& e) {
    running.fetch_sub(1);
    abort(fmt::format("cannot start thread: {}", e.what()));
  }
  pipe(true);
  leave();
}

// One direction: read src into timestamped chunks, write each to dst once due.
void WanRelay::Connection::pipe(bool client_to_server) {
  const RelayOptions& o = shared->opts;
  const int src = client_to_server ? client_fd : server_fd;
  const int dst = client_to_server ? server_fd : client_fd;
  const char* src_name = client_to_server ? "client" : "server";
  const char* dst_name = client_to_server ? "server" : "client";
  std::atomic<uint64_t>& fwd = client_to_server ? fwd_c2s : fwd_s2c;
  std::atomic<uint64_t>& total = client_to_server ? shared->bytes_c2s : shared->bytes_s2c;
  const uint64_t limit = (client_to_server && o.cut_after_bytes) ? *o.cut_after_bytes : UINT64_MAX;

  std::mt19937_64 rng(shared->seed ^ (id * 0x9e3779b97f4a7c15ull) ^ (client_to_server ? 0 : 0x5bd1e995ull));
  std::uniform_int_distribution<int64_t> jitter_dist(0, std::max<int64_t>(0, o.jitter.count()));
  // Bytes per microsecond of the rate cap, and the write slice that keeps pacing smooth (~1 ms).
  const double rate_bytes_per_us = o.rate_mbps > 0 ? o.rate_mbps / 8.0 : 0.0;
  const size_t slice =
      o.rate_mbps > 0 ? std::clamp<size_t>(static_cast<size_t>(rate_bytes_per_us * 1000), 1500, kReadSize)
                      : SIZE_MAX;

  struct Chunk {
    std::vector<uint8_t> data;
    size_t off = 0;
    Clock::time_point due;
    bool eof = false;
  };
  std::deque<Chunk> q;
  size_t queued = 0;
  bool src_done = false;
  uint64_t read_total = 0;
  uint64_t written = 0;
  Clock::time_point last_due{};
  Clock::time_point rate_next{};

  auto due_of = [&](const Chunk& c) { return c.eof ? c.due : std::max(c.due, rate_next); };

  while (true) {
    if (aborted.load(std::memory_order_acquire)) return;

    // 1. Write every chunk that is due.
    bool write_blocked = false;
    auto now = Clock::now();
    while (!q.empty()) {
      Chunk& c = q.front();
      if (now < due_of(c)) break;
      if (c.eof) {
        ::shutdown(dst, SHUT_WR);
        log::debug("wan", "conn {}: {} closed its side; half-close passed to {}", id, src_name, dst_name);
        return;
      }
      size_t n = std::min(c.data.size() - c.off, slice);
      ssize_t w = ::send(dst, c.data.data() + c.off, n, MSG_NOSIGNAL);
      if (w < 0) {
        if (errno == EINTR) continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK) {
          write_blocked = true;
          break;
        }
        abort(fmt::format("write to {}: {}", dst_name, errno_text(errno)));
        return;
      }
      c.off += static_cast<size_t>(w);
      queued -= static_cast<size_t>(w);
      written += static_cast<uint64_t>(w);
      fwd.fetch_add(static_cast<uint64_t>(w), std::memory_order_relaxed);
      total.fetch_add(static_cast<uint64_t>(w), std::memory_order_relaxed);
      if (rate_bytes_per_us > 0) {
        auto cost = std::chrono::nanoseconds(static_cast<int64_t>(static_cast<double>(w) * 1000.0 / rate_bytes_per_us));
        rate_next = std::max(rate_next, now) + std::chrono::duration_cast<Clock::duration>(cost);
      }
      if (c.off == c.data.size()) q.pop_front();
      if (written >= limit) {
        abort(fmt::format("cut after {} bytes client->server", written), true);
        return;
      }
      now = Clock::now();
    }

    // 2. Wait for input, writability, the next due time, or abort/stop.
    const bool can_read = !src_done && queued < o.max_queued_bytes && read_total < limit;
    pollfd fds[4] = {
        {abort_fd, POLLIN, 0},
        {shared->stop_fd, POLLIN, 0},
        {can_read ? src : -1, POLLIN, 0},
        {write_blocked ? dst : -1, POLLOUT, 0},
    };
    timespec ts{};
    timespec* tsp = nullptr;
    if (!q.empty() && !write_blocked) {
      ts = to_timespec(due_of(q.front()) - now);
      tsp = &ts;
    }
    int n = ::ppoll(fds, 4, tsp, nullptr);
    if (n < 0) {
      if (errno == EINTR) continue;
      abort(fmt::format("ppoll: {}", errno_text(errno)));
      return;
    }
    if (fds[0].revents) return;  // aborted by the other direction
    if (fds[1].revents) {
      abort("relay stopping");
      return;
    }
    if (fds[2].revents) {
      size_t want = static_cast<size_t>(std::min<uint64_t>(kReadSize, limit - read_total));
      Chunk c;
      c.data.resize(want);
      ssize_t r = ::recv(src, c.data.data(), want, 0);
      auto arrival = Clock::now();
      if (r > 0) {
        c.data.resize(static_cast<size_t>(r));
        c.due = std::max(last_due, arrival + o.delay + std::chrono::microseconds(jitter_dist(rng)));
        last_due = c.due;
        read_total += static_cast<uint64_t>(r);
        queued += static_cast<size_t>(r);
        q.push_back(std::move(c));
        uint64_t peak = shared->peak_queued.load(std::memory_order_relaxed);
        while (queued > peak && !shared->peak_queued.compare_exchange_weak(peak, queued)) {
        }
      } else if (r == 0) {
        src_done = true;
        c.data.clear();
        c.eof = true;
        c.due = std::max(last_due, arrival + o.delay);
        last_due = c.due;
        q.push_back(std::move(c));
      } else if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
        abort(fmt::format("read from {}: {}", src_name, errno_text(errno)));
        return;
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------

WanRelay::WanRelay(RelayOptions options) : opts_(std::move(options)) {}

WanRelay::~WanRelay() { stop(); }

void WanRelay::start() {
  if (started_) throw InvalidArgumentError("wan relay: start() called twice");
  if (opts_.delay.count() < 0 || opts_.jitter.count() < 0 || opts_.rate_mbps < 0) {
    throw InvalidArgumentError("wan relay: delay, jitter and rate must not be negative");
  }
  if (opts_.max_queued_bytes == 0) throw InvalidArgumentError("wan relay: max_queued_bytes must be > 0");
  if (opts_.target_port == 0) throw InvalidArgumentError("wan relay: target port must not be 0");

  auto shared = std::make_shared<Shared>();
  shared->opts = opts_;
  shared->target = resolve(opts_.target_host, opts_.target_port, false, "target");
  shared->target_text = sockaddr_text(reinterpret_cast<const sockaddr*>(&shared->target.addr));
  shared->seed = opts_.seed != 0 ? opts_.seed : (static_cast<uint64_t>(std::random_device{}()) << 32) ^ std::random_device{}();
  shared->stop_fd = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (shared->stop_fd < 0) throw_io_error("wan relay: eventfd", errno);

  Resolved local = resolve(opts_.listen_host, opts_.listen_port, true, "listen");
  int fd = ::socket(local.addr.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) throw_io_error("wan relay: socket", errno);
  int one = 1;
  ::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  if (::bind(fd, reinterpret_cast<const sockaddr*>(&local.addr), local.len) != 0) {
    int e = errno;
    ::close(fd);
    throw_io_error(fmt::format("wan relay: bind {}:{}", opts_.listen_host, opts_.listen_port), e);
  }
  if (::listen(fd, 512) != 0) {
    int e = errno;
    ::close(fd);
    throw_io_error("wan relay: listen", e);
  }
  sockaddr_storage bound{};
  socklen_t blen = sizeof bound;
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&bound), &blen);
  port_ = ntohs(bound.ss_family == AF_INET6 ? reinterpret_cast<sockaddr_in6*>(&bound)->sin6_port
                                            : reinterpret_cast<sockaddr_in*>(&bound)->sin_port);
  listen_fd_ = fd;
  shared_ = std::move(shared);
  started_ = true;
  log::info("wan", "relay listening on {} -> {}: delay {} us, jitter {} us, rate {} Mbit/s, cut {}",
            sockaddr_text(reinterpret_cast<sockaddr*>(&bound)), shared_->target_text, opts_.delay.count(),
            opts_.jitter.count(), opts_.rate_mbps,
            opts_.cut_after_bytes ? fmt::format("after {} B", *opts_.cut_after_bytes) : std::string("never"));
  acceptor_ = std::thread([this] { accept_loop(); });
}

void WanRelay::accept_loop() {
  while (true) {
    pollfd fds[2] = {{listen_fd_, POLLIN, 0}, {shared_->stop_fd, POLLIN, 0}};
    int n = ::poll(fds, 2, 200);
    if (n < 0 && errno != EINTR) {
      log::error("wan", "relay accept poll: {}", errno_text(errno));
      return;
    }
    if (fds[1].revents) return;
    reap(false);
    if (n <= 0 || !fds[0].revents) continue;
    sockaddr_storage peer{};
    socklen_t plen = sizeof peer;
    int cfd = ::accept4(listen_fd_, reinterpret_cast<sockaddr*>(&peer), &plen, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (cfd < 0) {
      if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR && errno != ECONNABORTED) {
        log::warn("wan", "relay accept: {}", errno_text(errno));
        std::this_thread::sleep_for(std::chrono::milliseconds(10));  // e.g. EMFILE: don't spin
      }
      continue;
    }
    shared_->accepted.fetch_add(1);
    std::string peer_text = sockaddr_text(reinterpret_cast<sockaddr*>(&peer));
    if (opts_.max_connections != 0 && shared_->active.load() >= opts_.max_connections) {
      shared_->refused.fetch_add(1);
      log::warn("wan", "relay refused {}: {} connections open (max {})", peer_text, shared_->active.load(),
                opts_.max_connections);
      set_linger_zero(cfd);
      ::close(cfd);
      continue;
    }
    shared_->active.fetch_add(1);
    auto conn = std::make_unique<Connection>(shared_, next_id_++, cfd, peer_text);
    Connection* raw = conn.get();
    {
      std::lock_guard<std::mutex> lock(conns_mu_);
      conns_.push_back(std::move(conn));
    }
    try {
      raw->c2s = std::thread([raw] { raw->run_c2s(); });
    } catch (const std::exception& e) {
      log::error("wan", "relay: cannot start a connection thread: {}", e.what());
      raw->abort("no thread");
      raw->leave();
    }
  }
}

void WanRelay::reap(bool all) {
  std::list<std::unique_ptr<Connection>> done;
  {
    std::lock_guard<std::mutex> lock(conns_mu_);
    for (auto it = conns_.begin(); it != conns_.end();) {
      if (all || (*it)->finished.load(std::memory_order_acquire)) {
        done.push_back(std::move(*it));
        it = conns_.erase(it);
      } else {
        ++it;
      }
    }
  }
  for (auto& c : done) {
    if (c->c2s.joinable()) c->c2s.join();  // c2s starts s2c, so join it first
    if (c->s2c.joinable()) c->s2c.join();
  }
}

void WanRelay::stop() {
  if (!started_ || stopped_) return;
  stopped_ = true;
  uint64_t one = 1;
  [[maybe_unused]] auto n = ::write(shared_->stop_fd, &one, sizeof one);
  if (acceptor_.joinable()) acceptor_.join();
  ::close(listen_fd_);
  listen_fd_ = -1;
  reap(true);
  log::info("wan", "relay on port {} stopped: {} connections, {} B client->server, {} B server->client", port_,
            shared_->accepted.load(), shared_->bytes_c2s.load(), shared_->bytes_s2c.load());
}

WanRelay::Stats WanRelay::stats() const {
  Stats s;
  if (!shared_) return s;
  s.accepted = shared_->accepted.load();
  s.refused = shared_->refused.load();
  s.active = shared_->active.load();
  s.cut = shared_->cut.load();
  s.bytes_c2s = shared_->bytes_c2s.load();
  s.bytes_s2c = shared_->bytes_s2c.load();
  s.peak_queued = shared_->peak_queued.load();
  return s;
}

}  // namespace meshtrain::wan
