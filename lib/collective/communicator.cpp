#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <future>
#include <map>
#include <mutex>
#include <set>
#include <thread>

#include "collective/device.h"
#include "collective/exchange.h"
#include "collective/half.h"
#include "collective/ring.h"
#include "collective/step_attempt.h"
#include "meshtrain/collective.h"

namespace meshtrain::collective {

using namespace std::chrono_literals;

namespace {

// How often a member repeats a request while it waits for the coordinator's answer.
constexpr auto kRepeatInterval = 1000ms;


}  // namespace

// The control link: a thread that owns the ControlClient, heartbeats, sends queued messages
// and files what the coordinator says (quorums, rejoins, aborts, commits).
struct ControlLink {
  struct Outgoing {
    net::MessageHeader header;
    std::vector<uint8_t> payload;
  };

  ControlLink(const crypto::Identity& self, const CommunicatorOptions& o) : self_(self) {
    net::ControlOptions control;
    control.heartbeat_interval = o.heartbeat_interval;
    client_ = std::make_unique<net::ControlClient>(self, o.coordinator, o.coordinator_endpoint, control);
    thread_ = std::thread([this] { loop(); });
  }
  ~ControlLink() {
    stopping_ = true;
    wake();
    thread_.join();
  }

  void send(coord::MessageKind kind, std::vector<uint8_t> payload, uint64_t quorum_id = 0, uint64_t step = 0) {
    Outgoing m;
    m.header.type = static_cast<uint16_t>(kind);
    m.header.quorum_id = quorum_id;
    m.header.step = step;
    m.payload = std::move(payload);
    {
      std::lock_guard lock(mutex_);
      outbox_.push_back(std::move(m));
    }
    wake();
  }

  // Wait for a quorum (with step == step and id != exclude_id) or a rejoin for `step`.
  // Returns false on deadline.
  bool wait_quorum(uint64_t step, uint64_t exclude_id, Deadline deadline, std::optional<coord::Quorum>& quorum,
                   std::optional<coord::Rejoin>& rejoin, std::optional<coord::Refusal>& refusal) {
    std::unique_lock lock(mutex_);
    return cv_.wait_until(lock, deadline.at(), [&] {
      if (refusal_) {
        refusal.swap(refusal_);
        return true;
      }
      for (auto it = quorums_.begin(); it != quorums_.end(); ++it)
        if (it->step == step && it->quorum_id != exclude_id) {
          quorum = *it;
          quorums_.erase(quorums_.begin(), std::next(it));
          return true;
        }
      for (auto& r : rejoins_)
        if (r.missed_step == step) {
          rejoin = r;
          rejoins_.clear();
          return true;
        }
      return false;
    });
  }

  // Abort for quorum_id, if one arrived.
  std::optional<coord::Abort> abort_for(uint64_t quorum_id) {
    std::lock_guard lock(mutex_);
    auto it = aborts_.find(quorum_id);
    if (it == aborts_.end()) return std::nullopt;
    return it->second;
  }
  std::optional<coord::Abort> wait_abort(uint64_t quorum_id, Deadline deadline) {
    std::unique_lock lock(mutex_);
    cv_.wait_until(lock, deadline.at(), [&] { return aborts_.count(quorum_id) != 0; });
    auto it = aborts_.find(quorum_id);
    if (it == aborts_.end()) return std::nullopt;
    return it->second;
  }
  // Waits for Commit or Abort of quorum_id. Returns false at the deadline; else true with
  // `abort` set if the attempt was aborted.
  bool wait_outcome(uint64_t quorum_id, Deadline deadline, std::optional<coord::Abort>& abort) {
    std::unique_lock lock(mutex_);
    bool done = cv_.wait_until(lock, deadline.at(),
                               [&] { return commits_.count(quorum_id) != 0 || aborts_.count(quorum_id) != 0; });
    if (!done) return false;
    auto it = aborts_.find(quorum_id);
    if (it != aborts_.end()) abort = it->second;
    return true;
  }

  // The cancel token of the operation running on `quorum_id`: an Abort for it fires the token.
  void watch(uint64_t quorum_id, CancelToken* token) {
    std::lock_guard lock(mutex_);
    watched_id_ = quorum_id;
    watched_ = token;
    if (token && aborts_.count(quorum_id)) token->cancel();
  }

