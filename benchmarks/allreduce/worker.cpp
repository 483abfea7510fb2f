// allreduce-coordinator --bind tcp://HOST:0 --key PEM --allow FILE --min-peers N
//                       --heartbeat-timeout-ms MS --endpoint-file FILE
//   Binds, writes "ENDPOINT\nKEYHEX\n" to FILE (atomically), serves until killed.
//
// allreduce-worker --index I --key PEM --members FILE --coordinator-endpoint E --coordinator HEX
//                  --bytes B --warmup W --repeats R --streams S --chunk-bytes C
//                  --security plain|encrypted --host ADDR [--relay-delay-us D]
//                  [--op-timeout-ms MS] [--reduce-step] [--fault-phase P --fault-iteration K
//                  --fault-ring-step S --death-file FILE] [--codec SPEC --sparse-gather MODE
//                  [--shape ROWSxCOLS] [--exchange direct|ring]] [--device cuda [--pageable-staging]]
//   Without --reduce-step and --fault-phase: next_quorum(1) once, then W + R iterations of
//     barrier; fill(index + 1); barrier; t0; allreduce(Sum); t1; check
//   where the barrier is an all-reduce of 16 floats per member (it completes on a member only
//   after every member entered it), so each member's timer starts when all are ready, and no
//   member fills its buffer while another one is being timed.
//   With --reduce-step or --fault-phase: W + R iterations of reduce_step(step = iteration + 1)
//   (ReduceOp::Avg), timed from before its quorum request to its commit, no barrier (a training
//   loop's step as it sees it); with --fault-phase the worker that is the victim (has --death-file) writes
//   CLOCK_MONOTONIC nanoseconds to FILE and raises SIGKILL at ring step S of phase P of
//   iteration K.
//   With --device cuda the buffer is on CUDA device 0: filled on the host and copied there before
//   t0, copied back after t1 for the check; --pageable-staging: CommunicatorOptions::pinned_staging
//   = false.
//   With --codec: allreduce_compressed / reduce_step with that codec instead (and "wire_sent_bytes",
//   "wire_received_bytes": the payload bytes of the last iteration, "sparse_all_gather"). A top-k
//   codec gets gradient-like data instead of index + 1 (the compress benchmark's: normal, 1%
//   outliers, seeded by the index): on a constant buffer every key ties, top-k's worst case.
//   Prints one JSON line on stdout: {"index", "rank", "peers", "verified", "seconds": [...],
//   "start_ns": [...], "end_ns": [...], "attempts": [...], "members": [...]}, then waits for
//   EOF on stdin (the driver's "everyone reported") before exiting.
//
// tcp-ring-worker --index I --listen ADDR:PORT --next ADDR:PORT --bytes B --start-ns T
//   Listens, connects to the next worker (retrying for 20 s), and at CLOCK_MONOTONIC time T
//   starts sending B bytes while receiving B bytes from the previous one. Prints
//   {"index", "start_ns", "done_ns", "bytes"} where done_ns is when all B bytes were received.
//
// With --relay-delay-us D > 0 the bulk listener binds 127.0.0.1 and a WanRelay (benchmarks/wan)
// listens on ADDR in front of it, adding D of one-way delay; the worker advertises the relay's
// port (CommunicatorOptions::advertise_port), so every ring hop into this worker is delayed.
#include "worker.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <atomic>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <thread>

#include "benchmarks/compress/cases.h"
#include "json.h"
#include "kernels/compress/api.h"
#include "meshtrain/collective.h"
#include "meshtrain/compress.h"
#include "meshtrain/coord.h"
#include "relay.h"
#include <netdb.h>

