#include <exception>
#include <map>
#include <thread>

#include "net/bulk_stream.h"

namespace meshtrain::net {
namespace {

struct Part {
  uint64_t offset;
  uint64_t bytes;
};

// Stream i carries bytes [offset, offset+bytes) of a `total`-byte message. Small messages use
// stream 0 alone. Both sides compute this, so a receiver checks parts instead of trusting them.
Part part_of(uint64_t total, size_t streams, size_t i) {
  if (streams == 1 || total < BulkChannel::kMinSplitBytes) return i == 0 ? Part{0, total} : Part{total, 0};
  uint64_t base = total / streams;
  uint64_t offset = base * i;
  return {offset, i + 1 == streams ? total - offset : base};
}

bool splits(uint64_t total, size_t streams) { return streams > 1 && total >= BulkChannel::kMinSplitBytes; }

// Runs fn(i) for i in [0, n): i = 0 on the calling thread, the rest on their own threads.
// Rethrows the first failure after all have finished (each ends by itself: every wait inside
// has the caller's deadline and the peer timeout).
template <typename Fn>
void run_parallel(size_t n, Fn fn) {
  std::vector<std::exception_ptr> errors(n);
  std::vector<std::thread> threads;
  threads.reserve(n > 0 ? n - 1 : 0);
  for (size_t i = 1; i < n; ++i)
    threads.emplace_back([&, i] {
      try {
        fn(i);
      } catch (...) {
        errors[i] = std::current_exception();
      }
    });
  if (n > 0) {
    try {
      fn(0);
    } catch (...) {
      errors[0] = std::current_exception();
    }
  }
  for (auto& t : threads) t.join();
  for (auto& e : errors)
    if (e) std::rethrow_exception(e);
}

}  // namespace

BulkChannel::BulkChannel(std::vector<BulkStream> streams) : streams_(std::move(streams)) {
  if (streams_.empty()) throw InvalidArgumentError("BulkChannel needs at least one stream");
  for (size_t i = 0; i < streams_.size(); ++i)
    if (streams_[i].peer() != streams_[0].peer())
      throw InvalidArgumentError("BulkChannel: all streams must connect the same pair of peers");
}
BulkChannel::BulkChannel(BulkChannel&&) noexcept = default;
BulkChannel& BulkChannel::operator=(BulkChannel&&) noexcept = default;
BulkChannel::~BulkChannel() = default;

std::vector<BulkStream::Impl*> BulkChannel::impls() {
  std::vector<BulkStream::Impl*> out;
  for (auto& s : streams_) out.push_back(s.impl_.get());
  return out;
}

const PeerId& BulkChannel::peer() const { return streams_[0].peer(); }
size_t BulkChannel::stream_count() const { return streams_.size(); }

BulkChannel BulkChannel::connect(const crypto::Identity& self, const PeerId& peer, const std::string& host,
                                 uint16_t port, uint32_t streams, const BulkOptions& options, Deadline deadline) {
  if (streams == 0 || streams > 256)
    throw InvalidArgumentError(fmt::format("BulkChannel: {} streams requested (1..256)", streams));
  uint64_t channel_id = 0;
  crypto::random_bytes(crypto::MutableByteSpan(reinterpret_cast<uint8_t*>(&channel_id), sizeof channel_id));
  std::vector<BulkStream> list;
  for (uint32_t i = 0; i < streams; ++i)
    list.push_back(BulkStream::connect(self, peer, host, port, options, deadline, channel_id, i, streams));
  return BulkChannel(std::move(list));
}

BulkChannel BulkChannel::accept(BulkListener& listener, const PeerId& peer, uint32_t streams, Deadline deadline,
                                const CancelToken* cancel) {
  BulkChannelAssembler assembler(streams);
  for (;;) {
    BulkStream s = listener.accept(deadline, cancel);
    if (s.peer() != peer || s.stream_count() != streams) {
      log::warn("net", "bulk stream from {} ({} streams) dropped: waiting for {} with {} streams",
                s.peer().fingerprint(), s.stream_count(), peer.fingerprint(), streams);
      continue;
    }
    if (auto channel = assembler.add(std::move(s))) return std::move(*channel);
  }
}

BulkChannelAssembler::BulkChannelAssembler(uint32_t streams) : streams_(streams) {}
BulkChannelAssembler::~BulkChannelAssembler() = default;

std::optional<BulkChannel> BulkChannelAssembler::add(BulkStream stream) {
  const uint32_t index = stream.stream_index();
  if (stream.stream_count() != streams_ || index >= streams_) {
    log::warn("net", "bulk stream {} of {} from {} dropped: channels of {} streams expected", index,
              stream.stream_count(), stream.peer().fingerprint(), streams_);
    return std::nullopt;
  }
  const auto key = std::make_pair(stream.peer(), stream.channel_id());
  auto& slots = pending_[key];
  slots.resize(streams_);
  if (slots[index]) {
    log::warn("net", "duplicate bulk stream {} of channel {:x} from {} dropped", index, stream.channel_id(),
              stream.peer().fingerprint());
    return std::nullopt;
  }
  slots[index] = std::move(stream);
  for (const auto& slot : slots)
    if (!slot) return std::nullopt;
  std::vector<BulkStream> ordered;
  for (auto& slot : slots) ordered.push_back(std::move(*slot));
  pending_.erase(key);
  return BulkChannel(std::move(ordered));
}

std::vector<BulkStream> BulkChannelAssembler::take_incomplete() {
  std::vector<BulkStream> out;
  for (auto& [key, slots] : pending_)
    for (auto& slot : slots)
      if (slot) out.push_back(std::move(*slot));
  pending_.clear();
  return out;
}

void BulkChannel::send(const MessageHeader& header, crypto::ByteSpan payload, Deadline deadline,
                       const CancelToken* cancel) {
  if (!splits(payload.size(), streams_.size())) {
    streams_[0].send(header, payload, deadline, cancel);
    return;
  }
  run_parallel(streams_.size(), [&](size_t i) {
    Part p = part_of(payload.size(), streams_.size(), i);
    MessageHeader h = header;
    h.sender = (*streams_[i].impl_).self;
    h.payload_bytes = payload.size();
    (*streams_[i].impl_).send_part(WireHeader{h, p.offset, p.bytes}, payload.subspan(p.offset, p.bytes),
                                             deadline, cancel);
  });
}

namespace {

// Reads the rest of a message whose stream-0 header is w0 into dest (payload_bytes long),
// checking that every stream's header carries exactly its part and the same message tags.
void receive_parts(const std::vector<BulkStream::Impl*>& streams, const WireHeader& w0,
                   crypto::MutableByteSpan dest, Deadline deadline, const CancelToken* cancel) {
  const uint64_t total = w0.header.payload_bytes;
  run_parallel(splits(total, streams.size()) ? streams.size() : 1, [&](size_t i) {
    BulkStream::Impl& s = *streams[i];
    WireHeader w = i == 0 ? w0 : s.recv_wire_header(deadline, cancel);
    Part p = part_of(total, streams.size(), i);
    const MessageHeader& a = w.header;
    const MessageHeader& b = w0.header;
    if (w.part_offset != p.offset || w.part_bytes != p.bytes || a.payload_bytes != total || a.type != b.type ||
        a.quorum_id != b.quorum_id || a.step != b.step || a.op_seq != b.op_seq || a.tag != b.tag) {
      s.fd.reset();
      s.recv_broken = true;
      throw ProtocolError(fmt::format("peer {}: stream {} carries part [{}, +{}) of message (step {}, op {}), "
                                      "expected [{}, +{}) of (step {}, op {})", s.peer_name, i, w.part_offset,
                                      w.part_bytes, a.step, a.op_seq, p.offset, p.bytes, b.step, b.op_seq));
    }
    s.recv_part(dest.subspan(w.part_offset, w.part_bytes), deadline, cancel);
  });
}

}  // namespace

MessageHeader BulkChannel::recv_into(crypto::MutableByteSpan dest, Deadline deadline, const CancelToken* cancel) {
  BulkStream::Impl& first = *streams_[0].impl_;
  WireHeader w0 = first.recv_wire_header(deadline, cancel);
  if (w0.header.payload_bytes != dest.size()) {
    first.fd.reset();
    first.recv_broken = true;
    throw ProtocolError(fmt::format("peer {} sent a {}-byte message where {} bytes were expected", first.peer_name,
                                    w0.header.payload_bytes, dest.size()));
  }
  receive_parts(impls(), w0, dest, deadline, cancel);
  return w0.header;
}

MessageHeader BulkChannel::recv(std::vector<uint8_t>& payload, Deadline deadline, const CancelToken* cancel) {
  return recv_placed([](const MessageHeader&) { return std::nullopt; }, payload, deadline, cancel);
}

MessageHeader BulkChannel::recv_placed(const PlaceFn& place, std::vector<uint8_t>& fallback, Deadline deadline,
                                       const CancelToken* cancel, size_t max_fallback_bytes) {
  BulkStream::Impl& first = *streams_[0].impl_;
  WireHeader w0 = first.recv_wire_header(deadline, cancel);
  std::optional<crypto::MutableByteSpan> dest = place(w0.header);
  if (dest && dest->size() != w0.header.payload_bytes) {
    // The caller's mistake, but the stream is now mid-message: it cannot be used further.
    first.fd.reset();
    first.recv_broken = true;
    throw InvalidArgumentError(fmt::format("recv_placed: a {}-byte destination for a {}-byte message from {}",
                                           dest->size(), w0.header.payload_bytes, first.peer_name));
  }
  if (!dest && w0.header.payload_bytes > max_fallback_bytes) {
    first.fd.reset();
    first.recv_broken = true;
    throw ProtocolError(fmt::format("peer {} sent an unexpected {}-byte message (tag {:#x}); at most {} bytes were "
                                    "acceptable here", first.peer_name, w0.header.payload_bytes, w0.header.tag,
                                    max_fallback_bytes));
  }
  if (!dest) {
    fallback.resize(w0.header.payload_bytes);
    dest = crypto::MutableByteSpan(fallback);
  }
  receive_parts(impls(), w0, *dest, deadline, cancel);
  return w0.header;
}

Message BulkChannel::recv(Deadline deadline, const CancelToken* cancel) {
  Message m;
  m.header = recv(m.payload, deadline, cancel);
  return m;
}

}  // namespace meshtrain::net