 private:
  // Interrupts the link thread's wait, so a queued message leaves at once.
  void wake() {
    std::lock_guard lock(wake_mutex_);
    if (wake_) wake_->cancel();
  }

  void loop() {
    while (!stopping_) {
      std::deque<Outgoing> out;
      {
        std::lock_guard lock(mutex_);
        out.swap(outbox_);
      }
      for (auto& m : out) {
        try {
          client_->send(m.header, m.payload);
        } catch (const Error& e) {
          log::warn("collective", "control message to the coordinator not sent: {}", e.what());
        }
      }
      CancelToken woken;  // a fresh token per wait: cancelling one is permanent
      {
        std::lock_guard lock(wake_mutex_);
        wake_ = &woken;
      }
      bool idle;
      {
        std::lock_guard lock(mutex_);
        idle = outbox_.empty();
      }
      try {
        if (idle && !stopping_) handle(client_->recv(Deadline::after(200ms), &woken));
      } catch (const TimeoutError&) {
      } catch (const CancelledError&) {
      } catch (const Error& e) {
        log::warn("collective", "control link: {}", e.what());
      }
      std::lock_guard lock(wake_mutex_);
      wake_ = nullptr;
    }
  }

  void handle(const net::Message& m) {
    std::string source = fmt::format("coordinator {}", m.header.sender.fingerprint());
    try {
      std::lock_guard lock(mutex_);
      switch (static_cast<coord::MessageKind>(m.header.type)) {
        case coord::MessageKind::Quorum:
          quorums_.push_back(coord::decode_quorum(m.payload, source));
          break;
        case coord::MessageKind::Rejoin:
          rejoins_.push_back(coord::decode_rejoin(m.payload, source));
          break;
        case coord::MessageKind::Refused:
          refusal_ = coord::decode_refusal(m.payload, source);
          break;
        case coord::MessageKind::Abort: {
          coord::Abort a = coord::decode_abort(m.payload, source);
          log::info("collective", "coordinator aborted quorum {:x} (step {}): {}; lost: {}", a.quorum_id, a.step,
                    a.reason, coord::describe_peers(a.lost));
          aborts_[a.quorum_id] = a;
          if (watched_ && watched_id_ == a.quorum_id) watched_->cancel();
          forget_old_outcomes();
          break;
        }
        case coord::MessageKind::Commit:
          commits_.insert(m.header.quorum_id);
          forget_old_outcomes();
          break;
        default:
          log::warn("collective", "{} sent an unexpected message type {}", source, m.header.type);
          return;
      }
    } catch (const ProtocolError& e) {
      log::warn("collective", "dropped a message from the coordinator: {}", e.what());
      return;
    }
    cv_.notify_all();
  }

  // Outcomes are only asked for the quorum a member is in (the newest): keep the last few
  // hundred (quorum ids grow with time), not one per step of the whole run. Caller holds mutex_.
  void forget_old_outcomes() {
    constexpr size_t kKeptOutcomes = 256;
    while (aborts_.size() > kKeptOutcomes) aborts_.erase(aborts_.begin());
    while (commits_.size() > kKeptOutcomes) commits_.erase(commits_.begin());
  }