namespace meshtrain::bench {

namespace {

using namespace std::chrono_literals;

std::map<std::string, std::string> flag_map(const std::vector<std::string>& args) {
  std::map<std::string, std::string> out;
  for (size_t i = 0; i < args.size(); ++i) {
    if (args[i].rfind("--", 0) != 0) throw InvalidArgumentError(fmt::format("unexpected argument '{}'", args[i]));
    if (i + 1 < args.size() && args[i + 1].rfind("--", 0) != 0) {
      out[args[i]] = args[i + 1];
      ++i;
    } else {
      out[args[i]] = "";
    }
  }
  return out;
}

const std::string& need(const std::map<std::string, std::string>& a, const std::string& key) {
  auto it = a.find(key);
  if (it == a.end()) throw InvalidArgumentError(fmt::format("missing flag {}", key));
  return it->second;
}

int64_t monotonic_ns() {
  timespec ts{};
  ::clock_gettime(CLOCK_MONOTONIC, &ts);
  return int64_t{ts.tv_sec} * 1000000000 + ts.tv_nsec;
}

CancelToken* g_stop = nullptr;
extern "C" void on_stop(int) {
  if (g_stop) g_stop->cancel();
}

// A free TCP port on host (bound and released; only this namespace's processes could race us).
uint16_t reserve_port(const std::string& host) {
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) throw_io_error("socket", errno);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = 0;
  if (::inet_pton(AF_INET, host.c_str(), &a.sin_addr) != 1) {
    ::close(fd);
    throw InvalidArgumentError(fmt::format("'{}' is not an IPv4 address", host));
  }
  if (::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0) {
    int e = errno;
    ::close(fd);
    throw_io_error(fmt::format("bind {}:0", host), e);
  }
  socklen_t len = sizeof a;
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
  ::close(fd);
  return ntohs(a.sin_port);
}

// The members file lists the workers' keys in worker-index order.
std::map<std::string, int> member_indices(const std::string& path) {
  std::map<std::string, int> out;
  std::ifstream in(path);
  std::string line;
  int i = 0;
  while (std::getline(in, line)) {
    if (line.empty() || line[0] == '#') continue;
    out[line] = i++;
  }
  return out;
}

std::atomic<int> g_iteration{-1};

}  // namespace

int run_coordinator_subcommand(const std::vector<std::string>& args) {
  auto a = flag_map(args);
  crypto::Identity self = crypto::Identity::load_pem(need(a, "--key"));
  coord::CoordinatorOptions o;
  o.bind_endpoint = need(a, "--bind");
  o.allowed = net::AllowList::load(need(a, "--allow"));
  o.min_peers = static_cast<uint32_t>(std::stoul(need(a, "--min-peers")));
  o.heartbeat_timeout = std::chrono::milliseconds(std::stol(need(a, "--heartbeat-timeout-ms")));
  coord::Coordinator coordinator(self, o);
  CancelToken stop;
  g_stop = &stop;
  struct sigaction sa {};
  sa.sa_handler = on_stop;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGINT, &sa, nullptr);
  sigaction(SIGTERM, &sa, nullptr);
  std::filesystem::path file = need(a, "--endpoint-file");
  std::filesystem::path tmp = file.string() + ".tmp";
  {
    std::ofstream out(tmp);
    out << coordinator.endpoint() << "\n" << self.public_key().hex() << "\n";
  }
  std::filesystem::rename(tmp, file);
  try {
    coordinator.run(stop);
  } catch (const CancelledError&) {
  }
  return 0;
}

