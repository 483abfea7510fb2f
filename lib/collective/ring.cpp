#include "collective/ring.h"

#include <algorithm>
#include <cmath>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <exception>
#include <mutex>
#include <thread>

namespace meshtrain::collective {
namespace {

enum Phase : uint32_t { kReduceScatter = 0, kAllGather = 1, kBroadcast = 2, kGatherToOwners = 3 };

// tag = phase (2 bits) | ring step (14 bits) | piece index (16 bits)
constexpr size_t kMaxPieces = 1u << 16;
constexpr size_t kMaxRingSteps = 1u << 14;
constexpr int kMaxStaleFrames = 64;
// The largest unexpected frame receive_piece reads (to drop it, if stale) rather than refuse
// unread: far above any legitimate piece (a chunk, or 1/65536 of a block of up to 1 TiB).
constexpr size_t kMaxUnexpectedFrameBytes = size_t{16} << 20;

uint32_t make_tag(Phase phase, size_t step, size_t piece) {
  return static_cast<uint32_t>(phase) << 30 | static_cast<uint32_t>(step) << 16 | static_cast<uint32_t>(piece);
}

const char* phase_name(Phase p) {
  switch (p) {
    case kReduceScatter: return "reduce_scatter";
    case kAllGather: return "all_gather";
    case kBroadcast: return "broadcast";
    case kGatherToOwners: return "reduce_scatter";  // the compressed all-reduce's first phase
  }
  return "?";
}

// Byte ranges of the n chunks of a buffer, and their pieces.
struct Layout {
  std::vector<size_t> offset;  // bytes
  std::vector<size_t> bytes;
  size_t piece_bytes;

  size_t pieces(size_t chunk) const { return bytes[chunk] == 0 ? 0 : (bytes[chunk] + piece_bytes - 1) / piece_bytes; }
  size_t piece_offset(size_t chunk, size_t j) const { return offset[chunk] + j * piece_bytes; }
  size_t piece_size(size_t chunk, size_t j) const { return std::min(piece_bytes, bytes[chunk] - j * piece_bytes); }
};

// n chunks over `count` elements of `elem` bytes, balanced (sizes differ by at most one element).
Layout balanced_layout(size_t count, size_t elem, size_t n, size_t chunk_bytes) {
  Layout l;
  size_t largest = 0;
  for (size_t c = 0; c < n; ++c) {
    size_t begin = count * c / n, end = count * (c + 1) / n;
    l.offset.push_back(begin * elem);
    l.bytes.push_back((end - begin) * elem);
    largest = std::max(largest, (end - begin) * elem);
  }
  size_t piece = std::max<size_t>(chunk_bytes / elem * elem, elem);
  size_t min_piece = (largest + kMaxPieces - 1) / kMaxPieces;
  min_piece = (min_piece + elem - 1) / elem * elem;
  l.piece_bytes = std::max(piece, min_piece);
  return l;
}

Layout block_layout(size_t block_bytes, size_t elem, size_t n, size_t chunk_bytes) {
  Layout l = balanced_layout(block_bytes / elem * n, elem, n, chunk_bytes);
  for (size_t c = 0; c < n; ++c) {
    l.offset[c] = c * block_bytes;
    l.bytes[c] = block_bytes;
  }
  return l;
}

// Streams pieces to the next rank on its own thread, in the order they are queued.
class Sender {
 public:
  explicit Sender(RingContext& ctx) : ctx_(ctx) {
    if (ctx_.to_next) thread_ = std::thread([this] { loop(); });
  }
  ~Sender() { finish_noexcept(); }

  void send(uint32_t tag, const uint8_t* data, size_t bytes) {
    std::lock_guard lock(mutex_);
    queue_.push_back({tag, data, bytes});
    cv_.notify_one();
  }
  // Waits until everything queued is sent; rethrows a send failure.
  void finish() {
    finish_noexcept();
    if (error_) std::rethrow_exception(error_);
  }
  std::exception_ptr error() {
    std::lock_guard lock(mutex_);
    return error_;
  }

 private:
  struct Item {
    uint32_t tag;
    const uint8_t* data;
    size_t bytes;
  };
  void finish_noexcept() {
    {
      std::lock_guard lock(mutex_);
      closing_ = true;
      cv_.notify_one();
    }
    if (thread_.joinable()) thread_.join();
  }
  void loop() {
    net::MessageHeader h = frame_header(ctx_);
    for (;;) {
      Item item;
      {
        std::unique_lock lock(mutex_);
        cv_.wait(lock, [&] { return closing_ || !queue_.empty(); });
        if (queue_.empty()) return;
        item = queue_.front();
        queue_.pop_front();
      }
      try {
        h.tag = item.tag;
        ctx_.to_next->send(h, crypto::ByteSpan(item.data, item.bytes), ctx_.deadline, ctx_.cancel);
      } catch (...) {
        std::lock_guard lock(mutex_);
        error_ = std::current_exception();
        queue_.clear();
        ctx_.cancel->cancel();  // wake the receiving thread
        return;
      }
    }
  }