  const crypto::Identity& self_;
  std::unique_ptr<net::ControlClient> client_;
  std::atomic<bool> stopping_{false};
  std::mutex wake_mutex_;
  CancelToken* wake_ = nullptr;  // the link thread's current wait, if any
  std::thread thread_;
  std::mutex mutex_;
  std::condition_variable cv_;
  std::deque<Outgoing> outbox_;
  std::deque<coord::Quorum> quorums_;
  std::vector<coord::Rejoin> rejoins_;
  std::optional<coord::Refusal> refusal_;
  std::map<uint64_t, coord::Abort> aborts_;
  std::set<uint64_t> commits_;
  uint64_t watched_id_ = 0;
  CancelToken* watched_ = nullptr;
};

struct Communicator::Impl {
  const crypto::Identity& self;
  CommunicatorOptions options;
  device::SnapshotSpace step_inputs;  // run_step's copy of the gradients, kept between steps
  // Kept between operations too: a CUDA buffer's host copy (pinned) for the plain collectives,
  // and an fp16/bf16 buffer widened to fp32 for the ring's reduction.
  ReusedBytes staging;
  ReusedBytes widened;
  HostMemory staging_memory(const BufferView& buffer) const {
    return device::host_memory_for(buffer, options.pinned_staging);
  }
  std::unique_ptr<net::BulkListener> listener;
  std::unique_ptr<ControlLink> link;
  std::optional<coord::Quorum> current;
  uint32_t my_rank = 0;
  uint64_t op_seq = 0;
  // Ring channels, kept while the neighbours stay the same and nothing failed.
  std::optional<net::BulkChannel> to_next;
  std::optional<net::BulkChannel> from_prev;
  // The direct exchange's channels to the members that are not ring neighbours, by rank (the
  // ring channels serve the neighbours), for the member list `mesh_for` (ids in rank order):
  // opened by the first operation that needs them, dropped when the members change.
  std::vector<std::optional<net::BulkChannel>> mesh;
  std::vector<PeerId> mesh_for;
  // Streams that members opened before this member expected them (see LinkSetup::early), for
  // the member set early_for.
  std::vector<net::BulkStream> early_streams;
  std::vector<PeerId> early_for;
  bool checking_gradients = false;  // inside reduce_step: refuse non-finite partial sums
  uint64_t failed_quorum = 0;  // the last attempt that failed here (reported to the coordinator)
  std::vector<PeerId> failed_lost;
  std::optional<std::pair<uint64_t, crypto::Digest>> state_digest;  // step, digest

  Impl(const crypto::Identity& s, CommunicatorOptions o) : self(s), options(std::move(o)) {
    if (options.advertise_host.empty()) options.advertise_host = options.bind_host;
    if (options.streams == 0 || options.streams > 64)
      throw InvalidArgumentError(fmt::format("CommunicatorOptions.streams = {} (1..64)", options.streams));
    if (options.chunk_bytes < 4096)
      throw InvalidArgumentError(fmt::format("CommunicatorOptions.chunk_bytes = {} (at least 4096)", options.chunk_bytes));
    listener = std::make_unique<net::BulkListener>(self, options.members, options.bind_host, options.bind_port,
                                                   options.bulk);
    link = std::make_unique<ControlLink>(self, options);
  }

  const coord::Quorum& quorum_or_throw() const {
    if (!current) throw InvalidArgumentError("no current quorum: call next_quorum(step) first");
    return *current;
  }

  void drop_channels() {
    to_next.reset();
    from_prev.reset();
    drop_mesh();
    early_streams.clear();
  }
  void drop_mesh() {
    mesh.clear();
    mesh_for.clear();
  }

  // Connects to the next rank and accepts from the previous one, concurrently (every member
  // does both, so doing them in turn would deadlock the ring). with_mesh: also the mesh
  // channels (the lower rank of each pair connects), in the same accept loop, so that no
  // member's mesh stream arrives while another waits only for its ring neighbour.
  void ensure_ring(Deadline deadline, const CancelToken* cancel, bool with_mesh = false) {
    const auto& q = *current;
    size_t n = q.members.size();
    if (n < 2) return;
    const size_t next_rank = (my_rank + 1) % n, prev_rank = (my_rank + n - 1) % n;
    const coord::Member& next = q.members[next_rank];
    const coord::Member& prev = q.members[prev_rank];
    std::vector<LinkRequest> requests;
    if (!(to_next && to_next->peer() == next.id)) requests.push_back({&next, true, &to_next, "ring neighbour"});
    if (!(from_prev && from_prev->peer() == prev.id)) requests.push_back({&prev, false, &from_prev, "ring neighbour"});
    std::vector<PeerId> ids;
    for (const auto& m : q.members) ids.push_back(m.id);
    if (early_for != ids) {
      early_streams.clear();
      early_for = ids;
    }
    if (with_mesh) {
      if (mesh_for != ids) {
        mesh.clear();
        mesh.resize(n);
        mesh_for = ids;
        log::info("collective", "quorum {:x} (step {}): opening the direct exchange's mesh ({} members)", q.quorum_id,
                  q.step, n);
        for (size_t c = 0; c < n; ++c)
          if (c != my_rank && c != next_rank && c != prev_rank)
            requests.push_back({&q.members[c], my_rank < c, &mesh[c], "mesh peer"});
      }
    }
    open_links(LinkSetup{self, *listener, options.streams, options.bulk, options.connect_timeout, &early_streams, &ids},
               requests, deadline, cancel);
  }

