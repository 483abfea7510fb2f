// Point-to-point throughput over loopback: a raw TCP socket (the baseline) next to meshtrain's
// bulk path, plain and encrypted, with 1 and 4 streams, in one run.
//
//   build/benchmarks/net/p2p_bench --benchmark_format=json --benchmark_repetitions=5 \
//       --benchmark_report_aggregates_only=true > p2p.json
//   python3 benchmarks/net/p2p_report.py p2p.json     # medians and ratios vs raw TCP
//
// Each iteration sends one message of the given size and waits for a 1-byte acknowledgement,
// so the time covers delivery into the receiver's buffer (and decryption), not just queueing.
#include <arpa/inet.h>
#include <benchmark/benchmark.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <unistd.h>

#include <zmq.h>

#include <future>
#include <thread>

#include "meshtrain/net.h"

using namespace meshtrain;
using namespace meshtrain::net;
using namespace std::chrono_literals;

namespace {

constexpr int kSocketBuffer = 4 << 20;

void read_exact(int fd, uint8_t* p, size_t n) {
  while (n > 0) {
    ssize_t r = ::recv(fd, p, n, 0);
    if (r <= 0) throw std::runtime_error("raw recv failed");
    p += r;
    n -= r;
  }
}
void write_exact(int fd, const uint8_t* p, size_t n) {
  while (n > 0) {
    ssize_t r = ::send(fd, p, n, MSG_NOSIGNAL);
    if (r <= 0) throw std::runtime_error("raw send failed");
    p += r;
    n -= r;
  }
}

int tuned_socket() {
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  int one = 1, buf = kSocketBuffer;
  ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  ::setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &buf, sizeof buf);
  ::setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &buf, sizeof buf);
  return fd;
}

// Baseline: blocking TCP sockets, payload written and read with plain send/recv loops.
void BM_RawTcp(benchmark::State& state) {
  const size_t bytes = state.range(0);
  int listener = tuned_socket();
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ::bind(listener, reinterpret_cast<sockaddr*>(&addr), sizeof addr);
  ::listen(listener, 1);
  socklen_t len = sizeof addr;
  ::getsockname(listener, reinterpret_cast<sockaddr*>(&addr), &len);
  int client = tuned_socket();
  ::connect(client, reinterpret_cast<sockaddr*>(&addr), sizeof addr);
  int server = ::accept(listener, nullptr, nullptr);

  std::atomic<bool> done{false};
  std::thread receiver([&] {
    std::vector<uint8_t> in(bytes);
    uint8_t ack = 1;
    for (;;) {
      uint64_t n = 0;
      read_exact(server, reinterpret_cast<uint8_t*>(&n), 8);
      if (n == UINT64_MAX) break;
      read_exact(server, in.data(), n);
      write_exact(server, &ack, 1);
    }
  });
  std::vector<uint8_t> out(bytes, 0x5a);
  for (auto _ : state) {
    uint64_t n = bytes;
    write_exact(client, reinterpret_cast<uint8_t*>(&n), 8);
    write_exact(client, out.data(), bytes);
    uint8_t ack;
    read_exact(client, &ack, 1);
  }
  uint64_t stop = UINT64_MAX;
  write_exact(client, reinterpret_cast<uint8_t*>(&stop), 8);
  receiver.join();
  ::close(client);
  ::close(server);
  ::close(listener);
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations()) * bytes);
  state.counters["streams"] = 1;
}

void BM_Bulk(benchmark::State& state, BulkSecurity security) {
  const size_t bytes = state.range(0);
  const uint32_t streams = static_cast<uint32_t>(state.range(1));
  auto sender_id = crypto::Identity::generate();
  auto receiver_id = crypto::Identity::generate();
  BulkOptions options;
  options.security = security;
  options.socket_buffer_bytes = kSocketBuffer;
  BulkListener listener(receiver_id, {sender_id.public_key()}, "127.0.0.1", 0, options);
  auto connecting = std::async(std::launch::async, [&] {
    return BulkChannel::connect(sender_id, receiver_id.public_key(), "127.0.0.1", listener.port(), streams, options,
                                Deadline::after(10s));
  });
  BulkChannel server = BulkChannel::accept(listener, sender_id.public_key(), streams, Deadline::after(10s));
  BulkChannel client = connecting.get();

  std::thread receiver([&] {
    std::vector<uint8_t> in(bytes);
    MessageHeader ack;
    for (;;) {
      MessageHeader h = server.recv_into(in, Deadline::after(60s));
      if (h.tag == 1) break;
      server.send(ack, {}, Deadline::after(60s));
    }
  });
  std::vector<uint8_t> out(bytes, 0x5a);
  MessageHeader h;
  for (auto _ : state) {
    client.send(h, out, Deadline::after(60s));
    client.recv(Deadline::after(60s));
  }
  MessageHeader stop;
  stop.tag = 1;
  client.send(stop, out, Deadline::after(60s));
  receiver.join();
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations()) * bytes);
  state.counters["streams"] = streams;
}

