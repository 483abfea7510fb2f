#include "collective/exchange.h"

#include <algorithm>
#include <condition_variable>
#include <deque>
#include <exception>
#include <future>
#include <mutex>
#include <thread>

namespace meshtrain::collective {
namespace {

// Tags of the direct exchange: ring phase 3 (the compressed all-reduce's first phase, which an
// operation runs either relayed or direct, never both) at a ring step no ring reaches, so a
// frame of one can never pass for the other's; the low 16 bits are the piece index.
constexpr uint32_t kExchangeTag = 3u << 30 | 0x3FFFu << 16;
constexpr uint32_t kAllGatherTag = 3u << 30 | 0x3FFEu << 16;  // the owners' direct all-gather
constexpr size_t kMaxPieces = 1u << 16;

bool is_cancellation(const std::exception_ptr& e) {
  try {
    std::rethrow_exception(e);
  } catch (const Error& x) {
    return x.code() == ErrorCode::Cancelled;
  } catch (...) {
    return false;
  }
}

// The first failure of an operation's threads; a cancellation only when nothing else failed
// (the threads woken by the cancel report it, the root cause is elsewhere).
class FirstFailure {
 public:
  explicit FirstFailure(CancelToken* cancel) : cancel_(cancel) {}
  void record(std::exception_ptr e) {
    {
      std::lock_guard lock(mutex);
      const bool cancelled = is_cancellation(e);
      if (!error_ || (error_cancelled_ && !cancelled)) {
        error_ = e;
        error_cancelled_ = cancelled;
      }
    }
    cv.notify_all();
    cancel_->cancel();
  }
  bool failed() const { return error_ != nullptr; }  // under `mutex`
  void rethrow_if_failed() {
    std::lock_guard lock(mutex);
    if (error_) std::rethrow_exception(error_);
  }

  std::mutex mutex;
  std::condition_variable cv;