int run_worker_subcommand(const std::vector<std::string>& args) {
  auto a = flag_map(args);
  const int index = std::stoi(need(a, "--index"));
  crypto::Identity self = crypto::Identity::load_pem(need(a, "--key"));
  const std::string members_path = need(a, "--members");
  collective::CommunicatorOptions o;
  o.coordinator_endpoint = need(a, "--coordinator-endpoint");
  o.coordinator = crypto::PeerId::from_hex(need(a, "--coordinator"));
  o.members = net::AllowList::load(members_path);
  o.streams = static_cast<uint32_t>(std::stoul(need(a, "--streams")));
  o.chunk_bytes = std::stoull(need(a, "--chunk-bytes"));
  const std::string security = need(a, "--security");
  o.bulk.security = security == "plain" ? net::BulkSecurity::Plain : net::BulkSecurity::Encrypted;
  o.pinned_staging = a.count("--pageable-staging") == 0;
  if (a.count("--op-timeout-ms")) o.op_timeout = std::chrono::milliseconds(std::stol(a.at("--op-timeout-ms")));
  const std::string host = need(a, "--host");
  o.bind_host = host;
  o.advertise_host = host;
  const uint64_t bytes = std::stoull(need(a, "--bytes"));
  const int warmup = std::stoi(need(a, "--warmup"));
  const int repeats = std::stoi(need(a, "--repeats"));
  const bool fault_mode = a.count("--fault-phase") != 0;
  const bool step_mode = fault_mode || a.count("--reduce-step") != 0;

  // A relay in front of our listener: peers connect to host:relay port, the relay (same
  // namespace) forwards to our listener on loopback after the delay.
  std::unique_ptr<wan::WanRelay> relay;
  const int64_t delay_us = a.count("--relay-delay-us") ? std::stoll(a.at("--relay-delay-us")) : 0;
  if (delay_us > 0) {
    uint16_t listener_port = reserve_port("127.0.0.1");
    wan::RelayOptions r;
    r.listen_host = host;
    r.listen_port = 0;
    r.target_host = "127.0.0.1";
    r.target_port = listener_port;
    r.delay = std::chrono::microseconds(delay_us);
    relay = std::make_unique<wan::WanRelay>(r);
    relay->start();
    o.bind_host = "127.0.0.1";
    o.bind_port = listener_port;
    o.advertise_port = relay->port();
    log::info("bench", "worker {}: relay {}:{} -> 127.0.0.1:{} with {} us one-way delay", index, host, relay->port(),
              listener_port, delay_us);
  }

  if (fault_mode) {
    const std::string phase = need(a, "--fault-phase");
    const int fault_iteration = std::stoi(need(a, "--fault-iteration"));
    const size_t ring_step = std::stoull(need(a, "--fault-ring-step"));
    if (a.count("--death-file")) {
      const std::string death_file = a.at("--death-file");
      o.fault_hook = [phase, fault_iteration, ring_step, death_file](std::string_view p, size_t k) {
        if (g_iteration.load() != fault_iteration || p != phase || k != ring_step) return;
        std::string ns = std::to_string(monotonic_ns()) + "\n";
        int fd = ::open(death_file.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
        if (fd >= 0) {
          ssize_t w = ::write(fd, ns.data(), ns.size());
          (void)w;
          ::close(fd);
        }
        ::raise(SIGKILL);
      };
    }
  }

  const std::map<std::string, int> indices = member_indices(members_path);
  std::unique_ptr<compress::Codec> codec;
  collective::CompressedOptions compressed;
  if (a.count("--codec")) codec = compress::make_codec(a.at("--codec"));
  if (a.count("--sparse-gather")) {
    const std::string& mode = a.at("--sparse-gather");
    compressed.sparse_gather = mode == "owner"       ? collective::SparseGather::Owner
                               : mode == "allgather" ? collective::SparseGather::AllGather
                                                     : collective::SparseGather::Auto;
  }
  if (a.count("--exchange"))
    compressed.exchange = a.at("--exchange") == "ring" ? collective::Exchange::Ring : collective::Exchange::Direct;
  if (a.count("--shape")) {
    const std::string& shape = a.at("--shape");
    compressed.shape = {std::stoull(shape.substr(0, shape.find('x'))), std::stoull(shape.substr(shape.find('x') + 1))};
  }
  collective::CompressedState compressed_state(compressed);
  const bool sparse = codec && codec->id() == compress::CodecId::TopK;
  collective::Communicator comm(self, o);
  const size_t count = bytes / sizeof(float);
  std::vector<float> buffer(count);
  // --device cuda: the collective's buffer is `device_buffer`; `buffer` is its host image.
  std::optional<cuda::compress::DeviceBuffer> device_buffer;
  if (a.count("--device") && a.at("--device") == "cuda") device_buffer.emplace(count * sizeof(float), 0);
  BufferView view{buffer.data(), buffer.size(), DType::Float32};
  if (device_buffer) view = BufferView{device_buffer->data(), count, DType::Float32, DeviceKind::Cuda, 0};
  auto to_device = [&] {
    if (!device_buffer) return;
    cuda::compress::copy_async(device_buffer->data(), buffer.data(), count * sizeof(float), 0, nullptr);
    cuda::compress::synchronize(0, nullptr);
  };
  auto to_host = [&] {
    if (!device_buffer) return;
    cuda::compress::copy_async(buffer.data(), device_buffer->data(), count * sizeof(float), 0, nullptr);
    cuda::compress::synchronize(0, nullptr);
  };
  std::vector<double> seconds;
  std::vector<int64_t> start_ns, end_ns, attempts, members;
  bool verified = true;
  std::string verify_note;
  uint32_t rank = 0;
  size_t quorum_size = 0;
  const float mine = static_cast<float>(index + 1);
  // Top-k: gradient-like values (see the header comment), made once, copied in each iteration.
  const std::vector<float> pattern = sparse ? compress::bench::gradient(count, index + 1) : std::vector<float>{};
  auto fill = [&] {
    if (sparse) std::copy(pattern.begin(), pattern.end(), buffer.begin());
    else std::fill(buffer.begin(), buffer.end(), mine);
  };
  auto check = [&](float expected, int iteration) {
    if (sparse) {
      // Top-k sends a few entries (plus earlier residuals): check the result is sparse and
      // finite, not its values.
      size_t nonzero = 0;
      for (float x : buffer) {
        if (x == 0.0f) continue;
        ++nonzero;
        if (!std::isfinite(x)) {
          if (verified) verify_note = fmt::format("iteration {}: top-k result holds {}", iteration, x);
          verified = false;
          return;
        }
      }
      if (nonzero == 0 || nonzero > count / 2) {
        if (verified) verify_note = fmt::format("iteration {}: top-k result has {} of {} entries set", iteration,
                                                nonzero, count);
        verified = false;
      }
      return;
    }
    // Lossy dense codecs: small integers are exact in fp16/bf16; int8 rounds within 1%.
    const float tolerance = codec && codec->id() != compress::CodecId::None ? 1e-2f : 1e-5f;
    for (size_t i : {size_t{0}, count / 2, count - 1}) {
      float got = buffer[i];
      if (std::fabs(got - expected) > tolerance * std::fabs(expected)) {
        if (verified)
          verify_note = fmt::format("iteration {}: element {} is {} where {} was expected", iteration, i, got, expected);
        verified = false;
      }
    }
  };

  if (!step_mode) {
    const coord::Quorum& q = comm.next_quorum(1);
    rank = comm.rank();
    quorum_size = q.members.size();
    float expected = 0;
    for (const auto& m : q.members) {
      auto it = indices.find(m.id.hex());
      expected += it == indices.end() ? 0.0f : static_cast<float>(it->second + 1);
    }
    std::vector<float> barrier(16 * quorum_size, 0.0f);
    BufferView barrier_view{barrier.data(), barrier.size(), DType::Float32};
    for (int it = 0; it < warmup + repeats; ++it) {
      // Barrier, fill, barrier: a member that finished the last iteration early must not fill
      // 'bytes' of memory while the others are still being timed (2 cores here).
      comm.allreduce(barrier_view, collective::ReduceOp::Sum);
      fill();
      to_device();
      comm.allreduce(barrier_view, collective::ReduceOp::Sum);
      int64_t t0 = monotonic_ns();
      if (codec) {
        comm.allreduce_compressed(view, *codec, compressed_state, collective::ReduceOp::Sum);
      } else {
        comm.allreduce(view, collective::ReduceOp::Sum);
      }
      int64_t t1 = monotonic_ns();
      seconds.push_back((t1 - t0) / 1e9);
      start_ns.push_back(t0);
      end_ns.push_back(t1);
      attempts.push_back(1);
      members.push_back(static_cast<int64_t>(quorum_size));
      to_host();
      check(expected, it);
    }
  } else {
    for (int it = 0; it < warmup + repeats; ++it) {
      fill();
      to_device();
      g_iteration.store(it);
      int64_t t0 = monotonic_ns();
      collective::StepResult r = codec ? comm.reduce_step(static_cast<uint64_t>(it + 1), view, *codec, compressed_state)
                                       : comm.reduce_step(static_cast<uint64_t>(it + 1), view);
      int64_t t1 = monotonic_ns();
      rank = comm.rank();
      quorum_size = r.quorum.members.size();
      seconds.push_back((t1 - t0) / 1e9);
      start_ns.push_back(t0);
      end_ns.push_back(t1);
      attempts.push_back(r.attempts);
      members.push_back(static_cast<int64_t>(r.quorum.members.size()));
      to_host();
      double sum = 0;
      for (const auto& c : r.contributors) {
        auto f = indices.find(c.hex());
        sum += f == indices.end() ? 0.0 : f->second + 1;
      }
      check(static_cast<float>(sum / std::max<size_t>(r.contributors.size(), 1)), it);
    }
  }

  JsonLine line;
  line.add("index", index).add("rank", rank).add("peers", static_cast<uint64_t>(quorum_size)).add("verified", verified);
  if (!verified) line.add("verify_note", verify_note);
  line.add("seconds", seconds).add("start_ns", start_ns).add("end_ns", end_ns).add("attempts", attempts).add("members",
                                                                                                             members);
  if (codec)
    line.add("wire_sent_bytes", compressed_state.traffic().sent_bytes)
        .add("wire_received_bytes", compressed_state.traffic().received_bytes)
        .add("sparse_all_gather", compressed_state.traffic().sparse_all_gather);
  std::printf("%s\n", line.str().c_str());
  std::fflush(stdout);
  // Stay in the job until the driver has every worker's result (it closes our stdin): a worker
  // that left or exited while a neighbour still finished the last all-reduce would make the
  // coordinator abort that neighbour's attempt. Then exit without Leave: the job is over and
  // the driver stops the coordinator (a Leave would only make it log an abort of the last,
  // never-committed attempt).
  for (auto until = Clock::now() + 600s; Clock::now() < until;) {
    pollfd p{STDIN_FILENO, POLLIN, 0};
    if (::poll(&p, 1, 1000) > 0) {
      char c;
      ssize_t r = ::read(STDIN_FILENO, &c, 1);
      if (r == 0 || (r < 0 && errno != EINTR && errno != EAGAIN)) break;
    }
  }
  return 0;
}

}  // namespace meshtrain::bench