// ZeroMQ over TCP (what the control path uses), for the record of why tensors do not take it:
// PAIR sockets, 8 MiB socket buffers, zero-copy send, optionally CURVE-encrypted.
void BM_Zmq(benchmark::State& state, bool curve) {
  const size_t bytes = state.range(0);
  void* ctx = zmq_ctx_new();
  void* server = zmq_socket(ctx, ZMQ_PAIR);
  void* client = zmq_socket(ctx, ZMQ_PAIR);
  int buf = 8 << 20, zero = 0;
  for (void* s : {server, client}) {
    zmq_setsockopt(s, ZMQ_SNDBUF, &buf, sizeof buf);
    zmq_setsockopt(s, ZMQ_RCVBUF, &buf, sizeof buf);
    zmq_setsockopt(s, ZMQ_LINGER, &zero, sizeof zero);
  }
  if (curve) {
    auto server_id = crypto::Identity::generate();
    auto client_id = crypto::Identity::generate();
    int one = 1;
    auto server_secret = server_id.curve_secret();
    auto server_public = crypto::ed25519_to_x25519_public(server_id.public_key());
    auto client_secret = client_id.curve_secret();
    auto client_public = crypto::x25519_public_from_secret(client_secret);
    zmq_setsockopt(server, ZMQ_CURVE_SERVER, &one, sizeof one);
    zmq_setsockopt(server, ZMQ_CURVE_SECRETKEY, server_secret.data(), 32);
    zmq_setsockopt(client, ZMQ_CURVE_SERVERKEY, server_public.data(), 32);
    zmq_setsockopt(client, ZMQ_CURVE_PUBLICKEY, client_public.data(), 32);
    zmq_setsockopt(client, ZMQ_CURVE_SECRETKEY, client_secret.data(), 32);
  }
  zmq_bind(server, "tcp://127.0.0.1:*");
  char endpoint[256];
  size_t endpoint_size = sizeof endpoint;
  zmq_getsockopt(server, ZMQ_LAST_ENDPOINT, endpoint, &endpoint_size);
  zmq_connect(client, endpoint);

  std::thread receiver([&] {
    for (;;) {
      zmq_msg_t msg;
      zmq_msg_init(&msg);
      zmq_msg_recv(&msg, server, 0);
      size_t n = zmq_msg_size(&msg);
      zmq_msg_close(&msg);
      if (n == 1) break;
      zmq_send(server, "a", 0, 0);
    }
  });
  std::vector<uint8_t> out(bytes, 0x5a);
  for (auto _ : state) {
    zmq_msg_t msg;
    // Zero-copy send: ZeroMQ references `out` instead of copying it.
    zmq_msg_init_data(&msg, out.data(), out.size(), nullptr, nullptr);
    zmq_msg_send(&msg, client, 0);
    zmq_msg_t ack;
    zmq_msg_init(&ack);
    zmq_msg_recv(&ack, client, 0);
    zmq_msg_close(&ack);
  }
  zmq_send(client, "x", 1, 0);
  receiver.join();
  zmq_close(client);
  zmq_close(server);
  zmq_ctx_term(ctx);
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations()) * bytes);
  state.counters["streams"] = 1;
}

void BM_ZmqPlain(benchmark::State& state) { BM_Zmq(state, false); }
void BM_ZmqCurve(benchmark::State& state) { BM_Zmq(state, true); }
void BM_BulkPlain(benchmark::State& state) { BM_Bulk(state, BulkSecurity::Plain); }
void BM_BulkEncrypted(benchmark::State& state) { BM_Bulk(state, BulkSecurity::Encrypted); }

void sizes(benchmark::internal::Benchmark* b, bool with_streams) {
  for (int64_t size : {int64_t(4) << 10, int64_t(1) << 20, int64_t(64) << 20})
    for (int64_t streams : {1, 4}) {
      if (!with_streams && streams != 1) continue;
      b->Args({size, streams});
    }
  b->UseRealTime()->Unit(benchmark::kMillisecond)->MinTime(0.5);
}

}  // namespace

BENCHMARK(BM_RawTcp)->Apply([](auto* b) { sizes(b, false); });
BENCHMARK(BM_ZmqPlain)->Apply([](auto* b) { sizes(b, false); });
BENCHMARK(BM_ZmqCurve)->Apply([](auto* b) { sizes(b, false); });
BENCHMARK(BM_BulkPlain)->Apply([](auto* b) { sizes(b, true); });
BENCHMARK(BM_BulkEncrypted)->Apply([](auto* b) { sizes(b, true); });
BENCHMARK_MAIN();