 private:
  CancelToken* cancel_;
  std::exception_ptr error_;
  bool error_cancelled_ = false;
};

}  // namespace

void exchange_to_owners(RingContext& ctx, const MeshLinks& links, const std::vector<std::span<const uint8_t>>& blocks,
                        const std::function<void(size_t rank, std::span<const uint8_t> block)>& take,
                        ReceiveSpace& received, const std::function<void(size_t rank)>& produce,
                        ExchangePhase phase) {
  const uint32_t tag_base = phase == ExchangePhase::AllGather ? kAllGatherTag : kExchangeTag;
  const char* hook_phase = phase == ExchangePhase::AllGather ? "all_gather" : "reduce_scatter";
  const size_t n = ctx.quorum.members.size();
  const size_t r = ctx.rank;
  if (blocks.size() != n || links.send.size() != n || links.recv.size() != n)
    throw InvalidArgumentError(fmt::format("direct exchange: {} blocks and {}/{} links for a quorum of {}",
                                           blocks.size(), links.send.size(), links.recv.size(), n));
  for (size_t c = 0; c < n; ++c)
    if (c != r && (!links.send[c] || !links.recv[c]))
      throw InternalError(fmt::format("direct exchange: no channel to rank {}", c));
  if (ctx.fault_hook) ctx.fault_hook(hook_phase, 0);
  const size_t mine = blocks[r].size();  // every member's block for this rank has this size
  size_t largest = mine;
  for (const auto& b : blocks) largest = std::max(largest, b.size());
  const size_t piece_bytes = std::max({ctx.chunk_bytes, (largest + kMaxPieces - 1) / kMaxPieces, size_t{1}});
  auto pieces_of = [&](size_t bytes) { return (bytes + piece_bytes - 1) / piece_bytes; };

  FirstFailure failure(ctx.cancel);
  received.blocks.resize(n);
  std::vector<std::span<const uint8_t>> gathered(n);
  std::vector<char> arrived(n, 0);
  std::vector<char> ready(n, produce ? 0 : 1);  // blocks[c] holds its bytes
  // Every thread's waits end by ctx.deadline (or the peer timeout, or the cancel), so this
  // one is bounded too; the margin only guards against a bug there.
  const Clock::time_point limit =
      ctx.deadline.is_never() ? Clock::time_point::max() : ctx.deadline.at() + std::chrono::seconds(5);
  std::vector<std::thread> threads;
  auto guarded = [&failure](auto body) {
    return [&failure, body] {
      try {
        body();
      } catch (...) {
        failure.record(std::current_exception());
      }
    };
  };
  try {
    for (size_t c = 0; c < n; ++c) {
      if (c == r) continue;
      threads.emplace_back(guarded([&, c] {
        net::MessageHeader h = frame_header(ctx);
        {
          std::unique_lock lock(failure.mutex);
          if (!failure.cv.wait_until(lock, limit, [&] { return ready[c] || failure.failed(); }))
            throw TimeoutError(fmt::format("direct exchange: the block for rank {} was not encoded by the deadline", c));
          if (failure.failed()) return;
        }
        const auto& block = blocks[c];
        for (size_t j = 0; j < pieces_of(block.size()); ++j) {
          h.tag = tag_base | static_cast<uint32_t>(j);
          const size_t size = std::min(piece_bytes, block.size() - j * piece_bytes);
          links.send[c]->send(h, crypto::ByteSpan(block.data() + j * piece_bytes, size), ctx.deadline, ctx.cancel);
        }
      }));
      threads.emplace_back(guarded([&, c] {
        RingContext from_c = ctx;  // receive_piece's checks, on the channel from rank c
        from_c.from_prev = links.recv[c];
        const std::span<uint8_t> block = received.blocks[c].take(mine, received.memory, received.device);
        std::vector<uint8_t> buf;
        for (size_t j = 0; j < pieces_of(mine); ++j) {
          const size_t size = std::min(piece_bytes, mine - j * piece_bytes);
          receive_piece(from_c, tag_base | static_cast<uint32_t>(j), size, buf, block.data() + j * piece_bytes);
        }
        std::lock_guard lock(failure.mutex);
        gathered[c] = block;
        arrived[c] = 1;
        failure.cv.notify_all();
      }));
    }
    size_t next_take = 0;
    // Takes blocks in rank order: those already in (wait = false), or all (wait = true).
    auto take_in_order = [&](bool wait) {
      while (next_take < n) {
        const size_t j = next_take;
        std::span<const uint8_t> block = blocks[r];
        {
          std::unique_lock lock(failure.mutex);
          auto in = [&] { return (j == r ? ready[r] : arrived[j]) || failure.failed(); };
          if (!wait && !in()) return;
          if (!failure.cv.wait_until(lock, limit, in))
            throw TimeoutError(fmt::format("direct exchange: rank {}'s block did not arrive by the deadline", j));
          if (failure.failed()) return;
          if (j != r) block = gathered[j];
        }
        take(j, block);
        ++next_take;
        if (ctx.fault_hook) ctx.fault_hook(hook_phase, j + 1);
      }
    };
    if (produce) {
      for (size_t k = 1; k <= n; ++k) {
        const size_t c = (r + k) % n;
        produce(c);
        {
          std::lock_guard lock(failure.mutex);
          if (failure.failed()) break;
          ready[c] = 1;
        }
        failure.cv.notify_all();
        if (k < n) take_in_order(false);
      }
    }
    take_in_order(true);
  } catch (...) {
    failure.record(std::current_exception());
  }
  for (auto& t : threads) t.join();
  failure.rethrow_if_failed();
}

void open_links(const LinkSetup& setup, const std::vector<LinkRequest>& requests, Deadline deadline,
                const CancelToken* cancel) {
  const Deadline d(std::min(deadline.at(), Clock::now() + setup.connect_timeout));
  std::vector<std::future<net::BulkChannel>> connecting(requests.size());
  size_t expected = 0;
  for (size_t i = 0; i < requests.size(); ++i) {
    const LinkRequest& q = requests[i];
    q.slot->reset();
    if (q.connect) {
      connecting[i] = std::async(std::launch::async, [&setup, &q, d] {
        return net::BulkChannel::connect(setup.self, q.member->id, q.member->host, q.member->port, setup.streams,
                                         setup.bulk, d);
      });
    } else {
      ++expected;
    }
  }
  std::exception_ptr failure;
  // Several peers connect at once, so one peer's streams must not be dropped while waiting for
  // another's: the assembler keeps each (peer, channel id) until its channel is complete.
  net::BulkChannelAssembler assembler(setup.streams);
  // Streams kept by an earlier call come first, in the order they arrived.
  std::deque<net::BulkStream> backlog;
  if (setup.early) {
    for (auto& s : *setup.early) backlog.push_back(std::move(s));
    setup.early->clear();
  }
  auto member = [&](const PeerId& p) {
    return setup.members && std::find(setup.members->begin(), setup.members->end(), p) != setup.members->end();
  };
  const size_t early_limit = setup.members ? setup.members->size() * setup.streams : 0;
  auto next_stream = [&]() -> net::BulkStream {
    if (backlog.empty()) return setup.listener.accept(d, cancel);
    net::BulkStream s = std::move(backlog.front());
    backlog.pop_front();
    return s;
  };
  try {
    while (expected > 0) {
      net::BulkStream s = next_stream();
      const LinkRequest* match = nullptr;
      for (const auto& q : requests)
        if (!q.connect && !q.slot->has_value() && q.member->id == s.peer()) match = &q;
      const bool well_formed = s.stream_count() == setup.streams && s.stream_index() < setup.streams;
      if (!match && well_formed && setup.early && member(s.peer()) && setup.early->size() < early_limit) {
        log::debug("collective", "bulk stream from {} kept for a later link of this quorum", s.peer().fingerprint());
        setup.early->push_back(std::move(s));
        continue;
      }
      if (!match || !well_formed) {
        log::warn("collective", "bulk stream from {} ({} streams) dropped: not an expected link of this quorum",
                  s.peer().fingerprint(), s.stream_count());
        continue;
      }
      if (auto channel = assembler.add(std::move(s))) {
        match->slot->emplace(std::move(*channel));
        --expected;
      }
    }
  } catch (const TimeoutError&) {
    for (const auto& q : requests)
      if (!q.connect && !q.slot->has_value()) {
        failure = std::make_exception_ptr(PeerLostError(
            q.member->id.fingerprint(), fmt::format("{} {} did not connect within {} ms", q.role,
                                                    q.member->id.fingerprint(), setup.connect_timeout.count())));
        break;
      }
  } catch (...) {
    failure = std::current_exception();
  }
  // Kept streams not used here, and channels still incomplete, wait for a later call.
  if (setup.early) {
    for (auto& s : backlog) setup.early->push_back(std::move(s));
    for (auto& s : assembler.take_incomplete()) setup.early->push_back(std::move(s));
  }
  for (size_t i = 0; i < requests.size(); ++i) {
    if (!connecting[i].valid()) continue;
    const LinkRequest& q = requests[i];
    try {
      q.slot->emplace(connecting[i].get());
    } catch (const Error& e) {
      if (!failure)
        failure = std::make_exception_ptr(PeerLostError(
            q.member->id.fingerprint(), fmt::format("cannot reach {} {}: {}", q.role, q.member->id.fingerprint(),
                                                    e.what())));
    }
  }
  if (failure) std::rethrow_exception(failure);
}

}  // namespace meshtrain::collective