  // Every other member's channels for the direct exchange (after ensure_ring with the mesh).
  MeshLinks mesh_links() {
    const size_t n = current->members.size();
    const size_t next_rank = (my_rank + 1) % n, prev_rank = (my_rank + n - 1) % n;
    MeshLinks links{std::vector<net::BulkChannel*>(n), std::vector<net::BulkChannel*>(n)};
    for (size_t c = 0; c < n; ++c) {
      if (c == my_rank) continue;
      if (c == next_rank || c == prev_rank) {  // with 2 members both: send forward, receive from behind
        links.send[c] = c == next_rank ? &*to_next : &*from_prev;
        links.recv[c] = c == prev_rank ? &*from_prev : &*to_next;
      } else {
        links.send[c] = links.recv[c] = &*mesh[c];
      }
    }
    return links;
  }

  // Runs `body` as one operation of the current quorum: sets up the ring, arms the abort watch,
  // and turns every failure into PeerLostError naming the peers the coordinator (or this
  // member) found lost. On failure the channels are dropped and the failure reported.
  template <typename Body>
  void run_op(std::string_view what, Body body, bool with_mesh = false) {
    const coord::Quorum& q = quorum_or_throw();
    Deadline deadline = Deadline::after(options.op_timeout);
    CancelToken cancel;
    link->watch(q.quorum_id, &cancel);
    // Whatever leaves this scope, the link must not keep a pointer to `cancel`.
    struct Unwatch {
      ControlLink& link;
      ~Unwatch() { link.watch(0, nullptr); }
    } unwatch{*link};
    uint64_t seq = ++op_seq;
    try {
      ensure_ring(deadline, &cancel, with_mesh);
      RingContext ctx{q, my_rank, seq, to_next ? &*to_next : nullptr, from_prev ? &*from_prev : nullptr,
                      deadline, &cancel, options.chunk_bytes, options.fault_hook, checking_gradients};
      body(ctx);
    } catch (const Error& e) {
      link->watch(0, nullptr);
      fail(q, what, e);
    } catch (const std::exception& e) {
      // std::bad_alloc, a thread that could not start, ...: this member's own failure. The
      // others are told (fail), and the caller gets the exception as it was.
      link->watch(0, nullptr);
      fail(q, what, InternalError(fmt::format("{}", e.what())));
    }
  }