namespace meshtrain::bench {

namespace {

sockaddr_in ipv4(const std::string& host_port) {
  auto [host, port] = wan::parse_host_port(host_port);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(port);
  if (::inet_pton(AF_INET, host.c_str(), &a.sin_addr) != 1)
    throw InvalidArgumentError(fmt::format("'{}' is not an IPv4 address", host));
  return a;
}

struct Fd {
  int fd = -1;
  explicit Fd(int f) : fd(f) {}
  ~Fd() {
    if (fd >= 0) ::close(fd);
  }
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
};

}  // namespace

int run_tcp_ring_subcommand(const std::vector<std::string>& args) {
  auto a = flag_map(args);
  const int index = std::stoi(need(a, "--index"));
  const uint64_t bytes = std::stoull(need(a, "--bytes"));
  const int64_t start_ns = std::stoll(need(a, "--start-ns"));
  sockaddr_in listen_addr = ipv4(need(a, "--listen"));
  sockaddr_in next_addr = ipv4(need(a, "--next"));

  Fd listener(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  int one = 1;
  ::setsockopt(listener.fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  if (::bind(listener.fd, reinterpret_cast<sockaddr*>(&listen_addr), sizeof listen_addr) != 0)
    throw_io_error("bind " + a.at("--listen"), errno);
  if (::listen(listener.fd, 4) != 0) throw_io_error("listen", errno);

  std::exception_ptr rx_error;
  int64_t rx_done = 0;
  std::thread rx([&] {
    try {
      pollfd p{listener.fd, POLLIN, 0};
      if (::poll(&p, 1, 30000) <= 0) throw TimeoutError("no connection from the previous worker within 30 s");
      Fd c(::accept4(listener.fd, nullptr, nullptr, SOCK_CLOEXEC));
      if (c.fd < 0) throw_io_error("accept", errno);
      std::vector<char> buf(1 << 20);
      uint64_t got = 0;
      while (got < bytes) {
        ssize_t n = ::recv(c.fd, buf.data(), buf.size(), 0);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) throw PeerLostError("previous", fmt::format("connection closed after {} of {} bytes", got, bytes));
        got += static_cast<uint64_t>(n);
      }
      rx_done = monotonic_ns();
    } catch (...) {
      rx_error = std::current_exception();
    }
  });

  Fd out(-1);
  for (auto until = Clock::now() + 20s;;) {
    out.fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (::connect(out.fd, reinterpret_cast<sockaddr*>(&next_addr), sizeof next_addr) == 0) break;
    int e = errno;
    ::close(out.fd);
    out.fd = -1;
    if (Clock::now() >= until) {
      rx.detach();
      throw_io_error("connect " + a.at("--next"), e);
    }
    std::this_thread::sleep_for(10ms);
  }
  while (monotonic_ns() < start_ns) std::this_thread::sleep_for(std::chrono::microseconds(200));
  const int64_t t0 = monotonic_ns();
  std::vector<char> buf(1 << 20, 0);
  uint64_t sent = 0;
  while (sent < bytes) {
    size_t chunk = static_cast<size_t>(std::min<uint64_t>(buf.size(), bytes - sent));
    ssize_t n = ::send(out.fd, buf.data(), chunk, MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      rx.detach();
      throw_io_error("send to " + a.at("--next"), errno);
    }
    sent += static_cast<uint64_t>(n);
  }
  ::shutdown(out.fd, SHUT_WR);
  rx.join();
  if (rx_error) std::rethrow_exception(rx_error);
  JsonLine line;
  line.add("index", index).add("start_ns", t0).add("done_ns", rx_done).add("bytes", bytes);
  std::printf("%s\n", line.str().c_str());
  std::fflush(stdout);
  return 0;
}

}  // namespace meshtrain::bench
