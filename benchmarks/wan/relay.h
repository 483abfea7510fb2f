// WanRelay: a delaying TCP relay that emulates a WAN link between a client and a server.
//
// This host's kernel has tc/tbf but not netem, so latency for meshtrain's tests and benchmarks
// comes from this relay: it accepts TCP connections, connects each one to a fixed target, and
// forwards bytes in both directions with an added one-way delay (plus optional jitter, a rate
// cap and a simulated link drop).
//
// Per connection there are two threads, one per direction. Each reads from its source into
// timestamped chunks, queues them, and writes each chunk to its destination no earlier than
//   due = max(previous due, arrival + delay + uniform(0..jitter))
// so jitter never reorders bytes. A FIN from the source is delayed the same way and propagated
// as shutdown(SHUT_WR) after the last queued byte (half-close). Reads pause while a direction's
// queue holds max_queued_bytes or more, so a slow reader back-pressures the writer instead of
// growing memory.
//
// Caveat: the relay terminates TCP on each side, so the sender's TCP sees the local RTT, not
// the emulated one. The emulated link's "window" is the relay's queue: a direction carries at
// most max_queued_bytes / delay bytes per second. Keep max_queued_bytes >= rate * delay if you
// want the rate cap, not the queue, to be the limit; lower it to emulate a window-bound link.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <list>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>

namespace meshtrain::wan {

struct RelayOptions {
  std::string listen_host = "127.0.0.1";
  uint16_t listen_port = 0;  // 0: the kernel picks a free port; read it back with port()
  std::string target_host = "127.0.0.1";
  uint16_t target_port = 0;
  std::chrono::microseconds delay{0};   // one-way latency added in each direction
  std::chrono::microseconds jitter{0};  // extra uniform 0..jitter per chunk (never reorders)
  double rate_mbps = 0;                 // pacing cap per direction in Mbit/s; 0 = none
  // After this many client->server bytes have been forwarded on one connection, both sides of
  // that connection are closed abruptly (RST via SO_LINGER 0), like a link drop. 0 cuts as soon
  // as the connection is set up. nullopt: never.
  std::optional<uint64_t> cut_after_bytes;
  size_t max_connections = 0;                 // concurrent connections; 0 = unlimited
  size_t max_queued_bytes = size_t{64} << 20;  // per direction, per connection
  std::chrono::milliseconds connect_timeout{10000};
  uint64_t seed = 0;  // jitter RNG seed; 0: random
};

// "HOST:PORT" or "[V6HOST]:PORT" -> {host, port}; throws InvalidArgumentError.
std::pair<std::string, uint16_t> parse_host_port(const std::string& text);

class WanRelay {
 public:
  struct Stats {
    uint64_t accepted = 0;  // connections accepted (including refused ones)
    uint64_t refused = 0;   // refused by max_connections or a failed connect to the target
    uint64_t active = 0;    // connections being relayed now
    uint64_t cut = 0;       // connections closed by cut_after_bytes
    uint64_t bytes_c2s = 0;  // forwarded client -> server, all connections
    uint64_t bytes_s2c = 0;  // forwarded server -> client, all connections
    uint64_t peak_queued = 0;  // most bytes ever queued in one direction of one connection
  };

  explicit WanRelay(RelayOptions options);
  ~WanRelay();  // stop()
  WanRelay(const WanRelay&) = delete;
  WanRelay& operator=(const WanRelay&) = delete;

  // Resolves the target, binds and listens, and starts the accept thread. Throws IoError or
  // InvalidArgumentError. Call once.
  void start();
  // The port actually listened on (after start()).
  uint16_t port() const { return port_; }
  // Stops accepting, resets every open connection, joins all threads. Idempotent.
  void stop();

  Stats stats() const;
  const RelayOptions& options() const { return opts_; }

  struct Shared;      // counters and the stop signal, shared with connection threads
  struct Connection;  // one relayed connection (internal)

 private:
  void accept_loop();
  void reap(bool all);

  RelayOptions opts_;
  std::shared_ptr<Shared> shared_;
  int listen_fd_ = -1;
  uint16_t port_ = 0;
  std::thread acceptor_;
  std::mutex conns_mu_;
  std::list<std::unique_ptr<Connection>> conns_;
  uint64_t next_id_ = 1;
  bool started_ = false;
  bool stopped_ = false;
};

}  // namespace meshtrain::wan