  [[noreturn]] void fail(const coord::Quorum& q, std::string_view what, const Error& e) {
    // Who is lost? Prefer the coordinator's verdict; else what this member saw.
    std::vector<PeerId> seen;
    if (auto* lost = dynamic_cast<const PeerLostError*>(&e)) {
      for (const auto& m : q.members)
        if (m.id.fingerprint() == lost->peer()) seen.push_back(m.id);
    }
    std::optional<coord::Abort> abort = link->abort_for(q.quorum_id);
    if (!abort) {
      coord::Abort report{q.quorum_id, q.step, seen, fmt::format("{} failed at {}: {}", what,
                                                                 self.public_key().fingerprint(), e.what())};
      link->send(coord::MessageKind::Failure, coord::encode(report), q.quorum_id, q.step);
      abort = link->wait_abort(q.quorum_id, Deadline::after(options.blame_grace));
    }
    // Only now close the ring: closing first would make the neighbours see this member as
    // lost and report it before the report above names the real culprit.
    drop_channels();
    std::vector<PeerId> lost = abort && !abort->lost.empty() ? abort->lost : seen;
    failed_quorum = q.quorum_id;
    failed_lost = lost;
    // A failure of this member's own (a CUDA error, a broken invariant) is not a lost peer: the
    // others were told above and retry without it; here the error goes to the caller as it is,
    // not into reduce_step's retries. (fail() runs inside run_op's catch: `throw;` rethrows.)
    if (e.code() == ErrorCode::Internal) throw;
    std::string first = lost.empty() ? std::string("unknown") : lost.front().fingerprint();
    throw PeerLostError(first, fmt::format("{} on quorum {:x} (step {}) failed; lost: {} ({})", what, q.quorum_id,
                                           q.step, coord::describe_peers(lost), abort ? abort->reason : std::string(e.what())));
  }
};

Communicator::Communicator(const crypto::Identity& self, CommunicatorOptions options)
    : impl_(std::make_unique<Impl>(self, std::move(options))) {}

Communicator::~Communicator() = default;

const PeerId& Communicator::id() const { return impl_->self.public_key(); }
uint16_t Communicator::bulk_port() const { return impl_->listener->port(); }
const CommunicatorOptions& Communicator::options() const { return impl_->options; }
const coord::Quorum& Communicator::quorum() const { return impl_->quorum_or_throw(); }
uint32_t Communicator::rank() const { return impl_->my_rank; }
void Communicator::set_state_digest(uint64_t step, const crypto::Digest& digest) {
  impl_->state_digest.emplace(step, digest);
}

const coord::Quorum& Communicator::next_quorum(uint64_t step, bool has_state) {
  auto& s = *impl_;
  coord::QuorumRequest request;
  request.step = step;
  request.host = s.options.advertise_host;
  request.port = s.options.advertise_port != 0 ? s.options.advertise_port : bulk_port();
  request.has_state = has_state;
  uint64_t exclude = 0;
  if (s.failed_quorum != 0 && s.current && s.current->step == step) {
    request.failed_quorum_id = s.failed_quorum;
    request.lost = s.failed_lost;
    exclude = s.failed_quorum;
  }
  s.failed_quorum = 0;
  s.failed_lost.clear();
  // The request is repeated every second while we wait (plainly: the failure was reported by
  // the first one), so a lost message or a coordinator restart only costs a second.
  std::optional<coord::Quorum> q;
  std::optional<coord::Rejoin> rejoin;
  std::optional<coord::Refusal> refusal;
  if (s.options.join_token) request.join_token = s.options.join_token->encode();
  if (s.state_digest && s.state_digest->first == step) request.state_digest = s.state_digest->second;
  Deadline deadline = Deadline::after(s.options.quorum_timeout);
  for (;;) {
    s.link->send(coord::MessageKind::QuorumRequest, coord::encode(request), 0, step);
    request.failed_quorum_id = 0;
    request.lost.clear();
    if (s.link->wait_quorum(step, exclude, Deadline(std::min(deadline.at(), Clock::now() + kRepeatInterval)), q,
                            rejoin, refusal))
      break;
    if (deadline.expired())
      throw TimeoutError(fmt::format("no quorum for step {} from the coordinator {} within {} ms", step,
                                     s.options.coordinator.fingerprint(), s.options.quorum_timeout.count()));
  }
  if (rejoin) {
    s.drop_channels();
    throw StepMissedError(rejoin->missed_step, rejoin->next_step,
                          fmt::format("missed step {} ({}); rejoin at step {} and take state first",
                                      rejoin->missed_step, rejoin->reason, rejoin->next_step));
  }
  if (refusal)
    throw coord::JoinTokenError(refusal->problem, fmt::format("coordinator {} refused {}: {}",
                                                              s.options.coordinator.fingerprint(),
                                                              id().fingerprint(), refusal->reason));
  const coord::Member& me = q->member(id());
  // The authenticated coordinator vouches for its quorum: accept bulk streams from every
  // member, also those admitted by join token and so on nobody's allow-list.
  for (const auto& m : q->members) s.listener->allow(m.id);
  if (s.current && s.current->members.size() != q->members.size()) s.drop_channels();
  // The mesh is kept only while the members stay the same: both ends of a pair then decide
  // alike whether to reuse it (a member that was left out dropped all its channels).
  std::vector<PeerId> ids;
  for (const auto& m : q->members) ids.push_back(m.id);
  if (s.mesh_for != ids) s.drop_mesh();
  s.my_rank = me.rank;
  s.op_seq = 0;  // operations are numbered per quorum, the same on every member
  s.current = std::move(*q);
  log::debug("collective", "quorum {:x} for step {}: {} members, rank {}", s.current->quorum_id, step,
             s.current->members.size(), s.my_rank);
  return *s.current;
}

void Communicator::allreduce(BufferView device_buffer, ReduceOp op) {
  device::require_supported("allreduce", device_buffer);
  auto& s = *impl_;
  const coord::Quorum& q = s.quorum_or_throw();
  device::HostView host(device_buffer, s.options.cuda_stream, s.staging, s.staging_memory(device_buffer));
  const BufferView& buffer = host.view();
  const bool contributes = q.member(id()).contributes;
  const size_t contributors = q.contributors();
  const bool widen = buffer.dtype == DType::Float16 || buffer.dtype == DType::BFloat16;
  float* data = nullptr;
  switch (buffer.dtype) {
    case DType::Float32:
      data = static_cast<float*>(buffer.data);
      break;
    case DType::Float16:
    case DType::BFloat16: {
      data = s.widened.take_floats(buffer.count).data();
      auto* h = static_cast<const uint16_t*>(buffer.data);
      for (size_t i = 0; i < buffer.count; ++i)
        data[i] = buffer.dtype == DType::Float16 ? half_to_float(h[i]) : bf16_to_float(h[i]);
      break;
    }
    default:
      throw InvalidArgumentError(fmt::format("allreduce: dtype {} is not reducible (float32, float16, bfloat16)",
                                             dtype_name(buffer.dtype)));
  }
  if (!contributes) std::fill(data, data + buffer.count, 0.0f);
  if (s.checking_gradients) {
    // A NaN or Inf would poison every member's average: refuse it before anything is sent.
    for (size_t i = 0; i < buffer.count; ++i)
      if (!std::isfinite(data[i]))
        throw InvalidArgumentError(fmt::format("gradient element {} of step {} is {}; nothing was sent", i, q.step,
                                               data[i]));
  }
  float divisor = op == ReduceOp::Avg ? static_cast<float>(std::max<size_t>(contributors, 1)) : 1.0f;
  s.run_op("allreduce", [&](RingContext& ctx) {
    ring_allreduce(ctx, data, buffer.count, divisor);
  });
  if (widen) {
    auto* h = static_cast<uint16_t*>(buffer.data);
    for (size_t i = 0; i < buffer.count; ++i)
      h[i] = buffer.dtype == DType::Float16 ? float_to_half(data[i]) : float_to_bf16(data[i]);
  }
  host.write_back();
}

void Communicator::broadcast(BufferView buffer, uint32_t root_rank) {
  device::require_supported("broadcast", buffer);
  auto& s = *impl_;
  const coord::Quorum& q = s.quorum_or_throw();
  if (root_rank >= q.members.size())
    throw InvalidArgumentError(fmt::format("broadcast: root rank {} but the quorum has {} members", root_rank,
                                           q.members.size()));
  const bool root = s.my_rank == root_rank;
  device::HostView host(buffer, s.options.cuda_stream, s.staging, s.staging_memory(buffer), /*load=*/root);
  s.run_op("broadcast", [&](RingContext& ctx) {
    ring_broadcast(ctx, static_cast<uint8_t*>(host.view().data), buffer.bytes(), root_rank);
  });
  if (!root) host.write_back();
}

void Communicator::allgather(BufferView in, BufferView out) {
  device::require_supported("allgather", in);
  device::require_supported("allgather", out);
  auto& s = *impl_;
  const size_t n = s.quorum_or_throw().members.size();
  if (in.dtype != out.dtype || out.count != in.count * n)
    throw InvalidArgumentError(fmt::format("allgather: out must hold {} x {} {} elements, has {} {}", n, in.count,
                                           dtype_name(in.dtype), out.count, dtype_name(out.dtype)));
  device::HostView host(out, s.options.cuda_stream, s.staging, s.staging_memory(out), /*load=*/false);
  auto* dst = static_cast<uint8_t*>(host.view().data);
  device::copy_to_host(in, dst + s.my_rank * in.bytes(), s.options.cuda_stream);
  s.run_op("allgather", [&](RingContext& ctx) { ring_allgather_blocks(ctx, dst, in.bytes()); });
  host.write_back();
}

void Communicator::reduce_scatter(BufferView in, BufferView out, ReduceOp op) {
  device::require_supported("reduce_scatter", in);
  device::require_supported("reduce_scatter", out);
  auto& s = *impl_;
  const coord::Quorum& q = s.quorum_or_throw();
  const size_t n = q.members.size();
  if (in.dtype != DType::Float32 || out.dtype != DType::Float32 || in.count != out.count * n)
    throw InvalidArgumentError(fmt::format("reduce_scatter: float32 buffers with in = {} x out ({} elements); got in "
                                           "{} {}, out {} {}", n, out.count, in.count, dtype_name(in.dtype), out.count,
                                           dtype_name(out.dtype)));
  const BufferView& device_side = in.device == DeviceKind::Cuda ? in : out;
  const std::span<float> work = s.staging.take_floats(in.count, s.staging_memory(device_side), device_side.device_index);
  if (q.member(id()).contributes)
    device::copy_to_host(in, work.data(), s.options.cuda_stream);
  else
    std::fill(work.begin(), work.end(), 0.0f);
  float divisor = op == ReduceOp::Avg ? static_cast<float>(std::max<size_t>(q.contributors(), 1)) : 1.0f;
  s.run_op("reduce_scatter", [&](RingContext& ctx) { ring_reduce_scatter_blocks(ctx, work.data(), out.count, divisor); });
  device::copy_from_host(work.data() + s.my_rank * out.count, out, s.options.cuda_stream);
}

void Communicator::run_ring_op(std::string_view what, const std::function<void(RingContext&)>& body) {
  impl_->run_op(what, body);
}

void Communicator::run_mesh_op(std::string_view what, const std::function<void(RingContext&, const MeshLinks&)>& body) {
  auto& s = *impl_;
  s.run_op(what, [&](RingContext& ctx) { body(ctx, s.mesh_links()); }, /*with_mesh=*/true);
}

StepResult Communicator::reduce_step(uint64_t step, BufferView gradients, uint32_t max_attempts) {
  device::require_supported("reduce_step", gradients);
  struct PlainAttempt final : StepAttempt {
    Communicator& comm;
    BufferView gradients;
    PlainAttempt(Communicator& c, BufferView g) : comm(c), gradients(g) {}
    void run() override { comm.allreduce(gradients, ReduceOp::Avg); }
  } attempt(*this, gradients);
  return run_step(step, gradients, attempt, max_attempts);
}

StepResult Communicator::run_step(uint64_t step, BufferView gradients, StepAttempt& attempt, uint32_t max_attempts) {
  auto& s = *impl_;
  // Rolled back to after every failed attempt, before the next.
  const device::Snapshot original(gradients, s.options.cuda_stream, s.step_inputs);
  auto roll_back = [&] {
    attempt.rollback();
    original.restore();
  };
  struct Checking {
    bool& flag;
    explicit Checking(bool& f) : flag(f) { flag = true; }
    ~Checking() { flag = false; }
  } checking(s.checking_gradients);
  StepResult result;
  for (uint32_t number = 1;; ++number) {
    result.attempts = number;
    // Use a quorum the caller already obtained for this step (e.g. to broadcast state first).
    if (!s.current || s.current->step != step || s.failed_quorum != 0) next_quorum(step);
    const coord::Quorum q = *s.current;
    try {
      attempt.run();
      // All or nothing: apply only when every member of the attempt finished it.
      std::optional<coord::Abort> abort;
      Deadline deadline = Deadline::after(s.options.op_timeout);
      for (;;) {
        s.link->send(coord::MessageKind::Done, {}, q.quorum_id, step);
        Deadline slice(std::min(deadline.at(), Clock::now() + kRepeatInterval));
        if (s.link->wait_outcome(q.quorum_id, slice, abort)) break;
        if (deadline.expired())
          throw TimeoutError(fmt::format("no commit or abort from the coordinator for quorum {:x} (step {}) within "
                                         "{} ms", q.quorum_id, step, s.options.op_timeout.count()));
      }
      if (abort) {
        s.drop_channels();
        s.failed_quorum = q.quorum_id;
        s.failed_lost = abort->lost;
        throw PeerLostError(abort->lost.empty() ? "unknown" : abort->lost.front().fingerprint(),
                            fmt::format("quorum {:x} (step {}) aborted after the reduction: {}", q.quorum_id, step,
                                        abort->reason));
      }
      attempt.commit();
      result.quorum = q;
      for (const auto& m : q.members)
        if (m.contributes) result.contributors.push_back(m.id);
      return result;
    } catch (const PeerLostError& e) {
      log::warn("collective", "step {} attempt {}: {}", step, number, e.what());
      roll_back();
      if (number >= max_attempts) throw;
    } catch (...) {
      roll_back();
      throw;
    }
  }
}

void Communicator::leave() {
  impl_->link->send(coord::MessageKind::Leave, {});
  std::this_thread::sleep_for(50ms);  // let the link thread flush it
}

}  // namespace meshtrain::collective