  RingContext& ctx_;
  std::thread thread_;
  std::mutex mutex_;
  std::condition_variable cv_;
  std::deque<Item> queue_;
  bool closing_ = false;
  std::exception_ptr error_;
};

}  // namespace

net::MessageHeader frame_header(const RingContext& ctx) {
  net::MessageHeader h;
  h.type = net::kFirstUserMessageType;
  h.quorum_id = ctx.quorum.quorum_id;
  h.step = ctx.quorum.step;
  h.op_seq = ctx.op_seq;
  return h;
}

void receive_piece(RingContext& ctx, uint32_t tag, size_t bytes, std::vector<uint8_t>& buf, uint8_t* in_place) {
  auto expected = [&](const net::MessageHeader& h) {
    return h.quorum_id == ctx.quorum.quorum_id && h.step == ctx.quorum.step && h.op_seq == ctx.op_seq &&
           h.tag == tag && h.payload_bytes == bytes;
  };
  // Only the expected piece lands in place; anything else goes to `buf` and is dropped or refused.
  const net::BulkChannel::PlaceFn place = [&](const net::MessageHeader& h) -> std::optional<crypto::MutableByteSpan> {
    if (in_place == nullptr || !expected(h)) return std::nullopt;
    return crypto::MutableByteSpan(in_place, bytes);
  };
  // Anything else is read into `buf` to be dropped (a stale frame: a piece of an earlier
  // operation, at most a chunk or 1/65536 of a block) or refused: larger is refused unread.
  const size_t acceptable = std::max({bytes, ctx.chunk_bytes, kMaxUnexpectedFrameBytes});
  for (int stale = 0;; ++stale) {
    net::MessageHeader h = ctx.from_prev->recv_placed(place, buf, ctx.deadline, ctx.cancel, acceptable);
    if (expected(h)) return;
    std::string who = ctx.from_prev->peer().fingerprint();
    if (h.quorum_id != ctx.quorum.quorum_id || h.step != ctx.quorum.step) {
      log::warn("collective", "dropped a frame from {} for quorum {:x} step {} (current: quorum {:x} step {})", who,
                h.quorum_id, h.step, ctx.quorum.quorum_id, ctx.quorum.step);
      if (stale >= kMaxStaleFrames)
        throw ProtocolError(fmt::format("peer {} keeps sending frames of another quorum", who));
      continue;
    }
    throw ProtocolError(fmt::format("peer {} sent op {} tag {:#x} ({} bytes) where op {} tag {:#x} ({} bytes) was "
                                    "expected", who, h.op_seq, h.tag, h.payload_bytes, ctx.op_seq, tag, bytes));
  }
}

namespace {

// Runs body(sender) and then drains the sender. If anything fails, the sender's own error
// (the root cause: the receiving side was only woken by it) wins over the receiver's.
template <typename Body>
void with_sender(RingContext& ctx, Body body) {
  Sender sender(ctx);
  try {
    body(sender);
  } catch (const Error&) {
    ctx.cancel->cancel();
    if (auto e = sender.error()) std::rethrow_exception(e);
    throw;
  }
  sender.finish();
}

void check_ring(const RingContext& ctx) {
  if (ctx.quorum.members.size() > kMaxRingSteps)
    throw InvalidArgumentError(fmt::format("ring of {} members exceeds {}", ctx.quorum.members.size(), kMaxRingSteps));
}

// Throws PeerLostError naming the previous rank if the received fp32 piece (at byte `offset`
// of the buffer) holds a NaN or Inf.
void check_finite(const RingContext& ctx, std::span<const uint8_t> piece, size_t offset, size_t chunk) {
  const float* p = reinterpret_cast<const float*>(piece.data());
  for (size_t i = 0; i < piece.size() / sizeof(float); ++i)
    if (!std::isfinite(p[i])) {
      // Reported like a lost peer, so the failure report and the Abort name the sender.
      std::string sender = ctx.from_prev->peer().fingerprint();
      throw PeerLostError(sender, fmt::format("peer {} sent a non-finite value ({}) at element {} of chunk {}", sender,
                                              p[i], offset / sizeof(float) + i, chunk));
    }
}

size_t mod(int64_t a, size_t n) { return static_cast<size_t>(((a % int64_t(n)) + int64_t(n)) % int64_t(n)); }

// Reduce-scatter over the chunks of `layout`: afterwards chunk `rank` of data holds
// sum / divisor. Owner of chunk c is rank c: at ring step k, rank r sends chunk r-k-1 and
// receives chunk r-k-2, which it adds to its own and forwards at step k+1.
void reduce_scatter_phase(RingContext& ctx, float* data, const Layout& layout, float divisor) {
  const size_t n = ctx.quorum.members.size();
  const int64_t r = ctx.rank;
  auto* bytes = reinterpret_cast<uint8_t*>(data);
  auto finalize = [&](size_t chunk, size_t j) {
    if (divisor == 1.0f) return;
    float* p = reinterpret_cast<float*>(bytes + layout.piece_offset(chunk, j));
    size_t count = layout.piece_size(chunk, j) / sizeof(float);
    for (size_t i = 0; i < count; ++i) p[i] /= divisor;
  };
  if (n == 1) {
    for (size_t j = 0; j < layout.pieces(0); ++j) finalize(0, j);
    return;
  }
  with_sender(ctx, [&](Sender& sender) {
    size_t first = mod(r - 1, n);
    for (size_t j = 0; j < layout.pieces(first); ++j)
      sender.send(make_tag(kReduceScatter, 0, j), bytes + layout.piece_offset(first, j), layout.piece_size(first, j));
    std::vector<uint8_t> buf;
    for (size_t k = 0; k + 1 < n; ++k) {
      if (ctx.fault_hook) ctx.fault_hook(phase_name(kReduceScatter), k);
      size_t chunk = mod(r - int64_t(k) - 2, n);
      for (size_t j = 0; j < layout.pieces(chunk); ++j) {
        size_t size = layout.piece_size(chunk, j);
        receive_piece(ctx, make_tag(kReduceScatter, k, j), size, buf);
        float* mine = reinterpret_cast<float*>(bytes + layout.piece_offset(chunk, j));
        const float* theirs = reinterpret_cast<const float*>(buf.data());
        if (ctx.reject_non_finite) check_finite(ctx, buf, layout.piece_offset(chunk, j), chunk);
        for (size_t i = 0; i < size / sizeof(float); ++i) mine[i] = theirs[i] + mine[i];
        if (k + 2 < n) {
          sender.send(make_tag(kReduceScatter, k + 1, j), bytes + layout.piece_offset(chunk, j), size);
        } else {
          finalize(chunk, j);
        }
      }
    }
  });
}

// All-gather over the chunks of `layout`: chunk `rank` is final here; afterwards all are.
// At ring step k, rank r sends chunk r-k and receives chunk r-k-1 (into place), which it
// forwards at step k+1.
void all_gather_phase(RingContext& ctx, uint8_t* data, const Layout& layout) {
  const size_t n = ctx.quorum.members.size();
  if (n == 1) return;
  const int64_t r = ctx.rank;
  with_sender(ctx, [&](Sender& sender) {
    size_t own = static_cast<size_t>(r);
    for (size_t j = 0; j < layout.pieces(own); ++j)
      sender.send(make_tag(kAllGather, 0, j), data + layout.piece_offset(own, j), layout.piece_size(own, j));
    std::vector<uint8_t> buf;
    for (size_t k = 0; k + 1 < n; ++k) {
      if (ctx.fault_hook) ctx.fault_hook(phase_name(kAllGather), k);
      size_t chunk = mod(r - int64_t(k) - 1, n);
      for (size_t j = 0; j < layout.pieces(chunk); ++j) {
        size_t size = layout.piece_size(chunk, j);
        uint8_t* piece = data + layout.piece_offset(chunk, j);
        receive_piece(ctx, make_tag(kAllGather, k, j), size, buf, piece);
        if (ctx.reject_non_finite) check_finite(ctx, {piece, size}, layout.piece_offset(chunk, j), chunk);
        if (k + 2 < n) sender.send(make_tag(kAllGather, k + 1, j), piece, size);
      }
    }
  });
}

}  // namespace

void ring_allreduce(RingContext& ctx, float* data, size_t count, float divisor) {
  check_ring(ctx);
  Layout layout = balanced_layout(count, sizeof(float), ctx.quorum.members.size(), ctx.chunk_bytes);
  reduce_scatter_phase(ctx, data, layout, divisor);
  all_gather_phase(ctx, reinterpret_cast<uint8_t*>(data), layout);
}

void ring_reduce_scatter_blocks(RingContext& ctx, float* data, size_t block_count, float divisor) {
  check_ring(ctx);
  Layout layout = block_layout(block_count * sizeof(float), sizeof(float), ctx.quorum.members.size(), ctx.chunk_bytes);
  reduce_scatter_phase(ctx, data, layout, divisor);
}

void ring_allgather_blocks(RingContext& ctx, uint8_t* data, size_t block_bytes) {
  check_ring(ctx);
  Layout layout = block_layout(block_bytes, 1, ctx.quorum.members.size(), ctx.chunk_bytes);
  all_gather_phase(ctx, data, layout);
}

void ring_gather_to_owners(RingContext& ctx, const std::vector<std::span<const uint8_t>>& blocks,
                           std::vector<std::vector<uint8_t>>& gathered) {
  check_ring(ctx);
  const size_t n = ctx.quorum.members.size();
  const int64_t r = ctx.rank;
  if (blocks.size() != n)
    throw InvalidArgumentError(fmt::format("gather to owners: {} blocks for a quorum of {}", blocks.size(), n));
  gathered.assign(n, {});
  gathered[r].assign(blocks[r].begin(), blocks[r].end());
  if (n == 1) return;
  // A bundle is a run of whole blocks of one chunk. At ring step k, rank r sends the bundle of
  // chunk r-k-1: its own block, then the k blocks it received for that chunk at step k-1 (from
  // ranks r-1, ..., r-k). Received block i of a bundle therefore comes from rank r-1-i. Pieces
  // never straddle blocks, so a received piece can be forwarded as soon as it is in.
  size_t largest = 0;
  for (const auto& b : blocks) largest = std::max(largest, b.size());
  const size_t per_block_limit = kMaxPieces / n;  // a bundle's piece index fits the tag
  const size_t piece_bytes = std::max({ctx.chunk_bytes, (largest + per_block_limit - 1) / per_block_limit, size_t{1}});
  auto pieces_of = [&](size_t bytes) { return (bytes + piece_bytes - 1) / piece_bytes; };
  // Bundles the sender thread may still be reading: they outlive with_sender, which drains it.
  std::deque<std::vector<uint8_t>> sent;
  with_sender(ctx, [&](Sender& sender) {
    std::vector<uint8_t> relay;  // the bundle received at the previous step (k blocks)
    std::vector<uint8_t> buf;
    for (size_t k = 0; k + 1 < n; ++k) {
      if (ctx.fault_hook) ctx.fault_hook(phase_name(kGatherToOwners), k);
      const size_t send_chunk = mod(r - int64_t(k) - 1, n);
      const size_t block = blocks[send_chunk].size();
      const size_t per_block = pieces_of(block);
      // Blocks 1..k of this bundle are `relay` (received at step k-1 for the same chunk).
      const std::vector<uint8_t>& sending = sent.emplace_back(std::move(relay));
      for (size_t j = 0; j < per_block; ++j)
        sender.send(make_tag(kGatherToOwners, k, j), blocks[send_chunk].data() + j * piece_bytes,
                    std::min(piece_bytes, block - j * piece_bytes));
      for (size_t i = 0; i < k; ++i)
        for (size_t j = 0; j < per_block; ++j)
          sender.send(make_tag(kGatherToOwners, k, (i + 1) * per_block + j), sending.data() + i * block + j * piece_bytes,
                      std::min(piece_bytes, block - j * piece_bytes));
      // Receive the bundle of chunk r-k-2 (k+1 blocks); at the last step that is our own chunk.
      const size_t recv_chunk = mod(r - int64_t(k) - 2, n);
      const size_t rblock = blocks[recv_chunk].size();
      const size_t rper = pieces_of(rblock);
      const bool last = k + 2 == n;
      if (!last) relay.assign((k + 1) * rblock, 0);
      for (size_t i = 0; i <= k; ++i) {
        uint8_t* dst;
        if (last) {
          auto& slot = gathered[mod(r - 1 - int64_t(i), n)];
          slot.resize(rblock);
          dst = slot.data();
        } else {
          dst = relay.data() + i * rblock;
        }
        for (size_t j = 0; j < rper; ++j) {
          const size_t size = std::min(piece_bytes, rblock - j * piece_bytes);
          receive_piece(ctx, make_tag(kGatherToOwners, k, i * rper + j), size, buf, dst + j * piece_bytes);
        }
      }
    }
  });
}

void ring_broadcast(RingContext& ctx, uint8_t* data, size_t bytes, uint32_t root) {
  const size_t n = ctx.quorum.members.size();
  if (n == 1) return;
  Layout layout = balanced_layout(bytes, 1, 1, ctx.chunk_bytes);
  const size_t distance = mod(int64_t(ctx.rank) - int64_t(root), n);
  with_sender(ctx, [&](Sender& sender) {
    std::vector<uint8_t> buf;
    if (ctx.fault_hook) ctx.fault_hook(phase_name(kBroadcast), distance);
    for (size_t j = 0; j < layout.pieces(0); ++j) {
      size_t size = layout.piece_size(0, j);
      uint8_t* piece = data + layout.piece_offset(0, j);
      if (distance != 0) receive_piece(ctx, make_tag(kBroadcast, 0, j), size, buf, piece);
      if (distance + 1 < n) sender.send(make_tag(kBroadcast, 0, j), piece, size);
    }
  });
}

}  // namespace meshtrain::collective
